"""Benchmarks behind `connpub bench`: datapath ns/packet and control-plane throughput."""

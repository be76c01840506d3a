"""Traffic: the trace schema, the workload generator, pcap import, the lab's driver and services."""

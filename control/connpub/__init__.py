"""connpub: connection publishing for a distributed L4 load balancer."""

__version__ = "0.1.0"

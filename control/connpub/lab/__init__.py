"""The netns lab: topology up/down and real workloads through it with both agents (docs/lab.md)."""

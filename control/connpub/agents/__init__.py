"""The two connpub agents: the server agent (publishes flows and aggregates) and the LB agent
(applies leases, decides granularity). docs/agents.md describes both."""

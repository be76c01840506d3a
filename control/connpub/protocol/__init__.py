"""The publishing wire protocol: packet layout, codec and authentication (docs/protocol.md)."""

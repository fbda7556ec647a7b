"""Front ends that turn outside requests into engine calls (HTTP servers)."""

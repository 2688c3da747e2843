"""The operations tier: the FUSE handlers and reclaim driven directly, without a kernel."""

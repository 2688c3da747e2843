"""volfs: a tmpfs-like FUSE filesystem whose files can hold volatile ranges."""

__version__ = "0.1.0"

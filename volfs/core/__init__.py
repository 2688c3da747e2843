"""The daemon's model of a mount, without FUSE: volatile ranges, the page store, the purge
order and reclaim, the namespace of inodes.

Layers, each using only those before it: ``intervals`` and ``sums`` (sorted structures),
``ranges`` (one file's volatile ranges and lost pages), ``store`` (file contents in one memfd,
the size cap; ``worker`` threads for its blocking calls), ``purge`` (the global LRU and the
purge itself), ``reclaim`` (purging for room, on request and under pressure, and dropping what
was purged from the kernel's cache), ``stepping`` (long work taken a step at a time between
requests), ``inode`` (an inode's fields, a directory's entries), ``volatility`` (marking spans
volatile and non-volatile, reporting on them) and ``namespace`` (the tree of inodes: names,
lifetimes, attributes and data).
"""

"""The volfs daemon: the FUSE side of a mount, over :mod:`volfs.core`.

``main`` is the ``volfs`` command and the life of a mount; ``options`` its mount options;
``pressure`` (with ``meminfo``) when to purge for the system's sake; ``session`` the FUSE
session; ``fs`` the pyfuse3 handlers, ``ioctls`` the volfs ioctls, ``handles`` the open files
and ``replies`` the mapping of errors to answers; ``bridge`` (``_bridge.c``) the C bridge into
libfuse for what pyfuse3 lacks.
"""

"""The C extensions; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # The bridge into libfuse: the handlers pyfuse3 lacks (ioctl, fallocate, lseek, ...).
        Extension(
            "volfs.daemon._bridge",
            sources=["volfs/daemon/_bridge.c"],
            depends=["volfs/core/pagemap.h"],
            include_dirs=["/usr/include/fuse3", "volfs/core"],
            libraries=["fuse3", "dl"],
            extra_compile_args=[
                "-std=gnu11",
                "-Wall",
                "-Wextra",
                "-Wno-missing-field-initializers",
            ],
        ),
        # Page maps of regular files, shared by the store (Python) and the bridge's threads.
        Extension(
            "volfs.core._pagemap",
            sources=["volfs/core/_pagemap.c"],
            depends=["volfs/core/pagemap.h"],
            include_dirs=["volfs/core"],
            extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"],
        ),
        # Atomic operations on segment tables, built on volfs.h's own functions.
        Extension(
            "volfs._segments",
            sources=["volfs/_segments.c"],
            include_dirs=["volfs/include"],
            extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"],
        ),
    ],
)

"""The mount tier: real volfs mounts reached through the kernel, other processes and users."""

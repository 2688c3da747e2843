/*
 * volfs.h - volatile ranges on volfs files, for C programs.
 *
 * All ioctls are Linux restricted ioctls: one flat struct whose size is encoded in the
 * number. Integers are native-endian; offsets and lengths are multiples of VOLFS_PAGE_SIZE.
 * The ioctl returns 0 on success; byte counts are in the struct (they may exceed an int).
 */
#ifndef VOLFS_H
#define VOLFS_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define VOLFS_PAGE_SIZE     4096

#define VRANGE_VOLATILE     0
#define VRANGE_NONVOLATILE  1
#define VRANGE_FULL         0   /* flags: purge the whole range at once   */
#define VRANGE_PARTIAL      1   /* flags: may purge part of the range     */

struct vrange_args {            /* 40 bytes */
    __u64 start;     /* in:  byte offset, multiple of 4096                       */
    __u64 length;    /* in:  multiple of 4096; 0 = up to the page-rounded EOF    */
    __u32 mode;      /* in:  VRANGE_VOLATILE or VRANGE_NONVOLATILE                */
    __u32 flags;     /* in:  VRANGE_FULL or VRANGE_PARTIAL                        */
    __u64 marked;    /* out: bytes set to the requested mode                      */
    __u32 purged;    /* out: NONVOLATILE: 1 if any byte had been purged, else 0   */
    __u32 reserved;  /* in:  must be 0                                            */
};
#define VOLFS_IOC_VRANGE         _IOWR('v', 0x80, struct vrange_args)   /* 0xc0287680 */
/*
 * Errors of VOLFS_IOC_VRANGE: EINVAL (unaligned or overflowing span, one past the
 * page-rounded EOF, unknown mode or flag, reserved != 0), EBADF (descriptor not open for
 * writing), EISDIR/EINVAL (not a regular file), and ENOSPC when the change needs a new range
 * record past the file's or the mount's bound (mount options max_file_ranges=, max_ranges=):
 * a mark that overlaps no range, or an unmark that splits a range in two. An unmark that only
 * trims or removes ranges never fails for this. An error means nothing changed.
 */

struct vrange_status {          /* 32 bytes */
    __u64 start;          /* in:  as above                                  */
    __u64 length;         /* in:  as above                                  */
    __u64 volatile_bytes; /* out: bytes of the span that are volatile       */
    __u64 purged_bytes;   /* out: bytes of the span purged and not yet
                                  rewritten or unmarked                      */
};
#define VOLFS_IOC_VRANGE_STATUS  _IOWR('v', 0x81, struct vrange_status) /* 0xc0207681 */

struct volfs_purge {            /* 16 bytes */
    __u64 bytes;    /* in:  purge at least this much; 0 = all volatile data */
    __u64 purged;   /* out: bytes purged                                    */
};
#define VOLFS_IOC_PURGE          _IOWR('v', 0x82, struct volfs_purge)   /* 0xc0107682 */

/* An extension of the fvrange ABI: the counters of the mount holding the file. */
struct volfs_stats {            /* 96 bytes */
    __u64 capacity_bytes;   /* the size= cap                                      */
    __u64 used_bytes;       /* memory held by file contents                       */
    __u64 volatile_bytes;   /* bytes in volatile ranges (saturates at 2^64 - 1)   */
    __u64 purged_bytes;     /* memory released by purges since the mount          */
    __u64 ranges;           /* volatile ranges                                    */
    __u64 purgeable_ranges; /* volatile ranges holding data a purge could take    */
    __u64 purges_ioctl;     /* purges by VOLFS_IOC_PURGE                          */
    __u64 purges_size;      /* purges to make room under the size= cap            */
    __u64 purges_pressure;  /* purges for system memory pressure                  */
    __u64 inodes;           /* files, directories and links                       */
    __u64 max_inodes;       /* nr_inodes= (0: no limit)                           */
    __u64 reserved;
};
#define VOLFS_IOC_STATS          _IOR('v', 0x83, struct volfs_stats)    /* 0x80607683 */

/*
 * An extension of the fvrange ABI: the volatile ranges of a file themselves, one per call.
 * Any descriptor of a regular file will do. Ranges that only touch are answered separately;
 * a purge that takes the tail of a VRANGE_PARTIAL range leaves that tail a range of its own.
 * List them all with: start = 0; then start = range_end until range_end == 0.
 * Errors: EINVAL for an unaligned start, EISDIR/EINVAL on a non-regular file.
 */
struct vrange_next {            /* 32 bytes */
    __u64 start;        /* in:  multiple of 4096: find the first range ending after it      */
    __u64 range_start;  /* out: its first byte                                             */
    __u64 range_end;    /* out: its end (exclusive); 0 when there is no such range         */
    __u32 flags;        /* out: VRANGE_FULL or VRANGE_PARTIAL, as it was marked            */
    __u32 purged;       /* out: 1 if any of it was purged since it was marked (what        */
                        /*      VRANGE_NONVOLATILE over it would report), else 0            */
};
#define VOLFS_IOC_VRANGE_NEXT    _IOWR('v', 0x84, struct vrange_next)   /* 0xc0207684 */

#endif /* VOLFS_H */

/*
 * volfs.h - volatile ranges on volfs files, for C programs.
 *
 * All ioctls are Linux restricted ioctls: one flat struct whose size is encoded in the
 * number. Integers are native-endian; offsets and lengths are multiples of VOLFS_PAGE_SIZE.
 * The ioctl returns 0 on success; byte counts are in the struct (they may exceed an int).
 */
#ifndef VOLFS_H
#define VOLFS_H

/*
 * The segment functions below use Linux interfaces (futexes, syscall(2), CLOCK_MONOTONIC):
 * include this header before any system header, or compile with -D_GNU_SOURCE (gcc's and
 * clang's default GNU modes need neither).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

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
    __u64 volatile_bytes;   /* bytes in volatile ranges and unpinned segments     */
    __u64 purged_bytes;     /* memory released by purges since the mount          */
    __u64 ranges;           /* volatile ranges                                    */
    __u64 purgeable_ranges; /* volatile ranges holding data a purge could take    */
    __u64 purges_ioctl;     /* purges by VOLFS_IOC_PURGE                          */
    __u64 purges_size;      /* purges to make room under the size= cap            */
    __u64 purges_pressure;  /* purges for system memory pressure                  */
    __u64 inodes;           /* files, directories and links                       */
    __u64 max_inodes;       /* nr_inodes= (0: no limit)                           */
    __u64 segments;         /* segments registered in all files (was reserved, 0) */
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

/*
 * An extension of the fvrange ABI: what a regular file holds, in one call, for tools that
 * list a mount's files (vrangectl ls). Any descriptor of the file will do, read-only
 * included. The counts are of one moment; others may change them right after.
 * Errors: EISDIR on a directory; ENOTTY on a FIFO or device node (the kernel answers their
 * ioctls itself) and off volfs.
 */
struct volfs_file_info {        /* 64 bytes */
    __u64 size;             /* out: st_size                                              */
    __u64 resident_bytes;   /* out: memory the file's data holds (st_blocks * 512)       */
    __u64 volatile_bytes;   /* out: volatile bytes of the whole file, and                */
    __u64 purged_bytes;     /* out: purged ones: what VOLFS_IOC_VRANGE_STATUS reports    */
    __u64 openers;          /* out: open file descriptions of the file in all processes, */
                            /*      the caller's own included (volatility ends with the  */
                            /*      last of them)                                        */
    __u64 segments;         /* out: segments registered in the file's table              */
    __u64 reserved[2];      /* out: 0                                                    */
};
#define VOLFS_IOC_FILE_INFO      _IOR('v', 0x88, struct volfs_file_info) /* 0x80407688 */


/*
 * Segments: volatility at the cost of an atomic instruction.
 *
 * A segment is a registered, page-aligned range of a file whose state word lives in a table
 * shared by the daemon and every process that has the table: pin and unpin are atomic
 * operations on that word, with no system call (a pin that meets a purge in progress waits
 * on a futex). unpin = VRANGE_VOLATILE (FULL or PARTIAL as registered); pin =
 * VRANGE_NONVOLATILE, reporting whether the segment was purged while unpinned. The daemon
 * purges a segment only after winning a compare-and-swap UNPINNED -> PURGING, and publishes
 * PURGED once the pages are gone from its memory and from the kernel's cache: once pin has
 * returned, nothing of the segment can be purged until the next unpin.
 *
 * The table belongs to the file: any descriptor open for writing may obtain it (read-only
 * descriptors obtain it read-only: they see states, never change them), and every holder
 * sees and changes the same words. The file's last close ends it: every word turns
 * VOLFS_SEGMENT_STALE and pin/unpin fail with ESTALE. FUSE delivers that close to the daemon
 * only after close(2) has returned, so the words turn STALE a moment later, not at once:
 * whoever relies on it waits for volfs_segment_state() to say VOLFS_SEGMENT_STALE.
 *
 * Getting the table (volfs_segments_open does all of it):
 *  1. VOLFS_IOC_SEGMENTS on a descriptor of the file (open for writing: a read-only one only
 *     gets a table that exists, else ENOENT) creates the table if the file has none
 *     (with `capacity` slots, 0 = VOLFS_SEGMENTS_DEFAULT, at most VOLFS_SEGMENTS_PER_FILE_MAX;
 *     its pages are charged to the mount's size=) and answers a one-time token, valid for
 *     VOLFS_SEGMENT_TOKEN_SECONDS, the daemon's pid and the name of its socket.
 *  2. Connect a SOCK_STREAM AF_UNIX socket to that name in the abstract namespace (a NUL
 *     byte, then the name); check with SO_PEERCRED that the peer's pid is the daemon's (no
 *     other process can then pose as the daemon), and send the 16 token bytes.
 *  3. Receive a __s32 status (0 or an errno) and, on success, the table's memfd with
 *     SCM_RIGHTS; map it MAP_SHARED over its whole size (PROT_READ only if the token came
 *     from a read-only descriptor). The errors: EACCES for a token that is unknown, used
 *     already or expired; ESTALE if the file's last close ended the table meanwhile.
 * Registering and releasing segments are ioctls on a descriptor open for writing.
 *
 * The table: a 64-byte header (magic, version, capacity, slot size), then `capacity` slots
 * of 32 bytes. A slot's state word changes only by compare-and-swap; its stamp is the
 * CLOCK_MONOTONIC time of the last unpin (the purge order is least recently unpinned first,
 * one order with volatile ranges); start, length and flags repeat what was registered. The
 * daemon never trusts the table: it keeps its own record of every segment and reads only
 * the state words and stamps.
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <linux/futex.h>
#include <sys/ioctl.h>
#ifndef SO_PEERCRED
#include <asm/socket.h>
#endif

#if defined(__GLIBC__) && !defined(__USE_MISC) && !defined(__cplusplus)
#error "volfs.h: include it before any system header, or compile with -D_GNU_SOURCE"
#endif

/* The credentials SO_PEERCRED answers (struct ucred, which needs _GNU_SOURCE in time). */
struct volfs__peer_credentials {
    __s32 pid;
    __u32 uid;
    __u32 gid;
};

#define VOLFS_SEGMENT_FREE      0   /* the slot holds no segment                              */
#define VOLFS_SEGMENT_PINNED    1   /* non-volatile                                           */
#define VOLFS_SEGMENT_UNPINNED  2   /* volatile, nothing purged                               */
#define VOLFS_SEGMENT_PURGING   3   /* the daemon is purging it; a pin waits                  */
#define VOLFS_SEGMENT_PURGED    4   /* volatile and (some of it) purged; the next pin says so */
#define VOLFS_SEGMENT_STALE     5   /* the file's volatility ended: the table is dead         */

#define VOLFS_SEGMENT_TABLE_MAGIC   0x564F4C53u  /* "VOLS" */
#define VOLFS_SEGMENT_TABLE_VERSION 1
#define VOLFS_SEGMENTS_DEFAULT      1024         /* slots of a table created with capacity 0 */
#define VOLFS_SEGMENTS_PER_FILE_MAX 131072       /* slots of one file's table, at most       */
#define VOLFS_SEGMENTS_PER_MOUNT_MAX 1048576     /* slots of all tables of a mount, at most  */
#define VOLFS_SEGMENT_TOKEN_BYTES   16
#define VOLFS_SEGMENT_TOKEN_SECONDS 10
#define VOLFS_SEGMENT_SOCKET_NAME_BYTES 64
#define VOLFS_SEGMENT_HANDOVER_SECONDS 5   /* volfs_segments_open waits this long at most */

struct volfs_segment_table_header {  /* 64 bytes, at offset 0 of the table */
    __u32 magic;      /* VOLFS_SEGMENT_TABLE_MAGIC      */
    __u32 version;    /* VOLFS_SEGMENT_TABLE_VERSION    */
    __u32 capacity;   /* slots                          */
    __u32 slot_size;  /* sizeof(struct volfs_segment_slot) */
    __u8 reserved[48];
};

struct volfs_segment_slot {          /* 32 bytes; slot i at 64 + 32 * i */
    __u32 state;      /* VOLFS_SEGMENT_*                                          */
    __u32 flags;      /* VRANGE_FULL or VRANGE_PARTIAL, as registered             */
    __u64 stamp;      /* CLOCK_MONOTONIC nanoseconds of the last unpin            */
    __u64 start;      /* as registered                                            */
    __u64 length;     /* as registered                                            */
};

#define VOLFS_SEGMENTS_EXISTING 1  /* flags: only a table the file has (else ENOENT)    */

struct volfs_segments_args {         /* 96 bytes */
    __u32 capacity;   /* in:  slots of the table if the file has none yet; 0 = default */
    __u32 flags;      /* in:  0 or VOLFS_SEGMENTS_EXISTING                             */
    __u32 pid;        /* out: the daemon's pid, to check with SO_PEERCRED              */
    __u32 granted;    /* out: the table's capacity (an existing table keeps its own)   */
    __u8 token[VOLFS_SEGMENT_TOKEN_BYTES];          /* out: one-time token            */
    char socket[VOLFS_SEGMENT_SOCKET_NAME_BYTES];   /* out: abstract socket name, NUL-terminated */
};
#define VOLFS_IOC_SEGMENTS          _IOWR('v', 0x85, struct volfs_segments_args) /* 0xc0607685 */
/*
 * Errors of VOLFS_IOC_SEGMENTS: EINVAL (capacity past VOLFS_SEGMENTS_PER_FILE_MAX, an unknown
 * flag, not a regular file), EISDIR, ENOENT (VOLFS_SEGMENTS_EXISTING and no table), ENOSPC
 * (the table's pages do not fit under size=, the mount's tables would pass
 * VOLFS_SEGMENTS_PER_MOUNT_MAX slots, or the daemon holds as many tables as its descriptors
 * allow: two each, 256 kept for itself).
 */

struct volfs_segment_args {          /* 24 bytes */
    __u64 start;      /* REGISTER in: multiple of 4096; RELEASE out                     */
    __u64 length;     /* REGISTER in: multiple of 4096, > 0; RELEASE out                */
    __u32 flags;      /* REGISTER in: VRANGE_FULL or VRANGE_PARTIAL; RELEASE out        */
    __u32 index;      /* REGISTER out: the segment's slot; RELEASE in                   */
};
#define VOLFS_IOC_SEGMENT_REGISTER  _IOWR('v', 0x86, struct volfs_segment_args)  /* 0xc0187686 */
#define VOLFS_IOC_SEGMENT_RELEASE   _IOWR('v', 0x87, struct volfs_segment_args)  /* 0xc0187687 */
/*
 * REGISTER adds a segment, pinned, to the file's table. Errors: EBADF (descriptor not open
 * for writing), ENOENT (the file has no table: VOLFS_IOC_SEGMENTS first), EINVAL (unaligned,
 * empty or overflowing span, one past the page-rounded EOF, unknown flag), EBUSY (the span
 * overlaps another segment, a volatile range, a VOLFS_IOC_VRANGE still marking it volatile,
 * or purged data nobody was told of yet: VRANGE_NONVOLATILE over it first), ENOSPC (the
 * table is full, the segment does not fit under size=, or the file or the mount holds as many
 * range records as max_file_ranges= or max_ranges= allow: pages purged from a segment stay
 * lost once it is released, a record).
 * RELEASE ends a segment: its pages are no longer volatile, and purged pages nobody was told
 * of stay purged (EIO on read) until rewritten. Errors: EBADF, ENOENT (no table), EINVAL (no
 * segment at that index). VOLFS_IOC_VRANGE over a span overlapping a segment fails with EBUSY.
 */

/* A file's segment table, as volfs_segments_open maps it. */
struct volfs_segment_table {
    void *base;          /* the mapping                                   */
    size_t size;         /* its length                                    */
    __u32 capacity;      /* slots                                         */
    int writable;        /* 0 for a table obtained through a read-only descriptor */
    pid_t daemon;        /* the daemon's pid: a pin stops waiting if it is gone   */
};

static inline struct volfs_segment_slot *volfs_segment__slot(
    const struct volfs_segment_table *table, __u32 index)
{
    return (struct volfs_segment_slot *)((char *)table->base
        + sizeof(struct volfs_segment_table_header)
        + (size_t)index * sizeof(struct volfs_segment_slot));
}

/* Receive the table's memfd for a token over the daemon's socket; -1 with errno on failure. */
static inline int volfs_segments__receive(const struct volfs_segments_args *args)
{
    struct sockaddr_un address;
    struct volfs__peer_credentials peer;
    socklen_t peer_size = sizeof(peer);
    size_t name = strnlen(args->socket, sizeof(args->socket));
    __s32 status = 0;
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
    struct timeval patience = {VOLFS_SEGMENT_HANDOVER_SECONDS, 0};
    struct iovec vector;
    struct msghdr message;
    struct cmsghdr *cmsg;
    ssize_t got;
    int memfd = -1, saved, sock;

    if (name == 0 || name >= sizeof(args->socket) || name + 1 > sizeof(address.sun_path)) {
        errno = EPROTO;
        return -1;
    }
    sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -1;
    /* A daemon busy with others (or with someone hogging its socket): give up in time. */
    if (setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &patience, sizeof(patience)) < 0
            || setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof(patience)) < 0)
        goto fail;
    memset(&address, 0, sizeof(address));
    address.sun_family = AF_UNIX;
    memcpy(address.sun_path + 1, args->socket, name);
    if (connect(sock, (struct sockaddr *)&address,
                (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + name)) < 0)
        goto fail;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &peer, &peer_size) < 0)
        goto fail;
    if (peer.pid != (pid_t)args->pid) {
        errno = EPERM;  /* somebody else holds the name: never trust what it sends */
        goto fail;
    }
    if (send(sock, args->token, sizeof(args->token), MSG_NOSIGNAL) != (ssize_t)sizeof(args->token))
        goto fail;
    memset(&control, 0, sizeof(control));
    memset(&message, 0, sizeof(message));
    vector.iov_base = &status;
    vector.iov_len = sizeof(status);
    message.msg_iov = &vector;
    message.msg_iovlen = 1;
    message.msg_control = control.space;
    message.msg_controllen = sizeof(control.space);
    do
        got = recvmsg(sock, &message, MSG_CMSG_CLOEXEC | MSG_WAITALL);
    while (got < 0 && errno == EINTR);
    if (got < 0)
        goto fail;
    for (cmsg = CMSG_FIRSTHDR(&message); cmsg != NULL; cmsg = CMSG_NXTHDR(&message, cmsg))
        if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS
            && cmsg->cmsg_len == CMSG_LEN(sizeof(int)))
            memcpy(&memfd, CMSG_DATA(cmsg), sizeof(int));
    if (got != (ssize_t)sizeof(status) || status != 0 || memfd < 0) {
        if (memfd >= 0)
            close(memfd);
        errno = got != (ssize_t)sizeof(status) ? EPROTO : status > 0 ? status : EPROTO;
        goto fail;
    }
    close(sock);
    return memfd;
fail:
    saved = errno;
    close(sock);
    errno = saved;
    return -1;
}

/*
 * Map the segment table of the volfs file open as `fd`, creating it with `capacity` slots
 * (0 = VOLFS_SEGMENTS_DEFAULT) if the file has none. Returns 0, or -1 with errno set.
 * The table stays usable after `fd` is closed, as long as the file has other descriptors.
 */
static inline int volfs_segments_open(int fd, __u32 capacity, struct volfs_segment_table *table)
{
    struct volfs_segments_args args;
    struct stat info;
    void *base;
    int memfd, saved, writable;

    memset(&args, 0, sizeof(args));
    args.capacity = capacity;
    if (ioctl(fd, VOLFS_IOC_SEGMENTS, &args) < 0)
        return -1;
    memfd = volfs_segments__receive(&args);
    if (memfd < 0)
        return -1;
    if (fstat(memfd, &info) < 0)
        goto fail;
    if ((size_t)info.st_size < sizeof(struct volfs_segment_table_header)
            + (size_t)args.granted * sizeof(struct volfs_segment_slot)) {
        errno = EPROTO;
        goto fail;
    }
    writable = fcntl(memfd, F_GETFL) & O_ACCMODE;  /* a read-only token gives O_RDONLY */
    writable = writable == O_RDWR;
    base = mmap(NULL, (size_t)info.st_size, PROT_READ | (writable ? PROT_WRITE : 0),
                MAP_SHARED, memfd, 0);
    if (base == MAP_FAILED)
        goto fail;
    close(memfd);
    table->base = base;
    table->size = (size_t)info.st_size;
    table->capacity = args.granted;
    table->writable = writable;
    table->daemon = (pid_t)args.pid;
    return 0;
fail:
    saved = errno;
    close(memfd);
    errno = saved;
    return -1;
}

/* Unmap a table. Its segments stay as they are: release them first if they should go. */
static inline void volfs_segments_close(struct volfs_segment_table *table)
{
    if (table->base != NULL)
        munmap(table->base, table->size);
    table->base = NULL;
}

/*
 * Register pages [offset, offset + length) of the file open for writing as `fd` as a segment
 * of its table, pinned; `flags` is VRANGE_FULL or VRANGE_PARTIAL. Returns 0 and the
 * segment's index in *segment, or -1 with errno set.
 */
static inline int volfs_segment_register(int fd, __u64 offset, __u64 length, __u32 flags,
                                         __u32 *segment)
{
    struct volfs_segment_args args;

    memset(&args, 0, sizeof(args));
    args.start = offset;
    args.length = length;
    args.flags = flags;
    if (ioctl(fd, VOLFS_IOC_SEGMENT_REGISTER, &args) < 0)
        return -1;
    *segment = args.index;
    return 0;
}

/* Release segment `segment` of the file open for writing as `fd`. 0, or -1 with errno. */
static inline int volfs_segment_release(int fd, __u32 segment)
{
    struct volfs_segment_args args;

    memset(&args, 0, sizeof(args));
    args.index = segment;
    return ioctl(fd, VOLFS_IOC_SEGMENT_RELEASE, &args) < 0 ? -1 : 0;
}

/* The state of a segment (VOLFS_SEGMENT_*), or -1 with errno EINVAL for an index past the table. */
static inline int volfs_segment_state(const struct volfs_segment_table *table, __u32 segment)
{
    if (segment >= table->capacity) {
        errno = EINVAL;
        return -1;
    }
    return (int)__atomic_load_n(&volfs_segment__slot(table, segment)->state, __ATOMIC_ACQUIRE);
}

/* 0 if this process may change the segment's word; -1 with errno EBADF or EINVAL if not. */
static inline int volfs_segment__changeable(const struct volfs_segment_table *table,
                                            __u32 segment)
{
    if (!table->writable) {
        errno = EBADF;
        return -1;
    }
    if (segment >= table->capacity) {
        errno = EINVAL;
        return -1;
    }
    return 0;
}

/*
 * Pin a segment: make it non-volatile. *purged (if not NULL) is set to 1 if any of it was
 * purged while it was unpinned (its pages then read as zeros), else 0. Waits while the
 * daemon is purging it. Returns 0, or -1 with errno: ESTALE (the file's volatility ended:
 * last close or unmount; or the daemon died while the pin waited for its purge: a pin that
 * needs no wait does not notice a dead daemon), EINVAL (no segment at that index), EBADF (a
 * read-only table). No system call unless a purge is under way.
 */
static inline int volfs_segment_pin(const struct volfs_segment_table *table, __u32 segment,
                                    int *purged)
{
    __u32 *word, state;

    if (volfs_segment__changeable(table, segment) < 0)
        return -1;
    word = &volfs_segment__slot(table, segment)->state;
    state = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    for (;;) {
        switch (state) {
        case VOLFS_SEGMENT_PINNED:
            if (purged != NULL)
                *purged = 0;
            return 0;
        case VOLFS_SEGMENT_UNPINNED:
        case VOLFS_SEGMENT_PURGED:
            if (__atomic_compare_exchange_n(word, &state, VOLFS_SEGMENT_PINNED, 0,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                if (purged != NULL)
                    *purged = state == VOLFS_SEGMENT_PURGED;
                return 0;
            }
            break;  /* the word changed under us: look again */
        case VOLFS_SEGMENT_PURGING: {
            struct timespec wait = {0, 100000000};
            if (syscall(SYS_futex, word, FUTEX_WAIT, VOLFS_SEGMENT_PURGING, &wait, NULL, 0) < 0
                    && errno == ETIMEDOUT && kill(table->daemon, 0) < 0 && errno == ESRCH) {
                errno = ESTALE;
                return -1;
            }
            state = __atomic_load_n(word, __ATOMIC_ACQUIRE);
            break;
        }
        case VOLFS_SEGMENT_STALE:
            errno = ESTALE;
            return -1;
        default:
            errno = EINVAL;
            return -1;
        }
    }
}

/*
 * Unpin a segment: make it volatile (FULL or PARTIAL as registered), least recently
 * unpinned first in the purge order. Unpinning a volatile segment only renews its stamp.
 * Returns 0, or -1 with errno as volfs_segment_pin. No system call (the clock is the vDSO's).
 */
static inline int volfs_segment_unpin(const struct volfs_segment_table *table, __u32 segment)
{
    struct volfs_segment_slot *slot;
    struct timespec now;
    __u32 state;

    if (volfs_segment__changeable(table, segment) < 0)
        return -1;
    slot = volfs_segment__slot(table, segment);
    clock_gettime(CLOCK_MONOTONIC, &now);
    __atomic_store_n(&slot->stamp, (__u64)now.tv_sec * 1000000000u + (__u64)now.tv_nsec,
                     __ATOMIC_RELAXED);
    state = __atomic_load_n(&slot->state, __ATOMIC_RELAXED);
    for (;;) {
        switch (state) {
        case VOLFS_SEGMENT_PINNED:
            /* Release: the stamp is seen by whoever sees the segment unpinned. */
            if (__atomic_compare_exchange_n(&slot->state, &state, VOLFS_SEGMENT_UNPINNED, 0,
                                            __ATOMIC_RELEASE, __ATOMIC_RELAXED))
                return 0;
            break;
        case VOLFS_SEGMENT_UNPINNED:
        case VOLFS_SEGMENT_PURGING:
        case VOLFS_SEGMENT_PURGED:
            return 0;
        case VOLFS_SEGMENT_STALE:
            errno = ESTALE;
            return -1;
        default:
            errno = EINVAL;
            return -1;
        }
    }
}

#endif /* VOLFS_H */

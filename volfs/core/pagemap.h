/*
 * The page map of one regular file, shared by volfs.core._pagemap (which Python drives) and
 * the bridge's request threads (volfs.daemon._bridge), which serve reads and writes of
 * ordinary pages without Python.
 *
 * A map is the one record of where a file's pages are in the store's arena, of its size and
 * of its timestamps. Its runs are sorted by file page, never overlap, and runs adjacent in
 * both the file and the arena are merged.
 *
 * Locking: Python changes the runs holding the map's lock exclusively for the whole change,
 * so a request thread, which holds it shared from its lookup until its reply is written, never
 * sees half of one. Request threads change only the data, the size (growing it, an atomic
 * maximum) and the timestamps (under their own small lock), which Python may read without
 * the map's lock.
 *
 * holds: a map with any bit set is served by Python alone (volatile ranges, a segment table,
 * pages reserved by fallocate). Bits are set and cleared under the lock, so once a bit is set
 * no request thread is still using the map.
 */
#ifndef VOLFS_PAGEMAP_H
#define VOLFS_PAGEMAP_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define VOLFS_PAGEMAP_CAPSULE "volfs.core._pagemap._C_API"

typedef struct {
    int64_t page;  /* first file page */
    int64_t arena; /* its arena page */
    int64_t count; /* pages */
} vf_run_t;

/* A timestamp: any time_t, as tmpfs keeps it (64-bit nanoseconds end in 2262). */
typedef struct {
    int64_t sec;
    int64_t nsec; /* 0 to 999999999 */
} vf_time_t;

typedef struct vf_pagemap {
    pthread_rwlock_t lock; /* prefers writers: Python is never starved by request threads */
    atomic_long refs; /* the Python object's, a table's, a request thread's */
    vf_run_t *runs;
    size_t len, cap;
    _Atomic int64_t size; /* bytes */
    _Atomic int64_t pages; /* pages held: the sum of the runs' counts */
    pthread_mutex_t times_lock; /* the timestamps', held only to read or set them */
    vf_time_t atime, mtime, ctime;
    _Atomic unsigned holds;
} vf_pagemap_t;

/* What volfs.core._pagemap exports to the bridge through its capsule. */
typedef struct {
    /* The map registered for ino in the table, with a reference taken; NULL if none. */
    vf_pagemap_t *(*lookup)(void *table, uint64_t ino);
    /* Drop a reference taken by lookup. */
    void (*unref)(vf_pagemap_t *map);
    /* The table a PageTable object holds; NULL with TypeError set for another object. */
    void *(*table_of)(PyObject *object);
} vf_pagemap_api_t;

/* a < b */
static inline int vf_time_before(vf_time_t a, vf_time_t b) {
    return a.sec < b.sec || (a.sec == b.sec && a.nsec < b.nsec);
}

/* Grow the size to at least size. */
static inline void vf_grow(vf_pagemap_t *map, int64_t size) {
    int64_t seen = atomic_load(&map->size);
    while (seen < size && !atomic_compare_exchange_weak(&map->size, &seen, size)) {
    }
}

/* Index of the last run starting at or before page, or -1. O(log n). Under the lock. */
static inline ptrdiff_t vf_floor(const vf_pagemap_t *map, int64_t page) {
    ptrdiff_t lo = 0, hi = (ptrdiff_t)map->len;
    while (lo < hi) {
        ptrdiff_t mid = lo + (hi - lo) / 2;
        if (map->runs[mid].page <= page)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo - 1;
}

#endif

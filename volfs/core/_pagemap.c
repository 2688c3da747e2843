/*
 * volfs.core._pagemap: where each regular file's pages are, reachable from Python and C.
 *
 * PageMap is the record of one file (see pagemap.h): its runs of pages in the store's arena,
 * its size and timestamps. volfs.core.store.FileContents keeps its logic (allocation,
 * fallocate's reservations, seeking) in Python and its facts here, so the bridge's request
 * threads can serve reads and writes from the same record, without the GIL.
 *
 * PageTable maps inode numbers to the maps the bridge may serve. A map leaves its table when
 * it is discarded or freed; a request thread that found it keeps it alive with a reference.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "pagemap.h"

/* -- the map ---------------------------------------------------------------------------- */

static vf_pagemap_t *map_new(void) {
    vf_pagemap_t *map = calloc(1, sizeof *map);
    if (map == NULL) return NULL;
    pthread_rwlockattr_t attributes;
    pthread_rwlockattr_init(&attributes);
    pthread_rwlockattr_setkind_np(&attributes, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&map->lock, &attributes);
    pthread_rwlockattr_destroy(&attributes);
    pthread_mutex_init(&map->times_lock, NULL);
    atomic_init(&map->refs, 1);
    return map;
}

static void map_unref(vf_pagemap_t *map) {
    if (atomic_fetch_sub(&map->refs, 1) != 1) return;
    pthread_rwlock_destroy(&map->lock);
    pthread_mutex_destroy(&map->times_lock);
    free(map->runs);
    free(map);
}

/* Room for extra more runs; -1 if memory is short. */
static int map_reserve(vf_pagemap_t *map, size_t extra) {
    if (map->len + extra <= map->cap) return 0;
    size_t cap = map->cap ? map->cap * 2 : 4;
    while (cap < map->len + extra) cap *= 2;
    vf_run_t *runs = realloc(map->runs, cap * sizeof *runs);
    if (runs == NULL) return -1;
    map->runs = runs;
    map->cap = cap;
    return 0;
}

/* -- the table ---------------------------------------------------------------------------- */

typedef struct entry {
    uint64_t ino;
    vf_pagemap_t *map;
    struct entry *next;
} entry_t;

typedef struct {
    pthread_rwlock_t lock; /* shared by lookups */
    entry_t **buckets;
    size_t nbuckets; /* a power of two */
    size_t count;
} table_t;

static size_t bucket_of(const table_t *table, uint64_t ino) {
    /* Inode numbers are mostly consecutive: a multiplicative hash spreads them. */
    return (size_t)((ino * 0x9E3779B97F4A7C15ULL) >> 20) & (table->nbuckets - 1);
}

static entry_t **table_slot(table_t *table, uint64_t ino) {
    entry_t **link = &table->buckets[bucket_of(table, ino)];
    while (*link != NULL && (*link)->ino != ino) link = &(*link)->next;
    return link;
}

/* Double the buckets once they hold one entry each; a failure only leaves chains longer. */
static void table_grow(table_t *table) {
    if (table->count < table->nbuckets) return;
    size_t nbuckets = table->nbuckets * 2;
    entry_t **buckets = calloc(nbuckets, sizeof *buckets);
    if (buckets == NULL) return;
    entry_t **old = table->buckets;
    size_t old_count = table->nbuckets;
    table->buckets = buckets;
    table->nbuckets = nbuckets;
    for (size_t i = 0; i < old_count; i++) {
        for (entry_t *entry = old[i], *next; entry != NULL; entry = next) {
            next = entry->next;
            entry_t **head = &buckets[bucket_of(table, entry->ino)];
            entry->next = *head;
            *head = entry;
        }
    }
    free(old);
}

/* Take map out of the table if it is what ino names there. */
static void table_remove(table_t *table, uint64_t ino, const vf_pagemap_t *only) {
    pthread_rwlock_wrlock(&table->lock);
    entry_t **link = table_slot(table, ino);
    entry_t *entry = *link;
    if (entry != NULL && (only == NULL || entry->map == only)) {
        *link = entry->next;
        table->count--;
    } else {
        entry = NULL;
    }
    pthread_rwlock_unlock(&table->lock);
    if (entry != NULL) {
        map_unref(entry->map);
        free(entry);
    }
}

static vf_pagemap_t *api_lookup(void *opaque, uint64_t ino) {
    table_t *table = opaque;
    pthread_rwlock_rdlock(&table->lock);
    entry_t *entry = *table_slot(table, ino);
    vf_pagemap_t *map = entry != NULL ? entry->map : NULL;
    if (map != NULL) atomic_fetch_add(&map->refs, 1);
    pthread_rwlock_unlock(&table->lock);
    return map;
}

/* -- PageMap -------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    vf_pagemap_t *map;
    PyObject *table; /* the PageTable it was added to, or NULL */
    uint64_t ino;
    /* Python's helpers nest (a write allocating, say): the thread holding the lock
     * exclusively and how many times it took it. Guarded by the GIL. */
    unsigned long owner;
    unsigned depth;
} PageMapObject;

typedef struct {
    PyObject_HEAD
    table_t table;
} PageTableObject;

static PyTypeObject PageMapType;
static PyTypeObject PageTableType;

static int set_time(PageMapObject *self, PyObject *value, void *closure);

static PyObject *pagemap_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"atime_ns", "mtime_ns", "ctime_ns", NULL};
    PyObject *times[3] = {NULL, NULL, NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOO", keywords, &times[0], &times[1],
                                     &times[2]))
        return NULL;
    PageMapObject *self = (PageMapObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->map = map_new();
    if (self->map == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    static const size_t fields[3] = {offsetof(vf_pagemap_t, atime),
                                     offsetof(vf_pagemap_t, mtime),
                                     offsetof(vf_pagemap_t, ctime)};
    for (int i = 0; i < 3; i++) {
        if (times[i] != NULL && set_time(self, times[i], (void *)fields[i]) < 0) {
            Py_DECREF(self);
            return NULL;
        }
    }
    return (PyObject *)self;
}

static void pagemap_dealloc(PageMapObject *self) {
    if (self->table != NULL) {
        table_remove(&((PageTableObject *)self->table)->table, self->ino, self->map);
        Py_CLEAR(self->table);
    }
    if (self->map != NULL) map_unref(self->map);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Lock the map exclusively (again, from the thread holding it), letting other Python
 * threads run while request threads finish. */
static void lock_exclusive(PageMapObject *self) {
    unsigned long me = PyThread_get_thread_ident();
    if (self->depth > 0 && self->owner == me) {
        self->depth++;
        return;
    }
    if (pthread_rwlock_trywrlock(&self->map->lock) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_rwlock_wrlock(&self->map->lock);
        Py_END_ALLOW_THREADS
    }
    self->owner = me;
    self->depth = 1;
}

static void unlock_exclusive(PageMapObject *self) {
    if (--self->depth == 0) pthread_rwlock_unlock(&self->map->lock);
}

static PyObject *pagemap_enter(PageMapObject *self, PyObject *unused) {
    (void)unused;
    lock_exclusive(self);
    return Py_NewRef(self);
}

static PyObject *pagemap_exit(PageMapObject *self, PyObject *args) {
    (void)args;
    if (self->depth == 0 || self->owner != PyThread_get_thread_ident()) {
        PyErr_SetString(PyExc_RuntimeError, "the page map is not locked by this thread");
        return NULL;
    }
    unlock_exclusive(self);
    Py_RETURN_FALSE;
}

static PyObject *run_tuple(const vf_run_t *run) {
    return Py_BuildValue("LLL", (long long)run->page, (long long)run->arena,
                         (long long)run->count);
}

static PyObject *pagemap_floor(PageMapObject *self, PyObject *arg) {
    long long page = PyLong_AsLongLong(arg);
    if (page == -1 && PyErr_Occurred()) return NULL;
    ptrdiff_t index = vf_floor(self->map, page);
    if (index < 0) Py_RETURN_NONE;
    return run_tuple(&self->map->runs[index]);
}

/* The runs of map overlapping [first, end), whole, in order; at most limit of them. */
static PyObject *runs_between(const vf_pagemap_t *map, int64_t first, int64_t end,
                              Py_ssize_t limit) {
    ptrdiff_t index = vf_floor(map, first);
    if (index < 0) index = 0;
    PyObject *list = PyList_New(0);
    for (size_t i = (size_t)index;
         list != NULL && i < map->len && map->runs[i].page < end && PyList_GET_SIZE(list) < limit;
         i++) {
        if (map->runs[i].page + map->runs[i].count <= first) continue;
        PyObject *run = run_tuple(&map->runs[i]);
        if (run == NULL || PyList_Append(list, run) < 0) Py_CLEAR(list);
        Py_XDECREF(run);
    }
    return list;
}

static PyObject *pagemap_runs(PageMapObject *self, PyObject *args) {
    long long first, end;
    Py_ssize_t limit = PY_SSIZE_T_MAX;
    if (!PyArg_ParseTuple(args, "LL|n", &first, &end, &limit)) return NULL;
    return runs_between(self->map, first, end, limit);
}

static PyObject *pagemap_items(PageMapObject *self, PyObject *unused) {
    (void)unused;
    return runs_between(self->map, INT64_MIN, INT64_MAX, PY_SSIZE_T_MAX);
}

static PyObject *pagemap_insert(PageMapObject *self, PyObject *args) {
    long long page, arena, count;
    if (!PyArg_ParseTuple(args, "LLL", &page, &arena, &count)) return NULL;
    vf_pagemap_t *map = self->map;
    if (count <= 0 || page < 0 || arena < 0 || page > INT64_MAX - count) {
        PyErr_SetString(PyExc_ValueError, "a run needs a count of at least 1 and no overflow");
        return NULL;
    }
    ptrdiff_t before = vf_floor(map, page);
    size_t after = (size_t)(before + 1);
    vf_run_t *prev = before >= 0 ? &map->runs[before] : NULL;
    vf_run_t *next = after < map->len ? &map->runs[after] : NULL;
    if ((prev != NULL && prev->page + prev->count > page) ||
        (next != NULL && next->page < page + count)) {
        PyErr_SetString(PyExc_ValueError, "the run overlaps a held run");
        return NULL;
    }
    int join_prev = prev != NULL && prev->page + prev->count == page &&
                    prev->arena + prev->count == arena;
    int join_next = next != NULL && next->page == page + count && next->arena == arena + count;
    if (join_prev && join_next) {
        prev->count += count + next->count;
        memmove(next, next + 1, (map->len - after - 1) * sizeof *next);
        map->len--;
    } else if (join_prev) {
        prev->count += count;
    } else if (join_next) {
        next->page = page;
        next->arena = arena;
        next->count += count;
    } else {
        if (map_reserve(map, 1) < 0) return PyErr_NoMemory();
        memmove(&map->runs[after + 1], &map->runs[after], (map->len - after) * sizeof(vf_run_t));
        map->runs[after] = (vf_run_t){.page = page, .arena = arena, .count = count};
        map->len++;
    }
    atomic_fetch_add(&map->pages, count);
    Py_RETURN_NONE;
}

/*
 * Take [first, end) out of the runs, splitting those that reach past it; returns the arena
 * runs (start, count) it held. O(log n + k) for k runs touched, plus a move of the runs after.
 */
static PyObject *pagemap_remove(PageMapObject *self, PyObject *args) {
    long long first, end;
    if (!PyArg_ParseTuple(args, "LL", &first, &end)) return NULL;
    vf_pagemap_t *map = self->map;
    PyObject *released = PyList_New(0);
    if (released == NULL || first >= end) return released;
    /* One run cut in the middle becomes two. */
    if (map_reserve(map, 1) < 0) {
        Py_DECREF(released);
        return PyErr_NoMemory();
    }
    ptrdiff_t start = vf_floor(map, first);
    if (start < 0 || map->runs[start].page + map->runs[start].count <= first) start++;
    size_t stop = (size_t)start;
    while (stop < map->len && map->runs[stop].page < end) stop++;
    if ((size_t)start == stop) return released;
    vf_run_t head = map->runs[start], tail = map->runs[stop - 1];
    int64_t freed = 0;
    for (size_t i = (size_t)start; i < stop; i++) {
        const vf_run_t *run = &map->runs[i];
        int64_t lo = run->page > first ? run->page : first;
        int64_t hi = run->page + run->count < end ? run->page + run->count : end;
        PyObject *piece = Py_BuildValue("LL", (long long)(run->arena + lo - run->page),
                                        (long long)(hi - lo));
        if (piece == NULL || PyList_Append(released, piece) < 0) {
            Py_XDECREF(piece);
            Py_DECREF(released);
            return NULL; /* nothing changed yet */
        }
        Py_DECREF(piece);
        freed += hi - lo;
    }
    vf_run_t kept[2];
    size_t nkept = 0;
    if (head.page < first)
        kept[nkept++] = (vf_run_t){.page = head.page, .arena = head.arena,
                                   .count = first - head.page};
    if (tail.page + tail.count > end)
        kept[nkept++] = (vf_run_t){.page = end, .arena = tail.arena + end - tail.page,
                                   .count = tail.page + tail.count - end};
    size_t removed = stop - (size_t)start;
    memmove(&map->runs[(size_t)start + nkept], &map->runs[stop],
            (map->len - stop) * sizeof(vf_run_t));
    memcpy(&map->runs[start], kept, nkept * sizeof(vf_run_t));
    map->len = map->len - removed + nkept;
    atomic_fetch_sub(&map->pages, freed);
    return released;
}

static PyObject *pagemap_set_hold(PageMapObject *self, PyObject *args) {
    unsigned int bit;
    int on;
    if (!PyArg_ParseTuple(args, "Ip", &bit, &on)) return NULL;
    vf_pagemap_t *map = self->map;
    /* Each bit has one owner, on one thread: unchanged, it needs no lock. */
    if (((atomic_load(&map->holds) & bit) != 0) == (on != 0)) Py_RETURN_NONE;
    /* Under the lock: once set, no request thread is still inside the map. */
    lock_exclusive(self);
    if (on)
        atomic_fetch_or(&map->holds, bit);
    else
        atomic_fetch_and(&map->holds, ~bit);
    unlock_exclusive(self);
    Py_RETURN_NONE;
}

static Py_ssize_t pagemap_length(PageMapObject *self) { return (Py_ssize_t)self->map->len; }

/* The atomics, by offset in vf_pagemap_t. */
static PyObject *get_atomic(PageMapObject *self, void *closure) {
    _Atomic int64_t *field = (_Atomic int64_t *)((char *)self->map + (size_t)closure);
    return PyLong_FromLongLong(atomic_load(field));
}

static int set_atomic(PageMapObject *self, PyObject *value, void *closure) {
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete a page map's fields");
        return -1;
    }
    long long number = PyLong_AsLongLong(value);
    if (number == -1 && PyErr_Occurred()) return -1;
    _Atomic int64_t *field = (_Atomic int64_t *)((char *)self->map + (size_t)closure);
    atomic_store(field, number);
    return 0;
}

/* The timestamps, by offset in vf_pagemap_t, in ns since the epoch as Python ints. */
static PyObject *get_time(PageMapObject *self, void *closure) {
    vf_time_t *field = (vf_time_t *)((char *)self->map + (size_t)closure);
    pthread_mutex_lock(&self->map->times_lock);
    vf_time_t time = *field;
    pthread_mutex_unlock(&self->map->times_lock);
    /* Every time between 1677 and 2262 fits 64-bit nanoseconds: no arithmetic on objects. */
    if (time.sec > INT64_MIN / 1000000000 && time.sec < INT64_MAX / 1000000000)
        return PyLong_FromLongLong(time.sec * 1000000000 + time.nsec);
    PyObject *seconds = PyLong_FromLongLong(time.sec);
    PyObject *billion = PyLong_FromLong(1000000000L);
    PyObject *scaled = seconds && billion ? PyNumber_Multiply(seconds, billion) : NULL;
    PyObject *nanoseconds = PyLong_FromLongLong(time.nsec);
    PyObject *result = scaled && nanoseconds ? PyNumber_Add(scaled, nanoseconds) : NULL;
    Py_XDECREF(seconds);
    Py_XDECREF(billion);
    Py_XDECREF(scaled);
    Py_XDECREF(nanoseconds);
    return result;
}

static int set_time(PageMapObject *self, PyObject *value, void *closure) {
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete a page map's fields");
        return -1;
    }
    PyObject *billion = PyLong_FromLong(1000000000L);
    PyObject *parts = billion ? PyNumber_Divmod(value, billion) : NULL;
    Py_XDECREF(billion);
    if (parts == NULL) return -1;
    long long sec = PyLong_AsLongLong(PyTuple_GET_ITEM(parts, 0));
    long long nsec = PyLong_AsLongLong(PyTuple_GET_ITEM(parts, 1));
    Py_DECREF(parts);
    if (PyErr_Occurred()) return -1;
    vf_time_t *field = (vf_time_t *)((char *)self->map + (size_t)closure);
    pthread_mutex_lock(&self->map->times_lock);
    *field = (vf_time_t){.sec = sec, .nsec = nsec};
    pthread_mutex_unlock(&self->map->times_lock);
    return 0;
}

static PyObject *get_holds(PageMapObject *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLong(atomic_load(&self->map->holds));
}

#define ATOMIC(name, doc) \
    {#name, (getter)get_atomic, (setter)set_atomic, doc, (void *)offsetof(vf_pagemap_t, name)}

static PyGetSetDef pagemap_getset[] = {
    ATOMIC(size, "the file's size in bytes (set it holding the lock)"),
    {"atime_ns", (getter)get_time, (setter)set_time, "last access, ns since the epoch",
     (void *)offsetof(vf_pagemap_t, atime)},
    {"mtime_ns", (getter)get_time, (setter)set_time, "last modification, ns since the epoch",
     (void *)offsetof(vf_pagemap_t, mtime)},
    {"ctime_ns", (getter)get_time, (setter)set_time, "last status change, ns since the epoch",
     (void *)offsetof(vf_pagemap_t, ctime)},
    {"pages", (getter)get_atomic, NULL, "pages held: the sum of the runs' counts",
     (void *)offsetof(vf_pagemap_t, pages)},
    {"holds", (getter)get_holds, NULL, "the hold bits set (see set_hold)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef pagemap_methods[] = {
    {"__enter__", (PyCFunction)pagemap_enter, METH_NOARGS,
     "Lock the map exclusively (again, from the thread holding it): request threads wait "
     "until the matching __exit__."},
    {"__exit__", (PyCFunction)pagemap_exit, METH_VARARGS, "Unlock the map."},
    {"floor", (PyCFunction)pagemap_floor, METH_O,
     "floor(page): the run (page, arena, count) starting at or before page, or None. "
     "O(log n)."},
    {"runs", (PyCFunction)pagemap_runs, METH_VARARGS,
     "runs(first, end, limit=None): the runs overlapping pages [first, end), whole, in "
     "order; the first limit of them. O(log n + k)."},
    {"items", (PyCFunction)pagemap_items, METH_NOARGS, "items(): every run, in order."},
    {"insert", (PyCFunction)pagemap_insert, METH_VARARGS,
     "insert(page, arena, count): add a run over pages that hold none (ValueError "
     "otherwise), merged with the runs it continues. Holding the lock."},
    {"remove", (PyCFunction)pagemap_remove, METH_VARARGS,
     "remove(first, end): take pages [first, end) out, splitting runs at its edges; returns "
     "the (arena page, count) runs they held. Holding the lock."},
    {"set_hold", (PyCFunction)pagemap_set_hold, METH_VARARGS,
     "set_hold(bit, on): set or clear a hold bit; while any is set only Python serves the "
     "file. Takes the lock when the bit changes."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods pagemap_sequence = {.sq_length = (lenfunc)pagemap_length};

static PyTypeObject PageMapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "volfs.core._pagemap.PageMap",
    .tp_basicsize = sizeof(PageMapObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "PageMap(*, atime_ns=0, mtime_ns=0, ctime_ns=0): one regular file's runs of "
              "arena pages, size and timestamps, shared with the bridge's request threads.",
    .tp_new = pagemap_new,
    .tp_dealloc = (destructor)pagemap_dealloc,
    .tp_methods = pagemap_methods,
    .tp_getset = pagemap_getset,
    .tp_as_sequence = &pagemap_sequence,
};

/* -- PageTable ---------------------------------------------------------------------------- */

static PyObject *pagetable_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    if (!PyArg_ParseTuple(args, ":PageTable") || (kwargs != NULL && PyDict_Size(kwargs))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "PageTable() takes no arguments");
        return NULL;
    }
    PageTableObject *self = (PageTableObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    pthread_rwlock_init(&self->table.lock, NULL);
    self->table.nbuckets = 64;
    self->table.buckets = calloc(self->table.nbuckets, sizeof(entry_t *));
    if (self->table.buckets == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void pagetable_dealloc(PageTableObject *self) {
    /* Every map added holds a reference to the table: none is left in it now. */
    free(self->table.buckets);
    pthread_rwlock_destroy(&self->table.lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *pagetable_add(PageTableObject *self, PyObject *args) {
    unsigned long long ino;
    PageMapObject *map;
    if (!PyArg_ParseTuple(args, "KO!", &ino, &PageMapType, &map)) return NULL;
    if (map->table != NULL) {
        PyErr_SetString(PyExc_ValueError, "the page map is in a table already");
        return NULL;
    }
    entry_t *entry = malloc(sizeof *entry);
    if (entry == NULL) return PyErr_NoMemory();
    table_t *table = &self->table;
    atomic_fetch_add(&map->map->refs, 1);
    pthread_rwlock_wrlock(&table->lock);
    entry_t **link = table_slot(table, ino);
    entry_t *replaced = *link;
    if (replaced != NULL) {
        *link = replaced->next;
        table->count--;
    }
    entry->ino = ino;
    entry->map = map->map;
    entry_t **head = &table->buckets[bucket_of(table, ino)];
    entry->next = *head;
    *head = entry;
    table->count++;
    table_grow(table);
    pthread_rwlock_unlock(&table->lock);
    if (replaced != NULL) {
        map_unref(replaced->map);
        free(replaced);
    }
    map->table = Py_NewRef(self);
    map->ino = ino;
    Py_RETURN_NONE;
}

static PyObject *pagetable_discard(PageTableObject *self, PyObject *arg) {
    unsigned long long ino = PyLong_AsUnsignedLongLong(arg);
    if (ino == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    table_remove(&self->table, ino, NULL);
    Py_RETURN_NONE;
}

static PyObject *pagetable_contains_ino(PageTableObject *self, PyObject *arg) {
    unsigned long long ino = PyLong_AsUnsignedLongLong(arg);
    if (ino == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    vf_pagemap_t *map = api_lookup(&self->table, ino);
    if (map != NULL) map_unref(map);
    return PyBool_FromLong(map != NULL);
}

static Py_ssize_t pagetable_length(PageTableObject *self) {
    pthread_rwlock_rdlock(&self->table.lock);
    size_t count = self->table.count;
    pthread_rwlock_unlock(&self->table.lock);
    return (Py_ssize_t)count;
}

static PyMethodDef pagetable_methods[] = {
    {"add", (PyCFunction)pagetable_add, METH_VARARGS,
     "add(ino, map): let the bridge serve ino from map, in place of any map before; map "
     "leaves the table when discarded or freed."},
    {"discard", (PyCFunction)pagetable_discard, METH_O, "discard(ino): forget ino's map."},
    {"serves", (PyCFunction)pagetable_contains_ino, METH_O,
     "serves(ino): True if the table has a map for ino."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods pagetable_sequence = {.sq_length = (lenfunc)pagetable_length};

static PyTypeObject PageTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "volfs.core._pagemap.PageTable",
    .tp_basicsize = sizeof(PageTableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "PageTable(): the page maps of a store by inode number, for the bridge.",
    .tp_new = pagetable_new,
    .tp_dealloc = (destructor)pagetable_dealloc,
    .tp_methods = pagetable_methods,
    .tp_as_sequence = &pagetable_sequence,
};

/* -- the module ----------------------------------------------------------------------------- */

static void *api_table_of(PyObject *object) {
    if (!PyObject_TypeCheck(object, &PageTableType)) {
        PyErr_SetString(PyExc_TypeError, "a PageTable is needed");
        return NULL;
    }
    return &((PageTableObject *)object)->table;
}

static const vf_pagemap_api_t api = {
    .lookup = api_lookup,
    .unref = map_unref,
    .table_of = api_table_of,
};

static struct PyModuleDef pagemap_module = {
    PyModuleDef_HEAD_INIT, "volfs.core._pagemap",
    "Page maps of regular files, shared with the bridge's request threads.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pagemap(void) {
    if (PyType_Ready(&PageMapType) < 0 || PyType_Ready(&PageTableType) < 0) return NULL;
    PyObject *module = PyModule_Create(&pagemap_module);
    if (module == NULL) return NULL;
    PyObject *capsule = PyCapsule_New((void *)&api, VOLFS_PAGEMAP_CAPSULE, NULL);
    if (PyModule_AddObjectRef(module, "PageMap", (PyObject *)&PageMapType) < 0 ||
        PyModule_AddObjectRef(module, "PageTable", (PyObject *)&PageTableType) < 0 ||
        capsule == NULL || PyModule_AddObject(module, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

/*
 * volfs._segments - the atomic operations on a segment table, for Python.
 *
 * A table is any buffer laid out as volfs.h describes (a 64-byte header, then 32-byte slots):
 * a client's mapping of the table, or the daemon's own. Every index is checked against the
 * buffer's length, so a corrupt table can never make this code read or write outside it.
 *
 * Clients pin and unpin through volfs.h's own functions, so C and Python programs follow one
 * protocol. The daemon claims (UNPINNED or PURGED -> PURGING), publishes (PURGING -> PURGED
 * and wakes waiting pins), ends a table (every word -> STALE) and scans it for the oldest
 * unpinned segments and the volatile pages of a span; the daemon trusts none of the words it
 * reads: its own record says where each segment is.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "volfs.h"

#define HEADER_BYTES ((Py_ssize_t)sizeof(struct volfs_segment_table_header))
#define SLOT_BYTES ((Py_ssize_t)sizeof(struct volfs_segment_slot))
/* claim()'s stamp that matches any. */
#define ANY_STAMP 0xffffffffffffffffULL

/* The slots a buffer holds. */
static Py_ssize_t capacity_of(const Py_buffer *view) {
    return view->len < HEADER_BYTES ? 0 : (view->len - HEADER_BYTES) / SLOT_BYTES;
}

static struct volfs_segment_slot *slot_at(const Py_buffer *view, Py_ssize_t index) {
    return (struct volfs_segment_slot *)((char *)view->buf + HEADER_BYTES + index * SLOT_BYTES);
}

/* A table over a buffer, as volfs.h's functions take it; -1 with OSError EINVAL for an index
 * past it (what volfs.h's functions answer). */
static int table_of(const Py_buffer *view, Py_ssize_t index, int writable, long daemon,
                    struct volfs_segment_table *table) {
    Py_ssize_t capacity = capacity_of(view);
    if (index < 0 || index >= capacity) {
        errno = EINVAL;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    table->base = view->buf;
    table->size = (size_t)view->len;
    table->capacity = (__u32)(capacity > UINT32_MAX ? UINT32_MAX : capacity);
    table->writable = writable;
    table->daemon = (pid_t)daemon;
    return 0;
}

static PyObject *segments_pin(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t index;
    long daemon;
    struct volfs_segment_table table;
    int purged = 0, rc, state;
    (void)module;
    if (!PyArg_ParseTuple(args, "w*nl", &view, &index, &daemon))
        return NULL;
    if (table_of(&view, index, 1, daemon, &table) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    state = volfs_segment_state(&table, (__u32)index);
    if (state == VOLFS_SEGMENT_PURGING) {
        /* A purge is under way: the pin waits for it, other threads run meanwhile. */
        Py_BEGIN_ALLOW_THREADS
        rc = volfs_segment_pin(&table, (__u32)index, &purged);
        Py_END_ALLOW_THREADS
    } else {
        rc = volfs_segment_pin(&table, (__u32)index, &purged);
    }
    PyBuffer_Release(&view);
    if (rc < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(purged);
}

static PyObject *segments_unpin(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t index;
    struct volfs_segment_table table;
    int rc;
    (void)module;
    if (!PyArg_ParseTuple(args, "w*n", &view, &index))
        return NULL;
    if (table_of(&view, index, 1, 0, &table) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    rc = volfs_segment_unpin(&table, (__u32)index);
    PyBuffer_Release(&view);
    if (rc < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *segments_state(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t index;
    struct volfs_segment_table table;
    int state;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*n", &view, &index))
        return NULL;
    if (table_of(&view, index, 0, 0, &table) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    state = volfs_segment_state(&table, (__u32)index);
    PyBuffer_Release(&view);
    return PyLong_FromLong(state);
}

static PyObject *segments_stamp(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t index;
    struct volfs_segment_table table;
    unsigned long long stamp;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*n", &view, &index))
        return NULL;
    if (table_of(&view, index, 0, 0, &table) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    stamp = __atomic_load_n(&slot_at(&view, index)->stamp, __ATOMIC_RELAXED);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(stamp);
}

static PyObject *segments_set(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t index;
    unsigned int state;
    struct volfs_segment_table table;
    __u32 *word;
    (void)module;
    if (!PyArg_ParseTuple(args, "w*nI", &view, &index, &state))
        return NULL;
    if (table_of(&view, index, 1, 0, &table) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    word = &slot_at(&view, index)->state;
    __atomic_store_n(word, (__u32)state, __ATOMIC_RELEASE);
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *segments_claim(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t index;
    unsigned int expected;
    unsigned long long stamp;
    struct volfs_segment_table table;
    struct volfs_segment_slot *slot;
    __u32 state;
    int won = 0;
    (void)module;
    if (!PyArg_ParseTuple(args, "w*nIK", &view, &index, &expected, &stamp))
        return NULL;
    if (table_of(&view, index, 1, 0, &table) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    slot = slot_at(&view, index);
    state = expected;
    /* Acquire: the stamp read is the one the unpin published with the state. */
    if (__atomic_load_n(&slot->state, __ATOMIC_ACQUIRE) == expected
            && (stamp == ANY_STAMP || __atomic_load_n(&slot->stamp, __ATOMIC_RELAXED) == stamp))
        won = __atomic_compare_exchange_n(&slot->state, &state, VOLFS_SEGMENT_PURGING, 0,
                                          __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    PyBuffer_Release(&view);
    return PyBool_FromLong(won);
}

static PyObject *segments_end(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t capacity, index;
    PyObject *before;
    char *states;
    (void)module;
    if (!PyArg_ParseTuple(args, "w*", &view))
        return NULL;
    capacity = capacity_of(&view);
    before = PyBytes_FromStringAndSize(NULL, capacity);
    if (before == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    states = PyBytes_AS_STRING(before);
    for (index = 0; index < capacity; index++) {
        __u32 *word = &slot_at(&view, index)->state;
        __u32 old = __atomic_exchange_n(word, VOLFS_SEGMENT_STALE, __ATOMIC_ACQ_REL);
        states[index] = (char)(old > 255 ? 255 : old);
        if (old == VOLFS_SEGMENT_PURGING)
            syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    }
    PyBuffer_Release(&view);
    return before;
}

/* A max-heap of candidates by stamp: the `limit` oldest seen so far. */
struct candidate {
    unsigned long long stamp;  /* as ordered: never past `now`  */
    unsigned long long seen;   /* as read, for claim() to match */
    Py_ssize_t position;       /* of the table in scan()'s sequence */
    Py_ssize_t index;
};

/* A scan offers at most this many: far more than the daemon asks for. */
#define SCAN_LIMIT_MAX 65536

static void sift_down(struct candidate *heap, Py_ssize_t size, Py_ssize_t at) {
    for (;;) {
        Py_ssize_t largest = at, left = 2 * at + 1, right = left + 1;
        struct candidate swap;
        if (left < size && heap[left].stamp > heap[largest].stamp)
            largest = left;
        if (right < size && heap[right].stamp > heap[largest].stamp)
            largest = right;
        if (largest == at)
            return;
        swap = heap[at];
        heap[at] = heap[largest];
        heap[largest] = swap;
        at = largest;
    }
}

static void sift_up(struct candidate *heap, Py_ssize_t at) {
    while (at > 0) {
        Py_ssize_t parent = (at - 1) / 2;
        struct candidate swap;
        if (heap[parent].stamp >= heap[at].stamp)
            return;
        swap = heap[at];
        heap[at] = heap[parent];
        heap[parent] = swap;
        at = parent;
    }
}

static int by_stamp(const void *one, const void *other) {
    const struct candidate *a = one, *b = other;
    if (a->stamp != b->stamp)
        return a->stamp < b->stamp ? -1 : 1;
    if (a->position != b->position)
        return a->position < b->position ? -1 : 1;
    return (a->index > b->index) - (a->index < b->index);
}

/* Offer the unpinned slots of one table whose byte in `scannable` is set to the heap. */
static void scan_table(struct candidate *heap, Py_ssize_t *size, Py_ssize_t limit,
                       const Py_buffer *view, const Py_buffer *scannable, Py_ssize_t position,
                       unsigned long long now) {
    Py_ssize_t capacity = capacity_of(view), index;
    const unsigned char *offered = scannable->buf;
    if (scannable->len < capacity)
        capacity = scannable->len;
    for (index = 0; index < capacity; index++) {
        const struct volfs_segment_slot *slot = slot_at(view, index);
        unsigned long long stamp, seen;
        if (!offered[index] ||
                __atomic_load_n(&slot->state, __ATOMIC_ACQUIRE) != VOLFS_SEGMENT_UNPINNED)
            continue;
        seen = __atomic_load_n(&slot->stamp, __ATOMIC_RELAXED);
        /* Stamps come from clients: one from the future sorts as now, never last. */
        stamp = seen > now ? now : seen;
        if (*size < limit) {
            heap[*size] = (struct candidate){stamp, seen, position, index};
            sift_up(heap, (*size)++);
        } else if (stamp < heap[0].stamp) {
            heap[0] = (struct candidate){stamp, seen, position, index};
            sift_down(heap, *size, 0);
        }
    }
}

static PyObject *segments_scan(PyObject *module, PyObject *args) {
    PyObject *tables, *sequence, *found = NULL;
    Py_ssize_t limit, count, acquired = 0, size = 0, i;
    unsigned long long now;
    struct candidate *heap = NULL;
    Py_buffer *buffers = NULL;
    (void)module;
    if (!PyArg_ParseTuple(args, "OnK", &tables, &limit, &now))
        return NULL;
    sequence = PySequence_Fast(tables, "scan() takes a sequence of (table, scannable) pairs");
    if (sequence == NULL)
        return NULL;
    count = PySequence_Fast_GET_SIZE(sequence);
    if (limit > SCAN_LIMIT_MAX)
        limit = SCAN_LIMIT_MAX;
    if (limit <= 0 || count == 0) {
        Py_DECREF(sequence);
        return PyList_New(0);
    }
    heap = PyMem_Malloc((size_t)limit * sizeof(*heap));
    buffers = PyMem_Calloc((size_t)count * 2, sizeof(*buffers));
    if (heap == NULL || buffers == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Every buffer first: the GIL is let go once for the whole scan, not once a table. */
    for (; acquired < count; acquired++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(sequence, acquired);
        if (!PyArg_ParseTuple(pair, "y*y*", &buffers[2 * acquired], &buffers[2 * acquired + 1]))
            goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < count; i++)
        scan_table(heap, &size, limit, &buffers[2 * i], &buffers[2 * i + 1], i, now);
    qsort(heap, (size_t)size, sizeof(*heap), by_stamp);
    Py_END_ALLOW_THREADS
    found = PyList_New(size);
    for (i = 0; found != NULL && i < size; i++) {
        PyObject *item = Py_BuildValue("(KnnK)", heap[i].stamp, heap[i].position, heap[i].index,
                                       heap[i].seen);
        if (item == NULL) {
            Py_CLEAR(found);
            break;
        }
        PyList_SET_ITEM(found, i, item);
    }
done:
    for (i = 0; i < acquired; i++) {
        PyBuffer_Release(&buffers[2 * i]);
        PyBuffer_Release(&buffers[2 * i + 1]);
    }
    PyMem_Free(buffers);
    PyMem_Free(heap);
    Py_DECREF(sequence);
    return found;
}

static PyObject *segments_volatile_pages(PyObject *module, PyObject *args) {
    Py_buffer view, firsts, ends;
    unsigned long long low, high, pages = 0, count = 0;
    Py_ssize_t capacity, index;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*y*y*KK", &view, &firsts, &ends, &low, &high))
        return NULL;
    capacity = capacity_of(&view);
    if (firsts.len / 8 < capacity)
        capacity = firsts.len / 8;
    if (ends.len / 8 < capacity)
        capacity = ends.len / 8;
    for (index = 0; index < capacity; index++) {
        __u32 state = __atomic_load_n(&slot_at(&view, index)->state, __ATOMIC_ACQUIRE);
        unsigned long long first, end;
        if (state != VOLFS_SEGMENT_UNPINNED && state != VOLFS_SEGMENT_PURGING
                && state != VOLFS_SEGMENT_PURGED)
            continue;
        memcpy(&first, (char *)firsts.buf + index * 8, 8);
        memcpy(&end, (char *)ends.buf + index * 8, 8);
        if (first < low)
            first = low;
        if (end > high)
            end = high;
        if (first < end) {
            pages += end - first;
            count++;
        }
    }
    PyBuffer_Release(&view);
    PyBuffer_Release(&firsts);
    PyBuffer_Release(&ends);
    return Py_BuildValue("(KK)", pages, count);
}

static PyMethodDef segments_methods[] = {
    {"pin", segments_pin, METH_VARARGS,
     "pin(table, index, daemon_pid) -> purged: make a segment non-volatile (volfs.h's "
     "volfs_segment_pin); waits, without the GIL, while it is being purged."},
    {"unpin", segments_unpin, METH_VARARGS,
     "unpin(table, index): make a segment volatile (volfs.h's volfs_segment_unpin)."},
    {"state", segments_state, METH_VARARGS, "state(table, index) -> the segment's state word."},
    {"stamp", segments_stamp, METH_VARARGS, "stamp(table, index) -> the segment's last unpin."},
    {"set", segments_set, METH_VARARGS,
     "set(table, index, state): store a state word and wake the pins waiting on it."},
    {"claim", segments_claim, METH_VARARGS,
     "claim(table, index, expected, stamp) -> won: compare-and-swap expected -> PURGING, "
     "only if the segment still carries that stamp (2**64 - 1: any)."},
    {"end", segments_end, METH_VARARGS,
     "end(table) -> bytes: turn every state word STALE; the states before, one byte each."},
    {"scan", segments_scan, METH_VARARGS,
     "scan(tables, limit, now) -> [(stamp, position, index, seen)]: the `limit` (at most "
     "65536) least recently unpinned segments of a sequence of (table, scannable) pairs, "
     "oldest first, counting only the slots whose byte in `scannable` is set; `position` is "
     "the pair's in the sequence, stamps past `now` count as `now`, `seen` is the stamp as "
     "read, for claim. O(n log limit) for n slots, one release of the GIL."},
    {"volatile_pages", segments_volatile_pages, METH_VARARGS,
     "volatile_pages(table, firsts, ends, low, high) -> (pages, segments): the pages in "
     "[low, high) of the unpinned segments, whose pages [firsts[i], ends[i]) (native "
     "64-bit arrays, the daemon's own record) are taken over the table's claims."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef segments_module = {
    PyModuleDef_HEAD_INIT, "volfs._segments",
    "Atomic operations on volfs segment tables (see volfs/include/volfs.h).", -1,
    segments_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__segments(void) {
    return PyModule_Create(&segments_module);
}

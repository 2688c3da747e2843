/*
 * volfs.daemon._bridge: the FUSE operations pyfuse3 does not expose.
 *
 * pyfuse3 builds its struct fuse_lowlevel_ops and passes it to libfuse's fuse_session_new().
 * This module, loaded with RTLD_GLOBAL before pyfuse3, defines that function itself: it copies
 * pyfuse3's operations, adds the handlers pyfuse3 lacks, and calls the real function, found
 * with dlvsym() in the libfuse already loaded (RTLD_NEXT does not reach past a dlopen'ed
 * library). libfuse 3.17 (libfuse3.so.4) adds fuse_session_new_versioned, which programs
 * built against its headers call instead: both are defined here.
 *
 * The session's end is interposed the same way (fuse_session_unmount, fuse_session_destroy,
 * which pyfuse3.close() calls in that order), and close() ends it first when the daemon
 * leaves: from then on, nothing here touches the session. Each session has a generation, and each Request remembers the one it came from,
 * so a reply that arrives after its session ended fails with ENOTCONN instead of using freed
 * memory. Calls that use the session (replies, notifications, possibly from worker threads)
 * are counted, and the session ends only once none is in progress.
 *
 * Requests handled here (ioctl, fallocate, lseek) are passed to a Python callable with a
 * Request object, which replies exactly once: from the handler itself, later from a trio
 * task, or from a worker thread. A Request dropped without a reply answers EIO, so a bug can
 * never leave a caller hanging.
 *
 * pyfuse3's own operations are wrapped too (see "contained operations" below), so that a
 * request whose arguments pyfuse3 cannot turn into Python objects (a write's data when the
 * daemon is out of memory) fails alone instead of ending the session. Its writes pass one
 * more check first: the kernel's write-back into purged ranges being dropped from its cache
 * is answered here and discarded (see "write-back into purged ranges").
 */
#define PY_SSIZE_T_CLEAN
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE

#include <Python.h>
#include <structmember.h>
#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "pagemap.h"

/* logging.WARNING, for bridge_log. */
#define LOG_LEVEL_WARNING 30

static struct fuse_lowlevel_ops bridge_ops;
static void (*pyfuse3_init)(void *, struct fuse_conn_info *);
static PyObject *ioctl_handler;
static PyObject *fallocate_handler;
static PyObject *lseek_handler;
static PyObject *kill_privileges_handler;
static PyObject *at_once_handler;

/*
 * Log a message on the "volfs.daemon.bridge" logger, from any thread, keeping any exception
 * being raised. Used where nothing can be raised: a reply that failed inside libfuse's
 * callbacks or in a destructor. Supports the formats common to printf and
 * PyUnicode_FromFormat (%s, %d); falls back to stderr when logging itself fails.
 */
static void bridge_log(int level, const char *format, ...) {
    va_list arguments, fallback;
    va_start(arguments, format);
    va_copy(fallback, arguments);
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *result = NULL;
    PyObject *message = PyUnicode_FromFormatV(format, arguments);
    if (message != NULL) {
        PyObject *logging = PyImport_ImportModule("logging");
        PyObject *logger =
            logging ? PyObject_CallMethod(logging, "getLogger", "s", "volfs.daemon.bridge")
                    : NULL;
        /* The message is passed as an argument: a '%' in it is not a format. */
        result = logger ? PyObject_CallMethod(logger, "log", "isO", level, "%s", message) : NULL;
        Py_XDECREF(logger);
        Py_XDECREF(logging);
        Py_DECREF(message);
    }
    if (result == NULL) {
        PyErr_Clear();
        fputs("volfs.daemon.bridge: ", stderr);
        vfprintf(stderr, format, fallback);
        fputc('\n', stderr);
    }
    Py_XDECREF(result);
    PyErr_Restore(type, value, traceback);
    PyGILState_Release(gil);
    va_end(fallback);
    va_end(arguments);
}

/* -- the session's lifetime ---------------------------------------------------------------- */

static pthread_mutex_t session_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t session_idle = PTHREAD_COND_INITIALIZER;
/* The session created through the bridge, NULL once it is being unmounted or destroyed. */
static struct fuse_session *bridge_session;
/* Bumped for each new session: a Request belongs to the generation it was created in. */
static unsigned long session_generation;
/* Calls using bridge_session right now; its end waits for them. */
static unsigned int session_users;

/* Accept generation in place of a Request's: any live session will do. */
#define ANY_GENERATION 0UL

/*
 * The live session of generation (or any, ANY_GENERATION), counted as in use until
 * release_session(); NULL if it has ended. Never blocks for long: the lock is only held to
 * read and count. Called without the GIL.
 */
static struct fuse_session *use_session(unsigned long generation) {
    pthread_mutex_lock(&session_lock);
    struct fuse_session *se = bridge_session;
    if (se != NULL && generation != ANY_GENERATION && generation != session_generation)
        se = NULL;
    if (se != NULL) session_users++;
    pthread_mutex_unlock(&session_lock);
    return se;
}

static void release_session(void) {
    pthread_mutex_lock(&session_lock);
    if (--session_users == 0) pthread_cond_broadcast(&session_idle);
    pthread_mutex_unlock(&session_lock);
}

static unsigned long current_generation(void) {
    pthread_mutex_lock(&session_lock);
    unsigned long generation = session_generation;
    pthread_mutex_unlock(&session_lock);
    return generation;
}

static struct fuse_session *begin_session(struct fuse_session *se) {
    if (se != NULL) {
        pthread_mutex_lock(&session_lock);
        bridge_session = se;
        /* Never ANY_GENERATION, even after wrapping around. */
        if (++session_generation == ANY_GENERATION) session_generation++;
        pthread_mutex_unlock(&session_lock);
    }
    return se;
}

/*
 * From now on se (if it is the bridge's) is refused to new users; returns once the calls
 * using it have finished, so libfuse may then close its descriptor and free it.
 *
 * Waiting here cannot add a deadlock: a counted call needs neither the GIL (released while
 * waiting) nor the thread calling this. A notification the kernel holds up while it writes
 * dirty pages back through this daemon, whose loop has stopped, could not finish anyway:
 * it keeps the device file open, so neither closing it nor unmounting aborts the connection.
 */
static void end_session(struct fuse_session *se) {
    pthread_mutex_lock(&session_lock);
    int ours = se != NULL && se == bridge_session;
    if (ours) bridge_session = NULL;
    int busy = ours && session_users > 0;
    pthread_mutex_unlock(&session_lock);
    if (!busy) return;
    PyThreadState *saved = PyGILState_Check() ? PyEval_SaveThread() : NULL;
    pthread_mutex_lock(&session_lock);
    while (session_users > 0) pthread_cond_wait(&session_idle, &session_lock);
    pthread_mutex_unlock(&session_lock);
    if (saved != NULL) PyEval_RestoreThread(saved);
}

/* -- Request ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    fuse_req_t req;   /* NULL once a reply was attempted */
    unsigned long generation; /* of the session the request came from */
    unsigned int uid; /* of the calling process */
    unsigned int gid;
    int pid;
} RequestObject;

static PyTypeObject RequestType;

typedef enum { REPLY_ERROR, REPLY_IOCTL, REPLY_LSEEK } reply_kind;

typedef struct {
    reply_kind kind;
    int value; /* errno (0: success) or the ioctl's result */
    const void *data;
    size_t size;
    off_t offset;
} reply_t;

/*
 * Send reply to req if its session (of generation) still lives: libfuse's result, 0 or
 * -errno; -ENOTCONN with *ended set if the session has ended. Either way libfuse no longer
 * knows req. Called without the GIL.
 */
static int send_reply(fuse_req_t req, unsigned long generation, const reply_t *reply,
                      int *ended) {
    *ended = use_session(generation) == NULL;
    if (*ended) return -ENOTCONN;
    int rc;
    switch (reply->kind) {
    case REPLY_IOCTL:
        rc = fuse_reply_ioctl(req, reply->value, reply->size ? reply->data : NULL, reply->size);
        break;
    case REPLY_LSEEK:
        rc = fuse_reply_lseek(req, reply->offset);
        break;
    default:
        rc = fuse_reply_err(req, reply->value);
        break;
    }
    release_session();
    return rc;
}

/* Reply once for self: None, or NULL with OSError(errno) if the reply failed. */
static PyObject *answer(RequestObject *self, const reply_t *reply) {
    fuse_req_t req = self->req;
    if (req == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "request already answered");
        return NULL;
    }
    self->req = NULL;
    int rc, ended;
    Py_BEGIN_ALLOW_THREADS
    rc = send_reply(req, self->generation, reply, &ended);
    Py_END_ALLOW_THREADS
    if (rc == 0) Py_RETURN_NONE;
    PyObject *error = PyObject_CallFunction(
        PyExc_OSError, "is", -rc,
        ended ? "the request's FUSE session has ended" : strerror(-rc));
    if (error != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(error), error);
        Py_DECREF(error);
    }
    return NULL;
}

static PyObject *request_reply_ioctl(RequestObject *self, PyObject *args) {
    int result;
    Py_buffer data = {0};
    if (!PyArg_ParseTuple(args, "iy*", &result, &data)) return NULL;
    reply_t reply = {.kind = REPLY_IOCTL, .value = result, .data = data.buf,
                     .size = (size_t)data.len};
    PyObject *answered = answer(self, &reply);
    PyBuffer_Release(&data);
    return answered;
}

static PyObject *request_reply_error(RequestObject *self, PyObject *args) {
    int code;
    if (!PyArg_ParseTuple(args, "i", &code)) return NULL;
    /* The kernel refuses other values without ending the request: its caller would hang. */
    if (code <= 0 || code >= 512) {
        PyErr_SetString(PyExc_ValueError, "errno must be between 1 and 511");
        return NULL;
    }
    reply_t reply = {.kind = REPLY_ERROR, .value = code};
    return answer(self, &reply);
}

static PyObject *request_reply_ok(RequestObject *self, PyObject *unused) {
    (void)unused;
    reply_t reply = {.kind = REPLY_ERROR, .value = 0};
    return answer(self, &reply);
}

static PyObject *request_reply_lseek(RequestObject *self, PyObject *args) {
    long long offset;
    if (!PyArg_ParseTuple(args, "L", &offset)) return NULL;
    reply_t reply = {.kind = REPLY_LSEEK, .offset = (off_t)offset};
    return answer(self, &reply);
}

static PyObject *request_get_answered(RequestObject *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->req == NULL);
}

static void request_dealloc(RequestObject *self) {
    fuse_req_t req = self->req;
    if (req != NULL) {
        self->req = NULL;
        reply_t reply = {.kind = REPLY_ERROR, .value = EIO};
        int ended;
        int rc = send_reply(req, self->generation, &reply, &ended);
        /* A request of an ended session has nobody left to answer. */
        if (rc != 0 && !ended)
            bridge_log(LOG_LEVEL_WARNING, "cannot answer EIO to a request dropped unanswered: %s",
                       strerror(-rc));
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef request_methods[] = {
    {"reply_ioctl", (PyCFunction)request_reply_ioctl, METH_VARARGS,
     "reply_ioctl(result, data): answer an ioctl with its return value and output bytes."},
    {"reply_error", (PyCFunction)request_reply_error, METH_VARARGS,
     "reply_error(errno): answer with an error (1 to 511)."},
    {"reply_ok", (PyCFunction)request_reply_ok, METH_NOARGS,
     "reply_ok(): answer success without data (fallocate)."},
    {"reply_lseek", (PyCFunction)request_reply_lseek, METH_VARARGS,
     "reply_lseek(offset): answer an lseek with the resulting offset."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef request_members[] = {
    {"uid", T_UINT, offsetof(RequestObject, uid), READONLY, "uid of the caller"},
    {"gid", T_UINT, offsetof(RequestObject, gid), READONLY, "gid of the caller"},
    {"pid", T_INT, offsetof(RequestObject, pid), READONLY, "pid of the caller"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef request_getset[] = {
    {"answered", (getter)request_get_answered, NULL,
     "True once a reply was attempted, whether or not it reached the kernel", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "volfs.daemon._bridge.Request",
    .tp_basicsize = sizeof(RequestObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A FUSE request awaiting exactly one reply.\n\n"
              "Each reply_* method answers it: a second call raises RuntimeError. A reply "
              "that fails raises OSError with libfuse's errno (ENOTCONN once the request's "
              "session has ended) and still counts as the answer.",
    .tp_dealloc = (destructor)request_dealloc,
    .tp_methods = request_methods,
    .tp_members = request_members,
    .tp_getset = request_getset,
};

/* -- handlers added to pyfuse3's operations ---------------------------------------------- */

/*
 * Answer req with an error from within libfuse's callback for it, where its session is
 * necessarily alive. Nothing can be raised here: a failure is logged.
 */
static void reply_internal(fuse_req_t req, int code, const char *operation) {
    int rc = fuse_reply_err(req, code);
    if (rc != 0)
        bridge_log(LOG_LEVEL_WARNING, "cannot answer a %s request with %s: %s", operation,
                   strerror(code), strerror(-rc));
}

static void bridge_init(void *userdata, struct fuse_conn_info *conn) {
    /*
     * An exception pyfuse3's init raises is left set for pyfuse3: it declares
     * fuse_session_process_buf() "except *" (since 3.3, see the version check in
     * volfs.daemon.bridge), so the exception ends its main loop as soon as INIT has been
     * processed, before any other request, and the daemon unmounts. Serving after a failed init is not wanted.
     */
    if (pyfuse3_init != NULL) pyfuse3_init(userdata, conn);
    /* VOLFS_IOC_PURGE works on directories too. */
    if (conn->capable & FUSE_CAP_IOCTL_DIR) conn->want |= FUSE_CAP_IOCTL_DIR;
    /* Requests read by splicing would bypass killpriv_read; replies spliced would bypass the
     * bridge's writev, and its descriptor (the session's, an epoll set while the request
     * threads run) is not /dev/fuse. */
    conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
    /* The kernel's cached pages change only through the kernel, or by purges, which drop
     * them explicitly: an mtime change seen in an attribute reply need not drop them all. */
    if (conn->capable & FUSE_CAP_EXPLICIT_INVAL_DATA) {
        conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
        conn->want |= FUSE_CAP_EXPLICIT_INVAL_DATA;
    }
}

/* A Request for req with the caller's credentials, or NULL (req answered ENOMEM). */
static RequestObject *new_request(fuse_req_t req, const char *operation) {
    RequestObject *request = PyObject_New(RequestObject, &RequestType);
    if (request == NULL) {
        PyErr_Clear();
        reply_internal(req, ENOMEM, operation);
        return NULL;
    }
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    request->req = req;
    request->generation = current_generation();
    request->uid = ctx->uid;
    request->gid = ctx->gid;
    request->pid = ctx->pid;
    return request;
}

/* Call handler(request, *args) and drop our reference: an unanswered request answers EIO. */
static void dispatch(PyObject *handler, RequestObject *request, PyObject *args) {
    if (args != NULL) {
        PyObject *full = PyTuple_New(PyTuple_GET_SIZE(args) + 1);
        if (full != NULL) {
            PyTuple_SET_ITEM(full, 0, Py_NewRef((PyObject *)request));
            for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args); i++)
                PyTuple_SET_ITEM(full, i + 1, Py_NewRef(PyTuple_GET_ITEM(args, i)));
            PyObject *result = PyObject_Call(handler, full, NULL);
            if (result == NULL) PyErr_WriteUnraisable(handler);
            Py_XDECREF(result);
            Py_DECREF(full);
        }
        Py_DECREF(args);
    }
    if (PyErr_Occurred()) PyErr_WriteUnraisable(handler);
    Py_DECREF(request);
}

static void bridge_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg,
                         struct fuse_file_info *fi, unsigned flags, const void *in_buf,
                         size_t in_bufsz, size_t out_bufsz) {
    (void)arg;
    (void)out_bufsz; /* every command's reply has the size its number encodes */
    PyGILState_STATE gil = PyGILState_Ensure();
    if (flags & FUSE_IOCTL_UNRESTRICTED || ioctl_handler == NULL) {
        reply_internal(req, ENOTTY, "ioctl");
    } else {
        RequestObject *request = new_request(req, "ioctl");
        if (request != NULL)
            dispatch(ioctl_handler, request,
                     Py_BuildValue("KIKOy#", (unsigned long long)ino, cmd,
                                   (unsigned long long)(fi ? fi->fh : 0),
                                   (flags & FUSE_IOCTL_DIR) ? Py_True : Py_False,
                                   in_buf ? (const char *)in_buf : "",
                                   (Py_ssize_t)(in_buf ? in_bufsz : 0)));
    }
    PyGILState_Release(gil);
}

static void bridge_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                             off_t length, struct fuse_file_info *fi) {
    PyGILState_STATE gil = PyGILState_Ensure();
    if (fallocate_handler == NULL) {
        reply_internal(req, EOPNOTSUPP, "fallocate");
    } else {
        RequestObject *request = new_request(req, "fallocate");
        if (request != NULL)
            dispatch(fallocate_handler, request,
                     Py_BuildValue("KKiLL", (unsigned long long)ino,
                                   (unsigned long long)(fi ? fi->fh : 0), mode,
                                   (long long)offset, (long long)length));
    }
    PyGILState_Release(gil);
}

static void bridge_lseek(fuse_req_t req, fuse_ino_t ino, off_t offset, int whence,
                         struct fuse_file_info *fi) {
    PyGILState_STATE gil = PyGILState_Ensure();
    if (lseek_handler == NULL) {
        reply_internal(req, ENOSYS, "lseek");
    } else {
        RequestObject *request = new_request(req, "lseek");
        if (request != NULL)
            dispatch(lseek_handler, request,
                     Py_BuildValue("KKLi", (unsigned long long)ino,
                                   (unsigned long long)(fi ? fi->fh : 0), (long long)offset,
                                   whence));
    }
    PyGILState_Release(gil);
}

/* -- contained operations ---------------------------------------------------------------- */

/*
 * pyfuse3 converts a request's arguments (names, a write's data, an xattr's value) into Python
 * objects before starting its handler. When that raises, MemoryError above all, pyfuse3 leaves
 * the request unanswered and the exception ends its main loop: one request would take down
 * the mount. Every operation pyfuse3 registers runs through a wrapper here that, if pyfuse3
 * returns with an exception set (so no handler took the request), answers the request itself:
 * ENOMEM for MemoryError, EIO otherwise, after telling the failure handler for the log.
 * Once a handler has started, the exception never surfaces here: the handler answers.
 */
static PyObject *failure_handler;

static int report_failure(const char *operation) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    int code = PyErr_GivenExceptionMatches(type, PyExc_MemoryError) ? ENOMEM : EIO;
    if (failure_handler != NULL) {
        PyErr_NormalizeException(&type, &value, &traceback);
        PyObject *result = PyObject_CallFunction(failure_handler, "sOi", operation,
                                                 value != NULL ? value : Py_None, code);
        Py_XDECREF(result);
        /* Logging may itself fail for want of memory: the request is answered regardless. */
        PyErr_Clear();
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return code;
}

static void answer_failure(fuse_req_t req, const char *operation) {
    reply_internal(req, report_failure(operation), operation);
}

/* forget expects no answer, only the request's release. */
static void release_failure(fuse_req_t req, const char *operation) {
    report_failure(operation);
    fuse_reply_none(req);
}

#define CONTAINED(op, on_failure, params, args)                                             \
    static __typeof__(((struct fuse_lowlevel_ops *)0)->op) pyfuse3_##op;                  \
    static void contained_##op params {                                                     \
        pyfuse3_##op args;                                                                  \
        if (PyErr_Occurred()) on_failure(req, #op);                                         \
    }

typedef struct fuse_file_info file_info;

CONTAINED(lookup, answer_failure, (fuse_req_t req, fuse_ino_t p, const char *n), (req, p, n))
CONTAINED(forget, release_failure, (fuse_req_t req, fuse_ino_t i, uint64_t n), (req, i, n))
CONTAINED(forget_multi, release_failure,
          (fuse_req_t req, size_t c, struct fuse_forget_data *f), (req, c, f))
CONTAINED(getattr, answer_failure, (fuse_req_t req, fuse_ino_t i, file_info *fi), (req, i, fi))
CONTAINED(setattr, answer_failure,
          (fuse_req_t req, fuse_ino_t i, struct stat *a, int s, file_info *fi),
          (req, i, a, s, fi))
CONTAINED(readlink, answer_failure, (fuse_req_t req, fuse_ino_t i), (req, i))
CONTAINED(mknod, answer_failure,
          (fuse_req_t req, fuse_ino_t p, const char *n, mode_t m, dev_t d), (req, p, n, m, d))
CONTAINED(mkdir, answer_failure, (fuse_req_t req, fuse_ino_t p, const char *n, mode_t m),
          (req, p, n, m))
CONTAINED(unlink, answer_failure, (fuse_req_t req, fuse_ino_t p, const char *n), (req, p, n))
CONTAINED(rmdir, answer_failure, (fuse_req_t req, fuse_ino_t p, const char *n), (req, p, n))
CONTAINED(symlink, answer_failure, (fuse_req_t req, const char *l, fuse_ino_t p, const char *n),
          (req, l, p, n))
CONTAINED(rename, answer_failure,
          (fuse_req_t req, fuse_ino_t p, const char *n, fuse_ino_t np, const char *nn,
           unsigned int f),
          (req, p, n, np, nn, f))
CONTAINED(link, answer_failure, (fuse_req_t req, fuse_ino_t i, fuse_ino_t np, const char *nn),
          (req, i, np, nn))
CONTAINED(open, answer_failure, (fuse_req_t req, fuse_ino_t i, file_info *fi), (req, i, fi))
CONTAINED(read, answer_failure,
          (fuse_req_t req, fuse_ino_t i, size_t s, off_t o, file_info *fi), (req, i, s, o, fi))
CONTAINED(write, answer_failure,
          (fuse_req_t req, fuse_ino_t i, const char *b, size_t s, off_t o, file_info *fi),
          (req, i, b, s, o, fi))
CONTAINED(write_buf, answer_failure,
          (fuse_req_t req, fuse_ino_t i, struct fuse_bufvec *b, off_t o, file_info *fi),
          (req, i, b, o, fi))
CONTAINED(flush, answer_failure, (fuse_req_t req, fuse_ino_t i, file_info *fi), (req, i, fi))
CONTAINED(release, answer_failure, (fuse_req_t req, fuse_ino_t i, file_info *fi), (req, i, fi))
CONTAINED(fsync, answer_failure, (fuse_req_t req, fuse_ino_t i, int d, file_info *fi),
          (req, i, d, fi))
CONTAINED(opendir, answer_failure, (fuse_req_t req, fuse_ino_t i, file_info *fi), (req, i, fi))
CONTAINED(readdir, answer_failure,
          (fuse_req_t req, fuse_ino_t i, size_t s, off_t o, file_info *fi), (req, i, s, o, fi))
CONTAINED(readdirplus, answer_failure,
          (fuse_req_t req, fuse_ino_t i, size_t s, off_t o, file_info *fi), (req, i, s, o, fi))
CONTAINED(releasedir, answer_failure, (fuse_req_t req, fuse_ino_t i, file_info *fi),
          (req, i, fi))
CONTAINED(fsyncdir, answer_failure, (fuse_req_t req, fuse_ino_t i, int d, file_info *fi),
          (req, i, d, fi))
CONTAINED(statfs, answer_failure, (fuse_req_t req, fuse_ino_t i), (req, i))
CONTAINED(setxattr, answer_failure,
          (fuse_req_t req, fuse_ino_t i, const char *n, const char *v, size_t s, int f),
          (req, i, n, v, s, f))
CONTAINED(getxattr, answer_failure, (fuse_req_t req, fuse_ino_t i, const char *n, size_t s),
          (req, i, n, s))
CONTAINED(listxattr, answer_failure, (fuse_req_t req, fuse_ino_t i, size_t s), (req, i, s))
CONTAINED(removexattr, answer_failure, (fuse_req_t req, fuse_ino_t i, const char *n),
          (req, i, n))
CONTAINED(access, answer_failure, (fuse_req_t req, fuse_ino_t i, int m), (req, i, m))
CONTAINED(create, answer_failure,
          (fuse_req_t req, fuse_ino_t p, const char *n, mode_t m, file_info *fi),
          (req, p, n, m, fi))
CONTAINED(poll, answer_failure,
          (fuse_req_t req, fuse_ino_t i, file_info *fi, struct fuse_pollhandle *ph),
          (req, i, fi, ph))

/* Route each operation pyfuse3 registered through its wrapper. */
#define CONTAIN(op)                                                                          \
    if (bridge_ops.op != NULL) {                                                            \
        pyfuse3_##op = bridge_ops.op;                                                       \
        bridge_ops.op = contained_##op;                                                     \
    }

static void contain_pyfuse3_operations(void) {
    CONTAIN(lookup) CONTAIN(forget) CONTAIN(forget_multi) CONTAIN(getattr) CONTAIN(setattr)
    CONTAIN(readlink) CONTAIN(mknod) CONTAIN(mkdir) CONTAIN(unlink) CONTAIN(rmdir)
    CONTAIN(symlink) CONTAIN(rename) CONTAIN(link) CONTAIN(open) CONTAIN(read) CONTAIN(write)
    CONTAIN(write_buf) CONTAIN(flush) CONTAIN(release) CONTAIN(fsync) CONTAIN(opendir)
    CONTAIN(readdir) CONTAIN(readdirplus) CONTAIN(releasedir) CONTAIN(fsyncdir)
    CONTAIN(statfs) CONTAIN(setxattr) CONTAIN(getxattr) CONTAIN(listxattr)
    CONTAIN(removexattr) CONTAIN(access) CONTAIN(create) CONTAIN(poll)
}

/* -- write-back into purged ranges -------------------------------------------------------- */

/*
 * Dropping a purged range from the kernel's cache (drop_purged_ranges) makes the kernel write
 * the range's dirty mmap pages back first, from within the notification, which waits for
 * them: FUSE WRITE requests flagged FUSE_WRITE_CACHE, which libfuse passes on as
 * fi->writepage. Stored, they would repopulate the purged pages, and only a second purge
 * would free the memory. So while the kernel drops a purged range, a write-back lying wholly
 * inside it is answered here as written, its bytes discarded and counted for the purge. Any
 * other write-back goes to pyfuse3 as every write does and is stored: one reaching outside the
 * range (a large folio across its end, say), or one at another time (the flusher's, an
 * fsync's), which repopulates at worst: nothing is lost, only memory not freed.
 *
 * Why discarding loses nothing anyone was promised: the pages were purged before the drop
 * began, so once it is over they read as EIO (SIGBUS through a mapping) whatever the
 * write-back carried, just as if the purge had come after the write. A program learns that
 * its range was purged only once the drop is over: a volatility change on an inode being
 * dropped waits for that (is_dropping/dropped in volfs.core.reclaim), and a purged segment is
 * published only then. So nothing it wrote after being told can be in the write-back; what is
 * in it was written to the range while volatile, and the program's next unmark or pin of the
 * range reports it purged. A write(2) is never a write-back: without a writeback cache it
 * reaches the daemon directly, without FUSE_WRITE_CACHE, and always repopulates.
 *
 * Except for pages made data again meanwhile. The kernel drops its cached pages past a new
 * size itself, so those it caches there once a truncation is answered are new data; and a
 * write(2) into purged pages makes them data again (being a write, it cannot wait for the
 * drop: the kernel holds the pages' locks, which the drop needs). A drop of an earlier purge
 * must store their write-back. Python notes such spans of an inode (exempt_writeback) before
 * it answers the request, and lets go of them once the inode's drops are over
 * (end_exemption). A hole punched or zeroed, or a truncation by an O_TRUNC open, waits for
 * the drops instead: the kernel holds nothing they need then.
 */

/* At most this many spans an inode: past it, the two closest are noted as one. */
#define EXEMPT_SPANS 64

/* The spans of an inode whose write-back is stored even inside a range being dropped. */
typedef struct exemption {
    struct exemption *next;
    fuse_ino_t ino;
    size_t count;
    struct {
        off_t offset, end;
    } spans[EXEMPT_SPANS]; /* sorted, apart */
} exemption_t;

/* One byte range to drop from the kernel's cache. */
typedef struct {
    fuse_ino_t ino;
    off_t offset;
    off_t length;
    int error; /* out: 0, or the errno the kernel answered */
} inval_t;

/* One drop_purged_ranges call under way, and the range it is dropping right now. */
typedef struct drop {
    struct drop *next;
    int dropping; /* the range below is being dropped */
    fuse_ino_t ino;
    off_t offset;
    off_t end;
    unsigned long long discarded; /* bytes of write-back answered without being stored */
} drop_t;

static pthread_mutex_t drops_lock = PTHREAD_MUTEX_INITIALIZER;
/* The calls under way: read by the thread serving requests, changed by the dropping ones. */
static drop_t *drops;
/* The inodes noted by exempt_writeback, also under drops_lock. */
static exemption_t *exemptions;

/*
 * True if the write-back of bytes [offset, offset + size) of ino lies wholly inside a range
 * being dropped; its bytes are then counted for the call dropping it.
 */
static int discard_writeback(fuse_ino_t ino, off_t offset, size_t size) {
    if (size == 0 || offset < 0 || size > (size_t)(INT64_MAX - offset)) return 0;
    off_t end = offset + (off_t)size;
    int discard = 0;
    pthread_mutex_lock(&drops_lock);
    for (const exemption_t *exemption = exemptions; exemption != NULL;
         exemption = exemption->next) {
        if (exemption->ino != ino) continue;
        for (size_t i = 0; i < exemption->count; i++) {
            if (offset < exemption->spans[i].end && exemption->spans[i].offset < end) {
                pthread_mutex_unlock(&drops_lock);
                return 0; /* data again since the purge, at least in part */
            }
        }
    }
    for (drop_t *drop = drops; drop != NULL && !discard; drop = drop->next) {
        discard = drop->dropping && drop->ino == ino && drop->offset <= offset && end <= drop->end;
        if (discard) drop->discarded += size;
    }
    pthread_mutex_unlock(&drops_lock);
    return discard;
}

static void begin_drop(drop_t *drop) {
    pthread_mutex_lock(&drops_lock);
    drop->next = drops;
    drops = drop;
    pthread_mutex_unlock(&drops_lock);
}

/* Note the range drop is dropping now; dropping 0: none. */
static void set_dropping(drop_t *drop, int dropping, const inval_t *range) {
    pthread_mutex_lock(&drops_lock);
    drop->dropping = dropping;
    if (dropping) {
        drop->ino = range->ino;
        drop->offset = range->offset;
        /* Length 0 asks the kernel for everything from offset on. */
        drop->end = range->length ? range->offset + range->length : INT64_MAX;
    }
    pthread_mutex_unlock(&drops_lock);
}

/* Take drop out of the calls under way; the bytes of write-back it discarded. */
static unsigned long long end_drop(drop_t *drop) {
    pthread_mutex_lock(&drops_lock);
    drop_t **link = &drops;
    while (*link != drop) link = &(*link)->next;
    *link = drop->next;
    unsigned long long discarded = drop->discarded;
    pthread_mutex_unlock(&drops_lock);
    return discarded;
}

/* The link to ino's exemption, or to the list's end; under drops_lock. */
static exemption_t **exemption_of(fuse_ino_t ino) {
    exemption_t **link = &exemptions;
    while (*link != NULL && (*link)->ino != ino) link = &(*link)->next;
    return link;
}

/* Note [offset, end) in an inode's spans, kept sorted and apart, at most EXEMPT_SPANS. */
static void add_span(exemption_t *exemption, off_t offset, off_t end) {
    size_t count = exemption->count, at = 0;
    while (at < count && exemption->spans[at].end < offset) at++;
    /* The spans from `at` on that touch [offset, end) merge with it. */
    size_t past = at;
    while (past < count && exemption->spans[past].offset <= end) {
        if (exemption->spans[past].offset < offset) offset = exemption->spans[past].offset;
        if (exemption->spans[past].end > end) end = exemption->spans[past].end;
        past++;
    }
    if (past == at && count == EXEMPT_SPANS) {
        /* Full: one span more than the array holds, so the two closest become one. */
        size_t closest = 0;
        for (size_t i = 1; i + 1 < count; i++)
            if (exemption->spans[i + 1].offset - exemption->spans[i].end <
                exemption->spans[closest + 1].offset - exemption->spans[closest].end)
                closest = i;
        exemption->spans[closest].end = exemption->spans[closest + 1].end;
        memmove(&exemption->spans[closest + 1], &exemption->spans[closest + 2],
                (count - closest - 2) * sizeof exemption->spans[0]);
        exemption->count = --count;
        add_span(exemption, offset, end); /* into the room made */
        return;
    }
    memmove(&exemption->spans[at + 1], &exemption->spans[past],
            (count - past) * sizeof exemption->spans[0]);
    exemption->spans[at].offset = offset;
    exemption->spans[at].end = end;
    exemption->count = count - (past - at) + 1;
}

static PyObject *bridge_exempt_writeback(PyObject *module, PyObject *args) {
    (void)module;
    unsigned long long ino, offset, length;
    if (!PyArg_ParseTuple(args, "KKK", &ino, &offset, &length)) return NULL;
    if (offset > (unsigned long long)INT64_MAX) offset = INT64_MAX;
    /* Length 0, or one past the largest offset: to the end. */
    off_t end = length == 0 || length > (unsigned long long)INT64_MAX - offset
                    ? INT64_MAX
                    : (off_t)(offset + length);
    exemption_t *fresh = PyMem_RawMalloc(sizeof *fresh);
    if (fresh == NULL) return PyErr_NoMemory();
    pthread_mutex_lock(&drops_lock);
    exemption_t **link = exemption_of((fuse_ino_t)ino);
    if (*link == NULL) {
        fresh->next = NULL;
        fresh->ino = (fuse_ino_t)ino;
        fresh->count = 0;
        *link = fresh;
        fresh = NULL;
    }
    add_span(*link, (off_t)offset, end);
    pthread_mutex_unlock(&drops_lock);
    PyMem_RawFree(fresh);
    Py_RETURN_NONE;
}

static PyObject *bridge_end_exemption(PyObject *module, PyObject *arg) {
    (void)module;
    unsigned long long ino = PyLong_AsUnsignedLongLong(arg);
    if (ino == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&drops_lock);
    exemption_t **link = exemption_of((fuse_ino_t)ino);
    exemption_t *gone = *link;
    if (gone != NULL) *link = gone->next;
    pthread_mutex_unlock(&drops_lock);
    PyMem_RawFree(gone);
    Py_RETURN_NONE;
}

/* What libfuse would call for a write: pyfuse3's handlers, contained. */
static __typeof__(((struct fuse_lowlevel_ops *)0)->write) next_write;
static __typeof__(((struct fuse_lowlevel_ops *)0)->write_buf) next_write_buf;

static void reply_discarded(fuse_req_t req, size_t size) {
    int rc = fuse_reply_write(req, size);
    if (rc != 0)
        bridge_log(LOG_LEVEL_WARNING, "cannot answer a write-back into purged pages: %s",
                   strerror(-rc));
}

static void bridge_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
                         off_t offset, struct fuse_file_info *fi) {
    if (fi != NULL && fi->writepage && discard_writeback(ino, offset, size))
        reply_discarded(req, size);
    else
        next_write(req, ino, buf, size, offset, fi);
}

/* The one pyfuse3 gets its writes through: libfuse prefers write_buf when it is set. */
static void bridge_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv,
                             off_t offset, struct fuse_file_info *fi) {
    /* Data left unread in a spliced pipe is cleared by libfuse after the call. */
    size_t size = fuse_buf_size(bufv);
    if (fi != NULL && fi->writepage && discard_writeback(ino, offset, size))
        reply_discarded(req, size);
    else
        next_write_buf(req, ino, bufv, offset, fi);
}

/* Route pyfuse3's writes through the check for write-back into purged ranges. */
static void check_writes(void) {
    if (bridge_ops.write != NULL) {
        next_write = bridge_ops.write;
        bridge_ops.write = bridge_write;
    }
    if (bridge_ops.write_buf != NULL) {
        next_write_buf = bridge_ops.write_buf;
        bridge_ops.write_buf = bridge_write_buf;
    }
}

/* -- privileges killed by the daemon (FUSE_HANDLE_KILLPRIV_V2) -------------------------- */

/*
 * Before every write(2) to a file system that keeps its own setuid, setgid and
 * security.capability, the kernel asks whether the write must remove them: a GETXATTR of
 * security.capability per write, unless the superblock is SB_NOSEC, which FUSE sets only when
 * the daemon handles the removal itself (FUSE_HANDLE_KILLPRIV_V2). The kernel then tells the
 * daemon when to remove them: FUSE_WRITE_KILL_SUIDGID on a WRITE, FUSE_OPEN_KILL_SUIDGID on an
 * OPEN with O_TRUNC, FATTR_KILL_SUIDGID on a SETATTR (a truncation, a chown), each only when
 * the caller lacks CAP_FSETID (a chown always).
 *
 * libfuse before 3.17 can neither ask for FUSE_HANDLE_KILLPRIV_V2 nor hand those flags on, and
 * pyfuse3 hands on none. So once mounted, the session reads and writes /dev/fuse through the
 * functions here (fuse_session_custom_io): the read sees every request's header and arguments
 * first, and passes the inode of each request that asks for a kill to the Python handler,
 * before the request is processed; the write adds the flag to the INIT reply if the kernel
 * offered it. A daemon without the handler does not ask for the flag.
 */
static uint64_t init_unique;    /* the INIT request's, while its reply is due */
static int kernel_offers_killpriv_v2;

/* The request's kill flag: the inode whose privileges it asks to remove, or 0. */
static uint64_t kill_requested(const char *buffer, size_t size) {
    const struct fuse_in_header *header = (const void *)buffer;
    const char *argument = buffer + sizeof *header;
    size_t available = size - sizeof *header;
    switch (header->opcode) {
    case FUSE_WRITE:
        if (available >= sizeof(struct fuse_write_in) &&
            ((const struct fuse_write_in *)argument)->write_flags & FUSE_WRITE_KILL_SUIDGID)
            return header->nodeid;
        break;
    case FUSE_OPEN:
        if (available >= sizeof(struct fuse_open_in) &&
            ((const struct fuse_open_in *)argument)->open_flags & FUSE_OPEN_KILL_SUIDGID)
            return header->nodeid;
        break;
    case FUSE_SETATTR:
        if (available >= sizeof(struct fuse_setattr_in) &&
            ((const struct fuse_setattr_in *)argument)->valid & FATTR_KILL_SUIDGID)
            return header->nodeid;
        break;
    case FUSE_INIT:
        if (available >= offsetof(struct fuse_init_in, flags) + sizeof(uint32_t)) {
            init_unique = header->unique;
            kernel_offers_killpriv_v2 =
                (((const struct fuse_init_in *)argument)->flags & FUSE_HANDLE_KILLPRIV_V2) != 0;
        }
        break;
    }
    return 0;
}

/* Remove the privileges a request read for libfuse asks to remove, before it is processed. */
static void kill_privileges(const void *buffer, size_t size) {
    if (size < sizeof(struct fuse_in_header)) return;
    uint64_t ino = kill_requested(buffer, size);
    if (ino != 0) {
        PyGILState_STATE gil = PyGILState_Ensure();
        if (kill_privileges_handler != NULL) {
            PyObject *result = PyObject_CallFunction(kill_privileges_handler, "K",
                                                     (unsigned long long)ino);
            /* Logged by the handler's caller's rules: a failure here fails nothing else. */
            if (result == NULL) PyErr_WriteUnraisable(kill_privileges_handler);
            Py_XDECREF(result);
        }
        PyGILState_Release(gil);
    }
}

static ssize_t killpriv_read(int fd, void *buffer, size_t size, void *userdata) {
    (void)userdata;
    ssize_t got = read(fd, buffer, size);
    if (got > 0) kill_privileges(buffer, (size_t)got);
    return got;
}

/* /dev/fuse while request threads read it (the session's own descriptor is then theirs). */
static int device_fd = -1;

static ssize_t killpriv_writev(int fd, struct iovec *iov, int count, void *userdata) {
    (void)userdata;
    if (init_unique != 0 && count >= 2 && iov[0].iov_len >= sizeof(struct fuse_out_header) &&
        ((struct fuse_out_header *)iov[0].iov_base)->unique == init_unique) {
        struct fuse_out_header *header = iov[0].iov_base;
        if (header->error == 0 && kernel_offers_killpriv_v2 && kill_privileges_handler != NULL &&
            iov[1].iov_len >= offsetof(struct fuse_init_out, flags) + sizeof(uint32_t))
            ((struct fuse_init_out *)iov[1].iov_base)->flags |= FUSE_HANDLE_KILLPRIV_V2;
        init_unique = 0;
    }
    return writev(device_fd >= 0 ? device_fd : fd, iov, count);
}

static const struct fuse_custom_io killpriv_io = {
    .writev = killpriv_writev,
    .read = killpriv_read,
};

/* -- the hooks ---------------------------------------------------------------------------- */

/* libfuse >= 3.17 passes the version a program was built against; only handed on here. */
struct libfuse_version;

struct fuse_session *fuse_session_new_versioned(struct fuse_args *args,
                                                const struct fuse_lowlevel_ops *op,
                                                size_t op_size, struct libfuse_version *version,
                                                void *userdata);
void fuse_session_unmount(struct fuse_session *se);
void fuse_session_destroy(struct fuse_session *se);

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                                const struct fuse_lowlevel_ops *, size_t,
                                                void *);
typedef struct fuse_session *(*session_new_versioned_fn)(struct fuse_args *,
                                                          const struct fuse_lowlevel_ops *,
                                                          size_t, struct libfuse_version *,
                                                          void *);
typedef void (*session_end_fn)(struct fuse_session *);
typedef int (*session_mount_fn)(struct fuse_session *, const char *);
typedef int (*session_custom_io_fn)(struct fuse_session *, const struct fuse_custom_io *, int);

/* libfuse's own functions, found by find_libfuse() when the module is loaded. */
static struct {
    const char *soname;
    session_new_fn session_new;                    /* fuse_session_new@FUSE_3.0 */
    session_new_versioned_fn session_new_versioned; /* fuse_session_new_versioned@FUSE_3.17 */
    session_end_fn session_unmount;
    session_end_fn session_destroy;
    session_mount_fn session_mount;
    session_custom_io_fn session_custom_io; /* NULL before libfuse 3.12: no killpriv here */
} libfuse;

/*
 * Set while libfuse creates a session for one of the hooks: libfuse 3.17's
 * fuse_session_new@FUSE_3.0 calls fuse_session_new_versioned, which (when libfuse binds
 * its own exported functions through the global scope) is the hook here again, and must
 * then pass the already wrapped operations straight on.
 */
static __thread int creating_session;

/*
 * Find libfuse's functions in whichever libfuse 3 is loaded, the one this module was linked
 * against: libfuse3.so.4 (libfuse >= 3.17) or libfuse3.so.3. 0, or -1 with ImportError set.
 */
static int find_libfuse(void) {
    static const char *const sonames[] = {"libfuse3.so.4", "libfuse3.so.3"};
    for (size_t i = 0; i < sizeof sonames / sizeof *sonames; i++) {
        /* Only a library already loaded: loading another libfuse would mix two of them. */
        void *handle = dlopen(sonames[i], RTLD_NOW | RTLD_NOLOAD);
        if (handle == NULL) continue;
        libfuse.soname = sonames[i];
        libfuse.session_new = (session_new_fn)dlvsym(handle, "fuse_session_new", "FUSE_3.0");
        libfuse.session_new_versioned = (session_new_versioned_fn)dlvsym(
            handle, "fuse_session_new_versioned", "FUSE_3.17");
        libfuse.session_unmount =
            (session_end_fn)dlvsym(handle, "fuse_session_unmount", "FUSE_3.0");
        libfuse.session_destroy =
            (session_end_fn)dlvsym(handle, "fuse_session_destroy", "FUSE_3.0");
        libfuse.session_mount =
            (session_mount_fn)dlvsym(handle, "fuse_session_mount", "FUSE_3.0");
        libfuse.session_custom_io = (session_custom_io_fn)dlsym(handle, "fuse_session_custom_io");
        /* The handle stays open: the functions are used as long as the process lives. */
        if ((libfuse.session_new == NULL && libfuse.session_new_versioned == NULL) ||
            libfuse.session_unmount == NULL || libfuse.session_destroy == NULL ||
            libfuse.session_mount == NULL) {
            PyErr_Format(PyExc_ImportError,
                         "volfs.daemon._bridge: %s lacks fuse_session_new@FUSE_3.0 or "
                         "fuse_session_new_versioned@FUSE_3.17, fuse_session_mount, "
                         "fuse_session_unmount or fuse_session_destroy",
                         sonames[i]);
            return -1;
        }
        return 0;
    }
    PyErr_SetString(PyExc_ImportError,
                    "volfs.daemon._bridge: neither libfuse3.so.4 (libfuse >= 3.17) nor "
                    "libfuse3.so.3 is loaded: the bridge must be linked against libfuse 3");
    return -1;
}

/* -- request threads: ordinary pages served without Python -------------------------------- */

/*
 * With serve_pages(), a READ or WRITE of a regular file whose page map (volfs.core._pagemap)
 * has no hold bit set is served in C, from and into the store's arena:
 *   - a READ is answered straight from the arena's pages (holes from pages of zeros), the
 *     kernel copying them from the mapping; atime follows relatime;
 *   - a WRITE is served when every page it touches is held already: copied into them, the
 *     size grown, mtime and ctime set. One that needs new pages (the size cap, purging to
 *     make room) goes to Python; so does one to a file with privileges to remove, which
 *     has a hold bit.
 *
 * Who reads /dev/fuse depends on what comes:
 *   - by default pyfuse3's loop does (reading without blocking, as it always did): it serves
 *     the pages requests it reads in C on the spot, has Python answer the namespace's most
 *     frequent requests on the spot too (see "requests answered at once"), and passes the
 *     others to libfuse;
 *   - once it has read READ_BY_THREADS_AFTER pages requests in a row, the request threads
 *     take over, each blocking in its own read of /dev/fuse (a read and a writev a request: no
 *     event loop, no GIL, several at once). They hand every other request to pyfuse3: queued,
 *     with a byte in a pipe pyfuse3's loop waits for; libfuse's read takes the oldest;
 *   - once they have handed READ_BY_LOOP_AFTER requests in a row to pyfuse3, the loop reads
 *     again: a hand-over wakes a second thread, which a stream of requests for Python (a
 *     metadata loop) pays on every request.
 * The session's descriptor, which pyfuse3 waits on, is an epoll set of the pipe and, while
 * the loop reads, /dev/fuse; /dev/fuse is non-blocking exactly then. Replies, from either
 * side, go to /dev/fuse.
 *
 * A map's lock is held, shared, from the lookup of a request's pages until its reply is
 * written, so a change Python makes to the runs (a truncation, a purge, a hole punched; it
 * holds the lock exclusively) comes wholly before or wholly after it, and a page is never
 * read or written after Python freed it.
 */

#define REQUEST_THREADS_MAX 16
/* The store's pages (volfs.abi.PAGE_SIZE), whatever the system's. */
#define PAGE_BYTES 4096
/* The largest READ served in C: 1 MiB, the most the kernel asks with 4 KiB system pages; its
 * pieces (data and holes alternating) stay far below the kernel's limit on iovecs. */
#define READ_MAX_BYTES (256 * PAGE_BYTES)
#define LARGEST_OFFSET INT64_MAX

/* Pages requests the loop serves in a row before the threads read; requests the threads hand
 * to pyfuse3 in a row before the loop reads again. */
#define READ_BY_THREADS_AFTER 4
#define READ_BY_LOOP_AFTER 8

enum { READ_BY_LOOP, READ_BY_THREADS };

/* A request read by a thread for pyfuse3. */
typedef struct handed {
    struct handed *next;
    size_t size;
    char data[];
} handed_t;

static struct {
    const vf_pagemap_api_t *api;
    PyObject *table_object;
    void *table;
    Py_buffer arena;      /* the store's mapping; arena.obj is NULL when not configured */
    int64_t arena_pages;
    int arena_fd;         /* the store's memfd (a duplicate), written with pwrite; -1 if none */
    Py_buffer mapped;     /* a byte per arena page, set once a thread read it: it is mapped */
    vf_time_t relatime; /* how old atime may grow while later than mtime and ctime */
    int threads_wanted;
    pthread_t threads[REQUEST_THREADS_MAX];
    int threads_running;
    int session_fd;       /* the epoll set libfuse takes as the session's descriptor */
    int wake_fd;          /* the pipe's read end, in that set */
    int signal_fd;        /* its write end */
    pthread_mutex_t mode_lock;
    pthread_cond_t mode_changed;
    atomic_int mode;      /* READ_BY_LOOP or READ_BY_THREADS */
    int served_in_a_row;  /* by the loop */
    atomic_int handed_in_a_row; /* by the threads */
    atomic_int threads_alive;   /* threads still reading, or waiting to */
    unsigned proto_minor; /* from INIT */
    int deny_others;      /* allow_root: only the daemon's user and root are served */
    uid_t owner;
    pthread_mutex_t queue_lock;
    handed_t *head, **tail;
    int waiting;          /* requests in the queue */
    int ended;            /* errno that ended the reading, 0 while it goes on */
    atomic_ullong reads, writes, handed, at_once;
} pages = {.session_fd = -1,
             .arena_fd = -1,
             .wake_fd = -1,
             .signal_fd = -1,
             .mode_lock = PTHREAD_MUTEX_INITIALIZER,
             .mode_changed = PTHREAD_COND_INITIALIZER,
             .queue_lock = PTHREAD_MUTEX_INITIALIZER,
             .tail = &pages.head};

/* Never written: what holes read as. */
static char zero_pages[READ_MAX_BYTES];

/* What libfuse reads at most, so what the kernel may send: FUSE_MAX_MAX_PAGES system pages
 * and a header page. */
static size_t request_buffer_bytes(void) {
    return (size_t)(256 + 1) * (size_t)sysconf(_SC_PAGESIZE);
}

static vf_time_t now(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (vf_time_t){.sec = now.tv_sec, .nsec = now.tv_nsec};
}

static void read_by_loop(void);

/*
 * The pipe holds one byte exactly while requests wait or the reading has ended: written by
 * whoever makes the queue non-empty, read by whoever empties it, both under queue_lock. A
 * pipe rather than an eventfd: its writer's wakeup is synchronous, so the scheduler runs
 * pyfuse3's thread where the handing thread was, instead of waking another CPU.
 */
static void signal_waiting(void) {
    if (pages.head != NULL || pages.ended) return;
    char byte = 0;
    if (write(pages.signal_fd, &byte, 1) < 0) { /* cannot fill: one byte at most */
    }
}

static void hand_over(const char *buffer, size_t size) {
    handed_t *request = malloc(sizeof *request + size);
    if (request == NULL) {
        /* Nothing to hand over: answered here rather than left hanging, and the loop, which
         * needs no copy, reads from now on. */
        read_by_loop();
        const struct fuse_in_header *in = (const void *)buffer;
        struct fuse_out_header out = {.len = sizeof out, .error = -ENOMEM, .unique = in->unique};
        if (in->opcode != FUSE_FORGET && in->opcode != FUSE_BATCH_FORGET &&
            write(device_fd, &out, sizeof out) < 0) { /* the kernel has gone: nothing to do */
        }
        return;
    }
    request->next = NULL;
    request->size = size;
    memcpy(request->data, buffer, size);
    pthread_mutex_lock(&pages.queue_lock);
    signal_waiting();
    *pages.tail = request;
    pages.tail = &request->next;
    int waiting = ++pages.waiting;
    pthread_mutex_unlock(&pages.queue_lock);
    atomic_fetch_add(&pages.handed, 1);
    /* What waits for pyfuse3 stays in the kernel, not here, once pyfuse3 falls behind: the
     * daemon holds at most READ_BY_LOOP_AFTER requests and the threads' own. */
    if (waiting >= READ_BY_LOOP_AFTER) read_by_loop();
}

/* Answer the request with error (0 for the bytes of iov[1..count), iov[0] being filled here
 * with the header); 0, or the errno of a reply the kernel refused. ENOENT is not one: the
 * request was interrupted and answered meanwhile. Nothing that fails can be mended by a
 * second reply. */
static int reply(const struct fuse_in_header *in, int error, struct iovec *iov, int count,
                 size_t bytes) {
    struct fuse_out_header out = {
        .len = (uint32_t)(sizeof out + bytes), .error = -error, .unique = in->unique};
    iov[0] = (struct iovec){.iov_base = &out, .iov_len = sizeof out};
    return writev(device_fd, iov, count) < 0 && errno != ENOENT ? errno : 0;
}

/* The map of a regular file C may serve, locked (shared), or NULL. */
static vf_pagemap_t *lock_map(uint64_t ino) {
    vf_pagemap_t *map = pages.api->lookup(pages.table, ino);
    if (map == NULL) return NULL;
    /* From pyfuse3's loop this waits holding the GIL: only that thread ever locks a map
     * exclusively, and never while it reads requests, so nothing holding the lock needs the
     * GIL. A failure (EDEADLK) leaves the request to Python. */
    if (pthread_rwlock_rdlock(&map->lock) == 0) {
        if (atomic_load(&map->holds) == 0) return map;
        pthread_rwlock_unlock(&map->lock);
    }
    pages.api->unref(map);
    return NULL;
}

static void unlock_map(vf_pagemap_t *map) {
    pthread_rwlock_unlock(&map->lock);
    pages.api->unref(map);
}

/* Pointer to arena page arena_page of a run, or NULL if the run leaves the arena. */
static char *arena_at(const vf_run_t *run) {
    if (run->arena < 0 || run->count > pages.arena_pages - run->arena) return NULL;
    return (char *)pages.arena.buf + run->arena * PAGE_BYTES;
}

/* Note the pages of a run's bytes [from, to) as mapped: the reply is about to read them
 * through the mapping. */
static void note_mapped(const vf_run_t *run, uint64_t from, uint64_t to) {
    uint64_t first = from / PAGE_BYTES, end = (to + PAGE_BYTES - 1) / PAGE_BYTES;
    memset((char *)pages.mapped.buf + run->arena + first, 1, (size_t)(end - first));
}

/* Copy size bytes to a run's byte at: through the mapping into pages already mapped (cheaper
 * than a system call), else with pwrite, which maps nothing a purge would have to unmap.
 * Returns the bytes copied: size, fewer if the kernel ran out of memory partway, or -errno if
 * it could take none. */
static ssize_t store(const vf_run_t *run, uint64_t at, const char *data, size_t size) {
    uint64_t first = at / PAGE_BYTES, end = (at + size + PAGE_BYTES - 1) / PAGE_BYTES;
    if (memchr((const char *)pages.mapped.buf + run->arena + first, 0, (size_t)(end - first)) ==
        NULL) {
        memcpy(arena_at(run) + at, data, size);
        return (ssize_t)size;
    }
    off_t position = (off_t)(run->arena * PAGE_BYTES + (int64_t)at);
    size_t done = 0;
    while (done < size) {
        ssize_t written = pwrite(pages.arena_fd, data + done, size - done, position + (off_t)done);
        if (written <= 0) {
            if (done) break;
            return written < 0 ? -errno : -EIO;
        }
        done += (size_t)written;
    }
    return (ssize_t)done;
}

/* Serve a READ; 0 if it must go to Python. */
static int serve_read(const struct fuse_in_header *in, const struct fuse_read_in *arg) {
    if (arg->size > sizeof zero_pages || arg->offset > (uint64_t)LARGEST_OFFSET) return 0;
    vf_pagemap_t *map = lock_map(in->nodeid);
    if (map == NULL) return 0;
    /* Unsigned: the end of a run at the last page (2**51 pages) is 2**63 bytes. */
    uint64_t offset = arg->offset, size = (uint64_t)atomic_load(&map->size);
    uint64_t length = offset < size ? size - offset : 0;
    if (length > arg->size) length = arg->size;
    uint64_t end = offset + length;
    /* A header, then at most one piece of data and one of zeros a page. */
    struct iovec iov[2 * (READ_MAX_BYTES / PAGE_BYTES) + 3];
    int count = 1;
    uint64_t cursor = offset;
    ptrdiff_t index = vf_floor(map, (int64_t)(offset / PAGE_BYTES));
    if (index < 0) index = 0;
    for (size_t i = (size_t)index; cursor < end && i < map->len; i++) {
        const vf_run_t *run = &map->runs[i];
        uint64_t lo = (uint64_t)run->page * PAGE_BYTES;
        uint64_t hi = (uint64_t)(run->page + run->count) * PAGE_BYTES;
        if (hi <= cursor) continue;
        if (lo >= end) break;
        char *base = arena_at(run);
        if (base == NULL) {
            unlock_map(map);
            return 0;
        }
        if (lo > cursor) {
            iov[count++] = (struct iovec){.iov_base = zero_pages, .iov_len = (size_t)(lo - cursor)};
            cursor = lo;
        }
        uint64_t stop = hi < end ? hi : end;
        iov[count++] = (struct iovec){.iov_base = base + (cursor - lo),
                                      .iov_len = (size_t)(stop - cursor)};
        note_mapped(run, cursor - lo, stop - lo);
        cursor = stop;
    }
    if (cursor < end)
        iov[count++] = (struct iovec){.iov_base = zero_pages, .iov_len = (size_t)(end - cursor)};
    /* relatime, as Python's reads keep it. */
    vf_time_t time = now();
    vf_time_t stale = {.sec = time.sec - pages.relatime.sec, .nsec = time.nsec - pages.relatime.nsec};
    if (stale.nsec < 0) {
        stale.sec--;
        stale.nsec += 1000000000;
    }
    pthread_mutex_lock(&map->times_lock);
    if (vf_time_before(map->atime, stale) || !vf_time_before(map->mtime, map->atime) ||
        !vf_time_before(map->ctime, map->atime))
        map->atime = time;
    pthread_mutex_unlock(&map->times_lock);
    reply(in, 0, iov, count, (size_t)length);
    unlock_map(map);
    atomic_fetch_add(&pages.reads, 1);
    return 1;
}

/* Serve a WRITE into pages already held; 0 if it must go to Python. */
static int serve_write(const struct fuse_in_header *in, const struct fuse_write_in *arg,
                       const char *data, size_t available) {
    /* FUSE_WRITE_KILL_SUIDGID comes with every write by a caller without CAP_FSETID: a file
     * with privileges to remove has a hold bit, so here there is none (ctime is set anyway). */
    if (arg->size == 0 || arg->size > available ||
        arg->offset > (uint64_t)(LARGEST_OFFSET - arg->size))
        return 0;
    struct iovec iov[2];
    struct fuse_write_out out = {.size = arg->size};
    iov[1] = (struct iovec){.iov_base = &out, .iov_len = sizeof out};
    if (arg->write_flags & FUSE_WRITE_CACHE && discard_writeback(in->nodeid, (off_t)arg->offset,
                                                                 arg->size)) {
        reply(in, 0, iov, 2, sizeof out);
        return 1;
    }
    vf_pagemap_t *map = lock_map(in->nodeid);
    if (map == NULL) return 0;
    /* Unsigned: the end of a run at the last page (2**51 pages) is 2**63 bytes. */
    uint64_t offset = arg->offset, end = offset + arg->size;
    int64_t first = (int64_t)(offset / PAGE_BYTES);
    int64_t end_page = (int64_t)(end / PAGE_BYTES + (end % PAGE_BYTES != 0));
    /* Every page held: the runs from first on must follow each other up to end_page. */
    ptrdiff_t index = vf_floor(map, first);
    int64_t covered = first;
    for (size_t i = index < 0 ? map->len : (size_t)index; i < map->len && covered < end_page;
         i++) {
        const vf_run_t *run = &map->runs[i];
        if (run->page > covered || arena_at(run) == NULL) break;
        covered = run->page + run->count;
    }
    if (covered < end_page) {
        unlock_map(map);
        return 0;
    }
    uint64_t cursor = offset;
    for (size_t i = (size_t)index; cursor < end; i++) {
        const vf_run_t *run = &map->runs[i];
        uint64_t lo = (uint64_t)run->page * PAGE_BYTES;
        uint64_t hi = (uint64_t)(run->page + run->count) * PAGE_BYTES;
        uint64_t stop = hi < end ? hi : end;
        ssize_t stored = store(run, cursor - lo, data + (cursor - offset), (size_t)(stop - cursor));
        if (stored < 0 && cursor == offset) {
            unlock_map(map);
            reply(in, (int)-stored, iov, 1, 0);
            return 1;
        }
        if (stored < (ssize_t)(stop - cursor)) {
            /* Out of memory partway: a short write, as on tmpfs. */
            cursor += stored > 0 ? (uint64_t)stored : 0;
            break;
        }
        cursor = stop;
    }
    out.size = (uint32_t)(cursor - offset);
    vf_grow(map, (int64_t)cursor);
    vf_time_t time = now();
    pthread_mutex_lock(&map->times_lock);
    map->mtime = map->ctime = time;
    pthread_mutex_unlock(&map->times_lock);
    unlock_map(map);
    reply(in, 0, iov, 2, sizeof out);
    atomic_fetch_add(&pages.writes, 1);
    return 1;
}

/* Serve the request in buffer if it is an ordinary READ or WRITE; 0 if Python must. */
static int serve(const char *buffer, size_t size) {
    const struct fuse_in_header *in = (const void *)buffer;
    const char *argument = buffer + sizeof *in;
    size_t available = size - sizeof *in;
    switch (in->opcode) {
    case FUSE_INIT:
        if (available >= offsetof(struct fuse_init_in, flags))
            pages.proto_minor = ((const struct fuse_init_in *)argument)->minor;
        return 0;
    case FUSE_READ:
        return available >= offsetof(struct fuse_read_in, read_flags) &&
               serve_read(in, (const void *)argument);
    case FUSE_WRITE:
        /* Before 7.9 the arguments were shorter: never served here. */
        return pages.proto_minor >= 9 && available >= sizeof(struct fuse_write_in) &&
               serve_write(in, (const void *)argument, argument + sizeof(struct fuse_write_in),
                           available - sizeof(struct fuse_write_in));
    }
    return 0;
}

/* /dev/fuse blocking or not; 0, or -1 with errno. */
static int set_blocking(int blocking) {
    int flags = fcntl(device_fd, F_GETFL);
    if (flags < 0) return -1;
    return fcntl(device_fd, F_SETFL, blocking ? flags & ~O_NONBLOCK : flags | O_NONBLOCK);
}

/* Called by pyfuse3's loop: the threads read from now on. */
static void read_by_threads(void) {
    if (atomic_load(&pages.threads_alive) == 0) return;
    /* The loop no longer reads (so nothing blocks it), then the threads may block. */
    pthread_mutex_lock(&pages.mode_lock);
    atomic_store(&pages.mode, READ_BY_THREADS);
    atomic_store(&pages.handed_in_a_row, 0);
    epoll_ctl(pages.session_fd, EPOLL_CTL_DEL, device_fd, NULL);
    if (set_blocking(1) == 0) {
        pthread_cond_broadcast(&pages.mode_changed);
    } else { /* threads reading a non-blocking /dev/fuse would spin: the loop goes on */
        atomic_store(&pages.mode, READ_BY_LOOP);
        struct epoll_event event = {.events = EPOLLIN, .data.fd = device_fd};
        epoll_ctl(pages.session_fd, EPOLL_CTL_ADD, device_fd, &event);
    }
    pthread_mutex_unlock(&pages.mode_lock);
}

/* Called by a thread: pyfuse3's loop reads from now on. A thread blocked in its read already
 * takes one more request before it waits. */
static void read_by_loop(void) {
    pthread_mutex_lock(&pages.mode_lock);
    struct epoll_event event = {.events = EPOLLIN, .data.fd = device_fd};
    /* Non-blocking before the loop may read; the loop stays out while that fails. */
    if (atomic_load(&pages.mode) == READ_BY_THREADS && set_blocking(0) == 0) {
        if (epoll_ctl(pages.session_fd, EPOLL_CTL_ADD, device_fd, &event) == 0) {
            pages.served_in_a_row = 0;
            atomic_store(&pages.mode, READ_BY_LOOP);
        } else {
            set_blocking(1); /* the threads read on, waiting as before */
        }
    }
    pthread_mutex_unlock(&pages.mode_lock);
}

static void unlock_mode(void *unused) {
    (void)unused;
    pthread_mutex_unlock(&pages.mode_lock);
}

/* Wait until the threads read; the thread may be stopped (pthread_cancel) meanwhile. */
static void wait_for_reading(void) {
    pthread_mutex_lock(&pages.mode_lock);
    pthread_cleanup_push(unlock_mode, NULL);
    pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, NULL);
    while (atomic_load(&pages.mode) != READ_BY_THREADS)
        pthread_cond_wait(&pages.mode_changed, &pages.mode_lock);
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
    pthread_cleanup_pop(1);
}

static void free_buffer(void *buffer) { free(buffer); }

/*
 * The request threads' work: read, serve or hand over, until the connection ends (ENODEV on
 * unmount ends pyfuse3's loop too). A thread failing otherwise leaves the reading to the
 * others, or to the loop once it is the last.
 */
static void *request_thread(void *buffer) {
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
    size_t size = request_buffer_bytes();
    int error = 0;
    pthread_cleanup_push(free_buffer, buffer);
    while (error == 0) {
        wait_for_reading();
        /* Stopped (pthread_cancel) only while waiting for a request. */
        pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, NULL);
        ssize_t got = read(device_fd, buffer, size);
        pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
        if (got < 0) {
            /* ENOENT: the request was interrupted before it was read; EAGAIN: the loop reads
             * now. */
            if (errno != EINTR && errno != EAGAIN && errno != ENOENT) error = errno;
        } else if ((size_t)got < sizeof(struct fuse_in_header)) {
            error = EIO;
        } else if (serve(buffer, (size_t)got)) {
            atomic_store(&pages.handed_in_a_row, 0);
        } else {
            hand_over(buffer, (size_t)got);
            if (atomic_fetch_add(&pages.handed_in_a_row, 1) + 1 >= READ_BY_LOOP_AFTER)
                read_by_loop();
        }
    }
    if (atomic_fetch_sub(&pages.threads_alive, 1) == 1 || error != ENODEV) read_by_loop();
    if (error == ENODEV) {
        pthread_mutex_lock(&pages.queue_lock);
        if (pages.ended == 0) {
            signal_waiting();
            pages.ended = error;
        }
        pthread_mutex_unlock(&pages.queue_lock);
    }
    pthread_cleanup_pop(1);
    return NULL;
}

/* The oldest request handed over, or NULL; *ended set to the errno that ended the threads'
 * reading, if it has. */
static handed_t *take_handed(int *ended) {
    pthread_mutex_lock(&pages.queue_lock);
    handed_t *request = pages.head;
    if (request != NULL) {
        pages.waiting--;
        pages.head = request->next;
        if (pages.head == NULL) {
            pages.tail = &pages.head;
            /* The byte stays once the reading has ended: every later read ends too. */
            char byte;
            if (!pages.ended && read(pages.wake_fd, &byte, 1) < 0) { /* cannot fail */
            }
        }
    }
    *ended = pages.ended;
    pthread_mutex_unlock(&pages.queue_lock);
    return request;
}

/* -- requests answered at once ---------------------------------------------------------- */

/*
 * The namespace's most frequent requests (a create+stat+unlink is six of them) go to Python
 * as the kernel sent them, from libfuse's read on pyfuse3's loop, and the bytes Python
 * returns are the reply: no decoding and encoding by libfuse, no coroutine of pyfuse3's, no
 * turn of the event loop before the next request is read. Python answers them between two
 * awaits of every task, so with the namespace as consistent as any handler finds it; a
 * request it must wait for (an open that truncates) it declines, and pyfuse3 gets it.
 * Requires protocol 7.12 (struct fuse_create_in as volfs.daemon.wire has it).
 */
static int answers_at_once(uint32_t opcode) {
    switch (opcode) {
    case FUSE_LOOKUP:
    case FUSE_FORGET:
    case FUSE_GETATTR:
    case FUSE_UNLINK:
    case FUSE_OPEN:
    case FUSE_RELEASE:
    case FUSE_CREATE:
    case FUSE_BATCH_FORGET:
        return 1;
    }
    return 0;
}

/* Have Python answer the request in buffer if it is one of those; 0 if libfuse must. */
static int answer_at_once(const char *buffer, size_t size) {
    const struct fuse_in_header *in = (const void *)buffer;
    if (at_once_handler == NULL || pages.proto_minor < 12 || !answers_at_once(in->opcode))
        return 0;
    /* libfuse refuses the others' requests (but RELEASE) itself: it gets them. */
    if (pages.deny_others && in->uid != pages.owner && in->uid != 0 && in->opcode != FUSE_RELEASE)
        return 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = PyObject_CallFunction(
        at_once_handler, "IKIIy#", in->opcode, (unsigned long long)in->nodeid, in->uid,
        in->gid, buffer + sizeof *in, (Py_ssize_t)(size - sizeof *in));
    int answered = result != Py_None;
    int error = 0;
    Py_buffer payload = {0};
    if (result == NULL) {
        /* The handler contains its own failures: this is the call itself (no memory). */
        PyErr_WriteUnraisable(at_once_handler);
        error = EIO;
    } else if (PyLong_Check(result)) {
        long code = PyLong_AsLong(result);
        error = code > 0 && code < 512 ? (int)code : EIO; /* what the kernel takes */
        PyErr_Clear();
    } else if (answered && PyObject_GetBuffer(result, &payload, PyBUF_SIMPLE) < 0) {
        PyErr_WriteUnraisable(at_once_handler);
        error = EIO;
    }
    if (answered && in->opcode != FUSE_FORGET && in->opcode != FUSE_BATCH_FORGET) {
        struct iovec iov[2];
        int count = 1;
        size_t bytes = error == 0 && payload.len > 0 ? (size_t)payload.len : 0;
        if (bytes > 0) iov[count++] = (struct iovec){.iov_base = payload.buf, .iov_len = bytes};
        /* A reply the kernel refused (its caller got EIO) is a bug worth a line in the log. */
        int refused = reply(in, error, iov, count, bytes);
        if (refused != 0)
            bridge_log(LOG_LEVEL_WARNING, "the reply to request %d answered at once failed: %s",
                       (int)in->opcode, strerror(refused));
    }
    if (payload.obj != NULL) PyBuffer_Release(&payload);
    Py_XDECREF(result);
    PyGILState_Release(gil);
    if (answered) atomic_fetch_add(&pages.at_once, 1);
    return answered;
}

/*
 * How long the loop keeps reading, without the GIL, for the next request once it has served
 * one: a program issuing its requests one after another (a metadata loop) sends the next a
 * few microseconds after its reply, and waiting for it in the event loop would let this CPU
 * go idle, so that each request paid the wakeup of an idle CPU (tens of microseconds on a
 * virtual machine). Bounded: at most this much CPU a request, and the event loop's other
 * tasks wait at most a burst of requests and spins.
 */
#define SPIN_NS 50000

static uint64_t monotonic_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/* A read of /dev/fuse (non-blocking) retried for up to SPIN_NS while nothing is there. */
static ssize_t read_soon(void *buffer, size_t size) {
    ssize_t got = -1;
    Py_BEGIN_ALLOW_THREADS
    uint64_t until = monotonic_ns() + SPIN_NS;
    do {
        got = read(device_fd, buffer, size);
    } while (got < 0 && errno == EAGAIN && monotonic_ns() < until);
    Py_END_ALLOW_THREADS
    return got;
}

/*
 * libfuse's read for pyfuse3's loop: a request handed over by the threads, else (while the
 * loop reads) one from /dev/fuse, pages requests served and requests answered at once on the
 * way. Never blocks: EINTR makes pyfuse3 wait again; ENODEV makes libfuse end the session, as
 * a read of /dev/fuse would.
 */
static ssize_t session_read(int fd, void *buffer, size_t size, void *userdata) {
    (void)fd;
    (void)userdata;
    /* A bounded burst: the loop's other tasks wait meanwhile. */
    for (int burst = 0; burst < 64; burst++) {
        int ended;
        ssize_t got;
        handed_t *request = take_handed(&ended);
        if (request != NULL) {
            got = (ssize_t)(request->size < size ? request->size : size);
            memcpy(buffer, request->data, (size_t)got);
            free(request);
        } else if (ended) {
            errno = ended;
            return -1;
        } else if (atomic_load(&pages.mode) != READ_BY_LOOP) {
            break;
        } else {
            got = read(device_fd, buffer, size);
            if (got < 0 && errno == EAGAIN && burst > 0) got = read_soon(buffer, size);
            if (got < 0) {
                if (errno == EAGAIN || errno == ENOENT) errno = EINTR;
                return -1;
            }
            if ((size_t)got >= sizeof(struct fuse_in_header) && serve(buffer, (size_t)got)) {
                if (++pages.served_in_a_row >= READ_BY_THREADS_AFTER) read_by_threads();
                continue;
            }
            pages.served_in_a_row = 0;
        }
        /* Before either: an OPEN answered at once may ask too (O_TRUNC, FUSE_OPEN_KILL_SUIDGID). */
        kill_privileges(buffer, (size_t)got);
        if ((size_t)got >= sizeof(struct fuse_in_header) && answer_at_once(buffer, (size_t)got))
            continue;
        return got;
    }
    errno = EINTR;
    return -1;
}

static const struct fuse_custom_io session_io = {
    .writev = killpriv_writev,
    .read = session_read,
};

static void stop_request_threads(struct fuse_session *se);

/* Start the threads on a mounted session: 0, or -1 leaving the session as it was. */
static int start_request_threads(struct fuse_session *se) {
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) < 0) return -1;
    pages.wake_fd = pipe_fds[0];
    pages.signal_fd = pipe_fds[1];
    pages.ended = 0;
    pages.served_in_a_row = 0;
    atomic_store(&pages.mode, READ_BY_LOOP);
    device_fd = fuse_session_fd(se);
    pages.session_fd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event wake = {.events = EPOLLIN, .data.fd = pages.wake_fd};
    struct epoll_event device = {.events = EPOLLIN, .data.fd = device_fd};
    if (pages.session_fd < 0 || set_blocking(0) < 0 ||
        epoll_ctl(pages.session_fd, EPOLL_CTL_ADD, pages.wake_fd, &wake) < 0 ||
        epoll_ctl(pages.session_fd, EPOLL_CTL_ADD, device_fd, &device) < 0) {
        stop_request_threads(NULL);
        return -1;
    }
    atomic_store(&pages.threads_alive, 0);
    for (int i = 0; i < pages.threads_wanted; i++) {
        /* Each thread's buffer before it starts: a thread never fails for want of one. */
        char *buffer = malloc(request_buffer_bytes());
        if (buffer == NULL) break;
        atomic_fetch_add(&pages.threads_alive, 1);
        if (pthread_create(&pages.threads[i], NULL, request_thread, buffer) != 0) {
            atomic_fetch_sub(&pages.threads_alive, 1);
            free(buffer);
            break;
        }
        pthread_setname_np(pages.threads[i], "volfs-requests");
        pages.threads_running++;
    }
    if (pages.threads_running > 0 &&
        libfuse.session_custom_io(se, &session_io, pages.session_fd) == 0)
        return 0;
    stop_request_threads(NULL);
    return -1;
}

/* Stop the threads; with se, give libfuse back /dev/fuse (blocking again) as the session's
 * descriptor. */
static void stop_request_threads(struct fuse_session *se) {
    if (pages.wake_fd < 0) return;
    PyThreadState *saved = PyGILState_Check() ? PyEval_SaveThread() : NULL;
    for (int i = 0; i < pages.threads_running; i++) pthread_cancel(pages.threads[i]);
    for (int i = 0; i < pages.threads_running; i++) pthread_join(pages.threads[i], NULL);
    if (saved != NULL) PyEval_RestoreThread(saved);
    pages.threads_running = 0;
    set_blocking(1);
    /* libfuse closes the descriptor it has (the epoll set) on unmount or destruction; given
     * /dev/fuse back, it closes that instead. */
    if ((se == NULL || libfuse.session_custom_io(se, &killpriv_io, device_fd) == 0) &&
        pages.session_fd >= 0)
        close(pages.session_fd);
    close(pages.wake_fd);
    close(pages.signal_fd);
    pages.session_fd = pages.wake_fd = pages.signal_fd = -1;
    pages.ended = 0;
    device_fd = -1;
    for (handed_t *request = pages.head, *next; request != NULL; request = next) {
        next = request->next;
        free(request);
    }
    pages.head = NULL;
    pages.tail = &pages.head;
    pages.waiting = 0;
}

static void forget_pages(void) {
    Py_CLEAR(pages.table_object);
    pages.table = NULL;
    if (pages.arena.obj != NULL) PyBuffer_Release(&pages.arena);
    pages.arena.obj = NULL;
    if (pages.arena_fd >= 0) close(pages.arena_fd);
    pages.arena_fd = -1;
    if (pages.mapped.obj != NULL) PyBuffer_Release(&pages.mapped);
    pages.mapped.obj = NULL;
    pages.threads_wanted = 0;
}

/* Refuse to create a session libfuse cannot create through this entry point. */
static int missing(const void *function, const char *name) {
    if (function != NULL) return 0;
    fprintf(stderr, "volfs: %s has no %s\n", libfuse.soname ? libfuse.soname : "libfuse",
            name);
    return 1;
}

/* pyfuse3's operations, with the bridge's added and pyfuse3's contained. */
static const struct fuse_lowlevel_ops *bridge_operations(const struct fuse_lowlevel_ops *op,
                                                         size_t op_size) {
    memset(&bridge_ops, 0, sizeof bridge_ops);
    memcpy(&bridge_ops, op, op_size < sizeof bridge_ops ? op_size : sizeof bridge_ops);
    pyfuse3_init = bridge_ops.init;
    bridge_ops.init = bridge_init;
    contain_pyfuse3_operations();
    check_writes();
    bridge_ops.ioctl = bridge_ioctl;
    bridge_ops.fallocate = bridge_fallocate;
    bridge_ops.lseek = bridge_lseek;
    return &bridge_ops;
}

/* Parenthesized: libfuse >= 3.17's header makes fuse_session_new a function-like macro. */
struct fuse_session *(fuse_session_new)(struct fuse_args *args,
                                        const struct fuse_lowlevel_ops *op, size_t op_size,
                                        void *userdata) {
    if (missing((const void *)libfuse.session_new, "fuse_session_new@FUSE_3.0")) return NULL;
    if (creating_session) return libfuse.session_new(args, op, op_size, userdata);
    const struct fuse_lowlevel_ops *ops = bridge_operations(op, op_size);
    creating_session = 1;
    struct fuse_session *se = libfuse.session_new(args, ops, sizeof *ops, userdata);
    creating_session = 0;
    return begin_session(se);
}

struct fuse_session *fuse_session_new_versioned(struct fuse_args *args,
                                                const struct fuse_lowlevel_ops *op,
                                                size_t op_size, struct libfuse_version *version,
                                                void *userdata) {
    if (missing((const void *)libfuse.session_new_versioned,
                "fuse_session_new_versioned@FUSE_3.17"))
        return NULL;
    if (creating_session)
        return libfuse.session_new_versioned(args, op, op_size, version, userdata);
    const struct fuse_lowlevel_ops *ops = bridge_operations(op, op_size);
    creating_session = 1;
    struct fuse_session *se =
        libfuse.session_new_versioned(args, ops, sizeof *ops, version, userdata);
    creating_session = 0;
    return begin_session(se);
}

int fuse_session_mount(struct fuse_session *se, const char *mountpoint) {
    int rc = libfuse.session_mount(se, mountpoint);
    if (rc != 0 || libfuse.session_custom_io == NULL) return rc;
    /* From now on /dev/fuse is read by the request threads, or by libfuse through the
     * killpriv functions. */
    if (pages.threads_wanted > 0 && start_request_threads(se) == 0) return rc;
    if (pages.threads_wanted > 0)
        bridge_log(LOG_LEVEL_WARNING, "cannot start the request threads: every request "
                                      "will be served by Python");
    if (libfuse.session_custom_io(se, &killpriv_io, fuse_session_fd(se)) != 0)
        bridge_log(LOG_LEVEL_WARNING, "cannot read /dev/fuse through the bridge: each write "
                                      "will cost the kernel a security.capability lookup");
    return rc;
}

void fuse_session_unmount(struct fuse_session *se) {
    /* Ended before the unmount closes the device: a reply could otherwise reach a reused fd. */
    end_session(se);
    stop_request_threads(se);
    libfuse.session_unmount(se);
}

void fuse_session_destroy(struct fuse_session *se) {
    /* Ended here too for pyfuse3.close(unmount=False), which skips the unmount. */
    end_session(se);
    stop_request_threads(se);
    libfuse.session_destroy(se);
}

/* -- module functions ------------------------------------------------------------------- */

static int replace_handler(PyObject **slot, PyObject *handler) {
    if (handler != Py_None && !PyCallable_Check(handler)) {
        PyErr_SetString(PyExc_TypeError, "handlers must be callable or None");
        return -1;
    }
    Py_XSETREF(*slot, handler == Py_None ? NULL : Py_NewRef(handler));
    return 0;
}

static PyObject *bridge_set_handlers(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *keywords[] = {"ioctl",           "fallocate", "lseek", "failure",
                               "kill_privileges", "at_once",   NULL};
    PyObject *ioctl = Py_None, *fallocate = Py_None, *lseek = Py_None, *failure = Py_None,
             *kill_privileges = Py_None, *at_once = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOOOO", keywords, &ioctl, &fallocate,
                                     &lseek, &failure, &kill_privileges, &at_once))
        return NULL;
    if (replace_handler(&ioctl_handler, ioctl) < 0 ||
        replace_handler(&fallocate_handler, fallocate) < 0 ||
        replace_handler(&lseek_handler, lseek) < 0 ||
        replace_handler(&failure_handler, failure) < 0 ||
        replace_handler(&kill_privileges_handler, kill_privileges) < 0 ||
        replace_handler(&at_once_handler, at_once) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *bridge_close(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    pthread_mutex_lock(&session_lock);
    struct fuse_session *se = bridge_session;
    pthread_mutex_unlock(&session_lock);
    end_session(se);
    stop_request_threads(se);
    forget_pages();
    Py_CLEAR(ioctl_handler);
    Py_CLEAR(fallocate_handler);
    Py_CLEAR(lseek_handler);
    Py_CLEAR(failure_handler);
    Py_CLEAR(kill_privileges_handler);
    Py_CLEAR(at_once_handler);
    Py_RETURN_NONE;
}

static PyObject *bridge_invalidate_range(PyObject *module, PyObject *args) {
    (void)module;
    unsigned long long ino;
    long long offset, length;
    if (!PyArg_ParseTuple(args, "KLL", &ino, &offset, &length)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    struct fuse_session *se = use_session(ANY_GENERATION);
    if (se == NULL) {
        rc = -ENOTCONN;
    } else {
        rc = fuse_lowlevel_notify_inval_inode(se, (fuse_ino_t)ino, offset, length);
        release_session();
    }
    Py_END_ALLOW_THREADS
    /* ENOENT: the kernel has no such inode cached, so there is nothing to drop. */
    if (rc != 0 && rc != -ENOENT) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/*
 * Drop each (ino, offset, length) of ranges from the kernel's cache, all without the GIL.
 * With discarded, the ranges were purged: the write-back into each while it is dropped is
 * discarded (see "write-back into purged ranges"), its bytes summed there. Returns the
 * (ino, errno) of the ranges the kernel refused, or NULL with an exception set.
 */
static PyObject *invalidate(PyObject *ranges, unsigned long long *discarded) {
    PyObject *sequence = PySequence_Fast(ranges, "ranges must be a sequence");
    if (sequence == NULL) return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    inval_t *work = PyMem_Calloc(count ? (size_t)count : 1, sizeof *work);
    if (work == NULL) {
        Py_DECREF(sequence);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long long ino, offset, length;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sequence, i), "KKK;ranges are "
                              "(ino, offset, length) tuples", &ino, &offset, &length)) {
            PyMem_Free(work);
            Py_DECREF(sequence);
            return NULL;
        }
        if (offset > (unsigned long long)INT64_MAX) offset = INT64_MAX;
        work[i].ino = (fuse_ino_t)ino;
        work[i].offset = (off_t)offset;
        /* A range reaching past the largest offset does not fit an off_t: length 0 asks
         * the kernel for everything from offset on. */
        work[i].length = length > (unsigned long long)INT64_MAX - offset ? 0 : (off_t)length;
    }
    Py_DECREF(sequence);
    drop_t drop = {0};
    /* All of them without the GIL: a loop in Python would take it back between two
     * notifications and hold up the thread serving requests. */
    Py_BEGIN_ALLOW_THREADS
    struct fuse_session *se = use_session(ANY_GENERATION);
    if (discarded != NULL) begin_drop(&drop);
    for (Py_ssize_t i = 0; i < count; i++) {
        int rc = -ENOTCONN;
        if (se != NULL) {
            /* Noted around the notification: the write-back it causes is served, and must be
             * recognised, while it waits. */
            if (discarded != NULL) set_dropping(&drop, 1, &work[i]);
            rc = fuse_lowlevel_notify_inval_inode(se, work[i].ino, work[i].offset,
                                                  work[i].length);
            if (discarded != NULL) set_dropping(&drop, 0, NULL);
        }
        /* ENOENT: the kernel has no such inode cached, so there is nothing to drop. */
        work[i].error = rc == -ENOENT ? 0 : -rc;
    }
    if (discarded != NULL) *discarded = end_drop(&drop);
    if (se != NULL) release_session();
    Py_END_ALLOW_THREADS
    PyObject *failures = PyList_New(0);
    for (Py_ssize_t i = 0; failures != NULL && i < count; i++) {
        if (work[i].error == 0) continue;
        PyObject *failure = Py_BuildValue("Ki", (unsigned long long)work[i].ino, work[i].error);
        if (failure == NULL || PyList_Append(failures, failure) < 0) Py_CLEAR(failures);
        Py_XDECREF(failure);
    }
    PyMem_Free(work);
    return failures;
}

static PyObject *bridge_invalidate_ranges(PyObject *module, PyObject *ranges) {
    (void)module;
    return invalidate(ranges, NULL);
}

static PyObject *bridge_drop_purged_ranges(PyObject *module, PyObject *ranges) {
    (void)module;
    unsigned long long discarded = 0;
    PyObject *failures = invalidate(ranges, &discarded);
    if (failures == NULL) return NULL;
    return Py_BuildValue("KN", discarded, failures);
}

static PyObject *bridge_serve_pages(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *keywords[] = {"table",   "arena",       "arena_fd",    "mapped",
                               "threads", "relatime_ns", "deny_others", NULL};
    PyObject *table;
    Py_buffer arena, mapped;
    int arena_fd;
    int threads;
    long long relatime_ns;
    int deny_others;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Ow*$iw*iLp", keywords, &table, &arena,
                                     &arena_fd, &mapped, &threads, &relatime_ns, &deny_others))
        return NULL;
    const char *refusal = NULL;
    if (threads < 1 || threads > REQUEST_THREADS_MAX)
        refusal = "threads must be between 1 and 16";
    else if (arena.len % PAGE_BYTES != 0)
        refusal = "the arena must be whole pages";
    else if (mapped.len != arena.len / PAGE_BYTES)
        refusal = "mapped must have a byte per page of the arena";
    else if (bridge_session != NULL)
        refusal = "the session is mounted already";
    if (refusal != NULL) {
        PyErr_SetString(PyExc_ValueError, refusal);
        goto fail;
    }
    if (pages.api == NULL && (pages.api = PyCapsule_Import(VOLFS_PAGEMAP_CAPSULE, 0)) == NULL)
        goto fail;
    void *opaque = pages.api->table_of(table);
    if (opaque == NULL) goto fail;
    int own_fd = fcntl(arena_fd, F_DUPFD_CLOEXEC, 0);
    if (own_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    forget_pages();
    pages.arena_fd = own_fd;
    pages.table_object = Py_NewRef(table);
    pages.table = opaque;
    pages.arena = arena;
    pages.arena_pages = arena.len / PAGE_BYTES;
    pages.mapped = mapped;
    pages.relatime = (vf_time_t){.sec = relatime_ns / 1000000000,
                                 .nsec = relatime_ns % 1000000000};
    pages.threads_wanted = threads;
    pages.deny_others = deny_others;
    pages.owner = getuid(); /* as libfuse's session takes it */
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&arena);
    PyBuffer_Release(&mapped);
    return NULL;
}

static PyObject *bridge_served(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return Py_BuildValue("KKKK", atomic_load(&pages.reads), atomic_load(&pages.writes),
                         atomic_load(&pages.handed), atomic_load(&pages.at_once));
}

static PyObject *bridge_active(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    pthread_mutex_lock(&session_lock);
    int active = bridge_session != NULL;
    pthread_mutex_unlock(&session_lock);
    return PyBool_FromLong(active);
}

static PyObject *bridge_libfuse(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return PyUnicode_FromString(libfuse.soname);
}

static PyMethodDef bridge_methods[] = {
    {"set_handlers", (PyCFunction)(void (*)(void))bridge_set_handlers,
     METH_VARARGS | METH_KEYWORDS,
     "set_handlers(*, ioctl=None, fallocate=None, lseek=None, failure=None, "
     "kill_privileges=None, at_once=None): the Python callables for these requests: "
     "ioctl(request, ino, cmd, fh, is_dir, data), fallocate(request, ino, fh, mode, offset, "
     "length), lseek(request, ino, fh, offset, whence). Each must answer its request once; a "
     "missing handler answers ENOTTY, EOPNOTSUPP and ENOSYS respectively. failure(operation, "
     "exception, errno) is told of a request pyfuse3 could not hand to its handler (answered "
     "with that errno); kill_privileges(ino) of a request asking to remove setuid, setgid and "
     "security.capability, before it is processed. With serve_pages(), at_once(opcode, "
     "nodeid, uid, gid, argument) is given LOOKUP, FORGET, GETATTR, UNLINK, OPEN, RELEASE, "
     "CREATE and BATCH_FORGET as the kernel sent them and returns the reply's bytes, an errno, "
     "or None to have pyfuse3 answer the request instead."},
    {"close", bridge_close, METH_NOARGS,
     "close(): end the bridge's session (new requests and invalidations get ENOTCONN; "
     "returns once the calls using it have finished) and drop the handlers."},
    {"invalidate_range", bridge_invalidate_range, METH_VARARGS,
     "invalidate_range(ino, offset, length): drop that byte range from the kernel's page "
     "cache. Blocks while the kernel writes back dirty pages through this daemon: call it "
     "from a worker thread, never from the thread serving requests. Raises OSError "
     "(ENOTCONN once the session is unmounted or destroyed, or was never created)."},
    {"invalidate_ranges", bridge_invalidate_ranges, METH_O,
     "invalidate_ranges(ranges): drop each (ino, offset, length) byte range from the kernel's "
     "page cache, all without the GIL; a range past the largest offset is taken to the end. "
     "Returns the (ino, errno) of the ranges the kernel refused (ENOTCONN for all once the "
     "session has ended). Blocks as invalidate_range does: call it from a worker thread."},
    {"drop_purged_ranges", bridge_drop_purged_ranges, METH_O,
     "drop_purged_ranges(ranges): drop purged (ino, offset, length) byte ranges from the "
     "kernel's page cache as invalidate_ranges does, discarding instead of storing the dirty "
     "pages the kernel writes back wholly inside a range while it drops it. Returns (bytes "
     "discarded, the (ino, errno) of the ranges the kernel refused). Blocks as "
     "invalidate_range does: call it from a worker thread."},
    {"exempt_writeback", bridge_exempt_writeback, METH_VARARGS,
     "exempt_writeback(ino, offset, length): bytes [offset, offset + length) of the inode (0: "
     "to the end) became data again while purged pages of it were on their way out of the "
     "kernel's cache: write-back touching them is stored even while a purged range is "
     "dropped, until end_exemption(ino)."},
    {"end_exemption", bridge_end_exemption, METH_O,
     "end_exemption(ino): the inode's purged pages are out of the cache: forget its "
     "exempt_writeback spans, if any."},
    {"serve_pages", (PyCFunction)(void (*)(void))bridge_serve_pages,
     METH_VARARGS | METH_KEYWORDS,
     "serve_pages(table, arena, *, arena_fd, mapped, threads, relatime_ns, deny_others): "
     "before the mount, have the session read by that many request threads, which serve the "
     "reads and writes of the files in table (a volfs.core._pagemap.PageTable) from arena (the "
     "store's writable mapping), writing with pwrite on arena_fd (its memfd) into pages not "
     "noted in mapped (a byte per page, set as they read them), and hand everything else to "
     "pyfuse3. deny_others, for allow_root: "
     "requests of users other than this process's and root go to libfuse, which refuses "
     "them. Kept until close()."},
    {"served", bridge_served, METH_NOARGS,
     "served(): (reads, writes) served in C, the requests the threads handed to pyfuse3, and "
     "the requests at_once answered."},
    {"active", bridge_active, METH_NOARGS,
     "active(): True from the creation of a FUSE session through the bridge until its "
     "unmount or destruction."},
    {"libfuse", bridge_libfuse, METH_NOARGS,
     "libfuse(): the soname of the libfuse whose session functions the bridge calls."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef bridge_module = {
    PyModuleDef_HEAD_INIT, "volfs.daemon._bridge",
    "FUSE operations pyfuse3 does not expose (see volfs.daemon.bridge).", -1, bridge_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__bridge(void) {
    if (find_libfuse() < 0) return NULL;
    if (PyType_Ready(&RequestType) < 0) return NULL;
    PyObject *module = PyModule_Create(&bridge_module);
    if (module == NULL) return NULL;
    if (PyModule_AddObjectRef(module, "Request", (PyObject *)&RequestType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

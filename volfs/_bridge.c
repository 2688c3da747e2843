/*
 * volfs._bridge: the FUSE operations pyfuse3 does not expose.
 *
 * pyfuse3 builds its struct fuse_lowlevel_ops and passes it to libfuse's fuse_session_new().
 * This module, loaded with RTLD_GLOBAL before pyfuse3, defines fuse_session_new itself: it
 * copies pyfuse3's operations, adds the handlers pyfuse3 lacks, and calls the real function,
 * found with dlvsym() (RTLD_NEXT does not reach past a dlopen'ed library). The session pointer
 * it sees is kept for notifications pyfuse3 only offers for whole inodes.
 *
 * Requests handled here (ioctl, fallocate, lseek) are passed to a Python callable with a
 * Request object, which replies
 * exactly once: from the handler itself, later from a trio task, or from a worker thread. A
 * Request dropped without a reply answers EIO, so a bug can never leave a caller hanging.
 *
 * pyfuse3's own operations are wrapped too (see "contained operations" below), so that a
 * request whose arguments pyfuse3 cannot turn into Python objects (a write's data when the
 * daemon is out of memory) fails alone instead of ending the session.
 */
#define PY_SSIZE_T_CLEAN
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE

#include <Python.h>
#include <structmember.h>
#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <string.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                                const struct fuse_lowlevel_ops *, size_t,
                                                void *);

static struct fuse_session *bridge_session;
static struct fuse_lowlevel_ops bridge_ops;
static void (*pyfuse3_init)(void *, struct fuse_conn_info *);
static PyObject *ioctl_handler;
static PyObject *fallocate_handler;
static PyObject *lseek_handler;

/* -- Request ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    fuse_req_t req;   /* NULL once replied */
    unsigned int uid; /* of the calling process */
    unsigned int gid;
    int pid;
} RequestObject;

static PyTypeObject RequestType;

static int take_request(RequestObject *self, fuse_req_t *req) {
    if (self->req == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "request already answered");
        return -1;
    }
    *req = self->req;
    self->req = NULL;
    return 0;
}

static PyObject *request_reply_ioctl(RequestObject *self, PyObject *args) {
    int result;
    Py_buffer data = {0};
    fuse_req_t req;
    if (!PyArg_ParseTuple(args, "iy*", &result, &data)) return NULL;
    if (take_request(self, &req) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fuse_reply_ioctl(req, result, data.len ? data.buf : NULL, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromLong(rc);
}

static PyObject *request_reply_error(RequestObject *self, PyObject *args) {
    int code;
    fuse_req_t req;
    if (!PyArg_ParseTuple(args, "i", &code)) return NULL;
    if (code <= 0) {
        PyErr_SetString(PyExc_ValueError, "errno must be positive");
        return NULL;
    }
    if (take_request(self, &req) < 0) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fuse_reply_err(req, code);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyObject *request_reply_ok(RequestObject *self, PyObject *unused) {
    (void)unused;
    fuse_req_t req;
    if (take_request(self, &req) < 0) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fuse_reply_err(req, 0);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyObject *request_reply_lseek(RequestObject *self, PyObject *args) {
    long long offset;
    fuse_req_t req;
    if (!PyArg_ParseTuple(args, "L", &offset)) return NULL;
    if (take_request(self, &req) < 0) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fuse_reply_lseek(req, (off_t)offset);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyObject *request_get_answered(RequestObject *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->req == NULL);
}

static void request_dealloc(RequestObject *self) {
    if (self->req != NULL) fuse_reply_err(self->req, EIO);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef request_methods[] = {
    {"reply_ioctl", (PyCFunction)request_reply_ioctl, METH_VARARGS,
     "reply_ioctl(result, data): answer an ioctl with its return value and output bytes."},
    {"reply_error", (PyCFunction)request_reply_error, METH_VARARGS,
     "reply_error(errno): answer with an error."},
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
    {"answered", (getter)request_get_answered, NULL, "True once replied", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "volfs._bridge.Request",
    .tp_basicsize = sizeof(RequestObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A FUSE request awaiting exactly one reply.",
    .tp_dealloc = (destructor)request_dealloc,
    .tp_methods = request_methods,
    .tp_members = request_members,
    .tp_getset = request_getset,
};

/* -- handlers added to pyfuse3's operations ---------------------------------------------- */

static void bridge_init(void *userdata, struct fuse_conn_info *conn) {
    if (pyfuse3_init != NULL) pyfuse3_init(userdata, conn);
    /* VOLFS_IOC_PURGE works on directories too. */
    if (conn->capable & FUSE_CAP_IOCTL_DIR) conn->want |= FUSE_CAP_IOCTL_DIR;
}

/* A Request for req with the caller's credentials, or NULL (req answered ENOMEM). */
static RequestObject *new_request(fuse_req_t req) {
    RequestObject *request = PyObject_New(RequestObject, &RequestType);
    if (request == NULL) {
        PyErr_Clear();
        fuse_reply_err(req, ENOMEM);
        return NULL;
    }
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    request->req = req;
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
    if (flags & FUSE_IOCTL_UNRESTRICTED) {
        fuse_reply_err(req, ENOTTY);
        return;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    if (ioctl_handler == NULL) {
        fuse_reply_err(req, ENOTTY);
    } else {
        RequestObject *request = new_request(req);
        if (request != NULL)
            dispatch(ioctl_handler, request,
                     Py_BuildValue("KIKOy#n", (unsigned long long)ino, cmd,
                                   (unsigned long long)(fi ? fi->fh : 0),
                                   (flags & FUSE_IOCTL_DIR) ? Py_True : Py_False,
                                   in_buf ? (const char *)in_buf : "",
                                   (Py_ssize_t)(in_buf ? in_bufsz : 0), (Py_ssize_t)out_bufsz));
    }
    PyGILState_Release(gil);
}

static void bridge_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                             off_t length, struct fuse_file_info *fi) {
    PyGILState_STATE gil = PyGILState_Ensure();
    if (fallocate_handler == NULL) {
        fuse_reply_err(req, EOPNOTSUPP);
    } else {
        RequestObject *request = new_request(req);
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
        fuse_reply_err(req, ENOSYS);
    } else {
        RequestObject *request = new_request(req);
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
    fuse_reply_err(req, report_failure(operation));
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

/* -- the hook --------------------------------------------------------------------------- */

struct fuse_session *fuse_session_new(struct fuse_args *args,
                                      const struct fuse_lowlevel_ops *op, size_t op_size,
                                      void *userdata) {
    void *libfuse = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_NOLOAD);
    if (libfuse == NULL) libfuse = dlopen("libfuse3.so.3", RTLD_NOW);
    session_new_fn real =
        libfuse ? (session_new_fn)dlvsym(libfuse, "fuse_session_new", "FUSE_3.0") : NULL;
    if (real == NULL) {
        fprintf(stderr, "volfs: cannot find libfuse's fuse_session_new: %s\n", dlerror());
        return NULL;
    }
    memset(&bridge_ops, 0, sizeof bridge_ops);
    memcpy(&bridge_ops, op, op_size < sizeof bridge_ops ? op_size : sizeof bridge_ops);
    pyfuse3_init = bridge_ops.init;
    bridge_ops.init = bridge_init;
    contain_pyfuse3_operations();
    bridge_ops.ioctl = bridge_ioctl;
    bridge_ops.fallocate = bridge_fallocate;
    bridge_ops.lseek = bridge_lseek;
    bridge_session = real(args, &bridge_ops, sizeof bridge_ops, userdata);
    return bridge_session;
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
    static char *keywords[] = {"ioctl", "fallocate", "lseek", "failure", NULL};
    PyObject *ioctl = Py_None, *fallocate = Py_None, *lseek = Py_None, *failure = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOO", keywords, &ioctl, &fallocate,
                                     &lseek, &failure))
        return NULL;
    if (replace_handler(&ioctl_handler, ioctl) < 0 ||
        replace_handler(&fallocate_handler, fallocate) < 0 ||
        replace_handler(&lseek_handler, lseek) < 0 ||
        replace_handler(&failure_handler, failure) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *bridge_invalidate_range(PyObject *module, PyObject *args) {
    (void)module;
    unsigned long long ino;
    long long offset, length;
    if (!PyArg_ParseTuple(args, "KLL", &ino, &offset, &length)) return NULL;
    if (bridge_session == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no FUSE session");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fuse_lowlevel_notify_inval_inode(bridge_session, (fuse_ino_t)ino, offset, length);
    Py_END_ALLOW_THREADS
    /* ENOENT: the kernel has no such inode cached, so there is nothing to drop. */
    if (rc != 0 && rc != -ENOENT) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *bridge_active(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return PyBool_FromLong(bridge_session != NULL);
}

static PyMethodDef bridge_methods[] = {
    {"set_handlers", (PyCFunction)(void (*)(void))bridge_set_handlers,
     METH_VARARGS | METH_KEYWORDS,
     "set_handlers(*, ioctl=None, fallocate=None, lseek=None, failure=None): the Python "
     "callables for these requests: ioctl(request, ino, cmd, fh, is_dir, data, out_size), "
     "fallocate(request, ino, fh, mode, offset, length), lseek(request, ino, fh, offset, "
     "whence). Each must answer its request once; a missing handler answers ENOTTY, "
     "EOPNOTSUPP and ENOSYS respectively. failure(operation, exception, errno) is told of "
     "a request pyfuse3 could not hand to its handler (answered with that errno)."},
    {"invalidate_range", bridge_invalidate_range, METH_VARARGS,
     "invalidate_range(ino, offset, length): drop that byte range from the kernel's page "
     "cache. Blocks while the kernel writes back dirty pages through this daemon: call it "
     "from a worker thread, never from the thread serving requests."},
    {"active", bridge_active, METH_NOARGS,
     "active(): True once a FUSE session was created through the bridge."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef bridge_module = {
    PyModuleDef_HEAD_INIT, "volfs._bridge",
    "FUSE operations pyfuse3 does not expose (see volfs.bridge).", -1, bridge_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__bridge(void) {
    if (PyType_Ready(&RequestType) < 0) return NULL;
    PyObject *module = PyModule_Create(&bridge_module);
    if (module == NULL) return NULL;
    if (PyModule_AddObjectRef(module, "Request", (PyObject *)&RequestType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

/*
 * agentmount.fuse._lowlevel: the parts of libfuse's low-level API that pyfuse3 leaves out.
 *
 * How it gets in. lowlevel.py loads this library with RTLD_GLOBAL before pyfuse3 is
 * imported. pyfuse3 (loaded RTLD_NOW) then binds its calls to fuse_session_new and
 * fuse_session_process_buf to the definitions below, because the global scope is searched
 * before pyfuse3's own dependencies; these call libfuse's versions, found with
 * dlvsym(RTLD_NEXT, name, "FUSE_3.0").
 *
 * What it adds.
 *  1. Lock requests. fuse_session_new copies the ops table pyfuse3 passes and adds getlk,
 *     setlk and flock handlers. Each request gets a token and is handed to a Python
 *     callback (set_lock_handler); Python answers at once or later with reply_err() or
 *     reply_lock(). A request still unanswered when the callback returns gets an interrupt
 *     function, so a signal to a process blocked in fcntl(F_SETLKW) or flock() reaches
 *     Python (interrupt callback), which answers EINTR. Each request is answered exactly
 *     once: the first reply removes its token from the pending list and later replies to the
 *     same token return False; if a callback raises, the request is answered here.
 *  2. The request being dispatched (request()), for Python handlers whose pyfuse3 signature
 *     lacks what they need: lock_owner and flock_release of flush and release (those two
 *     handlers are wrapped), and the kernel's "kill suid/sgid" flags of write, setattr
 *     and open, which libfuse 3.14 does not pass on at all (they are read from the
 *     raw request in fuse_session_process_buf). pyfuse3 starts the Python handler right
 *     after fuse_session_process_buf returns, before it reads another request, so a handler
 *     that calls request() before its first await sees its own request.
 *  3. FUSE_HANDLE_KILLPRIV_V2, when enable_killpriv_v2(True) was called before the kernel's
 *     INIT request and the kernel offers it. The kernel then stops asking for the
 *     security.capability xattr before every write and tells the filesystem instead when
 *     suid/sgid must go (Python does that, see ops.py). libfuse 3.14 predates the flag, so
 *     init installs a pass-through custom io for the session and the INIT reply gets the
 *     flag on its way out. Splice reads are turned off with it: every request must arrive
 *     in memory for the flags to be read.
 *  4. Counts of requests per opcode (op_counts()).
 *  5. While Python says no file carries a security.capability xattr (set_no_capabilities),
 *     the kernel's getxattr of that name (before the first write to a file, at chown) is
 *     answered ENODATA here, without a trip through Python. Python turns it off before the
 *     first such xattr is stored, and never turns it on where other peers could store one.
 *
 * Threads: everything runs on the thread that runs trio and pyfuse3's session loop, which
 * calls fuse_session_process_buf holding the GIL. Nothing here may be called from another
 * thread.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <linux/fuse.h>   /* the kernel protocol: raw request layouts and flags */

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/file.h>
#include <sys/uio.h>
#include <unistd.h>

#define OFFSET_MAX INT64_MAX   /* "to the end of the file" in lock ranges */
#define NOPS 64                /* opcodes counted one by one; larger ones share the last slot */

enum { KIND_GETLK = 0, KIND_SETLK = 1, KIND_FLOCK = 2 };

/* ---- state ------------------------------------------------------------------------- */

static struct fuse_session *(*real_session_new)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                                size_t, void *);
static void (*real_process_buf)(struct fuse_session *, const struct fuse_buf *);

static struct fuse_lowlevel_ops orig_ops;   /* pyfuse3's table, as passed */
static struct fuse_lowlevel_ops our_ops;    /* the table libfuse gets */
static struct fuse_session *session;

static PyObject *lock_cb;        /* lock_cb(token, kind, ino, fh, owner, type, start, end, sleep, pid) */
static PyObject *interrupt_cb;   /* interrupt_cb(token) */

/* The request being dispatched (see request()). */
static struct {
    uint32_t opcode;
    uint64_t unique, nodeid, fh, lock_owner;
    uint32_t uid, gid, pid;
    int kill_suidgid;     /* write/setattr/open: the kernel asks us to drop suid/sgid */
    int flock_release;    /* release: the file's flock locks must go */
} cur;

static unsigned long long op_counts[NOPS];
static int no_capabilities;                 /* see 5. above */
static unsigned long long capability_shortcuts;
static uint64_t kernel_flags;      /* what the kernel's INIT offered (flags | flags2 << 32) */
static unsigned init_capable, init_want;
static int session_hooked, init_seen, want_killpriv_v2, killpriv_v2, patch_init;
static uint64_t init_unique;

/* Lock requests not answered yet: a short list (waiters), searched linearly. */
struct pending {
    struct pending *next;
    uint64_t token;
    fuse_req_t req;
};
static struct pending *pending_head;
static size_t npending;
static uint64_t next_token = 1;

/* Tokens whose requests the kernel interrupted, handed to Python after libfuse is done with
 * the request that carried the news (see on_interrupt). */
static uint64_t *interrupted;
static size_t ninterrupted, cap_interrupted;

/* ---- pending requests -------------------------------------------------------------- */

static struct pending *pending_add(fuse_req_t req)
{
    struct pending *p = malloc(sizeof *p);
    if (p == NULL)
        return NULL;
    p->token = next_token++;
    p->req = req;
    p->next = pending_head;
    pending_head = p;
    npending++;
    return p;
}

static int pending_has(uint64_t token)
{
    for (struct pending *p = pending_head; p; p = p->next)
        if (p->token == token)
            return 1;
    return 0;
}

/* Remove the token's entry and return its request, or NULL when it was answered already. */
static fuse_req_t pending_take(uint64_t token)
{
    for (struct pending **pp = &pending_head; *pp; pp = &(*pp)->next) {
        if ((*pp)->token == token) {
            struct pending *p = *pp;
            fuse_req_t req = p->req;
            *pp = p->next;
            npending--;
            free(p);
            return req;
        }
    }
    return NULL;
}

/* ---- calling Python ---------------------------------------------------------------- */

/* Hand the kernel's interrupts to Python. Called once libfuse has finished the request that
 * carried them, never from inside libfuse: libfuse can call on_interrupt with the request's
 * mutex held and without a reference of its own, so answering it right there could free it
 * under libfuse's feet. */
static void deliver_interrupts(void)
{
    PyGILState_STATE g = PyGILState_Ensure();
    while (ninterrupted > 0) {
        uint64_t token = interrupted[--ninterrupted];
        if (!pending_has(token))
            continue;   /* answered (granted) in the meantime */
        PyObject *r = interrupt_cb ? PyObject_CallFunction(interrupt_cb, "K", (unsigned long long) token) : NULL;
        if (r == NULL) {
            if (PyErr_Occurred())
                PyErr_WriteUnraisable(interrupt_cb);
        } else {
            Py_DECREF(r);
        }
        /* Whatever Python did, an interrupted request must not stay blocked. */
        fuse_req_t req = pending_take(token);
        if (req != NULL)
            fuse_reply_err(req, EINTR);
    }
    PyGILState_Release(g);
}

static void on_interrupt(fuse_req_t req, void *data)
{
    (void) req;
    if (ninterrupted == cap_interrupted) {
        size_t n = cap_interrupted ? 2 * cap_interrupted : 16;
        uint64_t *a = realloc(interrupted, n * sizeof *a);
        if (a == NULL)
            return;   /* out of memory: the request stays blocked until granted */
        interrupted = a;
        cap_interrupted = n;
    }
    interrupted[ninterrupted++] = (uint64_t) (uintptr_t) data;
}

/* Hand one lock request to Python. type is F_RDLCK/F_WRLCK/F_UNLCK, [start, end] inclusive. */
static void dispatch(fuse_req_t req, int kind, fuse_ino_t ino, struct fuse_file_info *fi, int type,
                     int64_t start, int64_t end, int sleep, uint32_t pid)
{
    if (lock_cb == NULL) {
        fuse_reply_err(req, ENOLCK);
        return;
    }
    struct pending *p = pending_add(req);
    if (p == NULL) {
        fuse_reply_err(req, ENOLCK);
        return;
    }
    uint64_t token = p->token;
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *r = PyObject_CallFunction(lock_cb, "KiKKKiLLiI", (unsigned long long) token, kind,
                                        (unsigned long long) ino, (unsigned long long) fi->fh,
                                        (unsigned long long) fi->lock_owner, type, (long long) start,
                                        (long long) end, sleep, pid);
    if (r == NULL) {
        PyErr_WriteUnraisable(lock_cb);
        fuse_req_t left = pending_take(token);
        if (left != NULL)
            fuse_reply_err(left, ENOLCK);
    } else {
        Py_DECREF(r);
        /* Still pending: a waiter. Let a signal to the caller reach Python. If the kernel
         * interrupted it already, on_interrupt runs right here and queues the token. */
        if (pending_has(token))
            fuse_req_interrupt_func(req, on_interrupt, (void *) (uintptr_t) token);
    }
    PyGILState_Release(g);
}

/* ---- the handlers libfuse calls ---------------------------------------------------- */

static void ll_getlk(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, struct flock *lock)
{
    int64_t end = lock->l_len == 0 ? OFFSET_MAX : lock->l_start + lock->l_len - 1;
    dispatch(req, KIND_GETLK, ino, fi, lock->l_type, lock->l_start, end, 0, (uint32_t) lock->l_pid);
}

static void ll_setlk(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, struct flock *lock,
                     int sleep)
{
    int64_t end = lock->l_len == 0 ? OFFSET_MAX : lock->l_start + lock->l_len - 1;
    dispatch(req, KIND_SETLK, ino, fi, lock->l_type, lock->l_start, end, sleep, (uint32_t) lock->l_pid);
}

/* libfuse turns the kernel's flock-flavoured setlk back into LOCK_SH/LOCK_EX/LOCK_UN|LOCK_NB;
 * Python gets lock types like the other two, and the caller's pid (flock carries none). */
static void ll_flock(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, int op)
{
    int base = op & ~LOCK_NB;
    int type = base == LOCK_SH ? F_RDLCK : base == LOCK_EX ? F_WRLCK : F_UNLCK;
    dispatch(req, KIND_FLOCK, ino, fi, type, 0, OFFSET_MAX, !(op & LOCK_NB), fuse_req_ctx(req)->pid);
}

static void ll_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    cur.nodeid = ino;
    cur.fh = fi->fh;
    cur.lock_owner = fi->lock_owner;
    cur.flock_release = 0;
    orig_ops.flush(req, ino, fi);
}

static void ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    cur.nodeid = ino;
    cur.fh = fi->fh;
    cur.lock_owner = fi->lock_owner;
    cur.flock_release = fi->flock_release;
    orig_ops.release(req, ino, fi);
}

static void ll_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    if (no_capabilities && strcmp(name, "security.capability") == 0) {
        capability_shortcuts++;
        fuse_reply_err(req, ENODATA);
        return;
    }
    orig_ops.getxattr(req, ino, name, size);
}

/* Pass-through io, installed only to see the INIT reply go out (FUSE_HANDLE_KILLPRIV_V2). */
static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
    (void) userdata;
    return read(fd, buf, len);
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void) userdata;
    struct fuse_init_out out;
    if (patch_init && count >= 2 && iov[0].iov_len >= sizeof(struct fuse_out_header)) {
        const struct fuse_out_header *h = iov[0].iov_base;
        if (h->unique == init_unique) {
            patch_init = 0;
            if (h->error == 0 && iov[1].iov_len >= offsetof(struct fuse_init_out, flags) + sizeof(out.flags)
                && iov[1].iov_len <= sizeof out) {
                memcpy(&out, iov[1].iov_base, iov[1].iov_len);
                out.flags |= FUSE_HANDLE_KILLPRIV_V2;
                iov[1].iov_base = &out;
                killpriv_v2 = 1;
            }
        }
    }
    return writev(fd, iov, count);
}

static const struct fuse_custom_io passthrough_io = { .writev = io_writev, .read = io_read };

static void ll_init(void *userdata, struct fuse_conn_info *conn)
{
    if (orig_ops.init)
        orig_ops.init(userdata, conn);
    init_seen = 1;
    /* No Python lock handler: leave locking to the kernel (local to this host), as before. */
    if (lock_cb == NULL)
        conn->want &= ~(FUSE_CAP_POSIX_LOCKS | FUSE_CAP_FLOCK_LOCKS);
    /* libfuse asks for FUSE_HANDLE_KILLPRIV (v1) by default: the kernel would then leave suid/sgid
     * to us on write, truncate and chown without saying whether the caller has CAP_FSETID,
     * which makes Linux semantics impossible. v2 says it; without v2 the kernel does it. */
    conn->want &= ~FUSE_CAP_HANDLE_KILLPRIV;
    if (want_killpriv_v2 && (kernel_flags & FUSE_HANDLE_KILLPRIV_V2) && session != NULL
        && fuse_session_custom_io(session, &passthrough_io, fuse_session_fd(session)) == 0) {
        conn->want &= ~FUSE_CAP_SPLICE_READ;
        patch_init = 1;
    }
    init_capable = conn->capable;
    init_want = conn->want;
}

/* ---- the two libfuse functions defined here ---------------------------------------- */

static int resolve_real(void)
{
    if (real_session_new == NULL)
        real_session_new = dlvsym(RTLD_NEXT, "fuse_session_new", "FUSE_3.0");
    if (real_process_buf == NULL)
        real_process_buf = dlvsym(RTLD_NEXT, "fuse_session_process_buf", "FUSE_3.0");
    return real_session_new != NULL && real_process_buf != NULL;
}

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    if (!resolve_real())
        return NULL;
    memset(&orig_ops, 0, sizeof orig_ops);
    memcpy(&orig_ops, op, op_size < sizeof orig_ops ? op_size : sizeof orig_ops);
    our_ops = orig_ops;
    our_ops.init = ll_init;
    our_ops.getlk = ll_getlk;
    our_ops.setlk = ll_setlk;
    our_ops.flock = ll_flock;
    if (orig_ops.flush)
        our_ops.flush = ll_flush;
    if (orig_ops.release)
        our_ops.release = ll_release;
    if (orig_ops.getxattr)
        our_ops.getxattr = ll_getxattr;
    init_seen = killpriv_v2 = patch_init = 0;
    session = real_session_new(args, &our_ops, sizeof our_ops, userdata);
    session_hooked = session != NULL;
    return session;
}

/* Note the request's header and raw flags, then let libfuse dispatch it. */
void fuse_session_process_buf(struct fuse_session *se, const struct fuse_buf *buf)
{
    memset(&cur, 0, sizeof cur);
    if (!(buf->flags & FUSE_BUF_IS_FD) && buf->size >= sizeof(struct fuse_in_header)) {
        const struct fuse_in_header *in = buf->mem;
        const char *arg = (const char *) (in + 1);
        size_t argsize = buf->size - sizeof *in;
        cur.opcode = in->opcode;
        cur.unique = in->unique;
        cur.nodeid = in->nodeid;
        cur.uid = in->uid;
        cur.gid = in->gid;
        cur.pid = in->pid;
        op_counts[in->opcode < NOPS ? in->opcode : NOPS - 1]++;
        switch (in->opcode) {
        case FUSE_WRITE:
            if (argsize >= sizeof(struct fuse_write_in))
                cur.kill_suidgid = !!(((const struct fuse_write_in *) arg)->write_flags & FUSE_WRITE_KILL_SUIDGID);
            break;
        case FUSE_SETATTR:
            if (argsize >= sizeof(struct fuse_setattr_in))
                cur.kill_suidgid = !!(((const struct fuse_setattr_in *) arg)->valid & FATTR_KILL_SUIDGID);
            break;
        case FUSE_OPEN:
            if (argsize >= sizeof(struct fuse_open_in))
                cur.kill_suidgid = !!(((const struct fuse_open_in *) arg)->open_flags & FUSE_OPEN_KILL_SUIDGID);
            break;
        case FUSE_INIT:
            if (argsize >= offsetof(struct fuse_init_in, flags) + sizeof(uint32_t)) {
                const struct fuse_init_in *ii = (const struct fuse_init_in *) arg;
                kernel_flags = ii->flags;
                if ((ii->flags & FUSE_INIT_EXT) && argsize >= offsetof(struct fuse_init_in, flags2) + sizeof(uint32_t))
                    kernel_flags |= (uint64_t) ii->flags2 << 32;
            }
            init_unique = in->unique;
            break;
        }
    }
    real_process_buf(se, buf);
    if (ninterrupted > 0)
        deliver_interrupts();
}

/* ---- the Python module ------------------------------------------------------------- */

static PyObject *py_set_lock_handler(PyObject *self, PyObject *args)
{
    PyObject *req_cb, *intr_cb;
    if (!PyArg_ParseTuple(args, "OO", &req_cb, &intr_cb))
        return NULL;
    if ((req_cb != Py_None && !PyCallable_Check(req_cb)) || (intr_cb != Py_None && !PyCallable_Check(intr_cb))) {
        PyErr_SetString(PyExc_TypeError, "set_lock_handler(request, interrupt): callables or None");
        return NULL;
    }
    Py_CLEAR(lock_cb);
    Py_CLEAR(interrupt_cb);
    if (req_cb != Py_None) {
        Py_INCREF(req_cb);
        lock_cb = req_cb;
    }
    if (intr_cb != Py_None) {
        Py_INCREF(intr_cb);
        interrupt_cb = intr_cb;
    }
    Py_RETURN_NONE;
}

static PyObject *py_reply_err(PyObject *self, PyObject *args)
{
    unsigned long long token;
    int err;
    if (!PyArg_ParseTuple(args, "Ki", &token, &err))
        return NULL;
    fuse_req_t req = pending_take(token);
    if (req == NULL)
        Py_RETURN_FALSE;
    fuse_reply_err(req, err);
    Py_RETURN_TRUE;
}

static PyObject *py_reply_lock(PyObject *self, PyObject *args)
{
    unsigned long long token;
    int type;
    long long start, end;
    unsigned int pid;
    if (!PyArg_ParseTuple(args, "KiLLI", &token, &type, &start, &end, &pid))
        return NULL;
    fuse_req_t req = pending_take(token);
    if (req == NULL)
        Py_RETURN_FALSE;
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = (short) type;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = end >= OFFSET_MAX ? 0 : end - start + 1;
    fl.l_pid = (pid_t) pid;
    fuse_reply_lock(req, &fl);
    Py_RETURN_TRUE;
}

static PyObject *py_pending(PyObject *self, PyObject *noargs)
{
    return PyLong_FromSize_t(npending);
}

static PyObject *py_request(PyObject *self, PyObject *noargs)
{
    return Py_BuildValue("(IKKKIIIiKi)", cur.opcode, (unsigned long long) cur.unique,
                         (unsigned long long) cur.nodeid, (unsigned long long) cur.fh, cur.uid, cur.gid,
                         cur.pid, cur.kill_suidgid, (unsigned long long) cur.lock_owner, cur.flock_release);
}

/* Set *flag from a Python truth value. */
static PyObject *set_flag(int *flag, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    *flag = on;
    Py_RETURN_NONE;
}

static PyObject *py_enable_killpriv_v2(PyObject *self, PyObject *arg)
{
    return set_flag(&want_killpriv_v2, arg);
}

static PyObject *py_set_no_capabilities(PyObject *self, PyObject *arg)
{
    return set_flag(&no_capabilities, arg);
}

static PyObject *py_killpriv_v2(PyObject *self, PyObject *noargs)
{
    return PyBool_FromLong(killpriv_v2);
}

static PyObject *py_info(PyObject *self, PyObject *noargs)
{
    return Py_BuildValue("{s:O,s:O,s:K,s:I,s:I,s:O,s:O,s:n,s:O,s:K}", "session_hooked", session_hooked ? Py_True : Py_False,
                         "init_seen", init_seen ? Py_True : Py_False, "kernel_flags",
                         (unsigned long long) kernel_flags, "capable", init_capable, "want", init_want,
                         "killpriv_v2", killpriv_v2 ? Py_True : Py_False, "lock_handler",
                         lock_cb ? Py_True : Py_False, "pending", (Py_ssize_t) npending,
                         "no_capabilities", no_capabilities ? Py_True : Py_False, "capability_shortcuts",
                         capability_shortcuts);
}

static PyObject *py_op_counts(PyObject *self, PyObject *noargs)
{
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (int i = 0; i < NOPS; i++) {
        if (op_counts[i] == 0)
            continue;
        PyObject *k = PyLong_FromLong(i), *v = PyLong_FromUnsignedLongLong(op_counts[i]);
        if (k == NULL || v == NULL || PyDict_SetItem(d, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}

static PyMethodDef methods[] = {
    {"set_lock_handler", py_set_lock_handler, METH_VARARGS,
     "set_lock_handler(request, interrupt): request(token, kind, ino, fh, owner, type, start, end, sleep, pid) "
     "gets every getlk/setlk/flock request; interrupt(token) is called when the kernel interrupts one still "
     "pending. None, None removes them (the kernel then keeps locks local, from the next mount on)."},
    {"reply_err", py_reply_err, METH_VARARGS,
     "reply_err(token, errno) -> bool: answer a lock request (0 = success); False if it was answered already."},
    {"reply_lock", py_reply_lock, METH_VARARGS,
     "reply_lock(token, type, start, end, pid) -> bool: answer a getlk request; end is inclusive, "
     "OFFSET_MAX for 'to the end'; False if it was answered already."},
    {"pending", py_pending, METH_NOARGS, "pending() -> int: lock requests not answered yet."},
    {"request", py_request, METH_NOARGS,
     "request() -> (opcode, unique, ino, fh, uid, gid, pid, kill_suidgid, lock_owner, flock_release) of the "
     "request being dispatched; fh/lock_owner/flock_release are set for flush and release only."},
    {"enable_killpriv_v2", py_enable_killpriv_v2, METH_O,
     "enable_killpriv_v2(bool): negotiate FUSE_HANDLE_KILLPRIV_V2 at the next INIT if the kernel offers it."},
    {"set_no_capabilities", py_set_no_capabilities, METH_O,
     "set_no_capabilities(bool): while True, getxattr('security.capability') is answered ENODATA "
     "without calling Python (no file has one)."},
    {"killpriv_v2", py_killpriv_v2, METH_NOARGS,
     "killpriv_v2() -> bool: the kernel leaves suid/sgid to us (see killpriv.py)."},
    {"info", py_info, METH_NOARGS, "info() -> dict: whether the session was hooked, what INIT negotiated."},
    {"op_counts", py_op_counts, METH_NOARGS, "op_counts() -> {opcode: requests seen} (opcodes >= 63 share 63)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lowlevel",
    "libfuse low-level hooks for pyfuse3: lock requests, flush/release lock owners, kill-suid/sgid flags.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__lowlevel(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (!resolve_real()) {
        PyErr_SetString(PyExc_ImportError, "libfuse3 (FUSE_3.0) not found behind agentmount.fuse._lowlevel");
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "KIND_GETLK", KIND_GETLK);
    PyModule_AddIntConstant(m, "KIND_SETLK", KIND_SETLK);
    PyModule_AddIntConstant(m, "KIND_FLOCK", KIND_FLOCK);
    PyModule_AddObject(m, "OFFSET_MAX", PyLong_FromLongLong(OFFSET_MAX));
    PyModule_AddIntConstant(m, "FUSE_SETATTR", FUSE_SETATTR);
    PyModule_AddIntConstant(m, "FUSE_OPEN", FUSE_OPEN);
    PyModule_AddIntConstant(m, "FUSE_WRITE", FUSE_WRITE);
    PyModule_AddIntConstant(m, "FUSE_RELEASE", FUSE_RELEASE);
    PyModule_AddIntConstant(m, "FUSE_GETXATTR", FUSE_GETXATTR);
    PyModule_AddIntConstant(m, "FUSE_FLUSH", FUSE_FLUSH);
    return m;
}

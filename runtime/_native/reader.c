/* flashmoe.runtime._native_reader: a persistent pthread pool of scatter reads (preadv).
 *
 * Pool.submit(requests) converts a sequence of ReadRequest (or (fd, offset, buffers, path) tuples) into
 * one C array of jobs + iovecs, holding a Py_buffer view of every destination until the batch ends, and
 * queues it; Batch.wait() releases the GIL until every job finished, then raises the first error (in
 * request order) as flashmoe.runtime.reader.ReadError. No Python code runs per read.
 *
 * Hot path per request: 1 preadv (+1 per short read / EINTR), 0 copies (the kernel writes straight into
 * the caller's buffers), 1 pool-mutex round trip (claim the next job and retire the previous one together).
 * Per batch: 1 mutex + 1 broadcast to wake workers, 1 broadcast when the last job retires, and one
 * fcntl(F_GETFL) per distinct fd (to validate O_DIRECT alignment before anything is issued).
 *
 * Device copies (MLX's CUDA backend, see metal/cuda.py): a request may carry a fifth element, packed
 * uint64 triples (device address, host address, bytes). The worker that read the request then queues
 * those host -> device copies (cuMemcpyHtoDAsync) on its own CUDA stream and syncs it before the job
 * retires, so the DMA of one chunk overlaps the reads of the others. libcuda is found with dlopen at
 * Pool.set_device(context); nothing CUDA is linked. Per request: +1 driver call per triple, +1 sync.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

#define EOF_ERR (-1)  /* job.err value for "end of file before the buffers were full" */
#define CUDA_ERR (-2) /* job.err value for "a device copy failed" (job.cuerr holds the CUresult) */

/* The few CUDA driver entry points the device copies need (resolved with dlsym, never linked). */
typedef int (*cu_ctx_set_current_t)(void *ctx);
typedef int (*cu_stream_create_t)(void **stream, unsigned flags);
typedef int (*cu_stream_sync_t)(void *stream);
typedef int (*cu_memcpy_htod_async_t)(unsigned long long dst, const void *src, size_t n, void *stream);
typedef int (*cu_error_string_t)(int rc, const char **msg);
static struct {
    cu_ctx_set_current_t ctx_set_current;
    cu_stream_create_t stream_create;
    cu_stream_sync_t stream_sync;
    cu_memcpy_htod_async_t memcpy_htod_async;
    cu_error_string_t error_string;
} cu;
static __thread void *tls_stream; /* this worker's copy stream (created on its first device job) */
static __thread void *tls_ctx;

static PyObject *ReadError; /* flashmoe.runtime.reader.ReadError */
static PyObject *str_fd, *str_offset, *str_buffers, *str_path;

typedef struct {
    int fd;
    int iovcnt;
    off_t offset;
    struct iovec *iov; /* into the batch's iovec array; advanced in place on short reads */
    size_t length;
    size_t done; /* bytes read when an error stopped the job */
    int err;     /* 0, an errno, EOF_ERR or CUDA_ERR */
    int cuerr;   /* the CUresult when err == CUDA_ERR */
    const unsigned long long *copies; /* (device, host, bytes) triples to copy after the read */
    Py_ssize_t ncopies;
    int retired; /* the job ended (pool mutex): what Batch.wait_for waits on */
} Job;

typedef struct Pool Pool;

typedef struct BatchObject {
    PyObject_HEAD
    Pool *pool;           /* borrowed C struct; the Python pool object is held in owner */
    PyObject *owner;      /* the PoolObject, kept alive until the batch ends */
    PyObject *requests;   /* the request sequence (for paths in error messages) */
    Job *jobs;
    Py_ssize_t njobs;
    Py_ssize_t next;      /* next job to claim (pool mutex) */
    Py_ssize_t remaining; /* jobs not yet retired (pool mutex) */
    struct iovec *iovs;
    unsigned long long *copies; /* every job's copy triples, back to back */
    Py_buffer *views;
    Py_ssize_t nviews;
    struct BatchObject *qnext; /* pool queue link (pool mutex) */
    int released;              /* views released, errors collected */
    Py_ssize_t failed;         /* index of the first failed job, or -1 */
} BatchObject;

struct Pool {
    pthread_mutex_t mu;
    pthread_cond_t work; /* a batch was queued, or shutdown */
    pthread_cond_t done; /* some batch retired its last job */
    BatchObject *head, *tail;
    pthread_t *threads;
    int nthreads;
    int shutdown;
    int partial_waiters; /* threads in Batch.wait_for: every retired job broadcasts `done` */
    void *cuda_ctx;      /* the CUDA context device copies run in (Pool.set_device) */
};

typedef struct {
    PyObject_HEAD
    Pool *pool;
    long direct_alignment;
    int closed;
} PoolObject;

static PyTypeObject BatchType;
static PyTypeObject PoolType;

/* ---- worker side (no GIL) ------------------------------------------------------------------- */

static void run_job(Job *j)
{
    struct iovec *iov = j->iov;
    int cnt = j->iovcnt;
    size_t done = 0;
    while (cnt > 0) {
        ssize_t n = preadv(j->fd, iov, cnt > IOV_MAX ? IOV_MAX : cnt, j->offset + (off_t)done);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            j->err = errno;
            j->done = done;
            return;
        }
        if (n == 0) {
            j->err = EOF_ERR;
            j->done = done;
            return;
        }
        done += (size_t)n;
        /* short read: drop the filled iovecs and trim the partly filled one */
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
}

/* Queue the job's host -> device copies on this worker's stream and wait for them. */
static void run_copies(Job *j, void *ctx)
{
    int rc = 0;
    if (tls_ctx != ctx) {
        rc = cu.ctx_set_current(ctx);
        if (rc == 0 && tls_stream == NULL)
            rc = cu.stream_create(&tls_stream, 1 /* CU_STREAM_NON_BLOCKING */);
        if (rc == 0)
            tls_ctx = ctx;
    }
    for (Py_ssize_t i = 0; rc == 0 && i < j->ncopies; i++) {
        const unsigned long long *c = &j->copies[3 * i];
        rc = cu.memcpy_htod_async(c[0], (const void *)(uintptr_t)c[1], (size_t)c[2], tls_stream);
    }
    if (rc == 0)
        rc = cu.stream_sync(tls_stream);
    if (rc != 0) {
        j->err = CUDA_ERR;
        j->cuerr = rc;
        j->done = j->length;
    }
}

static void *worker(void *arg)
{
    Pool *p = (Pool *)arg;
    BatchObject *finished = NULL; /* batch of the job this thread just ran */
    Job *ran = NULL;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        if (finished != NULL) {
            ran->retired = 1;
            if (--finished->remaining == 0 || p->partial_waiters > 0)
                pthread_cond_broadcast(&p->done);
            finished = NULL;
        }
        while (p->head == NULL && !p->shutdown)
            pthread_cond_wait(&p->work, &p->mu);
        if (p->head == NULL)
            break; /* shutdown and the queue is drained */
        BatchObject *b = p->head;
        Job *j = &b->jobs[b->next++];
        if (b->next == b->njobs) {
            p->head = b->qnext;
            if (p->head == NULL)
                p->tail = NULL;
        }
        pthread_mutex_unlock(&p->mu);
        run_job(j);
        if (j->err == 0 && j->ncopies > 0)
            run_copies(j, p->cuda_ctx);
        finished = b;
        ran = j;
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* Let the workers drain the queue, then join them. The struct stays valid: batches may still wait on it. */
static void pool_stop(Pool *p)
{
    pthread_mutex_lock(&p->mu);
    if (p->shutdown) {
        pthread_mutex_unlock(&p->mu);
        return;
    }
    p->shutdown = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
}

static void pool_free(Pool *p)
{
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->done);
    PyMem_RawFree(p->threads);
    PyMem_RawFree(p);
}

/* ---- Batch ---------------------------------------------------------------------------------- */

/* Block (GIL released) until every job of b retired. */
static void batch_block(BatchObject *b)
{
    Pool *p = b->pool;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&p->mu);
    while (b->remaining > 0)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
    Py_END_ALLOW_THREADS
}

/* After completion (GIL held): release the buffer views, note the first error. */
static void batch_release(BatchObject *b)
{
    if (b->released)
        return;
    b->released = 1;
    for (Py_ssize_t i = 0; i < b->nviews; i++)
        PyBuffer_Release(&b->views[i]);
    b->nviews = 0;
    for (Py_ssize_t i = 0; i < b->njobs; i++) {
        if (b->jobs[i].err != 0) {
            b->failed = i;
            break;
        }
    }
    Py_CLEAR(b->owner);
}

static PyObject *request_path(PyObject *req)
{
    PyObject *path = NULL;
    if (PyTuple_Check(req)) {
        if (PyTuple_GET_SIZE(req) > 3) {
            path = PyTuple_GET_ITEM(req, 3);
            Py_INCREF(path);
        }
    } else {
        path = PyObject_GetAttr(req, str_path);
    }
    if (path == NULL) {
        PyErr_Clear();
        path = PyUnicode_FromString("?");
    }
    return path;
}

static PyObject *raise_job_error(BatchObject *b, Py_ssize_t i)
{
    Job *j = &b->jobs[i];
    PyObject *req = PySequence_Fast_GET_ITEM(b->requests, i);
    PyObject *path = request_path(req);
    if (path == NULL)
        return NULL;
    PyObject *msg;
    int code;
    if (j->err == CUDA_ERR) {
        const char *what = NULL;
        if (cu.error_string == NULL || cu.error_string(j->cuerr, &what) != 0 || what == NULL)
            what = "unknown CUDA error";
        code = EIO;
        msg = PyUnicode_FromFormat("device copy after the read of %zu bytes at offset %lld from %S "
                                   "failed: CUDA error %d (%s)",
                                   j->length, (long long)j->offset, path, j->cuerr, what);
    } else if (j->err == EOF_ERR) {
        code = EIO;
        msg = PyUnicode_FromFormat("read of %zu bytes at offset %lld from %S: end of file after %zu bytes",
                                   j->length, (long long)j->offset, path, j->done);
    } else {
        code = j->err;
        msg = PyUnicode_FromFormat("read of %zu bytes at offset %lld from %S failed: %s", j->length,
                                   (long long)j->offset, path, strerror(j->err));
    }
    Py_DECREF(path);
    if (msg == NULL)
        return NULL;
    PyObject *exc = PyObject_CallFunction(ReadError, "iN", code, msg);
    if (exc != NULL) {
        PyErr_SetObject(ReadError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *Batch_wait(BatchObject *b, PyObject *Py_UNUSED(ignored))
{
    if (!b->released) {
        batch_block(b);
        batch_release(b);
    }
    if (b->failed >= 0)
        return raise_job_error(b, b->failed);
    Py_RETURN_NONE;
}

/* Parse (start, stop) for the method `name`: a range of the batch's jobs. 0 on success. */
static int parse_range(BatchObject *b, PyObject *args, const char *name, Py_ssize_t *start,
                       Py_ssize_t *stop)
{
    if (!PyArg_ParseTuple(args, "nn", start, stop))
        return -1;
    if (*start < 0 || *stop > b->njobs || *start > *stop) {
        PyErr_Format(PyExc_IndexError, "%s(%zd, %zd) on a batch of %zd requests", name, *start,
                     *stop, b->njobs);
        return -1;
    }
    return 0;
}

/* wait_for(start, stop): block (GIL released) until jobs [start, stop) retired; raise the first
 * error among them. The others stay in flight and the buffers stay held until the whole batch ends. */
static PyObject *Batch_wait_for(BatchObject *b, PyObject *args)
{
    Py_ssize_t start, stop;
    if (parse_range(b, args, "wait_for", &start, &stop) < 0)
        return NULL;
    if (!b->released && b->pool != NULL) {
        Pool *p = b->pool;
        int all_done;
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&p->mu);
        p->partial_waiters++;
        for (Py_ssize_t i = start; i < stop; i++)
            while (!b->jobs[i].retired)
                pthread_cond_wait(&p->done, &p->mu);
        p->partial_waiters--;
        all_done = b->remaining == 0;
        pthread_mutex_unlock(&p->mu);
        Py_END_ALLOW_THREADS
        if (all_done)
            batch_release(b);
    }
    for (Py_ssize_t i = start; i < stop; i++)
        if (b->jobs[i].err != 0)
            return raise_job_error(b, i);
    Py_RETURN_NONE;
}

/* done_for(start, stop): whether jobs [start, stop) have retired (does not block): their reads,
 * and device copies, are finished, so wait_for(start, stop) would return at once. */
static PyObject *Batch_done_for(BatchObject *b, PyObject *args)
{
    Py_ssize_t start, stop;
    int done = 1;
    if (parse_range(b, args, "done_for", &start, &stop) < 0)
        return NULL;
    if (b->released || b->pool == NULL)
        Py_RETURN_TRUE;
    pthread_mutex_lock(&b->pool->mu);
    for (Py_ssize_t i = start; done && i < stop; i++)
        done = b->jobs[i].retired;
    pthread_mutex_unlock(&b->pool->mu);
    return PyBool_FromLong(done);
}

static PyObject *Batch_done(BatchObject *b, PyObject *Py_UNUSED(ignored))
{
    Pool *p = b->pool;
    int done;
    if (b->released)
        Py_RETURN_TRUE;
    pthread_mutex_lock(&p->mu);
    done = b->remaining == 0;
    pthread_mutex_unlock(&p->mu);
    return PyBool_FromLong(done);
}

static void Batch_dealloc(BatchObject *b)
{
    /* workers may still write into the buffers: never release them early */
    if (!b->released && b->pool != NULL) {
        batch_block(b);
        batch_release(b);
    }
    Py_XDECREF(b->requests);
    Py_XDECREF(b->owner);
    PyMem_Free(b->jobs);
    PyMem_Free(b->iovs);
    PyMem_Free(b->copies);
    PyMem_Free(b->views);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

static PyObject *Batch_len(BatchObject *b, void *Py_UNUSED(c)) { return PyLong_FromSsize_t(b->njobs); }

static PyMethodDef Batch_methods[] = {
    {"wait", (PyCFunction)Batch_wait, METH_NOARGS,
     "Block (GIL released) until every read finished; raise the first error as ReadError."},
    {"wait_for", (PyCFunction)Batch_wait_for, METH_VARARGS,
     "wait_for(start, stop): block (GIL released) until requests [start, stop) finished; raise the "
     "first error among them as ReadError. The rest stay in flight."},
    {"done", (PyCFunction)Batch_done, METH_NOARGS, "True when every read finished (does not block)."},
    {"done_for", (PyCFunction)Batch_done_for, METH_VARARGS,
     "done_for(start, stop): True when requests [start, stop) finished (does not block)."},
    {NULL},
};

static PyGetSetDef Batch_getset[] = {
    {"size", (getter)Batch_len, NULL, "number of requests", NULL},
    {NULL},
};

static PyTypeObject BatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flashmoe.runtime._native_reader.Batch",
    .tp_basicsize = sizeof(BatchObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A submitted batch of reads.",
    .tp_dealloc = (destructor)Batch_dealloc,
    .tp_methods = Batch_methods,
    .tp_getset = Batch_getset,
};

/* ---- Pool ----------------------------------------------------------------------------------- */

static int direct_error(PyObject *req, size_t length, long long offset, const char *what)
{
    PyObject *path = request_path(req);
    if (path == NULL)
        return -1;
    PyObject *msg = PyUnicode_FromFormat("O_DIRECT read of %zu bytes at offset %lld from %S: %s", length,
                                         offset, path, what);
    Py_DECREF(path);
    if (msg == NULL)
        return -1;
    PyObject *exc = PyObject_CallFunction(ReadError, "iN", EINVAL, msg);
    if (exc != NULL) {
        PyErr_SetObject(ReadError, exc);
        Py_DECREF(exc);
    }
    return -1;
}

/* Fetch (fd, offset, buffers) of one request: a ReadRequest or a (fd, offset, buffers[, path]) tuple. */
static int unpack_request(PyObject *req, int *fd, long long *offset, PyObject **bufs, PyObject **copies)
{
    PyObject *ofd, *ooff, *obufs;
    *copies = NULL;
    if (PyTuple_Check(req)) {
        if (PyTuple_GET_SIZE(req) < 3) {
            PyErr_SetString(PyExc_TypeError, "a request tuple is (fd, offset, buffers[, path])");
            return -1;
        }
        ofd = PyTuple_GET_ITEM(req, 0);
        ooff = PyTuple_GET_ITEM(req, 1);
        obufs = PyTuple_GET_ITEM(req, 2);
        if (PyTuple_GET_SIZE(req) > 4 && PyTuple_GET_ITEM(req, 4) != Py_None) {
            *copies = PyTuple_GET_ITEM(req, 4);
            Py_INCREF(*copies);
        }
        Py_INCREF(ofd);
        Py_INCREF(ooff);
        Py_INCREF(obufs);
    } else {
        ofd = PyObject_GetAttr(req, str_fd);
        ooff = PyObject_GetAttr(req, str_offset);
        obufs = PyObject_GetAttr(req, str_buffers);
    }
    int ok = ofd && ooff && obufs;
    if (ok) {
        long lfd = PyLong_AsLong(ofd);
        *fd = (int)lfd;
        *offset = PyLong_AsLongLong(ooff);
        ok = !PyErr_Occurred();
        if (ok && (lfd < 0 || lfd > INT_MAX)) {
            PyErr_SetString(PyExc_ValueError, "bad file descriptor number");
            ok = 0;
        }
        if (ok && *offset < 0) {
            PyErr_SetString(PyExc_ValueError, "negative read offset");
            ok = 0;
        }
    }
    Py_XDECREF(ofd);
    Py_XDECREF(ooff);
    if (ok)
        *bufs = PySequence_Fast(obufs, "ReadRequest.buffers must be a sequence of writable buffers");
    Py_XDECREF(obufs);
    return ok && *bufs != NULL ? 0 : -1;
}

static PyObject *Pool_submit(PoolObject *self, PyObject *arg)
{
    if (self->closed) {
        PyErr_SetString(PyExc_ValueError, "submit on a closed reader");
        return NULL;
    }
    PyObject *reqs = PySequence_Fast(arg, "submit() takes a sequence of ReadRequest");
    if (reqs == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(reqs);
    BatchObject *b = PyObject_New(BatchObject, &BatchType);
    if (b == NULL) {
        Py_DECREF(reqs);
        return NULL;
    }
    b->pool = NULL; /* set once the views are held: dealloc must not block before */
    b->owner = NULL;
    b->requests = reqs;
    b->jobs = NULL;
    b->njobs = n;
    b->next = 0;
    b->remaining = n;
    b->iovs = NULL;
    b->copies = NULL;
    b->views = NULL;
    b->nviews = 0;
    b->qnext = NULL;
    b->released = 0;
    b->failed = -1;

    /* pass 1: unpack the requests, count the buffers and copy triples */
    PyObject **bufseqs = PyMem_Calloc(n ? n : 1, sizeof(PyObject *));
    PyObject **copyobjs = PyMem_Calloc(n ? n : 1, sizeof(PyObject *));
    b->jobs = PyMem_Calloc(n ? n : 1, sizeof(Job));
    if (bufseqs == NULL || copyobjs == NULL || b->jobs == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    Py_ssize_t nbufs = 0, ntriples = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        long long off;
        if (unpack_request(PySequence_Fast_GET_ITEM(reqs, i), &b->jobs[i].fd, &off, &bufseqs[i],
                           &copyobjs[i]) < 0)
            goto fail;
        b->jobs[i].offset = (off_t)off;
        nbufs += PySequence_Fast_GET_SIZE(bufseqs[i]);
        if (copyobjs[i] != NULL) {
            if (self->pool->cuda_ctx == NULL) {
                PyErr_SetString(PyExc_ValueError, "a request has device copies but set_device() was not called");
                goto fail;
            }
            Py_buffer cv;
            if (PyObject_GetBuffer(copyobjs[i], &cv, PyBUF_C_CONTIGUOUS) < 0)
                goto fail;
            Py_ssize_t len = cv.len;
            PyBuffer_Release(&cv);
            if (len % (Py_ssize_t)(3 * sizeof(unsigned long long))) {
                PyErr_SetString(PyExc_ValueError, "device copies must be packed uint64 triples");
                goto fail;
            }
            b->jobs[i].ncopies = len / (Py_ssize_t)(3 * sizeof(unsigned long long));
            ntriples += b->jobs[i].ncopies;
        }
    }
    if (ntriples) {
        b->copies = PyMem_Calloc((size_t)ntriples * 3, sizeof(unsigned long long));
        if (b->copies == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        Py_ssize_t at = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (copyobjs[i] == NULL)
                continue;
            Py_buffer cv;
            if (PyObject_GetBuffer(copyobjs[i], &cv, PyBUF_C_CONTIGUOUS) < 0)
                goto fail;
            memcpy(&b->copies[3 * at], cv.buf, (size_t)b->jobs[i].ncopies * 3 * sizeof(unsigned long long));
            PyBuffer_Release(&cv);
            b->jobs[i].copies = &b->copies[3 * at];
            at += b->jobs[i].ncopies;
        }
    }
    /* pass 2: a writable contiguous view and one iovec per non-empty buffer */
    b->views = PyMem_Calloc(nbufs ? nbufs : 1, sizeof(Py_buffer));
    b->iovs = PyMem_Calloc(nbufs ? nbufs : 1, sizeof(struct iovec));
    if (b->views == NULL || b->iovs == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    int last_fd = -1, last_direct = 0;
    long align = self->direct_alignment;
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Job *j = &b->jobs[i];
        PyObject *seq = bufseqs[i];
        Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
        j->iov = &b->iovs[k];
        for (Py_ssize_t t = 0; t < m; t++) {
            Py_buffer *v = &b->views[b->nviews];
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, t), v, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
                goto fail;
            b->nviews++;
            if (v->len == 0)
                continue; /* a zero-length iovec would make a later preadv return 0 (false EOF) */
            b->iovs[k].iov_base = v->buf;
            b->iovs[k].iov_len = (size_t)v->len;
            j->length += (size_t)v->len;
            j->iovcnt++;
            k++;
        }
#ifdef O_DIRECT
        if (j->fd != last_fd) {
            int fl = fcntl(j->fd, F_GETFL);
            last_fd = j->fd;
            last_direct = fl >= 0 && (fl & O_DIRECT); /* a bad fd fails in preadv, reported by wait() */
        }
        if (last_direct && align > 1) {
            PyObject *req = PySequence_Fast_GET_ITEM(reqs, i);
            char what[160];
            if ((long long)j->offset % align) {
                snprintf(what, sizeof what, "offset is not a multiple of %ld", align);
                direct_error(req, j->length, (long long)j->offset, what);
                goto fail;
            }
            for (int t = 0; t < j->iovcnt; t++) {
                if ((uintptr_t)j->iov[t].iov_base % (uintptr_t)align) {
                    snprintf(what, sizeof what, "buffer %d address %p is not %ld-byte aligned", t,
                             j->iov[t].iov_base, align);
                    direct_error(req, j->length, (long long)j->offset, what);
                    goto fail;
                }
                if (j->iov[t].iov_len % (size_t)align) {
                    snprintf(what, sizeof what, "buffer %d length %zu is not a multiple of %ld", t,
                             j->iov[t].iov_len, align);
                    direct_error(req, j->length, (long long)j->offset, what);
                    goto fail;
                }
            }
        }
#else
        (void)last_fd, (void)last_direct, (void)align;
#endif
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_DECREF(bufseqs[i]);
        Py_XDECREF(copyobjs[i]);
    }
    PyMem_Free(bufseqs);
    PyMem_Free(copyobjs);
    bufseqs = NULL;
    copyobjs = NULL;

    Pool *p = self->pool;
    b->pool = p;
    b->owner = (PyObject *)self;
    Py_INCREF(self);
    if (n == 0)
        return (PyObject *)b;
    pthread_mutex_lock(&p->mu);
    if (p->tail)
        p->tail->qnext = b;
    else
        p->head = b;
    p->tail = b;
    /* wake only as many workers as there are jobs */
    if (n >= p->nthreads)
        pthread_cond_broadcast(&p->work);
    else
        for (Py_ssize_t i = 0; i < n; i++)
            pthread_cond_signal(&p->work);
    pthread_mutex_unlock(&p->mu);
    return (PyObject *)b;

fail:
    if (bufseqs != NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            Py_XDECREF(bufseqs[i]);
        PyMem_Free(bufseqs);
    }
    if (copyobjs != NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            Py_XDECREF(copyobjs[i]);
        PyMem_Free(copyobjs);
    }
    for (Py_ssize_t i = 0; i < b->nviews; i++)
        PyBuffer_Release(&b->views[i]);
    b->nviews = 0;
    b->released = 1;
    Py_DECREF(b);
    return NULL;
}

/* set_device(context): run requests' device copies in this CUDA context (a CUcontext address). */
static PyObject *Pool_set_device(PoolObject *self, PyObject *arg)
{
    unsigned long long ctx = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (cu.memcpy_htod_async == NULL) {
        void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (lib == NULL) {
            PyErr_Format(PyExc_OSError, "cannot load libcuda.so.1: %s", dlerror());
            return NULL;
        }
        cu.ctx_set_current = (cu_ctx_set_current_t)dlsym(lib, "cuCtxSetCurrent");
        cu.stream_create = (cu_stream_create_t)dlsym(lib, "cuStreamCreate");
        cu.stream_sync = (cu_stream_sync_t)dlsym(lib, "cuStreamSynchronize");
        cu.error_string = (cu_error_string_t)dlsym(lib, "cuGetErrorString");
        cu.memcpy_htod_async = (cu_memcpy_htod_async_t)dlsym(lib, "cuMemcpyHtoDAsync_v2");
        if (!cu.ctx_set_current || !cu.stream_create || !cu.stream_sync || !cu.memcpy_htod_async) {
            cu.memcpy_htod_async = NULL;
            PyErr_SetString(PyExc_OSError, "libcuda.so.1 lacks the driver functions device copies need");
            return NULL;
        }
    }
    pthread_mutex_lock(&self->pool->mu);
    self->pool->cuda_ctx = (void *)(uintptr_t)ctx;
    pthread_mutex_unlock(&self->pool->mu);
    Py_RETURN_NONE;
}

static PyObject *Pool_close(PoolObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->closed) {
        self->closed = 1;
        Pool *p = self->pool;
        Py_BEGIN_ALLOW_THREADS
        pool_stop(p); /* workers drain queued batches first; freed in dealloc (batches reference it) */
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static int Pool_init(PoolObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"threads", "direct_alignment", NULL};
    int threads = 8;
    long align = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|il", kwlist, &threads, &align))
        return -1;
    if (threads < 1 || threads > 256) {
        PyErr_SetString(PyExc_ValueError, "threads must be in 1..256");
        return -1;
    }
    if (self->pool != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Pool already initialised");
        return -1;
    }
    Pool *p = PyMem_RawCalloc(1, sizeof(Pool));
    if (p == NULL || (p->threads = PyMem_RawCalloc(threads, sizeof(pthread_t))) == NULL) {
        PyMem_RawFree(p);
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
    for (int i = 0; i < threads; i++) {
        int rc = pthread_create(&p->threads[i], NULL, worker, p);
        if (rc != 0) {
            p->nthreads = i;
            pool_stop(p);
            pool_free(p);
            errno = rc;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        p->nthreads = i + 1;
    }
    self->pool = p;
    self->direct_alignment = align;
    self->closed = 0;
    return 0;
}

static void Pool_dealloc(PoolObject *self)
{
    /* unwaited batches hold a reference to the pool object, so none is pending here */
    if (self->pool != NULL) {
        self->closed = 1;
        pool_stop(self->pool);
        pool_free(self->pool);
        self->pool = NULL;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Pool_threads(PoolObject *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(self->pool && !self->closed ? self->pool->nthreads : 0);
}

static PyMethodDef Pool_methods[] = {
    {"submit", (PyCFunction)Pool_submit, METH_O,
     "Queue a batch of ReadRequest (or (fd, offset, buffers, path) tuples); return a Batch."},
    {"close", (PyCFunction)Pool_close, METH_NOARGS, "Finish queued batches and stop the workers."},
    {"set_device", (PyCFunction)Pool_set_device, METH_O,
     "set_device(context): run requests' (device, host, bytes) copies in this CUDA context."},
    {NULL},
};

static PyGetSetDef Pool_getset[] = {
    {"threads", (getter)Pool_threads, NULL, "worker threads", NULL},
    {NULL},
};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flashmoe.runtime._native_reader.Pool",
    .tp_basicsize = sizeof(PoolObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pool(threads=8, direct_alignment=4096): persistent pthread pool of preadv workers.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pool_init,
    .tp_dealloc = (destructor)Pool_dealloc,
    .tp_methods = Pool_methods,
    .tp_getset = Pool_getset,
};

/* ---- module functions ----------------------------------------------------------------------- */

/* preadv_loop(fd, buffer, offsets): read len(buffer) bytes at each offset in the calling thread, GIL
 * released, no pool. A baseline for the pool's per-read overhead (bench only). Returns bytes read. */
static PyObject *preadv_loop(PyObject *Py_UNUSED(mod), PyObject *args)
{
    int fd;
    Py_buffer buf, offs;
    if (!PyArg_ParseTuple(args, "iw*y*", &fd, &buf, &offs))
        return NULL;
    const long long *o = (const long long *)offs.buf;
    Py_ssize_t n = offs.len / (Py_ssize_t)sizeof(long long);
    long long total = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        struct iovec iov = {buf.buf, (size_t)buf.len};
        ssize_t r = preadv(fd, &iov, 1, (off_t)o[i]);
        if (r < 0) {
            err = errno;
            break;
        }
        total += r;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    PyBuffer_Release(&offs);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong(total);
}

static PyMethodDef module_methods[] = {
    {"preadv_loop", preadv_loop, METH_VARARGS,
     "preadv_loop(fd, buffer, offsets: int64 bytes) -> bytes read; a no-pool baseline for benchmarks."},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_native_reader", "Native parallel expert reader (pthread pool of preadv).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native_reader(void)
{
    PyObject *reader = PyImport_ImportModule("flashmoe.runtime.reader");
    if (reader == NULL)
        return NULL;
    ReadError = PyObject_GetAttrString(reader, "ReadError");
    Py_DECREF(reader);
    if (ReadError == NULL)
        return NULL;
    str_fd = PyUnicode_InternFromString("fd");
    str_offset = PyUnicode_InternFromString("offset");
    str_buffers = PyUnicode_InternFromString("buffers");
    str_path = PyUnicode_InternFromString("path");
    if (!str_fd || !str_offset || !str_buffers || !str_path)
        return NULL;
    if (PyType_Ready(&BatchType) < 0 || PyType_Ready(&PoolType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PoolType);
    Py_INCREF(&BatchType);
    if (PyModule_AddObject(m, "Pool", (PyObject *)&PoolType) < 0 ||
        PyModule_AddObject(m, "Batch", (PyObject *)&BatchType) < 0 ||
        PyModule_AddIntConstant(m, "IOV_MAX", IOV_MAX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#ifdef O_DIRECT
    PyModule_AddIntConstant(m, "HAVE_O_DIRECT", 1);
#else
    PyModule_AddIntConstant(m, "HAVE_O_DIRECT", 0);
#endif
    return m;
}

/* pochta.store._aio: the two Linux AIO calls WalSync makes for every group commit.
 *
 * submit(ctx, fd, eventfd): queue one IOCB_CMD_FDSYNC of `fd` whose completion is signalled on
 * `eventfd`. reap(ctx, eventfd) -> int: clear the eventfd, take the completions there are (never
 * waiting); raise OSError for a sync that failed. The context comes from io_setup in
 * _walsync.py (once). Through ctypes each call cost a foreign-function call, an argument
 * conversion and a struct unpack in interpreted code: about 2.5% of the event loop's time at
 * 10 sessions (`perf --call-graph dwarf`), for two system calls.
 *
 * Built by scripts/build_native.py with the mypyc modules; _walsync.py makes the same calls
 * through ctypes when it is missing (running from source).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 4 /* the context's size in _walsync.py: one sync in flight at a time */

static PyObject *
submit(PyObject *module, PyObject *args)
{
    (void)module;
    unsigned long long ctx;
    int fd, eventfd;
    if (!PyArg_ParseTuple(args, "Kii", &ctx, &fd, &eventfd))
        return NULL;
    struct iocb cb; /* the kernel copies it during io_submit */
    memset(&cb, 0, sizeof cb);
    cb.aio_data = 1;
    cb.aio_lio_opcode = IOCB_CMD_FDSYNC;
    cb.aio_fildes = (uint32_t)fd;
    cb.aio_flags = IOCB_FLAG_RESFD;
    cb.aio_resfd = (uint32_t)eventfd;
    struct iocb *list[1] = {&cb};
    if (syscall(SYS_io_submit, (aio_context_t)ctx, 1L, list) != 1)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *
reap(PyObject *module, PyObject *args)
{
    (void)module;
    unsigned long long ctx;
    int eventfd;
    if (!PyArg_ParseTuple(args, "Ki", &ctx, &eventfd))
        return NULL;
    uint64_t count;
    if (read(eventfd, &count, sizeof count) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    struct io_event events[SLOTS];
    struct timespec no_wait = {0, 0};
    long n = syscall(SYS_io_getevents, (aio_context_t)ctx, 0L, (long)SLOTS, events, &no_wait);
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    for (long i = 0; i < n; i++) {
        if (events[i].res < 0) {
            int err = (int)-events[i].res;
            PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", err,
                                                  "fdatasync of the WAL failed");
            if (exc != NULL) {
                PyErr_SetObject(PyExc_OSError, exc);
                Py_DECREF(exc);
            }
            return NULL;
        }
    }
    return PyLong_FromLong(n);
}

static PyMethodDef methods[] = {
    {"submit", submit, METH_VARARGS, "Queue an fdatasync of fd, signalled on eventfd."},
    {"reap", reap, METH_VARARGS, "Take the finished syncs (their count); OSError if one failed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_aio", "Linux AIO fdatasync for WalSync.", -1, methods,
};

PyMODINIT_FUNC
PyInit__aio(void)
{
    return PyModule_Create(&module);
}

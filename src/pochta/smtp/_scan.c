/* pochta.smtp._scan: the DATA checks that bytes methods cannot do at memory speed.
 *
 * bare_line_end(data) -> bool: whether `data` holds a CR or an LF that is not part of a CRLF
 * pair (RFC 5321 §2.3.8; the SMTP-smuggling defence in _data.py). In Python the fastest test
 * found, one `bytes.splitlines`, makes an object per line: 140 us and a fifth of the server's
 * CPU for a 100 KiB letter. Here it is one pass the compiler turns into vector compares.
 * long_line(data, max_line) -> bool: the line-length limit (RFC 5321 §4.5.3.1.6), 27 us a
 * 100 KiB letter in Python (a `rfind` call per window), a few here.
 *
 * Built by scripts/build_native.py with the mypyc modules; _data.py falls back to its Python
 * test (the reference, held equal to this one by tests/smtp/test_data.py) when it is missing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Every LF at i > 0 follows a CR and every CR at i < n - 1 precedes an LF exactly when, for
 * every i > 0, (s[i] is LF) equals (s[i-1] is CR); the two ends are checked apart. No early
 * exit: a branch per byte would stop the loop from being vectorised. */
static int
has_bare_line_end(const unsigned char *s, Py_ssize_t n)
{
    if (n == 0)
        return 0;
    unsigned char bad = (unsigned char)((s[0] == '\n') | (s[n - 1] == '\r'));
    for (Py_ssize_t i = 1; i < n; i++)
        bad |= (unsigned char)((s[i] == '\n') ^ (s[i - 1] == '\r'));
    return bad;
}

static PyObject *
bare_line_end(PyObject *module, PyObject *data)
{
    (void)module;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int bad = has_bare_line_end((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return PyBool_FromLong(bad);
}

/* long_line(data, max_line) -> bool: whether a line of `data` (complete lines) is longer than
 * `max_line` octets with its CRLF, found as `_has_long_line` in _data.py finds it: the last LF
 * of each window of `max_line` octets starts the next window; a window without one holds a
 * longer line. A memrchr per window, without a Python call each. */
static PyObject *
long_line(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "long_line() takes 2 arguments (data, max_line)");
        return NULL;
    }
    Py_ssize_t max_line = PyLong_AsSsize_t(args[1]);
    if (max_line == -1 && PyErr_Occurred())
        return NULL;
    if (max_line < 1) {
        PyErr_SetString(PyExc_ValueError, "long_line(): max_line must be positive");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const char *s = view.buf;
    Py_ssize_t size = view.len, pos = 0;
    int found = 0;
    while (pos < size - max_line) {
        const char *lf = memrchr(s + pos, '\n', (size_t)max_line);
        if (lf == NULL) {
            found = 1;
            break;
        }
        pos = lf - s + 1;
    }
    PyBuffer_Release(&view);
    return PyBool_FromLong(found);
}

static PyMethodDef scan_methods[] = {
    {"bare_line_end", bare_line_end, METH_O,
     "bare_line_end(data, /)\n--\n\nWhether data holds a CR or LF outside a CRLF pair."},
    {"long_line", (PyCFunction)(void (*)(void))long_line, METH_FASTCALL,
     "long_line(data, max_line, /)\n--\n\nWhether a line of data is over max_line octets."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT, "pochta.smtp._scan", "DATA checks at memory speed.", 0,
    scan_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModuleDef_Init(&scan_module);
}

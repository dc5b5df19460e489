/* Compressed COCO RLE decoding: `rsam._rle.paint(counts, out, height, width)`.
 *
 * `counts` is a compressed COCO RLE string: column-major run lengths starting with a background run, 5 data
 * bits per character (offset 48, 0x20 = another character follows, 0x10 in the last character = negative),
 * from the third run on stored as the difference to the run two before. The foreground runs are written as 1s
 * straight into `out`, a row-major (height, width) byte buffer that the caller zeroed: no column-major
 * intermediate and no transpose. The string is decoded and checked in full (no negative run, the runs cover
 * exactly height * width pixels) before a single byte of `out` is written.
 *
 * Same masks and the same error messages as the numpy code in rsam/data/rle.py (the fallback when this
 * extension is not built); tests/test_data.py holds the two to pycocotools.
 *
 * C that also compiles as C++ (torch's build_ext, which builds rsam._C, compiles every source as C++).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>

/* Decodes the run lengths into runs (room for n values: a run takes at least one character).
 * Returns the number of runs, or -1 with a Python exception set. */
static Py_ssize_t decode_runs(const uint8_t *s, Py_ssize_t n, int64_t *runs) {
    Py_ssize_t count = 0, p = 0;
    while (p < n) {
        uint64_t x = 0;
        int k = 0;
        for (;;) {
            if (p >= n) {
                PyErr_SetString(PyExc_ValueError, "truncated RLE string");
                return -1;
            }
            if (k == 12) {  /* 12 characters hold 60 bits: no real run is that long */
                PyErr_SetString(PyExc_ValueError, "an RLE value runs over more than 12 characters");
                return -1;
            }
            int c = (int)s[p] - 48;
            x |= (uint64_t)(c & 0x1F) << (5 * k);
            p++;
            k++;
            if (!(c & 0x20)) {
                if (c & 0x10) x |= ~(uint64_t)0 << (5 * k);  /* sign-extend */
                break;
            }
        }
        if (count > 2) x += (uint64_t)runs[count - 2];  /* unsigned: a hostile string wraps, never overflows */
        runs[count++] = (int64_t)x;
    }
    return count;
}

static PyObject *paint(PyObject *self, PyObject *args) {
    Py_buffer counts, out;
    Py_ssize_t height, width;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*nn:paint", &counts, &out, &height, &width)) return NULL;
    PyObject *result = NULL;
    int64_t *runs = NULL;
    if (height < 1 || width < 1 || width > PY_SSIZE_T_MAX / height || out.len != height * width) {
        PyErr_Format(PyExc_ValueError, "paint: the output holds %zd bytes, a %zd x %zd mask needs %zd", out.len,
                     height, width, height > 0 && width > 0 ? height * width : 0);
    } else if ((runs = (int64_t *)malloc(sizeof(int64_t) * (size_t)(counts.len + 1))) == NULL) {
        PyErr_NoMemory();
    } else {
        Py_ssize_t n = decode_runs((const uint8_t *)counts.buf, counts.len, runs);
        if (n >= 0) {
            int64_t total = 0;
            int negative = 0, too_long = 0;
            for (Py_ssize_t i = 0; i < n; i++) {
                negative |= runs[i] < 0;
                if (runs[i] > 0 && total > INT64_MAX - runs[i]) too_long = 1; else total += runs[i];
            }
            if (too_long) {
                PyErr_Format(PyExc_ValueError, "run lengths sum to more than 2^63 for a %zdx%zd mask", height, width);
            } else if (negative || total != (int64_t)height * width) {
                PyErr_Format(PyExc_ValueError, "run lengths sum to %lld (negative: %s) for a %zdx%zd mask",
                             (long long)total, negative ? "True" : "False", height, width);
            } else {
                uint8_t *mask = (uint8_t *)out.buf;
                Py_BEGIN_ALLOW_THREADS
                int64_t start = 0;
                for (Py_ssize_t i = 0; i < n; i++) {
                    int64_t end = start + runs[i];
                    if (i & 1) {  /* a foreground run: walk down its columns */
                        Py_ssize_t col = (Py_ssize_t)(start / height), row = (Py_ssize_t)(start % height);
                        for (int64_t j = start; j < end; j++) {
                            mask[row * width + col] = 1;
                            if (++row == height) { row = 0; col++; }
                        }
                    }
                    start = end;
                }
                Py_END_ALLOW_THREADS
                result = Py_NewRef(Py_None);
            }
        }
    }
    free(runs);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"paint", paint, METH_VARARGS,
     "paint(counts, out, height, width): write the foreground of the compressed COCO RLE string counts as 1s "
     "into out, a zeroed row-major (height, width) byte buffer (e.g. a bool numpy array)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "rsam._rle", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rle(void) { return PyModule_Create(&module); }

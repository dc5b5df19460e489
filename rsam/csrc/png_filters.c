/* PNG scanline unfiltering: `rsam._png.unfilter(scanlines, out, height, width, channels, portable=False)`.
 *
 * The inflated IDAT stream of a non-interlaced 8-bit PNG is `height` rows of one filter-type byte followed by
 * width * channels filtered bytes. Each row is reconstructed in place in `out` (height * width * channels bytes,
 * the decoded pixels, row after row) from the row above (PNG spec, section 9: None, Sub, Up, Average, Paeth).
 * Inflating is left to the caller (rsam/data/readers/png.py), which uses ISA-L.
 *
 * Average and Paeth depend on the pixel to the left, so a row is a chain of pixels. For 3-channel rows on
 * x86-64 the chain advances one pixel (three 16-bit lanes) per step with SSE2; elsewhere, and for grey rows,
 * one byte per step in plain C (`portable=True` forces it, so that tests run it on x86-64 too). Both give the
 * same bytes (tests/test_png.py checks every filter type both ways).
 *
 * The file is C that also compiles as C++ (torch's build_ext, which builds rsam._C, compiles every source as C++).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define RSAM_PNG_SSE2 1
#endif

enum { FILTER_NONE = 0, FILTER_SUB = 1, FILTER_UP = 2, FILTER_AVERAGE = 3, FILTER_PAETH = 4 };

static inline int paeth_predictor(int a, int b, int c) {
    /* a: left, b: above, c: above-left. The distances of p = a + b - c to a, b and c; ties prefer a, then b. */
    int pa = abs(b - c), pb = abs(a - c), pc = abs(a + b - 2 * c);
    if (pa <= pb && pa <= pc) return a;
    return pb <= pc ? b : c;
}

static void average_row_bytes(const uint8_t *src, const uint8_t *above, uint8_t *row, Py_ssize_t n, int bpp) {
    Py_ssize_t i;
    for (i = 0; i < bpp; i++) row[i] = (uint8_t)(src[i] + (above[i] >> 1));
    for (; i < n; i++) row[i] = (uint8_t)(src[i] + ((row[i - bpp] + above[i]) >> 1));
}

static void paeth_row_bytes(const uint8_t *src, const uint8_t *above, uint8_t *row, Py_ssize_t n, int bpp) {
    Py_ssize_t i;
    for (i = 0; i < bpp; i++) row[i] = (uint8_t)(src[i] + above[i]);  /* a = c = 0: the predictor is b */
    for (; i < n; i++) row[i] = (uint8_t)(src[i] + paeth_predictor(row[i - bpp], above[i], above[i - bpp]));
}

#ifdef RSAM_PNG_SSE2
/* One 3-byte pixel widened to 16-bit lanes. Every pixel but a row's last is read as 4 bytes (the 4th is ignored
 * and never written back), the last as exactly 3 so that no read passes the end of a buffer. */
static inline __m128i load_pixel(const uint8_t *p, int last) {
    uint32_t v = 0;
    if (last) memcpy(&v, p, 3); else memcpy(&v, p, 4);
    return _mm_unpacklo_epi8(_mm_cvtsi32_si128((int)v), _mm_setzero_si128());
}

static inline void store_pixel(uint8_t *p, __m128i x) {
    uint32_t v = (uint32_t)_mm_cvtsi128_si32(_mm_packus_epi16(x, x));
    memcpy(p, &v, 3);
}

static inline __m128i abs_epi16(__m128i v) { return _mm_max_epi16(v, _mm_sub_epi16(_mm_setzero_si128(), v)); }

static void average_row_rgb(const uint8_t *src, const uint8_t *above, uint8_t *row, Py_ssize_t n) {
    const __m128i low_byte = _mm_set1_epi16(255);
    __m128i a = _mm_setzero_si128();
    for (Py_ssize_t i = 0; i < n; i += 3) {
        int last = i + 3 == n;
        __m128i b = load_pixel(above + i, last), d = load_pixel(src + i, last);
        a = _mm_and_si128(_mm_add_epi16(d, _mm_srli_epi16(_mm_add_epi16(a, b), 1)), low_byte);
        store_pixel(row + i, a);
    }
}

static void paeth_row_rgb(const uint8_t *src, const uint8_t *above, uint8_t *row, Py_ssize_t n) {
    const __m128i low_byte = _mm_set1_epi16(255);
    __m128i a = _mm_setzero_si128(), c = _mm_setzero_si128();
    for (Py_ssize_t i = 0; i < n; i += 3) {
        int last = i + 3 == n;
        __m128i b = load_pixel(above + i, last), d = load_pixel(src + i, last);
        __m128i b_c = _mm_sub_epi16(b, c), a_c = _mm_sub_epi16(a, c);
        __m128i pa = abs_epi16(b_c), pb = abs_epi16(a_c), pc = abs_epi16(_mm_add_epi16(b_c, a_c));
        /* Lanes where a loses (pa is not the smallest), and where c beats b; then pick as the scalar code. */
        __m128i not_a = _mm_or_si128(_mm_cmpgt_epi16(pa, pb), _mm_cmpgt_epi16(pa, pc));
        __m128i c_wins = _mm_cmpgt_epi16(pb, pc);
        __m128i b_or_c = _mm_or_si128(_mm_and_si128(c_wins, c), _mm_andnot_si128(c_wins, b));
        __m128i predictor = _mm_or_si128(_mm_and_si128(not_a, b_or_c), _mm_andnot_si128(not_a, a));
        a = _mm_and_si128(_mm_add_epi16(d, predictor), low_byte);
        store_pixel(row + i, a);
        c = b;
    }
}
#endif

/* Returns -1 on success, else the index of the first row with an unknown filter type. */
static Py_ssize_t unfilter_rows(const uint8_t *scanlines, uint8_t *out, Py_ssize_t height, Py_ssize_t row_bytes,
                                int bpp, int portable, const uint8_t *zero_row) {
    const uint8_t *above = zero_row;  /* the row above the first one is all zeros */
    for (Py_ssize_t y = 0; y < height; y++) {
        const uint8_t *src = scanlines + y * (row_bytes + 1) + 1;
        uint8_t *row = out + y * row_bytes;
        Py_ssize_t i;
        switch (src[-1]) {
        case FILTER_NONE:
            memcpy(row, src, (size_t)row_bytes);
            break;
        case FILTER_SUB:
            for (i = 0; i < bpp; i++) row[i] = src[i];
            for (; i < row_bytes; i++) row[i] = (uint8_t)(src[i] + row[i - bpp]);
            break;
        case FILTER_UP:
            for (i = 0; i < row_bytes; i++) row[i] = (uint8_t)(src[i] + above[i]);
            break;
        case FILTER_AVERAGE:
#ifdef RSAM_PNG_SSE2
            if (bpp == 3 && !portable) { average_row_rgb(src, above, row, row_bytes); break; }
#endif
            average_row_bytes(src, above, row, row_bytes, bpp);
            break;
        case FILTER_PAETH:
#ifdef RSAM_PNG_SSE2
            if (bpp == 3 && !portable) { paeth_row_rgb(src, above, row, row_bytes); break; }
#endif
            paeth_row_bytes(src, above, row, row_bytes, bpp);
            break;
        default:
            return y;
        }
        above = row;
    }
    return -1;
}

static PyObject *unfilter(PyObject *self, PyObject *args) {
    Py_buffer scanlines, out;
    Py_ssize_t height, width;
    int channels, portable = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*nni|p:unfilter", &scanlines, &out, &height, &width, &channels, &portable))
        return NULL;
    PyObject *result = NULL;
    uint8_t *zero_row = NULL;
    /* Sizes are checked before they are multiplied: a product that overflows would be undefined behaviour. */
    int valid_shape = height >= 1 && width >= 1 && (channels == 1 || channels == 3);
    int fits = valid_shape && width <= PY_SSIZE_T_MAX / 3 / height - 1;
    Py_ssize_t row_bytes = fits ? width * channels : 0;
    if (!valid_shape) {
        PyErr_Format(PyExc_ValueError, "unfilter: need height, width >= 1 and 1 or 3 channels, got %zd x %zd x %d",
                     height, width, channels);
    } else if (!fits) {
        PyErr_Format(PyExc_ValueError, "unfilter: a %zd x %zd x %d image is too large", height, width, channels);
    } else if (scanlines.len != height * (row_bytes + 1)) {
        PyErr_Format(PyExc_ValueError, "unfilter: %zd bytes of scanlines, a %zd x %zd x %d image needs %zd",
                     scanlines.len, height, width, channels, height * (row_bytes + 1));
    } else if (out.len != height * row_bytes) {
        PyErr_Format(PyExc_ValueError, "unfilter: the output holds %zd bytes, a %zd x %zd x %d image needs %zd",
                     out.len, height, width, channels, height * row_bytes);
    } else if ((zero_row = (uint8_t *)calloc((size_t)row_bytes, 1)) == NULL) {
        PyErr_NoMemory();
    } else {
        Py_ssize_t bad_row;
        Py_BEGIN_ALLOW_THREADS
        bad_row = unfilter_rows((const uint8_t *)scanlines.buf, (uint8_t *)out.buf, height, row_bytes, channels,
                                portable, zero_row);
        Py_END_ALLOW_THREADS
        if (bad_row >= 0)
            PyErr_Format(PyExc_ValueError, "row %zd has filter type %d (PNG knows 0-4)", bad_row,
                         ((const uint8_t *)scanlines.buf)[bad_row * (row_bytes + 1)]);
        else
            result = Py_NewRef(Py_None);
    }
    free(zero_row);
    PyBuffer_Release(&scanlines);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"unfilter", unfilter, METH_VARARGS,
     "unfilter(scanlines, out, height, width, channels, portable=False): reconstruct the pixels of a "
     "non-interlaced 8-bit PNG from its inflated IDAT stream into the writable buffer out (height * width * "
     "channels bytes); portable=True uses the plain C code even where SIMD code exists."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "rsam._png", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__png(void) { return PyModule_Create(&module); }

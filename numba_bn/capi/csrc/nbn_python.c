/* nbn_python.c: compiled calls, a CPython extension over libnumba_bn.so for the plain host calls
 * of the functional API (numba_bn.capi.calls; built by `numba-bn build-plugin` next to the
 * library when Python's and NumPy's headers are there).
 *
 * forward_train, forward_eval and backward take every argument of the public function of that
 * name, positionally, in its order. A call they serve: float32 NumPy arrays (exactly ndarray,
 * C-contiguous, aligned, native byte order), channels on axis 1 of a rank >= 2 x, per-channel
 * vectors of x's dtype and length (weight and bias may be None; a running variance without a
 * negative value), a float eps > 0, no out, mask, residual or activation, nan_policy
 * "propagate", backend "cpu", device "auto" or "cpu", and a size the JIT backend runs serially
 * (below the bounds `configure` sets from its cost model, so that the library's worker threads
 * never run beside Numba's). Everything else returns NotImplemented, and the Python path takes
 * the call, its checks and errors included: a call served here has passed every one of them.
 *
 * batch_forward and batch_backward (1.4 entry points) take the arguments of numba_bn.ops'
 * functions of those names, which BatchNorm and batch_norm call in training, and return what
 * they return (the float64 statistics and sums as the kernels keep them, and the count of values
 * per channel): with running buffers (writable float32 vectors, a float momentum in [0, 1] and
 * a bool `unbiased`) or without, and the backward given float64 statistics.
 *
 * The host build gives the JIT's bits, which is what makes these calls interchangeable with the
 * Python path. float32 only, for now: nothing here calls the _f64 entry points. forward_train's
 * statistics come back in float32 as the Python path's do (the library rounds the same float64
 * values), and the GIL is held as the JIT's serial drivers hold it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <math.h>

#include "numba_bn.h"

enum { FORWARD_TRAIN, FORWARD_EVAL, BACKWARD, STEPS };
enum { ENTRY_POINTS = 6 }; /* the addresses `configure` takes, in the order of `library` */

/* The library's entry points, which `configure` takes as addresses from ctypes: the extension
 * does not link the library, whose soname the dynamic loader would match to whichever build of
 * it the process loaded first (the portable one beside a host one, say). The types are checked
 * against numba_bn.h's prototypes; _Generic does not evaluate them, so nothing is linked. */
typedef int (*forward_train_fn)(const float *, int64_t, int64_t, int64_t, const float *,
                                const float *, double, float *, float *, float *, float *, float *,
                                double);
typedef int (*forward_eval_fn)(const float *, int64_t, int64_t, int64_t, const float *,
                               const float *, const float *, const float *, double, float *);
typedef int (*backward_fn)(const float *, const float *, int64_t, int64_t, int64_t, const float *,
                           const float *, const float *, float *, float *, float *);
typedef int (*forward_train_stats_fn)(const float *, int64_t, int64_t, int64_t, const float *,
                                      const float *, double, float *, double *, double *,
                                      double *, float *, float *, double, int);
typedef int (*backward_stats_fn)(const float *, const float *, int64_t, int64_t, int64_t,
                                 const float *, const double *, const double *, float *,
                                 double *, double *);
typedef const char *(*status_string_fn)(int);
_Static_assert(_Generic(&nbn_forward_train_f32, forward_train_fn: 1, default: 0), "ABI");
_Static_assert(_Generic(&nbn_forward_eval_f32, forward_eval_fn: 1, default: 0), "ABI");
_Static_assert(_Generic(&nbn_backward_f32, backward_fn: 1, default: 0), "ABI");
_Static_assert(_Generic(&nbn_forward_train_stats_f32, forward_train_stats_fn: 1, default: 0),
               "ABI");
_Static_assert(_Generic(&nbn_backward_stats_f32, backward_stats_fn: 1, default: 0), "ABI");
_Static_assert(_Generic(&nbn_status_string, status_string_fn: 1, default: 0), "ABI");

static struct {
    forward_train_fn forward_train;
    forward_eval_fn forward_eval;
    backward_fn backward;
    forward_train_stats_fn forward_train_stats;
    backward_stats_fn backward_stats;
    status_string_fn status_string;
} library;

/* Sizes (elements) from which the JIT backend may run a step in parallel: calls this large go to
 * the Python path. 0, and so nothing served, until `configure` sets them. */
static double serial_below[STEPS];

/* An ndarray of `type` the library can read as it is. */
static int plain_array_of(PyObject *a, int type) {
    if (!PyArray_CheckExact(a)) return 0;
    PyArrayObject *array = (PyArrayObject *)a;
    return PyArray_TYPE(array) == type && PyArray_ISNOTSWAPPED(array) &&
           PyArray_CHKFLAGS(array, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
}

static int plain_array(PyObject *a) { return plain_array_of(a, NPY_FLOAT32); }

/* None, or a plain float32 vector of `channels` values (a NULL pointer or its data in *data). */
static int vector_or_none(PyObject *a, int64_t channels, float **data) {
    if (a == Py_None) {
        *data = NULL;
        return 1;
    }
    if (!plain_array(a) || PyArray_NDIM((PyArrayObject *)a) != 1 ||
        PyArray_DIM((PyArrayObject *)a, 0) != channels)
        return 0;
    *data = PyArray_DATA((PyArrayObject *)a);
    return 1;
}

static int vector(PyObject *a, int64_t channels, float **data) {
    return a != Py_None && vector_or_none(a, channels, data);
}

/* Running buffers the forward updates in place: both None (*mean and *var NULL), or both
 * writable float32 vectors of `channels` values. */
static int running_buffers(PyObject *mean, PyObject *var, int64_t channels, float **mean_data,
                           float **var_data) {
    if (mean == Py_None && var == Py_None) {
        *mean_data = *var_data = NULL;
        return 1;
    }
    return vector(mean, channels, mean_data) && vector(var, channels, var_data) &&
           PyArray_ISWRITEABLE((PyArrayObject *)mean) && PyArray_ISWRITEABLE((PyArrayObject *)var);
}

/* A saved statistic: a float64 vector of `channels` values. */
static int statistic(PyObject *a, int64_t channels, double **data) {
    if (!plain_array_of(a, NPY_FLOAT64) || PyArray_NDIM((PyArrayObject *)a) != 1 ||
        PyArray_DIM((PyArrayObject *)a, 0) != channels)
        return 0;
    *data = PyArray_DATA((PyArrayObject *)a);
    return 1;
}

/* A running variance with no value below zero (NaN passes): the Python path raises for one, as
 * numba_bn.stats.first_negative finds it. */
static int variance(PyObject *a, int64_t channels, float **data) {
    if (!vector(a, channels, data)) return 0;
    for (int64_t c = 0; c < channels; c++)
        if ((*data)[c] < 0) return 0;
    return 1;
}

/* x as (outer, channels, inner) with the channels on axis 1, at least two values per channel
 * and fewer than serial_below[step] elements in all. */
static int plain_view(PyObject *x, int step, int64_t *outer, int64_t *channels, int64_t *inner) {
    if (!plain_array(x)) return 0;
    PyArrayObject *array = (PyArrayObject *)x;
    int rank = PyArray_NDIM(array);
    if (rank < 2) return 0;
    const npy_intp *dims = PyArray_DIMS(array);
    *outer = dims[0];
    *channels = dims[1];
    *inner = 1;
    for (int k = 2; k < rank; k++) *inner *= dims[k];
    return *channels >= 1 && *outer * *inner >= 2 &&
           (double)PyArray_SIZE(array) < serial_below[step];
}

static int is_none(PyObject *a) { return a == Py_None; }

static int is_str(PyObject *a, const char *text) {
    return PyUnicode_CheckExact(a) && PyUnicode_CompareWithASCIIString(a, text) == 0;
}

static int host_device(PyObject *device) { return is_str(device, "auto") || is_str(device, "cpu"); }

static int axis_one(PyObject *axis) {
    if (!PyLong_CheckExact(axis)) return 0;
    int overflow;
    return PyLong_AsLongAndOverflow(axis, &overflow) == 1;
}

static int positive_eps(PyObject *eps, double *value) {
    if (!PyFloat_CheckExact(eps)) return 0;
    *value = PyFloat_AS_DOUBLE(eps);
    return *value > 0.0 && isfinite(*value);
}

static PyObject *new_like(PyObject *x) {
    PyArrayObject *array = (PyArrayObject *)x;
    return PyArray_SimpleNew(PyArray_NDIM(array), PyArray_DIMS(array), NPY_FLOAT32);
}

static PyObject *new_vector_of(int64_t channels, int type) {
    npy_intp length = (npy_intp)channels;
    return PyArray_SimpleNew(1, &length, type);
}

static PyObject *new_vector(int64_t channels) { return new_vector_of(channels, NPY_FLOAT32); }

static float *data(PyObject *array) { return PyArray_DATA((PyArrayObject *)array); }

static double *data64(PyObject *array) { return PyArray_DATA((PyArrayObject *)array); }

/* A float momentum in [0, 1] (NaN is not). */
static int momentum_value(PyObject *momentum, double *value) {
    if (!PyFloat_CheckExact(momentum)) return 0;
    *value = PyFloat_AS_DOUBLE(momentum);
    return *value >= 0.0 && *value <= 1.0;
}

/* NULL, with the library's status as a RuntimeError (arguments it refuses never reach it). */
static PyObject *library_error(int status) {
    return PyErr_Format(PyExc_RuntimeError, "libnumba_bn: %s", library.status_string(status));
}

/* The tuple of `n` new arrays (their references taken over; NULL where an allocation failed),
 * then `count` when it is >= 0 (the values per channel that numba_bn.ops' results end with), or
 * NULL with the error of the library's status or of the allocation. */
static PyObject *results(int status, int n, PyObject *arrays[], int64_t count) {
    PyObject *result = NULL;
    int made = 1;
    for (int k = 0; k < n; k++) made = made && arrays[k];
    if (made && status != NBN_OK) {
        library_error(status);
    } else if (made && (result = PyTuple_New(n + (count >= 0)))) {
        for (int k = 0; k < n; k++) {
            PyTuple_SET_ITEM(result, k, arrays[k]); /* steals the reference */
            arrays[k] = NULL;
        }
        PyObject *values = count >= 0 ? PyLong_FromLongLong((long long)count) : NULL;
        if (count >= 0 && !values) Py_CLEAR(result);
        if (values) PyTuple_SET_ITEM(result, n, values);
    }
    for (int k = 0; k < n; k++) Py_XDECREF(arrays[k]);
    return result;
}

/* forward_train(x, weight, bias, eps, axis, out, nan_policy, mask, residual, activation, backend,
 * device) -> (y, mean, invstd), or NotImplemented */
static PyObject *forward_train(PyObject *Py_UNUSED(module), PyObject *const *args,
                               Py_ssize_t nargs) {
    int64_t outer, channels, inner;
    float *weight, *bias;
    double eps;
    if (nargs != 12 || !plain_view(args[0], FORWARD_TRAIN, &outer, &channels, &inner) ||
        !vector_or_none(args[1], channels, &weight) || !vector_or_none(args[2], channels, &bias) ||
        !positive_eps(args[3], &eps) || !axis_one(args[4]) || !is_none(args[5]) ||
        !is_str(args[6], "propagate") || !is_none(args[7]) || !is_none(args[8]) ||
        !is_none(args[9]) || !is_str(args[10], "cpu") || !host_device(args[11]))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *y = new_like(args[0]), *mean = new_vector(channels), *invstd = new_vector(channels);
    int status = NBN_OK;
    if (y && mean && invstd)
        status = library.forward_train(data(args[0]), outer, channels, inner, weight, bias, eps,
                                       data(y), data(mean), data(invstd), NULL, NULL, 0.0);
    PyObject *arrays[] = {y, mean, invstd};
    return results(status, 3, arrays, -1);
}

/* forward_eval(x, running_mean, running_var, weight, bias, eps, axis, out, residual, activation,
 * backend, device) -> y, or NotImplemented */
static PyObject *forward_eval(PyObject *Py_UNUSED(module), PyObject *const *args,
                              Py_ssize_t nargs) {
    int64_t outer, channels, inner;
    float *running_mean, *running_var, *weight, *bias;
    double eps;
    if (nargs != 12 || !plain_view(args[0], FORWARD_EVAL, &outer, &channels, &inner) ||
        !vector(args[1], channels, &running_mean) || !variance(args[2], channels, &running_var) ||
        !vector_or_none(args[3], channels, &weight) || !vector_or_none(args[4], channels, &bias) ||
        !positive_eps(args[5], &eps) || !axis_one(args[6]) || !is_none(args[7]) ||
        !is_none(args[8]) || !is_none(args[9]) || !is_str(args[10], "cpu") ||
        !host_device(args[11]))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *y = new_like(args[0]);
    if (!y) return NULL;
    int status = library.forward_eval(data(args[0]), outer, channels, inner, weight, bias,
                                      running_mean, running_var, eps, data(y));
    if (status == NBN_OK) return y;
    Py_DECREF(y);
    return library_error(status);
}

/* backward(dy, x, mean, invstd, weight, axis, out, mask, activation, y, residual_out, backend,
 * device) -> (dx, dweight, dbias), or NotImplemented */
static PyObject *backward(PyObject *Py_UNUSED(module), PyObject *const *args,
                          Py_ssize_t nargs) {
    int64_t outer, channels, inner;
    float *mean, *invstd, *weight;
    if (nargs != 13 || !plain_view(args[1], BACKWARD, &outer, &channels, &inner) ||
        !plain_array(args[0]) ||
        !PyArray_SAMESHAPE((PyArrayObject *)args[0], (PyArrayObject *)args[1]) ||
        !vector(args[2], channels, &mean) || !vector(args[3], channels, &invstd) ||
        !vector_or_none(args[4], channels, &weight) || !axis_one(args[5]) || !is_none(args[6]) ||
        !is_none(args[7]) || !is_none(args[8]) || !is_none(args[9]) || !is_none(args[10]) ||
        !is_str(args[11], "cpu") || !host_device(args[12]))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *dx = new_like(args[1]), *dweight = new_vector(channels),
             *dbias = new_vector(channels);
    int status = NBN_OK;
    if (dx && dweight && dbias)
        status = library.backward(data(args[0]), data(args[1]), outer, channels, inner, weight,
                                  mean, invstd, data(dx), data(dweight), data(dbias));
    PyObject *arrays[] = {dx, dweight, dbias};
    return results(status, 3, arrays, -1);
}

/* batch_forward(x, weight, bias, eps, axis, running_mean, running_var, momentum, unbiased,
 * nan_policy, out, backend, exchange, residual, activation, device) -> (y, mean, invstd, m2,
 * count) as numba_bn.ops.TrainResult (statistics float64), or NotImplemented */
static PyObject *batch_forward(PyObject *Py_UNUSED(module), PyObject *const *args,
                               Py_ssize_t nargs) {
    int64_t outer, channels, inner;
    float *weight, *bias, *running_mean, *running_var;
    double eps, momentum = 0.0;
    if (nargs != 16 || !plain_view(args[0], FORWARD_TRAIN, &outer, &channels, &inner) ||
        !vector_or_none(args[1], channels, &weight) || !vector_or_none(args[2], channels, &bias) ||
        !positive_eps(args[3], &eps) || !axis_one(args[4]) ||
        !running_buffers(args[5], args[6], channels, &running_mean, &running_var) ||
        (running_mean && (!momentum_value(args[7], &momentum) || !PyBool_Check(args[8]))) ||
        !is_str(args[9], "propagate") || !is_none(args[10]) || !is_str(args[11], "cpu") ||
        !is_none(args[12]) || !is_none(args[13]) || !is_none(args[14]) ||
        !host_device(args[15]))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *y = new_like(args[0]), *mean = new_vector_of(channels, NPY_FLOAT64),
             *invstd = new_vector_of(channels, NPY_FLOAT64),
             *m2 = new_vector_of(channels, NPY_FLOAT64);
    int status = NBN_OK;
    if (y && mean && invstd && m2)
        status = library.forward_train_stats(
            data(args[0]), outer, channels, inner, weight, bias, eps, data(y), data64(mean),
            data64(invstd), data64(m2), running_mean, running_var, momentum, args[8] == Py_True);
    PyObject *arrays[] = {y, mean, invstd, m2};
    return results(status, 4, arrays, outer * inner);
}

/* batch_backward(dy, x, mean, invstd, weight, axis, out, backend, exchange, activation, y,
 * residual_out, device) -> (dx, sum_dy, sum_dy_xmu, count) as numba_bn.ops.BackwardResult
 * (mean, invstd and the sums float64), or NotImplemented */
static PyObject *batch_backward(PyObject *Py_UNUSED(module), PyObject *const *args,
                                Py_ssize_t nargs) {
    int64_t outer, channels, inner;
    double *mean, *invstd;
    float *weight;
    if (nargs != 13 || !plain_view(args[1], BACKWARD, &outer, &channels, &inner) ||
        !plain_array(args[0]) ||
        !PyArray_SAMESHAPE((PyArrayObject *)args[0], (PyArrayObject *)args[1]) ||
        !statistic(args[2], channels, &mean) || !statistic(args[3], channels, &invstd) ||
        !vector_or_none(args[4], channels, &weight) || !axis_one(args[5]) || !is_none(args[6]) ||
        !is_str(args[7], "cpu") || !is_none(args[8]) || !is_none(args[9]) ||
        !is_none(args[10]) || !is_none(args[11]) || !host_device(args[12]))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *dx = new_like(args[1]), *sum_dy = new_vector_of(channels, NPY_FLOAT64),
             *sum_dy_xmu = new_vector_of(channels, NPY_FLOAT64);
    int status = NBN_OK;
    if (dx && sum_dy && sum_dy_xmu)
        status = library.backward_stats(data(args[0]), data(args[1]), outer, channels, inner,
                                        weight, mean, invstd, data(dx), data64(sum_dy),
                                        data64(sum_dy_xmu));
    PyObject *arrays[] = {dx, sum_dy, sum_dy_xmu};
    return results(status, 3, arrays, outer * inner);
}

/* configure(forward_train, forward_eval, backward, forward_train_stats, backward_stats,
 * status_string, *bounds): the addresses of nbn_forward_train_f32, nbn_forward_eval_f32,
 * nbn_backward_f32, nbn_forward_train_stats_f32, nbn_backward_stats_f32 and nbn_status_string,
 * then the serial bounds of the three steps, in elements. */
static PyObject *configure(PyObject *Py_UNUSED(module), PyObject *const *args,
                           Py_ssize_t nargs) {
    if (nargs != ENTRY_POINTS + STEPS) {
        PyErr_SetString(PyExc_TypeError, "configure takes six addresses and three bounds");
        return NULL;
    }
    void *address[ENTRY_POINTS];
    double bounds[STEPS];
    for (int k = 0; k < ENTRY_POINTS; k++) {
        address[k] = PyLong_AsVoidPtr(args[k]);
        if (!address[k]) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a NULL entry point");
            return NULL;
        }
    }
    for (int step = 0; step < STEPS; step++) {
        bounds[step] = PyFloat_AsDouble(args[ENTRY_POINTS + step]);
        if (bounds[step] == -1.0 && PyErr_Occurred()) return NULL;
    }
    /* the calls hold the GIL, as this does: none runs half configured */
    library.forward_train = (forward_train_fn)address[0];
    library.forward_eval = (forward_eval_fn)address[1];
    library.backward = (backward_fn)address[2];
    library.forward_train_stats = (forward_train_stats_fn)address[3];
    library.backward_stats = (backward_stats_fn)address[4];
    library.status_string = (status_string_fn)address[5];
    for (int step = 0; step < STEPS; step++) serial_below[step] = bounds[step];
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"forward_train", (PyCFunction)(void (*)(void))forward_train, METH_FASTCALL, NULL},
    {"forward_eval", (PyCFunction)(void (*)(void))forward_eval, METH_FASTCALL, NULL},
    {"backward", (PyCFunction)(void (*)(void))backward, METH_FASTCALL, NULL},
    {"batch_forward", (PyCFunction)(void (*)(void))batch_forward, METH_FASTCALL, NULL},
    {"batch_backward", (PyCFunction)(void (*)(void))batch_backward, METH_FASTCALL, NULL},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef definition = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_numba_bn_calls",
    .m_doc = "Compiled calls over libnumba_bn.so (numba_bn.capi.calls)",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__numba_bn_calls(void) {
    import_array();
    return PyModule_Create(&definition);
}

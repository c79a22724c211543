/* nbn_python.c: compiled calls, a CPython extension over libnumba_bn.so for the plain host calls
 * of the functional API (numba_bn.capi.calls; built by `numba-bn build-plugin` next to the
 * library when Python's and NumPy's headers are there).
 *
 * forward_train, forward_eval and backward take every argument of the public function of that
 * name, positionally, in its order. A call they serve: float32 or float64 NumPy arrays (exactly
 * ndarray, C-contiguous, aligned, native byte order), channels on axis 1 of a rank >= 2 x,
 * per-channel vectors of x's dtype and length (weight and bias may be None; a running variance
 * without a negative value), a float eps > 0, no mask, residual or activation, nan_policy
 * "propagate", backend "cpu", device "auto" or "cpu", out None or an array like x (writable;
 * each input like x is out itself or shares no byte with it), and a size the JIT backend runs
 * serially (below the bounds `configure` sets from its cost model, so that the library's worker
 * threads never run beside Numba's). Everything else returns NotImplemented, and the Python path
 * takes the call, its checks and errors included: a call served here has passed every one of
 * them.
 *
 * batch_forward and batch_backward (1.4 entry points) take the arguments of numba_bn.ops'
 * functions of those names, which BatchNorm and batch_norm call in training, and return what
 * they return (the float64 statistics and sums as the kernels keep them, the count of values per
 * channel, and the backward's parameter gradients in x's type): with running buffers (writable
 * vectors of x's dtype, a float momentum in [0, 1] and a bool `unbiased`) or without, and the
 * backward given float64 statistics.
 *
 * The host build gives the JIT's bits in both dtypes (since the strict kernel copies of stop 27,
 * float64 too), which is what makes these calls interchangeable with the Python path.
 * forward_train's statistics come back in x's dtype as the Python path's do (the library rounds
 * the same float64 values), and the GIL is held as the JIT's serial drivers hold it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <math.h>

#include "numba_bn.h"

enum { FORWARD_TRAIN, FORWARD_EVAL, BACKWARD, STEPS };

/* The library's entry points, which `configure` takes as addresses from ctypes: the extension
 * does not link the library, whose soname the dynamic loader would match to whichever build of
 * it the process loaded first (the portable one beside a host one, say). The types are checked
 * against numba_bn.h's prototypes; _Generic does not evaluate them, so nothing is linked. */
#define ENTRY_POINT_TYPES(T, SUFFIX)                                                              \
    typedef int (*forward_train_##SUFFIX)(const T *, int64_t, int64_t, int64_t, const T *,       \
                                          const T *, double, T *, T *, T *, T *, T *, double);    \
    typedef int (*forward_eval_##SUFFIX)(const T *, int64_t, int64_t, int64_t, const T *,        \
                                         const T *, const T *, const T *, double, T *);           \
    typedef int (*backward_##SUFFIX)(const T *, const T *, int64_t, int64_t, int64_t, const T *, \
                                     const T *, const T *, T *, T *, T *);                        \
    typedef int (*forward_train_stats_##SUFFIX)(const T *, int64_t, int64_t, int64_t, const T *, \
                                                const T *, double, T *, double *, double *,       \
                                                double *, T *, T *, double, int);                 \
    typedef int (*backward_stats_##SUFFIX)(const T *, const T *, int64_t, int64_t, int64_t,      \
                                           const T *, const double *, const double *, T *,        \
                                           double *, double *);                                   \
    _Static_assert(_Generic(&nbn_forward_train_##SUFFIX, forward_train_##SUFFIX: 1, default: 0), \
                   "ABI");                                                                        \
    _Static_assert(_Generic(&nbn_forward_eval_##SUFFIX, forward_eval_##SUFFIX: 1, default: 0),   \
                   "ABI");                                                                        \
    _Static_assert(_Generic(&nbn_backward_##SUFFIX, backward_##SUFFIX: 1, default: 0), "ABI");   \
    _Static_assert(_Generic(&nbn_forward_train_stats_##SUFFIX,                                   \
                            forward_train_stats_##SUFFIX: 1, default: 0),                         \
                   "ABI");                                                                        \
    _Static_assert(_Generic(&nbn_backward_stats_##SUFFIX, backward_stats_##SUFFIX: 1, default: 0), \
                   "ABI");                                                                        \
    typedef struct {                                                                             \
        forward_train_##SUFFIX forward_train;                                                    \
        forward_eval_##SUFFIX forward_eval;                                                      \
        backward_##SUFFIX backward;                                                              \
        forward_train_stats_##SUFFIX forward_train_stats;                                        \
        backward_stats_##SUFFIX backward_stats;                                                  \
    } entry_points_##SUFFIX;

ENTRY_POINT_TYPES(float, f32)
ENTRY_POINT_TYPES(double, f64)
#undef ENTRY_POINT_TYPES

typedef const char *(*status_string_fn)(int);
_Static_assert(_Generic(&nbn_status_string, status_string_fn: 1, default: 0), "ABI");

enum { DTYPE_ENTRY_POINTS = 5, ENTRY_POINTS = 2 * DTYPE_ENTRY_POINTS + 1 };
static struct {
    entry_points_f32 f32;
    entry_points_f64 f64;
    status_string_fn status_string;
} library;

/* The library's calls for a tensor type (f64: double, else float), the tensors as void *. */
static int lib_forward_train(int f64, const void *x, int64_t outer, int64_t channels,
                             int64_t inner, const void *weight, const void *bias, double eps,
                             void *y, void *mean, void *invstd) {
    return f64 ? library.f64.forward_train(x, outer, channels, inner, weight, bias, eps, y, mean,
                                           invstd, NULL, NULL, 0.0)
               : library.f32.forward_train(x, outer, channels, inner, weight, bias, eps, y, mean,
                                           invstd, NULL, NULL, 0.0);
}

static int lib_forward_eval(int f64, const void *x, int64_t outer, int64_t channels,
                            int64_t inner, const void *weight, const void *bias,
                            const void *running_mean, const void *running_var, double eps,
                            void *y) {
    return f64 ? library.f64.forward_eval(x, outer, channels, inner, weight, bias, running_mean,
                                          running_var, eps, y)
               : library.f32.forward_eval(x, outer, channels, inner, weight, bias, running_mean,
                                          running_var, eps, y);
}

static int lib_backward(int f64, const void *dy, const void *x, int64_t outer, int64_t channels,
                        int64_t inner, const void *weight, const void *mean, const void *invstd,
                        void *dx, void *dweight, void *dbias) {
    return f64 ? library.f64.backward(dy, x, outer, channels, inner, weight, mean, invstd, dx,
                                      dweight, dbias)
               : library.f32.backward(dy, x, outer, channels, inner, weight, mean, invstd, dx,
                                      dweight, dbias);
}

static int lib_forward_train_stats(int f64, const void *x, int64_t outer, int64_t channels,
                                   int64_t inner, const void *weight, const void *bias,
                                   double eps, void *y, double *mean, double *invstd, double *m2,
                                   void *running_mean, void *running_var, double momentum,
                                   int unbiased) {
    return f64 ? library.f64.forward_train_stats(x, outer, channels, inner, weight, bias, eps, y,
                                                 mean, invstd, m2, running_mean, running_var,
                                                 momentum, unbiased)
               : library.f32.forward_train_stats(x, outer, channels, inner, weight, bias, eps, y,
                                                 mean, invstd, m2, running_mean, running_var,
                                                 momentum, unbiased);
}

static int lib_backward_stats(int f64, const void *dy, const void *x, int64_t outer,
                              int64_t channels, int64_t inner, const void *weight,
                              const double *mean, const double *invstd, void *dx, double *sum_dy,
                              double *sum_dy_xmu) {
    return f64 ? library.f64.backward_stats(dy, x, outer, channels, inner, weight, mean, invstd,
                                            dx, sum_dy, sum_dy_xmu)
               : library.f32.backward_stats(dy, x, outer, channels, inner, weight, mean, invstd,
                                            dx, sum_dy, sum_dy_xmu);
}

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

/* None, or a plain vector of `type` and `channels` values (a NULL pointer or its data in *data). */
static int vector_or_none(PyObject *a, int type, int64_t channels, void **data) {
    if (a == Py_None) {
        *data = NULL;
        return 1;
    }
    if (!plain_array_of(a, type) || PyArray_NDIM((PyArrayObject *)a) != 1 ||
        PyArray_DIM((PyArrayObject *)a, 0) != channels)
        return 0;
    *data = PyArray_DATA((PyArrayObject *)a);
    return 1;
}

static int vector(PyObject *a, int type, int64_t channels, void **data) {
    return a != Py_None && vector_or_none(a, type, channels, data);
}

/* Running buffers the forward updates in place: both None (*mean and *var NULL), or both
 * writable vectors of `type` and `channels` values. */
static int running_buffers(PyObject *mean, PyObject *var, int type, int64_t channels,
                           void **mean_data, void **var_data) {
    if (mean == Py_None && var == Py_None) {
        *mean_data = *var_data = NULL;
        return 1;
    }
    return vector(mean, type, channels, mean_data) && vector(var, type, channels, var_data) &&
           PyArray_ISWRITEABLE((PyArrayObject *)mean) && PyArray_ISWRITEABLE((PyArrayObject *)var);
}

/* A running variance with no value below zero (NaN passes): the Python path raises for one, as
 * numba_bn.stats.first_negative finds it. */
static int variance(PyObject *a, int type, int64_t channels, void **data) {
    if (!vector(a, type, channels, data)) return 0;
    for (int64_t c = 0; c < channels; c++)
        if (type == NPY_FLOAT64 ? ((double *)*data)[c] < 0 : ((float *)*data)[c] < 0) return 0;
    return 1;
}

/* x as (outer, channels, inner): a plain float32 or float64 array (its type in *type) with the
 * channels on axis 1, at least two values per channel and fewer than serial_below[step]
 * elements in all. */
static int plain_view(PyObject *x, int step, int *type, int64_t *outer, int64_t *channels,
                      int64_t *inner) {
    if (!PyArray_CheckExact(x)) return 0;
    PyArrayObject *array = (PyArrayObject *)x;
    *type = PyArray_TYPE(array);
    if ((*type != NPY_FLOAT32 && *type != NPY_FLOAT64) || !plain_array_of(x, *type)) return 0;
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

/* dy: a plain array of x's type and shape. */
static int like(PyObject *dy, PyObject *x, int type) {
    return plain_array_of(dy, type) &&
           PyArray_SAMESHAPE((PyArrayObject *)dy, (PyArrayObject *)x);
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

/* A float momentum in [0, 1] (NaN is not). */
static int momentum_value(PyObject *momentum, double *value) {
    if (!PyFloat_CheckExact(momentum)) return 0;
    *value = PyFloat_AS_DOUBLE(momentum);
    return *value >= 0.0 && *value <= 1.0;
}

static PyObject *new_like(PyObject *x) {
    PyArrayObject *array = (PyArrayObject *)x;
    return PyArray_SimpleNew(PyArray_NDIM(array), PyArray_DIMS(array), PyArray_TYPE(array));
}

/* Whether the plain array `out` is `input` (None or an array) or shares no byte with it (the
 * bounds of their bytes, as np.may_share_memory compares them). */
static int apart_or_same(PyObject *out, PyObject *input) {
    if (input == Py_None || input == out) return 1;
    uintptr_t a = (uintptr_t)PyArray_BYTES((PyArrayObject *)out),
              b = (uintptr_t)PyArray_BYTES((PyArrayObject *)input);
    return a + (uintptr_t)PyArray_NBYTES((PyArrayObject *)out) <= b ||
           b + (uintptr_t)PyArray_NBYTES((PyArrayObject *)input) <= a;
}

/* An out= the call writes as the Python path's plain call does (numba_bn.hostcall.output):
 * None, or a writable plain array like x that each of the inputs `a` and `b` (plain arrays like
 * x, or None) is or shares no byte with. */
static int plain_out(PyObject *out, PyObject *x, int type, PyObject *a, PyObject *b) {
    return out == Py_None || (like(out, x, type) && PyArray_ISWRITEABLE((PyArrayObject *)out) &&
                              apart_or_same(out, a) && apart_or_same(out, b));
}

/* The array the result goes to: a new one like x for a None `out`, else out (a new reference). */
static PyObject *output(PyObject *out, PyObject *x) {
    if (out == Py_None) return new_like(x);
    Py_INCREF(out);
    return out;
}

static PyObject *new_vector(int64_t channels, int type) {
    npy_intp length = (npy_intp)channels;
    return PyArray_SimpleNew(1, &length, type);
}

static void *data(PyObject *array) { return PyArray_DATA((PyArrayObject *)array); }

/* NULL, with the library's status as a RuntimeError (arguments it refuses never reach it). */
static PyObject *library_error(int status) {
    return PyErr_Format(PyExc_RuntimeError, "libnumba_bn: %s", library.status_string(status));
}

/* numba_bn.ops.TrainResult and BackwardResult (NamedTuples: tuple subclasses), which `configure`
 * takes: batch_forward and batch_backward return them, as the functions of ops do. */
static PyTypeObject *train_result, *backward_result;

/* A tuple of `kind` (NULL: a tuple) holding `n` new arrays (their references taken over; NULL
 * where an allocation failed), with `count` (the values per channel of numba_bn.ops' results)
 * inserted at index `count_at` when that is >= 0; or NULL with the error of the library's
 * status or of the allocation. A tuple subclass is made as tuple.__new__ makes one: its
 * tp_alloc, then the items. */
static PyObject *results(int status, int n, PyObject *arrays[], int64_t count, int count_at,
                         PyTypeObject *kind) {
    PyObject *result = NULL;
    int made = 1;
    for (int k = 0; k < n; k++) made = made && arrays[k];
    Py_ssize_t size = n + (count_at >= 0);
    if (made && status != NBN_OK) {
        library_error(status);
    } else if (made && (result = kind ? kind->tp_alloc(kind, size) : PyTuple_New(size))) {
        for (int k = 0; k < n; k++) {
            /* steals the reference */
            PyTuple_SET_ITEM(result, k + (count_at >= 0 && k >= count_at), arrays[k]);
            arrays[k] = NULL;
        }
        PyObject *values = count_at >= 0 ? PyLong_FromLongLong((long long)count) : NULL;
        if (count_at >= 0 && !values) Py_CLEAR(result);
        if (values) PyTuple_SET_ITEM(result, count_at, values);
    }
    for (int k = 0; k < n; k++) Py_XDECREF(arrays[k]);
    return result;
}

/* forward_train(x, weight, bias, eps, axis, out, nan_policy, mask, residual, activation, backend,
 * device) -> (y, mean, invstd), or NotImplemented */
static PyObject *forward_train(PyObject *Py_UNUSED(module), PyObject *const *args,
                               Py_ssize_t nargs) {
    int type;
    int64_t outer, channels, inner;
    void *weight, *bias;
    double eps;
    if (nargs != 12 || !plain_view(args[0], FORWARD_TRAIN, &type, &outer, &channels, &inner) ||
        !vector_or_none(args[1], type, channels, &weight) ||
        !vector_or_none(args[2], type, channels, &bias) || !positive_eps(args[3], &eps) ||
        !axis_one(args[4]) || !plain_out(args[5], args[0], type, args[0], Py_None) ||
        !is_str(args[6], "propagate") || !is_none(args[7]) || !is_none(args[8]) ||
        !is_none(args[9]) || !is_str(args[10], "cpu") || !host_device(args[11]))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *y = output(args[5], args[0]), *mean = new_vector(channels, type),
             *invstd = new_vector(channels, type);
    int status = NBN_OK;
    if (y && mean && invstd)
        status = lib_forward_train(type == NPY_FLOAT64, data(args[0]), outer, channels, inner,
                                   weight, bias, eps, data(y), data(mean), data(invstd));
    PyObject *arrays[] = {y, mean, invstd};
    return results(status, 3, arrays, 0, -1, NULL);
}

/* forward_eval(x, running_mean, running_var, weight, bias, eps, axis, out, residual, activation,
 * backend, device) -> y, or NotImplemented */
static PyObject *forward_eval(PyObject *Py_UNUSED(module), PyObject *const *args,
                              Py_ssize_t nargs) {
    int type;
    int64_t outer, channels, inner;
    void *running_mean, *running_var, *weight, *bias;
    double eps;
    if (nargs != 12 || !plain_view(args[0], FORWARD_EVAL, &type, &outer, &channels, &inner) ||
        !vector(args[1], type, channels, &running_mean) ||
        !variance(args[2], type, channels, &running_var) ||
        !vector_or_none(args[3], type, channels, &weight) ||
        !vector_or_none(args[4], type, channels, &bias) || !positive_eps(args[5], &eps) ||
        !axis_one(args[6]) || !plain_out(args[7], args[0], type, args[0], Py_None) ||
        !is_none(args[8]) || !is_none(args[9]) || !is_str(args[10], "cpu") ||
        !host_device(args[11]))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *y = output(args[7], args[0]);
    if (!y) return NULL;
    int status = lib_forward_eval(type == NPY_FLOAT64, data(args[0]), outer, channels, inner,
                                  weight, bias, running_mean, running_var, eps, data(y));
    if (status == NBN_OK) return y;
    Py_DECREF(y);
    return library_error(status);
}

/* backward(dy, x, mean, invstd, weight, axis, out, mask, activation, y, residual_out, backend,
 * device) -> (dx, dweight, dbias), or NotImplemented */
static PyObject *backward(PyObject *Py_UNUSED(module), PyObject *const *args,
                          Py_ssize_t nargs) {
    int type;
    int64_t outer, channels, inner;
    void *mean, *invstd, *weight;
    if (nargs != 13 || !plain_view(args[1], BACKWARD, &type, &outer, &channels, &inner) ||
        !like(args[0], args[1], type) || !vector(args[2], type, channels, &mean) ||
        !vector(args[3], type, channels, &invstd) ||
        !vector_or_none(args[4], type, channels, &weight) || !axis_one(args[5]) ||
        !plain_out(args[6], args[1], type, args[0], args[1]) || !is_none(args[7]) ||
        !is_none(args[8]) || !is_none(args[9]) || !is_none(args[10]) ||
        !is_str(args[11], "cpu") || !host_device(args[12]))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *dx = output(args[6], args[1]), *dweight = new_vector(channels, type),
             *dbias = new_vector(channels, type);
    int status = NBN_OK;
    if (dx && dweight && dbias)
        status = lib_backward(type == NPY_FLOAT64, data(args[0]), data(args[1]), outer, channels,
                              inner, weight, mean, invstd, data(dx), data(dweight), data(dbias));
    PyObject *arrays[] = {dx, dweight, dbias};
    return results(status, 3, arrays, 0, -1, NULL);
}

/* batch_forward(x, weight, bias, eps, axis, running_mean, running_var, momentum, unbiased,
 * nan_policy, out, backend, exchange, residual, activation, device) -> (y, mean, invstd, m2,
 * count) as numba_bn.ops.TrainResult (statistics float64), or NotImplemented */
static PyObject *batch_forward(PyObject *Py_UNUSED(module), PyObject *const *args,
                               Py_ssize_t nargs) {
    int type;
    int64_t outer, channels, inner;
    void *weight, *bias, *running_mean, *running_var;
    double eps, momentum = 0.0;
    if (nargs != 16 || !plain_view(args[0], FORWARD_TRAIN, &type, &outer, &channels, &inner) ||
        !vector_or_none(args[1], type, channels, &weight) ||
        !vector_or_none(args[2], type, channels, &bias) || !positive_eps(args[3], &eps) ||
        !axis_one(args[4]) ||
        !running_buffers(args[5], args[6], type, channels, &running_mean, &running_var) ||
        (running_mean && (!momentum_value(args[7], &momentum) || !PyBool_Check(args[8]))) ||
        !is_str(args[9], "propagate") || !plain_out(args[10], args[0], type, args[0], Py_None) ||
        !is_str(args[11], "cpu") || !is_none(args[12]) || !is_none(args[13]) ||
        !is_none(args[14]) || !host_device(args[15]))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *y = output(args[10], args[0]), *mean = new_vector(channels, NPY_FLOAT64),
             *invstd = new_vector(channels, NPY_FLOAT64), *m2 = new_vector(channels, NPY_FLOAT64);
    int status = NBN_OK;
    if (y && mean && invstd && m2)
        status = lib_forward_train_stats(type == NPY_FLOAT64, data(args[0]), outer, channels,
                                         inner, weight, bias, eps, data(y), data(mean),
                                         data(invstd), data(m2), running_mean, running_var,
                                         momentum, args[8] == Py_True);
    PyObject *arrays[] = {y, mean, invstd, m2};
    return results(status, 4, arrays, outer * inner, 4, train_result);
}

/* batch_backward(dy, x, mean, invstd, weight, axis, out, backend, exchange, activation, y,
 * residual_out, device) -> (dx, sum_dy, sum_dy_xmu, count, grad_weight, grad_bias) as
 * numba_bn.ops.BackwardResult (mean, invstd and the sums float64; the parameter gradients
 * invstd * sum_dy_xmu and sum_dy rounded to x's type, as ops.weight_gradient rounds them), or
 * NotImplemented */
static PyObject *batch_backward(PyObject *Py_UNUSED(module), PyObject *const *args,
                                Py_ssize_t nargs) {
    int type;
    int64_t outer, channels, inner;
    void *mean, *invstd, *weight;
    if (nargs != 13 || !plain_view(args[1], BACKWARD, &type, &outer, &channels, &inner) ||
        !like(args[0], args[1], type) || !vector(args[2], NPY_FLOAT64, channels, &mean) ||
        !vector(args[3], NPY_FLOAT64, channels, &invstd) ||
        !vector_or_none(args[4], type, channels, &weight) || !axis_one(args[5]) ||
        !plain_out(args[6], args[1], type, args[0], args[1]) || !is_str(args[7], "cpu") ||
        !is_none(args[8]) || !is_none(args[9]) || !is_none(args[10]) || !is_none(args[11]) ||
        !host_device(args[12]))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *dx = output(args[6], args[1]), *sum_dy = new_vector(channels, NPY_FLOAT64),
             *sum_dy_xmu = new_vector(channels, NPY_FLOAT64),
             *grad_weight = new_vector(channels, type), *grad_bias = new_vector(channels, type);
    PyObject *arrays[] = {dx, sum_dy, sum_dy_xmu, grad_weight, grad_bias};
    int status = NBN_OK;
    if (dx && sum_dy && sum_dy_xmu && grad_weight && grad_bias) {
        double *dy_sum = data(sum_dy), *dy_xmu_sum = data(sum_dy_xmu);
        status = lib_backward_stats(type == NPY_FLOAT64, data(args[0]), data(args[1]), outer,
                                    channels, inner, weight, mean, invstd, data(dx), dy_sum,
                                    dy_xmu_sum);
        const double *inverse = invstd;
        for (int64_t c = 0; c < channels && status == NBN_OK; c++) {
            double dweight = inverse[c] * dy_xmu_sum[c]; /* one rounding to x's type below */
            if (type == NPY_FLOAT64) {
                ((double *)data(grad_weight))[c] = dweight;
                ((double *)data(grad_bias))[c] = dy_sum[c];
            } else {
                ((float *)data(grad_weight))[c] = (float)dweight;
                ((float *)data(grad_bias))[c] = (float)dy_sum[c];
            }
        }
    }
    return results(status, 5, arrays, outer * inner, 3, backward_result);
}

/* configure(*addresses, *bounds, TrainResult, BackwardResult): the addresses of
 * nbn_forward_train, nbn_forward_eval, nbn_backward, nbn_forward_train_stats and
 * nbn_backward_stats, _f32 then _f64, and of nbn_status_string, then the serial bounds of the
 * three steps, in elements, then the result types of numba_bn.ops (tuple subclasses). */
static PyObject *configure(PyObject *Py_UNUSED(module), PyObject *const *args,
                           Py_ssize_t nargs) {
    if (nargs != ENTRY_POINTS + STEPS + 2) {
        PyErr_SetString(PyExc_TypeError,
                        "configure takes eleven addresses, three bounds and two result types");
        return NULL;
    }
    PyObject *const *kinds = args + ENTRY_POINTS + STEPS;
    for (int k = 0; k < 2; k++) {
        PyObject *kind = kinds[k];
        if (!PyType_Check(kind) || !PyType_IsSubtype((PyTypeObject *)kind, &PyTuple_Type)) {
            PyErr_SetString(PyExc_TypeError, "configure's result types must be tuple subclasses");
            return NULL;
        }
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
    library.f32 = (entry_points_f32){
        (forward_train_f32)address[0], (forward_eval_f32)address[1], (backward_f32)address[2],
        (forward_train_stats_f32)address[3], (backward_stats_f32)address[4]};
    library.f64 = (entry_points_f64){
        (forward_train_f64)address[5], (forward_eval_f64)address[6], (backward_f64)address[7],
        (forward_train_stats_f64)address[8], (backward_stats_f64)address[9]};
    library.status_string = (status_string_fn)address[10];
    for (int step = 0; step < STEPS; step++) serial_below[step] = bounds[step];
    Py_XSETREF(train_result, (PyTypeObject *)Py_NewRef(kinds[0]));
    Py_XSETREF(backward_result, (PyTypeObject *)Py_NewRef(kinds[1]));
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

/* nbn_shim.c: the C side of libnumba_bn.so (the API is numba_bn.h).
 *
 * The arithmetic is not here: it is numba_bn's Numba code (numba_bn/capi/ranges.py), compiled
 * by `numba-bn build-plugin` into one table of serial range drivers per instruction set.
 * nbn_kernels.h declares those tables; the build generates it from ranges.py, and
 * `numba-bn build-plugin --out DIR --header-only` writes the same header to DIR, to read.
 * This file
 *   - picks the table for the CPU at load time (a constructor; NBN_ISA=<name> picks a lower one),
 *   - checks arguments (nbn_checks.h) before anything is written,
 *   - allocates the per-call scratch (one malloc, freed before returning; NBN_ERR_SHAPE when
 *     its byte count overflows),
 *   - runs the drivers on its persistent worker threads (nbn_pool.h) over the work items of
 *     numba_bn/cpu/items.py, the items the JIT drivers run in prange, counted by the library
 *     (`plan`), never here:
 *       fused: one channel per item, start to finish, so x is read from memory once;
 *       otherwise: partials per reduction item, a merge per channel in part order, then the
 *         elementwise items.
 *   - for group and layer norm (1.3), runs the drivers of numba_bn/cpu/norm_kernels.py over
 *     their items (whole groups or rows; layer norm's backward: fixed row chunks whose column
 *     partials are added in chunk order), with weight and bias tiled per sample for group norm;
 *   - for the fused entry points (1.1), passes the residual and the epilogue code to the
 *     forward's elementwise pass, and runs the backward on g, the gradient through the
 *     activation (flat items into residual_out or into scratch), before the plain backward.
 * Items write disjoint outputs and each channel's merge runs in a fixed order, so results are
 * the same for any number of threads.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nbn_checks.h"
#include "nbn_kernels.h"

/* ------------------------------------------------------------- kernel table, chosen at load */
typedef struct {
    const char *name;
    const nbn_kernel_table *table;
} nbn_variant;

static const nbn_variant variants[] = {NBN_KERNEL_TABLES}; /* best first */
static const size_t n_variants = sizeof variants / sizeof variants[0];
static const nbn_variant *selected = &variants[sizeof variants / sizeof variants[0] - 1];

/* Whether this CPU (and OS) runs code built for `name`; a build for one named CPU (--cpu) is
 * taken as wanted. */
static int cpu_runs(const char *name) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    int v2 = __builtin_cpu_supports("ssse3") && __builtin_cpu_supports("sse4.2") &&
             __builtin_cpu_supports("popcnt");
    int v3 = v2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
    if (strcmp(name, "x86-64-v4") == 0) return v4;
    if (strcmp(name, "x86-64-v3") == 0) return v3;
    if (strcmp(name, "x86-64-v2") == 0) return v2;
#endif
    (void)name;
    return 1;
}

__attribute__((constructor)) static void nbn_select_variant(void) {
    const char *wanted = getenv("NBN_ISA");
    for (int pass = 0; pass < 2; pass++) { /* pass 0 honours NBN_ISA, pass 1 ignores it */
        for (size_t i = 0; i < n_variants; i++) {
            if (pass == 0 && wanted && *wanted && strcmp(wanted, variants[i].name) != 0) continue;
            if (cpu_runs(variants[i].name)) {
                selected = &variants[i];
                return;
            }
        }
    }
}

NBN_API const char *nbn_isa(void) { return selected->name; }

/* ------------------------------------------------------------------------------------ threads */
static atomic_int requested_threads; /* 0: every CPU this process may run on */

static int available_cpus(void) {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

NBN_API int nbn_get_num_threads(void) {
    int n = atomic_load(&requested_threads);
    return n > 0 ? n : available_cpus();
}

/* A range of work items; returns the driver's status (0: ok). `scratch` is the calling thread's
 * own NBN_THREAD_SCRATCH doubles. */
typedef int32_t (*nbn_range)(const void *job, int64_t first, int64_t last, double *scratch);

#define NBN_THREAD_SCRATCH NBN_ITEM_SCRATCH /* a reduction item's scratch (items.py) */
#define NBN_CLAIM_ELEMENTS (1 << 16)  /* elements per claim: hides the atomic, still balances */

typedef struct {
    nbn_range run;
    const void *job;
    int64_t items, grain;
    atomic_llong next;
    atomic_int failed;
} nbn_loop;

static void *loop_worker(void *arg) {
    nbn_loop *loop = arg;
    double scratch[NBN_THREAD_SCRATCH];
    for (;;) {
        int64_t first = atomic_fetch_add(&loop->next, loop->grain);
        if (first >= loop->items) return NULL;
        int64_t last = loop->items - first < loop->grain ? loop->items : first + loop->grain;
        if (loop->run(loop->job, first, last, scratch) != 0) atomic_store(&loop->failed, 1);
    }
}

#include "nbn_pool.h"

NBN_API void nbn_set_num_threads(int n) {
    atomic_store(&requested_threads, n > 0 ? n : 0);
    pool_fit(nbn_get_num_threads());
}

/* The threads a call of `size` elements runs on: the CPU backend's cost model
 * (numba_bn/cpu/__init__.py, threads_for; its constants come in nbn_kernels.h). A parallel call
 * costs NBN_WAKE_NS more than a serial one, then divides the serial time, `ns_per_element` (one
 * of NBN_NS_<STEP>) an element, among the threads; the answer goes to plan() too (whether
 * channels run whole depends on it), as the JIT drivers' does. One thing the shim knows that
 * the JIT backend cannot: whether its workers are asleep (nbn_pool.h). Then waking them costs
 * NBN_PARKED_WAKE_NS, and a call that would not repay it runs serially and wakes them ahead
 * for the next call. */
static int64_t call_threads(double ns_per_element, int64_t size) {
    int64_t threads = nbn_get_num_threads();
    double saved = ns_per_element * (double)size * (1.0 - 1.0 / (double)threads);
    if (threads == 1 || saved <= NBN_WAKE_NS) return 1;
    if (saved <= NBN_PARKED_WAKE_NS && atomic_load(&pool.parked) > 0) {
        pool_wake_ahead();
        return 1;
    }
    return threads;
}

/* Items [0, items), of about `item_elements` elements each, on up to `threads` threads (the
 * caller's included; call_threads): fewer when there are fewer claims of NBN_CLAIM_ELEMENTS
 * elements (a channel merge over a few partials runs on the calling thread), when a worker
 * cannot start, or when another call holds the pool (nbn_pool.h). */
static int parallel_items(nbn_range run, const void *job, int64_t items, int64_t item_elements,
                          int64_t threads) {
    nbn_loop loop = {.run = run, .job = job, .items = items};
    loop.grain = item_elements >= NBN_CLAIM_ELEMENTS ? 1 : NBN_CLAIM_ELEMENTS / item_elements;
    atomic_init(&loop.next, 0);
    atomic_init(&loop.failed, 0);
    int64_t claims = (items + loop.grain - 1) / loop.grain;
    if (threads > claims) threads = claims;
    run_loop(&loop, threads);
    return atomic_load(&loop.failed) ? NBN_ERR_INTERNAL : NBN_OK;
}

/* ------------------------------------------------------------------ one call's arguments */
typedef struct {
    const nbn_dtype_kernels *k;
    int64_t outer, channels, inner;
    const void *dy, *x;
    void *out; /* y or dx */
    const void *z;   /* the residual of the forward (x when there is none: never read) */
    int64_t epilogue; /* NBN_EPILOGUE_* bits of the forward's elementwise pass */
    const void *weight, *bias;
    int64_t n_weight, n_bias;
    double eps;
    void *coef;                  /* (NBN_AFFINE_ROWS or NBN_DX_ROWS, channels), tensor dtype */
    void *wide; /* the rows the elementwise items read: coef, or for short planes a column per
                   value of a plane (NBN_PLAN_COEF_COLUMNS; set_wide) */
    double *mean, *invstd, *m2;  /* per channel */
    double *sum_dy, *sum_dy_xmu; /* per channel */
    double *part;                /* (3 or 2, parts, channels) partials of the split layouts */
} nbn_call;

/* A pass over the flat tensor that needs no channel: g = dy where y > 0, else 0. */
typedef struct {
    const nbn_dtype_kernels *k;
    int64_t size;
    const void *dy, *y;
    void *g;
} nbn_flat_call;

/* The partition of a call comes from the library (numba_bn/cpu/items.py, exported as `plan`):
 * whether channels run whole, the partials per channel, and the count and size of the reduction
 * and elementwise items. The shim counts nothing itself, so the partials it allocates are the
 * ones the Numba code indexes, and its items are the JIT drivers' prange items. */
static int read_plan(const nbn_call *a, int64_t threads, int64_t plan[NBN_PLAN_SIZE]) {
    return a->k->plan(a->outer, a->channels, a->inner, threads, plan) == 0
               ? NBN_OK
               : NBN_ERR_INTERNAL;
}

static const nbn_dtype_kernels *kernels(int f64) {
    return f64 ? &selected->table->f64 : &selected->table->f32;
}

/* Scratch for one call: `doubles` float64 values, then room for `coef_values` coefficients of
 * the tensor dtype (float or double); counts of -1 are overflows (nbn_mul, nbn_add). NULL when
 * the byte count overflows, *status NBN_ERR_SHAPE: a shape that passes nbn_check_shape can
 * still need more than any address space (eval with 2^59 + 2 channels: over 2^64 bytes of
 * coefficients); NULL when malloc fails, *status NBN_ERR_INTERNAL. */
static double *alloc_scratch(int64_t doubles, int64_t coef_values, void **coef, int *status) {
    size_t bytes;
    *status = nbn_bytes(nbn_add(doubles, coef_values), sizeof(double), &bytes);
    if (*status != NBN_OK) return NULL;
    double *scratch = malloc(bytes);
    if (scratch)
        *coef = scratch + doubles;
    else
        *status = NBN_ERR_INTERNAL;
    return scratch;
}

static void store_vector(void *dst, int f64, const double *src, int64_t n) {
    if (f64) {
        memcpy(dst, src, (size_t)n * sizeof(double));
    } else {
        for (int64_t i = 0; i < n; i++) ((float *)dst)[i] = (float)src[i];
    }
}

static void load_vector(double *dst, const void *src, int f64, int64_t n) {
    if (f64) {
        memcpy(dst, src, (size_t)n * sizeof(double));
    } else {
        for (int64_t i = 0; i < n; i++) dst[i] = ((const float *)src)[i];
    }
}

/* Coefficient values a call's scratch holds: `rows` rows of its channels, and for short planes
 * (plan[NBN_PLAN_COEF_COLUMNS] > channels) the same rows with a column per value after them. */
static int64_t coef_room(int64_t rows, int64_t channels, const int64_t plan[NBN_PLAN_SIZE]) {
    int64_t columns = plan[NBN_PLAN_COEF_COLUMNS];
    return nbn_mul(rows, columns > channels ? nbn_add(channels, columns) : channels);
}

/* a->wide after a->coef is written: a->coef itself, or its rows spread to a column per value
 * (in the scratch after them, as coef_room counted); nonzero when the library fails. */
static int set_wide(nbn_call *a, int64_t rows, const int64_t plan[NBN_PLAN_SIZE], int f64) {
    if (plan[NBN_PLAN_COEF_COLUMNS] == a->channels) {
        a->wide = a->coef;
        return 0;
    }
    const size_t element = f64 ? sizeof(double) : sizeof(float);
    a->wide = (char *)a->coef + (size_t)(rows * a->channels) * element;
    return a->k->spread_coefficients(rows, a->channels, a->inner, a->coef, a->wide);
}

/* ------------------------------------------------------------------------- work item ranges */
static int32_t train_channels(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_call *a = job;
    (void)scratch;
    return a->k->train_plane_channels(a->x, a->outer, a->channels, a->inner, first, last, a->eps,
                                      a->weight, a->n_weight, a->bias, a->n_bias, a->out,
                                      a->coef, a->mean, a->invstd, a->m2, a->z, a->epilogue);
}

static int32_t stats(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_call *a = job;
    return a->k->stats_items(a->x, a->outer, a->channels, a->inner, first, last, a->part,
                             scratch);
}

static int32_t train_merge(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_call *a = job;
    (void)scratch;
    return a->k->train_from_parts(a->outer, a->channels, a->inner, first, last, a->part, a->eps,
                                  a->weight, a->n_weight, a->bias, a->n_bias, a->coef, a->mean,
                                  a->invstd, a->m2);
}

static int32_t normalize(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_call *a = job;
    (void)scratch;
    return a->k->normalize_items(a->x, a->outer, a->channels, a->inner, first, last, a->wide,
                                 a->out, a->z, a->epilogue);
}

static int32_t backward_channels(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_call *a = job;
    (void)scratch;
    return a->k->backward_plane_channels(a->dy, a->x, a->outer, a->channels, a->inner, first,
                                         last, a->mean, a->invstd, a->weight, a->n_weight,
                                         a->coef, a->sum_dy, a->sum_dy_xmu, a->out);
}

static int32_t sums(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_call *a = job;
    return a->k->sums_items(a->dy, a->x, a->outer, a->channels, a->inner, first, last, a->mean,
                            a->part, scratch);
}

static int32_t dx_merge(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_call *a = job;
    (void)scratch;
    return a->k->dx_from_parts(a->outer, a->channels, a->inner, first, last, a->part, a->mean,
                               a->invstd, a->weight, a->n_weight, a->coef, a->sum_dy,
                               a->sum_dy_xmu);
}

static int32_t dx_blocks(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_call *a = job;
    (void)scratch;
    return a->k->dx_items(a->dy, a->x, a->outer, a->channels, a->inner, first, last, a->wide,
                          a->out);
}

static int32_t relu_grad(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_flat_call *a = job;
    (void)scratch;
    return a->k->relu_grad_items(a->dy, a->y, a->size, first, last, a->g);
}

/* ------------------------------------------------------------------------------ operations */
/* The epilogue of the forward's elementwise pass (numba_bn/cpu/kernels.py), after
 * nbn_check_activation. */
static int64_t epilogue_code(const void *residual, int activation) {
    return (residual ? NBN_EPILOGUE_ADD : NBN_EPILOGUE_NONE) |
           (activation == NBN_ACTIVATION_RELU ? NBN_EPILOGUE_RELU : NBN_EPILOGUE_NONE);
}

/* The training forward. Its statistics go to save_mean and save_invstd (the tensor dtype), or,
 * with `statistics` (1.4), to statistics[0..2] (double: mean, invstd, m2) as the kernels keep
 * them; `unbiased` picks the running update's batch variance (PyTorch's m2 / (m - 1), or the
 * biased m2 / m). */
static int forward_train_stats(int f64, const void *x, int64_t outer, int64_t channels,
                               int64_t inner, const void *weight, const void *bias, double eps,
                               void *y, void *save_mean, void *save_invstd,
                               double *const statistics[3], void *running_mean,
                               void *running_var, double momentum, int unbiased,
                               const void *residual, int activation) {
    int status = nbn_check_forward_train_ex(x, outer, channels, inner, eps, y,
                                            statistics ? statistics[0] : save_mean,
                                            statistics ? statistics[1] : save_invstd,
                                            running_mean, running_var, momentum, activation);
    if (status == NBN_OK && statistics && !statistics[2]) status = NBN_ERR_NULL;
    if (status != NBN_OK) return status;
    nbn_call a = {.k = kernels(f64), .outer = outer, .channels = channels, .inner = inner,
                  .x = x, .out = y, .weight = weight, .bias = bias,
                  .n_weight = weight ? channels : 0, .n_bias = bias ? channels : 0, .eps = eps,
                  .z = residual ? residual : x, .epilogue = epilogue_code(residual, activation)};
    const int64_t threads = call_threads(NBN_NS_FORWARD_TRAIN, outer * channels * inner);
    int64_t plan[NBN_PLAN_SIZE];
    if ((status = read_plan(&a, threads, plan)) != NBN_OK) return status;
    int whole_channels = plan[NBN_PLAN_FUSED_FORWARD] != 0;
    int64_t n_part = whole_channels ? 0 : nbn_mul(3 * plan[NBN_PLAN_PARTS], channels);
    double *scratch = alloc_scratch(nbn_add(3 * channels, n_part),
                                    coef_room(NBN_AFFINE_ROWS, channels, plan), &a.coef,
                                    &status);
    if (!scratch) return status;
    a.mean = scratch, a.invstd = scratch + channels, a.m2 = scratch + 2 * channels;
    a.part = scratch + 3 * channels;

    if (whole_channels) {
        status = parallel_items(train_channels, &a, channels, outer * inner, threads);
    } else {
        status = parallel_items(stats, &a, plan[NBN_PLAN_REDUCE_ITEMS],
                                plan[NBN_PLAN_REDUCE_ITEM_ELEMENTS], threads);
        if (status == NBN_OK)
            status = parallel_items(train_merge, &a, plan[NBN_PLAN_CHANNEL_ITEMS],
                                    plan[NBN_PLAN_CHANNEL_ITEM_ELEMENTS], threads);
        if (status == NBN_OK && set_wide(&a, NBN_AFFINE_ROWS, plan, f64) != 0)
            status = NBN_ERR_INTERNAL;
        if (status == NBN_OK)
            status = parallel_items(normalize, &a, plan[NBN_PLAN_ELEMENTWISE_ITEMS],
                                    plan[NBN_PLAN_ELEMENTWISE_ITEM_ELEMENTS], threads);
    }
    if (status == NBN_OK && running_mean &&
        a.k->update_running(channels, running_mean, running_var, (double)(outer * inner), a.mean,
                            a.m2, momentum, unbiased != 0) != 0)
        status = NBN_ERR_INTERNAL;
    if (status == NBN_OK && statistics) {
        const double *kept[3] = {a.mean, a.invstd, a.m2};
        for (int k = 0; k < 3; k++)
            memcpy(statistics[k], kept[k], (size_t)channels * sizeof(double));
    } else if (status == NBN_OK) {
        store_vector(save_mean, f64, a.mean, channels);
        store_vector(save_invstd, f64, a.invstd, channels);
    }
    free(scratch);
    return status;
}

static int forward_train_ex(int f64, const void *x, int64_t outer, int64_t channels,
                            int64_t inner, const void *weight, const void *bias, double eps,
                            void *y, void *save_mean, void *save_invstd, void *running_mean,
                            void *running_var, double momentum, const void *residual,
                            int activation) {
    return forward_train_stats(f64, x, outer, channels, inner, weight, bias, eps, y, save_mean,
                               save_invstd, NULL, running_mean, running_var, momentum, 1,
                               residual, activation);
}

static int forward_eval_ex(int f64, const void *x, int64_t outer, int64_t channels,
                           int64_t inner, const void *weight, const void *bias,
                           const void *running_mean, const void *running_var, double eps,
                           void *y, const void *residual, int activation) {
    int status = nbn_check_forward_eval_ex(x, outer, channels, inner, running_mean, running_var,
                                           eps, y, activation);
    if (status != NBN_OK) return status;
    nbn_call a = {.k = kernels(f64), .outer = outer, .channels = channels, .inner = inner,
                  .x = x, .out = y, .z = residual ? residual : x,
                  .epilogue = epilogue_code(residual, activation)};
    const int64_t threads = call_threads(NBN_NS_FORWARD_EVAL, outer * channels * inner);
    int64_t plan[NBN_PLAN_SIZE];
    if ((status = read_plan(&a, threads, plan)) != NBN_OK) return status;
    double *scratch = alloc_scratch(0, coef_room(NBN_AFFINE_ROWS, channels, plan), &a.coef,
                                    &status);
    if (!scratch) return status;
    if (a.k->eval_coefficients(channels, weight, weight ? channels : 0, bias, bias ? channels : 0,
                               running_mean, running_var, eps, a.coef) != 0 ||
        set_wide(&a, NBN_AFFINE_ROWS, plan, f64) != 0)
        status = NBN_ERR_INTERNAL;
    else
        status = parallel_items(normalize, &a, plan[NBN_PLAN_ELEMENTWISE_ITEMS],
                                plan[NBN_PLAN_ELEMENTWISE_ITEM_ELEMENTS], threads);
    free(scratch);
    return status;
}

/* The backward. With `doubles` (1.4) save_mean and save_invstd are double (as
 * forward_train_stats gives them) and dweight and dbias are double and get the sums themselves:
 * sum(dy * (x - mean)) and sum(dy); else all four are of the tensor dtype, and dweight is
 * invstd * sum(dy * (x - mean)). */
static int backward_stats(int f64, int doubles, const void *dy, const void *x, int64_t outer,
                          int64_t channels, int64_t inner, const void *weight,
                          const void *save_mean, const void *save_invstd, void *dx, void *dweight,
                          void *dbias, const void *y, int activation, void *residual_out) {
    const size_t element = f64 ? sizeof(double) : sizeof(float);
    int status = nbn_check_backward_ex(dy, x, outer, channels, inner, save_mean, save_invstd, dx,
                                       y, activation, residual_out, element);
    if (status != NBN_OK) return status;
    nbn_call a = {.k = kernels(f64), .outer = outer, .channels = channels, .inner = inner,
                  .dy = dy, .x = x, .out = dx, .weight = weight,
                  .n_weight = weight ? channels : 0};
    const int64_t size = outer * channels * inner;
    const int64_t threads = call_threads(NBN_NS_BACKWARD, size);
    int64_t plan[NBN_PLAN_SIZE];
    if ((status = read_plan(&a, threads, plan)) != NBN_OK) return status;
    int whole_channels = plan[NBN_PLAN_FUSED_BACKWARD] != 0;
    int64_t n_part = whole_channels ? 0 : nbn_mul(2 * plan[NBN_PLAN_PARTS], channels);
    double *scratch = alloc_scratch(nbn_add(4 * channels, n_part),
                                    coef_room(NBN_DX_ROWS, channels, plan), &a.coef, &status);
    if (!scratch) return status;
    /* g, the gradient through the activation, is what the batch-norm backward runs on: dy
     * itself without one; with ReLU, computed into residual_out, or into a tensor of scratch
     * (allocated before anything is written, so a call that fails writes nothing) */
    const int relu = activation == NBN_ACTIVATION_RELU;
    void *g_scratch = NULL;
    if (relu && !residual_out) {
        size_t bytes;
        status = nbn_bytes(size, element, &bytes);
        if (status == NBN_OK && !(g_scratch = malloc(bytes))) status = NBN_ERR_INTERNAL;
        if (status != NBN_OK) {
            free(scratch);
            return status;
        }
    }
    a.mean = scratch, a.invstd = scratch + channels;
    a.sum_dy = scratch + 2 * channels, a.sum_dy_xmu = scratch + 3 * channels;
    a.part = scratch + 4 * channels;
    load_vector(a.mean, save_mean, f64 || doubles, channels);
    load_vector(a.invstd, save_invstd, f64 || doubles, channels);

    if (relu) {
        nbn_flat_call g = {.k = a.k, .size = size, .dy = dy, .y = y,
                           .g = residual_out ? residual_out : g_scratch};
        status = parallel_items(relu_grad, &g, plan[NBN_PLAN_FLAT_ITEMS],
                                plan[NBN_PLAN_FLAT_ITEM_ELEMENTS], threads);
        a.dy = g.g;
    } else if (residual_out) {
        memcpy(residual_out, dy, (size_t)size * element); /* before dx, which may be dy */
    }
    if (status != NBN_OK) {
        free(scratch), free(g_scratch);
        return status;
    }

    if (whole_channels) {
        status = parallel_items(backward_channels, &a, channels, outer * inner, threads);
    } else {
        status = parallel_items(sums, &a, plan[NBN_PLAN_REDUCE_ITEMS],
                                plan[NBN_PLAN_REDUCE_ITEM_ELEMENTS], threads);
        if (status == NBN_OK)
            status = parallel_items(dx_merge, &a, plan[NBN_PLAN_CHANNEL_ITEMS],
                                    plan[NBN_PLAN_CHANNEL_ITEM_ELEMENTS], threads);
        if (status == NBN_OK && set_wide(&a, NBN_DX_ROWS, plan, f64) != 0)
            status = NBN_ERR_INTERNAL;
        if (status == NBN_OK)
            status = parallel_items(dx_blocks, &a, plan[NBN_PLAN_ELEMENTWISE_ITEMS],
                                    plan[NBN_PLAN_ELEMENTWISE_ITEM_ELEMENTS], threads);
    }
    if (status == NBN_OK) {
        /* dweight = sum(dy * x_hat) = invstd * sum(dy * (x - mean)), as numba_bn.backward */
        if (!doubles)
            for (int64_t c = 0; c < channels; c++) a.sum_dy_xmu[c] *= a.invstd[c];
        if (dweight) store_vector(dweight, f64 || doubles, a.sum_dy_xmu, channels);
        if (dbias) store_vector(dbias, f64 || doubles, a.sum_dy, channels);
    }
    free(scratch), free(g_scratch);
    return status;
}

static int backward_ex(int f64, const void *dy, const void *x, int64_t outer, int64_t channels,
                       int64_t inner, const void *weight, const void *save_mean,
                       const void *save_invstd, void *dx, void *dweight, void *dbias,
                       const void *y, int activation, void *residual_out) {
    return backward_stats(f64, 0, dy, x, outer, channels, inner, weight, save_mean, save_invstd,
                          dx, dweight, dbias, y, activation, residual_out);
}

/* ---------------------------------------------------------------- group and layer norm (1.3)
 * The drivers of numba_bn/cpu/norm_kernels.py with their prange loop moved here: work items of
 * whole groups or rows (norm_plan counts them, in the library), each item's outputs its own,
 * and layer norm's column sums through partials of fixed row chunks added in chunk order; so
 * the results are those of the JIT drivers for any number of threads. */
typedef struct {
    const nbn_dtype_kernels *k;
    int64_t units;          /* groups (N * num_groups), or rows */
    int64_t group_channels; /* channels per group (group norm) */
    int64_t inner;          /* values per channel (group norm), or the row width */
    const void *dy, *x;
    void *out;                 /* y or dx */
    const void *weight, *bias; /* (C,) or NULL: group norm too (the kernels find the sample) */
    int64_t n_weight, n_bias;
    double eps;
    void *coef;                       /* group norm: affine rows per (n, c), dx terms per group */
    const double *mean, *invstd;      /* the backward's */
    double *mean_out, *invstd_out, *m2; /* the forward's */
    double *sum_dy, *sum_dy_xmu;      /* group norm backward, per (sample, channel) */
    double *part;                     /* layer norm backward, (chunks, 2, width) */
} nbn_norm_call;

static int read_norm_plan(const nbn_dtype_kernels *k, int64_t units, int64_t unit_size,
                          int chunked, int64_t plan[NBN_NORM_PLAN_SIZE]) {
    return k->norm_plan(units, unit_size, chunked, plan) == 0 ? NBN_OK : NBN_ERR_INTERNAL;
}

static int32_t group_train(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_norm_call *a = job;
    (void)scratch;
    return a->k->group_train_items(a->x, a->units, a->group_channels, a->inner, first, last,
                                   a->eps, a->weight, a->n_weight, a->bias, a->n_bias, a->coef,
                                   a->out, a->mean_out, a->invstd_out, a->m2);
}

static int32_t group_backward(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_norm_call *a = job;
    (void)scratch;
    return a->k->group_backward_items(a->dy, a->x, a->units, a->group_channels, a->inner, first,
                                      last, a->mean, a->invstd, a->weight, a->n_weight, a->coef,
                                      a->out, a->sum_dy, a->sum_dy_xmu);
}

static int32_t layer_train(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_norm_call *a = job;
    (void)scratch;
    return a->k->layer_train_items(a->x, a->units, a->inner, first, last, a->eps, a->weight,
                                   a->n_weight, a->bias, a->n_bias, a->out, a->mean_out,
                                   a->invstd_out);
}

static int32_t layer_backward(const void *job, int64_t first, int64_t last, double *scratch) {
    const nbn_norm_call *a = job;
    (void)scratch;
    return a->k->layer_backward_chunks(a->dy, a->x, a->units, a->inner, first, last, a->mean,
                                       a->invstd, a->weight, a->n_weight, a->out, a->part);
}

static int group_norm_forward(int f64, const void *x, int64_t outer, int64_t channels,
                              int64_t inner, int64_t num_groups, const void *weight,
                              const void *bias, double eps, void *y, double *mean,
                              double *invstd) {
    int status = nbn_check_group_norm_forward(x, outer, channels, inner, num_groups, eps, y,
                                              mean, invstd);
    if (status != NBN_OK) return status;
    /* below INT64_MAX / 8 after nbn_check_groups */
    const int64_t groups = outer * num_groups, planes = outer * channels;
    /* weight and bias (C,) as given: the kernels find a group's channels in its sample */
    nbn_norm_call a = {.k = kernels(f64), .units = groups, .group_channels = channels / num_groups,
                       .inner = inner, .x = x, .out = y, .weight = weight,
                       .n_weight = weight ? channels : 0, .bias = bias,
                       .n_bias = bias ? channels : 0, .eps = eps, .mean_out = mean,
                       .invstd_out = invstd};
    int64_t plan[NBN_NORM_PLAN_SIZE];
    status = read_norm_plan(a.k, groups, a.group_channels * inner, 0, plan);
    if (status != NBN_OK) return status;
    /* m2 per group; the coefficient rows per (sample, channel) */
    double *scratch = alloc_scratch(groups, nbn_mul(NBN_AFFINE_ROWS, planes), &a.coef, &status);
    if (!scratch) return status;
    a.m2 = scratch;
    status = parallel_items(group_train, &a, plan[NBN_NORM_PLAN_ITEMS],
                            plan[NBN_NORM_PLAN_UNITS_PER_ITEM] * a.group_channels * inner,
                            call_threads(NBN_NS_FORWARD_TRAIN, planes * inner));
    free(scratch);
    return status;
}

static int group_norm_backward(int f64, const void *dy, const void *x, int64_t outer,
                               int64_t channels, int64_t inner, int64_t num_groups,
                               const void *weight, const double *mean, const double *invstd,
                               void *dx, double *dweight, double *dbias) {
    int status = nbn_check_group_norm_backward(dy, x, outer, channels, inner, num_groups, mean,
                                               invstd, dx);
    if (status != NBN_OK) return status;
    const int64_t groups = outer * num_groups, planes = outer * channels;
    nbn_norm_call a = {.k = kernels(f64), .units = groups, .group_channels = channels / num_groups,
                       .inner = inner, .dy = dy, .x = x, .out = dx, .weight = weight,
                       .n_weight = weight ? channels : 0, .mean = mean, .invstd = invstd};
    int64_t plan[NBN_NORM_PLAN_SIZE];
    status = read_norm_plan(a.k, groups, a.group_channels * inner, 0, plan);
    if (status != NBN_OK) return status;
    /* sum_dy, sum_dy_xmu per (sample, channel); the dx terms per group */
    double *scratch = alloc_scratch(nbn_mul(2, planes), nbn_mul(NBN_GROUP_DX_ROWS, groups),
                                    &a.coef, &status);
    if (!scratch) return status;
    a.sum_dy = scratch, a.sum_dy_xmu = scratch + planes;
    status = parallel_items(group_backward, &a, plan[NBN_NORM_PLAN_ITEMS],
                            plan[NBN_NORM_PLAN_UNITS_PER_ITEM] * a.group_channels * inner,
                            call_threads(NBN_NS_BACKWARD, planes * inner));
    if (status == NBN_OK) {
        /* as numba_bn's group norm backward (norm_kernels.group_parameter_sums, the same
         * order): sum_dy_xmu * invstd per (sample, channel), then each channel's sums over the
         * samples in sample order, from 0 */
        for (int64_t p = 0; p < planes; p++) a.sum_dy_xmu[p] *= invstd[p / a.group_channels];
        for (int64_t c = 0; c < channels; c++) {
            double sum_dy = 0.0, sum_dy_xhat = 0.0;
            for (int64_t n = 0; n < outer; n++) {
                sum_dy += a.sum_dy[n * channels + c];
                sum_dy_xhat += a.sum_dy_xmu[n * channels + c];
            }
            if (dweight) dweight[c] = sum_dy_xhat;
            if (dbias) dbias[c] = sum_dy;
        }
    }
    free(scratch);
    return status;
}

static int layer_norm_forward(int f64, const void *x, int64_t rows, int64_t width,
                              const void *weight, const void *bias, double eps, void *y,
                              double *mean, double *invstd) {
    int status = nbn_check_layer_norm_forward(x, rows, width, eps, y, mean, invstd);
    if (status != NBN_OK) return status;
    nbn_norm_call a = {.k = kernels(f64), .units = rows, .inner = width, .x = x, .out = y,
                       .weight = weight, .bias = bias, .n_weight = weight ? width : 0,
                       .n_bias = bias ? width : 0, .eps = eps, .mean_out = mean,
                       .invstd_out = invstd};
    int64_t plan[NBN_NORM_PLAN_SIZE];
    status = read_norm_plan(a.k, rows, width, 0, plan);
    if (status != NBN_OK) return status;
    return parallel_items(layer_train, &a, plan[NBN_NORM_PLAN_ITEMS],
                          plan[NBN_NORM_PLAN_UNITS_PER_ITEM] * width,
                          call_threads(NBN_NS_FORWARD_TRAIN, rows * width));
}

static int layer_norm_backward(int f64, const void *dy, const void *x, int64_t rows,
                               int64_t width, const void *weight, const double *mean,
                               const double *invstd, void *dx, double *dweight, double *dbias) {
    int status = nbn_check_layer_norm_backward(dy, x, rows, width, mean, invstd, dx);
    if (status != NBN_OK) return status;
    nbn_norm_call a = {.k = kernels(f64), .units = rows, .inner = width, .dy = dy, .x = x,
                       .out = dx, .weight = weight, .n_weight = weight ? width : 0,
                       .mean = mean, .invstd = invstd};
    int64_t plan[NBN_NORM_PLAN_SIZE];
    status = read_norm_plan(a.k, rows, width, 1, plan);
    if (status != NBN_OK) return status;
    const int64_t chunks = plan[NBN_NORM_PLAN_ITEMS];
    /* the chunks' column partials (chunks, 2, width), then dweight and dbias */
    void *unused;
    double *scratch = alloc_scratch(nbn_mul(2 * chunks + 2, width), 0, &unused, &status);
    if (!scratch) return status;
    a.part = scratch;
    double *sums = scratch + 2 * chunks * width;
    status = parallel_items(layer_backward, &a, chunks, plan[NBN_NORM_PLAN_UNITS_PER_ITEM] * width,
                            call_threads(NBN_NS_BACKWARD, rows * width));
    if (status == NBN_OK && a.k->layer_add_parts(rows, width, a.part, sums, sums + width) != 0)
        status = NBN_ERR_INTERNAL;
    if (status == NBN_OK) {
        if (dweight) memcpy(dweight, sums, (size_t)width * sizeof(double));
        if (dbias) memcpy(dbias, sums + width, (size_t)width * sizeof(double));
    }
    free(scratch);
    return status;
}

/* ------------------------------------------------------------------------------ the C ABI */
#include "nbn_entry_points.h"

/* (1.4) numba_bn's library only: the training forward and backward with the statistics and
 * the backward's sums in double, as the kernels keep them (numba_bn.h). */
#define NBN_STATS_ENTRY_POINTS(T, SUFFIX, F64)                                                    \
    NBN_API int nbn_forward_train_stats_##SUFFIX(                                                 \
        const T *x, int64_t outer, int64_t channels, int64_t inner, const T *weight,              \
        const T *bias, double eps, T *y, double *mean, double *invstd, double *m2,                \
        T *running_mean, T *running_var, double momentum, int unbiased) {                         \
        double *const statistics[3] = {mean, invstd, m2};                                        \
        return forward_train_stats(F64, x, outer, channels, inner, weight, bias, eps, y, NULL,    \
                                   NULL, statistics, running_mean, running_var, momentum,         \
                                   unbiased, NULL, NBN_ACTIVATION_NONE);                          \
    }                                                                                             \
    NBN_API int nbn_backward_stats_##SUFFIX(                                                      \
        const T *dy, const T *x, int64_t outer, int64_t channels, int64_t inner,                  \
        const T *weight, const double *mean, const double *invstd, T *dx, double *sum_dy,         \
        double *sum_dy_xmu) {                                                                     \
        return backward_stats(F64, 1, dy, x, outer, channels, inner, weight, mean, invstd, dx,    \
                              sum_dy_xmu, sum_dy, NULL, NBN_ACTIVATION_NONE, NULL);               \
    }

NBN_STATS_ENTRY_POINTS(float, f32, 0)
NBN_STATS_ENTRY_POINTS(double, f64, 1)

#undef NBN_STATS_ENTRY_POINTS

/* test_host.c: checks libnumba_bn.so from C, with no Python anywhere.
 *
 *   cc -std=c11 -O2 -I $CSRC $CSRC/test_host.c -L DIR -lnumba_bn -Wl,-rpath,DIR -lm -o host
 *   env -i ./host            (tests/test_plugin.py does this, once per instruction set)
 *   env -i ./host layer      (the layer handle's checks only; the tests run it under ASan)
 *   env -i ./host norms      (group and layer norm's checks only (1.3); under ASan too)
 * CSRC is this folder, numba_bn/capi/csrc (installed: numba_bn.capi.csrc_dir()); .ci/run
 * builds and runs it against a library built from the installed wheel.
 *
 * For several shapes (planes and rows, one and many blocks, chunks and tiles), both types, with
 * and without weight/bias, it checks the six compute functions and the six fused _ex ones (1.1:
 * residual add, ReLU, the residual's gradient) against the double-precision reference of
 * reference.h, that 1 and 2 threads give identical bits, that in-place calls give the bits of
 * out-of-place ones, the status code of each kind of bad argument (shapes whose scratch cannot
 * exist, unknown activations and an overlapping residual_out included) and that a failed call
 * writes nothing, and that eval with eps = 0 follows IEEE. The layer handle (1.2): training
 * steps and eval give the bits of those entry points called by hand, its running buffers
 * follow PyTorch's update computed here, its status codes, and that a failed call changes
 * neither the layer nor its outputs; create/destroy of every flag combination (leaks show under
 * -fsanitize=address). Group and layer norm (1.3): forward and backward against the reference
 * (groups 1, 2 and one per channel, odd sizes), 1 and 2 threads bitwise, in place, and the status
 * code of each bad argument with nothing written. The worker threads: calls with thread counts changing between them
 * (1, 2, 3, 1, ...: the pool grows and shrinks) give the bits of the first, and calls from
 * several threads at once (while another thread changes the count) give the bits of calls made
 * one at a time. Prints one line per failure (line-buffered, so a crash keeps them) and a
 * summary; exit status 0 when all pass.
 *
 *   env -i ./host threads    (the worker-thread checks only, e.g. under -fsanitize=thread)
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "numba_bn.h"
#include "reference.h"

static int checks, failures;

static void check(int ok, const char *what, const char *context) {
    checks++;
    if (!ok) {
        failures++;
        printf("FAIL %s (%s)\n", what, context);
    }
}

/* ---------------------------------------------------------------------------- test data */
static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static double uniform(void) { /* xorshift64*, in [0, 1) */
    rng_state ^= rng_state >> 12, rng_state ^= rng_state << 25, rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545f4914f6cdd1du) >> 11) / 9007199254740992.0;
}

/* Per channel a different offset and scale, so channels are not alike. */
static void fill_input(double *x, int64_t outer, int64_t channels, int64_t inner) {
    for (int64_t c = 0; c < channels; c++) {
        double offset = 20.0 * uniform() - 5.0, scale = 0.1 + 4.0 * uniform();
        for (int64_t n = 0; n < outer; n++)
            for (int64_t i = 0; i < inner; i++)
                x[(n * channels + c) * inner + i] = offset + scale * (2.0 * uniform() - 1.0);
    }
}

static void fill(double *v, int64_t n, double low, double high) {
    for (int64_t i = 0; i < n; i++) v[i] = low + (high - low) * uniform();
}

/* A tensor in double (the reference's) and in the type under test. */
typedef struct {
    int f64;
    int64_t n;
    double *d;
    void *t;
} tensor;

static tensor make(int f64, int64_t n) {
    tensor a = {f64, n, calloc((size_t)n, sizeof(double)), calloc((size_t)n, f64 ? 8 : 4)};
    return a;
}

static void release(tensor *a) { free(a->d), free(a->t); }

static double get(const tensor *a, int64_t i) {
    return a->f64 ? ((double *)a->t)[i] : ((float *)a->t)[i];
}

/* Round the double values to the tested type and back, so both sides see the same inputs. */
static void sync_from_double(tensor *a) {
    for (int64_t i = 0; i < a->n; i++) {
        if (a->f64) {
            ((double *)a->t)[i] = a->d[i];
        } else {
            ((float *)a->t)[i] = (float)a->d[i];
            a->d[i] = ((float *)a->t)[i];
        }
    }
}

static void poison(tensor *a) { memset(a->t, 0xff, (size_t)a->n * (a->f64 ? 8 : 4)); }

static int same_bits(const tensor *a, const tensor *b) {
    return a->n == b->n && memcmp(a->t, b->t, (size_t)a->n * (a->f64 ? 8 : 4)) == 0;
}

/* max |tested - reference| <= tol * max(1, max |reference|), NaN fails. */
static void check_close(const tensor *tested, const double *reference, double tol,
                        const char *what, const char *context) {
    double worst = 0.0, size = 1.0;
    for (int64_t i = 0; i < tested->n; i++) size = fmax(size, fabs(reference[i]));
    for (int64_t i = 0; i < tested->n; i++) {
        double err = fabs(get(tested, i) - reference[i]);
        if (!(err <= worst)) worst = err; /* NaN sticks */
    }
    char line[256];
    snprintf(line, sizeof line, "%s; max error %.3g, scale %.3g", context, worst, size);
    check(worst <= tol * size, what, line);
}

/* max |tested - reference| <= tol * max(1, max |reference|) for double vectors, NaN fails. */
static void check_close_doubles(const double *tested, const double *reference, int64_t n,
                                double tol, const char *what, const char *context) {
    tensor view = {1, n, NULL, (void *)tested};
    check_close(&view, reference, tol, what, context);
}

/* ------------------------------------------------------------------------- calls by type */
static int train(const tensor *x, int64_t o, int64_t c, int64_t i, const tensor *w,
                 const tensor *b, double eps, tensor *y, tensor *mean, tensor *invstd,
                 tensor *rm, tensor *rv, double momentum) {
    if (x->f64)
        return nbn_forward_train_f64(x->t, o, c, i, w ? w->t : NULL, b ? b->t : NULL, eps, y->t,
                                     mean->t, invstd->t, rm ? rm->t : NULL, rv ? rv->t : NULL,
                                     momentum);
    return nbn_forward_train_f32(x->t, o, c, i, w ? w->t : NULL, b ? b->t : NULL, eps, y->t,
                                 mean->t, invstd->t, rm ? rm->t : NULL, rv ? rv->t : NULL,
                                 momentum);
}

static int eval(const tensor *x, int64_t o, int64_t c, int64_t i, const tensor *w,
                const tensor *b, const tensor *rm, const tensor *rv, double eps, tensor *y) {
    if (x->f64)
        return nbn_forward_eval_f64(x->t, o, c, i, w ? w->t : NULL, b ? b->t : NULL, rm->t,
                                    rv->t, eps, y->t);
    return nbn_forward_eval_f32(x->t, o, c, i, w ? w->t : NULL, b ? b->t : NULL, rm->t, rv->t,
                                eps, y->t);
}

static int back(const tensor *dy, const tensor *x, int64_t o, int64_t c, int64_t i,
                const tensor *w, const tensor *mean, const tensor *invstd, tensor *dx,
                tensor *dw, tensor *db) {
    if (x->f64)
        return nbn_backward_f64(dy->t, x->t, o, c, i, w ? w->t : NULL, mean->t, invstd->t,
                                dx->t, dw ? dw->t : NULL, db ? db->t : NULL);
    return nbn_backward_f32(dy->t, x->t, o, c, i, w ? w->t : NULL, mean->t, invstd->t, dx->t,
                            dw ? dw->t : NULL, db ? db->t : NULL);
}

static int train_ex(const tensor *x, int64_t o, int64_t c, int64_t i, const tensor *w,
                    const tensor *b, double eps, tensor *y, tensor *mean, tensor *invstd,
                    const tensor *z, int activation) {
    if (x->f64)
        return nbn_forward_train_ex_f64(x->t, o, c, i, w ? w->t : NULL, b ? b->t : NULL, eps,
                                        y->t, mean->t, invstd->t, NULL, NULL, 0.1,
                                        z ? z->t : NULL, activation);
    return nbn_forward_train_ex_f32(x->t, o, c, i, w ? w->t : NULL, b ? b->t : NULL, eps, y->t,
                                    mean->t, invstd->t, NULL, NULL, 0.1, z ? z->t : NULL,
                                    activation);
}

static int eval_ex(const tensor *x, int64_t o, int64_t c, int64_t i, const tensor *w,
                   const tensor *b, const tensor *rm, const tensor *rv, double eps, tensor *y,
                   const tensor *z, int activation) {
    if (x->f64)
        return nbn_forward_eval_ex_f64(x->t, o, c, i, w ? w->t : NULL, b ? b->t : NULL, rm->t,
                                       rv->t, eps, y->t, z ? z->t : NULL, activation);
    return nbn_forward_eval_ex_f32(x->t, o, c, i, w ? w->t : NULL, b ? b->t : NULL, rm->t,
                                   rv->t, eps, y->t, z ? z->t : NULL, activation);
}

static int back_ex(const tensor *dy, const tensor *x, int64_t o, int64_t c, int64_t i,
                   const tensor *w, const tensor *mean, const tensor *invstd, tensor *dx,
                   tensor *dw, tensor *db, const tensor *y, int activation, tensor *dz) {
    if (x->f64)
        return nbn_backward_ex_f64(dy->t, x->t, o, c, i, w ? w->t : NULL, mean->t, invstd->t,
                                   dx->t, dw ? dw->t : NULL, db ? db->t : NULL, y ? y->t : NULL,
                                   activation, dz ? dz->t : NULL);
    return nbn_backward_ex_f32(dy->t, x->t, o, c, i, w ? w->t : NULL, mean->t, invstd->t, dx->t,
                               dw ? dw->t : NULL, db ? db->t : NULL, y ? y->t : NULL, activation,
                               dz ? dz->t : NULL);
}

static int train_stats(const tensor *x, int64_t o, int64_t c, int64_t i, const tensor *w,
                       const tensor *b, double eps, tensor *y, double *mean, double *invstd,
                       double *m2, tensor *rm, tensor *rv, double momentum, int unbiased) {
    if (x->f64)
        return nbn_forward_train_stats_f64(x->t, o, c, i, w ? w->t : NULL, b ? b->t : NULL, eps,
                                           y->t, mean, invstd, m2, rm ? rm->t : NULL,
                                           rv ? rv->t : NULL, momentum, unbiased);
    return nbn_forward_train_stats_f32(x->t, o, c, i, w ? w->t : NULL, b ? b->t : NULL, eps,
                                       y->t, mean, invstd, m2, rm ? rm->t : NULL,
                                       rv ? rv->t : NULL, momentum, unbiased);
}

static int back_stats(const tensor *dy, const tensor *x, int64_t o, int64_t c, int64_t i,
                      const tensor *w, const double *mean, const double *invstd, tensor *dx,
                      double *sum_dy, double *sum_dy_xmu) {
    if (x->f64)
        return nbn_backward_stats_f64(dy->t, x->t, o, c, i, w ? w->t : NULL, mean, invstd,
                                      dx->t, sum_dy, sum_dy_xmu);
    return nbn_backward_stats_f32(dy->t, x->t, o, c, i, w ? w->t : NULL, mean, invstd, dx->t,
                                  sum_dy, sum_dy_xmu);
}

/* The library's values of a tensor, as doubles (n of them): what the reference is given. */
static double *values(const tensor *a) {
    double *v = calloc((size_t)a->n, sizeof(double));
    for (int64_t k = 0; k < a->n; k++) v[k] = get(a, k);
    return v;
}

/* ------------------------------------------------------------- results against the reference */
typedef struct {
    tensor y, mean, invstd, rm, rv, y_eval, dx, dw, db;
    /* the fused entry points: y = relu(BN(x) + z), and the backward with residual_out dz */
    tensor fy, fmean, finvstd, fy_eval, fdx, fdw, fdb, fdz;
} results;

static results run_all(const tensor *x, const tensor *dy, const tensor *z, int64_t o, int64_t c,
                       int64_t i, const tensor *w, const tensor *b, double eps, double momentum,
                       const char *context) {
    int f64 = x->f64;
    int64_t size = o * c * i;
    results r = {make(f64, size), make(f64, c),    make(f64, c),    make(f64, c),
                 make(f64, c),    make(f64, size), make(f64, size), make(f64, c),
                 make(f64, c),    make(f64, size), make(f64, c),    make(f64, c),
                 make(f64, size), make(f64, size), make(f64, c),    make(f64, c),
                 make(f64, size)};
    tensor *outputs[] = {&r.y,  &r.mean,    &r.invstd, &r.y_eval,  &r.dx,  &r.dw,  &r.db,
                         &r.fy, &r.fmean,   &r.finvstd, &r.fy_eval, &r.fdx, &r.fdw, &r.fdb,
                         &r.fdz};
    for (size_t k = 0; k < sizeof outputs / sizeof outputs[0]; k++) poison(outputs[k]);
    for (int64_t k = 0; k < c; k++) r.rm.d[k] = 0.5 * k, r.rv.d[k] = 1.0 + 0.25 * k;
    sync_from_double(&r.rm), sync_from_double(&r.rv);
    check(train(x, o, c, i, w, b, eps, &r.y, &r.mean, &r.invstd, &r.rm, &r.rv, momentum) == 0,
          "forward_train returns NBN_OK", context);
    check(eval(x, o, c, i, w, b, &r.rm, &r.rv, eps, &r.y_eval) == 0,
          "forward_eval returns NBN_OK", context);
    check(back(dy, x, o, c, i, w, &r.mean, &r.invstd, &r.dx, &r.dw, &r.db) == 0,
          "backward returns NBN_OK", context);
    check(train_ex(x, o, c, i, w, b, eps, &r.fy, &r.fmean, &r.finvstd, z,
                   NBN_ACTIVATION_RELU) == NBN_OK,
          "forward_train_ex (residual, relu) returns NBN_OK", context);
    check(eval_ex(x, o, c, i, w, b, &r.rm, &r.rv, eps, &r.fy_eval, z, NBN_ACTIVATION_RELU) ==
              NBN_OK, "forward_eval_ex (residual, relu) returns NBN_OK", context);
    check(back_ex(dy, x, o, c, i, w, &r.fmean, &r.finvstd, &r.fdx, &r.fdw, &r.fdb, &r.fy,
                  NBN_ACTIVATION_RELU, &r.fdz) == NBN_OK,
          "backward_ex (relu, residual_out) returns NBN_OK", context);
    return r;
}

static void release_results(results *r) {
    tensor *all[] = {&r->y,   &r->mean,    &r->invstd,  &r->rm,  &r->rv,  &r->y_eval,
                     &r->dx,  &r->dw,      &r->db,      &r->fy,  &r->fmean, &r->finvstd,
                     &r->fy_eval, &r->fdx, &r->fdw,     &r->fdb, &r->fdz};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) release(all[k]);
}

static void check_against_reference(const results *r, const tensor *x, const tensor *dy,
                                    const tensor *z, int64_t o, int64_t c, int64_t i,
                                    const tensor *w, const tensor *b, double eps,
                                    double momentum, const char *context) {
    int64_t size = o * c * i;
    double tol = x->f64 ? 1e-12 : 2e-6;
    double *y = calloc((size_t)size, sizeof(double)), *dx = calloc((size_t)size, sizeof(double));
    double *v = calloc(8 * (size_t)c, sizeof(double));
    double *mean = v, *invstd = v + c, *var_u = v + 2 * c, *rm = v + 3 * c, *rv = v + 4 * c;
    double *dw = v + 5 * c, *db = v + 6 * c, *scratch = v + 7 * c;
    const double *wd = w ? w->d : NULL, *bd = b ? b->d : NULL;

    reference_forward_train(x->d, o, c, i, wd, bd, eps, y, mean, invstd, var_u);
    for (int64_t k = 0; k < c; k++) rm[k] = 0.5 * k, rv[k] = 1.0 + 0.25 * k;
    reference_running_update(c, mean, var_u, momentum, rm, rv);
    check_close(&r->y, y, tol, "forward_train y", context);
    check_close(&r->mean, mean, tol, "forward_train save_mean", context);
    check_close(&r->invstd, invstd, tol, "forward_train save_invstd", context);
    check_close(&r->rm, rm, tol, "forward_train running_mean", context);
    check_close(&r->rv, rv, tol, "forward_train running_var", context);

    /* eval and backward from the library's own (rounded) statistics */
    for (int64_t k = 0; k < c; k++) rm[k] = get(&r->rm, k), rv[k] = get(&r->rv, k);
    reference_forward_eval(x->d, o, c, i, wd, bd, rm, rv, eps, scratch, y);
    check_close(&r->y_eval, y, tol, "forward_eval y", context);
    for (int64_t k = 0; k < c; k++) mean[k] = get(&r->mean, k), invstd[k] = get(&r->invstd, k);
    reference_backward(dy->d, x->d, o, c, i, wd, mean, invstd, dx, dw, db);
    check_close(&r->dx, dx, x->f64 ? 1e-10 : 2e-5, "backward dx", context);
    check_close(&r->dw, dw, tol, "backward dweight", context);
    check_close(&r->db, db, tol, "backward dbias", context);

    /* fused: y = relu(BN(x) + z); its backward from the library's own y and statistics */
    reference_forward_train(x->d, o, c, i, wd, bd, eps, y, mean, invstd, var_u);
    reference_epilogue(y, size, z->d, 1);
    check_close(&r->fy, y, tol, "forward_train_ex y (residual, relu)", context);
    check_close(&r->fmean, mean, tol, "forward_train_ex save_mean", context);
    check_close(&r->finvstd, invstd, tol, "forward_train_ex save_invstd", context);
    reference_forward_eval(x->d, o, c, i, wd, bd, rm, rv, eps, scratch, y);
    reference_epilogue(y, size, z->d, 1);
    check_close(&r->fy_eval, y, tol, "forward_eval_ex y (residual, relu)", context);
    double *fy = values(&r->fy), *g = calloc((size_t)size, sizeof(double));
    reference_relu_grad(dy->d, fy, size, g);
    check_close(&r->fdz, g, 0.0, "backward_ex residual_out is dy where y > 0, else 0", context);
    for (int64_t k = 0; k < c; k++) mean[k] = get(&r->fmean, k), invstd[k] = get(&r->finvstd, k);
    reference_backward(g, x->d, o, c, i, wd, mean, invstd, dx, dw, db);
    check_close(&r->fdx, dx, x->f64 ? 1e-10 : 2e-5, "backward_ex dx (relu)", context);
    check_close(&r->fdw, dw, tol, "backward_ex dweight (relu)", context);
    check_close(&r->fdb, db, tol, "backward_ex dbias (relu)", context);
    free(y), free(dx), free(v), free(fy), free(g);
}

static void check_same_bits(const results *a, const results *b, const char *what,
                            const char *context) {
    int same = same_bits(&a->y, &b->y) && same_bits(&a->mean, &b->mean) &&
               same_bits(&a->invstd, &b->invstd) && same_bits(&a->rm, &b->rm) &&
               same_bits(&a->rv, &b->rv) && same_bits(&a->y_eval, &b->y_eval) &&
               same_bits(&a->dx, &b->dx) && same_bits(&a->dw, &b->dw) &&
               same_bits(&a->db, &b->db) && same_bits(&a->fy, &b->fy) &&
               same_bits(&a->fmean, &b->fmean) && same_bits(&a->finvstd, &b->finvstd) &&
               same_bits(&a->fy_eval, &b->fy_eval) && same_bits(&a->fdx, &b->fdx) &&
               same_bits(&a->fdw, &b->fdw) && same_bits(&a->fdb, &b->fdb) &&
               same_bits(&a->fdz, &b->fdz);
    check(same, what, context);
}

/* In place (y = x, dx = dy) gives the bits of out-of-place; NULL dweight/dbias leave dx as is. */
static void check_in_place(const results *r, const tensor *x, const tensor *dy, int64_t o,
                           int64_t c, int64_t i, const tensor *w, const tensor *b, double eps,
                           const char *context) {
    int f64 = x->f64;
    tensor buffer = make(f64, o * c * i), mean = make(f64, c), invstd = make(f64, c);
    memcpy(buffer.t, x->t, (size_t)buffer.n * (f64 ? 8 : 4));
    train(&buffer, o, c, i, w, b, eps, &buffer, &mean, &invstd, NULL, NULL, 0.1);
    check(same_bits(&buffer, &r->y), "forward_train in place", context);
    memcpy(buffer.t, x->t, (size_t)buffer.n * (f64 ? 8 : 4));
    eval(&buffer, o, c, i, w, b, &r->rm, &r->rv, eps, &buffer);
    check(same_bits(&buffer, &r->y_eval), "forward_eval in place", context);
    memcpy(buffer.t, dy->t, (size_t)buffer.n * (f64 ? 8 : 4));
    back(&buffer, x, o, c, i, w, &r->mean, &r->invstd, &buffer, NULL, NULL);
    check(same_bits(&buffer, &r->dx), "backward in place, no dweight/dbias", context);
    release(&buffer), release(&mean), release(&invstd);
}

/* The fused entry points in place: y = x, y = residual, dx = dy give the out-of-place bits. */
static void check_fused_in_place(const results *r, const tensor *x, const tensor *dy,
                                 const tensor *z, int64_t o, int64_t c, int64_t i,
                                 const tensor *w, const tensor *b, double eps,
                                 const char *context) {
    int f64 = x->f64;
    size_t bytes = (size_t)(o * c * i) * (f64 ? 8 : 4);
    tensor buffer = make(f64, o * c * i), dz = make(f64, o * c * i);
    tensor mean = make(f64, c), invstd = make(f64, c);
    memcpy(buffer.t, x->t, bytes);
    train_ex(&buffer, o, c, i, w, b, eps, &buffer, &mean, &invstd, z, NBN_ACTIVATION_RELU);
    check(same_bits(&buffer, &r->fy), "forward_train_ex in place (y = x)", context);
    memcpy(buffer.t, z->t, bytes);
    train_ex(x, o, c, i, w, b, eps, &buffer, &mean, &invstd, &buffer, NBN_ACTIVATION_RELU);
    check(same_bits(&buffer, &r->fy), "forward_train_ex in place (y = residual)", context);
    memcpy(buffer.t, z->t, bytes);
    eval_ex(x, o, c, i, w, b, &r->rm, &r->rv, eps, &buffer, &buffer, NBN_ACTIVATION_RELU);
    check(same_bits(&buffer, &r->fy_eval), "forward_eval_ex in place (y = residual)", context);
    memcpy(buffer.t, dy->t, bytes);
    back_ex(&buffer, x, o, c, i, w, &r->fmean, &r->finvstd, &buffer, NULL, NULL, &r->fy,
            NBN_ACTIVATION_RELU, &dz);
    check(same_bits(&buffer, &r->fdx) && same_bits(&dz, &r->fdz),
          "backward_ex in place (dx = dy), with residual_out", context);
    release(&buffer), release(&dz), release(&mean), release(&invstd);
}

/* The other epilogues against the reference (residual without relu, relu without residual),
 * backward_ex without residual_out, and backward_ex without activation (residual_out = dy). */
static void check_fused_variants(const results *r, const tensor *x, const tensor *dy,
                                 const tensor *z, int64_t o, int64_t c, int64_t i,
                                 const tensor *w, const tensor *b, double eps,
                                 const char *context) {
    int f64 = x->f64;
    int64_t size = o * c * i;
    double tol = f64 ? 1e-12 : 2e-6;
    const double *wd = w ? w->d : NULL, *bd = b ? b->d : NULL;
    tensor out = make(f64, size), mean = make(f64, c), invstd = make(f64, c);
    tensor dw = make(f64, c), db = make(f64, c), dz = make(f64, size);
    double *y = calloc((size_t)size, sizeof(double)), *v = calloc(4 * (size_t)c, sizeof(double));
    double *ref_mean = v, *ref_invstd = v + c, *var_u = v + 2 * c, *rm = v + 3 * c;
    double *rv = calloc((size_t)c, sizeof(double));
    for (int64_t k = 0; k < c; k++) rm[k] = get(&r->rm, k), rv[k] = get(&r->rv, k);
    const struct {
        int residual, activation;
        const char *name;
    } epilogues[] = {{1, NBN_ACTIVATION_NONE, "residual"}, {0, NBN_ACTIVATION_RELU, "relu"}};
    for (size_t e = 0; e < 2; e++) {
        char what[128];
        const tensor *zp = epilogues[e].residual ? z : NULL;
        int relu = epilogues[e].activation == NBN_ACTIVATION_RELU;
        poison(&out);
        int status = train_ex(x, o, c, i, w, b, eps, &out, &mean, &invstd, zp,
                              epilogues[e].activation);
        reference_forward_train(x->d, o, c, i, wd, bd, eps, y, ref_mean, ref_invstd, var_u);
        reference_epilogue(y, size, zp ? z->d : NULL, relu);
        snprintf(what, sizeof what, "forward_train_ex y (%s)", epilogues[e].name);
        check(status == NBN_OK, what, context);
        check_close(&out, y, tol, what, context);
        poison(&out);
        status = eval_ex(x, o, c, i, w, b, &r->rm, &r->rv, eps, &out, zp,
                         epilogues[e].activation);
        reference_forward_eval(x->d, o, c, i, wd, bd, rm, rv, eps, ref_invstd, y);
        reference_epilogue(y, size, zp ? z->d : NULL, relu);
        snprintf(what, sizeof what, "forward_eval_ex y (%s)", epilogues[e].name);
        check(status == NBN_OK, what, context);
        check_close(&out, y, tol, what, context);
    }
    poison(&out), poison(&dw), poison(&db);
    check(back_ex(dy, x, o, c, i, w, &r->fmean, &r->finvstd, &out, &dw, &db, &r->fy,
                  NBN_ACTIVATION_RELU, NULL) == NBN_OK &&
              same_bits(&out, &r->fdx) && same_bits(&dw, &r->fdw) && same_bits(&db, &r->fdb),
          "backward_ex without residual_out: the bits of the one with it", context);
    poison(&out), poison(&dw), poison(&db), poison(&dz);
    check(back_ex(dy, x, o, c, i, w, &r->mean, &r->invstd, &out, &dw, &db, NULL,
                  NBN_ACTIVATION_NONE, &dz) == NBN_OK &&
              same_bits(&out, &r->dx) && same_bits(&dw, &r->dw) && same_bits(&db, &r->db),
          "backward_ex without activation: the bits of backward", context);
    check(same_bits(&dz, dy), "backward_ex without activation: residual_out = dy", context);
    release(&out), release(&mean), release(&invstd), release(&dw), release(&db), release(&dz);
    free(y), free(v), free(rv);
}

/* Whether doubles rounded to a tensor's type (as the library stores a statistic) are its bits. */
static int same_rounded(const double *v, const tensor *t) {
    for (int64_t k = 0; k < t->n; k++) {
        float f = (float)v[k];
        if (t->f64 ? memcmp(&v[k], (double *)t->t + k, 8) : memcmp(&f, (float *)t->t + k, 4))
            return 0;
    }
    return 1;
}

/* (1.4) The double-statistics entry points. nbn_forward_train_stats_*: forward_train's y and
 * (unbiased) running buffers bit for bit, statistics that round to its save_mean and
 * save_invstd, m2 / m the reference's biased variance, and with unbiased = 0 the running update
 * of the biased variance; a NULL m2 is NBN_ERR_NULL with nothing written.
 * nbn_backward_stats_*: given save_mean and save_invstd, backward's dx, and sums that give its
 * dbias and dweight as backward rounds them; given the double statistics, the reference. */
static void check_double_statistics(const results *r, const tensor *x, const tensor *dy,
                                    int64_t o, int64_t c, int64_t i, const tensor *w,
                                    const tensor *b, double eps, double momentum,
                                    const char *context) {
    int f64 = x->f64;
    int64_t size = o * c * i, m = o * i;
    double tol = f64 ? 1e-12 : 2e-6;
    tensor y = make(f64, size), dx = make(f64, size), rm = make(f64, c), rv = make(f64, c);
    double *v = calloc(14 * (size_t)c, sizeof(double));
    double *mean = v, *invstd = v + c, *m2 = v + 2 * c, *sum_dy = v + 3 * c;
    double *sum_dy_xmu = v + 4 * c, *ref_mean = v + 5 * c, *ref_invstd = v + 6 * c;
    double *var = v + 7 * c, *ref_rm = v + 8 * c, *ref_rv = v + 9 * c, *ref_dw = v + 10 * c;
    double *ref_db = v + 11 * c, *saved_mean = v + 12 * c, *saved_invstd = v + 13 * c;
    double *ref = calloc((size_t)size, sizeof(double));
    const double *wd = w ? w->d : NULL, *bd = b ? b->d : NULL;
    reference_forward_train(x->d, o, c, i, wd, bd, eps, ref, ref_mean, ref_invstd, var);
    for (int64_t k = 0; k < c; k++) var[k] *= (double)(m - 1) / (double)m; /* biased */

    for (int unbiased = 1; unbiased >= 0; unbiased--) {
        for (int64_t k = 0; k < c; k++) rm.d[k] = 0.5 * k, rv.d[k] = 1.0 + 0.25 * k; /* run_all's */
        sync_from_double(&rm), sync_from_double(&rv);
        poison(&y);
        for (int64_t k = 0; k < 3 * c; k++) v[k] = NAN;
        check(train_stats(x, o, c, i, w, b, eps, &y, mean, invstd, m2, &rm, &rv, momentum,
                          unbiased) == NBN_OK,
              "forward_train_stats returns NBN_OK", context);
        check(same_bits(&y, &r->y), "forward_train_stats y: forward_train's", context);
        if (unbiased) {
            check(same_bits(&rm, &r->rm) && same_bits(&rv, &r->rv),
                  "forward_train_stats running buffers (unbiased): forward_train's", context);
        } else {
            for (int64_t k = 0; k < c; k++) ref_rm[k] = 0.5 * k, ref_rv[k] = 1.0 + 0.25 * k;
            for (int64_t k = 0; k < c; k++)
                ref_rm[k] = (1.0 - momentum) * ref_rm[k] + momentum * ref_mean[k],
                ref_rv[k] = (1.0 - momentum) * ref_rv[k] + momentum * var[k];
            check_close(&rm, ref_rm, tol, "forward_train_stats running_mean (biased)", context);
            check_close(&rv, ref_rv, tol, "forward_train_stats running_var (biased)", context);
        }
    }
    check(same_rounded(mean, &r->mean) && same_rounded(invstd, &r->invstd),
          "forward_train_stats mean, invstd: rounded, forward_train's save_mean, save_invstd",
          context);
    check_close_doubles(mean, ref_mean, c, 1e-12, "forward_train_stats mean", context);
    check_close_doubles(invstd, ref_invstd, c, 1e-12, "forward_train_stats invstd", context);
    for (int64_t k = 0; k < c; k++) m2[k] /= (double)m;
    check_close_doubles(m2, var, c, 1e-12, "forward_train_stats m2 / m: the variance", context);

    tensor poisoned = make(f64, size);
    poison(&y), poison(&poisoned);
    memcpy(rm.t, r->rm.t, (size_t)c * (f64 ? 8 : 4));
    check(train_stats(x, o, c, i, w, b, eps, &y, mean, invstd, NULL, &rm, &rv, momentum, 1) ==
                  NBN_ERR_NULL &&
              same_bits(&y, &poisoned) && same_bits(&rm, &r->rm),
          "forward_train_stats without m2: NBN_ERR_NULL, nothing written", context);
    release(&poisoned);

    for (int64_t k = 0; k < c; k++)
        saved_mean[k] = get(&r->mean, k), saved_invstd[k] = get(&r->invstd, k);
    poison(&dx);
    for (int64_t k = 0; k < c; k++) sum_dy[k] = sum_dy_xmu[k] = NAN;
    check(back_stats(dy, x, o, c, i, w, saved_mean, saved_invstd, &dx, sum_dy, sum_dy_xmu) ==
              NBN_OK && same_bits(&dx, &r->dx),
          "backward_stats given save_mean and save_invstd: backward's dx", context);
    for (int64_t k = 0; k < c; k++) sum_dy_xmu[k] *= saved_invstd[k];
    check(same_rounded(sum_dy, &r->db) && same_rounded(sum_dy_xmu, &r->dw),
          "backward_stats sums: backward's dbias and dweight, rounded as it rounds them", context);
    poison(&dx);
    check(back_stats(dy, x, o, c, i, w, saved_mean, saved_invstd, &dx, NULL, NULL) == NBN_OK &&
              same_bits(&dx, &r->dx),
          "backward_stats without sums: the same dx", context);
    /* from the unrounded statistics of this forward */
    (void)train_stats(x, o, c, i, w, b, eps, &y, mean, invstd, m2, NULL, NULL, momentum, 1);
    check(back_stats(dy, x, o, c, i, w, mean, invstd, &dx, sum_dy, sum_dy_xmu) == NBN_OK,
          "backward_stats returns NBN_OK", context);
    reference_backward(dy->d, x->d, o, c, i, wd, mean, invstd, ref, ref_dw, ref_db);
    check_close(&dx, ref, f64 ? 1e-10 : 2e-5, "backward_stats dx", context);
    for (int64_t k = 0; k < c; k++) sum_dy_xmu[k] *= invstd[k];
    check_close_doubles(sum_dy, ref_db, c, 1e-12, "backward_stats sum_dy", context);
    check_close_doubles(sum_dy_xmu, ref_dw, c, 1e-12, "backward_stats sum_dy_xmu * invstd",
                        context);
    release(&y), release(&dx), release(&rm), release(&rv);
    free(v), free(ref);
}

static void test_shape(int f64, int64_t o, int64_t c, int64_t i, int affine) {
    char context[128];
    snprintf(context, sizeof context, "%s (%lld, %lld, %lld)%s", f64 ? "f64" : "f32",
             (long long)o, (long long)c, (long long)i, affine ? " affine" : "");
    int64_t size = o * c * i;
    const double eps = 1e-5, momentum = 0.1;
    tensor x = make(f64, size), dy = make(f64, size), w = make(f64, c), b = make(f64, c);
    tensor z = make(f64, size); /* the residual: relu then cuts about half of BN(x) + z */
    fill_input(x.d, o, c, i), fill(dy.d, size, -1.0, 1.0), fill(z.d, size, -1.0, 1.0);
    fill(w.d, c, 0.5, 1.5), fill(b.d, c, -1.0, 1.0);
    sync_from_double(&x), sync_from_double(&dy), sync_from_double(&w), sync_from_double(&b);
    sync_from_double(&z);
    const tensor *wp = affine ? &w : NULL, *bp = affine ? &b : NULL;

    nbn_set_num_threads(1);
    results one = run_all(&x, &dy, &z, o, c, i, wp, bp, eps, momentum, context);
    nbn_set_num_threads(2);
    results two = run_all(&x, &dy, &z, o, c, i, wp, bp, eps, momentum, context);
    check_against_reference(&two, &x, &dy, &z, o, c, i, wp, bp, eps, momentum, context);
    check_same_bits(&one, &two, "1 and 2 threads give the same bits", context);
    check_in_place(&two, &x, &dy, o, c, i, wp, bp, eps, context);
    check_fused_in_place(&two, &x, &dy, &z, o, c, i, wp, bp, eps, context);
    check_fused_variants(&two, &x, &dy, &z, o, c, i, wp, bp, eps, context);
    check_double_statistics(&two, &x, &dy, o, c, i, wp, bp, eps, momentum, context);
    release_results(&one), release_results(&two);
    release(&x), release(&dy), release(&w), release(&b), release(&z);
}

/* --------------------------------------------------------------------------- status codes */
static void test_status_codes(void) {
    enum { O = 3, C = 2, I = 4, N = O * C * I };
    float x[N], y[N], mean[C], invstd[C], rm[C], rv[C], dx[N], dw[C], db[C];
    for (int k = 0; k < N; k++) x[k] = (float)k * 0.25f;
    float *outputs[] = {y, mean, invstd, rm, rv, dx, dw, db};
    size_t sizes[] = {N, C, C, C, C, N, C, C};
    for (int k = 0; k < 8; k++) memset(outputs[k], 0x7f, sizes[k] * sizeof(float));
    float poisoned;
    memset(&poisoned, 0x7f, sizeof poisoned);

#define TRAIN(x_, o_, eps_, y_, rm_, rv_, m_) \
    nbn_forward_train_f32(x_, o_, C, I, NULL, NULL, eps_, y_, mean, invstd, rm_, rv_, m_)
    check(TRAIN(NULL, O, 1e-5, y, rm, rv, 0.1) == NBN_ERR_NULL, "train: x NULL", "");
    check(TRAIN(x, O, 1e-5, NULL, rm, rv, 0.1) == NBN_ERR_NULL, "train: y NULL", "");
    check(TRAIN(x, O, 1e-5, y, rm, NULL, 0.1) == NBN_ERR_NULL, "train: one running NULL", "");
    check(TRAIN(NULL, 0, 1e-5, y, rm, rv, 0.1) == NBN_ERR_NULL, "train: NULL before shape", "");
    check(TRAIN(x, 0, 1e-5, y, rm, rv, 0.1) == NBN_ERR_SHAPE, "train: outer 0", "");
    check(TRAIN(x, -3, 1e-5, y, rm, rv, 0.1) == NBN_ERR_SHAPE, "train: outer < 0", "");
    check(nbn_forward_train_f32(x, O, 0, I, NULL, NULL, 1e-5, y, mean, invstd, NULL, NULL, 0.1) ==
              NBN_ERR_SHAPE, "train: channels 0", "");
    check(nbn_forward_train_f32(x, INT64_MAX / 2, C, I, NULL, NULL, 1e-5, y, mean, invstd, NULL,
                                NULL, 0.1) == NBN_ERR_SHAPE, "train: size overflows", "");
    check(nbn_forward_train_f32(x, 1, C, 1, NULL, NULL, 1e-5, y, mean, invstd, NULL, NULL, 0.1) ==
              NBN_ERR_VALUE, "train: one value per channel", "");
    check(TRAIN(x, O, -1e-5, y, rm, rv, 0.1) == NBN_ERR_VALUE, "train: eps < 0", "");
    check(TRAIN(x, O, NAN, y, rm, rv, 0.1) == NBN_ERR_VALUE, "train: eps NaN", "");
    check(TRAIN(x, O, 1e-5, y, rm, rv, 1.5) == NBN_ERR_VALUE, "train: momentum > 1", "");
    check(TRAIN(x, O, 1e-5, y, rm, rv, -0.1) == NBN_ERR_VALUE, "train: momentum < 0", "");
    check(TRAIN(x, O, 1e-5, y, rm, rv, NAN) == NBN_ERR_VALUE, "train: momentum NaN", "");

    check(nbn_forward_eval_f32(x, O, C, I, NULL, NULL, NULL, rv, 1e-5, y) == NBN_ERR_NULL,
          "eval: running_mean NULL", "");
    check(nbn_forward_eval_f32(x, O, C, I, NULL, NULL, rm, rv, 1e-5, NULL) == NBN_ERR_NULL,
          "eval: y NULL", "");
    check(nbn_forward_eval_f32(x, O, C, 0, NULL, NULL, rm, rv, 1e-5, y) == NBN_ERR_SHAPE,
          "eval: inner 0", "");
    check(nbn_forward_eval_f32(x, O, C, I, NULL, NULL, rm, rv, -1.0, y) == NBN_ERR_VALUE,
          "eval: eps < 0", "");
    check(nbn_backward_f32(NULL, x, O, C, I, NULL, mean, invstd, dx, dw, db) == NBN_ERR_NULL,
          "backward: dy NULL", "");
    check(nbn_backward_f32(x, x, O, C, I, NULL, NULL, invstd, dx, dw, db) == NBN_ERR_NULL,
          "backward: save_mean NULL", "");
    check(nbn_backward_f32(x, x, O, C, I, NULL, mean, invstd, NULL, dw, db) == NBN_ERR_NULL,
          "backward: dx NULL", "");
    check(nbn_backward_f32(x, x, O, -1, I, NULL, mean, invstd, dx, dw, db) == NBN_ERR_SHAPE,
          "backward: channels < 0", "");
    check(nbn_forward_train_f64(NULL, O, C, I, NULL, NULL, 1e-5, NULL, NULL, NULL, NULL, NULL,
                                0.1) == NBN_ERR_NULL, "train f64: x NULL", "");
    check(nbn_forward_eval_f64(NULL, O, C, I, NULL, NULL, NULL, NULL, 1e-5, NULL) ==
              NBN_ERR_NULL, "eval f64: x NULL", "");
    check(nbn_backward_f64(NULL, NULL, O, C, I, NULL, NULL, NULL, NULL, NULL, NULL) ==
              NBN_ERR_NULL, "backward f64: dy NULL", "");

    check(TRAIN(x, O, 0.0, y, rm, rv, 0.1) == NBN_ERR_VALUE, "train: eps 0", "");
    check(TRAIN(x, O, -0.0, y, rm, rv, 0.1) == NBN_ERR_VALUE, "train: eps -0", "");

    int untouched = 1;
    for (int k = 0; k < 8; k++)
        for (size_t j = 0; j < sizes[k]; j++)
            untouched &= memcmp(&outputs[k][j], &poisoned, sizeof poisoned) == 0;
    check(untouched, "failed calls write nothing", "");
    check(TRAIN(x, O, 1e-300, y, NULL, NULL, 1.0) == NBN_OK,
          "train: eps 1e-300, momentum 1 are valid", "");
    check(nbn_forward_eval_f32(x, O, C, I, NULL, NULL, rm, rv, 0.0, y) == NBN_OK,
          "eval: eps 0 is valid", "");
#undef TRAIN
}

/* The fused entry points (1.1): their own arguments' codes, in the order NULL, shape, value,
 * alias; residual_out must not overlap x, dy, y or dx (by one element is enough), and may sit
 * right next to them; failed calls write nothing. */
static void test_status_codes_ex(void) {
    enum { O = 3, C = 2, I = 4, N = O * C * I };
    float x[N], dy[N], z[N], y[N], mean[C], invstd[C], dw[C], db[C];
    float out[3 * N]; /* dx and residual_out at chosen distances inside one buffer */
    double xd[N], outd[2 * N];
    for (int k = 0; k < N; k++) x[k] = (float)k * 0.25f, dy[k] = 0.5f - (float)(k % 3);
    for (int k = 0; k < N; k++) z[k] = (float)(k % 5) - 2.0f, y[k] = (float)(k % 4) - 1.5f;
    for (int k = 0; k < N; k++) xd[k] = x[k];
    for (int k = 0; k < C; k++) mean[k] = 1.0f, invstd[k] = 0.5f;
    float *outputs[] = {y, dw, db, out};
    size_t sizes[] = {N, C, C, 3 * N};
    for (int k = 0; k < 4; k++) memset(outputs[k], 0x7f, sizes[k] * sizeof(float));
    memset(outd, 0x7f, sizeof outd);
    float poisoned;
    memset(&poisoned, 0x7f, sizeof poisoned);
    unsigned char expected_d[sizeof outd];
    memcpy(expected_d, outd, sizeof outd);
    float ys[N]; /* the fused forward's output, read by the backward; y is the poisoned output */
    for (int k = 0; k < N; k++) ys[k] = (float)(k % 4) - 1.5f;

#define BACK_EX(y_, act_, dx_, dz_) \
    nbn_backward_ex_f32(dy, x, O, C, I, NULL, mean, invstd, dx_, dw, db, y_, act_, dz_)
    float *dx = out, *dz = out + N;
    check(nbn_forward_train_ex_f32(x, O, C, I, NULL, NULL, 1e-5, y, mean, invstd, NULL, NULL,
                                   0.1, z, 2) == NBN_ERR_VALUE,
          "train_ex: activation 2 (unknown)", "");
    check(nbn_forward_train_ex_f32(x, O, C, I, NULL, NULL, 1e-5, y, mean, invstd, NULL, NULL,
                                   0.1, NULL, -1) == NBN_ERR_VALUE,
          "train_ex: activation -1 (unknown)", "");
    check(nbn_forward_train_ex_f32(NULL, O, C, I, NULL, NULL, 1e-5, y, mean, invstd, NULL, NULL,
                                   0.1, z, 7) == NBN_ERR_NULL,
          "train_ex: x NULL before the activation", "");
    check(nbn_forward_train_ex_f64(xd, O, C, I, NULL, NULL, 1e-5, outd, outd + N, outd + N + C,
                                   NULL, NULL, 0.1, NULL, 2) == NBN_ERR_VALUE,
          "train_ex f64: activation 2 (unknown)", "");
    check(nbn_forward_train_ex_f32(x, 0, C, I, NULL, NULL, 1e-5, y, mean, invstd, NULL, NULL, 0.1,
                                   z, 2) == NBN_ERR_SHAPE,
          "train_ex: shape before the activation", "");
    check(nbn_forward_eval_ex_f32(x, O, C, I, NULL, NULL, mean, invstd, 1e-5, y, z, 3) ==
              NBN_ERR_VALUE, "eval_ex: activation 3 (unknown)", "");
    check(nbn_forward_eval_ex_f64(xd, O, C, I, NULL, NULL, xd, xd, 1e-5, outd, NULL, 2) ==
              NBN_ERR_VALUE, "eval_ex f64: activation 2 (unknown)", "");
    check(BACK_EX(ys, 2, dx, dz) == NBN_ERR_VALUE, "backward_ex: activation 2 (unknown)", "");
    check(BACK_EX(NULL, NBN_ACTIVATION_RELU, dx, dz) == NBN_ERR_NULL,
          "backward_ex: relu without y", "");
    check(BACK_EX(ys, 2, dx, dx) == NBN_ERR_VALUE,
          "backward_ex: the activation before the overlap", "");
    check(BACK_EX(ys, NBN_ACTIVATION_RELU, dx, dx) == NBN_ERR_ALIAS,
          "backward_ex: residual_out == dx", "");
    check(BACK_EX(ys, NBN_ACTIVATION_RELU, dx, dx + 1) == NBN_ERR_ALIAS,
          "backward_ex: residual_out overlaps dx", "");
    check(BACK_EX(ys, NBN_ACTIVATION_RELU, dz + N - 1, dz) == NBN_ERR_ALIAS,
          "backward_ex: dx overlaps the end of residual_out", "");
    check(nbn_backward_ex_f32(dy, x, O, C, I, NULL, mean, invstd, dx, dw, db, ys,
                              NBN_ACTIVATION_RELU, (float *)x) == NBN_ERR_ALIAS,
          "backward_ex: residual_out == x", "");
    check(nbn_backward_ex_f32(dy, x, O, C, I, NULL, mean, invstd, dx, dw, db, ys,
                              NBN_ACTIVATION_RELU, (float *)dy) == NBN_ERR_ALIAS,
          "backward_ex: residual_out == dy", "");
    check(nbn_backward_ex_f32(dy, x, O, C, I, NULL, mean, invstd, dx, dw, db, ys,
                              NBN_ACTIVATION_RELU, ys) == NBN_ERR_ALIAS,
          "backward_ex: residual_out == y", "");
    check(BACK_EX(ys, NBN_ACTIVATION_NONE, dx, dx) == NBN_ERR_ALIAS,
          "backward_ex: residual_out == dx without activation", "");
    check(nbn_backward_ex_f64(xd, xd, O, C, I, NULL, xd, xd, outd, NULL, NULL, NULL,
                              NBN_ACTIVATION_NONE, outd + N / 2) == NBN_ERR_ALIAS,
          "backward_ex f64: residual_out overlaps dx", "half a tensor apart");
    check(nbn_backward_ex_f64(xd, xd, O, C, I, NULL, xd, xd, outd, NULL, NULL, NULL, 2,
                              outd + N) == NBN_ERR_VALUE,
          "backward_ex f64: activation 2 (unknown)", "");

    int untouched = 1;
    for (int k = 0; k < 4; k++)
        for (size_t j = 0; j < sizes[k]; j++)
            untouched &= memcmp(&outputs[k][j], &poisoned, sizeof poisoned) == 0;
    check(untouched && memcmp(outd, expected_d, sizeof outd) == 0,
          "failed _ex calls write nothing", "");
    check(BACK_EX(ys, NBN_ACTIVATION_RELU, dx, dx + N) == NBN_OK,
          "backward_ex: residual_out right after dx is valid", "");
    int masked = 1;
    for (int k = 0; k < N; k++) masked &= dz[k] == (ys[k] > 0.0f ? dy[k] : 0.0f);
    check(masked, "backward_ex: residual_out is dy where y > 0, else 0", "");
    check(BACK_EX(NULL, NBN_ACTIVATION_NONE, dx, NULL) == NBN_OK,
          "backward_ex: y may be NULL without activation", "");
#undef BACK_EX
}

/* Shapes within nbn_check_shape's bound (outer * channels * inner * 8 bytes fit in int64) whose
 * scratch, a few doubles per channel, is over 2^64 bytes: NBN_ERR_SHAPE, nothing read or
 * written. Before the shim checked its byte counts they wrapped: eval with 2^59 + 2 channels and
 * 4 coefficient rows to 64 bytes, backward with 12 doubles per channel to 192, and the call
 * wrote past them. Training gets 2^59 - 1 channels (it needs two values per channel), as planes
 * (fused: no partials) and as rows (partials per row chunk). */
static void test_scratch_that_cannot_exist(void) {
    enum { N = 8 };
    const int64_t wide = ((int64_t)1 << 59) + 2, wide_train = ((int64_t)1 << 59) - 1;
    float xf[N] = {0}, of[5][N], expected_f[5][N];
    double xd[N] = {0}, od[5][N], expected_d[5][N];
    memset(of, 0x7f, sizeof of), memset(od, 0x7f, sizeof od);
    memcpy(expected_f, of, sizeof of), memcpy(expected_d, od, sizeof od);

    check(nbn_forward_eval_f32(xf, 1, wide, 1, NULL, NULL, xf, xf, 1e-5, of[0]) == NBN_ERR_SHAPE,
          "eval f32: scratch bytes overflow", "channels 2^59 + 2");
    check(nbn_forward_eval_f64(xd, 1, wide, 1, NULL, NULL, xd, xd, 1e-5, od[0]) == NBN_ERR_SHAPE,
          "eval f64: scratch bytes overflow", "channels 2^59 + 2");
    for (int64_t planes = 0; planes < 2; planes++) {
        const int64_t outer = planes ? 1 : 2, inner = planes ? 2 : 1;
        const char *layout = planes ? "planes (1, 2^59 - 1, 2)" : "rows (2, 2^59 - 1, 1)";
        check(nbn_forward_train_f32(xf, outer, wide_train, inner, NULL, NULL, 1e-5, of[0], of[1],
                                    of[2], of[3], of[4], 0.1) == NBN_ERR_SHAPE,
              "train f32: scratch bytes overflow", layout);
        check(nbn_forward_train_f64(xd, outer, wide_train, inner, NULL, NULL, 1e-5, od[0], od[1],
                                    od[2], od[3], od[4], 0.1) == NBN_ERR_SHAPE,
              "train f64: scratch bytes overflow", layout);
        check(nbn_backward_f32(xf, xf, outer, wide_train, inner, NULL, xf, xf, of[0], of[1],
                               of[2]) == NBN_ERR_SHAPE,
              "backward f32: scratch bytes overflow", layout);
        check(nbn_backward_f64(xd, xd, outer, wide_train, inner, NULL, xd, xd, od[0], od[1],
                               od[2]) == NBN_ERR_SHAPE,
              "backward f64: scratch bytes overflow", layout);
    }
    check(nbn_backward_f32(xf, xf, 1, wide, 1, NULL, xf, xf, of[0], of[1], of[2]) ==
              NBN_ERR_SHAPE, "backward f32: scratch bytes overflow", "channels 2^59 + 2");
    check(nbn_backward_ex_f32(xf, xf, 1, wide, 1, NULL, xf, xf, of[0], of[1], of[2], xf,
                              NBN_ACTIVATION_RELU, NULL) == NBN_ERR_SHAPE,
          "backward_ex f32 (relu): scratch bytes overflow", "channels 2^59 + 2");
    check(nbn_forward_train_ex_f64(xd, 1, wide_train, 2, NULL, NULL, 1e-5, od[0], od[1], od[2],
                                   od[3], od[4], 0.1, xd, NBN_ACTIVATION_RELU) == NBN_ERR_SHAPE,
          "train_ex f64: scratch bytes overflow", "planes (1, 2^59 - 1, 2)");
    check(memcmp(of, expected_f, sizeof of) == 0 && memcmp(od, expected_d, sizeof od) == 0,
          "calls with scratch that cannot exist write nothing", "");
}

/* eps = 0 in eval follows IEEE, as PyTorch: a channel whose running variance is 0 gets
 * invstd = inf and a y that is not finite (inf, or NaN where x equals the mean), and the other
 * channels are unaffected. Training refuses eps = 0 (test_status_codes): there a channel of
 * equal values is common and would give the same infinities. */
static void test_eval_eps_zero(int f64) {
    enum { O = 3, C = 2, I = 4, N = O * C * I };
    const char *context = f64 ? "f64" : "f32";
    tensor x = make(f64, N), rm = make(f64, C), rv = make(f64, C), y = make(f64, N);
    fill_input(x.d, O, C, I);
    rm.d[0] = 0.5, rv.d[0] = 0.0; /* channel 0: variance 0 */
    rm.d[1] = 1.5, rv.d[1] = 2.0;
    sync_from_double(&x), sync_from_double(&rm), sync_from_double(&rv);
    poison(&y);
    check(eval(&x, O, C, I, NULL, NULL, &rm, &rv, 0.0, &y) == NBN_OK,
          "eval: eps 0 with a zero running variance returns NBN_OK", context);
    double reference[N], invstd[C];
    reference_forward_eval(x.d, O, C, I, NULL, NULL, rm.d, rv.d, 0.0, invstd, reference);
    const double tol = f64 ? 1e-12 : 2e-6;
    int channel_0_inf = 1, channel_1_right = 1;
    for (int64_t n = 0; n < O; n++)
        for (int64_t i = 0; i < I; i++) {
            int64_t at_0 = n * C * I + i, at_1 = (n * C + 1) * I + i;
            channel_0_inf &= !isfinite(get(&y, at_0));
            channel_1_right &= fabs(get(&y, at_1) - reference[at_1]) <=
                               tol * fmax(1.0, fabs(reference[at_1]));
        }
    check(channel_0_inf, "eval: eps 0, variance 0: y is not finite", context);
    check(channel_1_right, "eval: eps 0: the other channels as the reference", context);
    release(&x), release(&rm), release(&rv), release(&y);
}

/* ------------------------------------------------------------------ the layer handle (1.2) */
static int dtype_of(int f64) { return f64 ? NBN_DTYPE_FLOAT64 : NBN_DTYPE_FLOAT32; }

static void *layer_vector(nbn_layer *layer, int which) {
    void *data = NULL;
    return nbn_layer_state(layer, which, &data) == NBN_OK ? data : NULL;
}

static int64_t batches_tracked(nbn_layer *layer) {
    return *(int64_t *)layer_vector(layer, NBN_LAYER_NUM_BATCHES_TRACKED);
}

/* A buffer of the layer seen as a tensor of the tested type (no double copy: same_bits, get). */
static tensor layer_tensor(nbn_layer *layer, int which, int f64, int64_t c) {
    tensor a = {f64, c, NULL, layer_vector(layer, which)};
    return a;
}

static int same_vector(nbn_layer *layer, int which, const tensor *expected) {
    tensor ours = layer_tensor(layer, which, expected->f64, expected->n);
    return ours.t && same_bits(&ours, expected);
}

/* Every byte of the layer's state (its vectors and num_batches_tracked) into a new buffer, to
 * check that a failed call changed nothing. */
static unsigned char *layer_snapshot(nbn_layer *layer, int f64, int64_t c, size_t *bytes) {
    const size_t vector = (size_t)c * (f64 ? 8 : 4);
    unsigned char *copy = calloc(1, 8 * vector + sizeof(int64_t));
    unsigned char *next = copy;
    for (int which = NBN_LAYER_WEIGHT; which <= NBN_LAYER_GRAD_BIAS; which++) {
        void *data = layer_vector(layer, which);
        if (data) memcpy(next, data, vector), next += vector;
    }
    int64_t tracked = batches_tracked(layer);
    memcpy(next, &tracked, sizeof tracked), next += sizeof tracked;
    *bytes = (size_t)(next - copy);
    return copy;
}

static int layer_unchanged(nbn_layer *layer, int f64, int64_t c, const unsigned char *before,
                           size_t bytes) {
    size_t now_bytes;
    unsigned char *now = layer_snapshot(layer, f64, c, &now_bytes);
    int same = now_bytes == bytes && memcmp(now, before, bytes) == 0;
    free(now);
    return same;
}

/* PyTorch's running update written out: each channel's batch mean and unbiased variance (two
 * passes over x, in double), then running = (1 - momentum) * running + momentum * batch. */
static void torch_running_update(const double *x, int64_t o, int64_t c, int64_t i,
                                 double momentum, double *running_mean, double *running_var) {
    const int64_t m = o * i;
    for (int64_t k = 0; k < c; k++) {
        double sum = 0.0, squares = 0.0;
        for (int64_t n = 0; n < o; n++)
            for (int64_t j = 0; j < i; j++) sum += x[(n * c + k) * i + j];
        const double mean = sum / (double)m;
        for (int64_t n = 0; n < o; n++)
            for (int64_t j = 0; j < i; j++) {
                const double d = x[(n * c + k) * i + j] - mean;
                squares += d * d;
            }
        running_mean[k] = (1.0 - momentum) * running_mean[k] + momentum * mean;
        running_var[k] = (1.0 - momentum) * running_var[k] + momentum * squares / (double)(m - 1);
    }
}

/* param -= lr * grad in the tested type: the same step on the layer's weight and the caller's. */
static void sgd_step(void *param, const void *grad, int f64, int64_t c, double lr) {
    for (int64_t k = 0; k < c; k++) {
        if (f64)
            ((double *)param)[k] -= lr * ((const double *)grad)[k];
        else
            ((float *)param)[k] -= (float)lr * ((const float *)grad)[k];
    }
}

/* Training steps (forward, backward, an SGD step on weight and bias), then eval: each call gives
 * the bits of the entry points called by hand with buffers the test keeps (the layer must call
 * them), and the running buffers follow PyTorch's update computed here in double. With
 * `cumulative`, momentum=None: the new batch weighs 1 / (batches so far). */
static void test_layer_steps(int f64, int64_t o, int64_t c, int64_t i, int cumulative) {
    enum { STEPS = 3 };
    char context[128];
    snprintf(context, sizeof context, "layer %s (%lld, %lld, %lld)%s", f64 ? "f64" : "f32",
             (long long)o, (long long)c, (long long)i, cumulative ? " cumulative" : "");
    const int64_t size = o * c * i;
    const double eps = 1e-5, lr = 0.1;
    const double momentum = cumulative ? NAN : 0.1; /* NaN: not read with the flag */
    const uint32_t flags = NBN_LAYER_DEFAULT | (cumulative ? NBN_LAYER_CUMULATIVE_AVERAGE : 0);
    nbn_layer *layer = NULL;
    check(nbn_layer_create(&layer, c, dtype_of(f64), eps, momentum, flags) == NBN_OK && layer,
          "layer: create", context);
    if (!layer) return;
    tensor x = make(f64, size), dy = make(f64, size), y = make(f64, size), dx = make(f64, size);
    tensor ours = make(f64, size), w = make(f64, c), b = make(f64, c), rm = make(f64, c);
    tensor rv = make(f64, c), mean = make(f64, c), invstd = make(f64, c), dw = make(f64, c);
    tensor db = make(f64, c);
    double *torch_mean = calloc((size_t)c, sizeof(double));
    double *torch_var = calloc((size_t)c, sizeof(double));
    for (int64_t k = 0; k < c; k++) rm.d[k] = 0.0, rv.d[k] = 1.0, torch_var[k] = 1.0;
    tensor initial[] = {layer_tensor(layer, NBN_LAYER_WEIGHT, f64, c),
                        layer_tensor(layer, NBN_LAYER_BIAS, f64, c),
                        layer_tensor(layer, NBN_LAYER_RUNNING_MEAN, f64, c),
                        layer_tensor(layer, NBN_LAYER_RUNNING_VAR, f64, c)};
    const double initial_value[] = {1.0, 0.0, 0.0, 1.0};
    int as_torch = batches_tracked(layer) == 0;
    for (int v = 0; v < 4; v++)
        for (int64_t k = 0; k < c; k++) as_torch &= get(&initial[v], k) == initial_value[v];
    check(as_torch, "layer: starts with weight 1, bias 0, running 0 and 1, no batches", context);
    fill(w.d, c, 0.5, 1.5), fill(b.d, c, -1.0, 1.0);
    sync_from_double(&w), sync_from_double(&b), sync_from_double(&rm), sync_from_double(&rv);
    const size_t vector = (size_t)c * (f64 ? 8 : 4);
    memcpy(layer_vector(layer, NBN_LAYER_WEIGHT), w.t, vector); /* load parameters */
    memcpy(layer_vector(layer, NBN_LAYER_BIAS), b.t, vector);

    for (int step = 0; step < STEPS; step++) {
        const double weight_of_batch = cumulative ? 1.0 / (step + 1) : momentum;
        fill_input(x.d, o, c, i), fill(dy.d, size, -1.0, 1.0);
        sync_from_double(&x), sync_from_double(&dy);
        poison(&ours);
        check(nbn_layer_forward(layer, x.t, o, i, ours.t) == NBN_OK, "layer: training forward",
              context);
        check(train(&x, o, c, i, &w, &b, eps, &y, &mean, &invstd, &rm, &rv, weight_of_batch) ==
                  NBN_OK, "forward_train by hand", context);
        check(same_bits(&ours, &y) && same_vector(layer, NBN_LAYER_SAVE_MEAN, &mean) &&
                  same_vector(layer, NBN_LAYER_SAVE_INVSTD, &invstd),
              "layer: training forward gives forward_train's y, save_mean, save_invstd", context);
        check(same_vector(layer, NBN_LAYER_RUNNING_MEAN, &rm) &&
                  same_vector(layer, NBN_LAYER_RUNNING_VAR, &rv),
              "layer: running buffers as forward_train's update", context);
        check(batches_tracked(layer) == step + 1, "layer: num_batches_tracked counts", context);
        torch_running_update(x.d, o, c, i, weight_of_batch, torch_mean, torch_var);

        poison(&ours);
        check(nbn_layer_backward(layer, dy.t, x.t, o, i, ours.t) == NBN_OK, "layer: backward",
              context);
        check(back(&dy, &x, o, c, i, &w, &mean, &invstd, &dx, &dw, &db) == NBN_OK,
              "backward by hand", context);
        check(same_bits(&ours, &dx) && same_vector(layer, NBN_LAYER_GRAD_WEIGHT, &dw) &&
                  same_vector(layer, NBN_LAYER_GRAD_BIAS, &db),
              "layer: backward gives backward's dx, dweight, dbias", context);
        check(nbn_layer_backward(layer, dy.t, x.t, o, i, ours.t) == NBN_ERR_STATE,
              "layer: a second backward of one forward is NBN_ERR_STATE", context);
        sgd_step(layer_vector(layer, NBN_LAYER_WEIGHT), layer_vector(layer, NBN_LAYER_GRAD_WEIGHT),
                 f64, c, lr);
        sgd_step(layer_vector(layer, NBN_LAYER_BIAS), layer_vector(layer, NBN_LAYER_GRAD_BIAS), f64,
                 c, lr);
        sgd_step(w.t, dw.t, f64, c, lr), sgd_step(b.t, db.t, f64, c, lr);
    }
    tensor running_mean = layer_tensor(layer, NBN_LAYER_RUNNING_MEAN, f64, c);
    tensor running_var = layer_tensor(layer, NBN_LAYER_RUNNING_VAR, f64, c);
    const double tol = f64 ? 1e-12 : 4e-6;
    check_close(&running_mean, torch_mean, tol, "layer: running_mean is PyTorch's", context);
    check_close(&running_var, torch_var, tol, "layer: running_var is PyTorch's (unbiased)",
                context);

    check(nbn_layer_set_training(layer, 0) == NBN_OK, "layer: set_training(0)", context);
    poison(&ours);
    check(nbn_layer_forward(layer, x.t, o, i, ours.t) == NBN_OK, "layer: eval forward", context);
    check(eval(&x, o, c, i, &w, &b, &rm, &rv, eps, &y) == NBN_OK, "forward_eval by hand",
          context);
    check(same_bits(&ours, &y), "layer: eval forward gives forward_eval's y", context);
    check(batches_tracked(layer) == STEPS && same_vector(layer, NBN_LAYER_RUNNING_MEAN, &rm) &&
              same_vector(layer, NBN_LAYER_RUNNING_VAR, &rv),
          "layer: eval forward leaves the running statistics", context);
    poison(&ours);
    check(nbn_layer_backward(layer, dy.t, x.t, o, i, ours.t) == NBN_ERR_STATE,
          "layer: backward after an eval forward is NBN_ERR_STATE", context);
    nbn_layer_destroy(layer);
    tensor all[] = {x, dy, y, dx, ours, w, b, rm, rv, mean, invstd, dw, db};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) release(&all[k]);
    free(torch_mean), free(torch_var);
}

/* Flags 0 (PyTorch's affine=False, track_running_stats=False): no weight, bias, gradients or
 * running buffers; every forward, eval mode included, uses batch statistics and has a backward;
 * num_batches_tracked stays 0. */
static void test_layer_without_affine_or_running_stats(int f64) {
    enum { O = 5, C = 3, I = 6, N = O * C * I };
    const char *context = f64 ? "layer f64, flags 0" : "layer f32, flags 0";
    nbn_layer *layer = NULL;
    check(nbn_layer_create(&layer, C, dtype_of(f64), 1e-3, 0.1, 0) == NBN_OK,
          "layer: create with flags 0", context);
    if (!layer) return;
    const int absent[] = {NBN_LAYER_WEIGHT, NBN_LAYER_BIAS, NBN_LAYER_RUNNING_MEAN,
                          NBN_LAYER_RUNNING_VAR, NBN_LAYER_GRAD_WEIGHT, NBN_LAYER_GRAD_BIAS};
    int none = 1;
    for (size_t k = 0; k < sizeof absent / sizeof absent[0]; k++) {
        void *data = &none;
        none &= nbn_layer_state(layer, absent[k], &data) == NBN_OK && data == NULL;
    }
    check(none, "layer: state of the buffers its flags leave out is NULL", context);
    check(layer_vector(layer, NBN_LAYER_SAVE_MEAN) && layer_vector(layer, NBN_LAYER_SAVE_INVSTD),
          "layer: saved statistics exist", context);
    tensor x = make(f64, N), dy = make(f64, N), y = make(f64, N), ours = make(f64, N);
    tensor mean = make(f64, C), invstd = make(f64, C);
    fill_input(x.d, O, C, I), fill(dy.d, N, -1.0, 1.0);
    sync_from_double(&x), sync_from_double(&dy);
    check(nbn_layer_set_training(layer, 0) == NBN_OK, "layer: set_training(0)", context);
    check(nbn_layer_forward(layer, x.t, O, I, ours.t) == NBN_OK, "layer: eval forward", context);
    check(train(&x, O, C, I, NULL, NULL, 1e-3, &y, &mean, &invstd, NULL, NULL, 0.1) == NBN_OK,
          "forward_train by hand", context);
    check(same_bits(&ours, &y) && same_vector(layer, NBN_LAYER_SAVE_MEAN, &mean) &&
              same_vector(layer, NBN_LAYER_SAVE_INVSTD, &invstd) && batches_tracked(layer) == 0,
          "layer: without running statistics, eval uses batch statistics", context);
    check(nbn_layer_backward(layer, dy.t, x.t, O, I, ours.t) == NBN_OK,
          "layer: backward of an eval forward with batch statistics", context);
    check(back(&dy, &x, O, C, I, NULL, &mean, &invstd, &y, NULL, NULL) == NBN_OK &&
              same_bits(&ours, &y), "layer: backward without weight gives backward's dx",
          context);
    nbn_layer_destroy(layer);
    release(&x), release(&dy), release(&y), release(&ours), release(&mean), release(&invstd);
}

/* forward_ex / backward_ex: y = relu(BN(x) + z) and its backward with the residual's gradient,
 * the bits of the _ex entry points; the plain backward of a ReLU forward lacks y. */
static void test_layer_fused(int f64) {
    enum { O = 4, C = 3, I = 7, N = O * C * I };
    const char *context = f64 ? "layer f64, fused" : "layer f32, fused";
    nbn_layer *layer = NULL;
    check(nbn_layer_create(&layer, C, dtype_of(f64), 1e-5, 0.1, NBN_LAYER_DEFAULT) == NBN_OK,
          "layer: create", context);
    if (!layer) return;
    tensor x = make(f64, N), z = make(f64, N), dy = make(f64, N), y = make(f64, N);
    tensor ours = make(f64, N), dx = make(f64, N), dz = make(f64, N), our_dz = make(f64, N);
    tensor our_dx = make(f64, N);
    tensor w = make(f64, C), b = make(f64, C), rm = make(f64, C), rv = make(f64, C);
    tensor mean = make(f64, C), invstd = make(f64, C), dw = make(f64, C), db = make(f64, C);
    fill_input(x.d, O, C, I), fill(z.d, N, -1.0, 1.0), fill(dy.d, N, -1.0, 1.0);
    for (int64_t k = 0; k < C; k++) w.d[k] = 1.0, rv.d[k] = 1.0;
    tensor *inputs[] = {&x, &z, &dy, &w, &b, &rm, &rv};
    for (size_t k = 0; k < sizeof inputs / sizeof inputs[0]; k++) sync_from_double(inputs[k]);

    check(nbn_layer_forward_ex(layer, x.t, O, I, ours.t, z.t, NBN_ACTIVATION_RELU) == NBN_OK,
          "layer: forward_ex (residual, relu)", context);
    check(train_ex(&x, O, C, I, &w, &b, 1e-5, &y, &mean, &invstd, &z, NBN_ACTIVATION_RELU) ==
              NBN_OK, "forward_train_ex by hand", context);
    check(same_bits(&ours, &y) && same_vector(layer, NBN_LAYER_SAVE_MEAN, &mean) &&
              same_vector(layer, NBN_LAYER_SAVE_INVSTD, &invstd),
          "layer: forward_ex gives forward_train_ex's y and statistics", context);
    tensor plain_y = make(f64, N), plain_mean = make(f64, C), plain_invstd = make(f64, C);
    train(&x, O, C, I, &w, &b, 1e-5, &plain_y, &plain_mean, &plain_invstd, &rm, &rv, 0.1);
    check(same_vector(layer, NBN_LAYER_RUNNING_MEAN, &rm) &&
              same_vector(layer, NBN_LAYER_RUNNING_VAR, &rv),
          "layer: forward_ex updates the running statistics of x", context);
    release(&plain_y), release(&plain_mean), release(&plain_invstd);

    size_t bytes;
    unsigned char *before = layer_snapshot(layer, f64, C, &bytes);
    poison(&dx);
    check(nbn_layer_backward(layer, dy.t, x.t, O, I, dx.t) == NBN_ERR_NULL,
          "layer: plain backward after a relu forward is NBN_ERR_NULL (needs y)", context);
    check(nbn_layer_backward_ex(layer, dy.t, x.t, O, I, dx.t, ours.t, dx.t) == NBN_ERR_ALIAS,
          "layer: backward_ex with residual_out on dx is NBN_ERR_ALIAS", context);
    tensor poisoned = make(f64, N);
    poison(&poisoned);
    check(same_bits(&dx, &poisoned) && layer_unchanged(layer, f64, C, before, bytes),
          "layer: failed backward_ex calls change nothing", context);
    poison(&our_dx), poison(&our_dz);
    check(nbn_layer_backward_ex(layer, dy.t, x.t, O, I, our_dx.t, ours.t, our_dz.t) == NBN_OK,
          "layer: backward_ex (relu: y, residual_out)", context);
    check(back_ex(&dy, &x, O, C, I, &w, &mean, &invstd, &dx, &dw, &db, &y, NBN_ACTIVATION_RELU,
                  &dz) == NBN_OK, "backward_ex by hand", context);
    check(same_bits(&our_dx, &dx) && same_bits(&our_dz, &dz) &&
              same_vector(layer, NBN_LAYER_GRAD_WEIGHT, &dw) &&
              same_vector(layer, NBN_LAYER_GRAD_BIAS, &db),
          "layer: backward_ex gives backward_ex's dx, residual_out, dweight, dbias", context);
    free(before);
    nbn_layer_destroy(layer);
    tensor all[] = {x, z, dy, y, ours, dx, dz, our_dz, our_dx, w, b, rm, rv, mean, invstd, dw, db,
                    poisoned};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) release(&all[k]);
}

/* Bad arguments: the status code, *layer not written by a failed create, and a layer that a
 * failed call leaves as it was (its buffers, its count, its pending forward: the backward that
 * follows still differentiates the last good forward). */
static void test_layer_status_codes(void) {
    enum { O = 3, C = 2, I = 4, N = O * C * I };
    const int F32 = NBN_DTYPE_FLOAT32;
    int marker;
    nbn_layer *const untouched = (nbn_layer *)&marker; /* never dereferenced */
    nbn_layer *layer = untouched;
    const struct {
        int64_t channels;
        int dtype;
        double eps, momentum;
        uint32_t flags;
        int status;
        const char *what;
    } creates[] = {
        {0, F32, 1e-5, 0.1, NBN_LAYER_DEFAULT, NBN_ERR_SHAPE, "create: channels 0"},
        {-4, F32, 1e-5, 0.1, NBN_LAYER_DEFAULT, NBN_ERR_SHAPE, "create: channels < 0"},
        {C, 0, 1e-5, 0.1, NBN_LAYER_DEFAULT, NBN_ERR_VALUE, "create: dtype 0"},
        {C, 3, 1e-5, 0.1, NBN_LAYER_DEFAULT, NBN_ERR_VALUE, "create: dtype 3"},
        {C, -1, 1e-5, 0.1, NBN_LAYER_DEFAULT, NBN_ERR_VALUE, "create: dtype -1"},
        {C, F32, 0.0, 0.1, NBN_LAYER_DEFAULT, NBN_ERR_VALUE, "create: eps 0"},
        {C, F32, -1e-5, 0.1, NBN_LAYER_DEFAULT, NBN_ERR_VALUE, "create: eps < 0"},
        {C, F32, NAN, 0.1, NBN_LAYER_DEFAULT, NBN_ERR_VALUE, "create: eps NaN"},
        {C, F32, 1e-5, 1.5, NBN_LAYER_DEFAULT, NBN_ERR_VALUE, "create: momentum > 1"},
        {C, F32, 1e-5, -0.1, NBN_LAYER_DEFAULT, NBN_ERR_VALUE, "create: momentum < 0"},
        {C, F32, 1e-5, NAN, NBN_LAYER_DEFAULT, NBN_ERR_VALUE, "create: momentum NaN"},
        {C, F32, 1e-5, 0.1, 8, NBN_ERR_VALUE, "create: unknown flag 8"},
        {C, F32, 1e-5, 0.1, 0x80000000u | NBN_LAYER_AFFINE, NBN_ERR_VALUE,
         "create: unknown flag 2^31"},
        {(int64_t)1 << 61, F32, 1e-5, 0.1, NBN_LAYER_DEFAULT, NBN_ERR_SHAPE,
         "create: the buffers' bytes overflow"},
        /* 2^58 bytes: more than a 57-bit address space, so malloc fails even with overcommit */
        {(int64_t)1 << 53, F32, 1e-5, 0.1, NBN_LAYER_DEFAULT, NBN_ERR_INTERNAL,
         "create: malloc fails (2^58 bytes of buffers)"},
        {0, 0, NAN, NAN, 8, NBN_ERR_SHAPE, "create: channels before the values"},
    };
    for (size_t k = 0; k < sizeof creates / sizeof creates[0]; k++) {
        int status = nbn_layer_create(&layer, creates[k].channels, creates[k].dtype,
                                      creates[k].eps, creates[k].momentum, creates[k].flags);
        check(status == creates[k].status && layer == untouched, creates[k].what,
              nbn_status_string(status));
    }
    check(nbn_layer_create(NULL, C, F32, 1e-5, 0.1, NBN_LAYER_DEFAULT) == NBN_ERR_NULL,
          "create: layer NULL", "");
    nbn_layer_destroy(NULL); /* a no-op, as free(NULL) */

    float x[N], y[N], dy[N], dx[N], out[N], poisoned[N];
    for (int k = 0; k < N; k++) x[k] = (float)(k % 7) * 0.5f, dy[k] = (float)(k % 3) - 1.0f;
    memset(poisoned, 0x7f, sizeof poisoned);
    void *data = NULL;
    check(nbn_layer_forward(NULL, x, O, I, y) == NBN_ERR_NULL, "layer NULL: forward", "");
    check(nbn_layer_forward_ex(NULL, x, O, I, y, NULL, 0) == NBN_ERR_NULL,
          "layer NULL: forward_ex", "");
    check(nbn_layer_backward(NULL, dy, x, O, I, dx) == NBN_ERR_NULL, "layer NULL: backward", "");
    check(nbn_layer_backward_ex(NULL, dy, x, O, I, dx, NULL, NULL) == NBN_ERR_NULL,
          "layer NULL: backward_ex", "");
    check(nbn_layer_set_training(NULL, 1) == NBN_ERR_NULL, "layer NULL: set_training", "");
    check(nbn_layer_state(NULL, NBN_LAYER_WEIGHT, &data) == NBN_ERR_NULL && data == NULL,
          "layer NULL: state", "");

    layer = NULL;
    check(nbn_layer_create(&layer, C, F32, 1e-5, NAN,
                           NBN_LAYER_DEFAULT | NBN_LAYER_CUMULATIVE_AVERAGE) == NBN_OK && layer,
          "create: momentum NaN is not read with NBN_LAYER_CUMULATIVE_AVERAGE", "");
    if (!layer) return;
    check(nbn_layer_state(layer, NBN_LAYER_WEIGHT, NULL) == NBN_ERR_NULL, "state: data NULL", "");
    check(nbn_layer_state(layer, NBN_LAYER_NUM_BATCHES_TRACKED + 1, &data) == NBN_ERR_VALUE &&
              nbn_layer_state(layer, -1, &data) == NBN_ERR_VALUE && data == NULL,
          "state: unknown buffers", "");
    size_t bytes;
    unsigned char *before = layer_snapshot(layer, 0, C, &bytes);
    memcpy(dx, poisoned, sizeof dx);
    check(nbn_layer_backward(layer, dy, x, O, I, dx) == NBN_ERR_STATE,
          "layer: backward before any forward is NBN_ERR_STATE", "");
    check(nbn_layer_backward(layer, NULL, x, O, I, dx) == NBN_ERR_STATE,
          "layer: the state before the arguments", "");
    check(memcmp(dx, poisoned, sizeof dx) == 0 && layer_unchanged(layer, 0, C, before, bytes),
          "layer: backward before forward changes nothing", "");
    free(before);

    check(nbn_layer_forward(layer, x, O, I, y) == NBN_OK, "layer: forward", "");
    before = layer_snapshot(layer, 0, C, &bytes);
    memcpy(out, poisoned, sizeof out);
    check(nbn_layer_forward(layer, NULL, O, I, out) == NBN_ERR_NULL, "layer forward: x NULL", "");
    check(nbn_layer_forward(layer, x, O, I, NULL) == NBN_ERR_NULL, "layer forward: y NULL", "");
    check(nbn_layer_forward(layer, x, 0, I, out) == NBN_ERR_SHAPE, "layer forward: outer 0", "");
    check(nbn_layer_forward(layer, x, O, -1, out) == NBN_ERR_SHAPE, "layer forward: inner < 0",
          "");
    check(nbn_layer_forward(layer, x, 1, 1, out) == NBN_ERR_VALUE,
          "layer forward: one value per channel in training", "");
    check(nbn_layer_forward_ex(layer, x, O, I, out, NULL, 2) == NBN_ERR_VALUE,
          "layer forward_ex: activation 2 (unknown)", "");
    check(nbn_layer_backward(layer, NULL, x, O, I, out) == NBN_ERR_NULL,
          "layer backward: dy NULL", "");
    check(nbn_layer_backward(layer, dy, NULL, O, I, out) == NBN_ERR_NULL,
          "layer backward: x NULL", "");
    check(nbn_layer_backward(layer, dy, x, O, I, NULL) == NBN_ERR_NULL,
          "layer backward: dx NULL", "");
    check(nbn_layer_backward(layer, dy, x, O * I, 1, out) == NBN_ERR_SHAPE,
          "layer backward: another shape than the forward's", "");
    check(nbn_layer_backward_ex(layer, dy, x, O, I, out, NULL, out) == NBN_ERR_ALIAS,
          "layer backward_ex: residual_out on dx", "");
    check(memcmp(out, poisoned, sizeof out) == 0 && layer_unchanged(layer, 0, C, before, bytes),
          "layer: failed calls change neither their outputs nor the layer", "");
    free(before);

    /* the pending forward survived the failures: its backward is the entry point's */
    float mean[C], invstd[C], dx_hand[N], dw[C], db[C], weight[C];
    memcpy(mean, layer_vector(layer, NBN_LAYER_SAVE_MEAN), sizeof mean);
    memcpy(invstd, layer_vector(layer, NBN_LAYER_SAVE_INVSTD), sizeof invstd);
    memcpy(weight, layer_vector(layer, NBN_LAYER_WEIGHT), sizeof weight);
    check(nbn_layer_backward(layer, dy, x, O, I, dx) == NBN_OK,
          "layer: backward after failed calls", "");
    check(nbn_backward_f32(dy, x, O, C, I, weight, mean, invstd, dx_hand, dw, db) == NBN_OK &&
              memcmp(dx, dx_hand, sizeof dx) == 0 &&
              memcmp(layer_vector(layer, NBN_LAYER_GRAD_WEIGHT), dw, sizeof dw) == 0 &&
              memcmp(layer_vector(layer, NBN_LAYER_GRAD_BIAS), db, sizeof db) == 0,
          "layer: that backward differentiates the last good forward", "");

    /* a negative count (written by the caller) makes the cumulative weight invalid */
    int64_t *tracked = layer_vector(layer, NBN_LAYER_NUM_BATCHES_TRACKED);
    const int64_t counts[] = {-1, -2};
    for (int k = 0; k < 2; k++) {
        *tracked = counts[k];
        before = layer_snapshot(layer, 0, C, &bytes);
        memcpy(out, poisoned, sizeof out);
        check(nbn_layer_forward(layer, x, O, I, out) == NBN_ERR_VALUE &&
                  memcmp(out, poisoned, sizeof out) == 0 &&
                  layer_unchanged(layer, 0, C, before, bytes),
              "layer: cumulative average with num_batches_tracked < 0 is NBN_ERR_VALUE",
              counts[k] == -1 ? "-1" : "-2");
        free(before);
    }
    check(nbn_layer_set_training(layer, 0) == NBN_OK &&
              nbn_layer_forward(layer, x, O, I, out) == NBN_OK,
          "layer: eval mode does not read the count", "");
    nbn_layer_destroy(layer);
}

/* Many layers created and destroyed, of every flag combination and both types: with
 * -fsanitize=address (tests/test_plugin.py) LeakSanitizer fails the run on a leak. */
static void test_layer_lifetimes(void) {
    int created = 0;
    for (uint32_t flags = 0; flags < 8; flags++)
        for (int f64 = 0; f64 < 2; f64++)
            for (int64_t c = 1; c <= 64; c *= 4) {
                nbn_layer *layer = NULL;
                created += nbn_layer_create(&layer, c, dtype_of(f64), 1e-5, 0.1, flags) == NBN_OK;
                nbn_layer_destroy(layer);
            }
    check(created == 8 * 2 * 4, "layer: create and destroy, every flag combination", "");
}

static void test_layer(void) {
    test_layer_status_codes();
    test_layer_lifetimes();
    for (int f64 = 0; f64 < 2; f64++) {
        test_layer_steps(f64, 8, 3, 10, 0);
        test_layer_steps(f64, 300, 40, 1, 0);
        test_layer_steps(f64, 16, 8, 4100, 0); /* big enough for 2 worker threads */
        test_layer_steps(f64, 6, 5, 9, 1);
        test_layer_without_affine_or_running_stats(f64);
        test_layer_fused(f64);
    }
}

/* ---------------------------------------------------------- group and layer norm (1.3) */
/* A group norm call on (o, c, i) with g groups, or (layer) a layer norm call on (rows o,
 * width c) (i = 1, g unused). Statistics and parameter gradients are double in the ABI. */
typedef struct {
    int layer;
    int64_t o, c, i, g;
} norm_shape;

static int64_t norm_stats(const norm_shape *s) { return s->layer ? s->o : s->o * s->g; }

static int norm_forward(const norm_shape *s, const tensor *x, const tensor *w, const tensor *b,
                        double eps, tensor *y, double *mean, double *invstd) {
    const void *wt = w ? w->t : NULL, *bt = b ? b->t : NULL;
    if (s->layer)
        return x->f64 ? nbn_layer_norm_forward_f64(x->t, s->o, s->c, wt, bt, eps, y->t, mean,
                                                   invstd)
                      : nbn_layer_norm_forward_f32(x->t, s->o, s->c, wt, bt, eps, y->t, mean,
                                                   invstd);
    return x->f64 ? nbn_group_norm_forward_f64(x->t, s->o, s->c, s->i, s->g, wt, bt, eps, y->t,
                                               mean, invstd)
                  : nbn_group_norm_forward_f32(x->t, s->o, s->c, s->i, s->g, wt, bt, eps, y->t,
                                               mean, invstd);
}

static int norm_backward(const norm_shape *s, const tensor *dy, const tensor *x, const tensor *w,
                         const double *mean, const double *invstd, tensor *dx, double *dw,
                         double *db) {
    const void *wt = w ? w->t : NULL;
    if (s->layer)
        return x->f64 ? nbn_layer_norm_backward_f64(dy->t, x->t, s->o, s->c, wt, mean, invstd,
                                                    dx->t, dw, db)
                      : nbn_layer_norm_backward_f32(dy->t, x->t, s->o, s->c, wt, mean, invstd,
                                                    dx->t, dw, db);
    return x->f64 ? nbn_group_norm_backward_f64(dy->t, x->t, s->o, s->c, s->i, s->g, wt, mean,
                                                invstd, dx->t, dw, db)
                  : nbn_group_norm_backward_f32(dy->t, x->t, s->o, s->c, s->i, s->g, wt, mean,
                                                invstd, dx->t, dw, db);
}

typedef struct {
    tensor y, dx;
    double *mean, *invstd, *dw, *db; /* 2 * stats, then 2 * c doubles: one allocation */
    int status;
} norm_results;

static void release_norm(norm_results *r) { release(&r->y), release(&r->dx), free(r->mean); }

static norm_results run_norm(const norm_shape *s, const tensor *x, const tensor *dy,
                             const tensor *w, const tensor *b, double eps) {
    int64_t size = s->o * s->c * s->i, n = norm_stats(s);
    norm_results r = {.y = make(x->f64, size), .dx = make(x->f64, size)};
    poison(&r.y), poison(&r.dx);
    r.mean = malloc((size_t)(2 * n + 2 * s->c) * sizeof(double));
    for (int64_t k = 0; k < 2 * n + 2 * s->c; k++) r.mean[k] = NAN;
    r.invstd = r.mean + n, r.dw = r.invstd + n, r.db = r.dw + s->c;
    r.status = norm_forward(s, x, w, b, eps, &r.y, r.mean, r.invstd);
    if (r.status == NBN_OK)
        r.status = norm_backward(s, dy, x, w, r.mean, r.invstd, &r.dx, r.dw, r.db);
    return r;
}

static int same_doubles(const double *a, const double *b, int64_t n) {
    return memcmp(a, b, (size_t)n * sizeof(double)) == 0;
}

static void test_norm_shape(int f64, norm_shape s, int affine) {
    char context[128];
    snprintf(context, sizeof context, "%s %s (%lld, %lld, %lld) groups %lld%s",
             s.layer ? "layer_norm" : "group_norm", f64 ? "f64" : "f32", (long long)s.o,
             (long long)s.c, (long long)s.i, (long long)(s.layer ? 0 : s.g),
             affine ? " affine" : "");
    int64_t size = s.o * s.c * s.i, n = norm_stats(&s);
    const double eps = 1e-5;
    tensor x = make(f64, size), dy = make(f64, size), w = make(f64, s.c), b = make(f64, s.c);
    /* layer norm: rows of width c are "channels" of fill_input's (o, 1, c) view */
    if (s.layer)
        fill_input(x.d, s.o, 1, s.c);
    else
        fill_input(x.d, s.o, s.c, s.i);
    fill(dy.d, size, -1.0, 1.0), fill(w.d, s.c, 0.5, 1.5), fill(b.d, s.c, -1.0, 1.0);
    sync_from_double(&x), sync_from_double(&dy), sync_from_double(&w), sync_from_double(&b);
    const tensor *wp = affine ? &w : NULL, *bp = affine ? &b : NULL;

    nbn_set_num_threads(1);
    norm_results one = run_norm(&s, &x, &dy, wp, bp, eps);
    nbn_set_num_threads(2);
    norm_results two = run_norm(&s, &x, &dy, wp, bp, eps);
    check(one.status == NBN_OK && two.status == NBN_OK, "forward and backward return NBN_OK",
          context);
    check(same_bits(&one.y, &two.y) && same_bits(&one.dx, &two.dx) &&
              same_doubles(one.mean, two.mean, 2 * n + 2 * s.c),
          "1 and 2 threads give the same bits", context);

    /* the reference, on the values the library was given */
    double *y = malloc((size_t)(2 * size + 2 * n + 2 * s.c) * sizeof(double));
    double *dx = y + size, *mean = dx + size, *invstd = mean + n, *dw = invstd + n;
    double *db = dw + s.c;
    const double *wd = affine ? w.d : NULL, *bd = affine ? b.d : NULL;
    if (s.layer) {
        reference_layer_norm_forward(x.d, s.o, s.c, wd, bd, eps, y, mean, invstd);
        reference_layer_norm_backward(dy.d, x.d, s.o, s.c, wd, two.mean, two.invstd, dx, dw, db);
    } else {
        reference_group_norm_forward(x.d, s.o, s.c, s.i, s.g, wd, bd, eps, y, mean, invstd);
        reference_group_norm_backward(dy.d, x.d, s.o, s.c, s.i, s.g, wd, two.mean, two.invstd,
                                      dx, dw, db);
    }
    double tol = f64 ? 1e-12 : 2e-6;
    check_close(&two.y, y, tol, "forward y", context);
    check_close_doubles(two.mean, mean, n, 1e-12, "forward mean", context);
    check_close_doubles(two.invstd, invstd, n, 1e-12, "forward invstd", context);
    check_close(&two.dx, dx, f64 ? 1e-12 : 1e-5, "backward dx", context);
    check_close_doubles(two.dw, dw, s.c, 1e-12, "backward dweight", context);
    check_close_doubles(two.db, db, s.c, 1e-12, "backward dbias", context);

    /* in place (y = x, dx = dy), and NULL dweight, dbias: the same bits */
    tensor in = make(f64, size);
    memcpy(in.t, x.t, (size_t)size * (f64 ? 8 : 4));
    double *stats = malloc((size_t)(2 * n) * sizeof(double));
    int status = norm_forward(&s, &in, wp, bp, eps, &in, stats, stats + n);
    check(status == NBN_OK && same_bits(&in, &two.y) && same_doubles(stats, two.mean, 2 * n),
          "forward in place (y = x): the bits of out of place", context);
    memcpy(in.t, dy.t, (size_t)size * (f64 ? 8 : 4));
    status = norm_backward(&s, &in, &x, wp, two.mean, two.invstd, &in, NULL, NULL);
    check(status == NBN_OK && same_bits(&in, &two.dx),
          "backward in place (dx = dy), no dweight or dbias: the bits of dx", context);
    free(stats), release(&in), free(y);
    release_norm(&one), release_norm(&two);
    release(&x), release(&dy), release(&w), release(&b);
}

/* Each kind of bad argument: its status code, and nothing written. */
static void test_norm_status_codes(void) {
    enum { O = 2, C = 4, I = 3, N = O * C * I, G = 2 };
    float x[N], y[N], dx[N];
    double mean[O * C], invstd[O * C], dw[C], db[C];
    for (int k = 0; k < N; k++) x[k] = (float)(k % 5) * 0.5f;
    memset(y, 0x7f, sizeof y), memset(dx, 0x7f, sizeof dx), memset(mean, 0x7f, sizeof mean);
    memset(invstd, 0x7f, sizeof invstd), memset(dw, 0x7f, sizeof dw), memset(db, 0x7f, sizeof db);
    unsigned char before[sizeof y + sizeof dx + sizeof mean + sizeof invstd + sizeof dw +
                         sizeof db];
#define NORM_OUTPUTS {y, sizeof y}, {dx, sizeof dx}, {mean, sizeof mean}, \
                     {invstd, sizeof invstd}, {dw, sizeof dw}, {db, sizeof db}
    struct {
        void *p;
        size_t n;
    } outputs[] = {NORM_OUTPUTS};
#undef NORM_OUTPUTS
    size_t at = 0;
    for (size_t k = 0; k < sizeof outputs / sizeof outputs[0]; k++)
        memcpy(before + at, outputs[k].p, outputs[k].n), at += outputs[k].n;
    double stats[O * C] = {0}; /* inputs of the backward: mean 0, invstd 1 */
    double ones[O * C];
    for (int k = 0; k < O * C; k++) ones[k] = 1.0;
    const double nan = NAN;
    struct {
        int got, expected;
        const char *what;
    } cases[] = {
        {nbn_group_norm_forward_f32(NULL, O, C, I, G, NULL, NULL, 1e-5, y, mean, invstd),
         NBN_ERR_NULL, "group forward: x NULL"},
        {nbn_group_norm_forward_f32(x, O, C, I, G, NULL, NULL, 1e-5, NULL, mean, invstd),
         NBN_ERR_NULL, "group forward: y NULL"},
        {nbn_group_norm_forward_f32(x, O, C, I, G, NULL, NULL, 1e-5, y, NULL, invstd),
         NBN_ERR_NULL, "group forward: mean NULL"},
        {nbn_group_norm_forward_f32(x, O, C, I, G, NULL, NULL, 1e-5, y, mean, NULL),
         NBN_ERR_NULL, "group forward: invstd NULL"},
        {nbn_group_norm_forward_f32(NULL, 0, C, I, 3, NULL, NULL, -1.0, y, mean, invstd),
         NBN_ERR_NULL, "group forward: NULL first, then shape and value"},
        {nbn_group_norm_forward_f32(x, 0, C, I, G, NULL, NULL, 1e-5, y, mean, invstd),
         NBN_ERR_SHAPE, "group forward: outer 0"},
        {nbn_group_norm_forward_f32(x, O, -1, I, G, NULL, NULL, 1e-5, y, mean, invstd),
         NBN_ERR_SHAPE, "group forward: channels -1"},
        {nbn_group_norm_forward_f32(x, O, C, 0, G, NULL, NULL, 1e-5, y, mean, invstd),
         NBN_ERR_SHAPE, "group forward: inner 0"},
        {nbn_group_norm_forward_f32(x, O, C, I, 0, NULL, NULL, 1e-5, y, mean, invstd),
         NBN_ERR_SHAPE, "group forward: num_groups 0"},
        {nbn_group_norm_forward_f32(x, O, C, I, -2, NULL, NULL, 1e-5, y, mean, invstd),
         NBN_ERR_SHAPE, "group forward: num_groups -2"},
        {nbn_group_norm_forward_f32(x, O, C, I, 3, NULL, NULL, 1e-5, y, mean, invstd),
         NBN_ERR_VALUE, "group forward: num_groups 3 does not divide 4 channels"},
        {nbn_group_norm_forward_f32(x, O, C, I, 8, NULL, NULL, 1e-5, y, mean, invstd),
         NBN_ERR_VALUE, "group forward: num_groups 8 > 4 channels"},
        {nbn_group_norm_forward_f32(x, O, C, I, G, NULL, NULL, 0.0, y, mean, invstd),
         NBN_ERR_VALUE, "group forward: eps 0"},
        {nbn_group_norm_forward_f32(x, O, C, I, G, NULL, NULL, nan, y, mean, invstd),
         NBN_ERR_VALUE, "group forward: eps NaN"},
        {nbn_group_norm_forward_f64((const double *)x, O, C, I, 3, NULL, NULL, 1e-5,
                                    (double *)y, mean, invstd),
         NBN_ERR_VALUE, "group forward f64: num_groups 3 does not divide 4 channels"},
        {nbn_group_norm_backward_f32(NULL, x, O, C, I, G, NULL, stats, ones, dx, dw, db),
         NBN_ERR_NULL, "group backward: dy NULL"},
        {nbn_group_norm_backward_f32(x, NULL, O, C, I, G, NULL, stats, ones, dx, dw, db),
         NBN_ERR_NULL, "group backward: x NULL"},
        {nbn_group_norm_backward_f32(x, x, O, C, I, G, NULL, NULL, ones, dx, dw, db),
         NBN_ERR_NULL, "group backward: mean NULL"},
        {nbn_group_norm_backward_f32(x, x, O, C, I, G, NULL, stats, NULL, dx, dw, db),
         NBN_ERR_NULL, "group backward: invstd NULL"},
        {nbn_group_norm_backward_f32(x, x, O, C, I, G, NULL, stats, ones, NULL, dw, db),
         NBN_ERR_NULL, "group backward: dx NULL"},
        {nbn_group_norm_backward_f32(x, x, O, 0, I, G, NULL, stats, ones, dx, dw, db),
         NBN_ERR_SHAPE, "group backward: channels 0"},
        {nbn_group_norm_backward_f32(x, x, O, C, I, 0, NULL, stats, ones, dx, dw, db),
         NBN_ERR_SHAPE, "group backward: num_groups 0"},
        {nbn_group_norm_backward_f32(x, x, O, C, I, 3, NULL, stats, ones, dx, dw, db),
         NBN_ERR_VALUE, "group backward: num_groups 3 does not divide 4 channels"},
        {nbn_layer_norm_forward_f32(NULL, O, C * I, NULL, NULL, 1e-5, y, mean, invstd),
         NBN_ERR_NULL, "layer forward: x NULL"},
        {nbn_layer_norm_forward_f32(x, O, C * I, NULL, NULL, 1e-5, y, NULL, invstd),
         NBN_ERR_NULL, "layer forward: mean NULL"},
        {nbn_layer_norm_forward_f32(x, 0, C * I, NULL, NULL, 1e-5, y, mean, invstd),
         NBN_ERR_SHAPE, "layer forward: rows 0"},
        {nbn_layer_norm_forward_f32(x, O, -3, NULL, NULL, 1e-5, y, mean, invstd),
         NBN_ERR_SHAPE, "layer forward: width -3"},
        {nbn_layer_norm_forward_f32(x, O, C * I, NULL, NULL, -1e-5, y, mean, invstd),
         NBN_ERR_VALUE, "layer forward: eps < 0"},
        {nbn_layer_norm_forward_f64((const double *)x, O, C * I / 2, NULL, NULL, 0.0,
                                    (double *)y, mean, invstd),
         NBN_ERR_VALUE, "layer forward f64: eps 0"},
        {nbn_layer_norm_backward_f32(x, x, O, C * I, NULL, stats, ones, NULL, dw, db),
         NBN_ERR_NULL, "layer backward: dx NULL"},
        {nbn_layer_norm_backward_f32(NULL, x, O, C * I, NULL, stats, ones, dx, dw, db),
         NBN_ERR_NULL, "layer backward: dy NULL"},
        {nbn_layer_norm_backward_f32(x, x, O, 0, NULL, stats, ones, dx, dw, db), NBN_ERR_SHAPE,
         "layer backward: width 0"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++)
        check(cases[k].got == cases[k].expected, cases[k].what, nbn_status_string(cases[k].got));
    /* scratch of more bytes than an address space holds (2^59 + 2 channels or columns) */
    const int64_t wide = ((int64_t)1 << 59) + 2;
    check(nbn_group_norm_forward_f32(x, 1, wide, 1, 1, NULL, NULL, 1e-5, y, mean, invstd) ==
              NBN_ERR_SHAPE, "group forward: scratch bytes overflow", "channels 2^59 + 2");
    check(nbn_group_norm_backward_f32(x, x, 1, wide, 1, 2, NULL, stats, ones, dx, dw, db) ==
              NBN_ERR_SHAPE, "group backward: scratch bytes overflow", "channels 2^59 + 2");
    check(nbn_layer_norm_backward_f64((const double *)x, (const double *)x, 1, wide, NULL, stats,
                                      ones, (double *)dx, dw, db) == NBN_ERR_SHAPE,
          "layer backward: scratch bytes overflow", "width 2^59 + 2");
    at = 0;
    int unchanged = 1;
    for (size_t k = 0; k < sizeof outputs / sizeof outputs[0]; k++)
        unchanged &= memcmp(before + at, outputs[k].p, outputs[k].n) == 0, at += outputs[k].n;
    check(unchanged, "group and layer norm calls that fail write nothing", "");
}

static void test_norms(void) {
    /* group norm: one group, two, one per channel (instance norm), odd sizes, one value per
     * group; groups big enough for a work item each and several threads (the cost model);
     * layer norm: one and many rows per work item, several row chunks, a width of one */
    static const norm_shape shapes[] = {
        {0, 2, 6, 35, 1}, {0, 3, 6, 11, 2},  {0, 4, 6, 9, 6},       {0, 5, 3, 21, 3},
        {0, 1, 4, 1, 4},  {0, 7, 9, 5, 3},   {0, 16, 8, 6200, 2},   {0, 2, 12, 4100, 12},
        {1, 7, 13, 1, 0}, {1, 1, 33, 1, 0},  {1, 300, 1, 1, 0},     {1, 2100, 300, 1, 0},
        {1, 64, 9000, 1, 0},
    };
    test_norm_status_codes();
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int f64 = 0; f64 < 2; f64++) test_norm_shape(f64, shapes[s], (int)((s + f64) % 2));
}

/* ------------------------------------------------------------------------ worker threads */
/* Shapes big enough for 2 and 3 threads (the cost model, claims of 64K elements): fused planes
 * (long ones, and 2^21 elements or more: the backward fuses too, items.is_fused), split planes
 * (few channels), rows. */
static const int64_t threaded_shapes[][3] = {{64, 8, 4100}, {40, 3, 7000}, {2100, 400, 1}};

static void test_thread_counts_in_turn(int f64) {
    static const int counts[] = {1, 2, 3, 1, 3, 2, 1, 2};
    for (size_t s = 0; s < sizeof threaded_shapes / sizeof threaded_shapes[0]; s++) {
        int64_t o = threaded_shapes[s][0], c = threaded_shapes[s][1], i = threaded_shapes[s][2];
        char context[128];
        snprintf(context, sizeof context, "%s (%lld, %lld, %lld)", f64 ? "f64" : "f32",
                 (long long)o, (long long)c, (long long)i);
        int64_t size = o * c * i;
        tensor x = make(f64, size), dy = make(f64, size), z = make(f64, size);
        tensor w = make(f64, c), b = make(f64, c);
        fill_input(x.d, o, c, i), fill(dy.d, size, -1.0, 1.0), fill(z.d, size, -1.0, 1.0);
        fill(w.d, c, 0.5, 1.5), fill(b.d, c, -1.0, 1.0);
        sync_from_double(&x), sync_from_double(&dy), sync_from_double(&z);
        sync_from_double(&w), sync_from_double(&b);
        nbn_set_num_threads(counts[0]);
        results first = run_all(&x, &dy, &z, o, c, i, &w, &b, 1e-5, 0.1, context);
        for (size_t k = 1; k < sizeof counts / sizeof counts[0]; k++) {
            nbn_set_num_threads(counts[k]);
            results again = run_all(&x, &dy, &z, o, c, i, &w, &b, 1e-5, 0.1, context);
            char what[96];
            snprintf(what, sizeof what, "call %zu (%d threads) gives the bits of call 0 (%d)", k,
                     counts[k], counts[0]);
            check_same_bits(&first, &again, what, context);
            release_results(&again);
        }
        release_results(&first);
        release(&x), release(&dy), release(&z), release(&w), release(&b);
    }
    nbn_set_num_threads(2);
}

/* One caller's inputs, the outputs expected (from a call made alone) and its own outputs. */
typedef struct {
    int64_t o, c, i;
    tensor x, dy, w, b, rm, rv;
    tensor y, mean, invstd, y_eval, dx, dw, db;     /* expected */
    tensor y2, mean2, invstd2, y_eval2, dx2, dw2, db2; /* the caller's */
    int calls, mismatches;
} caller;

static int caller_step(caller *k, int mine) {
    tensor *y = mine ? &k->y2 : &k->y, *mean = mine ? &k->mean2 : &k->mean;
    tensor *invstd = mine ? &k->invstd2 : &k->invstd, *y_eval = mine ? &k->y_eval2 : &k->y_eval;
    tensor *dx = mine ? &k->dx2 : &k->dx, *dw = mine ? &k->dw2 : &k->dw;
    tensor *db = mine ? &k->db2 : &k->db;
    return train(&k->x, k->o, k->c, k->i, &k->w, &k->b, 1e-5, y, mean, invstd, NULL, NULL, 0.1) |
           eval(&k->x, k->o, k->c, k->i, &k->w, &k->b, &k->rm, &k->rv, 1e-5, y_eval) |
           back(&k->dy, &k->x, k->o, k->c, k->i, &k->w, mean, invstd, dx, dw, db);
}

static atomic_int callers_running;

static void *caller_main(void *arg) {
    caller *k = arg;
    for (int r = 0; r < k->calls; r++) {
        tensor *mine[] = {&k->y2, &k->mean2, &k->invstd2, &k->y_eval2, &k->dx2, &k->dw2, &k->db2};
        for (size_t t = 0; t < sizeof mine / sizeof mine[0]; t++) poison(mine[t]);
        int status = caller_step(k, 1);
        k->mismatches += status != NBN_OK || !same_bits(&k->y, &k->y2) ||
                         !same_bits(&k->mean, &k->mean2) || !same_bits(&k->invstd, &k->invstd2) ||
                         !same_bits(&k->y_eval, &k->y_eval2) || !same_bits(&k->dx, &k->dx2) ||
                         !same_bits(&k->dw, &k->dw2) || !same_bits(&k->db, &k->db2);
    }
    atomic_fetch_sub(&callers_running, 1);
    return NULL;
}

static void test_calls_from_several_threads(int calls) {
    enum { CALLERS = 4 };
    caller k[CALLERS];
    nbn_set_num_threads(2);
    for (int n = 0; n < CALLERS; n++) {
        const int64_t *shape = threaded_shapes[n % 3];
        int f64 = n % 2;
        int64_t o = shape[0], c = shape[1], i = shape[2], size = o * c * i;
        k[n] = (caller){.o = o, .c = c, .i = i, .calls = calls,
                        .x = make(f64, size), .dy = make(f64, size), .w = make(f64, c),
                        .b = make(f64, c), .rm = make(f64, c), .rv = make(f64, c),
                        .y = make(f64, size), .mean = make(f64, c), .invstd = make(f64, c),
                        .y_eval = make(f64, size), .dx = make(f64, size), .dw = make(f64, c),
                        .db = make(f64, c), .y2 = make(f64, size), .mean2 = make(f64, c),
                        .invstd2 = make(f64, c), .y_eval2 = make(f64, size),
                        .dx2 = make(f64, size), .dw2 = make(f64, c), .db2 = make(f64, c)};
        fill_input(k[n].x.d, o, c, i), fill(k[n].dy.d, size, -1.0, 1.0);
        fill(k[n].w.d, c, 0.5, 1.5), fill(k[n].b.d, c, -1.0, 1.0);
        fill(k[n].rm.d, c, -1.0, 1.0), fill(k[n].rv.d, c, 0.5, 2.0);
        tensor *in[] = {&k[n].x, &k[n].dy, &k[n].w, &k[n].b, &k[n].rm, &k[n].rv};
        for (size_t t = 0; t < sizeof in / sizeof in[0]; t++) sync_from_double(in[t]);
        check(caller_step(&k[n], 0) == NBN_OK, "a call made alone returns NBN_OK", "callers");
    }
    pthread_t ids[CALLERS];
    atomic_store(&callers_running, CALLERS);
    int started = 0;
    for (int n = 0; n < CALLERS; n++)
        started += pthread_create(&ids[n], NULL, caller_main, &k[n]) == 0;
    check(started == CALLERS, "the callers' threads start", "callers");
    /* meanwhile the count changes under them: the pool grows and shrinks between their steps */
    static const int counts[] = {3, 1, 2};
    const struct timespec pause = {0, 2000000};
    for (int turn = 0; atomic_load(&callers_running) > CALLERS - started; turn++) {
        nbn_set_num_threads(counts[turn % 3]);
        nanosleep(&pause, NULL);
    }
    for (int n = 0; n < started; n++) pthread_join(ids[n], NULL);
    nbn_set_num_threads(2);
    for (int n = 0; n < CALLERS; n++) {
        char context[96];
        snprintf(context, sizeof context, "caller %d, %s (%lld, %lld, %lld), %d calls", n,
                 k[n].x.f64 ? "f64" : "f32", (long long)k[n].o, (long long)k[n].c,
                 (long long)k[n].i, calls);
        check(k[n].mismatches == 0, "calls from 4 threads at once give the bits of one alone",
              context);
        tensor *all[] = {&k[n].x, &k[n].dy, &k[n].w, &k[n].b, &k[n].rm, &k[n].rv, &k[n].y,
                         &k[n].mean, &k[n].invstd, &k[n].y_eval, &k[n].dx, &k[n].dw, &k[n].db,
                         &k[n].y2, &k[n].mean2, &k[n].invstd2, &k[n].y_eval2, &k[n].dx2,
                         &k[n].dw2, &k[n].db2};
        for (size_t t = 0; t < sizeof all / sizeof all[0]; t++) release(all[t]);
    }
}

static void test_threads(void) {
    test_thread_counts_in_turn(0), test_thread_counts_in_turn(1);
    test_calls_from_several_threads(6);
}

static void test_library_info(void) {
    check(nbn_version() == NBN_VERSION_NUMBER, "nbn_version matches the header", "");
    check(nbn_version() / 10000 == NBN_VERSION_MAJOR, "major version", "");
    check(strncmp(nbn_status_string(NBN_OK), "NBN_OK", 6) == 0, "status string of NBN_OK", "");
    check(strncmp(nbn_status_string(NBN_ERR_VALUE), "NBN_ERR_VALUE", 13) == 0,
          "status string of NBN_ERR_VALUE", "");
    check(strncmp(nbn_status_string(NBN_ERR_ALIAS), "NBN_ERR_ALIAS", 13) == 0,
          "status string of NBN_ERR_ALIAS", "");
    check(nbn_version() % 10000 / 100 >= 3, "minor version >= 3: group and layer norm", "");
    check(nbn_version() % 10000 / 100 >= 4, "minor version >= 4: double statistics", "");
    check(strncmp(nbn_status_string(NBN_ERR_STATE), "NBN_ERR_STATE", 13) == 0,
          "status string of NBN_ERR_STATE", "");
    check(nbn_status_string(12345) != NULL, "status string of an unknown code", "");
    nbn_set_num_threads(3);
    check(nbn_get_num_threads() == 3, "set_num_threads(3)", "");
    nbn_set_num_threads(0);
    check(nbn_get_num_threads() >= 1, "set_num_threads(0): all CPUs", "");
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1 && strcmp(argv[1], "threads") == 0) { /* the worker threads only */
        test_threads();
        printf("isa %s: %d checks, %d failed\n", nbn_isa(), checks, failures);
        return failures ? 1 : 0;
    }
    if (argc > 1 && strcmp(argv[1], "norms") == 0) { /* group and layer norm only (1.3) */
        test_library_info();
        test_norms();
        printf("isa %s: %d checks, %d failed\n", nbn_isa(), checks, failures);
        return failures ? 1 : 0;
    }
    if (argc > 1 && strcmp(argv[1], "layer") == 0) { /* the layer handle only */
        test_library_info();
        test_layer();
        printf("isa %s: %d checks, %d failed\n", nbn_isa(), checks, failures);
        return failures ? 1 : 0;
    }
    /* (outer, channels, inner): planes with one and several blocks per run, many channels
     * of long planes (the forward fused with 2 threads: items.is_fused) and few (split), rows with one and several chunks and tiles,
     * outer = 1, the smallest training batch (two values per channel); 2 and 3 channels of
     * short runs, whose backward sums differed between the partitions of 1 and 2 threads in the
     * x86-64-v2 variant until the reductions were called apart (stats.apart); the last three
     * are big enough (the cost model: 2 threads) for the library to start a second thread. */
    static const int64_t shapes[][3] = {
        {4, 3, 5},     {2, 5, 4100}, {6, 1, 4097}, {16, 9, 7},    {1, 2, 9},     {3, 7, 1},
        {2, 1, 1},     {1, 4, 2},    {16, 3, 7},   {16, 2, 7},    {16, 8, 4100}, {40, 3, 4500},
        {1100, 1040, 1},
    };
    test_library_info();
    test_status_codes();
    test_status_codes_ex();
    test_scratch_that_cannot_exist();
    test_eval_eps_zero(0), test_eval_eps_zero(1);
    test_layer();
    test_norms();
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int f64 = 0; f64 < 2; f64++)
            test_shape(f64, shapes[s][0], shapes[s][1], shapes[s][2], (int)((s + f64) % 2));
    test_threads();
    printf("isa %s: %d checks, %d failed\n", nbn_isa(), checks, failures);
    return failures ? 1 : 0;
}

/* reference.h: batch norm (and group and layer norm, 1.3) in double precision, written as
 * plainly as possible.
 *
 * One thread, textbook two-pass statistics, the formulas of numba_bn.h and docs/backward.md
 * and nothing else. The reference C backend (reference_backend.c) exports it through the ABI;
 * the C test host (test_host.c) checks libnumba_bn.so against it.
 *
 * Arrays are C-contiguous (outer, channels, inner); element (n, c, i) is
 * x[(n * channels + c) * inner + i]. Every output is overwritten (=).
 */
#ifndef NBN_REFERENCE_H
#define NBN_REFERENCE_H

#include <math.h>
#include <stdint.h>

#define NBN_AT(n, c, i) (((n) * channels + (c)) * inner + (i))

/* Per channel: mean and biased variance over outer and inner. */
static void reference_batch_stats(const double *x, int64_t outer, int64_t channels, int64_t inner,
                                  double *mean, double *var) {
    double m = (double)(outer * inner);
    for (int64_t c = 0; c < channels; c++) {
        double sum = 0.0;
        for (int64_t n = 0; n < outer; n++)
            for (int64_t i = 0; i < inner; i++) sum += x[NBN_AT(n, c, i)];
        mean[c] = sum / m;
        double squares = 0.0;
        for (int64_t n = 0; n < outer; n++)
            for (int64_t i = 0; i < inner; i++) {
                double d = x[NBN_AT(n, c, i)] - mean[c];
                squares += d * d;
            }
        var[c] = squares / m;
    }
}

/* y = (x - mean) * invstd * weight + bias; weight and bias may be NULL (1 and 0). */
static void reference_normalize(const double *x, int64_t outer, int64_t channels, int64_t inner,
                                const double *mean, const double *invstd, const double *weight,
                                const double *bias, double *y) {
    for (int64_t n = 0; n < outer; n++)
        for (int64_t c = 0; c < channels; c++)
            for (int64_t i = 0; i < inner; i++) {
                double x_hat = (x[NBN_AT(n, c, i)] - mean[c]) * invstd[c];
                y[NBN_AT(n, c, i)] = x_hat * (weight ? weight[c] : 1.0) + (bias ? bias[c] : 0.0);
            }
}

/* Training forward: y, mean, invstd = 1 / sqrt(var + eps), and the unbiased variance. */
static void reference_forward_train(const double *x, int64_t outer, int64_t channels,
                                    int64_t inner, const double *weight, const double *bias,
                                    double eps, double *y, double *mean, double *invstd,
                                    double *var_unbiased) {
    double m = (double)(outer * inner);
    reference_batch_stats(x, outer, channels, inner, mean, var_unbiased); /* biased, for now */
    for (int64_t c = 0; c < channels; c++) {
        double var = var_unbiased[c];
        invstd[c] = 1.0 / sqrt(var + eps);
        var_unbiased[c] = var * m / (m - 1.0);
    }
    reference_normalize(x, outer, channels, inner, mean, invstd, weight, bias, y);
}

/* running = (1 - momentum) * running + momentum * batch. */
static void reference_running_update(int64_t channels, const double *mean,
                                     const double *var_unbiased, double momentum,
                                     double *running_mean, double *running_var) {
    for (int64_t c = 0; c < channels; c++) {
        running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean[c];
        running_var[c] = (1.0 - momentum) * running_var[c] + momentum * var_unbiased[c];
    }
}

/* Inference forward; invstd is scratch of length channels. */
static void reference_forward_eval(const double *x, int64_t outer, int64_t channels, int64_t inner,
                                   const double *weight, const double *bias,
                                   const double *running_mean, const double *running_var,
                                   double eps, double *invstd, double *y) {
    for (int64_t c = 0; c < channels; c++) invstd[c] = 1.0 / sqrt(running_var[c] + eps);
    reference_normalize(x, outer, channels, inner, running_mean, invstd, weight, bias, y);
}

/* Backward (docs/backward.md): dbias = sum dy, dweight = sum dy * x_hat,
 * dx = weight * invstd * (dy - dbias / m - x_hat * dweight / m). */
static void reference_backward(const double *dy, const double *x, int64_t outer,
                               int64_t channels, int64_t inner, const double *weight,
                               const double *mean, const double *invstd, double *dx,
                               double *dweight, double *dbias) {
    double m = (double)(outer * inner);
    for (int64_t c = 0; c < channels; c++) {
        double sum_dy = 0.0, sum_dy_xhat = 0.0;
        for (int64_t n = 0; n < outer; n++)
            for (int64_t i = 0; i < inner; i++) {
                double x_hat = (x[NBN_AT(n, c, i)] - mean[c]) * invstd[c];
                sum_dy += dy[NBN_AT(n, c, i)];
                sum_dy_xhat += dy[NBN_AT(n, c, i)] * x_hat;
            }
        dbias[c] = sum_dy;
        dweight[c] = sum_dy_xhat;
        double scale = (weight ? weight[c] : 1.0) * invstd[c];
        for (int64_t n = 0; n < outer; n++)
            for (int64_t i = 0; i < inner; i++) {
                double x_hat = (x[NBN_AT(n, c, i)] - mean[c]) * invstd[c];
                dx[NBN_AT(n, c, i)] =
                    scale * (dy[NBN_AT(n, c, i)] - sum_dy / m - x_hat * sum_dy_xhat / m);
            }
    }
}

/* The epilogue of the fused forward (numba_bn.h 1.1), applied to y: y + residual (residual may
 * be NULL: none), then, when relu, max(., 0) keeping NaN. */
static void reference_epilogue(double *y, int64_t size, const double *residual, int relu) {
    for (int64_t k = 0; k < size; k++) {
        double v = residual ? y[k] + residual[k] : y[k];
        y[k] = relu && v < 0.0 ? 0.0 : v;
    }
}

/* The gradient through the fused forward's ReLU, from its output y: g = dy where y > 0, else 0
 * (NaN y included). It is the residual's gradient, and the batch norm backward runs on it. */
static void reference_relu_grad(const double *dy, const double *y, int64_t size, double *g) {
    for (int64_t k = 0; k < size; k++) g[k] = y[k] > 0.0 ? dy[k] : 0.0;
}

/* ---------------------------------------------------------- group and layer norm (1.3) */
/* Group norm forward: per sample n and group g (channels g * cg to (g + 1) * cg - 1, cg =
 * channels / num_groups), mean and biased variance over those channels and inner; mean and
 * invstd have outer * num_groups values; weight and bias per channel, may be NULL. */
static void reference_group_norm_forward(const double *x, int64_t outer, int64_t channels,
                                         int64_t inner, int64_t num_groups, const double *weight,
                                         const double *bias, double eps, double *y, double *mean,
                                         double *invstd) {
    int64_t cg = channels / num_groups;
    double m = (double)(cg * inner);
    for (int64_t n = 0; n < outer; n++)
        for (int64_t g = 0; g < num_groups; g++) {
            double sum = 0.0, squares = 0.0;
            for (int64_t c = g * cg; c < (g + 1) * cg; c++)
                for (int64_t i = 0; i < inner; i++) sum += x[NBN_AT(n, c, i)];
            double mu = sum / m;
            for (int64_t c = g * cg; c < (g + 1) * cg; c++)
                for (int64_t i = 0; i < inner; i++) {
                    double d = x[NBN_AT(n, c, i)] - mu;
                    squares += d * d;
                }
            double inv = 1.0 / sqrt(squares / m + eps);
            mean[n * num_groups + g] = mu, invstd[n * num_groups + g] = inv;
            for (int64_t c = g * cg; c < (g + 1) * cg; c++)
                for (int64_t i = 0; i < inner; i++) {
                    double x_hat = (x[NBN_AT(n, c, i)] - mu) * inv;
                    y[NBN_AT(n, c, i)] =
                        x_hat * (weight ? weight[c] : 1.0) + (bias ? bias[c] : 0.0);
                }
        }
}

/* Group norm backward (docs/backward.md, with the weight inside the group's sums): per group,
 * g = dy * weight[c], dx = invstd * (g - sum(g) / m - x_hat * sum(g * x_hat) / m); per channel
 * dweight = sum dy * x_hat, dbias = sum dy over samples and inner. */
static void reference_group_norm_backward(const double *dy, const double *x, int64_t outer,
                                          int64_t channels, int64_t inner, int64_t num_groups,
                                          const double *weight, const double *mean,
                                          const double *invstd, double *dx, double *dweight,
                                          double *dbias) {
    int64_t cg = channels / num_groups;
    double m = (double)(cg * inner);
    for (int64_t c = 0; c < channels; c++) dweight[c] = 0.0, dbias[c] = 0.0;
    for (int64_t n = 0; n < outer; n++)
        for (int64_t g = 0; g < num_groups; g++) {
            double mu = mean[n * num_groups + g], inv = invstd[n * num_groups + g];
            double sum_g = 0.0, sum_g_xhat = 0.0;
            for (int64_t c = g * cg; c < (g + 1) * cg; c++)
                for (int64_t i = 0; i < inner; i++) {
                    double x_hat = (x[NBN_AT(n, c, i)] - mu) * inv;
                    double grad = dy[NBN_AT(n, c, i)] * (weight ? weight[c] : 1.0);
                    sum_g += grad, sum_g_xhat += grad * x_hat;
                    dweight[c] += dy[NBN_AT(n, c, i)] * x_hat;
                    dbias[c] += dy[NBN_AT(n, c, i)];
                }
            for (int64_t c = g * cg; c < (g + 1) * cg; c++)
                for (int64_t i = 0; i < inner; i++) {
                    double x_hat = (x[NBN_AT(n, c, i)] - mu) * inv;
                    double grad = dy[NBN_AT(n, c, i)] * (weight ? weight[c] : 1.0);
                    dx[NBN_AT(n, c, i)] = inv * (grad - sum_g / m - x_hat * sum_g_xhat / m);
                }
        }
}

/* Layer norm forward on (rows, width): per row, mean, invstd, and y with the per-element weight
 * and bias (width; may be NULL). */
static void reference_layer_norm_forward(const double *x, int64_t rows, int64_t width,
                                         const double *weight, const double *bias, double eps,
                                         double *y, double *mean, double *invstd) {
    for (int64_t r = 0; r < rows; r++) {
        const double *row = x + r * width;
        double sum = 0.0, squares = 0.0;
        for (int64_t f = 0; f < width; f++) sum += row[f];
        double mu = sum / (double)width;
        for (int64_t f = 0; f < width; f++) squares += (row[f] - mu) * (row[f] - mu);
        double inv = 1.0 / sqrt(squares / (double)width + eps);
        mean[r] = mu, invstd[r] = inv;
        for (int64_t f = 0; f < width; f++)
            y[r * width + f] =
                (row[f] - mu) * inv * (weight ? weight[f] : 1.0) + (bias ? bias[f] : 0.0);
    }
}

/* Layer norm backward: per row, g = dy * weight[f],
 * dx = invstd * (g - sum(g) / width - x_hat * sum(g * x_hat) / width); per element of a row
 * dweight = sum dy * x_hat, dbias = sum dy over the rows. */
static void reference_layer_norm_backward(const double *dy, const double *x, int64_t rows,
                                          int64_t width, const double *weight,
                                          const double *mean, const double *invstd, double *dx,
                                          double *dweight, double *dbias) {
    double m = (double)width;
    for (int64_t f = 0; f < width; f++) dweight[f] = 0.0, dbias[f] = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        const double *row = x + r * width, *grow = dy + r * width;
        double sum_g = 0.0, sum_g_xhat = 0.0;
        for (int64_t f = 0; f < width; f++) {
            double x_hat = (row[f] - mean[r]) * invstd[r];
            double grad = grow[f] * (weight ? weight[f] : 1.0);
            sum_g += grad, sum_g_xhat += grad * x_hat;
            dweight[f] += grow[f] * x_hat;
            dbias[f] += grow[f];
        }
        for (int64_t f = 0; f < width; f++) {
            double x_hat = (row[f] - mean[r]) * invstd[r];
            double grad = grow[f] * (weight ? weight[f] : 1.0);
            dx[r * width + f] = invstd[r] * (grad - sum_g / m - x_hat * sum_g_xhat / m);
        }
    }
}

#undef NBN_AT

#endif /* NBN_REFERENCE_H */

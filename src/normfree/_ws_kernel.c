/*
 * Fused Scaled Weight Standardization for float32 weights on the CPU, loaded
 * with ctypes by normfree/fused.py (plain C: no Python or torch headers).
 *
 * A weight is a (rows, n) matrix, one row per output channel, rows contiguous.
 * Each row (at most a few tens of KB) is read once from memory and its other
 * passes hit the L1/L2 cache, so that the forward costs one read and one write
 * of the weight, the backward two reads and one write: the memory-bound torch
 * version makes four to six passes each way.
 *
 * Sums are float over blocks of BLOCK elements (vectorized), added in double.
 */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define BLOCK 512

static inline int64_t block_end(int64_t b, int64_t n) { return b + BLOCK < n ? b + BLOCK : n; }

/*
 * Per row i: mu = mean(w), q = sum((w - mu)^2) (corrected two-pass, Chan,
 * Golub & LeVeque 1983), r = 1 / sqrt(max(q, eps)),
 * out = (w - mu) * r * m[i]. Writes mu, r, q (one float per row).
 */
CLONES
void ws_forward(const float *w, const float *m, int64_t rows, int64_t n, float eps,
                float *out, float *mu_out, float *r_out, float *q_out)
{
    for (int64_t i = 0; i < rows; i++) {
        const float *wi = w + i * n;
        float *oi = out + i * n;
        double s = 0.0;
        for (int64_t b = 0; b < n; b += BLOCK) {
            const int64_t e = block_end(b, n);
            float p = 0.0f;
#pragma omp simd reduction(+:p)
            for (int64_t j = b; j < e; j++) p += wi[j];
            s += p;
        }
        const float mu0 = (float)(s / (double)n);
        double s1 = 0.0, q = 0.0; /* sums of c and c^2 for c = w - mu0 (in cache) */
        for (int64_t b = 0; b < n; b += BLOCK) {
            const int64_t e = block_end(b, n);
            float p1 = 0.0f, p2 = 0.0f;
#pragma omp simd reduction(+:p1, p2)
            for (int64_t j = b; j < e; j++) { const float c = wi[j] - mu0; p1 += c; p2 += c * c; }
            s1 += p1;
            q += p2;
        }
        /* corrected two-pass: removes mu0's rounding (a constant row centres to exactly 0) */
        const float mu = mu0 + (float)(s1 / (double)n);
        q -= s1 * s1 / (double)n;
        const float qf = q > 0.0 ? (float)q : 0.0f;
        const float r = 1.0f / sqrtf(qf > eps ? qf : eps);
        const float f = r * m[i];
#pragma omp simd
        for (int64_t j = 0; j < n; j++) oi[j] = (wi[j] - mu) * f;
        mu_out[i] = mu;
        r_out[i] = r;
        q_out[i] = qf;
    }
}

/*
 * Gradients of the forward above for g = dL/dout, per row i with c = w - mu:
 * d[i] = dL/dm[i] = r sum(g c), and, when grad_w is not NULL,
 * dL/dw = r m (g - mean(g)) - r^2 m d c, the last term only where free[i] != 0
 * (q >= eps; below it r is a constant).
 */
CLONES
void ws_backward(const float *g, const float *w, const float *mu, const float *r,
                 const float *m, const float *free, int64_t rows, int64_t n,
                 float *grad_w, float *d_out)
{
    for (int64_t i = 0; i < rows; i++) {
        const float *gi = g + i * n, *wi = w + i * n;
        const float mi = mu[i];
        double gs = 0.0, gc = 0.0;
        for (int64_t b = 0; b < n; b += BLOCK) {
            const int64_t e = block_end(b, n);
            float ps = 0.0f, pc = 0.0f;
#pragma omp simd reduction(+:ps, pc)
            for (int64_t j = b; j < e; j++) { ps += gi[j]; pc += gi[j] * (wi[j] - mi); }
            gs += ps;
            gc += pc;
        }
        const float d = (float)(gc * (double)r[i]);
        d_out[i] = d;
        if (!grad_w) continue;
        const float rm = r[i] * m[i];
        const float k = free[i] != 0.0f ? -(rm * r[i] * d) : 0.0f;
        const float gmean = (float)(gs / (double)n);
        float *oi = grad_w + i * n;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) oi[j] = rm * (gi[j] - gmean) + k * (wi[j] - mi);
    }
}

/* One decode step of a gated recurrent mixer after its projections, fused for CPU: short convolution, RoPE,
 * Gated DeltaNet's delta rule (mode 0) or Mamba2's decayed update (mode 1), output gate and per-head RMSNorm.
 * The math, the shapes and the PyTorch reference: kernels/ssm_step/naive.py.  fp32, contiguous, row-major; the
 * conv state and the recurrent state are updated in place.  Built and loaded by cpu_build.py (ctypes). */
#include <math.h>

static inline float dot(const float *restrict x, const float *restrict y, int n) {
    float s = 0.f;
#pragma omp simd reduction(+:s)
    for (int c = 0; c < n; c++) s += x[c] * y[c];
    return s;
}

static inline float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }   /* torch's threshold */

/* x [D] rotated in place over its first R dims (rotate-half pairs d, d + R/2) */
static void rope(float *restrict x, const float *restrict cos, const float *restrict sin, int R) {
    const int half = R / 2;
    for (int d = 0; d < half; d++) {
        const float a = x[d], b = x[d + half];
        x[d] = a * cos[d] - b * sin[d];
        x[d + half] = b * cos[d + half] + a * sin[d + half];
    }
}

static void unit(float *restrict x, int D) {   /* x / max(|x|, 1e-12), torch's F.normalize */
    const float norm = sqrtf(dot(x, x, D));
    const float inv = 1.f / (norm > 1e-12f ? norm : 1e-12f);
    for (int d = 0; d < D; d++) x[d] *= inv;
}

void rnnify_ssm_step(int B, int H, int HKV, int D, int K, int mode,
                     const float *qkv, const float *valid, const float *cos, const float *sin, int R,
                     long rope_stride, float *conv_state, const float *conv_w,
                     const float *gate_logit, const float *decay_logit, const float *a_log, const float *d_skip,
                     const float *z, const float *norm_w, const float *norm_b, float scale, float eps,
                     float *state, float *out) {
    const int C = (H + 2 * HKV) * D, G = H / HKV;
    float x[C], u[D], o[D];
    for (int b = 0; b < B; b++) {
        const float n = valid ? valid[b] : 1.f;
        const float *xin = qkv + (long)b * C;
        if (K > 0) {   /* s <- [s[:, 1:], n x];  x = sum_i w[:, i] s[:, K-1-i] */
            float *s = conv_state + (long)b * C * K;
            for (int c = 0; c < C; c++, s += K) {
                const float *w = conv_w + (long)c * K;
                float acc = 0.f;
                for (int i = 0; i < K - 1; i++) { s[i] = s[i + 1]; acc += w[K - 1 - i] * s[i]; }
                s[K - 1] = n * xin[c];
                x[c] = acc + w[0] * s[K - 1];
            }
        } else {
            for (int c = 0; c < C; c++) x[c] = n * xin[c];
        }
        float *q = x, *k = x + H * D, *v = x + (H + HKV) * D;
        if (cos) {
            const float *cr = cos + rope_stride * b, *sr = sin + rope_stride * b;
            for (int h = 0; h < H; h++) rope(q + h * D, cr, sr, R);
            for (int j = 0; j < HKV; j++) rope(k + j * D, cr, sr, R);
        }
        if (mode == 0) {
            for (int h = 0; h < H; h++) unit(q + h * D, D);
            for (int j = 0; j < HKV; j++) unit(k + j * D, D);
        }
        for (int h = 0; h < H; h++) {
            const float *qh = q + h * D, *kh = k + (h / G) * D, *vh = v + (h / G) * D;
            float *S = state + ((long)b * H + h) * D * D;   /* [D key rows, D value columns] */
            const float A = expf(a_log[h]), gl = gate_logit[(long)b * H + h];
            for (int c = 0; c < D; c++) o[c] = 0.f;
            if (mode == 0) {   /* S <- a S;  S <- S + beta k (v - S^T k)^T;  o = scale S^T q */
                const float beta = n / (1.f + expf(-gl));
                const float a = expf(-n * A * softplus(decay_logit[(long)b * H + h]));
                for (int c = 0; c < D; c++) u[c] = 0.f;
                for (int r = 0; r < D; r++) {
                    float *Sr = S + (long)r * D;
                    const float kr = kh[r];
#pragma omp simd
                    for (int c = 0; c < D; c++) { Sr[c] *= a; u[c] += kr * Sr[c]; }
                }
                for (int c = 0; c < D; c++) u[c] = beta * (vh[c] - u[c]);
                for (int r = 0; r < D; r++) {
                    float *Sr = S + (long)r * D;
                    const float kr = kh[r], qr = qh[r];
#pragma omp simd
                    for (int c = 0; c < D; c++) { Sr[c] += kr * u[c]; o[c] += qr * Sr[c]; }
                }
                for (int c = 0; c < D; c++) o[c] *= scale;
            } else {           /* S <- a S + k (dt v)^T;  o = scale S^T q + D_skip v */
                const float dt = n * softplus(gl), a = expf(-A * dt);
                for (int c = 0; c < D; c++) u[c] = dt * vh[c];
                for (int r = 0; r < D; r++) {
                    float *Sr = S + (long)r * D;
                    const float kr = kh[r], qr = qh[r];
#pragma omp simd
                    for (int c = 0; c < D; c++) { Sr[c] = a * Sr[c] + kr * u[c]; o[c] += qr * Sr[c]; }
                }
                for (int c = 0; c < D; c++) o[c] = scale * o[c] + d_skip[h] * vh[c];
            }
            if (z) {
                const float *zh = z + ((long)b * H + h) * D;
                for (int c = 0; c < D; c++) o[c] *= zh[c] / (1.f + expf(-zh[c]));
            }
            const float inv = 1.f / sqrtf(dot(o, o, D) / D + eps);
            const float *w = norm_w + (long)h * D, *bias = norm_b + (long)h * D;
            float *y = out + ((long)b * H + h) * D;
            for (int c = 0; c < D; c++) y[c] = w[c] * (o[c] * inv) + bias[c];
        }
    }
}

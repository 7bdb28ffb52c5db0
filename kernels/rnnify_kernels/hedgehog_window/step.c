/* One decode step of Hedgehog linear attention beside a softmax window over a ring of slots, fused for CPU.
 * The math, the shapes and the PyTorch reference: kernels/hedgehog_window/naive.py.  fp32, contiguous, row-major.
 * Built and loaded by kernels/hedgehog_window/cpu.py (ctypes); reductions vectorise under -fopenmp-simd. */
#include <float.h>
#include <math.h>
#include <string.h>

static inline void axpy(float *restrict y, float a, const float *restrict x, int n) {
#pragma omp simd
    for (int c = 0; c < n; c++) y[c] += a * x[c];
}

static inline float dot(const float *restrict x, const float *restrict y, int n) {
    float s = 0.f;
#pragma omp simd reduction(+:s)
    for (int c = 0; c < n; c++) s += x[c] * y[c];
    return s;
}

/* out [D] = RoPE of x [D] over its first R dims (rotate-half pairs d, d + R/2; the rest passes unchanged):
 * x_rot = x cos + rotate_half(x) sin,  rotate_half(x) = [-x[R/2:R], x[:R/2]] */
static void rope(const float *restrict x, const float *restrict cos, const float *restrict sin, int R, int D,
                 float *restrict out) {
    const int half = R / 2;
    for (int d = 0; d < half; d++) out[d] = x[d] * cos[d] - x[d + half] * sin[d];
    for (int d = half; d < R; d++) out[d] = x[d] * cos[d] + x[d - half] * sin[d];
    for (int d = R; d < D; d++) out[d] = x[d];
}

/* out [2F] = [softmax(x W), softmax(-x W)] for x [D], W [D, F] */
static void feature_map(const float *restrict x, const float *restrict w, int D, int F, float *restrict out) {
    float *z = out + F;   /* x W, overwritten by the second half below */
    for (int f = 0; f < F; f++) z[f] = 0.f;
    for (int d = 0; d < D; d++) axpy(z, x[d], w + (long)d * F, F);
    float hi = -FLT_MAX, lo = FLT_MAX;
    for (int f = 0; f < F; f++) { hi = z[f] > hi ? z[f] : hi; lo = z[f] < lo ? z[f] : lo; }
    float sp = 0.f, sn = 0.f;
    for (int f = 0; f < F; f++) {
        const float p = expf(z[f] - hi), n = expf(lo - z[f]);
        out[f] = p; z[f] = n; sp += p; sn += n;
    }
    const float ip = 1.f / sp, in = 1.f / sn;
    for (int f = 0; f < F; f++) { out[f] *= ip; z[f] *= in; }
}

void rnnify_hedgehog_window_step(int B, int H, int HKV, int D, int F, int DV, int SLOTS,
                                 const float *q, const float *k, const float *v, const float *valid,
                                 const float *cos, const float *sin, int R, long rope_stride,
                                 float *keys, float *values, float *state,
                                 const float *fq, const float *fk, const float *share,
                                 int slot, int push, float scaling, float eps, float *out) {
    const int G = H / HKV, F2 = 2 * F, DV1 = DV + 1;
    float phi_k[F2], phi_q[F2], lin[G][DV1], win[DV1], v_old[DV1], scores[SLOTS], q_rot[G][D], k_rot[D];
    const float *q_of[G];
    for (int b = 0; b < B; b++)
    for (int hk = 0; hk < HKV; hk++) {
        float *ring_k = keys + (long)(b * HKV + hk) * SLOTS * D;
        float *ring_v = values + (long)(b * HKV + hk) * SLOTS * DV1;
        const float *k_new = k + (long)(b * HKV + hk) * D;
        if (cos) {   /* RoPE here instead of before the call: q and k rotated at position cos/sin row b */
            rope(k_new, cos + b * rope_stride, sin + b * rope_stride, R, D, k_rot);
            k_new = k_rot;
        }
        for (int g = 0; g < G; g++) {
            q_of[g] = q + (long)(b * H + hk * G + g) * D;
            if (cos) {
                rope(q_of[g], cos + b * rope_stride, sin + b * rope_stride, R, D, q_rot[g]);
                q_of[g] = q_rot[g];
            }
        }
        if (push) memcpy(v_old, ring_v + (long)slot * DV1, sizeof(float) * DV1);
        /* linear part: the key in `slot` enters each query head's state, which is then read in the same pass */
        for (int g = 0; g < G; g++) {
            const int h = hk * G + g;
            float *S = state + (long)(b * H + h) * F2 * DV1;
            if (push) feature_map(ring_k + (long)slot * D, fk + (long)h * D * F, D, F, phi_k);
            feature_map(q_of[g], fq + (long)h * D * F, D, F, phi_q);
            for (int c = 0; c < DV1; c++) lin[g][c] = 0.f;
            for (int r = 0; r < F2; r++) {
                float *row = S + (long)r * DV1;
                if (push) axpy(row, phi_k[r], v_old, DV1);
                axpy(lin[g], phi_q[r], row, DV1);
            }
        }
        /* the new token takes the slot: its value row is [v·valid, valid] */
        const float n_new = valid ? valid[b] : 1.f;
        memcpy(ring_k + (long)slot * D, k_new, sizeof(float) * D);
        for (int c = 0; c < DV; c++) ring_v[(long)slot * DV1 + c] = v[(long)(b * HKV + hk) * DV + c] * n_new;
        ring_v[(long)slot * DV1 + DV] = n_new;
        /* window part over the slots with a normaliser > 0 (score bias log(normaliser)), then the mix */
        for (int g = 0; g < G; g++) {
            const int h = hk * G + g;
            const float *qh = q_of[g];
            float m = -FLT_MAX;
            for (int j = 0; j < SLOTS; j++) {
                const float n = ring_v[(long)j * DV1 + DV];
                if (!(n > 0.f)) { scores[j] = -INFINITY; continue; }
                const float s = dot(qh, ring_k + (long)j * D, D) * scaling + (n == 1.f ? 0.f : logf(n));
                scores[j] = s;
                m = s > m ? s : m;
            }
            for (int c = 0; c < DV1; c++) win[c] = 0.f;
            for (int j = 0; j < SLOTS; j++)
                if (scores[j] != -INFINITY) axpy(win, expf(scores[j] - m), ring_v + (long)j * DV1, DV1);
            const float f = share[h], *l = lin[g];
            const float den = l[DV] + f * (win[DV] - l[DV]) + eps;
            float *o = out + (long)(b * H + h) * DV;
            for (int c = 0; c < DV; c++) o[c] = (l[c] + f * (win[c] - l[c])) / den;
        }
    }
}

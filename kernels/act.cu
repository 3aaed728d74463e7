// Activations: SwiGLU (out = silu(gate) * up, the Qwen2/Llama MLP) and the three GELUs of the
// vision towers and projectors (tanh approximation, exact erf, CLIP's quick_gelu), forward and
// backward. Grid-stride loops over 8-element vectors (one 16-byte load for bf16, two for f32)
// when every pointer is 16-byte aligned, then a scalar tail. Math is f32.
#include "common.cuh"

#define ACT_VEC 8

template <typename T> __device__ __forceinline__ void act_ld8(const T* p, float* o);
template <> __device__ __forceinline__ void act_ld8<bf16>(const bf16* p, float* o) { ld16(p, o); }
template <> __device__ __forceinline__ void act_ld8<float>(const float* p, float* o) { ld16(p, o); ld16(p + 4, o + 4); }
template <typename T> __device__ __forceinline__ void act_st8(T* p, const float* v);
template <> __device__ __forceinline__ void act_st8<bf16>(bf16* p, const float* v) { st16(p, v); }
template <> __device__ __forceinline__ void act_st8<float>(float* p, const float* v) { st16(p, v); st16(p + 4, v + 4); }

__device__ __forceinline__ long act_tid() { return (long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long act_stride() { return (long)gridDim.x * blockDim.x; }

// 1 / (1 + e^-x): e^-x overflows to inf for x < -88 and the result is 0, as it should be.
__device__ __forceinline__ float sigm(float x) { return 1.f / (1.f + expf(-x)); }

// ---- SwiGLU ----------------------------------------------------------------------------------

template <typename T>
__device__ void swiglu_fwd(T* __restrict__ out, const T* __restrict__ gate, const T* __restrict__ up, long n) {
    bool vec = aligned16(out) && aligned16(gate) && aligned16(up);
    long nv = vec ? n / ACT_VEC : 0;
    for (long i = act_tid(); i < nv; i += act_stride()) {
        float g[ACT_VEC], u[ACT_VEC];
        act_ld8(gate + i * ACT_VEC, g);
        act_ld8(up + i * ACT_VEC, u);
#pragma unroll
        for (int k = 0; k < ACT_VEC; k++) g[k] = g[k] * sigm(g[k]) * u[k];
        act_st8(out + i * ACT_VEC, g);
    }
    for (long i = nv * ACT_VEC + act_tid(); i < n; i += act_stride()) {
        float g = ld(gate, i);
        st(out, i, g * sigm(g) * ld(up, i));
    }
}

// dgate = dout * up * s * (1 + g * (1 - s)), dup = dout * g * s, with s = sigmoid(g).
__device__ __forceinline__ void swiglu_grad(float d, float g, float u, float& dg, float& du) {
    float s = sigm(g);
    du = d * g * s;
    dg = d * u * s * (1.f + g * (1.f - s));
}

template <typename T>
__device__ void swiglu_bwd(T* __restrict__ dgate, T* __restrict__ dup, const T* __restrict__ dout,
                           const T* __restrict__ gate, const T* __restrict__ up, long n) {
    bool vec = aligned16(dgate) && aligned16(dup) && aligned16(dout) && aligned16(gate) && aligned16(up);
    long nv = vec ? n / ACT_VEC : 0;
    for (long i = act_tid(); i < nv; i += act_stride()) {
        float d[ACT_VEC], g[ACT_VEC], u[ACT_VEC];
        act_ld8(dout + i * ACT_VEC, d);
        act_ld8(gate + i * ACT_VEC, g);
        act_ld8(up + i * ACT_VEC, u);
#pragma unroll
        for (int k = 0; k < ACT_VEC; k++) {
            float dg, du;
            swiglu_grad(d[k], g[k], u[k], dg, du);
            g[k] = dg;
            u[k] = du;
        }
        act_st8(dgate + i * ACT_VEC, g);
        act_st8(dup + i * ACT_VEC, u);
    }
    for (long i = nv * ACT_VEC + act_tid(); i < n; i += act_stride()) {
        float dg, du;
        swiglu_grad(ld(dout, i), ld(gate, i), ld(up, i), dg, du);
        st(dgate, i, dg);
        st(dup, i, du);
    }
}

// ---- GELU ------------------------------------------------------------------------------------
// kind: 0 = tanh approximation (gelu_pytorch_tanh / gelu_new), 1 = exact erf (nn.GELU),
// 2 = quick (x * sigmoid(1.702 x), CLIP). Must match `Gelu::code` in src/ops/act.rs.

#define GELU_K 0.7978845608028654f    // sqrt(2 / pi)
#define GELU_C 0.044715f
#define INV_SQRT2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f
#define QUICK_A 1.702f

template <int KIND> __device__ __forceinline__ float gelu_f(float x) {
    if (KIND == 0) return 0.5f * x * (1.f + tanhf(GELU_K * (x + GELU_C * x * x * x)));
    if (KIND == 1) return 0.5f * x * (1.f + erff(x * INV_SQRT2));
    return x * sigm(QUICK_A * x);
}

// d gelu / dx.
template <int KIND> __device__ __forceinline__ float gelu_df(float x) {
    if (KIND == 0) {
        float x2 = x * x;
        float t = tanhf(GELU_K * x * (1.f + GELU_C * x2));
        return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * GELU_K * (1.f + 3.f * GELU_C * x2);
    }
    if (KIND == 1) return 0.5f * (1.f + erff(x * INV_SQRT2)) + x * INV_SQRT_2PI * expf(-0.5f * x * x);
    float s = sigm(QUICK_A * x);
    return s + QUICK_A * x * s * (1.f - s);
}

template <typename T, int KIND>
__device__ void gelu_bwd_k(T* __restrict__ dx, const T* __restrict__ dout, const T* __restrict__ x, long n) {
    bool vec = aligned16(dx) && aligned16(dout) && aligned16(x);
    long nv = vec ? n / ACT_VEC : 0;
    for (long i = act_tid(); i < nv; i += act_stride()) {
        float d[ACT_VEC], v[ACT_VEC];
        act_ld8(dout + i * ACT_VEC, d);
        act_ld8(x + i * ACT_VEC, v);
#pragma unroll
        for (int k = 0; k < ACT_VEC; k++) d[k] *= gelu_df<KIND>(v[k]);
        act_st8(dx + i * ACT_VEC, d);
    }
    for (long i = nv * ACT_VEC + act_tid(); i < n; i += act_stride()) st(dx, i, ld(dout, i) * gelu_df<KIND>(ld(x, i)));
}

// An unknown kind writes nothing; the launcher only passes 0, 1 or 2.
template <typename T>
__device__ void gelu_bwd(T* dx, const T* dout, const T* x, long n, int kind) {
    if (kind == 0) gelu_bwd_k<T, 0>(dx, dout, x, n);
    else if (kind == 1) gelu_bwd_k<T, 1>(dx, dout, x, n);
    else if (kind == 2) gelu_bwd_k<T, 2>(dx, dout, x, n);
}

#define ACT_ENTRY(T, S)                                                                                  \
    extern "C" __global__ void swiglu_fwd_##S(T* out, const T* gate, const T* up, long n) {              \
        swiglu_fwd<T>(out, gate, up, n);                                                                 \
    }                                                                                                    \
    extern "C" __global__ void swiglu_bwd_##S(T* dgate, T* dup, const T* dout, const T* gate,            \
                                              const T* up, long n) {                                     \
        swiglu_bwd<T>(dgate, dup, dout, gate, up, n);                                                    \
    }                                                                                                    \
    extern "C" __global__ void gelu_bwd_##S(T* dx, const T* dout, const T* x, long n, int kind) {       \
        gelu_bwd<T>(dx, dout, x, n, kind);                                                               \
    }
AM3_BOTH_DTYPES(ACT_ENTRY)

// ---- GELU forward ------------------------------------------------------------------------------
// Two vectors per thread per trip, loads issued together (32 bytes in flight per thread for
// bf16 instead of 16), so the erf/tanh math of one vector overlaps the other's load; <= 40
// registers (6 blocks of 256 per SM; the launcher sizes the grid to that).
// 1 + erf(z) for the exact GELU, from Abramowitz & Stegun 7.1.26: erfc(|z|) = P(t) e^(-z^2) with
// t = 1 / (1 + p|z|), |error| <= 1.5e-7 (the GELU differs from the erff one by <= 3e-7 absolute,
// checked against the f32 CPU reference at 1e-5). One MUFU rcp + one ex2 and five FMAs, where
// erff's branchy polynomial made the bf16 kernel compute-bound. Also exact-enough for x < 0,
// where 1 + erf(z) = erfc(|z|) is computed directly (no cancellation).
__device__ __forceinline__ float one_plus_erf_fast(float z) {
    float az = fabsf(z);
    float t = __fdividef(1.f, fmaf(0.3275911f, az, 1.f));
    float p = t * fmaf(t, fmaf(t, fmaf(t, fmaf(t, 1.061405429f, -1.453152027f), 1.421413741f), -0.284496736f), 0.254829592f);
    float ec = p * __expf(-az * az);
    return z >= 0.f ? 2.f - ec : ec;
}
// The fast erf only for bf16 output, whose rounding (2^-9) dwarfs its 1.5e-7 error; f32 keeps
// erff (the fast form's relative error reaches ~2e-4 where the GELU is small, for x < -2).
template <typename T, int KIND> __device__ __forceinline__ float gelu_f_fast(float x) {
    if (KIND == 1 && sizeof(T) == 2) return 0.5f * x * one_plus_erf_fast(x * INV_SQRT2);
    return gelu_f<KIND>(x);
}

template <typename T, int KIND>
__device__ void gelu_fwd_k(T* __restrict__ out, const T* __restrict__ x, long n) {
    bool vec = aligned16(out) && aligned16(x);
    long nv = vec ? n / ACT_VEC : 0;
    long stride = act_stride();
    for (long i = act_tid(); i < nv; i += 2 * stride) {
        float v[2][ACT_VEC];
        bool has1 = i + stride < nv;
        act_ld8(x + i * ACT_VEC, v[0]);
        if (has1) act_ld8(x + (i + stride) * ACT_VEC, v[1]);
#pragma unroll
        for (int k = 0; k < ACT_VEC; k++) v[0][k] = gelu_f_fast<T, KIND>(v[0][k]);
        act_st8(out + i * ACT_VEC, v[0]);
        if (has1) {
#pragma unroll
            for (int k = 0; k < ACT_VEC; k++) v[1][k] = gelu_f_fast<T, KIND>(v[1][k]);
            act_st8(out + (i + stride) * ACT_VEC, v[1]);
        }
    }
    for (long i = nv * ACT_VEC + act_tid(); i < n; i += stride) st(out, i, gelu_f_fast<T, KIND>(ld(x, i)));
}

#define GELU_FWD_ENTRY(T, S)                                                                               \
    extern "C" __global__ void __launch_bounds__(256, 6) gelu_fwd_##S(T* out, const T* x, long n, int kind) {                 \
        if (kind == 0) gelu_fwd_k<T, 0>(out, x, n);                                                   \
        else if (kind == 1) gelu_fwd_k<T, 1>(out, x, n);                                              \
        else if (kind == 2) gelu_fwd_k<T, 2>(out, x, n);                                              \
    }
AM3_BOTH_DTYPES(GELU_FWD_ENTRY)

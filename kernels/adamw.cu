// Fused AdamW step with f32 master weights (PyTorch torch.optim.AdamW semantics), and the sum of
// squares used for global-norm gradient clipping. Both are grid-stride loops over 8-element
// vectors when every pointer is 16-byte aligned, then a scalar tail; sizes are 64-bit.
#include "common.cuh"

#define AW_VEC 8

template <typename T> __device__ __forceinline__ void aw_ld8(const T* p, float* o);
template <> __device__ __forceinline__ void aw_ld8<bf16>(const bf16* p, float* o) { ld16(p, o); }
template <> __device__ __forceinline__ void aw_ld8<float>(const float* p, float* o) { ld16(p, o); ld16(p + 4, o + 4); }
template <typename T> __device__ __forceinline__ void aw_st8(T* p, const float* v);
template <> __device__ __forceinline__ void aw_st8<bf16>(bf16* p, const float* v) { st16(p, v); }
template <> __device__ __forceinline__ void aw_st8<float>(float* p, const float* v) { st16(p, v); st16(p + 4, v + 4); }

__device__ __forceinline__ long aw_tid() { return (long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long aw_stride() { return (long)gridDim.x * blockDim.x; }

// Hyper-parameters, with the step-dependent factors precomputed on the host in f64:
// decay = 1 - lr * wd, step_size = lr / (1 - b1^t), sqrt_bc2 = sqrt(1 - b2^t).
struct AwHp {
    float b1, b2, eps, decay, step_size, sqrt_bc2, grad_scale;
};

// One element, in PyTorch's order: decay the master, update the moments, then
// master -= step_size * m / (sqrt(v) / sqrt(bc2) + eps). Returns the new master.
__device__ __forceinline__ float aw_one(float& p, float g, float& m, float& v, const AwHp& h) {
    g *= h.grad_scale;
    p *= h.decay;
    m += (1.f - h.b1) * (g - m);   // torch's lerp_(g, 1 - b1)
    v = h.b2 * v + (1.f - h.b2) * g * g;
    float denom = sqrtf(v) / h.sqrt_bc2 + h.eps;
    p -= h.step_size * (m / denom);
    return p;
}

// param (T: bf16 on the GPU, or f32) receives the new master rounded to T. grad (G) is f32, or
// bf16 when the trainer stores linear-weight gradients in bf16 (GradStore::Bf16Linear).
template <typename T, typename G>
__device__ void adamw_step(T* __restrict__ param, float* __restrict__ master, const G* __restrict__ grad,
                           float* __restrict__ m, float* __restrict__ v, long n, AwHp h) {
    bool vec = aligned16(param) && aligned16(master) && aligned16(grad) && aligned16(m) && aligned16(v);
    long nv = vec ? n / AW_VEC : 0;
    for (long i = aw_tid(); i < nv; i += aw_stride()) {
        long e = i * AW_VEC;
        float p[AW_VEC], g[AW_VEC], mm[AW_VEC], vv[AW_VEC];
        aw_ld8(master + e, p);
        aw_ld8(grad + e, g);
        aw_ld8(m + e, mm);
        aw_ld8(v + e, vv);
#pragma unroll
        for (int k = 0; k < AW_VEC; k++) aw_one(p[k], g[k], mm[k], vv[k], h);
        aw_st8(master + e, p);
        aw_st8(m + e, mm);
        aw_st8(v + e, vv);
        aw_st8(param + e, p);
    }
    for (long i = nv * AW_VEC + aw_tid(); i < n; i += aw_stride()) {
        float p = master[i], mm = m[i], vv = v[i];
        aw_one(p, ld(grad, i), mm, vv, h);
        master[i] = p;
        m[i] = mm;
        v[i] = vv;
        st(param, i, p);
    }
}


#define AW_ENTRY(T, S)                                                                                  \
    extern "C" __global__ void adamw_step_##S(T* param, float* master, const float* grad, float* m,     \
                                              float* v, long n, float b1, float b2, float eps,          \
                                              float decay, float step_size, float sqrt_bc2,             \
                                              float grad_scale) {                                       \
        adamw_step<T, float>(param, master, grad, m, v, n,                                              \
                             AwHp{b1, b2, eps, decay, step_size, sqrt_bc2, grad_scale});                 \
    }                                                                                                   \
    extern "C" __global__ void adamw_step_g16_##S(T* param, float* master, const bf16* grad, float* m,  \
                                                  float* v, long n, float b1, float b2, float eps,      \
                                                  float decay, float step_size, float sqrt_bc2,         \
                                                  float grad_scale) {                                   \
        adamw_step<T, bf16>(param, master, grad, m, v, n,                                               \
                            AwHp{b1, b2, eps, decay, step_size, sqrt_bc2, grad_scale});                  \
    }
AM3_BOTH_DTYPES(AW_ENTRY)

// ---- Sum of squares ----------------------------------------------------------------------------
// part[block] = sum of x^2 over the block's grid-stride share, accumulated in double, so the
// host's in-order sum of the partials is deterministic and exact to ~1e-16. Two vectors per
// thread per trip whose loads are issued together (64 bytes in flight per thread for f32).
template <typename T>
__device__ void sum_squares(double* __restrict__ part, const T* __restrict__ x, long n) {
    __shared__ double scratch[32];
    double acc = 0.0;
    long nv = aligned16(x) ? n / AW_VEC : 0;
    long stride = aw_stride();
    for (long i = aw_tid(); i < nv; i += 2 * stride) {
        float a[AW_VEC], b[AW_VEC];
        bool has1 = i + stride < nv;
        aw_ld8(x + i * AW_VEC, a);
        if (has1) aw_ld8(x + (i + stride) * AW_VEC, b);
#pragma unroll
        for (int k = 0; k < AW_VEC; k++) acc += (double)a[k] * (double)a[k];
        if (has1) {
#pragma unroll
            for (int k = 0; k < AW_VEC; k++) acc += (double)b[k] * (double)b[k];
        }
    }
    for (long i = nv * AW_VEC + aw_tid(); i < n; i += stride) {
        double t = ld(x, i);
        acc += t * t;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = CEIL_DIV(blockDim.x, WARP);
    if (lane == 0) scratch[wid] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < nw; w++) t += scratch[w];
        part[blockIdx.x] = t;
    }
}

#define AW_SUMSQ_ENTRY(T, S)                                                                               \
    extern "C" __global__ void sum_squares_##S(double* part, const T* x, long n) { sum_squares<T>(part, x, n); }
AM3_BOTH_DTYPES(AW_SUMSQ_ENTRY)

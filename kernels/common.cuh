// Shared device helpers for every kernel module: a header-free bf16 type (so NVRTC needs no
// CUDA include path), conversions, warp/block reductions and 16-byte vector loads.
#ifndef AM3_COMMON_CUH
#define AM3_COMMON_CUH

typedef unsigned short bf16;                 // raw bfloat16 bits
typedef unsigned int u32;
typedef unsigned long long u64;

#define WARP 32
#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))
#define NEG_INF __int_as_float(0xff800000)   // -inf without math.h (NVRTC has no host headers)

__device__ __forceinline__ float bf2f(bf16 x) { return __uint_as_float(((u32)x) << 16); }
// Round to nearest even, as PyTorch and cvt.rn do; NaN stays NaN.
__device__ __forceinline__ bf16 f2bf(float f) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
// Packs two floats into a bf16x2 word (lo in the low half).
__device__ __forceinline__ u32 pack_bf2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float bf_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// Element load/store generic over the storage type (float or bf16).
template <typename T> __device__ __forceinline__ float ld(const T* p, long i);
template <> __device__ __forceinline__ float ld<float>(const float* p, long i) { return p[i]; }
template <> __device__ __forceinline__ float ld<bf16>(const bf16* p, long i) { return bf2f(p[i]); }
template <typename T> __device__ __forceinline__ void st(T* p, long i, float v);
template <> __device__ __forceinline__ void st<float>(float* p, long i, float v) { p[i] = v; }
template <> __device__ __forceinline__ void st<bf16>(bf16* p, long i, float v) { p[i] = f2bf(v); }

// 16-byte vectors: 8 bf16 or 4 floats per thread per load.
struct __align__(16) Vec16 { u32 w[4]; };
template <typename T> struct V16 { static constexpr int N = 16 / sizeof(T); };

template <typename T> __device__ __forceinline__ void ld16(const T* p, float* out);
template <> __device__ __forceinline__ void ld16<bf16>(const bf16* p, float* o) {
    Vec16 v = *reinterpret_cast<const Vec16*>(p);
#pragma unroll
    for (int i = 0; i < 4; i++) { o[2 * i] = bf_lo(v.w[i]); o[2 * i + 1] = bf_hi(v.w[i]); }
}
template <> __device__ __forceinline__ void ld16<float>(const float* p, float* o) {
    float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
}
template <typename T> __device__ __forceinline__ void st16(T* p, const float* in);
template <> __device__ __forceinline__ void st16<bf16>(bf16* p, const float* in) {
    Vec16 v;
#pragma unroll
    for (int i = 0; i < 4; i++) v.w[i] = pack_bf2(in[2 * i], in[2 * i + 1]);
    *reinterpret_cast<Vec16*>(p) = v;
}
template <> __device__ __forceinline__ void st16<float>(float* p, const float* in) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
}
__device__ __forceinline__ bool aligned16(const void* p) { return (((u64)p) & 15) == 0; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = CEIL_DIV(blockDim.x, WARP);
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = CEIL_DIV(blockDim.x, WARP);
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : NEG_INF;
    return warp_max(v);
}

// Stamps out the bf16 and f32 entry points of a templated kernel body.
#define AM3_BOTH_DTYPES(MACRO) MACRO(bf16, bf16) MACRO(float, f32)

#endif

// Counter-based random init: element i of a tensor depends only on (seed, i), so the GPU and
// the CPU reference produce the same values and a 7B model initialises in milliseconds.
#include "common.cuh"

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// N(mean, std) by Box-Muller on two 24-bit uniforms taken from one 64-bit hash.
template <typename T>
__device__ void init_normal(T* out, long n, u64 seed, float mean, float std) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        u64 h = mix64(seed + 0x9E3779B97F4A7C15ull * (u64)(i + 1));
        float u1 = ((float)(h >> 40) + 1.0f) * (1.0f / 16777217.0f);   // (0, 1]
        float u2 = (float)((h >> 16) & 0xFFFFFF) * (1.0f / 16777216.0f); // [0, 1)
        float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
        st(out, i, mean + std * z);
    }
}

#define INIT_ENTRY(T, S)                                                                           \
    extern "C" __global__ void init_normal_##S(T* out, long n, u64 seed, float mean, float std) {  \
        init_normal<T>(out, n, seed, mean, std);                                                     \
    }
AM3_BOTH_DTYPES(INIT_ENTRY)

// Embedding lookup: out[t] = table[ids[t]] (rows of C), and its backward, a scatter-add of
// dout rows into the f32 table gradient (float atomics: repeated ids may add in any order).
// The launcher validates ids on the host; as a last line of defence an out-of-range id never
// touches memory outside the table: its output row becomes NaN and its gradient row is dropped.
// Grid-stride over rows (tokens), threads across the row's columns.
#include "common.cuh"

template <typename T>
__device__ void embedding_fwd(T* __restrict__ out, const T* __restrict__ table, const int* __restrict__ ids,
                              int tokens, int cols, int vocab) {
    constexpr int N = V16<T>::N;
    bool vec = (cols % N == 0) && aligned16(out) && aligned16(table);
    for (int t = blockIdx.x; t < tokens; t += gridDim.x) {
        int id = ids[t];
        bool ok = id >= 0 && id < vocab;
        T* o = out + (long)t * cols;
        const T* src = table + (long)(ok ? id : 0) * cols;
        if (vec) {
            for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
                if (ok) {
                    *reinterpret_cast<Vec16*>(o + c) = *reinterpret_cast<const Vec16*>(src + c);
                } else {
                    float v[N];
#pragma unroll
                    for (int i = 0; i < N; i++) v[i] = __int_as_float(0x7fc00000);   // NaN
                    st16(o + c, v);
                }
            }
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) st(o, c, ok ? ld(src, c) : __int_as_float(0x7fc00000));
        }
    }
}

template <typename T>
__device__ void embedding_bwd(float* __restrict__ dtable, const T* __restrict__ dout, const int* __restrict__ ids,
                              int tokens, int cols, int vocab) {
    constexpr int N = V16<T>::N;
    bool vec = (cols % N == 0) && aligned16(dout);
    for (int t = blockIdx.x; t < tokens; t += gridDim.x) {
        int id = ids[t];
        if (id < 0 || id >= vocab) continue;   // uniform across the block
        const T* g = dout + (long)t * cols;
        float* d = dtable + (long)id * cols;
        if (vec) {
            for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
                float v[N]; ld16(g + c, v);
#pragma unroll
                for (int i = 0; i < N; i++) atomicAdd(d + c + i, v[i]);
            }
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) atomicAdd(d + c, ld(g, c));
        }
    }
}

#define EMBEDDING_ENTRY(T, S)                                                                           \
    extern "C" __global__ void embedding_fwd_##S(T* out, const T* table, const int* ids, int tokens,    \
                                                  int cols, int vocab) {                                \
        embedding_fwd<T>(out, table, ids, tokens, cols, vocab);                                         \
    }                                                                                                   \
    extern "C" __global__ void embedding_bwd_##S(float* dtable, const T* dout, const int* ids,          \
                                                  int tokens, int cols, int vocab) {                    \
        embedding_bwd<T>(dtable, dout, ids, tokens, cols, vocab);                                       \
    }
AM3_BOTH_DTYPES(EMBEDDING_ENTRY)

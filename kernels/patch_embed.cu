// Qwen2.5-VL vision patch embedding, gather half: the Conv3d with stride = kernel is a GEMM over
// flattened patches, and this kernel builds its left operand. It gathers the processor's pixel
// rows (f32) into window order and casts them to the GEMM dtype in one pass:
//   out[i, :] = x[perm[i], :]        (perm == nullptr: identity)
// The GEMM itself (out · Wᵀ, and dW += dyᵀ · out in backward) runs in cuBLAS.
// One block per output row; float4 loads when k and the row start allow, scalar otherwise.
#include "common.cuh"

template <typename T>
__device__ void patch_gather(T* __restrict__ out, const float* __restrict__ x, const int* __restrict__ perm,
                             int n, int n_src, int k) {
    int row = blockIdx.x;
    if (row >= n) return;
    int src = perm ? perm[row] : row;
    T* o = out + (long)row * k;
    // The launcher validates perm on the host; an index out of range still must not read out of bounds.
    if (src < 0 || src >= n_src) {
        for (int c = threadIdx.x; c < k; c += blockDim.x) st(o, c, 0.f);
        return;
    }
    const float* xr = x + (long)src * k;
    if ((k % 4 == 0) && aligned16(xr)) {
        for (int c = threadIdx.x * 4; c < k; c += blockDim.x * 4) {
            float4 v = *reinterpret_cast<const float4*>(xr + c);
            st(o, c, v.x); st(o, c + 1, v.y); st(o, c + 2, v.z); st(o, c + 3, v.w);
        }
    } else {
        for (int c = threadIdx.x; c < k; c += blockDim.x) st(o, c, xr[c]);
    }
}

#define PATCH_ENTRY(T, S)                                                                              \
    extern "C" __global__ void patch_embed_gather_##S(T* out, const float* x, const int* perm, int n,   \
                                                      int n_src, int k) {                              \
        patch_gather<T>(out, x, perm, n, n_src, k);                                                    \
    }
AM3_BOTH_DTYPES(PATCH_ENTRY)

// Row moves between the vision tower and the text sequence (window order ↔ image order ↔ the
// <|image_pad|> positions), one block per moved row, 16-byte vectors when the rows allow.
// gather: out[i, :] = x[idx[i], :]; with zero_src the source row is then zeroed (backward of a
// scatter that overwrote those rows; idx entries are distinct, so no two blocks share a row).
template <typename T>
__device__ void rows_gather(T* __restrict__ out, T* __restrict__ x, const int* __restrict__ idx, int n, int n_src,
                            int cols, int zero_src) {
    int row = blockIdx.x;
    if (row >= n) return;
    int src = idx[row];
    T* o = out + (long)row * cols;
    if (src < 0 || src >= n_src) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) st(o, c, 0.f);
        return;
    }
    T* xr = x + (long)src * cols;
    constexpr int N = V16<T>::N;
    if ((cols % N == 0) && aligned16(xr) && aligned16(o)) {
        const float zero[N] = {};
        for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
            float v[N]; ld16(xr + c, v); st16(o + c, v);
            if (zero_src) st16(xr + c, zero);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            o[c] = xr[c];
            if (zero_src) st(xr, c, 0.f);
        }
    }
}

// scatter: out[idx[i], :] = x[i, :] (idx entries distinct; rows of out not named keep their values).
template <typename T>
__device__ void rows_scatter(T* __restrict__ out, const T* __restrict__ x, const int* __restrict__ idx, int n,
                             int n_out, int cols) {
    int row = blockIdx.x;
    if (row >= n) return;
    int dst = idx[row];
    if (dst < 0 || dst >= n_out) return;
    const T* xr = x + (long)row * cols;
    T* o = out + (long)dst * cols;
    constexpr int N = V16<T>::N;
    if ((cols % N == 0) && aligned16(xr) && aligned16(o)) {
        for (int c = threadIdx.x * N; c < cols; c += blockDim.x * N) { float v[N]; ld16(xr + c, v); st16(o + c, v); }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = xr[c];
    }
}

#define ROWS_ENTRY(T, S)                                                                               \
    extern "C" __global__ void rows_gather_##S(T* out, T* x, const int* idx, int n, int n_src, int cols, \
                                               int zero_src) {                                         \
        rows_gather<T>(out, x, idx, n, n_src, cols, zero_src);                                         \
    }                                                                                                  \
    extern "C" __global__ void rows_scatter_##S(T* out, const T* x, const int* idx, int n, int n_out,    \
                                                int cols) {                                            \
        rows_scatter<T>(out, x, idx, n, n_out, cols);                                                  \
    }
AM3_BOTH_DTYPES(ROWS_ENTRY)

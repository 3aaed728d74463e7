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

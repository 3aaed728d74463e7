// Rotary position embedding, in place, NeoX / rotate_half pairing: in each head of x [tokens,
// heads, D], element i rotates with element i + D/2 (i < D/2) by the angle whose cos and sin are
// cos[token][i], sin[token][i] (tables [tokens, D/2], f32). Forward rotates by +angle, backward
// (the transpose, i.e. the inverse rotation) by -angle. Math in f32, one rounding per element.
#include "common.cuh"

// (a, b) -> (a·c − s'·b, b·c + s'·a) with s' = sign·s. Grid-stride over elements (pairs, or
// groups of N pairs on the 16-byte path); I is the index type: 32-bit division is much cheaper,
// so the entry points use unsigned whenever the element count fits.
template <typename T, typename I>
__device__ void rope_body(T* __restrict__ x, const float* __restrict__ cosv, const float* __restrict__ sinv,
                          I tokens, I heads, I head_dim, float sign, bool vec) {
    I half = head_dim / 2;
    constexpr int N = V16<T>::N;
    I stride = (I)gridDim.x * blockDim.x;
    I tid = (I)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec) {
        I groups = half / N;                                     // vector groups per head
        I total = tokens * heads * groups;
        for (I e = tid; e < total; e += stride) {
            I th = e / groups;                                   // token * heads + head
            I j = (e - th * groups) * N;                         // first pair index of the group
            I tok = th / heads;
            T* p = x + th * head_dim + j;
            const float* cp = cosv + tok * half + j;
            const float* sp = sinv + tok * half + j;
            float a[N], b[N], c[N], s[N];
            ld16(p, a); ld16(p + half, b);
#pragma unroll
            for (int k = 0; k < N; k += 4) { ld16<float>(cp + k, c + k); ld16<float>(sp + k, s + k); }
#pragma unroll
            for (int k = 0; k < N; k++) {
                float sk = sign * s[k];
                float a2 = a[k] * c[k] - b[k] * sk;
                float b2 = b[k] * c[k] + a[k] * sk;
                a[k] = a2; b[k] = b2;
            }
            st16(p, a); st16(p + half, b);
        }
    } else {
        I total = tokens * heads * half;
        for (I e = tid; e < total; e += stride) {
            I th = e / half;
            I i = e - th * half;
            I tok = th / heads;
            T* p = x + th * head_dim;
            float c = cosv[tok * half + i], s = sign * sinv[tok * half + i];
            float a = ld(p, (long)i), b = ld(p, (long)(i + half));
            st(p, (long)i, a * c - b * s);
            st(p, (long)(i + half), b * c + a * s);
        }
    }
}

template <typename T>
__device__ void rope_apply(T* x, const float* cosv, const float* sinv, int tokens, int heads, int head_dim, float sign) {
    constexpr int N = V16<T>::N;
    int half = head_dim / 2;
    // 16-byte path: N pairs per thread; needs half % N == 0 (then every head and table row starts
    // 16-byte aligned, as N floats of cos/sin are 16 or 32 bytes) and aligned base pointers.
    bool vec = (half % N == 0) && aligned16(x) && aligned16(cosv) && aligned16(sinv);
    // Largest index formed: the element offset into x (and the grid-stride overshoot past it).
    unsigned long long span = (unsigned long long)tokens * heads * head_dim + (unsigned long long)gridDim.x * blockDim.x;
    if (span < (1ull << 32))
        rope_body<T, unsigned>(x, cosv, sinv, (unsigned)tokens, (unsigned)heads, (unsigned)head_dim, sign, vec);
    else
        rope_body<T, unsigned long long>(x, cosv, sinv, tokens, heads, head_dim, sign, vec);
}

#define ROPE_ENTRY(T, S)                                                                                \
    extern "C" __global__ void rope_fwd_##S(T* x, const float* cosv, const float* sinv, int tokens,     \
                                             int heads, int head_dim) {                                 \
        rope_apply<T>(x, cosv, sinv, tokens, heads, head_dim, 1.f);                                     \
    }                                                                                                   \
    extern "C" __global__ void rope_bwd_##S(T* dx, const float* cosv, const float* sinv, int tokens,    \
                                             int heads, int head_dim) {                                 \
        rope_apply<T>(dx, cosv, sinv, tokens, heads, head_dim, -1.f);                                   \
    }
AM3_BOTH_DTYPES(ROPE_ENTRY)

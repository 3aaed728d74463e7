// Tensor-core building blocks shared by the attention kernels (attention_fwd.cu, attention_bwd.cu,
// attention_decode.cu):
// cp.async tile loads into padded shared memory, ldmatrix fragment addressing and the bf16
// mma.sync.m16n8k16 (f32 accumulate). Everything here is warp- or block-level and header-free.
//
// Fragment layouts of m16n8k16 (g = lane / 4, c = lane % 4):
//   A 16x16 (row-major): a0 (g, 2c..2c+1), a1 (g+8, 2c..), a2 (g, 2c+8..), a3 (g+8, 2c+8..)
//   B 16x8  (k x n):     b0 (k = 2c..2c+1, n = g), b1 (k = 2c+8.., n = g)
//   C 16x8 f32:          c0,c1 (g, 2c..2c+1), c2,c3 (g+8, 2c..2c+1)
// So the C fragments of two adjacent n-blocks, packed to bf16, are the A fragment of one k-step.
#ifndef AM3_ATTENTION_MMA_CUH
#define AM3_ATTENTION_MMA_CUH
#include "common.cuh"

#define ATT_LOG2E 1.4426950408889634f
#define ATT_LN2 0.6931471805599453f

// Tiles are 64 rows; shared-memory rows are padded by 8 elements (16 bytes) so that the 8 rows an
// ldmatrix reads fall in distinct banks for row lengths 64, 80 and 128.
#define ATT_TILE 64
#define ATT_THREADS 128

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// 16-byte async copy global -> shared; bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight (groups complete in order).
template <int N>
__device__ __forceinline__ void cp_wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldsm4(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm4t(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c[16x8] += a[16x16] * b[16x8], bf16 inputs, f32 accumulate.
__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ldmatrix addresses (this lane's row pointer) for the four 8x8 pieces of a 16x16 block of a
// shared tile `s` with row stride `ld` elements:
// A fragment at rows r0.., cols c0.. of a tile stored [M][K] (ldsm4).
__device__ __forceinline__ u32 a_addr(const bf16* s, int ld, int r0, int c0, int lane) {
    return smem_u32(s + (r0 + (lane & 15)) * ld + c0 + (lane >> 4) * 8);
}
// A fragment (m0.., k0..) of a tile stored transposed, [K][M] (ldsm4t).
__device__ __forceinline__ u32 at_addr(const bf16* s, int ld, int k0, int m0, int lane) {
    return smem_u32(s + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8);
}
// B fragments of n-blocks n0 and n0+8 at k-step k0 of a tile stored [N][K] (ldsm4):
// r = {b0(n0), b1(n0), b0(n0+8), b1(n0+8)}.
__device__ __forceinline__ u32 b_addr(const bf16* s, int ld, int n0, int k0, int lane) {
    return smem_u32(s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
}
// The same from a tile stored [K][N] (ldsm4t).
__device__ __forceinline__ u32 bt_addr(const bf16* s, int ld, int k0, int n0, int lane) {
    return smem_u32(s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
}

// Async load of ROWS rows of D bf16 (global row stride gstride elements) into a [ROWS][D+8]
// shared tile; rows >= nvalid are zero-filled (so masked keys never bring NaN into P·V).
// g must be a valid address even when nvalid = 0. The caller commits.
template <int D, int ROWS>
__device__ __forceinline__ void load_rows(bf16* sm, const bf16* g, long gstride, int nvalid) {
    constexpr int CH = D / 8;
    for (int c = threadIdx.x; c < ROWS * CH; c += ATT_THREADS) {
        int r = c / CH, e = (c - r * CH) * 8;
        bool ok = r < nvalid;
        const bf16* src = ok ? g + r * gstride + e : g;
        cp_async16(smem_u32(sm + r * (D + 8) + e), src, ok ? 16 : 0);
    }
}

// Four fragments of a 16x16 A block from eight f32 C values of two adjacent n-blocks.
__device__ __forceinline__ void c_to_a(u32* a, const float* c0, const float* c1) {
    a[0] = pack_bf2(c0[0], c0[1]);
    a[1] = pack_bf2(c0[2], c0[3]);
    a[2] = pack_bf2(c1[0], c1[1]);
    a[3] = pack_bf2(c1[2], c1[3]);
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// One online-softmax step for a warp's 16 rows over an NB*8-column score tile s (C fragments):
// rows g (hh = 0) and g+8 (hh = 1). Scores are scaled by sl2 = scale*log2(e) and exponentiated
// with exp2; m (log2 units) and the thread-partial row sums l are updated, o [ND][4] rescaled,
// and s overwritten with the probabilities. Masked scores are -inf; a row with no key yet keeps
// m = -inf and gets p = 0 (the "use 0 as max" guard avoids inf - inf).
template <int NB, int ND>
__device__ __forceinline__ void softmax_step(float (*s)[4], float (*o)[4], float* m, float* l, float sl2) {
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        float mx = NEG_INF;
#pragma unroll
        for (int nb = 0; nb < NB; nb++) mx = fmaxf(mx, fmaxf(s[nb][2 * hh], s[nb][2 * hh + 1]));
        mx = quad_max(mx);
        float mnew = fmaxf(m[hh], mx * sl2);
        float muse = mnew == NEG_INF ? 0.f : mnew;
        float alpha = exp2f(m[hh] - muse);
        m[hh] = mnew;
        float rs = 0.f;
#pragma unroll
        for (int nb = 0; nb < NB; nb++) {
            float p0 = exp2f(s[nb][2 * hh] * sl2 - muse);
            float p1 = exp2f(s[nb][2 * hh + 1] * sl2 - muse);
            s[nb][2 * hh] = p0;
            s[nb][2 * hh + 1] = p1;
            rs += p0 + p1;
        }
        l[hh] = l[hh] * alpha + rs;
#pragma unroll
        for (int dn = 0; dn < ND; dn++) {
            o[dn][2 * hh] *= alpha;
            o[dn][2 * hh + 1] *= alpha;
        }
    }
}

// s[NB][4] = Q (warp's 16 rows, fragments qf[KS]) · Kᵀ for the NB*8 keys of the shared tile sK [keys][D+8].
template <int D, int NB>
__device__ __forceinline__ void qk_tile(float (*s)[4], const u32 (*qf)[4], const bf16* sK, int lane) {
#pragma unroll
    for (int nb = 0; nb < NB; nb++) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            u32 b[4];
            ldsm4(b_addr(sK, D + 8, nb * 8, kk * 16, lane), b);
            mma_bf16(s[nb], qf[kk], b[0], b[1]);
            mma_bf16(s[nb + 1], qf[kk], b[2], b[3]);
        }
    }
}

// o[D/8][4] += P (probabilities in s[NB][4], warp's 16 rows) · V (shared tile sV [keys][D+8]).
template <int D, int NB>
__device__ __forceinline__ void pv_tile(float (*o)[4], float (*s)[4], const bf16* sV, int lane) {
#pragma unroll
    for (int kk = 0; kk < NB / 2; kk++) {
        u32 a[4];
        c_to_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
        for (int dn = 0; dn < D / 8; dn += 2) {
            u32 b[4];
            ldsm4t(bt_addr(sV, D + 8, kk * 16, dn * 8, lane), b);
            mma_bf16(o[dn], a, b[0], b[1]);
            mma_bf16(o[dn + 1], a, b[2], b[3]);
        }
    }
}

// Vector atomic add of two adjacent floats (8-byte aligned): the backwards' dQ accumulation.
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

#endif

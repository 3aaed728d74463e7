// Fused attention forward on tensor cores (bf16 in/out, f32 accumulate), FlashAttention-2 style,
// over variable-length packed sequences (cu = cumulative offsets), causal or not, any GQA ratio,
// head dims 64, 80, 128. Layouts: q/out [T, hq, D], k/v [T, hkv, D], lse [hq, T] (natural log,
// saved for the backward). Which kernel a call takes: `plan_fwd` in src/ops/attention/mod.rs.
//
// attention_fwd_q64_bf16_d{64,80,128}: one block = 64 query rows of one (sequence, head), 4 warps
//   of 16 rows; K/V tiles of 64 keys stream through shared memory (V[j] loads while S = QKᵀ runs,
//   K[j+1] while O += PV runs; V[0] with Q and K[0]), online softmax in registers. Taken when every
//   sequence has at most 64 tokens (the vision windows).
//
// attention_fwd_q128_bf16_d{64,80,128}: sequences longer than 64 tokens, described below.
#include "attention_mma.cuh"

template <int D>
__device__ __forceinline__ void fwd_body(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                                         const bf16* __restrict__ k, const bf16* __restrict__ v,
                                         const int* __restrict__ cu, int T_, int hq, int hkv, float sl2, int causal) {
    constexpr int BM = ATT_TILE, BN = ATT_TILE, LD = D + 8, KS = D / 16, ND = D / 8, NB = BN / 8;
    extern __shared__ __align__(16) unsigned char att_smem[];
    bf16* sQ = reinterpret_cast<bf16*>(att_smem);  // [BM][LD]
    bf16* sK = sQ + BM * LD;                        // [BN][LD]
    bf16* sV = sK + BN * LD;                        // [BN][LD]

    const int sq = blockIdx.z, h = blockIdx.y;
    const int start = cu[sq], len = cu[sq + 1] - start;
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // last (longest, when causal) tiles start first
    if (m0 >= len) return;
    const int hk = h / (hq / hkv);
    const long qs = (long)hq * D, ks = (long)hkv * D;  // token strides
    const bf16* kg = k + (long)start * ks + hk * D;
    const bf16* vg = v + (long)start * ks + hk * D;
    const int n_end = causal ? min(len, m0 + BM) : len;  // keys any row of the tile sees
    const int ntiles = CEIL_DIV(n_end, BN);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, tig = lane & 3;

    load_rows<D, BM>(sQ, q + (long)(start + m0) * qs + h * D, qs, min(BM, len - m0));
    load_rows<D, BN>(sK, kg, ks, min(BN, len));
    cp_commit();
    load_rows<D, BN>(sV, vg, ks, min(BN, len));  // V[0] too, so short sequences overlap all three loads
    cp_commit();

    u32 qf[KS][4];
    float o[ND][4];
#pragma unroll
    for (int dn = 0; dn < ND; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.f, 0.f};
    const int r_lo = m0 + warp * 16 + g;  // this thread's rows (positions in the sequence): r_lo, r_lo + 8

    for (int j = 0; j < ntiles; j++) {
        const int n0 = j * BN;
        if (j == 0) cp_wait_group<1>();  // Q and K[0] landed; V[0] may still be in flight
        else cp_wait_all();
        __syncthreads();  // K[j] (and Q) visible; every warp is done with V[j-1]
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < KS; kk++) ldsm4(a_addr(sQ, LD, warp * 16, kk * 16, lane), qf[kk]);
        } else {
            load_rows<D, BN>(sV, vg + n0 * ks, ks, min(BN, len - n0));
            cp_commit();
        }

        float s[NB][4];
        qk_tile<D, NB>(s, qf, sK, lane);
        if (n0 + BN > len || (causal && n0 + BN - 1 > m0 + warp * 16)) {
#pragma unroll
            for (int nb = 0; nb < NB; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int col = n0 + nb * 8 + 2 * tig + (e & 1);
                    int row = r_lo + (e >> 1) * 8;
                    if (col >= len || (causal && col > row)) s[nb][e] = NEG_INF;
                }
        }
        softmax_step<NB, ND>(s, o, mrow, lrow, sl2);

        cp_wait_all();
        __syncthreads();  // V[j] visible; every warp is done with K[j]
        if (j + 1 < ntiles) {
            load_rows<D, BN>(sK, kg + (n0 + BN) * ks, ks, min(BN, len - n0 - BN));
            cp_commit();
        }
        pv_tile<D, NB>(o, s, sV, lane);
    }

#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        float l = quad_sum(lrow[hh]);
        int r = r_lo + hh * 8;
        if (r < len) {
            float inv = 1.f / l;
            bf16* orow = out + (long)(start + r) * qs + h * D + 2 * tig;
#pragma unroll
            for (int dn = 0; dn < ND; dn++)
                *reinterpret_cast<u32*>(orow + dn * 8) = pack_bf2(o[dn][2 * hh] * inv, o[dn][2 * hh + 1] * inv);
            if (tig == 0) lse[(long)h * T_ + start + r] = mrow[hh] * ATT_LN2 + logf(l);
        }
    }
}

#define ATT_FWD_Q64_ENTRY(D)                                                                                         \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_fwd_q64_bf16_d##D(                           \
        bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* cu, int T_, int hq, int hkv,  \
        float sl2, int causal) {                                                                                     \
        fwd_body<D>(out, lse, q, k, v, cu, T_, hq, hkv, sl2, causal);                                                \
    }
ATT_FWD_Q64_ENTRY(64)
ATT_FWD_Q64_ENTRY(80)
ATT_FWD_Q64_ENTRY(128)

// attention_fwd_q128_bf16_d{64,80,128} (src/ops/attention/fwd.rs): the training forward in
//   FlashAttention-2's layout. One block =
//   128 query rows of one (sequence, q head) = 4 warps × 32 rows, so every K/V fragment a warp
//   reads from shared memory (ldmatrix) feeds two m16 row fragments: 4 mma per K ldmatrix.x4 and
//   per V ldmatrix.x4.trans instead of 2 in the q64 kernel. K/V tiles of 64 keys go through a two-stage
//   cp.async ring (tile j+1, K and V together, loads while tile j is used; one barrier per tile).
//   At d128 and d64 Q is re-read from shared memory at every k-step (d128 registers: O 128 + S 64
//   floats per thread; d64: 3 blocks per SM); at d80 it stays in registers. Online softmax with
//   the SFU's exp2 (scale·log2e folded in); lse saved as the q64 kernel saves it ([hq, T], natural
//   log), so either backward takes it.
//   Causal: a warp skips the tiles entirely above its 32 rows and masks only those that cross
//   them (or the sequence end). Grid (hq, nseq, query tiles) with the tile index reversed in z:
//   the blocks of the last (longest, when causal) query tiles of every (sequence, head) are
//   dispatched first and the shortest last, which shortens the tail of the grid.
//   Same arguments, layouts and results as attention_fwd_q64_bf16_d*.
//
// Register budget (d128, 255 per thread for 2 blocks/SM): 192 accumulators leave ~60 for the rest,
// so shared-memory addresses are 32-bit byte offsets from one base (ldmatrix then takes the
// constant part as an immediate; the generic pointers of a_addr/b_addr cost 64-bit registers
// and a cvta per fragment), the tile-load, ldmatrix-lane and mask indices are recomputed per
// tile, and the softmax row sums l (touched once per tile) live in shared memory: with them in
// registers ptxas spilled them anyway (16-36 bytes).

#define Q128_BM 128    // query rows per block
#define Q128_BN 64     // keys per K/V tile
#define Q128_WROWS 32  // query rows per warp (two m16 fragments)
// Threads per block: 4 warps (ATT_THREADS).

// 2^x by the SFU without the denormal range handling of exp2f (x ≤ 0 here; results below
// 2^-126 flush to 0, -inf gives 0).
__device__ __forceinline__ float q128_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Hides an integer's value from the optimizer: values derived from it (tile-load addresses, mask
// limits) are recomputed where they are used instead of being hoisted out of the key loop into
// registers that the mma accumulators need.
__device__ __forceinline__ int q128_opaque_i(int x) {
    asm volatile("" : "+r"(x));
    return x;
}

// Async load of ROWS rows of D bf16 (global row stride gstride elements) into [ROWS][D+8] shared
// tiles (s0, s1: shared byte addresses) by the block's 128 threads, a fixed number of 16-byte
// chunks per thread: from g0 into s0 and, when TWO, from g1 into s1 (K and V of the same keys
// share every offset). Rows >= nvalid are zero-filled (masked keys must not bring NaN into P·V);
// g0/g1 must be valid addresses even then. The caller commits.
template <int D, int ROWS, bool TWO>
__device__ __forceinline__ void q128_load_rows(u32 s0, const bf16* g0, u32 s1, const bf16* g1, int gstride, int nvalid) {
    constexpr int CH = D / 8, ITER = ROWS * CH / ATT_THREADS, LDB = (D + 8) * 2;
    static_assert(ROWS * CH % ATT_THREADS == 0, "whole chunks per thread");
    const int tid = q128_opaque_i(threadIdx.x);
    if constexpr (ATT_THREADS % CH == 0) {
        // Every pass covers RSTEP whole rows: the thread keeps its column and steps down rows.
        constexpr int RSTEP = ATT_THREADS / CH;
        const int r0 = tid / CH, e0 = (tid - r0 * CH) * 8, off = r0 * gstride + e0;
        const u32 soff = r0 * LDB + e0 * 2;
#pragma unroll
        for (int i = 0; i < ITER; i++) {
            const bool ok = r0 + i * RSTEP < nvalid;
            const int o = ok ? off + i * RSTEP * gstride : 0;
            cp_async16(s0 + soff + i * RSTEP * LDB, g0 + o, ok ? 16 : 0);
            if constexpr (TWO) cp_async16(s1 + soff + i * RSTEP * LDB, g1 + o, ok ? 16 : 0);
        }
    } else {
#pragma unroll
        for (int i = 0; i < ITER; i++) {
            const int c = tid + i * ATT_THREADS;
            const int r = c / CH, e = (c - r * CH) * 8;
            const bool ok = r < nvalid;
            const int o = ok ? r * gstride + e : 0;
            const u32 soff = r * LDB + e * 2;
            cp_async16(s0 + soff, g0 + o, ok ? 16 : 0);
            if constexpr (TWO) cp_async16(s1 + soff, g1 + o, ok ? 16 : 0);
        }
    }
}

// One online-softmax step for a warp's 32 rows (two m16 fragments mi) over a 64-key score tile s
// (C fragments; thread rows g, g+8 of each fragment), as softmax_step in attention_mma.cuh but
// with the SFU exp2, and the probabilities written straight into bf16 A fragments pa[mi][kk]
// (keys 16kk..16kk+15, the layout c_to_a builds) so the f32 scores die early. m (log2 units) and
// the thread-partial sums l (of the unrounded p) are updated and o rescaled. A row with no key
// yet keeps m = -inf and gets p = 0 (the "use 0 as max" guard avoids inf - inf).
template <int NB, int ND>
__device__ __forceinline__ void q128_softmax(u32 (*pa)[NB / 2][4], float (*s)[NB][4], float (*o)[ND][4], float (*m)[2], float* l, float sl2) {
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            float mx = NEG_INF;
#pragma unroll
            for (int nb = 0; nb < NB; nb++) mx = fmaxf(mx, fmaxf(s[mi][nb][2 * hh], s[mi][nb][2 * hh + 1]));
            mx = quad_max(mx);
            const float mnew = fmaxf(m[mi][hh], mx * sl2);
            const float muse = mnew == NEG_INF ? 0.f : mnew;
            const float alpha = q128_exp2(m[mi][hh] - muse);
            m[mi][hh] = mnew;
            float rs = 0.f;
#pragma unroll
            for (int nb = 0; nb < NB; nb++) {
                const float p0 = q128_exp2(s[mi][nb][2 * hh] * sl2 - muse);
                const float p1 = q128_exp2(s[mi][nb][2 * hh + 1] * sl2 - muse);
                pa[mi][nb / 2][(nb & 1) * 2 + hh] = pack_bf2(p0, p1);
                rs += p0 + p1;
            }
            l[(2 * mi + hh) * ATT_THREADS] = l[(2 * mi + hh) * ATT_THREADS] * alpha + rs;
#pragma unroll
            for (int dn = 0; dn < ND; dn++) {
                o[mi][dn][2 * hh] *= alpha;
                o[mi][dn][2 * hh + 1] *= alpha;
            }
        }
}

template <int D, bool QREG>
__device__ __forceinline__ void fwd_q128_body(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                                            const bf16* __restrict__ k, const bf16* __restrict__ v,
                                            const int* __restrict__ cu, int T_, int hq, int hkv, float sl2, int causal) {
    constexpr int BM = Q128_BM, BN = Q128_BN, LD = D + 8, LDB = LD * 2, KS = D / 16, ND = D / 8, NB = BN / 8;
    constexpr u32 KV0 = BM * LDB, STAGE = 2 * BN * LDB;  // byte offsets: stage 0 K, one stage (K then V)
    constexpr u32 LSUM = KV0 + 2 * STAGE;                 // byte offset of the row sums [4][128] f32
    extern __shared__ __align__(16) unsigned char att_smem[];
    // [BM][LD] Q, then two stages of K [BN][LD] and V [BN][LD]; byte addresses in the shared window.
    const u32 sbase = smem_u32(att_smem);

    const int h = blockIdx.x, sq = blockIdx.y;
    const int start = cu[sq], len = cu[sq + 1] - start;
    const int m0 = (gridDim.z - 1 - blockIdx.z) * BM;  // the last (longest) query tiles go first
    if (m0 >= len) return;
    // Element offsets fit in 32 bits (the launcher checks T·hq·D < 2^31).
    const int qs = hq * D, ks = hkv * D;                // token strides
    const int kvoff = start * ks + (h / (hq / hkv)) * D;  // K/V rows of this sequence and kv head
    const int n_end = causal ? min(len, m0 + BM) : len;   // keys any row of the tile sees
    const int ntiles = CEIL_DIV(n_end, BN);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    // The warp's first row (position in the sequence); recomputed where needed after the loop
    // setup so it does not occupy a register through the key loop.
    auto warp_row0 = [&]() { return (int)(gridDim.z - 1 - blockIdx.z) * BM + q128_opaque_i(warp) * Q128_WROWS; };
    const int wr0 = warp_row0();
    // Warp-uniform loop limits: the warp computes tiles j < jw (none when all its rows lie past
    // the sequence end; when causal, none that start after its last row), and tiles with
    // n0 > mlim cross the sequence end or (causal) the warp's diagonal and need the mask.
    const int jw = wr0 >= len ? 0 : causal ? min(ntiles, (wr0 + Q128_WROWS - 1) / BN + 1) : ntiles;
    const int mlim = causal ? min(len - BN, wr0 - BN + 1) : len - BN;

    // Tile t (keys 64t..) into stage t & 1: K then V.
    auto load_kv = [&](int t) {
        const int n0 = t * BN, o = q128_opaque_i(kvoff) + n0 * ks;
        const u32 st = sbase + KV0 + (t & 1) * STAGE;
        q128_load_rows<D, BN, true>(st, k + o, st + BN * LDB, v + o, ks, min(BN, len - n0));
    };
    q128_load_rows<D, BM, false>(sbase, q + ((start + m0) * qs + h * D), sbase, q, qs, min(BM, len - m0));
    load_kv(0);
    cp_commit();

    // This lane's ldmatrix row addresses (see a_addr / b_addr / bt_addr in attention_mma.cuh),
    // recomputed where used: Q A fragments of the warp's rows (row fragment 1 at +16 rows,
    // k-step kk at +32 kk bytes), K B fragments ([keys][D]: n-blocks nb, nb+1 at +8 nb rows),
    // V B fragments ([keys][D], transposed: k-step kk at +16 kk rows, n-blocks dn, dn+1 at
    // +16 dn bytes).
    auto qa_addr = [&]() {
        const int ln = q128_opaque_i(lane);
        return sbase + (warp * Q128_WROWS + (ln & 15)) * LDB + (ln >> 4) * 16;
    };
    auto kb_lane = [&]() {
        const int ln = q128_opaque_i(lane);
        return (u32)(((ln & 7) + (ln >> 4) * 8) * LDB + ((ln >> 3) & 1) * 16);
    };
    auto vb_lane = [&]() {
        const int ln = q128_opaque_i(lane);
        return (u32)(((ln & 7) + ((ln >> 3) & 1) * 8) * LDB + (ln >> 4) * 16);
    };

    float o[2][ND][4];
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int dn = 0; dn < ND; dn++) o[mi][dn][0] = o[mi][dn][1] = o[mi][dn][2] = o[mi][dn][3] = 0.f;
    float mrow[2][2] = {{NEG_INF, NEG_INF}, {NEG_INF, NEG_INF}};
    // The thread-partial row sums live in shared memory (touched once per tile; registers are
    // short): lrow[(2 mi + hh) * 128] for row 16 mi + g + 8 hh of the warp.
    float* lrow = reinterpret_cast<float*>(att_smem + LSUM) + threadIdx.x;
#pragma unroll
    for (int e = 0; e < 4; e++) lrow[e * ATT_THREADS] = 0.f;
    u32 qf[QREG ? KS : 1][2][4];  // only used when QREG

    for (int j = 0; j < ntiles; j++) {
        const int n0 = j * BN;
        cp_wait_all();
        __syncthreads();  // tile j (and Q) visible; every warp is done with tile j-1, whose stage is reused next
        if (j + 1 < ntiles) {
            load_kv(j + 1);
            cp_commit();
        }
        if constexpr (QREG) {
            if (j == 0) {
                const u32 qa = qa_addr();
#pragma unroll
                for (int kk = 0; kk < KS; kk++) {
                    ldsm4(qa + kk * 32, qf[kk][0]);
                    ldsm4(qa + 16 * LDB + kk * 32, qf[kk][1]);
                }
            }
        }
        if (j >= jw) continue;
        const u32 kst = sbase + KV0 + (j & 1) * STAGE;  // this tile's K; V at + BN rows
        const u32 kb_addr = kst + kb_lane(), qa = QREG ? 0 : qa_addr();

        // S[32 x 64] = Q Kᵀ: each K fragment serves both 16-row fragments.
        float s[2][NB][4];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int nb = 0; nb < NB; nb++) s[mi][nb][0] = s[mi][nb][1] = s[mi][nb][2] = s[mi][nb][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
            u32 qfr[2][4];
            if constexpr (QREG) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    qfr[0][e] = qf[kk][0][e];
                    qfr[1][e] = qf[kk][1][e];
                }
            } else {
                ldsm4(qa + kk * 32, qfr[0]);
                ldsm4(qa + 16 * LDB + kk * 32, qfr[1]);
            }
#pragma unroll
            for (int nb = 0; nb < NB; nb += 2) {
                u32 b[4];
                ldsm4(kb_addr + nb * 8 * LDB + kk * 32, b);
                mma_bf16(s[0][nb], qfr[0], b[0], b[1]);
                mma_bf16(s[1][nb], qfr[1], b[0], b[1]);
                mma_bf16(s[0][nb + 1], qfr[0], b[2], b[3]);
                mma_bf16(s[1][nb + 1], qfr[1], b[2], b[3]);
            }
        }
        // Mask only the tiles that cross the sequence end or the warp's diagonal: column c of the
        // tile (key n0 + c) is masked for row r when n0 + c >= len or (causal) n0 + c > r.
        if (n0 > mlim) {
            const int ln = q128_opaque_i(lane), c0 = 2 * (ln & 3), r0 = warp_row0() + (ln >> 2);
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int hh = 0; hh < 2; hh++) {
                    const int lim = (causal ? min(len, r0 + mi * 16 + hh * 8 + 1) : len) - n0;  // first masked column
#pragma unroll
                    for (int nb = 0; nb < NB; nb++)
#pragma unroll
                        for (int e = 0; e < 2; e++)
                            if (nb * 8 + c0 + e >= lim) s[mi][nb][2 * hh + e] = NEG_INF;
                }
        }
        u32 pa[2][NB / 2][4];
        q128_softmax<NB, ND>(pa, s, o, mrow, lrow, sl2);
        // O[32 x D] += P V: each V fragment serves both 16-row fragments.
        const u32 vb_addr = kst + BN * LDB + vb_lane();
#pragma unroll
        for (int kk = 0; kk < NB / 2; kk++) {
#pragma unroll
            for (int dn = 0; dn < ND; dn += 2) {
                u32 b[4];
                ldsm4t(vb_addr + kk * 16 * LDB + dn * 16, b);
                mma_bf16(o[0][dn], pa[0][kk], b[0], b[1]);
                mma_bf16(o[1][dn], pa[1][kk], b[0], b[1]);
                mma_bf16(o[0][dn + 1], pa[0][kk], b[2], b[3]);
                mma_bf16(o[1][dn + 1], pa[1][kk], b[2], b[3]);
            }
        }
    }
    cp_wait_all();  // nothing may be in flight at exit

    // Rows wr0 + 16 mi + g + 8 hh: out (bf16) and lse = m·ln2 + ln(l).
    const int g = lane >> 2, tig = lane & 3, wr0e = warp_row0(), start_e = cu[q128_opaque_i(sq)];
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const float l = quad_sum(lrow[(2 * mi + hh) * ATT_THREADS]);
            const int r = wr0e + mi * 16 + g + hh * 8;
            if (r < len) {
                const float inv = 1.f / l;
                bf16* orow = out + ((start_e + r) * qs + h * D + 2 * tig);
#pragma unroll
                for (int dn = 0; dn < ND; dn++)
                    *reinterpret_cast<u32*>(orow + dn * 8) = pack_bf2(o[mi][dn][2 * hh] * inv, o[mi][dn][2 * hh + 1] * inv);
                if (tig == 0) lse[h * T_ + start_e + r] = mrow[mi][hh] * ATT_LN2 + logf(l);
            }
        }
}

// MINB: blocks per SM the register budget must allow; QREG: Q fragments kept in registers for the
// whole block instead of re-read from shared memory per k-step (40 registers at d80). d128: 2
// blocks (255 registers: O 128 + S 64 floats), Q from shared memory. d80: 2 blocks, Q in
// registers. d64: 3 blocks (≤ 168 registers; 57 KB of shared memory each), Q from shared memory:
// 12 warps per SM instead of 8 for a fifth more shared-memory reads.
#define ATT_FWD_Q128_ENTRY(D, MINB, QREG)                                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, MINB) attention_fwd_q128_bf16_d##D(                     \
        bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* cu, int T_, int hq, int hkv, \
        float sl2, int causal) {                                                                                    \
        fwd_q128_body<D, QREG>(out, lse, q, k, v, cu, T_, hq, hkv, sl2, causal);                                      \
    }
ATT_FWD_Q128_ENTRY(64, 3, false)
ATT_FWD_Q128_ENTRY(80, 2, true)
ATT_FWD_Q128_ENTRY(128, 2, false)

// Decode attention on tensor cores, split-K over the KV cache (bf16 in, f32 partials).
// q/out [B, n_new, hq, D]; cache k/v [B, max_len, hkv, D]; sequence b holds lens[b] tokens whose
// last n_new are the new ones (new token i sits at position lens[b] - n_new + i).
//
// One block = one (sequence b, kv head hk, 64-row query tile, key chunk). A tile's rows are the
// (new token i, q head of the group) pairs, row r = i * grp + j, so one pass over the cache
// serves every q head that shares it. Online softmax as in the training forward, with K/V tiles
// of 64 keys double-buffered in shared memory (the next tile loads while this one is used);
// warps whose 16 rows are all padding only help load. Each block writes its unnormalised output
// and (max, sum) per row, and attention_decode_combine merges the chunks.
#include "attention_mma.cuh"

template <int D>
__device__ __forceinline__ void decode_body(float* __restrict__ part_o, float* __restrict__ part_ml,
                                            const bf16* __restrict__ q, const bf16* __restrict__ kc,
                                            const bf16* __restrict__ vc, const int* __restrict__ lens, int n_new,
                                            int hq, int hkv, int max_len, int chunk, float sl2, int causal) {
    constexpr int BM = ATT_TILE, BN = ATT_TILE, LD = D + 8, KS = D / 16, ND = D / 8, NB = BN / 8, CH = D / 8;
    extern __shared__ __align__(16) unsigned char att_smem[];
    bf16* sQ = reinterpret_cast<bf16*>(att_smem);  // [BM][LD]
    bf16* sKV = sQ + BM * LD;                       // two stages of K [BN][LD] then V [BN][LD]

    const int split = blockIdx.x, hk = blockIdx.y % hkv, mt = blockIdx.y / hkv, b = blockIdx.z;
    const int grp = hq / hkv, R = n_new * grp;  // query rows per (sequence, kv head)
    const int r0 = mt * BM;
    const int len = lens[b];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, tig = lane & 3;
    // Keys this block covers: its chunk, cut at the last key any of its rows sees.
    const int last_row = min(R, r0 + BM) - 1;
    const int k_vis = causal ? len - n_new + last_row / grp + 1 : len;
    const int k0 = split * chunk, k1 = min(min(k0 + chunk, len), k_vis);
    const int ntiles = k1 > k0 ? CEIL_DIV(k1 - k0, BN) : 0;
    const long ks = (long)hkv * D;
    const bf16* kg = kc + (long)b * max_len * ks + hk * D;  // key j at kg + j * ks
    const bf16* vg = vc + (long)b * max_len * ks + hk * D;
    // Tile t (keys k0 + 64t..) into stage t & 1.
    auto load_kv = [&](int t) {
        int n0 = k0 + t * BN;
        bf16* st = sKV + (t & 1) * 2 * BN * LD;
        load_rows<D, BN>(st, kg + (long)n0 * ks, ks, min(BN, k1 - n0));
        load_rows<D, BN>(st + BN * LD, vg + (long)n0 * ks, ks, min(BN, k1 - n0));
    };

    // Q rows: gathered (row r -> token i = r / grp, head hk * grp + r % grp), zero past R.
    for (int c = threadIdx.x; c < BM * CH; c += ATT_THREADS) {
        int r = c / CH, e = (c - r * CH) * 8, gr = r0 + r;
        bool ok = gr < R;
        const bf16* src = ok ? q + (((long)b * n_new + gr / grp) * hq + hk * grp + gr % grp) * D + e : q;
        cp_async16(smem_u32(sQ + r * LD + e), src, ok ? 16 : 0);
    }
    if (ntiles > 0) load_kv(0);
    cp_commit();

    // Last key each of this thread's rows sees (-1 for padding rows: all masked).
    const int gr_lo = r0 + warp * 16 + g, gr_hi = gr_lo + 8;
    const int lim_lo = gr_lo < R ? (causal ? len - n_new + gr_lo / grp : len - 1) : -1;
    const int lim_hi = gr_hi < R ? (causal ? len - n_new + gr_hi / grp : len - 1) : -1;
    const bool active = r0 + warp * 16 < R;  // warp-uniform: the warp has a real row

    u32 qf[KS][4];
    float o[ND][4];
#pragma unroll
    for (int dn = 0; dn < ND; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.f, 0.f};

    // Two-stage pipeline: tile j+1 loads while tile j is used (decode is bound by these loads).
    for (int j = 0; j < ntiles; j++) {
        if (j + 1 < ntiles) load_kv(j + 1);
        cp_commit();  // possibly empty: keeps one group per iteration
        cp_wait_group<1>();
        __syncthreads();  // tile j (and Q) visible
        if (active) {
            if (j == 0) {
#pragma unroll
                for (int kk = 0; kk < KS; kk++) ldsm4(a_addr(sQ, LD, warp * 16, kk * 16, lane), qf[kk]);
            }
            const bf16* sK = sKV + (j & 1) * 2 * BN * LD;
            const int n0 = k0 + j * BN;
            float s[NB][4];
            qk_tile<D, NB>(s, qf, sK, lane);
#pragma unroll
            for (int nb = 0; nb < NB; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int col = n0 + nb * 8 + 2 * tig + (e & 1);
                    int lim = (e >> 1) ? lim_hi : lim_lo;
                    if (col >= k1 || col > lim) s[nb][e] = NEG_INF;
                }
            softmax_step<NB, ND>(s, o, mrow, lrow, sl2);
            pv_tile<D, NB>(o, s, sK + BN * LD, lane);
        }
        __syncthreads();  // every warp is done with stage j & 1 before tile j + 2 overwrites it
    }
    cp_wait_all();  // no copy may be in flight when the block exits (ntiles = 0 still loaded Q)

    // Partials, indexed by output row (b, i, head): o unnormalised, (m, l) in log2 units.
    const long nrows = (long)gridDim.z * n_new * hq;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        float l = quad_sum(lrow[hh]);
        int gr = hh ? gr_hi : gr_lo;
        if (gr >= R) continue;
        long orow = ((long)b * n_new + gr / grp) * hq + hk * grp + gr % grp;
        long pr = (long)split * nrows + orow;
        float* po = part_o + pr * D + 2 * tig;
#pragma unroll
        for (int dn = 0; dn < ND; dn++)
            *reinterpret_cast<float2*>(po + dn * 8) = make_float2(o[dn][2 * hh], o[dn][2 * hh + 1]);
        if (tig == 0) {
            part_ml[pr * 2] = mrow[hh];
            part_ml[pr * 2 + 1] = l;
        }
    }
}

#define ATT_DECODE_ENTRY(D)                                                                                         \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_decode_bf16_d##D(                           \
        float* part_o, float* part_ml, const bf16* q, const bf16* kc, const bf16* vc, const int* lens, int n_new,   \
        int hq, int hkv, int max_len, int chunk, int nsplit, float sl2, int causal) {                               \
        (void)nsplit;                                                                                               \
        decode_body<D>(part_o, part_ml, q, kc, vc, lens, n_new, hq, hkv, max_len, chunk, sl2, causal);              \
    }
ATT_DECODE_ENTRY(64)
ATT_DECODE_ENTRY(80)
ATT_DECODE_ENTRY(128)

// out[row, :] = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s over the nsplit chunks (M = max m_s;
// chunks no key of the row fell in have m = -inf and weigh 0). One block per output row.
extern "C" __global__ void attention_decode_combine_bf16(bf16* out, const float* part_o, const float* part_ml, int rows,
                                                        int nsplit, int d) {
    int row = blockIdx.x;
    if (row >= rows) return;
    float M = NEG_INF;
    for (int s = 0; s < nsplit; s++) M = fmaxf(M, part_ml[((long)s * rows + row) * 2]);
    float L = 0.f;
    for (int s = 0; s < nsplit; s++) {
        float ms = part_ml[((long)s * rows + row) * 2];
        if (ms != NEG_INF) L += part_ml[((long)s * rows + row) * 2 + 1] * exp2f(ms - M);
    }
    float inv = L > 0.f ? 1.f / L : 0.f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < nsplit; s++) {
            float ms = part_ml[((long)s * rows + row) * 2];
            if (ms != NEG_INF) acc += part_o[((long)s * rows + row) * d + c] * exp2f(ms - M);
        }
        out[(long)row * d + c] = f2bf(acc * inv);
    }
}

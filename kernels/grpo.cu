// GRPO for AM3Safety, f32 only (log-probs and rewards are statistics, never bf16):
//  - grpo_rewards_f32: per-dialogue turn statistics, turn weights, rewards and group advantages;
//  - grpo_weights_f32 + grpo_loss_f32 + grpo_stats_f32: the clipped-surrogate + k3-KL loss,
//    its gradient d loss / d logp, and the loss / clip-fraction / mean-KL statistics.
// The loss kernel works on any contiguous range of "packed" tokens so the fused lm_head op
// (src/ops/logprob.rs) can call it chunk by chunk; packed token p is token idx[p] (p when idx is null).
#include "common.cuh"

// One block per dialogue p. safe, help: [P, N, T]; turn_*: [P, T]; reward, adv: [P, N].
// m_t = mean_n safe, Var_t = population variance, U_t = Var_t + lambda * max(0, tau - m_t),
// alpha = softmax_t(U), r_n = sum_t alpha_t (beta_help * help + safe),
// A_n = (r_n - mean r) / (unbiased std r + adv_eps); A = 0 when N == 1.
// The output arrays double as scratch: a block's global writes are visible to its own threads
// after __syncthreads.
extern "C" __global__ void grpo_rewards_f32(float* __restrict__ turn_mean, float* __restrict__ turn_var,
                                            float* __restrict__ turn_imp, float* __restrict__ turn_w,
                                            float* __restrict__ reward, float* __restrict__ adv,
                                            const float* __restrict__ safe, const float* __restrict__ help,
                                            int P, int N, int T, float lambda, float tau, float beta_help,
                                            float adv_eps) {
    __shared__ float s_mean, s_std;
    int p = blockIdx.x;
    if (p >= P) return;
    const float* sp = safe + (long)p * N * T;
    const float* hp = help + (long)p * N * T;
    float* tm = turn_mean + (long)p * T;
    float* tv = turn_var + (long)p * T;
    float* ti = turn_imp + (long)p * T;
    float* tw = turn_w + (long)p * T;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        float m = 0.f;
        for (int n = 0; n < N; n++) m += sp[(long)n * T + t];
        m /= (float)N;
        float v = 0.f;
        for (int n = 0; n < N; n++) { float d = sp[(long)n * T + t] - m; v += d * d; }
        v /= (float)N;
        tm[t] = m;
        tv[t] = v;
        ti[t] = v + lambda * fmaxf(0.f, tau - m);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float mx = NEG_INF;
        for (int t = 0; t < T; t++) mx = fmaxf(mx, ti[t]);
        float z = 0.f;
        for (int t = 0; t < T; t++) { float e = expf(ti[t] - mx); tw[t] = e; z += e; }
        for (int t = 0; t < T; t++) tw[t] /= z;
    }
    __syncthreads();
    float* rp = reward + (long)p * N;
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        float r = 0.f;
        for (int t = 0; t < T; t++) r += tw[t] * (beta_help * hp[(long)n * T + t] + sp[(long)n * T + t]);
        rp[n] = r;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float m = 0.f;
        for (int n = 0; n < N; n++) m += rp[n];
        m /= (float)N;
        float v = 0.f;
        for (int n = 0; n < N; n++) { float d = rp[n] - m; v += d * d; }
        s_mean = m;
        s_std = N > 1 ? sqrtf(v / (float)(N - 1)) : 0.f;
    }
    __syncthreads();
    for (int n = threadIdx.x; n < N; n += blockDim.x)
        adv[(long)p * N + n] = N > 1 ? (rp[n] - s_mean) / (s_std + adv_eps) : 0.f;
}

// One block (1024 threads). mask: [rows, L]. Writes wrow[rows], the weight of each masked token of
// that row in the aggregated loss, and total[0] = sum of the mask.
// token mean: 1 / sum(mask); sequence mean: 1 / (count_row * non-empty rows), 0 for empty rows.
extern "C" __global__ void grpo_weights_f32(float* __restrict__ wrow, float* __restrict__ total,
                                            const float* __restrict__ mask, int rows, int L, int seq_mean) {
    __shared__ float scratch[32];
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = blockDim.x / WARP;
    for (int r = wid; r < rows; r += nw) {
        float c = 0.f;
        for (int j = lane; j < L; j += WARP) c += mask[(long)r * L + j];
        c = warp_sum(c);
        if (lane == 0) wrow[r] = c;
    }
    __syncthreads();
    float tot = 0.f, nonempty = 0.f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        float c = wrow[r];
        tot += c;
        nonempty += c != 0.f ? 1.f : 0.f;
    }
    tot = block_sum(tot, scratch);
    nonempty = block_sum(nonempty, scratch);
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        float c = wrow[r];
        float w;
        if (seq_mean) w = c != 0.f ? 1.f / (c * nonempty) : 0.f;
        else w = tot != 0.f ? 1.f / tot : 0.f;
        wrow[r] = w;
    }
    if (threadIdx.x == 0) total[0] = tot;
}

// k3 = e^d - d - 1 without the cancellation that loses its relative precision for small |d|
// (the mean KL is mostly such tokens): Taylor series d^2/2! + ... + d^10/10! below |d| = 0.5.
__device__ __forceinline__ float k3_of(float d) {
    if (fabsf(d) >= 0.5f) return expf(d) - d - 1.f;
    float s = 1.f / 3628800.f;                // 1/10!
    const float inv[8] = {1.f / 362880.f, 1.f / 40320.f, 1.f / 5040.f, 1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f};
#pragma unroll
    for (int i = 0; i < 8; i++) s = s * d + inv[i];
    return s * d * d;
}

// One thread per packed token p in [p0, p0 + n). logp, dlogp: packed; old, ref, mask, tok_*:
// [rows, L] token order; adv, wrow: [rows].
//   rho = e^(logp - old); surrogate = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
//   k3 = e^(ref - logp) - (ref - logp) - 1; loss = -(surrogate - beta_kl k3)
// dlogp = w * d loss / d logp, with w = mask * wrow[row]; the clipped branch has zero gradient.
// tok_loss = w * loss, tok_clip = mask * [clipped branch chosen], tok_kl = mask * k3.
extern "C" __global__ void grpo_loss_f32(float* __restrict__ dlogp, float* __restrict__ tok_loss,
                                         float* __restrict__ tok_clip, float* __restrict__ tok_kl,
                                         const float* __restrict__ logp, const float* __restrict__ old_logp,
                                         const float* __restrict__ ref_logp, const float* __restrict__ mask,
                                         const float* __restrict__ adv, const float* __restrict__ wrow,
                                         const int* __restrict__ idx, int p0, int n, int L,
                                         float eps_low, float eps_high, float beta_kl) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long p = p0 + i;
    long tok = idx ? (long)idx[p] : p;
    long row = tok / L;
    float m = mask[tok];
    if (m == 0.f) {   // masked: contributes nothing, whatever its (possibly garbage) log-probs
        dlogp[p] = 0.f;
        tok_loss[tok] = 0.f;
        tok_clip[tok] = 0.f;
        tok_kl[tok] = 0.f;
        return;
    }
    float lp = logp[p], A = adv[row];
    float rho = expf(lp - old_logp[tok]);
    float c = fminf(fmaxf(rho, 1.f - eps_low), 1.f + eps_high);
    float s1 = rho * A, s2 = c * A;
    bool clipped = s2 < s1;
    float sur = clipped ? s2 : s1;
    float dsur = clipped ? 0.f : s1;          // d(rho A)/d logp = rho A
    float d = ref_logp[tok] - lp;
    float k3 = k3_of(d);
    float dk3 = -expm1f(d);                   // d k3 / d logp = 1 - e^d
    float w = m * wrow[row];
    dlogp[p] = -w * (dsur - beta_kl * dk3);
    tok_loss[tok] = -w * (sur - beta_kl * k3);
    tok_clip[tok] = clipped ? m : 0.f;
    tok_kl[tok] = m * k3;
}

// Block sum in double (every thread gets it); scratch holds >= 32 doubles.
__device__ __forceinline__ double block_sum_d(double v, double* scratch) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = CEIL_DIV(blockDim.x, WARP);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One block (1024 threads): stats = [sum tok_loss, sum tok_clip / total, sum tok_kl / total],
// summed in double (the loss is a small difference of many terms).
extern "C" __global__ void grpo_stats_f32(float* __restrict__ stats, const float* __restrict__ tok_loss,
                                          const float* __restrict__ tok_clip, const float* __restrict__ tok_kl,
                                          const float* __restrict__ total, int n) {
    __shared__ double scratch[32];
    double a = 0.0, b = 0.0, c = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { a += tok_loss[i]; b += tok_clip[i]; c += tok_kl[i]; }
    a = block_sum_d(a, scratch);
    b = block_sum_d(b, scratch);
    c = block_sum_d(c, scratch);
    if (threadIdx.x == 0) {
        double tot = total[0];
        stats[0] = (float)a;
        stats[1] = tot != 0.0 ? (float)(b / tot) : 0.f;
        stats[2] = tot != 0.0 ? (float)(c / tot) : 0.f;
    }
}

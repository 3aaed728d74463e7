//! Launch of the V3 training backward (kernels/attention_v3_bwd.cu, `Variant::V3`, sequences
//! longer than one 64-row tile): one block = 128 keys of one (sequence, kv head), 8 warps as 4
//! pairs of 32 keys (one warp computes S, P and dV, its partner dP, dS and dK; P goes from one to
//! the other through shared memory), walking the query tiles of every q head of the GQA group,
//! so dK/dV are summed over the group in registers and written once as bf16; dQ by f32 atomics
//! into a scratch buffer that a finish kernel rounds to bf16. Same results and layouts as V1
//! (dq [T, hq, d], dk/dv [T, hkv, d]). Design and counts: PERF-attention.md, "Round 4".
//!
//! Three launches: `attention_bwd_rowdot_bf16` (D = rowsum(dO∘O) per query row), the main kernel,
//! `attention_bwd_dq_round_bf16`.

use super::{bwd_rows, AttnShape, Varlen};
use crate::cuda::{Arg, Gpu};
use crate::tensor::{Buf, Device};
use anyhow::{bail, Result};
use cudarc::driver::LaunchConfig;

/// Keys per block.
const BN: usize = 128;
/// Query rows per step.
const BM: usize = 64;
/// Threads per block (8 warps).
const THREADS: u32 = 256;

/// Shared memory of `attention_bwd_v3_bf16_d{d}` (the kernel's `V3Smem<D>::BYTES`): K and V
/// [128][d+8], two stages of Q and dO [64][d+8] (bf16, rows padded by 8 so ldmatrix rows fall in
/// distinct banks), two buffers of dSᵀ [128][72] bf16, the P hand-off (4 pairs × 4 KiB) and two
/// stages of lse and dvec [64] f32. d128: 189 KiB (one block per SM).
fn smem(d: usize) -> u32 {
    let (ld, lds) = (d + 8, BM + 8);
    (2 * BN * ld * 2 + 4 * BM * ld * 2 + 2 * BN * lds * 2 + 4 * 2 * 4 * 32 * 16 + 4 * BM * 4) as u32
}

/// dq (=), dk (=), dv (=), all bf16, from dout, q, k, v, out (bf16) and the forward's lse [hq, T].
/// The caller (`bwd_with`) has checked the buffer sizes and dtypes, d ∈ {64, 80, 128}, 16-byte
/// alignment of every bf16 buffer (out included), T > 0, T·hq·d < 2^31 and nseq ≤ 65535.
#[allow(clippy::too_many_arguments)]
pub(super) fn bwd(
    dev: &Device, g: &Gpu, dq: &mut Buf, dk: &mut Buf, dv: &mut Buf, dout: &Buf, q: &Buf, k: &Buf, v: &Buf, out: &Buf,
    lse: &Buf, seqs: &Varlen, s: &AttnShape, t: usize,
) -> Result<()> {
    let nseq = seqs.nseq();
    // One-dimensional grid, key block slowest: all (sequence, kv head) pairs of key block 0 (the
    // longest when causal) are dispatched first.
    let blocks = seqs.max_len.div_ceil(BN) * nseq * s.hkv;
    if blocks > i32::MAX as usize {
        bail!("attention_bwd: {blocks} blocks of 128 keys exceed the V3 grid limit (2^31 - 1)");
    }
    let dvec = bwd_rows::rowdot(dev, g, "attention_v3_bwd", dout, out, t, s)?; // [hq, T]

    let dq_acc = dev.zeros_f32(t * s.hq * s.d)?; // [T, hq, d] f32, summed by atomics
    let args = [
        Arg::Ptr(dq_acc.ptr(g)?),
        Arg::Ptr(dk.ptr(g)?),
        Arg::Ptr(dv.ptr(g)?),
        Arg::Ptr(q.ptr(g)?),
        Arg::Ptr(k.ptr(g)?),
        Arg::Ptr(v.ptr(g)?),
        Arg::Ptr(dout.ptr(g)?),
        Arg::Ptr(lse.ptr(g)?),
        Arg::Ptr(dvec.ptr(g)?),
        Arg::Ptr(seqs.buf.ptr(g)?),
        Arg::I32(nseq as i32),
        Arg::I32(t as i32),
        Arg::I32(s.hq as i32),
        Arg::I32(s.hkv as i32),
        Arg::F32(s.scale),
        Arg::F32(s.scale * std::f32::consts::LOG2_E),
        Arg::I32(s.causal as i32),
    ];
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem(s.d) };
    g.launch("attention_v3_bwd", &format!("attention_bwd_v3_bf16_d{}", s.d), cfg, &args)?;

    bwd_rows::round_dq(g, "attention_v3_bwd", dq, &dq_acc, t, s)
}

#[cfg(test)]
mod tests {
    /// The launcher's shared-memory size is the kernel's V3Smem<D>::BYTES (computed by hand).
    #[test]
    fn smem_matches_kernel() {
        assert_eq!(super::smem(128), 193_536);
        assert_eq!(super::smem(80), 144_384);
        assert_eq!(super::smem(64), 128_000);
    }
}

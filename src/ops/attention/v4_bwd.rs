//! Launch of the V4 training backward (kernels/attention_v4_bwd.cu, `Variant::V4`): one block =
//! 64 keys of one (sequence, kv head), 4 warps, walking the query tiles (64 rows) of every q head
//! of the GQA group (V2's walk and grid: dK/dV summed over the group in registers, stored once as
//! bf16; dQ by f32 atomics), with FA2's 2 × 2 warp tiles: each warp computes S and dP for 32 keys
//! × 32 queries, P and dS go through shared memory, and dV/dK (32 keys × half the head dim) and
//! dQ (32 queries × half the head dim) each take the 64-wide reduction. Same results and layouts
//! as V1 (dq [T, hq, d], dk/dv [T, hkv, d]). Design and counts: PERF-attention.md, "Round 5".
//!
//! Three launches: `attention_bwd_rowdot_bf16` (D = rowsum(dO∘O) per query row), the main kernel,
//! `attention_bwd_dq_round_bf16` (dq = bf16(dq_acc)).

use super::{bwd_rows, AttnShape, Varlen};
use crate::cuda::{Arg, Gpu};
use crate::tensor::{Buf, Device};
use anyhow::Result;
use cudarc::driver::LaunchConfig;

/// Keys per block (= query rows per step).
const TILE: usize = 64;
/// Threads per block (4 warps).
const THREADS: u32 = 128;

/// Shared memory of `attention_bwd_v4_bf16_d{d}` (the kernel's `V4Smem<D>::BYTES`): K, V, two
/// stages of Q, and dO, each [64][d+8] bf16 (rows padded by 8 so ldmatrix rows fall in distinct
/// banks); P and dS [64][72] bf16; lse and dvec [64] f32. d128: 103.5 KiB (two blocks per SM).
fn smem(d: usize) -> u32 {
    (5 * TILE * (d + 8) * 2 + 2 * TILE * 72 * 2 + 2 * TILE * 4) as u32
}

/// dq (=), dk (=), dv (=), all bf16, from dout, q, k, v, out (bf16) and the forward's lse [hq, T].
/// The caller (`bwd_with`) has checked the buffer sizes and dtypes, d ∈ {64, 80, 128}, 16-byte
/// alignment of every bf16 buffer (out included), T > 0, T·hq·d < 2^31 and the grid limits
/// (sequences, heads and 64-token tiles ≤ 65535).
#[allow(clippy::too_many_arguments)]
pub(super) fn bwd(
    dev: &Device, g: &Gpu, dq: &mut Buf, dk: &mut Buf, dv: &mut Buf, dout: &Buf, q: &Buf, k: &Buf, v: &Buf, out: &Buf,
    lse: &Buf, seqs: &Varlen, s: &AttnShape, t: usize,
) -> Result<()> {
    let nseq = seqs.nseq();
    let dvec = bwd_rows::rowdot(dev, g, "attention_v4_bwd", dout, out, t, s)?; // [hq, T]

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
        Arg::I32(t as i32),
        Arg::I32(s.hq as i32),
        Arg::I32(s.hkv as i32),
        Arg::F32(s.scale),
        Arg::F32(s.scale * std::f32::consts::LOG2_E),
        Arg::I32(s.causal as i32),
    ];
    let tiles = seqs.max_len.div_ceil(TILE) as u32;
    let cfg = LaunchConfig {
        // Causal: (kv heads, sequences, key tiles): blocks start in linear order, so every key tile
        // 0 (the longest walk) starts first. Non-causal (equal blocks): (key tiles, kv heads,
        // sequences), neighbouring blocks read the same Q/dO from L2. As V2 (PERF-attention.md,
        // round 4: 7.32 -> 6.25 ms causal).
        grid_dim: if s.causal { (s.hkv as u32, nseq as u32, tiles) } else { (tiles, s.hkv as u32, nseq as u32) },
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem(s.d),
    };
    g.launch("attention_v4_bwd", &format!("attention_bwd_v4_bf16_d{}", s.d), cfg, &args)?;

    bwd_rows::round_dq(g, "attention_v4_bwd", dq, &dq_acc, t, s)
}

#[cfg(test)]
mod tests {
    /// The launcher's shared-memory size is the kernel's V4Smem<D>::BYTES (computed by hand).
    #[test]
    fn smem_matches_kernel() {
        assert_eq!(super::smem(128), 105_984);
        assert_eq!(super::smem(80), 75_264);
        assert_eq!(super::smem(64), 65_024);
    }
}

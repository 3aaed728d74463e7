//! Launch of the V3 training forward (kernels/attention_v3.cu, `Variant::V3`, sequences longer
//! than one 64-row tile): one block = 128 query rows of one (sequence, q head) as 4 warps × 32
//! rows (two m16 fragments per warp share every K/V fragment read from shared memory), 64-key
//! K/V tiles through a two-stage cp.async ring. Same arguments, layouts and results as the V1/V2
//! forwards (out [T, hq, d], lse [hq, T]), so the backward takes its lse unchanged.
//!
//! Grid (hq, nseq, query tiles): the kernel reverses the tile index (z), so the longest causal
//! tiles of every (sequence, head) are dispatched first and the shortest last.

use super::{AttnShape, Varlen};
use crate::cuda::{Arg, Gpu};
use anyhow::{bail, Result};
use cudarc::driver::LaunchConfig;

/// Query rows per block.
const BM: usize = 128;
/// Keys per K/V tile.
const BN: usize = 64;

/// Shared memory: Q [128][d+8] and two stages of K and V [64][d+8] (bf16, rows padded by 8 so
/// ldmatrix rows fall in distinct banks), then the thread-partial row sums [4][128] f32.
fn smem(d: usize) -> u32 {
    ((BM + 4 * BN) * (d + 8) * 2 + 4 * 128 * 4) as u32
}

/// Launches `attention_fwd_v3_bf16_d{d}`; `args` = out, lse, q, k, v, cu_seqlens, T, hq, hkv,
/// scale·log2(e), causal (the list every tensor-core forward takes). The caller has checked the
/// buffers, the dtype (bf16), the head dim (64/80/128), the alignment and T·hq·d < 2^31 (the
/// kernel indexes with 32-bit offsets).
pub(super) fn launch(g: &Gpu, args: &[Arg], seqs: &Varlen, s: &AttnShape) -> Result<()> {
    let tiles = seqs.max_len.div_ceil(BM);
    if tiles > 65535 || seqs.nseq() > 65535 {
        bail!(
            "attention_fwd: {} sequences of up to {} tokens exceed the V3 grid limits (65535 each in y, z)",
            seqs.nseq(),
            seqs.max_len
        );
    }
    let cfg = LaunchConfig {
        grid_dim: (s.hq as u32, seqs.nseq() as u32, tiles as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem(s.d),
    };
    g.launch("attention_v3", &format!("attention_fwd_v3_bf16_d{}", s.d), cfg, args)
}

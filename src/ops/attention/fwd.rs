//! Launch of the training/vision forward (kernels/attention_fwd.cu, or attention_simple.cu).
//!
//! Q128 (`attention_fwd_q128_bf16_d{d}`): one block = 128 query rows of one (sequence, q head) as
//! 4 warps × 32 rows (two m16 fragments per warp share every K/V fragment read from shared
//! memory), 64-key K/V tiles through a two-stage cp.async ring. Grid (hq, nseq, query tiles): the
//! kernel reverses the tile index (z), so the longest causal tiles of every (sequence, head) are
//! dispatched first and the shortest last.
//!
//! Q64 (`attention_fwd_q64_bf16_d{d}`): one block = 64 query rows of one (sequence, head), 4 warps
//! × 16 rows, grid (query tiles, hq, nseq).
//!
//! Both take the same arguments and give the same layouts (out [T, hq, d], lse [hq, T]), so either
//! backward takes their lse.

use super::{
    cfg_warps, check, check_dtype, check_grid, check_packed, check_tc, cpu, AttnFwdKernel, AttnShape, FwdOut, Qkv,
    Varlen, TILE,
};
use crate::cuda::api;
use crate::cuda::Gpu;
use crate::ops::same_float_dtype;
use crate::tensor::{DType, Device};
use anyhow::{bail, Result};
use cudarc::driver::LaunchConfig;

/// Query rows per Q128 block.
const BM: usize = 128;
/// Keys per Q128 K/V tile.
const BN: usize = 64;

/// Shared memory of Q64: Q, K, V tiles of 64 rows, rows padded by 8 elements.
fn q64_smem(d: usize) -> u32 {
    (3 * TILE * (d + 8) * 2) as u32
}

/// Shared memory of Q128: Q [128][d+8] and two stages of K and V [64][d+8] (bf16, rows padded by 8
/// so ldmatrix rows fall in distinct banks), then the thread-partial row sums [4][128] f32.
fn q128_smem(d: usize) -> u32 {
    ((BM + 4 * BN) * (d + 8) * 2 + 4 * 128 * 4) as u32
}

/// `fwd` with an explicit kernel (the bench and tests run each); an error when a tensor-core
/// kernel cannot take the call (dtype, head dim, alignment). On the CPU the kernel is ignored.
pub fn fwd_with(dev: &Device, o: FwdOut, x: Qkv, seqs: &Varlen, s: &AttnShape, kernel: AttnFwdKernel) -> Result<()> {
    let op = "attention_fwd";
    let (FwdOut { out, lse }, Qkv { q, k, v }) = (o, x);
    let t = check_packed(op, x, seqs, s)?;
    check(out, t * s.hq * s.d, op, "out")?;
    check(lse, s.hq * t, op, "lse")?;
    check_dtype(lse, DType::F32, op, "lse")?;
    match dev {
        Device::Cpu => {
            let o = FwdOut { out: out.host_mut()?, lse: lse.host_mut()? };
            cpu::fwd(o, Qkv { q: q.host()?, k: k.host()?, v: v.host()? }, &seqs.host, s);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[out, q, k, v])?;
            if t == 0 {
                return Ok(());
            }
            let nseq = seqs.nseq();
            if kernel == AttnFwdKernel::Simple {
                let cfg = cfg_warps(t * s.hq);
                return api::attention_simple::AttentionSimpleFwd {
                    out: out.ptr(g)?,
                    lse: lse.ptr(g)?,
                    q: q.ptr(g)?,
                    k: k.ptr(g)?,
                    v: v.ptr(g)?,
                    cu: seqs.buf.ptr(g)?,
                    nseq: nseq as i32,
                    t: t as i32,
                    hq: s.hq as i32,
                    hkv: s.hkv as i32,
                    d: s.d as i32,
                    scale: s.scale,
                    causal: s.causal as i32,
                }
                .launch(g, dt, cfg);
            }
            check_tc(op, kernel, dt, s.d, super::aligned16(g, &[out, q, k, v])?)?;
            check_grid(op, seqs, s)?;
            let args = api::attention_fwd::AttentionFwdQ64Bf16 {
                out: out.ptr(g)?,
                lse: lse.ptr(g)?,
                q: q.ptr(g)?,
                k: k.ptr(g)?,
                v: v.ptr(g)?,
                cu: seqs.buf.ptr(g)?,
                t: t as i32,
                hq: s.hq as i32,
                hkv: s.hkv as i32,
                sl2: s.scale * std::f32::consts::LOG2_E,
                causal: s.causal as i32,
            };
            if kernel == AttnFwdKernel::Q128 {
                return launch_q128(g, args, seqs, s);
            }
            let cfg = LaunchConfig {
                grid_dim: (seqs.max_len.div_ceil(TILE) as u32, s.hq as u32, nseq as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: q64_smem(s.d),
            };
            args.launch(g, s.d as u32, cfg)
        }
    }
}

/// Launches `attention_fwd_q128_bf16_d{d}` with the Q64 kernel's arguments (the two share their
/// parameter list). The caller has checked the buffers, the dtype (bf16), the head dim
/// (64/80/128), the alignment and T·hq·d < 2^31 (the kernel indexes with 32-bit offsets).
fn launch_q128(g: &Gpu, a: api::attention_fwd::AttentionFwdQ64Bf16, seqs: &Varlen, s: &AttnShape) -> Result<()> {
    let tiles = seqs.max_len.div_ceil(BM);
    if tiles > 65535 || seqs.nseq() > 65535 {
        bail!(
            "attention_fwd: {} sequences of up to {} tokens exceed the Q128 grid limits (65535 each in y, z)",
            seqs.nseq(),
            seqs.max_len
        );
    }
    let cfg = LaunchConfig {
        grid_dim: (s.hq as u32, seqs.nseq() as u32, tiles as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: q128_smem(s.d),
    };
    api::attention_fwd::AttentionFwdQ128Bf16::from(a).launch(g, s.d as u32, cfg)
}

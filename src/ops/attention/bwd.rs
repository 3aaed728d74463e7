//! Launch of the training/vision backward (kernels/attention_bwd.cu, or attention_simple.cu).
//!
//! KvHead (`attention_bwd_kvhead_bf16_d{d}`): one block = 64 keys of one (sequence, kv head), 4
//! warps, walking the query tiles (64 rows) of every q head of the GQA group (dK/dV summed over
//! the group in registers, stored once as bf16; dQ by f32 atomics), with FA2's 2 × 2 warp tiles:
//! each warp computes S and dP for 32 keys × 32 queries, P and dS go through shared memory, and
//! dV/dK (32 keys × half the head dim) and dQ (32 queries × half the head dim) each take the
//! 64-wide reduction. Three launches: `attention_bwd_rowdot_bf16` (D = rowsum(dO∘O) per query
//! row), the main kernel, `attention_bwd_dq_round_bf16` (dq = bf16(dq_acc)). Design and counts:
//! PERF-attention.md, "Round 5".
//!
//! QHead (`attention_bwd_qhead_bf16_d{d}`): one block = 64 keys of one (sequence, q head); D from
//! attention_simple.cu's `attention_bwd_dot`, dQ by f32 atomics, with GQA f32 dK/dV partials per
//! q head, then `attention_bwd_finish_bf16` (rounds dQ, sums the partials).
//!
//! Simple: D as QHead, then one warp per dq row and one per dk/dv row.

use super::{
    aligned16, cfg_warps, check, check_dtype, check_grid, check_packed, check_tc, cpu, AttnBwdKernel, AttnShape,
    FwdSaved, QkvGrads, Varlen, TILE,
};
use crate::cuda::api;
use crate::cuda::{cfg_1d, Gpu};
use crate::ops::same_float_dtype;
use crate::tensor::{Buf, DType, Device};
use anyhow::Result;
use cudarc::driver::LaunchConfig;

/// Shared memory of QHead: K, V, Q, dO tiles, the dSᵀ tile and lse/D rows.
fn qhead_smem(d: usize) -> u32 {
    (4 * TILE * (d + 8) * 2 + TILE * (TILE + 8) * 2 + 2 * TILE * 4) as u32
}

/// Shared memory of KvHead (the kernel's `KvhSmem<D>::BYTES`): K, V, two stages of Q, and dO,
/// each [64][d+8] bf16 (rows padded by 8 so ldmatrix rows fall in distinct banks); P and dS
/// [64][72] bf16; lse and dvec [64] f32. d128: 103.5 KiB (two blocks per SM).
fn kvhead_smem(d: usize) -> u32 {
    (5 * TILE * (d + 8) * 2 + 2 * TILE * 72 * 2 + 2 * TILE * 4) as u32
}

/// `bwd` with an explicit kernel (the bench and tests run each); an error when a tensor-core kernel
/// cannot take the call (dtype, head dim, alignment). On the CPU the kernel is ignored.
pub fn bwd_with(
    dev: &Device, grads: QkvGrads, dout: &Buf, x: FwdSaved, seqs: &Varlen, s: &AttnShape, kernel: AttnBwdKernel,
) -> Result<()> {
    let op = "attention_bwd";
    let (QkvGrads { dq, dk, dv }, FwdSaved { q, k, v, out, lse }) = (grads, x);
    let t = check_packed(op, x.qkv(), seqs, s)?;
    for (b, n, a) in [
        (&*dq, t * s.hq * s.d, "dq"),
        (&*dk, t * s.hkv * s.d, "dk"),
        (&*dv, t * s.hkv * s.d, "dv"),
        (dout, t * s.hq * s.d, "dout"),
        (out, t * s.hq * s.d, "out"),
        (lse, s.hq * t, "lse"),
    ] {
        check(b, n, op, a)?;
    }
    check_dtype(lse, DType::F32, op, "lse")?;
    match dev {
        Device::Cpu => {
            let (q, k, v, out, lse, d_o) = (q.host()?, k.host()?, v.host()?, out.host()?, lse.host()?, dout.host()?);
            let grads = QkvGrads { dq: dq.host_mut()?, dk: dk.host_mut()?, dv: dv.host_mut()? };
            cpu::bwd(grads, d_o, FwdSaved { q, k, v, out, lse }, &seqs.host, s);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[dq, dk, dv, dout, q, k, v, out])?;
            if t == 0 {
                return Ok(());
            }
            if kernel == AttnBwdKernel::KvHead {
                check_tc(op, kernel, dt, s.d, aligned16(g, &[dq, dk, dv, dout, q, k, v, out])?)?;
                check_grid(op, seqs, s)?;
                return bwd_kvhead(dev, g, QkvGrads { dq, dk, dv }, dout, x, seqs, s);
            }
            let nseq = seqs.nseq();
            // D[h, t] = dout·out per row, the softmax-backward correction term.
            let dvec = dev.zeros_f32(s.hq * t)?;
            api::attention_simple::AttentionBwdDot {
                dvec: dvec.ptr(g)?,
                dout: dout.ptr(g)?,
                out: out.ptr(g)?,
                t: t as i32,
                hq: s.hq as i32,
                d: s.d as i32,
            }
            .launch(g, dt, cfg_warps(t * s.hq))?;
            let (qp, kp, vp, dop, lp, dvp, cu) =
                (q.ptr(g)?, k.ptr(g)?, v.ptr(g)?, dout.ptr(g)?, lse.ptr(g)?, dvec.ptr(g)?, seqs.buf.ptr(g)?);
            let (hq, hkv, scale, causal) = (s.hq as i32, s.hkv as i32, s.scale, s.causal as i32);
            if kernel == AttnBwdKernel::QHead {
                check_tc(op, kernel, dt, s.d, aligned16(g, &[dq, dk, dv, dout, q, k, v])?)?;
                check_grid(op, seqs, s)?;
                let grp = s.hq / s.hkv;
                // dQ accumulates in f32 across KV blocks; with GQA each q head writes its own
                // dK/dV partial [T, hq, d] (f32) and the finish kernel sums the group.
                let dq_acc = dev.zeros_f32(t * s.hq * s.d)?;
                let parts =
                    if grp > 1 { Some((dev.zeros_f32(t * s.hq * s.d)?, dev.zeros_f32(t * s.hq * s.d)?)) } else { None };
                let (dk_dst, dv_dst) = match &parts {
                    Some((a, b)) => (a.ptr(g)?, b.ptr(g)?),
                    None => (dk.ptr(g)?, dv.ptr(g)?),
                };
                let sl2 = s.scale * std::f32::consts::LOG2_E;
                let cfg = LaunchConfig {
                    grid_dim: (seqs.max_len.div_ceil(TILE) as u32, s.hq as u32, nseq as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: qhead_smem(s.d),
                };
                api::attention_bwd::AttentionBwdQheadBf16 {
                    dq_acc: dq_acc.ptr(g)?,
                    dk_out: dk_dst,
                    dv_out: dv_dst,
                    q: qp,
                    k: kp,
                    v: vp,
                    dout: dop,
                    lse: lp,
                    dvec: dvp,
                    cu,
                    t: t as i32,
                    hq,
                    hkv,
                    scale,
                    sl2,
                    causal,
                }
                .launch(g, s.d as u32, cfg)?;
                let (pk, pv) = match &parts {
                    Some((a, b)) => (a.ptr(g)?, b.ptr(g)?),
                    None => (0, 0),
                };
                api::attention_bwd::AttentionBwdFinishBf16 {
                    dq: dq.ptr(g)?,
                    dk: dk.ptr(g)?,
                    dv: dv.ptr(g)?,
                    dq_acc: dq_acc.ptr(g)?,
                    dk_part: pk,
                    dv_part: pv,
                    t: t as i32,
                    hq: s.hq as i32,
                    hkv: s.hkv as i32,
                    d: s.d as i32,
                    partials: parts.is_some() as i32,
                }
                .launch(g, cfg_1d(t * s.hq * s.d, 256))
            } else {
                let (nseq, t, d) = (nseq as i32, t as i32, s.d as i32);
                api::attention_simple::AttentionSimpleBwdDq {
                    dq: dq.ptr(g)?,
                    q: qp,
                    k: kp,
                    v: vp,
                    dout: dop,
                    lse: lp,
                    dvec: dvp,
                    cu,
                    nseq,
                    t,
                    hq,
                    hkv,
                    d,
                    scale,
                    causal,
                }
                .launch(g, dt, cfg_warps(t as usize * s.hq))?;
                api::attention_simple::AttentionSimpleBwdDkv {
                    dk: dk.ptr(g)?,
                    dv: dv.ptr(g)?,
                    q: qp,
                    k: kp,
                    v: vp,
                    dout: dop,
                    lse: lp,
                    dvec: dvp,
                    cu,
                    nseq,
                    t,
                    hq,
                    hkv,
                    d,
                    scale,
                    causal,
                }
                .launch(g, dt, cfg_warps(t as usize * s.hkv))
            }
        }
    }
}

/// dq (=), dk (=), dv (=), all bf16, from dout, q, k, v, out (bf16) and the forward's lse [hq, T].
/// The caller (`bwd_with`) has checked the buffer sizes and dtypes, d ∈ {64, 80, 128}, 16-byte
/// alignment of every bf16 buffer (out included), T > 0, T·hq·d < 2^31 and the grid limits
/// (sequences, heads and 64-token tiles ≤ 65535).
fn bwd_kvhead(
    dev: &Device, g: &Gpu, grads: QkvGrads, dout: &Buf, x: FwdSaved, seqs: &Varlen, s: &AttnShape,
) -> Result<()> {
    let (QkvGrads { dq, dk, dv }, FwdSaved { q, k, v, out, lse }) = (grads, x);
    let (nseq, t) = (seqs.nseq(), seqs.total());
    // dvec [hq, T] (f32): D[h, t] = dout·out of row (t, h), the softmax-backward correction term.
    let dvec = dev.zeros_f32(s.hq * t)?;
    api::attention_bwd::AttentionBwdRowdotBf16 {
        dvec: dvec.ptr(g)?,
        dout: dout.ptr(g)?,
        out: out.ptr(g)?,
        t: t as i32,
        hq: s.hq as i32,
        d: s.d as i32,
    }
    .launch(g, cfg_1d(t * s.hq, 256))?;

    let dq_acc = dev.zeros_f32(t * s.hq * s.d)?; // [T, hq, d] f32, summed by atomics
    let tiles = seqs.max_len.div_ceil(TILE) as u32;
    let cfg = LaunchConfig {
        // Causal: (kv heads, sequences, key tiles): blocks start in linear order, so every key tile
        // 0 (the longest walk) starts first. Non-causal (equal blocks): (key tiles, kv heads,
        // sequences), neighbouring blocks read the same Q/dO from L2 (PERF-attention.md, round 4).
        grid_dim: if s.causal { (s.hkv as u32, nseq as u32, tiles) } else { (tiles, s.hkv as u32, nseq as u32) },
        block_dim: (128, 1, 1),
        shared_mem_bytes: kvhead_smem(s.d),
    };
    api::attention_bwd::AttentionBwdKvheadBf16 {
        dq_acc: dq_acc.ptr(g)?,
        dk: dk.ptr(g)?,
        dv: dv.ptr(g)?,
        q: q.ptr(g)?,
        k: k.ptr(g)?,
        v: v.ptr(g)?,
        dout: dout.ptr(g)?,
        lse: lse.ptr(g)?,
        dvec: dvec.ptr(g)?,
        cu: seqs.buf.ptr(g)?,
        t: t as i32,
        hq: s.hq as i32,
        hkv: s.hkv as i32,
        scale: s.scale,
        sl2: s.scale * std::f32::consts::LOG2_E,
        causal: s.causal as i32,
    }
    .launch(g, s.d as u32, cfg)?;

    // dq [T, hq, d] (bf16, =) = dq_acc rounded; d is a multiple of 8.
    let n8 = t * s.hq * s.d / 8;
    api::attention_bwd::AttentionBwdDqRoundBf16 { dq: dq.ptr(g)?, dq_acc: dq_acc.ptr(g)?, n8: n8 as i64 }
        .launch(g, cfg_1d(n8, 256))
}

#[cfg(test)]
mod tests {
    /// The launchers' shared-memory sizes are the kernels' (computed by hand).
    #[test]
    fn smem_matches_kernel() {
        assert_eq!(super::kvhead_smem(128), 105_984);
        assert_eq!(super::kvhead_smem(80), 75_264);
        assert_eq!(super::kvhead_smem(64), 65_024);
    }
}

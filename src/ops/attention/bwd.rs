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
    aligned16, cfg_warps, check, check_dtype, check_grid, check_packed, check_tc, cpu, simple_dims, AttnBwdKernel,
    AttnShape, Varlen, TILE,
};
use crate::cuda::{cfg_1d, Arg, Gpu};
use crate::ops::{kname, same_float_dtype};
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
#[allow(clippy::too_many_arguments)]
pub fn bwd_with(
    dev: &Device, dq: &mut Buf, dk: &mut Buf, dv: &mut Buf, dout: &Buf, q: &Buf, k: &Buf, v: &Buf, out: &Buf,
    lse: &Buf, seqs: &Varlen, s: &AttnShape, kernel: AttnBwdKernel,
) -> Result<()> {
    let op = "attention_bwd";
    let t = check_packed(op, q, k, v, seqs, s)?;
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
            let (q, k, v, o, l, d_o) = (q.host()?, k.host()?, v.host()?, out.host()?, lse.host()?, dout.host()?);
            cpu::bwd(dq.host_mut()?, dk.host_mut()?, dv.host_mut()?, d_o, q, k, v, o, l, &seqs.host, s);
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
                return bwd_kvhead(dev, g, dq, dk, dv, dout, q, k, v, out, lse, seqs, s, t);
            }
            let nseq = seqs.nseq();
            // D[h, t] = dout·out per row, the softmax-backward correction term.
            let dvec = dev.zeros_f32(s.hq * t)?;
            let args = [
                Arg::Ptr(dvec.ptr(g)?),
                Arg::Ptr(dout.ptr(g)?),
                Arg::Ptr(out.ptr(g)?),
                Arg::I32(t as i32),
                Arg::I32(s.hq as i32),
                Arg::I32(s.d as i32),
            ];
            g.launch("attention_simple", &kname("attention_bwd_dot", dt), cfg_warps(t * s.hq), &args)?;
            let inputs = [
                Arg::Ptr(q.ptr(g)?),
                Arg::Ptr(k.ptr(g)?),
                Arg::Ptr(v.ptr(g)?),
                Arg::Ptr(dout.ptr(g)?),
                Arg::Ptr(lse.ptr(g)?),
                Arg::Ptr(dvec.ptr(g)?),
                Arg::Ptr(seqs.buf.ptr(g)?),
            ];
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
                let mut args = vec![Arg::Ptr(dq_acc.ptr(g)?), Arg::Ptr(dk_dst), Arg::Ptr(dv_dst)];
                args.extend(inputs);
                args.extend([
                    Arg::I32(t as i32),
                    Arg::I32(s.hq as i32),
                    Arg::I32(s.hkv as i32),
                    Arg::F32(s.scale),
                    Arg::F32(s.scale * std::f32::consts::LOG2_E),
                    Arg::I32(s.causal as i32),
                ]);
                let cfg = LaunchConfig {
                    grid_dim: (seqs.max_len.div_ceil(TILE) as u32, s.hq as u32, nseq as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: qhead_smem(s.d),
                };
                g.launch("attention_bwd", &format!("attention_bwd_qhead_bf16_d{}", s.d), cfg, &args)?;
                let (pk, pv) = match &parts {
                    Some((a, b)) => (a.ptr(g)?, b.ptr(g)?),
                    None => (0, 0),
                };
                let args = [
                    Arg::Ptr(dq.ptr(g)?),
                    Arg::Ptr(dk.ptr(g)?),
                    Arg::Ptr(dv.ptr(g)?),
                    Arg::Ptr(dq_acc.ptr(g)?),
                    Arg::Ptr(pk),
                    Arg::Ptr(pv),
                    Arg::I32(t as i32),
                    Arg::I32(s.hq as i32),
                    Arg::I32(s.hkv as i32),
                    Arg::I32(s.d as i32),
                    Arg::I32(parts.is_some() as i32),
                ];
                g.launch("attention_bwd", "attention_bwd_finish_bf16", cfg_1d(t * s.hq * s.d, 256), &args)
            } else {
                let mut args = vec![Arg::Ptr(dq.ptr(g)?)];
                args.extend(inputs);
                args.extend(simple_dims(nseq, t, s));
                g.launch("attention_simple", &kname("attention_simple_bwd_dq", dt), cfg_warps(t * s.hq), &args)?;
                let mut args = vec![Arg::Ptr(dk.ptr(g)?), Arg::Ptr(dv.ptr(g)?)];
                args.extend(inputs);
                args.extend(simple_dims(nseq, t, s));
                g.launch("attention_simple", &kname("attention_simple_bwd_dkv", dt), cfg_warps(t * s.hkv), &args)
            }
        }
    }
}

/// dq (=), dk (=), dv (=), all bf16, from dout, q, k, v, out (bf16) and the forward's lse [hq, T].
/// The caller (`bwd_with`) has checked the buffer sizes and dtypes, d ∈ {64, 80, 128}, 16-byte
/// alignment of every bf16 buffer (out included), T > 0, T·hq·d < 2^31 and the grid limits
/// (sequences, heads and 64-token tiles ≤ 65535).
#[allow(clippy::too_many_arguments)]
fn bwd_kvhead(
    dev: &Device, g: &Gpu, dq: &mut Buf, dk: &mut Buf, dv: &mut Buf, dout: &Buf, q: &Buf, k: &Buf, v: &Buf, out: &Buf,
    lse: &Buf, seqs: &Varlen, s: &AttnShape, t: usize,
) -> Result<()> {
    let nseq = seqs.nseq();
    // dvec [hq, T] (f32): D[h, t] = dout·out of row (t, h), the softmax-backward correction term.
    let dvec = dev.zeros_f32(s.hq * t)?;
    let args = [
        Arg::Ptr(dvec.ptr(g)?),
        Arg::Ptr(dout.ptr(g)?),
        Arg::Ptr(out.ptr(g)?),
        Arg::I32(t as i32),
        Arg::I32(s.hq as i32),
        Arg::I32(s.d as i32),
    ];
    g.launch("attention_bwd", "attention_bwd_rowdot_bf16", cfg_1d(t * s.hq, 256), &args)?;

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
        // sequences), neighbouring blocks read the same Q/dO from L2 (PERF-attention.md, round 4).
        grid_dim: if s.causal { (s.hkv as u32, nseq as u32, tiles) } else { (tiles, s.hkv as u32, nseq as u32) },
        block_dim: (128, 1, 1),
        shared_mem_bytes: kvhead_smem(s.d),
    };
    g.launch("attention_bwd", &format!("attention_bwd_kvhead_bf16_d{}", s.d), cfg, &args)?;

    // dq [T, hq, d] (bf16, =) = dq_acc rounded; d is a multiple of 8.
    let n8 = t * s.hq * s.d / 8;
    let args = [Arg::Ptr(dq.ptr(g)?), Arg::Ptr(dq_acc.ptr(g)?), Arg::I64(n8 as i64)];
    g.launch("attention_bwd", "attention_bwd_dq_round_bf16", cfg_1d(n8, 256), &args)
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

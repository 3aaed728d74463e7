//! Bench suite "attention": the fused attention kernels at the shapes, bf16.
//! - Training: causal GQA 28/4 heads, d 128, sequences of 4096 (Qwen2.5-VL-7B's LLM), forward,
//!   backward and both; FLOPs are 4·S²·d·hq per sequence forward, halved when causal, and 2.5×
//!   that for backward (the convention of the FlashAttention papers and torch benchmarks).
//! - Vision windows: 64 windows of 64 tokens, 16 heads, d 80, non-causal (the Qwen2.5-VL tower).
//! - Decode: one new token (and a user turn of 16) per sequence against a long KV cache, GQA 28/4,
//!   d 128; bytes are the KV cache read once plus q and out, against 4.2 TB/s.
//!
//! Each row checks a slice against the CPU reference: the first 64 tokens of sequence 0 for the
//! causal forward (out) and backward (dq) — exact, since causal rows see only earlier tokens —,
//! all of sequence 0 for the non-causal forwards (the first window), and sequence 0 of the
//! decode batch. Full runs add non-causal d64 (577 tokens) and d80 (576) multi-tile forwards.
//!
//! Kernel variants: every row runs `Variant::V1` (the verified kernels); where V2 applies
//! (every forward; decode with n_new · group ≤ 16) a "v2" row follows, timed in the same run
//! and checked the same way; the training cases also get "fwd v3" and "fwd+bwd v3fwd" rows (the
//! V3 forward alone, and followed by V2's backward, as in run 3 of round 4), and "bwd v3" and "fwd+bwd v3"
//! rows (the V3 backward, and the V3 forward followed by it), and "bwd v4" and "fwd+bwd v4" rows
//! (the V4 backward, and V4 = the V3 forward followed by the V4 backward).

use super::{time_gpu, BenchRow};
use crate::ops::attention::{self, cpu, AttnShape, KvCache, Variant, Varlen};
use crate::rng::Rng;
use crate::tensor::{DType, Device};
use anyhow::Result;

const BF: f64 = 2.0; // bytes per bf16
const F4: f64 = 4.0; // bytes per f32

pub fn run(dev: &Device, quick: bool) -> Result<Vec<BenchRow>> {
    let Device::Cuda(g) = dev else { return Ok(Vec::new()) };
    let it = if quick { (1, 3) } else { (3, 10) };
    let mut rows = Vec::new();
    let (nseq, len) = if quick { (2, 1024) } else { (4, 4096) };
    let note = "SDPA flash: fwd 242, fwd+bwd 227; cuDNN 450/415 TFLOP/s";
    rows.extend(train_case(dev, g, it, nseq, len, AttnShape::new(28, 4, 128, true), note)?);
    let note = "SDPA flash fwd 25 TFLOP/s; goal >= 100";
    rows.extend(train_case(dev, g, it, 64, 64, AttnShape::new(16, 16, 80, false), note)?);
    if !quick {
        // Longer non-causal d64/d80 sequences (multi-tile forwards, where V3 replaces V2's
        // 128-row kernel): the CLIP-L/336 tower of LLaVA-NeXT (577 tokens per crop) and
        // full-attention layers of the Qwen2.5-VL tower (one image's 576 patches).
        rows.extend(train_case(
            dev,
            g,
            it,
            32,
            577,
            AttnShape::new(16, 16, 64, false),
            "d64/d80 V3 vs V2 (no external reference)",
        )?);
        rows.extend(train_case(
            dev,
            g,
            it,
            16,
            576,
            AttnShape::new(16, 16, 80, false),
            "d64/d80 V3 vs V2 (no external reference)",
        )?);
    }
    let cases: &[(usize, usize, usize)] =
        if quick { &[(4, 4096, 1)] } else { &[(16, 8192, 1), (4, 32768, 1), (16, 8192, 16)] };
    for &(b, l, n_new) in cases {
        rows.extend(decode_case(dev, g, it, b, l, n_new, AttnShape::new(28, 4, 128, true))?);
    }
    Ok(rows)
}

/// Forward, backward and forward+backward over `nseq` packed sequences of `len` tokens.
#[allow(clippy::too_many_arguments)]
fn train_case(
    dev: &Device, g: &crate::cuda::Gpu, (warm, iters): (usize, usize), nseq: usize, len: usize, s: AttnShape,
    note: &str,
) -> Result<Vec<BenchRow>> {
    let t = nseq * len;
    let (nq, nkv) = (t * s.hq * s.d, t * s.hkv * s.d);
    let mut rng = Rng::new(0xa77e);
    let q = bf16_round(&rng.normal_vec(nq, 1.0));
    let k = bf16_round(&rng.normal_vec(nkv, 1.0));
    let v = bf16_round(&rng.normal_vec(nkv, 1.0));
    let dout = bf16_round(&rng.normal_vec(nq, 1.0));
    let bf = DType::BF16;
    let (qb, kb, vb, dob) = (dev.upload(&q, bf)?, dev.upload(&k, bf)?, dev.upload(&v, bf)?, dev.upload(&dout, bf)?);
    let seqs = Varlen::uniform(dev, nseq, len)?;
    let mut out = dev.zeros(bf, nq)?;
    let mut lse = dev.zeros_f32(s.hq * t)?;
    let (mut dq, mut dk, mut dv) = (dev.zeros(bf, nq)?, dev.zeros(bf, nkv)?, dev.zeros(bf, nkv)?);

    let v1 = Variant::V1;
    let fwd_ms =
        time_gpu(g, warm, iters, &mut || attention::fwd_with(dev, &mut out, &mut lse, &qb, &kb, &vb, &seqs, &s, v1))?;
    let bwd_ms = time_gpu(g, warm, iters, &mut || {
        attention::bwd_with(dev, &mut dq, &mut dk, &mut dv, &dob, &qb, &kb, &vb, &out, &lse, &seqs, &s, v1)
    })?;
    let both_ms = time_gpu(g, warm, iters, &mut || {
        attention::fwd_with(dev, &mut out, &mut lse, &qb, &kb, &vb, &seqs, &s, v1)?;
        attention::bwd_with(dev, &mut dq, &mut dk, &mut dv, &dob, &qb, &kb, &vb, &out, &lse, &seqs, &s, v1)
    })?;

    // CPU check on the first min(64, len) tokens of sequence 0 (causal: they see only each
    // other); non-causal: all of sequence 0 (every row sees every key).
    let c = if s.causal { len.min(64) } else { len };
    let cs = [0, c as i32];
    let (cq, ckv) = (c * s.hq * s.d, c * s.hkv * s.d);
    let (mut o_ref, mut l_ref) = (vec![0f32; cq], vec![0f32; s.hq * c]);
    cpu::fwd(&mut o_ref, &mut l_ref, &q[..cq], &k[..ckv], &v[..ckv], &cs, &s);
    let out_err = rel_err(&dev.to_vec(&out)?[..cq], &o_ref);
    let mut dq_err = None;
    let mut dq_ref = None;
    if s.causal {
        let (mut dqr, mut dk_ref, mut dv_ref) = (vec![0f32; cq], vec![0f32; ckv], vec![0f32; ckv]);
        cpu::bwd(
            &mut dqr,
            &mut dk_ref,
            &mut dv_ref,
            &dout[..cq],
            &q[..cq],
            &k[..ckv],
            &v[..ckv],
            &o_ref,
            &l_ref,
            &cs,
            &s,
        );
        dq_err = Some(rel_err(&dev.to_vec(&dq)?[..cq], &dqr));
        dq_ref = Some(dqr);
    }

    // V2 (the forward: 128-row tiles, or the window kernel at len ≤ 64; the backward: the GQA
    // group inside the block, V1's kernel without GQA): forward, backward, both, same checks.
    let v2 = {
        let v = Variant::V2;
        let fwd2 = time_gpu(g, warm, iters, &mut || {
            attention::fwd_with(dev, &mut out, &mut lse, &qb, &kb, &vb, &seqs, &s, v)
        })?;
        let err2 = rel_err(&dev.to_vec(&out)?[..cq], &o_ref);
        let bwd2 = time_gpu(g, warm, iters, &mut || {
            attention::bwd_with(dev, &mut dq, &mut dk, &mut dv, &dob, &qb, &kb, &vb, &out, &lse, &seqs, &s, v)
        })?;
        let both2 = time_gpu(g, warm, iters, &mut || {
            attention::fwd_with(dev, &mut out, &mut lse, &qb, &kb, &vb, &seqs, &s, v)?;
            attention::bwd_with(dev, &mut dq, &mut dk, &mut dv, &dob, &qb, &kb, &vb, &out, &lse, &seqs, &s, v)
        })?;
        let dq_err2 = match &dq_ref {
            Some(r) => Some(rel_err(&dev.to_vec(&dq)?[..cq], r)),
            None => None,
        };
        (fwd2, err2, bwd2, both2, dq_err2)
    };

    // V3 forward (kernels/attention_v3.cu: 128-row tiles of 4 warps × 32 rows; V2's window
    // kernel at len ≤ 64): alone, and followed by the default backward. Same out and dq checks.
    let v3f = {
        let (v, vb_default) = (Variant::V3, Variant::V2);
        let fwd3 = time_gpu(g, warm, iters, &mut || {
            attention::fwd_with(dev, &mut out, &mut lse, &qb, &kb, &vb, &seqs, &s, v)
        })?;
        let err3 = rel_err(&dev.to_vec(&out)?[..cq], &o_ref);
        let both3 = time_gpu(g, warm, iters, &mut || {
            attention::fwd_with(dev, &mut out, &mut lse, &qb, &kb, &vb, &seqs, &s, v)?;
            attention::bwd_with(dev, &mut dq, &mut dk, &mut dv, &dob, &qb, &kb, &vb, &out, &lse, &seqs, &s, vb_default)
        })?;
        let dq_err3 = match &dq_ref {
            Some(r) => Some(rel_err(&dev.to_vec(&dq)?[..cq], r)),
            None => None,
        };
        (fwd3, err3, both3, dq_err3)
    };

    // V3 backward (kernels/attention_v3_bwd.cu: 128-key blocks of 8 warps walking the GQA group;
    // V1's kernel for windows ≤ 64 tokens), timed on the out/lse left by the runs above, then
    // after the V3 forward (the newest forward; V2's window kernel at len ≤ 64). Same dq check.
    let v3 = {
        let v = Variant::V3;
        let bwd3 = time_gpu(g, warm, iters, &mut || {
            attention::bwd_with(dev, &mut dq, &mut dk, &mut dv, &dob, &qb, &kb, &vb, &out, &lse, &seqs, &s, v)
        })?;
        let both3 = time_gpu(g, warm, iters, &mut || {
            attention::fwd_with(dev, &mut out, &mut lse, &qb, &kb, &vb, &seqs, &s, v)?;
            attention::bwd_with(dev, &mut dq, &mut dk, &mut dv, &dob, &qb, &kb, &vb, &out, &lse, &seqs, &s, v)
        })?;
        let dq_err3 = match &dq_ref {
            Some(r) => Some(rel_err(&dev.to_vec(&dq)?[..cq], r)),
            None => None,
        };
        (bwd3, both3, dq_err3)
    };

    // V4 backward (kernels/attention_v4_bwd.cu: V2's 64-key blocks walking the GQA group with
    // 2 × 2 warp tiles, P/dS through shared memory), timed on the out/lse left by the runs above,
    // then after its forward (= V3's; V2's window kernel at len ≤ 64). Same dq check.
    let v4 = {
        let v = Variant::V4;
        let bwd4 = time_gpu(g, warm, iters, &mut || {
            attention::bwd_with(dev, &mut dq, &mut dk, &mut dv, &dob, &qb, &kb, &vb, &out, &lse, &seqs, &s, v)
        })?;
        let both4 = time_gpu(g, warm, iters, &mut || {
            attention::fwd_with(dev, &mut out, &mut lse, &qb, &kb, &vb, &seqs, &s, v)?;
            attention::bwd_with(dev, &mut dq, &mut dk, &mut dv, &dob, &qb, &kb, &vb, &out, &lse, &seqs, &s, v)
        })?;
        let dq_err4 = match &dq_ref {
            Some(r) => Some(rel_err(&dev.to_vec(&dq)?[..cq], r)),
            None => None,
        };
        (bwd4, both4, dq_err4)
    };

    let fl = nseq as f64 * 4.0 * (len * len) as f64 * (s.d * s.hq) as f64 * if s.causal { 0.5 } else { 1.0 };
    let (tq, tkv) = ((t * s.hq * s.d) as f64 * BF, (t * s.hkv * s.d) as f64 * BF); // one q-like / kv-like tensor
    let lse_b = (s.hq * t) as f64 * F4;
    let kind = if s.causal { "causal" } else { "non-causal" };
    let shape = format!("{nseq}x{len} {kind} h{}/{} d{}", s.hq, s.hkv, s.d);
    let row = |op: &str, ms: f64, bytes: f64, flops: f64, err: Option<f64>| BenchRow {
        op: op.into(),
        shape: shape.clone(),
        ms,
        bytes,
        flops,
        rel_err: err,
        note: note.into(),
    };
    let mut rows = vec![
        row("attention_fwd", fwd_ms, 2.0 * tq + 2.0 * tkv + lse_b, fl, Some(out_err)),
        row("attention_bwd", bwd_ms, 4.0 * tq + 4.0 * tkv + 2.0 * lse_b, 2.5 * fl, dq_err),
        row("attention_fwd+bwd", both_ms, 5.0 * tq + 4.0 * tkv + lse_b, 3.5 * fl, dq_err),
    ];
    let (fwd2, err2, bwd2, both2, dq_err2) = v2;
    rows.push(row("attention_fwd v2", fwd2, 2.0 * tq + 2.0 * tkv + lse_b, fl, Some(err2)));
    rows.push(row("attention_bwd v2", bwd2, 4.0 * tq + 4.0 * tkv + 2.0 * lse_b, 2.5 * fl, dq_err2));
    rows.push(row("attention_fwd+bwd v2", both2, 5.0 * tq + 4.0 * tkv + lse_b, 3.5 * fl, dq_err2));
    let (fwd3, err3, both3f, dq_err3f) = v3f;
    rows.push(row("attention_fwd v3", fwd3, 2.0 * tq + 2.0 * tkv + lse_b, fl, Some(err3)));
    rows.push(row("attention_fwd+bwd v3fwd", both3f, 5.0 * tq + 4.0 * tkv + lse_b, 3.5 * fl, dq_err3f));
    let (bwd3, both3, dq_err3) = v3;
    rows.push(row("attention_bwd v3", bwd3, 4.0 * tq + 4.0 * tkv + 2.0 * lse_b, 2.5 * fl, dq_err3));
    rows.push(row("attention_fwd+bwd v3", both3, 5.0 * tq + 4.0 * tkv + lse_b, 3.5 * fl, dq_err3));
    let (bwd4, both4, dq_err4) = v4;
    rows.push(row("attention_bwd v4", bwd4, 4.0 * tq + 4.0 * tkv + 2.0 * lse_b, 2.5 * fl, dq_err4));
    rows.push(row("attention_fwd+bwd v4", both4, 5.0 * tq + 4.0 * tkv + lse_b, 3.5 * fl, dq_err4));
    Ok(rows)
}

/// Decode of n_new tokens per sequence against caches of `len` tokens (the new ones included),
/// V1 and then V2 (a V2 row only where its kernel applies: n_new · group ≤ 16).
#[allow(clippy::too_many_arguments)]
fn decode_case(
    dev: &Device, g: &crate::cuda::Gpu, (warm, iters): (usize, usize), b: usize, len: usize, n_new: usize, s: AttnShape,
) -> Result<Vec<BenchRow>> {
    let row = s.hkv * s.d;
    let mut rng = Rng::new(0xdec0);
    // Cache contents: a 1 Mi-element random block tiled over the cache (values do not change the speed).
    let block = bf16_round(&rng.normal_vec(1 << 20, 1.0));
    let tile = |n: usize, off: usize| -> Vec<f32> { (0..n).map(|i| block[(i + off) % block.len()]).collect() };
    let kc = tile(b * len * row, 0);
    let vc = tile(b * len * row, 7919);
    let q = bf16_round(&rng.normal_vec(b * n_new * s.hq * s.d, 1.0));
    let mut cache = KvCache::new(dev, b, len, s.hkv, s.d)?;
    let seqs = Varlen::uniform(dev, b, len)?;
    cache.append_varlen(dev, &dev.upload(&kc, DType::BF16)?, &dev.upload(&vc, DType::BF16)?, &seqs)?;
    let qb = dev.upload(&q, DType::BF16)?;
    let per = n_new * s.hq * s.d;
    let mut o_ref = vec![0f32; per];
    cpu::decode(&mut o_ref, &q[..per], &kc[..len * row], &vc[..len * row], &[len as i32], len, n_new, &s);
    let kv_bytes = (2 * b * len * row) as f64 * BF;
    let qo_bytes = 2.0 * q.len() as f64 * BF;
    let flops = 4.0 * (b * n_new * len * s.hq * s.d) as f64;

    let mut variants = vec![(Variant::V1, "attention_decode")];
    if n_new * (s.hq / s.hkv) <= 16 {
        variants.push((Variant::V2, "attention_decode v2"));
    }
    let mut rows = Vec::new();
    for (v, name) in variants {
        let mut out = dev.zeros(DType::BF16, q.len())?;
        let ms = time_gpu(g, warm, iters, &mut || attention::decode_with(dev, &mut out, &qb, &cache, n_new, &s, v))?;
        // CPU check of sequence 0.
        let err = rel_err(&dev.to_vec(&out)?[..per], &o_ref);
        rows.push(BenchRow {
            op: name.into(),
            shape: format!("b{b} cache {len} new {n_new} h{}/{} d{}", s.hq, s.hkv, s.d),
            ms,
            bytes: kv_bytes + qo_bytes,
            flops,
            rel_err: Some(err),
            note: "GB/s = KV cache read once; goal >= 70% of 4.2 TB/s".into(),
        });
    }
    Ok(rows)
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// ‖a − b‖ / ‖b‖; infinite when a holds a non-finite value.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() {
            return f64::INFINITY;
        }
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    num.sqrt() / den.sqrt().max(1e-30)
}

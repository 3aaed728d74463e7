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
//! Kernels: the forward rows run each live forward kernel (`AttnFwdKernel::Q64`, `Q128`), the
//! backward rows each live backward (`AttnBwdKernel::QHead`, `KvHead`, on the out/lse of the
//! planned forward), and the fwd+bwd row the planned pair (`plan_fwd` / `plan_bwd`, named in the
//! note); decode runs `Rows64` and, where it applies (n_new · group ≤ 16), `Rows16`. Every row
//! gets the same CPU check.

use super::{time_gpu, BenchRow};
use crate::check::rel_err;
use crate::ops::attention::{
    self, cpu, AttnBwdKernel, AttnDecodeKernel, AttnFwdKernel, AttnShape, FwdOut, FwdSaved, KvCache, Qkv, QkvGrads,
    Varlen,
};
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

    let pf = attention::plan_fwd(DType::BF16, s.d, len, true);
    let pb = attention::plan_bwd(DType::BF16, s.d, len, true);
    let x = Qkv { q: &qb, k: &kb, v: &vb };
    let both_ms = time_gpu(g, warm, iters, &mut || {
        attention::fwd_with(dev, FwdOut { out: &mut out, lse: &mut lse }, x, &seqs, &s, pf)?;
        let saved = FwdSaved { q: &qb, k: &kb, v: &vb, out: &out, lse: &lse };
        attention::bwd_with(dev, QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv }, &dob, saved, &seqs, &s, pb)
    })?;

    // CPU check on the first min(64, len) tokens of sequence 0 (causal: they see only each
    // other); non-causal: all of sequence 0 (every row sees every key).
    let c = if s.causal { len.min(64) } else { len };
    let cs = [0, c as i32];
    let (cq, ckv) = (c * s.hq * s.d, c * s.hkv * s.d);
    let (mut o_ref, mut l_ref) = (vec![0f32; cq], vec![0f32; s.hq * c]);
    let xc = Qkv { q: &q[..cq], k: &k[..ckv], v: &v[..ckv] };
    cpu::fwd(FwdOut { out: &mut o_ref, lse: &mut l_ref }, xc, &cs, &s);
    let mut dq_err = None;
    let mut dq_ref = None;
    if s.causal {
        let (mut dqr, mut dk_ref, mut dv_ref) = (vec![0f32; cq], vec![0f32; ckv], vec![0f32; ckv]);
        let grads = QkvGrads { dq: &mut dqr[..], dk: &mut dk_ref[..], dv: &mut dv_ref[..] };
        let saved = FwdSaved { q: xc.q, k: xc.k, v: xc.v, out: &o_ref, lse: &l_ref };
        cpu::bwd(grads, &dout[..cq], saved, &cs, &s);
        dq_err = Some(rel_err(&dev.to_vec(&dq)?[..cq], &dqr));
        dq_ref = Some(dqr);
    }

    let dq_err_now = |dq: &crate::tensor::Buf| -> Result<Option<f64>> {
        Ok(match &dq_ref {
            Some(r) => Some(rel_err(&dev.to_vec(dq)?[..cq], r)),
            None => None,
        })
    };
    let mut fwd_rows = Vec::new();
    for kernel in [AttnFwdKernel::Q64, AttnFwdKernel::Q128] {
        let ms = time_gpu(g, warm, iters, &mut || {
            attention::fwd_with(dev, FwdOut { out: &mut out, lse: &mut lse }, x, &seqs, &s, kernel)
        })?;
        fwd_rows.push((kernel, ms, rel_err(&dev.to_vec(&out)?[..cq], &o_ref)));
    }
    // The backward rows read the planned forward's out and lse.
    attention::fwd_with(dev, FwdOut { out: &mut out, lse: &mut lse }, x, &seqs, &s, pf)?;
    let mut bwd_rows = Vec::new();
    let saved = FwdSaved { q: &qb, k: &kb, v: &vb, out: &out, lse: &lse };
    for kernel in [AttnBwdKernel::QHead, AttnBwdKernel::KvHead] {
        let ms = time_gpu(g, warm, iters, &mut || {
            attention::bwd_with(dev, QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv }, &dob, saved, &seqs, &s, kernel)
        })?;
        bwd_rows.push((kernel, ms, dq_err_now(&dq)?));
    }

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
    let mut rows = Vec::new();
    for (kernel, ms, err) in fwd_rows {
        let op = format!("attention_fwd {}", format!("{kernel:?}").to_lowercase());
        rows.push(row(&op, ms, 2.0 * tq + 2.0 * tkv + lse_b, fl, Some(err)));
    }
    for (kernel, ms, err) in bwd_rows {
        let op = format!("attention_bwd {}", format!("{kernel:?}").to_lowercase());
        rows.push(row(&op, ms, 4.0 * tq + 4.0 * tkv + 2.0 * lse_b, 2.5 * fl, err));
    }
    let mut both = row("attention_fwd+bwd", both_ms, 5.0 * tq + 4.0 * tkv + lse_b, 3.5 * fl, dq_err);
    both.note = format!("{note}{}plan: {pf:?} + {pb:?}", if note.is_empty() { "" } else { "; " });
    rows.push(both);
    Ok(rows)
}

/// Decode of n_new tokens per sequence against caches of `len` tokens (the new ones included),
/// with Rows64 and then Rows16 (only where it applies: n_new · group ≤ 16).
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
    let host = cpu::HostCache { k: &kc[..len * row], v: &vc[..len * row], lens: &[len as i32], max_len: len };
    cpu::decode(&mut o_ref, &q[..per], host, n_new, &s);
    let kv_bytes = (2 * b * len * row) as f64 * BF;
    let qo_bytes = 2.0 * q.len() as f64 * BF;
    let flops = 4.0 * (b * n_new * len * s.hq * s.d) as f64;

    let mut variants = vec![(AttnDecodeKernel::Rows64, "attention_decode rows64")];
    if n_new * (s.hq / s.hkv) <= 16 {
        variants.push((AttnDecodeKernel::Rows16, "attention_decode rows16"));
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

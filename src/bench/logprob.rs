//! Bench suite "logprob": the grouped log-prob fused with the lm_head and the fused GRPO loss at
//! the size, T = 8,192 tokens (8 rollouts × 1,024), H = 3,584, V = 152,064, bf16.
//! FLOPs are 2·T·H·V per GEMM (8.93 TFLOP): 1 for the forward, 4 for forward + backward with
//! recompute, 3 for the fused GRPO loss. "extra" is the op's device scratch (everything it
//! allocates; its inputs and its outputs — logp, dhidden, the f32 dlm_head — are not counted).
//! A reference row times the three full-size cuBLAS GEMMs alone (what the PyTorch eager baseline
//! runs, with a [T, V] logits tensor), the practical floor on this machine.
//! Baselines on the H200 (from the issue): PyTorch eager log-prob fwd+bwd 52.8 ms / 15.0 GiB
//! extra; full GRPO loss 53.1 ms / 19.6 GiB; Liger fused 531 ms / 4.1 GiB. Floor for the GRPO
//! loss: 45 ms with ≤ 1 GiB extra; goal ≤ 1.15 × 34.8 ms (three GEMMs at 770 TFLOP/s) = 40 ms.

use super::{time_gpu, BenchRow};
use crate::cuda::blas::{Gemm, GemmType};
use crate::cuda::Gpu;
use crate::ops::grpo::{self, Aggregation, GrpoBatch, GrpoHyper};
use crate::ops::logprob::{self, Tuning};
use crate::rng::Rng;
use crate::tensor::{Buf, DType, Device};
use anyhow::Result;

const GIB: f64 = (1u64 << 30) as f64;

/// Pseudo-random bf16-representable values for large tensors: a pool of normals indexed by a
/// multiplicative hash, so the 545 M lm_head values take a second, not a minute.
fn fill(n: usize, scale: f64, seed: u64) -> Vec<f32> {
    const P: usize = 1_048_573; // prime: i · K mod P visits every pool slot
    let mut rng = Rng::new(seed);
    let pool: Vec<f32> = (0..P).map(|_| half::bf16::from_f64(rng.normal() * scale).to_f32()).collect();
    (0..n).map(|i| pool[(i.wrapping_mul(16_411) + i / P) % P]).collect()
}

pub fn run(dev: &Device, quick: bool) -> Result<Vec<BenchRow>> {
    let Device::Cuda(g) = dev else { return Ok(Vec::new()) };
    let it = if quick { (1, 3) } else { (2, 7) };
    let (nroll, len, h, v) = (8usize, 1024usize, 3584usize, 152_064usize);
    let t = nroll * len;
    let bf = DType::BF16;
    let gemm_flops = 2.0 * (t * h * v) as f64;
    let shape = format!("T={t} H={h} V={v} bf16");

    // Inputs: logits of spread ~3 (a peaked but not degenerate softmax).
    let x_host = fill(t * h, 1.0, 1);
    let w_host = fill(v * h, 3.0 / (h as f64).sqrt(), 2);
    let hidden = dev.upload(&x_host, bf)?;
    let lm_head = dev.upload(&w_host, bf)?;
    let mut rng = Rng::new(3);
    let tg_host: Vec<i32> = (0..t).map(|_| rng.below(v) as i32).collect();
    let targets = dev.upload_i32(&tg_host)?;
    let (mut logp, mut lse) = (dev.zeros_f32(t)?, dev.zeros_f32(t)?);
    let mut dhidden = dev.zeros(bf, t * h)?;
    let mut dw = dev.zeros_f32(v * h)?;
    let mut rows = Vec::new();
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;

    // 1. Forward only (reference policy, old policy).
    let tune = Tuning::default();
    let ms = time_gpu(g, it.0, it.1, &mut || logprob::fwd_with(dev, &tune, &mut logp, &mut lse, None, &hidden, &lm_head, &targets, None, t, h, v))?;
    let err = if quick { None } else { Some(check_logp(dev, &logp, &x_host, &w_host, &tg_host, h, v, &[0, 1, t - 1])?) };
    rows.push(BenchRow {
        op: "logprob fwd".into(),
        shape: shape.clone(),
        ms,
        bytes: (2 * (t * h + v * h) + 8 * t) as f64,
        flops: gemm_flops,
        rel_err: err,
        note: format!("1 GEMM floor {:.1} ms; extra {:.0} MiB", 1e3 * gemm_flops / super::BF16_FLOP_PER_S, mib(logprob::last_scratch_bytes())),
    });

    // 2. Forward + backward with recompute (4 GEMMs), from a generic dlogp.
    let dlogp = dev.upload(&rng.normal_vec(t, 1.0 / t as f64), DType::F32)?;
    let mut extra = 0usize;
    let ms = time_gpu(g, it.0, it.1, &mut || {
        logprob::fwd_with(dev, &tune, &mut logp, &mut lse, None, &hidden, &lm_head, &targets, None, t, h, v)?;
        let a = logprob::last_scratch_bytes();
        logprob::bwd_with(dev, &tune, &mut dhidden, &mut dw, &dlogp, &hidden, &lm_head, &targets, &lse, t, h, v)?;
        extra = a.max(logprob::last_scratch_bytes());
        Ok(())
    })?;
    rows.push(BenchRow {
        op: "logprob fwd+bwd (recompute)".into(),
        shape: shape.clone(),
        ms,
        bytes: (2 * (2 * t * h + v * h) + 8 * v * h + 12 * t) as f64,
        flops: 4.0 * gemm_flops,
        rel_err: None,
        note: format!("extra {:.0} MiB; PyTorch eager 52.8 ms / 15.0 GiB", mib(extra)),
    });

    // 3. The fused GRPO loss (3 GEMMs): old/ref log-probs near the policy's, per-rollout advantages.
    logprob::fwd(dev, &mut logp, &mut lse, None, &hidden, &lm_head, &targets, None, t, h, v)?;
    let lp = dev.to_vec(&logp)?;
    let old: Vec<f32> = lp.iter().map(|&x| x + (0.15 * rng.normal()) as f32).collect();
    let rf: Vec<f32> = lp.iter().map(|&x| x + (0.1 * rng.normal()) as f32).collect();
    let adv: Vec<f32> = (0..nroll).map(|_| rng.normal() as f32).collect();
    let (old_b, ref_b, adv_b) = (dev.upload(&old, DType::F32)?, dev.upload(&rf, DType::F32)?, dev.upload(&adv, DType::F32)?);
    let hp = GrpoHyper { lambda: 1.0, tau: 0.5, beta_help: 0.5, eps_low: 0.2, eps_high: 0.28, beta_kl: 0.04, adv_eps: 1e-4 };
    let ones = dev.upload(&vec![1.0; t], DType::F32)?;
    // Half of every rollout masked (a prompt-like prefix): the compaction skips it.
    let half: Vec<f32> = (0..t).map(|i| if i % len >= len / 2 { 1.0 } else { 0.0 }).collect();
    let half_b = dev.upload(&half, DType::F32)?;
    let floor_ms = 1e3 * 3.0 * gemm_flops / super::BF16_FLOP_PER_S;
    let mut cases: Vec<(String, Tuning, &Buf, f64)> = vec![("grpo fused fwd+bwd".into(), tune, &ones, 1.0), ("grpo fused, 50% masked".into(), tune, &half_b, 0.5)];
    if !quick {
        for (bytes, vc) in [(320usize << 20, 8192usize), (640 << 20, 4096), (640 << 20, 16_384), (900 << 20, 8192)] {
            let tn = Tuning { fused_bytes: bytes, fused_vocab: vc, ..tune };
            cases.push((format!("grpo fused {}M/{}", bytes >> 20, vc), tn, &ones, 1.0));
        }
    }
    for (name, tn, mask, frac) in cases {
        let batch = GrpoBatch { old_logp: &old_b, ref_logp: &ref_b, mask, adv: &adv_b, rows: nroll, l: len };
        let mut stats = Default::default();
        let ms = time_gpu(g, it.0, it.1, &mut || {
            stats = grpo::fused_loss_with(dev, &tn, &mut logp, &mut dhidden, &mut dw, &hidden, &lm_head, &targets, &batch, h, v, &hp, Aggregation::TokenMean)?;
            Ok(())
        })?;
        let extra = logprob::last_scratch_bytes();
        let err = if quick || frac < 1.0 || name != "grpo fused fwd+bwd" { None } else { Some(check_logp(dev, &logp, &x_host, &w_host, &tg_host, h, v, &[0, 4097])?) };
        rows.push(BenchRow {
            op: name,
            shape: shape.clone(),
            ms,
            bytes: (2 * (2 * t * h + v * h) + 8 * v * h + 20 * t) as f64,
            flops: 3.0 * gemm_flops * frac,
            rel_err: err,
            note: format!(
                "extra {:.0} MiB ({:.2} GiB); {:.2}x 3-GEMM floor {floor_ms:.1} ms; issue floor 45 ms/1 GiB; loss {:.4} clip {:.3} kl {:.2e}",
                mib(extra),
                extra as f64 / GIB,
                ms / (floor_ms * frac),
                stats.loss,
                stats.clip_frac,
                stats.mean_kl
            ),
        });
    }

    // Reference: the three full-size GEMMs alone (cuBLAS, bf16 in, [T, V] bf16 logits).
    rows.push(gemm_reference(dev, g, it, &hidden, &lm_head, &mut dhidden, &mut dw, t, h, v, gemm_flops, &shape)?);
    Ok(rows)
}

/// Relative error of logp at the given tokens against an f64 computation on the host.
#[allow(clippy::too_many_arguments)]
fn check_logp(dev: &Device, logp: &Buf, x: &[f32], w: &[f32], tg: &[i32], h: usize, v: usize, toks: &[usize]) -> Result<f64> {
    let got = dev.to_vec(logp)?;
    let (mut num, mut den) = (0f64, 0f64);
    for &i in toks {
        let xi = &x[i * h..(i + 1) * h];
        let logits: Vec<f64> = (0..v).map(|j| xi.iter().zip(&w[j * h..(j + 1) * h]).map(|(&a, &b)| a as f64 * b as f64).sum()).collect();
        let m = logits.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
        let want = logits[tg[i] as usize] - lse;
        if !got[i].is_finite() {
            return Ok(f64::INFINITY);
        }
        num += (got[i] as f64 - want).powi(2);
        den += want * want;
    }
    Ok(num.sqrt() / den.sqrt().max(1e-300))
}

/// logits [T, V] = hidden · Wᵀ (bf16 out), dhidden = logits · W, dW += logitsᵀ · hidden (f32).
#[allow(clippy::too_many_arguments)]
fn gemm_reference(dev: &Device, g: &Gpu, it: (usize, usize), hidden: &Buf, w: &Buf, dh: &mut Buf, dw: &mut Buf, t: usize, h: usize, v: usize, gemm_flops: f64, shape: &str) -> Result<BenchRow> {
    let logits = dev.zeros(DType::BF16, t * v)?;
    let (x, wp, l, dhp, dwp) = (hidden.ptr(g)?, w.ptr(g)?, logits.ptr(g)?, dh.ptr(g)?, dw.ptr(g)?);
    let gm = |m, n, k, ta, tb, a, b, c, beta, c_type| Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha: 1.0, beta, a, b, c, ab_type: GemmType::Bf16, c_type, batch: (1, 0, 0, 0) };
    let calls = [
        gm(t, v, h, false, true, x, wp, l, 0.0, GemmType::Bf16),
        gm(t, h, v, false, false, l, wp, dhp, 0.0, GemmType::Bf16),
        gm(v, h, t, true, false, l, x, dwp, 1.0, GemmType::F32),
    ];
    let ms = time_gpu(g, it.0, it.1, &mut || calls.iter().try_for_each(|c| g.blas.gemm(c)))?;
    let each: Vec<String> = calls
        .iter()
        .map(|c| time_gpu(g, 1, 3, &mut || g.blas.gemm(c)).map(|m| format!("{m:.1}")))
        .collect::<Result<_>>()?;
    Ok(BenchRow {
        op: "cuBLAS 3 GEMMs (reference)".into(),
        shape: shape.into(),
        ms,
        bytes: 0.0,
        flops: 3.0 * gemm_flops,
        rel_err: None,
        note: format!("logits/dhidden/dW {} ms; holds [T,V] logits: {:.2} GiB", each.join("/"), (2 * t * v) as f64 / GIB),
    })
}

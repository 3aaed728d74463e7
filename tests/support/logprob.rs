//! The log-prob tests' shared part: the random problem (hidden, lm_head, targets, mask, dlogp),
//! the naive f64 references (exact and with bf16-rounded logits), the dlm_head start for the +=
//! check, bit comparison, and the Bf16 tunings whose `fwd` must reproduce the fused pass.
#![allow(dead_code)]

use super::common::*;
use am3safety::ops::logprob::{self, cpu, LogitPrecision, Tuning};
use am3safety::tensor::DType;

/// A random problem: hidden [t, h], w [v, h] (logits of spread ~`scale`), targets, mask, dlogp.
pub struct Problem {
    pub t: usize,
    pub h: usize,
    pub v: usize,
    pub x: Vec<f32>,
    pub w: Vec<f32>,
    pub tg: Vec<i32>,
    pub mask: Vec<f32>,
    pub g: Vec<f32>,
}

/// Logit spread: peaked for real vocabularies, mild for tiny ones, where a confident correct
/// prediction (p ≈ 1) would make 1 − p, and so every gradient, a cancellation that f32 cannot
/// resolve to 1e-5 relative.
pub fn logit_scale(v: usize) -> f64 {
    if v < 64 {
        1.0
    } else {
        4.0
    }
}

pub fn problem(rng: &mut Rng, t: usize, h: usize, v: usize, scale: f64) -> Problem {
    let x = rng.normal_vec(t * h, 1.0);
    let w = rng.normal_vec(v * h, scale / (h as f64).sqrt());
    let tg = (0..t).map(|_| rng.below(v) as i32).collect();
    // Mask about a third of the tokens, never all of them (unless t = 1).
    let mask = (0..t).map(|i| if i == 0 || rng.uniform() > 0.35 { 1.0 } else { 0.0 }).collect();
    let g = (0..t).map(|i| if i % 5 == 3 { 0.0 } else { rng.normal() as f32 }).collect();
    Problem { t, h, v, x, w, tg, mask, g }
}

impl Problem {
    pub fn rounded(&self, dt: DType) -> Problem {
        let r = |v: &Vec<f32>| if dt == DType::BF16 { bf16_round(v) } else { v.clone() };
        Problem {
            x: r(&self.x),
            w: r(&self.w),
            tg: self.tg.clone(),
            mask: self.mask.clone(),
            g: self.g.clone(),
            ..*self
        }
    }
}

/// The naive f64 reference: logp, lse, entropy and (for dlogp = g · mask) dhidden and dW (from dw0).
pub struct Ref {
    pub logp: Vec<f32>,
    pub lse: Vec<f32>,
    pub ent: Vec<f32>,
    pub dh: Vec<f32>,
    pub dw: Vec<f32>,
}

pub fn reference(p: &Problem, masked: bool, dw0: &[f32]) -> Ref {
    let (t, h, v) = (p.t, p.h, p.v);
    let (x, w) = (to64(&p.x), to64(&p.w));
    let m64 = to64(&p.mask);
    let mask = if masked { Some(&m64[..]) } else { None };
    let (mut logp, mut lse, mut ent) = (vec![0f64; t], vec![0f64; t], vec![0f64; t]);
    cpu::fwd(
        cpu::FwdOut { logp: &mut logp, lse: &mut lse, entropy: Some(&mut ent) },
        cpu::Inputs { hidden: &x, lm_head: &w, targets: &p.tg, dims: logprob::Dims { t, h, v } },
        mask,
    )
    .unwrap();
    let g: Vec<f64> = (0..t).map(|i| if masked && p.mask[i] == 0.0 { 0.0 } else { p.g[i] as f64 }).collect();
    let mut dh = vec![0f64; t * h];
    let mut dw = to64(dw0);
    cpu::bwd(
        &mut dh,
        &mut dw,
        cpu::Inputs { hidden: &x, lm_head: &w, targets: &p.tg, dims: logprob::Dims { t, h, v } },
        &g,
        &lse,
    )
    .unwrap();
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    Ref { logp: f(logp), lse: f(lse), ent: f(ent), dh: f(dh), dw: f(dw) }
}

/// `LogitPrecision::Bf16` with bf16 inputs rounds each logit to bf16 once (cuBLAS's f32
/// accumulator, round to nearest) and then computes exactly. These f64 references do the same, so
/// the Bf16 kernels are held to the usual 1e-2; the distance to the exact reference is printed.
pub fn logits_bf16(x: &[f64], w: &[f64], i: usize, h: usize, v: usize) -> Vec<f64> {
    let xi = &x[i * h..(i + 1) * h];
    (0..v)
        .map(|j| {
            let l: f64 = xi.iter().zip(&w[j * h..(j + 1) * h]).map(|(a, b)| a * b).sum();
            half::bf16::from_f32(l as f32).to_f64()
        })
        .collect()
}

/// (logp, lse, entropy) [t] from bf16-rounded logits; masked tokens 0.
pub fn fwd_bf16_logits(inp: cpu::Inputs<f64>, mask: Option<&[f64]>) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let cpu::Inputs { hidden: x, lm_head: w, targets: tg, dims: logprob::Dims { t, h, v } } = inp;
    let (mut lp, mut ls, mut en) = (vec![0f64; t], vec![0f64; t], vec![0f64; t]);
    for i in 0..t {
        if mask.is_some_and(|m| m[i] == 0.0) {
            continue;
        }
        let row = logits_bf16(x, w, i, h, v);
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let l = m + row.iter().map(|&z| (z - m).exp()).sum::<f64>().ln();
        ls[i] = l;
        lp[i] = row[tg[i] as usize] - l;
        en[i] = row.iter().map(|&z| (z - l).exp() * (l - z)).sum();
    }
    (lp, ls, en)
}

/// (dhidden [t, h], dW delta [v, h]) for upstream g [t], from bf16-rounded logits and `lse`.
pub fn bwd_bf16_logits(inp: cpu::Inputs<f64>, g: &[f64], lse: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let cpu::Inputs { hidden: x, lm_head: w, targets: tg, dims: logprob::Dims { t, h, v } } = inp;
    let (mut dh, mut dw) = (vec![0f64; t * h], vec![0f64; v * h]);
    for i in 0..t {
        if g[i] == 0.0 {
            continue;
        }
        let row = logits_bf16(x, w, i, h, v);
        let xi = &x[i * h..(i + 1) * h];
        for j in 0..v {
            let d = g[i] * (if j == tg[i] as usize { 1.0 } else { 0.0 } - (row[j] - lse[i]).exp());
            for k in 0..h {
                dh[i * h + k] += d * w[j * h + k];
                dw[j * h + k] += d * xi[k];
            }
        }
    }
    (dh, dw)
}

/// `reference` for the Bf16 pass with bf16 inputs (dW as a delta from zero).
pub fn reference_bf16_logits(p: &Problem, masked: bool) -> Ref {
    let (t, h, v) = (p.t, p.h, p.v);
    let (x, w) = (to64(&p.x), to64(&p.w));
    let m64 = to64(&p.mask);
    let mask = if masked { Some(&m64[..]) } else { None };
    let inp = cpu::Inputs { hidden: &x, lm_head: &w, targets: &p.tg, dims: logprob::Dims { t, h, v } };
    let (logp, lse, ent) = fwd_bf16_logits(inp, mask);
    let g: Vec<f64> = (0..t).map(|i| if masked && p.mask[i] == 0.0 { 0.0 } else { p.g[i] as f64 }).collect();
    let (dh, dw) = bwd_bf16_logits(inp, &g, &lse);
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    Ref { logp: f(logp), lse: f(lse), ent: f(ent), dh: f(dh), dw: f(dw) }
}

/// A starting dlm_head for the += check: a fixed pattern a tenth the size of the gradient `delta`,
/// so a kernel that overwrote instead of accumulating would miss by 10%. Compare got − dw0 with delta.
pub fn dw_start(delta: &[f32]) -> Vec<f32> {
    let norm = delta.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let n = delta.len().max(1) as f64;
    let scale = if norm > 0.0 { 0.1 * norm / n.sqrt() } else { 0.1 };
    (0..delta.len()).map(|i| (((i % 7) as f64 - 3.0) / 2.0 * scale) as f32).collect()
}

pub fn minus(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// Bit patterns of a float vector (to compare results exactly, NaN included).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// (mismatching elements, max |a − b|) of two vectors compared bit for bit.
pub fn bit_diff(a: &[f32], b: &[f32]) -> (usize, f64) {
    let n = bits(a).iter().zip(bits(b)).filter(|(x, y)| **x != *y).count();
    (n, max_abs(a, b))
}

/// The Bf16 tunings whose `fwd` must reproduce the fused pass's log-probs.
pub fn kept_tunings(v: usize, dt: DType) -> Vec<(&'static str, Tuning)> {
    let base = Tuning::exact();
    vec![
        ("bf16", Tuning { precision: LogitPrecision::Bf16, ..base }),
        (
            "bf16 chunked split3",
            Tuning { fused_bytes: 2 * v * dt.size(), precision: LogitPrecision::Bf16, dhidden_splits: 3, ..base },
        ),
    ]
}

//! Grouped log-prob fused with the lm_head: the CPU backward against finite differences (f64),
//! the CPU forward against a direct formula, the fused path against fwd + bwd, and CUDA (bf16 at
//! 1e-2, f32 at 1e-5) against the naive f64 computation at odd T, H, V (V = 152,064 included), with
//! default and tiny chunk sizes so every tile / chunk / vector-or-scalar path runs. Also the fused
//! GRPO loss on the GPU against the CPU.
mod common;
use am3safety::ops::grpo::{self, Aggregation, GrpoBatch, GrpoHyper};
use am3safety::ops::logprob::{self, cpu, GradChunk, LogitPrecision, Tuning};
use am3safety::tensor::{Buf, DType, Device};
use common::*;

/// A random problem: hidden [t, h], w [v, h] (logits of spread ~`scale`), targets, mask, dlogp.
struct Problem {
    t: usize,
    h: usize,
    v: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    tg: Vec<i32>,
    mask: Vec<f32>,
    g: Vec<f32>,
}

/// Logit spread: peaked for real vocabularies, mild for tiny ones, where a confident correct
/// prediction (p ≈ 1) would make 1 − p, and so every gradient, a cancellation that f32 cannot
/// resolve to 1e-5 relative.
fn logit_scale(v: usize) -> f64 {
    if v < 64 {
        1.0
    } else {
        4.0
    }
}

fn problem(rng: &mut Rng, t: usize, h: usize, v: usize, scale: f64) -> Problem {
    let x = rng.normal_vec(t * h, 1.0);
    let w = rng.normal_vec(v * h, scale / (h as f64).sqrt());
    let tg = (0..t).map(|_| rng.below(v) as i32).collect();
    // Mask about a third of the tokens, never all of them (unless t = 1).
    let mask = (0..t).map(|i| if i == 0 || rng.uniform() > 0.35 { 1.0 } else { 0.0 }).collect();
    let g = (0..t).map(|i| if i % 5 == 3 { 0.0 } else { rng.normal() as f32 }).collect();
    Problem { t, h, v, x, w, tg, mask, g }
}

impl Problem {
    fn rounded(&self, dt: DType) -> Problem {
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
struct Ref {
    logp: Vec<f32>,
    lse: Vec<f32>,
    ent: Vec<f32>,
    dh: Vec<f32>,
    dw: Vec<f32>,
}

fn reference(p: &Problem, masked: bool, dw0: &[f32]) -> Ref {
    let (t, h, v) = (p.t, p.h, p.v);
    let (x, w) = (to64(&p.x), to64(&p.w));
    let m64 = to64(&p.mask);
    let mask = if masked { Some(&m64[..]) } else { None };
    let (mut logp, mut lse, mut ent) = (vec![0f64; t], vec![0f64; t], vec![0f64; t]);
    cpu::fwd(&mut logp, &mut lse, Some(&mut ent), &x, &w, &p.tg, mask, t, h, v).unwrap();
    let g: Vec<f64> = (0..t).map(|i| if masked && p.mask[i] == 0.0 { 0.0 } else { p.g[i] as f64 }).collect();
    let mut dh = vec![0f64; t * h];
    let mut dw = to64(dw0);
    cpu::bwd(&mut dh, &mut dw, &g, &x, &w, &p.tg, &lse, t, h, v).unwrap();
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    Ref { logp: f(logp), lse: f(lse), ent: f(ent), dh: f(dh), dw: f(dw) }
}

/// `LogitPrecision::Bf16` with bf16 inputs rounds each logit to bf16 once (cuBLAS's f32
/// accumulator, round to nearest) and then computes exactly. These f64 references do the same, so
/// the Bf16 kernels are held to the usual 1e-2; the distance to the exact reference is printed.
fn logits_bf16(x: &[f64], w: &[f64], i: usize, h: usize, v: usize) -> Vec<f64> {
    let xi = &x[i * h..(i + 1) * h];
    (0..v)
        .map(|j| {
            let l: f64 = xi.iter().zip(&w[j * h..(j + 1) * h]).map(|(a, b)| a * b).sum();
            half::bf16::from_f32(l as f32).to_f64()
        })
        .collect()
}

/// (logp, lse, entropy) [t] from bf16-rounded logits; masked tokens 0.
fn fwd_bf16_logits(
    x: &[f64], w: &[f64], tg: &[i32], mask: Option<&[f64]>, t: usize, h: usize, v: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
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
#[allow(clippy::too_many_arguments)]
fn bwd_bf16_logits(
    g: &[f64], x: &[f64], w: &[f64], tg: &[i32], lse: &[f64], t: usize, h: usize, v: usize,
) -> (Vec<f64>, Vec<f64>) {
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
fn reference_bf16_logits(p: &Problem, masked: bool) -> Ref {
    let (t, h, v) = (p.t, p.h, p.v);
    let (x, w) = (to64(&p.x), to64(&p.w));
    let m64 = to64(&p.mask);
    let mask = if masked { Some(&m64[..]) } else { None };
    let (logp, lse, ent) = fwd_bf16_logits(&x, &w, &p.tg, mask, t, h, v);
    let g: Vec<f64> = (0..t).map(|i| if masked && p.mask[i] == 0.0 { 0.0 } else { p.g[i] as f64 }).collect();
    let (dh, dw) = bwd_bf16_logits(&g, &x, &w, &p.tg, &lse, t, h, v);
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    Ref { logp: f(logp), lse: f(lse), ent: f(ent), dh: f(dh), dw: f(dw) }
}

/// A starting dlm_head for the += check: a fixed pattern a tenth the size of the gradient `delta`,
/// so a kernel that overwrote instead of accumulating would miss by 10%. Compare got − dw0 with delta.
fn dw_start(delta: &[f32]) -> Vec<f32> {
    let norm = delta.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let n = delta.len().max(1) as f64;
    let scale = if norm > 0.0 { 0.1 * norm / n.sqrt() } else { 0.1 };
    (0..delta.len()).map(|i| (((i % 7) as f64 - 3.0) / 2.0 * scale) as f32).collect()
}

/// ‖a − b‖ / max(‖b‖, floor); infinite if `a` has a non-finite value.
fn rel_err_floor(a: &[f32], b: &[f32], floor: f64) -> f64 {
    let e = rel_err(a, b);
    let nb = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    if !e.is_finite() || nb >= floor {
        e
    } else {
        e * nb.max(1e-30) / floor
    }
}

fn minus(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

#[test]
fn logprob_cpu_gradcheck() {
    let mut rng = Rng::new(1);
    for &(t, h, v) in &[(1usize, 1usize, 1usize), (1, 3, 2), (3, 5, 7), (4, 9, 13)] {
        let p = problem(&mut rng, t, h, v, 2.0);
        let (x, w) = (to64(&p.x), to64(&p.w));
        let m64 = to64(&p.mask);
        let g: Vec<f64> = (0..t).map(|i| p.g[i] as f64 * m64[i]).collect();
        let loss = |x: &[f64], w: &[f64]| {
            let (mut lp, mut ls) = (vec![0.0; t], vec![0.0; t]);
            cpu::fwd(&mut lp, &mut ls, None, x, w, &p.tg, Some(&m64), t, h, v).unwrap();
            dot(&lp, &g)
        };
        let (mut lp, mut ls) = (vec![0.0; t], vec![0.0; t]);
        cpu::fwd(&mut lp, &mut ls, None, &x, &w, &p.tg, Some(&m64), t, h, v).unwrap();
        let mut dh = vec![f64::NAN; t * h];
        let mut dw = vec![0.0; v * h];
        cpu::bwd(&mut dh, &mut dw, &g, &x, &w, &p.tg, &ls, t, h, v).unwrap();
        gradcheck(&format!("logprob dhidden [{t}x{h}x{v}]"), &x, &dh, &mut |xp| loss(xp, &w), 64, 1e-6);
        gradcheck(&format!("logprob dlm_head [{t}x{h}x{v}]"), &w, &dw, &mut |wp| loss(&x, wp), 64, 1e-6);
    }
}

#[test]
fn logprob_cpu_forward_matches_formula() {
    let mut rng = Rng::new(2);
    let (t, h, v) = (6, 5, 11);
    let p = problem(&mut rng, t, h, v, 3.0);
    let (x, w) = (to64(&p.x), to64(&p.w));
    let (mut lp, mut ls, mut en) = (vec![0.0; t], vec![0.0; t], vec![0.0; t]);
    cpu::fwd(&mut lp, &mut ls, Some(&mut en), &x, &w, &p.tg, None, t, h, v).unwrap();
    let mut worst = 0f64;
    for i in 0..t {
        let logits: Vec<f64> = (0..v).map(|j| (0..h).map(|k| x[i * h + k] * w[j * h + k]).sum()).collect();
        let z: f64 = logits.iter().map(|l| l.exp()).sum();
        let probs: Vec<f64> = logits.iter().map(|l| l.exp() / z).collect();
        let want_lp = probs[p.tg[i] as usize].ln();
        let want_ent: f64 = -probs.iter().map(|q| q * q.ln()).sum::<f64>();
        worst = worst.max((lp[i] - want_lp).abs()).max((en[i] - want_ent).abs()).max((ls[i] - z.ln()).abs());
    }
    println!("logprob cpu forward vs direct formula: worst abs err {worst:.2e}");
    assert!(worst < 1e-12);
    // Masked tokens read as 0; a bad target on an active token is an error naming it.
    let m = vec![0.0; t];
    cpu::fwd(&mut lp, &mut ls, Some(&mut en), &x, &w, &p.tg, Some(&m), t, h, v).unwrap();
    assert!(lp.iter().chain(&ls).chain(&en).all(|&z| z == 0.0));
    let mut bad = p.tg.clone();
    bad[2] = v as i32;
    let e = cpu::fwd(&mut lp, &mut ls, None, &x, &w, &bad, None, t, h, v).unwrap_err().to_string();
    assert!(e.contains("token 2"), "{e}");
    // Shape errors name the op and argument.
    let dev = Device::Cpu;
    let z = |n| dev.zeros_f32(n).unwrap();
    let e = logprob::fwd(
        &dev,
        &mut z(t),
        &mut z(t),
        None,
        &z(t * h),
        &z(v * h + 1),
        &dev.upload_i32(&p.tg).unwrap(),
        None,
        t,
        h,
        v,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("logprob_fwd") && e.contains("lm_head"), "{e}");
}

/// `fwd_bwd` on the CPU backend equals `fwd` + `bwd`, and the callback sees the packed tokens.
#[test]
fn logprob_cpu_fused_matches_split() {
    let mut rng = Rng::new(3);
    let dev = Device::Cpu;
    for masked in [false, true] {
        let p = problem(&mut rng, 9, 6, 17, 2.0);
        let (t, h, v) = (p.t, p.h, p.v);
        let r = reference(&p, masked, &vec![0.0; v * h]);
        let dw0 = dw_start(&r.dw);
        let (x, w, tg, mk, g) = (
            dev.upload_act(&p.x).unwrap(),
            dev.upload_act(&p.w).unwrap(),
            dev.upload_i32(&p.tg).unwrap(),
            dev.upload(&p.mask, DType::F32).unwrap(),
            dev.upload(&p.g, DType::F32).unwrap(),
        );
        let (mut lp, mut en, mut dh) =
            (dev.zeros_f32(t).unwrap(), dev.zeros_f32(t).unwrap(), dev.zeros_act(t * h).unwrap());
        let mut dw = dev.upload(&dw0, DType::F32).unwrap();
        let mut calls = 0;
        let mut grad = |c: GradChunk<'_>| {
            calls += 1;
            assert_eq!(c.idx.is_some(), masked && p.mask.contains(&0.0));
            logprob::gather_scaled(&dev, c.dlogp, &g, c.idx, c.p0, c.n, 1.0)
        };
        logprob::fwd_bwd(
            &dev,
            &mut lp,
            Some(&mut en),
            &mut dh,
            &mut dw,
            &x,
            &w,
            &tg,
            masked.then_some(&mk),
            t,
            h,
            v,
            &mut grad,
        )
        .unwrap();
        assert_eq!(calls, 1);
        let dw_delta = minus(dw.host().unwrap(), &dw0);
        for (name, a, b) in [
            ("logp", lp.host().unwrap(), &r.logp),
            ("entropy", en.host().unwrap(), &r.ent),
            ("dhidden", dh.host().unwrap(), &r.dh),
            ("dlm_head", &dw_delta[..], &r.dw),
        ] {
            let e = rel_err(a, b);
            println!("logprob cpu fused (masked={masked}) {name}: rel err {e:.2e}");
            assert!(e < 1e-5, "logprob cpu fused {name}: {e:.2e}");
        }
    }
}

fn tunings(v: usize, dt: DType) -> Vec<(&'static str, Tuning)> {
    // Tiles scale with V so the launch count stays modest.
    let k = if v <= 1000 { 1 } else { 32 };
    let base = Tuning::exact();
    vec![
        ("default", base),
        // Several token chunks and vocab tiles, 8-aligned: the vector paths. dhidden in 3 slices
        // (ragged when V or the bwd tile is not a multiple of 3 · 8).
        (
            "tiny",
            Tuning {
                fwd_tokens: 3,
                fwd_vocab: 64 * k,
                bwd_tokens: 4,
                bwd_vocab: 40 * k,
                fused_bytes: 5 * v * dt.size(),
                fused_vocab: 48 * k,
                dhidden_splits: 3,
                ..base
            },
        ),
        // Odd tile widths: the scalar paths and partial last tiles; dhidden in 2 slices, fresh
        // (uncached) scratch.
        (
            "odd",
            Tuning {
                fwd_tokens: 2,
                fwd_vocab: 13 * k,
                bwd_tokens: 7,
                bwd_vocab: 13 * k,
                fused_bytes: 2 * v * dt.size(),
                fused_vocab: 13 * k,
                dhidden_splits: 2,
                cache_scratch: false,
                ..base
            },
        ),
        // dlm_head written (=) instead of accumulated: the check starts it at NaN.
        (
            "split4 dW=",
            Tuning {
                fused_bytes: 3 * v * dt.size(),
                bwd_tokens: 5,
                bwd_vocab: 24 * k,
                dhidden_splits: 4,
                dw_overwrite: true,
                ..base
            },
        ),
        // The Bf16 pass (fold and u in one kernel, dlogp applied after the GEMMs).
        ("bf16", Tuning { precision: LogitPrecision::Bf16, ..base }),
        ("bf16 odd", Tuning { fused_bytes: 2 * v * dt.size(), precision: LogitPrecision::Bf16, ..base }),
        (
            "bf16 split3 dW=",
            Tuning {
                fused_bytes: 3 * v * dt.size(),
                precision: LogitPrecision::Bf16,
                dhidden_splits: 3,
                dw_overwrite: true,
                ..base
            },
        ),
    ]
}

/// Runs fwd (masked and not, with entropy), bwd and fwd_bwd on `gpu` and compares every output
/// with the f64 reference; returns the failures.
fn check_gpu(gpu: &Device, base: &Problem, dt: DType, tunes: &[(&str, Tuning)], tol: f64) -> Vec<String> {
    let p = base.rounded(dt);
    let (t, h, v) = (p.t, p.h, p.v);
    let zeros = vec![0f32; v * h];
    let refs = [reference(&p, false, &zeros), reference(&p, true, &zeros)];
    let refs_bf16 = (dt == DType::BF16 && tunes.iter().any(|(_, tn)| tn.precision == LogitPrecision::Bf16))
        .then(|| [reference_bf16_logits(&p, false), reference_bf16_logits(&p, true)]);
    let up = |x: &[f32], d: DType| gpu.upload(x, d).unwrap();
    let nan = |n: usize, d: DType| gpu.upload(&vec![f32::NAN; n], d).unwrap();
    let (x, w, tg, mk, g) =
        (up(&p.x, dt), up(&p.w, dt), gpu.upload_i32(&p.tg).unwrap(), up(&p.mask, DType::F32), up(&p.g, DType::F32));
    let dl = |b: &Buf| gpu.to_vec(b).unwrap();
    let mut fails = Vec::new();
    // Log-probs, lse and entropies are known to f32's absolute precision: their norm is floored
    // at 0.1 per token. All-zero references (masked everything, V = 1) compare absolutely.
    let mut cmp = |what: String, a: Vec<f32>, want: &[f32]| {
        let floor =
            if what.contains("dhidden") || what.contains("dlm_head") { 0.0 } else { 0.1 * (want.len() as f64).sqrt() };
        let e = if want.iter().all(|&z| z == 0.0) { max_abs(&a, want) } else { rel_err_floor(&a, want, floor) };
        println!("logprob {what}: rel err {e:.2e}");
        if e.is_nan() || e > tol {
            fails.push(format!("{what}: {e:.2e}"));
        }
    };
    for (tn, tune) in tunes {
        let shape = format!("{} [t={t} h={h} v={v}] {tn}", dt.suffix());
        for (mi, masked) in [false, true].into_iter().enumerate() {
            let r = &refs[mi];
            // With dw_overwrite the op must not read dlm_head: it starts at NaN and the result is
            // compared as is (dw0 = 0 below).
            let dw0 = if tune.dw_overwrite { vec![0f32; v * h] } else { dw_start(&r.dw) };
            let dw_init = if tune.dw_overwrite { vec![f32::NAN; v * h] } else { dw0.clone() };
            let mask = masked.then_some(&mk);
            // At Bf16 precision `fwd` and `bwd` round the logits to bf16 like the fused pass: in
            // bf16 they are held to the bf16-logit reference.
            let (want, tag) = match (&refs_bf16, tune.precision == LogitPrecision::Bf16) {
                (Some(rv), true) => (&rv[mi], " (vs bf16-logit ref)"),
                _ => (r, ""),
            };
            // Forward.
            let (mut lp, mut ls, mut en) = (nan(t, DType::F32), nan(t, DType::F32), nan(t, DType::F32));
            logprob::fwd_with(gpu, tune, &mut lp, &mut ls, Some(&mut en), &x, &w, &tg, mask, t, h, v).unwrap();
            cmp(format!("fwd logp {shape} masked={masked}{tag}"), dl(&lp), &want.logp);
            cmp(format!("fwd lse {shape} masked={masked}{tag}"), dl(&ls), &want.lse);
            cmp(format!("fwd entropy {shape} masked={masked}{tag}"), dl(&en), &want.ent);
            // Backward from the GPU's own lse, dlogp = g · mask (zeros are skipped).
            let gm: Vec<f32> = (0..t).map(|i| if masked && p.mask[i] == 0.0 { 0.0 } else { p.g[i] }).collect();
            let mut dh = nan(t * h, dt);
            let mut dw = up(&dw_init, DType::F32);
            logprob::bwd_with(gpu, tune, &mut dh, Some(&mut dw), &up(&gm, DType::F32), &x, &w, &tg, &ls, t, h, v)
                .unwrap();
            cmp(format!("bwd dhidden {shape} masked={masked}{tag}"), dl(&dh), &want.dh);
            cmp(format!("bwd dlm_head {shape} masked={masked}{tag}"), minus(&dl(&dw), &dw0), &want.dw);
            // Fused, the callback gathering g for the packed tokens.
            let (mut lp2, mut en2, mut dh2) = (nan(t, DType::F32), nan(t, DType::F32), nan(t * h, dt));
            let mut dw2 = up(&dw_init, DType::F32);
            let mut chunks = 0usize;
            let mut grad = |c: GradChunk<'_>| {
                chunks += 1;
                logprob::gather_scaled(gpu, c.dlogp, &g, c.idx, c.p0, c.n, 1.0)
            };
            logprob::fwd_bwd_with(
                gpu,
                tune,
                &mut lp2,
                Some(&mut en2),
                &mut dh2,
                &mut dw2,
                &x,
                &w,
                &tg,
                mask,
                t,
                h,
                v,
                &mut grad,
            )
            .unwrap();
            let plan = logprob::fused_plan(gpu, tune, t, h, v, dt);
            println!("logprob fused {shape} masked={masked}: {chunks} chunk(s), (chunk rows, dhidden slices) unmasked {plan:?}, scratch {} bytes", logprob::last_scratch_bytes());
            let got = [
                ("logp", dl(&lp2)),
                ("entropy", dl(&en2)),
                ("dhidden", dl(&dh2)),
                ("dlm_head", minus(&dl(&dw2), &dw0)),
            ];
            match (&refs_bf16, tune.precision == LogitPrecision::Bf16) {
                (Some(rv), true) => {
                    // The Bf16 pass in bf16: held to the bf16-logit reference; the rounding's own cost
                    // against the exact reference is printed for PERF-logprob.md.
                    let rv = &rv[mi];
                    for ((name, a), (want, exact)) in
                        got.iter().zip([(&rv.logp, &r.logp), (&rv.ent, &r.ent), (&rv.dh, &r.dh), (&rv.dw, &r.dw)])
                    {
                        cmp(format!("fused {name} {shape} masked={masked} (vs bf16-logit ref)"), a.clone(), want);
                        let floor = if *name == "dhidden" || *name == "dlm_head" {
                            0.0
                        } else {
                            0.1 * (exact.len() as f64).sqrt()
                        };
                        let e = if exact.iter().all(|&z| z == 0.0) {
                            max_abs(a, exact)
                        } else {
                            rel_err_floor(a, exact, floor)
                        };
                        println!(
                            "logprob fused {name} {shape} masked={masked}: vs exact ref {e:.2e} (info: bf16 logits)"
                        );
                    }
                }
                _ => {
                    for ((name, a), want) in got.iter().zip([&r.logp, &r.ent, &r.dh, &r.dw]) {
                        cmp(format!("fused {name} {shape} masked={masked}"), a.clone(), want);
                    }
                }
            }
        }
    }
    fails
}

const SHAPES: &[(usize, usize, usize)] =
    &[(1, 1, 1), (1, 8, 3), (3, 7, 5), (17, 33, 129), (37, 64, 1000), (64, 128, 4099), (130, 96, 8200)];

#[test]
fn logprob_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("logprob_cuda_matches_cpu") else { return };
    let mut rng = Rng::new(4);
    let mut fails = Vec::new();
    for &(t, h, v) in SHAPES {
        let p = problem(&mut rng, t, h, v, logit_scale(v));
        for (dt, tol) in [(DType::BF16, 1e-2), (DType::F32, 1e-5)] {
            fails.extend(check_gpu(&gpu, &p, dt, &tunings(v, dt), tol));
        }
    }
    assert!(fails.is_empty(), "logprob cuda vs cpu: {} failure(s):\n{}", fails.len(), fails.join("\n"));
}

/// Qwen2.5's vocabulary, 152,064: default tiles (a partial last one) and a chunked fused pass.
#[test]
fn logprob_cuda_full_vocab() {
    let Some(gpu) = cuda_or_skip("logprob_cuda_full_vocab") else { return };
    let mut rng = Rng::new(5);
    let mut fails = Vec::new();
    for &(t, h) in &[(5usize, 64usize), (19, 40)] {
        let v = 152_064;
        let p = problem(&mut rng, t, h, v, 6.0);
        for (dt, tol) in [(DType::BF16, 1e-2), (DType::F32, 1e-5)] {
            let base = Tuning::exact();
            // Split-K at V = 152,064: automatic (4 equal slices of 38,016 here: few rows), 3
            // equal slices, and 5 (30,416 × 4 batched + a ragged 30,400); bwd tiles of 8,192 in 2.
            let tunes = [
                ("default", base),
                ("chunked", Tuning { fused_bytes: 3 * v * dt.size(), bwd_tokens: 8, fwd_tokens: 4, ..base }),
                ("split1", Tuning { dhidden_splits: 1, ..base }),
                (
                    "chunked split3 bwd split2",
                    Tuning { fused_bytes: 3 * v * dt.size(), bwd_tokens: 8, dhidden_splits: 3, ..base },
                ),
                ("split5 dW=", Tuning { dhidden_splits: 5, dw_overwrite: true, ..base }),
                ("bf16", Tuning { precision: LogitPrecision::Bf16, ..base }),
                ("bf16 chunked", Tuning { fused_bytes: 3 * v * dt.size(), precision: LogitPrecision::Bf16, ..base }),
                (
                    "bf16 split7 uncached",
                    Tuning { precision: LogitPrecision::Bf16, dhidden_splits: 7, cache_scratch: false, ..base },
                ),
            ];
            fails.extend(check_gpu(&gpu, &p, dt, &tunes, tol));
        }
    }
    assert!(fails.is_empty(), "logprob cuda full vocab: {} failure(s):\n{}", fails.len(), fails.join("\n"));
}

/// The fused GRPO loss on `dev` against fwd → loss → bwd composed from the f64 references.
fn check_grpo_fused(dev: &Device, dtypes: &[(DType, f64)]) -> Vec<String> {
    let hp =
        GrpoHyper { lambda: 1.0, tau: 0.5, beta_help: 0.5, eps_low: 0.2, eps_high: 0.28, beta_kl: 0.04, adv_eps: 1e-4 };
    let mut rng = Rng::new(6);
    let mut fails = Vec::new();
    for &(rows, l, h, v) in
        &[(1usize, 1usize, 8usize, 3usize), (3, 7, 33, 1000), (4, 50, 64, 4099), (2, 3, 64, 152_064)]
    {
        let t = rows * l;
        for &(dt, tol) in dtypes {
            let p = problem(&mut rng, t, h, v, logit_scale(v)).rounded(dt);
            let mut mask = p.mask.clone();
            if rows > 2 {
                mask[l..2 * l].iter_mut().for_each(|m| *m = 0.0);
            }
            // Reference log-probs first, so the ratios can be placed away from the clip edges.
            let (x64, w64) = (to64(&p.x), to64(&p.w));
            let (mut lp, mut ls) = (vec![0f64; t], vec![0f64; t]);
            let m64 = to64(&mask);
            logprob::cpu::fwd(&mut lp, &mut ls, None, &x64, &w64, &p.tg, Some(&m64), t, h, v).unwrap();
            let old: Vec<f64> = lp.iter().map(|&x| x - [0.0, 0.05, -0.05, 0.6, -0.6][rng.below(5)]).collect();
            let rf: Vec<f64> = lp.iter().map(|&x| x + rng.range(-0.5, 0.5)).collect();
            let adv: Vec<f64> = (0..rows).map(|_| rng.normal()).collect();
            // Round the inputs through f32 first: that is what the device sees.
            let r32 = |v: &[f64]| v.iter().map(|&x| x as f32 as f64).collect::<Vec<f64>>();
            let (old, rf, adv) = (r32(&old), r32(&rf), r32(&adv));
            // The Bf16 pass on the GPU too; in bf16 it is held to the bf16-rounded-logit reference.
            // var: 1 = ExactF32, 3 = Bf16 (rounds the logits to bf16).
            let variants: &[u8] = if matches!(dev, Device::Cuda(_)) { &[1, 3] } else { &[1] };
            let rounded = (dt == DType::BF16 && variants.len() > 1)
                .then(|| fwd_bf16_logits(&x64, &w64, &p.tg, Some(&m64), t, h, v));
            for (agg, &var) in [Aggregation::TokenMean, Aggregation::SeqMean]
                .into_iter()
                .flat_map(|a| variants.iter().map(move |b| (a, b)))
            {
                let bf = var > 1;
                let (lp, ls) = match (&rounded, bf) {
                    (Some((lpr, lsr, _)), true) => (lpr, lsr),
                    _ => (&lp, &ls),
                };
                let mut dl = vec![0f64; t];
                let s64 = grpo::cpu::loss_fwd_bwd::<f64>(&mut dl, lp, &old, &rf, &m64, &adv, rows, l, &hp, agg);
                let (dh, dw) = if rounded.is_some() && bf {
                    bwd_bf16_logits(&dl, &x64, &w64, &p.tg, ls, t, h, v)
                } else {
                    let mut dh = vec![0f64; t * h];
                    let mut dw = vec![0f64; v * h];
                    logprob::cpu::bwd(&mut dh, &mut dw, &dl, &x64, &w64, &p.tg, ls, t, h, v).unwrap();
                    (dh, dw)
                };
                let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                let dw0 = dw_start(&f(&dw));
                let up = |x: &[f32], d: DType| dev.upload(x, d).unwrap();
                let (bx, bw, btg) = (up(&p.x, dt), up(&p.w, dt), dev.upload_i32(&p.tg).unwrap());
                let (bo, br, bm, ba) = (
                    up(&f(&old), DType::F32),
                    up(&f(&rf), DType::F32),
                    up(&mask, DType::F32),
                    up(&f(&adv), DType::F32),
                );
                let batch = GrpoBatch { old_logp: &bo, ref_logp: &br, mask: &bm, adv: &ba, rows, l };
                let mut blp = up(&vec![f32::NAN; t], DType::F32);
                let mut bdh = up(&vec![f32::NAN; t * h], dt);
                let mut bdw = up(&dw0, DType::F32);
                let tune = Tuning {
                    fused_bytes: 3 * v * dt.size(),
                    fused_vocab: 1000,
                    precision: if var == 3 { LogitPrecision::Bf16 } else { LogitPrecision::ExactF32 },
                    ..Tuning::exact()
                };
                let s = grpo::fused_loss_with(
                    dev, &tune, &mut blp, &mut bdh, &mut bdw, &bx, &bw, &btg, &batch, h, v, &hp, agg,
                )
                .unwrap();
                let tag = match (var, rounded.is_some()) {
                    (1, _) => String::new(),
                    (_, false) => " bf16".to_string(),
                    (_, true) => " bf16 (vs bf16-logit ref)".to_string(),
                };
                let what =
                    format!("grpo fused{tag} {} {} [rows={rows} l={l} h={h} v={v}] {agg:?}", dev.name(), dt.suffix());
                let mut errs = vec![
                    ("logp", rel_err_floor(&dev.to_vec(&blp).unwrap(), &f(lp), 0.1 * (t as f64).sqrt())),
                    ("dhidden", rel_err(&dev.to_vec(&bdh).unwrap(), &f(&dh))),
                    ("dlm_head", rel_err(&minus(&dev.to_vec(&bdw).unwrap(), &dw0), &f(&dw))),
                    ("clip_frac (abs)", (s.clip_frac - s64.clip_frac).abs()),
                ];
                // The loss relative to its own size, floored by 1e-3 (it can cancel to ~0).
                errs.push(("loss", (s.loss - s64.loss).abs() / s64.loss.abs().max(1e-3)));
                errs.push(("mean_kl", (s.mean_kl - s64.mean_kl).abs() / s64.mean_kl.abs().max(1e-3)));
                println!(
                    "{what}: loss {:.6} vs {:.6}; scratch {} bytes",
                    s.loss,
                    s64.loss,
                    logprob::last_scratch_bytes()
                );
                for (name, e) in errs {
                    println!("{what} {name}: rel err {e:.2e}");
                    if e.is_nan() || e > tol {
                        fails.push(format!("{what} {name}: {e:.2e}"));
                    }
                }
            }
        }
    }
    fails
}

#[test]
fn grpo_fused_cpu_matches_reference() {
    let fails = check_grpo_fused(&Device::Cpu, &[(DType::F32, 1e-5)]);
    assert!(fails.is_empty(), "grpo fused cpu: {} failure(s):\n{}", fails.len(), fails.join("\n"));
}

#[test]
fn grpo_fused_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("grpo_fused_cuda_matches_cpu") else { return };
    let fails = check_grpo_fused(&gpu, &[(DType::BF16, 1e-2), (DType::F32, 1e-5)]);
    assert!(fails.is_empty(), "grpo fused cuda vs cpu: {} failure(s):\n{}", fails.len(), fails.join("\n"));
}

/// The bf16-logit references used for the Bf16 pass equal the exact ones when every logit is
/// representable in bf16 (small multiples of 1/4), and stay within bf16 rounding otherwise.
#[test]
fn bf16_logit_reference_matches_exact_when_representable() {
    let mut rng = Rng::new(9);
    let (t, h, v) = (5usize, 6usize, 37usize);
    let x: Vec<f64> = (0..t * h).map(|_| rng.below(3) as f64 - 1.0).collect();
    let w: Vec<f64> = (0..v * h).map(|_| (rng.below(5) as f64 - 2.0) * 0.25).collect();
    let tg: Vec<i32> = (0..t).map(|_| rng.below(v) as i32).collect();
    let g: Vec<f64> = (0..t).map(|i| if i == 2 { 0.0 } else { rng.normal() }).collect();
    let (lp, ls, en) = fwd_bf16_logits(&x, &w, &tg, None, t, h, v);
    let (mut lp0, mut ls0, mut en0) = (vec![0f64; t], vec![0f64; t], vec![0f64; t]);
    cpu::fwd(&mut lp0, &mut ls0, Some(&mut en0), &x, &w, &tg, None, t, h, v).unwrap();
    let (dh, dw) = bwd_bf16_logits(&g, &x, &w, &tg, &ls, t, h, v);
    let (mut dh0, mut dw0) = (vec![0f64; t * h], vec![0f64; v * h]);
    cpu::bwd(&mut dh0, &mut dw0, &g, &x, &w, &tg, &ls0, t, h, v).unwrap();
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    for (name, a, b) in [
        ("logp", &lp, &lp0),
        ("lse", &ls, &ls0),
        ("entropy", &en, &en0),
        ("dhidden", &dh, &dh0),
        ("dlm_head", &dw, &dw0),
    ] {
        let e = rel_err(&f(a), &f(b));
        println!("bf16-logit reference (exact logits) {name}: rel err {e:.2e}");
        assert!(e < 1e-6, "bf16-logit reference {name}: {e:.2e}");
    }
    // Generic values: the references differ by the rounding alone.
    let p = problem(&mut rng, 7, 33, 1000, 4.0).rounded(DType::BF16);
    let (x, w) = (to64(&p.x), to64(&p.w));
    let (lp, _, _) = fwd_bf16_logits(&x, &w, &p.tg, None, p.t, p.h, p.v);
    let (mut lp0, mut ls0) = (vec![0f64; p.t], vec![0f64; p.t]);
    cpu::fwd(&mut lp0, &mut ls0, None, &x, &w, &p.tg, None, p.t, p.h, p.v).unwrap();
    let worst = lp.iter().zip(&lp0).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    println!("bf16-logit reference vs exact, logits of spread 4: max |logp diff| {worst:.2e}");
    assert!(worst > 0.0 && worst < 0.1, "bf16 rounding of logits moved logp by {worst:.2e}");
}

/// Bit patterns of a float vector (to compare results exactly, NaN included).
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// (mismatching elements, max |a − b|) of two vectors compared bit for bit.
fn bit_diff(a: &[f32], b: &[f32]) -> (usize, f64) {
    let n = bits(a).iter().zip(bits(b)).filter(|(x, y)| **x != *y).count();
    (n, max_abs(a, b))
}

/// The Bf16 tunings whose `fwd` must reproduce the fused pass's log-probs.
fn kept_tunings(v: usize, dt: DType) -> Vec<(&'static str, Tuning)> {
    let base = Tuning::exact();
    vec![
        ("bf16", Tuning { precision: LogitPrecision::Bf16, ..base }),
        (
            "bf16 chunked split3",
            Tuning { fused_bytes: 2 * v * dt.size(), precision: LogitPrecision::Bf16, dhidden_splits: 3, ..base },
        ),
    ]
}

/// On the CPU every path computes the exact log-probs: `fwd` and `fwd_bwd` agree (to 1e-6) for
/// every tuning, Bf16 ones included (they only change the GPU's kernels).
#[test]
fn logprob_fwd_matches_fused_cpu() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(10);
    let p = problem(&mut rng, 11, 9, 37, 3.0);
    let (t, h, v) = (p.t, p.h, p.v);
    let (x, w, tg, mk) = (
        dev.upload_act(&p.x).unwrap(),
        dev.upload_act(&p.w).unwrap(),
        dev.upload_i32(&p.tg).unwrap(),
        dev.upload(&p.mask, DType::F32).unwrap(),
    );
    let g = dev.upload(&p.g, DType::F32).unwrap();
    for (name, tune) in kept_tunings(v, DType::F32) {
        for masked in [false, true] {
            let mask = masked.then_some(&mk);
            let (mut lp, mut ls) = (dev.zeros_f32(t).unwrap(), dev.zeros_f32(t).unwrap());
            logprob::fwd_with(&dev, &tune, &mut lp, &mut ls, None, &x, &w, &tg, mask, t, h, v).unwrap();
            let (mut lp2, mut dh, mut dw) =
                (dev.zeros_f32(t).unwrap(), dev.zeros_act(t * h).unwrap(), dev.zeros_f32(v * h).unwrap());
            let mut grad = |c: GradChunk<'_>| logprob::gather_scaled(&dev, c.dlogp, &g, c.idx, c.p0, c.n, 1.0);
            logprob::fwd_bwd_with(&dev, &tune, &mut lp2, None, &mut dh, &mut dw, &x, &w, &tg, mask, t, h, v, &mut grad)
                .unwrap();
            let e = max_abs(lp.host().unwrap(), lp2.host().unwrap());
            println!("logprob cpu fwd vs fused logp {name} masked={masked}: max abs diff {e:.2e}");
            assert!(e <= 1e-6, "logprob cpu fwd vs fused {name} masked={masked}: {e:.2e}");
        }
    }
}

/// At Bf16 precision `fwd` (used for the old policy and the reference) computes the logits and
/// the fold exactly as the fused pass does: logp and the entropy agree bit for bit on the GPU, for
/// the same weights, inputs, mask and `Tuning`, bf16 and f32, odd shapes and V = 152,064. The
/// exact path's `fwd` against the Bf16 pass is printed for scale (bf16 rounding of logits).
#[test]
fn logprob_fwd_matches_fused_bitwise_cuda() {
    let Some(gpu) = cuda_or_skip("logprob_fwd_matches_fused_bitwise_cuda") else { return };
    let mut rng = Rng::new(11);
    let mut fails = Vec::new();
    for &(t, h, v) in &[(7usize, 33usize, 1000usize), (37, 64, 4099), (130, 96, 8200), (19, 40, 152_064)] {
        let base = problem(&mut rng, t, h, v, logit_scale(v));
        for dt in [DType::BF16, DType::F32] {
            let p = base.rounded(dt);
            let up = |x: &[f32], d: DType| gpu.upload(x, d).unwrap();
            let (x, w, tg, mk) = (up(&p.x, dt), up(&p.w, dt), gpu.upload_i32(&p.tg).unwrap(), up(&p.mask, DType::F32));
            let g = up(&p.g, DType::F32);
            for masked in [false, true] {
                let mask = masked.then_some(&mk);
                let mut fused_bf16 = None;
                for (name, tune) in kept_tunings(v, dt) {
                    let what =
                        format!("logprob fwd vs fused {} [t={t} h={h} v={v}] {name} masked={masked}", dt.suffix());
                    let (mut lp, mut ls, mut en) = (
                        up(&vec![f32::NAN; t], DType::F32),
                        up(&vec![f32::NAN; t], DType::F32),
                        up(&vec![f32::NAN; t], DType::F32),
                    );
                    logprob::fwd_with(&gpu, &tune, &mut lp, &mut ls, Some(&mut en), &x, &w, &tg, mask, t, h, v)
                        .unwrap();
                    let (mut lp2, mut en2, mut dh, mut dw) = (
                        up(&vec![f32::NAN; t], DType::F32),
                        up(&vec![f32::NAN; t], DType::F32),
                        up(&vec![f32::NAN; t * h], dt),
                        up(&vec![0.0; v * h], DType::F32),
                    );
                    let mut grad = |c: GradChunk<'_>| logprob::gather_scaled(&gpu, c.dlogp, &g, c.idx, c.p0, c.n, 1.0);
                    logprob::fwd_bwd_with(
                        &gpu,
                        &tune,
                        &mut lp2,
                        Some(&mut en2),
                        &mut dh,
                        &mut dw,
                        &x,
                        &w,
                        &tg,
                        mask,
                        t,
                        h,
                        v,
                        &mut grad,
                    )
                    .unwrap();
                    let (a, b) = (gpu.to_vec(&lp).unwrap(), gpu.to_vec(&lp2).unwrap());
                    let (ea, eb) = (gpu.to_vec(&en).unwrap(), gpu.to_vec(&en2).unwrap());
                    let (nl, dlp) = bit_diff(&a, &b);
                    let (ne, den) = bit_diff(&ea, &eb);
                    println!("{what}: logp {nl} of {t} differ (max {dlp:.2e}), entropy {ne} differ (max {den:.2e})");
                    if nl > 0 || ne > 0 || a.iter().any(|z| !z.is_finite()) {
                        fails.push(format!(
                            "{what}: logp {nl} / entropy {ne} of {t} not bit-identical (max {dlp:.2e} / {den:.2e})"
                        ));
                    }
                    if name == "bf16" {
                        fused_bf16 = Some(b);
                    }
                }
                // For scale: the exact `fwd` against the Bf16 pass (no bit identity expected in bf16).
                let exact = Tuning::exact();
                let (mut lp, mut ls) = (up(&vec![f32::NAN; t], DType::F32), up(&vec![f32::NAN; t], DType::F32));
                logprob::fwd_with(&gpu, &exact, &mut lp, &mut ls, None, &x, &w, &tg, mask, t, h, v).unwrap();
                if let Some(b) = fused_bf16 {
                    let e = max_abs(&gpu.to_vec(&lp).unwrap(), &b);
                    println!("logprob exact fwd vs fused bf16 {} [t={t} h={h} v={v}] masked={masked}: max |logp diff| {e:.2e} (info: what a ratio would see without item 4)", dt.suffix());
                }
            }
        }
    }
    assert!(fails.is_empty(), "logprob fwd vs fused: {} failure(s):\n{}", fails.len(), fails.join("\n"));
}

/// GRPO at policy == old == reference, Bf16 precision: with old and ref log-probs from `fwd` of
/// the same mode, the fused loss sees ratio e^(logp − old) = 1 exactly: no clipped token, k3 = 0
/// exactly, logp equal to old bit for bit, and loss = −Σ w·A (TokenMean and SeqMean).
#[test]
fn grpo_ratio_exactly_one_cuda() {
    let Some(gpu) = cuda_or_skip("grpo_ratio_exactly_one_cuda") else { return };
    let hp =
        GrpoHyper { lambda: 1.0, tau: 0.5, beta_help: 0.5, eps_low: 0.2, eps_high: 0.28, beta_kl: 0.04, adv_eps: 1e-4 };
    let mut rng = Rng::new(13);
    let mut fails = Vec::new();
    for &(rows, l, h, v) in &[(3usize, 7usize, 48usize, 4099usize), (2, 5, 40, 152_064)] {
        let t = rows * l;
        let p = problem(&mut rng, t, h, v, logit_scale(v)).rounded(DType::BF16);
        let mut mask = p.mask.clone();
        mask[l..2 * l].iter_mut().for_each(|m| *m = 0.0);
        let adv: Vec<f32> = (0..rows).map(|_| rng.normal() as f32).collect();
        let up = |x: &[f32], d: DType| gpu.upload(x, d).unwrap();
        let (x, w, tg, bm, ba) = (
            up(&p.x, DType::BF16),
            up(&p.w, DType::BF16),
            gpu.upload_i32(&p.tg).unwrap(),
            up(&mask, DType::F32),
            up(&adv, DType::F32),
        );
        for (name, tune) in kept_tunings(v, DType::BF16) {
            // The old policy and the reference: the same weights, through `fwd` of this mode.
            let (mut old, mut ls) = (up(&vec![0.0; t], DType::F32), up(&vec![0.0; t], DType::F32));
            logprob::fwd_with(&gpu, &tune, &mut old, &mut ls, None, &x, &w, &tg, Some(&bm), t, h, v).unwrap();
            let batch = GrpoBatch { old_logp: &old, ref_logp: &old, mask: &bm, adv: &ba, rows, l };
            for agg in [Aggregation::TokenMean, Aggregation::SeqMean] {
                let (mut lp, mut dh, mut dw) = (
                    up(&vec![f32::NAN; t], DType::F32),
                    up(&vec![f32::NAN; t * h], DType::BF16),
                    up(&vec![0.0; v * h], DType::F32),
                );
                let s =
                    grpo::fused_loss_with(&gpu, &tune, &mut lp, &mut dh, &mut dw, &x, &w, &tg, &batch, h, v, &hp, agg)
                        .unwrap();
                let (nl, dl) = bit_diff(&gpu.to_vec(&lp).unwrap(), &gpu.to_vec(&old).unwrap());
                // loss = −Σ_tokens w_row · mask · A_row at ρ = 1 and k3 = 0.
                let m64 = to64(&mask);
                let (wrow, _) = grpo::cpu::row_weights::<f64>(&m64, rows, l, agg);
                let want: f64 = (0..t).map(|i| -wrow[i / l] * m64[i] * adv[i / l] as f64).sum();
                let el = (s.loss - want).abs() / want.abs().max(1e-3);
                let what = format!("grpo ratio {name} [rows={rows} l={l} h={h} v={v}] {agg:?}");
                println!("{what}: logp vs old {nl} of {t} differ (max {dl:.2e}); clip_frac {:e}, mean_kl {:e}, loss {:.6} vs {want:.6} (rel {el:.1e})", s.clip_frac, s.mean_kl, s.loss);
                if nl > 0 || s.clip_frac != 0.0 || s.mean_kl != 0.0 || el.is_nan() || el > 1e-5 {
                    fails.push(format!(
                        "{what}: {nl} logp differ (max {dl:.2e}), clip_frac {:e}, mean_kl {:e}, loss rel {el:.1e}",
                        s.clip_frac, s.mean_kl
                    ));
                }
            }
        }
    }
    assert!(fails.is_empty(), "grpo ratio at policy == old: {} failure(s):\n{}", fails.len(), fails.join("\n"));
}

/// The automatic split-K choice at the bench's size (H = 3,584, V = 152,064): on a 132-SM H200 the
/// cost model picks 4 slices for chunks of 2,048 tokens (640 MiB) and 3 for 2,731 (900 MiB).
#[test]
fn logprob_split_plan() {
    let tune = Tuning { dhidden_splits: 0, ..Tuning::exact() };
    assert_eq!(logprob::fused_plan(&Device::Cpu, &tune, 8192, 3584, 152_064, DType::BF16), None);
    let Some(gpu) = cuda_or_skip("logprob_split_plan") else { return };
    let sms = gpu.gpu().map_or(0, |g| g.sm_count);
    for (bytes, want) in [(640usize << 20, (2048usize, 4usize)), (900 << 20, (2731, 3))] {
        let tn = Tuning { fused_bytes: bytes, ..tune };
        let plan = logprob::fused_plan(&gpu, &tn, 8192, 3584, 152_064, DType::BF16);
        println!("logprob plan at {} MiB on {sms} SMs: (chunk rows, dhidden slices) = {plan:?}", bytes >> 20);
        assert_eq!(plan.map(|p| p.0), Some(want.0));
        if sms == 132 {
            assert_eq!(plan, Some(want));
        }
    }
}

/// `Tuning::dw_overwrite` on the CPU backend: dlm_head is written, not accumulated, by `fwd_bwd`
/// and `bwd` (a start of 7.0 everywhere must vanish), and is zeroed when every token is masked.
#[test]
fn logprob_cpu_dw_overwrite() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(14);
    let p = problem(&mut rng, 8, 5, 13, 2.0);
    let (t, h, v) = (p.t, p.h, p.v);
    let r = reference(&p, true, &vec![0.0; v * h]);
    let (x, w, tg, mk, g) = (
        dev.upload_act(&p.x).unwrap(),
        dev.upload_act(&p.w).unwrap(),
        dev.upload_i32(&p.tg).unwrap(),
        dev.upload(&p.mask, DType::F32).unwrap(),
        dev.upload(&p.g, DType::F32).unwrap(),
    );
    let tune = Tuning { dw_overwrite: true, ..Tuning::exact() };
    let (mut lp, mut dh) = (dev.zeros_f32(t).unwrap(), dev.zeros_act(t * h).unwrap());
    let mut dw = dev.upload(&vec![7.0; v * h], DType::F32).unwrap();
    let mut grad = |c: GradChunk<'_>| logprob::gather_scaled(&dev, c.dlogp, &g, c.idx, c.p0, c.n, 1.0);
    logprob::fwd_bwd_with(&dev, &tune, &mut lp, None, &mut dh, &mut dw, &x, &w, &tg, Some(&mk), t, h, v, &mut grad)
        .unwrap();
    let e = rel_err(dw.host().unwrap(), &r.dw);
    println!("logprob cpu fused dw_overwrite dlm_head: rel err {e:.2e}");
    assert!(e < 1e-5, "fused dw_overwrite: {e:.2e}");
    // bwd: dlogp = g · mask, lse from fwd.
    let (mut lp, mut ls) = (dev.zeros_f32(t).unwrap(), dev.zeros_f32(t).unwrap());
    logprob::fwd(&dev, &mut lp, &mut ls, None, &x, &w, &tg, Some(&mk), t, h, v).unwrap();
    let gm: Vec<f32> = (0..t).map(|i| p.g[i] * p.mask[i]).collect();
    let mut dw = dev.upload(&vec![7.0; v * h], DType::F32).unwrap();
    logprob::bwd_with(
        &dev,
        &tune,
        &mut dh,
        Some(&mut dw),
        &dev.upload(&gm, DType::F32).unwrap(),
        &x,
        &w,
        &tg,
        &ls,
        t,
        h,
        v,
    )
    .unwrap();
    let e = rel_err(dw.host().unwrap(), &r.dw);
    println!("logprob cpu bwd dw_overwrite dlm_head: rel err {e:.2e}");
    assert!(e < 1e-5, "bwd dw_overwrite: {e:.2e}");
    // Every token masked: dlm_head becomes 0.
    let none = dev.upload(&vec![0.0; t], DType::F32).unwrap();
    let mut dw = dev.upload(&vec![7.0; v * h], DType::F32).unwrap();
    logprob::fwd_bwd_with(&dev, &tune, &mut lp, None, &mut dh, &mut dw, &x, &w, &tg, Some(&none), t, h, v, &mut grad)
        .unwrap();
    assert!(dw.host().unwrap().iter().all(|&z| z == 0.0));
}

/// The same on CUDA with every token masked (no GEMM runs): dlm_head must still be written (0),
/// for both precisions; a NaN start would survive if it were not.
#[test]
fn logprob_cuda_dw_overwrite_all_masked() {
    let Some(gpu) = cuda_or_skip("logprob_cuda_dw_overwrite_all_masked") else { return };
    let mut rng = Rng::new(15);
    let p = problem(&mut rng, 6, 16, 40, 2.0);
    let (t, h, v) = (p.t, p.h, p.v);
    let dt = DType::BF16;
    let up = |x: &[f32], d: DType| gpu.upload(x, d).unwrap();
    let (x, w, tg, none, g) = (
        up(&p.x, dt),
        up(&p.w, dt),
        gpu.upload_i32(&p.tg).unwrap(),
        up(&vec![0.0; t], DType::F32),
        up(&p.g, DType::F32),
    );
    let mut fails = Vec::new();
    for var in [1u8, 3] {
        let tune = Tuning {
            precision: if var == 3 { LogitPrecision::Bf16 } else { LogitPrecision::ExactF32 },
            dw_overwrite: true,
            ..Tuning::exact()
        };
        let (mut lp, mut dh, mut dw) = (
            up(&vec![f32::NAN; t], DType::F32),
            up(&vec![f32::NAN; t * h], dt),
            up(&vec![f32::NAN; v * h], DType::F32),
        );
        let mut grad = |c: GradChunk<'_>| logprob::gather_scaled(&gpu, c.dlogp, &g, c.idx, c.p0, c.n, 1.0);
        logprob::fwd_bwd_with(
            &gpu,
            &tune,
            &mut lp,
            None,
            &mut dh,
            &mut dw,
            &x,
            &w,
            &tg,
            Some(&none),
            t,
            h,
            v,
            &mut grad,
        )
        .unwrap();
        let ok = [&lp, &dh, &dw].iter().all(|b| gpu.to_vec(b).unwrap().iter().all(|&z| z == 0.0));
        // bwd with dlogp = 0 everywhere.
        let mut dw2 = up(&vec![f32::NAN; v * h], DType::F32);
        logprob::bwd_with(&gpu, &tune, &mut dh, Some(&mut dw2), &none, &x, &w, &tg, &none, t, h, v).unwrap();
        let ok2 =
            gpu.to_vec(&dw2).unwrap().iter().all(|&z| z == 0.0) && gpu.to_vec(&dh).unwrap().iter().all(|&z| z == 0.0);
        println!("logprob cuda dw_overwrite all masked v{var}: fused outputs zero {ok}, bwd outputs zero {ok2}");
        if !ok || !ok2 {
            fails.push(format!("v{var}: fused zero {ok}, bwd zero {ok2}"));
        }
    }
    assert!(fails.is_empty(), "dw_overwrite all masked: {fails:?}");
}

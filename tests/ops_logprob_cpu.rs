//! Grouped log-prob fused with the lm_head on the CPU backend: the backward against finite
//! differences (f64), the forward against a direct formula, the fused path against fwd + bwd,
//! `fwd` against the fused pass for every tuning, `Tuning::dw_overwrite`, and the bf16-logit
//! references (used for the GPU's Bf16 pass) against the exact ones.
mod common;
use am3safety::ops::logprob::{self, cpu, GradChunk, Tuning};
use am3safety::tensor::{DType, Device};
use common::*;

#[path = "support/logprob.rs"]
mod logprob_support;
use logprob_support::*;

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
            cpu::fwd(
                cpu::FwdOut { logp: &mut lp, lse: &mut ls, entropy: None },
                cpu::Inputs { hidden: x, lm_head: w, targets: &p.tg, dims: logprob::Dims { t, h, v } },
                Some(&m64),
            )
            .unwrap();
            dot(&lp, &g)
        };
        let (mut lp, mut ls) = (vec![0.0; t], vec![0.0; t]);
        cpu::fwd(
            cpu::FwdOut { logp: &mut lp, lse: &mut ls, entropy: None },
            cpu::Inputs { hidden: &x, lm_head: &w, targets: &p.tg, dims: logprob::Dims { t, h, v } },
            Some(&m64),
        )
        .unwrap();
        let mut dh = vec![f64::NAN; t * h];
        let mut dw = vec![0.0; v * h];
        cpu::bwd(
            &mut dh,
            &mut dw,
            cpu::Inputs { hidden: &x, lm_head: &w, targets: &p.tg, dims: logprob::Dims { t, h, v } },
            &g,
            &ls,
        )
        .unwrap();
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
    cpu::fwd(
        cpu::FwdOut { logp: &mut lp, lse: &mut ls, entropy: Some(&mut en) },
        cpu::Inputs { hidden: &x, lm_head: &w, targets: &p.tg, dims: logprob::Dims { t, h, v } },
        None,
    )
    .unwrap();
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
    assert!(worst < Tol::F64Reference.value());
    // Masked tokens read as 0; a bad target on an active token is an error naming it.
    let m = vec![0.0; t];
    cpu::fwd(
        cpu::FwdOut { logp: &mut lp, lse: &mut ls, entropy: Some(&mut en) },
        cpu::Inputs { hidden: &x, lm_head: &w, targets: &p.tg, dims: logprob::Dims { t, h, v } },
        Some(&m),
    )
    .unwrap();
    assert!(lp.iter().chain(&ls).chain(&en).all(|&z| z == 0.0));
    let mut bad = p.tg.clone();
    bad[2] = v as i32;
    let e = cpu::fwd(
        cpu::FwdOut { logp: &mut lp, lse: &mut ls, entropy: None },
        cpu::Inputs { hidden: &x, lm_head: &w, targets: &bad, dims: logprob::Dims { t, h, v } },
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("token 2"), "{e}");
    // Shape errors name the op and argument.
    let dev = Device::Cpu;
    let z = |n| dev.zeros_f32(n).unwrap();
    let e = logprob::fwd(
        &dev,
        logprob::FwdOut { logp: &mut z(t), lse: &mut z(t), entropy: None },
        logprob::Inputs {
            hidden: &z(t * h),
            lm_head: &z(v * h + 1),
            targets: &dev.upload_i32(&p.tg).unwrap(),
            dims: logprob::Dims { t, h, v },
        },
        None,
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
            logprob::FusedOut { logp: &mut lp, entropy: Some(&mut en), dhidden: &mut dh, dlm_head: &mut dw },
            logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
            masked.then_some(&mk),
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
            assert!(e < Tol::F32Reference.value(), "logprob cpu fused {name}: {e:.2e}");
        }
    }
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
    let (lp, ls, en) =
        fwd_bf16_logits(cpu::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } }, None);
    let (mut lp0, mut ls0, mut en0) = (vec![0f64; t], vec![0f64; t], vec![0f64; t]);
    cpu::fwd(
        cpu::FwdOut { logp: &mut lp0, lse: &mut ls0, entropy: Some(&mut en0) },
        cpu::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
        None,
    )
    .unwrap();
    let (dh, dw) = bwd_bf16_logits(
        cpu::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
        &g,
        &ls,
    );
    let (mut dh0, mut dw0) = (vec![0f64; t * h], vec![0f64; v * h]);
    cpu::bwd(
        &mut dh0,
        &mut dw0,
        cpu::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
        &g,
        &ls0,
    )
    .unwrap();
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
        assert!(e < Tol::CpuOpSelf.value(), "bf16-logit reference {name}: {e:.2e}");
    }
    // Generic values: the references differ by the rounding alone.
    let p = problem(&mut rng, 7, 33, 1000, 4.0).rounded(DType::BF16);
    let (x, w) = (to64(&p.x), to64(&p.w));
    let (lp, _, _) = fwd_bf16_logits(
        cpu::Inputs { hidden: &x, lm_head: &w, targets: &p.tg, dims: logprob::Dims { t: p.t, h: p.h, v: p.v } },
        None,
    );
    let (mut lp0, mut ls0) = (vec![0f64; p.t], vec![0f64; p.t]);
    cpu::fwd(
        cpu::FwdOut { logp: &mut lp0, lse: &mut ls0, entropy: None },
        cpu::Inputs { hidden: &x, lm_head: &w, targets: &p.tg, dims: logprob::Dims { t: p.t, h: p.h, v: p.v } },
        None,
    )
    .unwrap();
    let worst = lp.iter().zip(&lp0).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    println!("bf16-logit reference vs exact, logits of spread 4: max |logp diff| {worst:.2e}");
    assert!(worst > 0.0 && worst < 0.1, "bf16 rounding of logits moved logp by {worst:.2e}");
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
            logprob::fwd_with(
                &dev,
                &tune,
                logprob::FwdOut { logp: &mut lp, lse: &mut ls, entropy: None },
                logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
                mask,
            )
            .unwrap();
            let (mut lp2, mut dh, mut dw) =
                (dev.zeros_f32(t).unwrap(), dev.zeros_act(t * h).unwrap(), dev.zeros_f32(v * h).unwrap());
            let mut grad = |c: GradChunk<'_>| logprob::gather_scaled(&dev, c.dlogp, &g, c.idx, c.p0, c.n, 1.0);
            logprob::fwd_bwd_with(
                &dev,
                &tune,
                logprob::FusedOut { logp: &mut lp2, entropy: None, dhidden: &mut dh, dlm_head: &mut dw },
                logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
                mask,
                &mut grad,
            )
            .unwrap();
            let e = max_abs(lp.host().unwrap(), lp2.host().unwrap());
            println!("logprob cpu fwd vs fused logp {name} masked={masked}: max abs diff {e:.2e}");
            assert!(e <= Tol::CpuOpSelf.value(), "logprob cpu fwd vs fused {name} masked={masked}: {e:.2e}");
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
    logprob::fwd_bwd_with(
        &dev,
        &tune,
        logprob::FusedOut { logp: &mut lp, entropy: None, dhidden: &mut dh, dlm_head: &mut dw },
        logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
        Some(&mk),
        &mut grad,
    )
    .unwrap();
    let e = rel_err(dw.host().unwrap(), &r.dw);
    println!("logprob cpu fused dw_overwrite dlm_head: rel err {e:.2e}");
    assert!(e < Tol::F32Reference.value(), "fused dw_overwrite: {e:.2e}");
    // bwd: dlogp = g · mask, lse from fwd.
    let (mut lp, mut ls) = (dev.zeros_f32(t).unwrap(), dev.zeros_f32(t).unwrap());
    logprob::fwd(
        &dev,
        logprob::FwdOut { logp: &mut lp, lse: &mut ls, entropy: None },
        logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
        Some(&mk),
    )
    .unwrap();
    let gm: Vec<f32> = (0..t).map(|i| p.g[i] * p.mask[i]).collect();
    let mut dw = dev.upload(&vec![7.0; v * h], DType::F32).unwrap();
    logprob::bwd_with(
        &dev,
        &tune,
        logprob::BwdOut { dhidden: &mut dh, dlm_head: Some(&mut dw) },
        logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
        &dev.upload(&gm, DType::F32).unwrap(),
        &ls,
    )
    .unwrap();
    let e = rel_err(dw.host().unwrap(), &r.dw);
    println!("logprob cpu bwd dw_overwrite dlm_head: rel err {e:.2e}");
    assert!(e < Tol::F32Reference.value(), "bwd dw_overwrite: {e:.2e}");
    // Every token masked: dlm_head becomes 0.
    let none = dev.upload(&vec![0.0; t], DType::F32).unwrap();
    let mut dw = dev.upload(&vec![7.0; v * h], DType::F32).unwrap();
    logprob::fwd_bwd_with(
        &dev,
        &tune,
        logprob::FusedOut { logp: &mut lp, entropy: None, dhidden: &mut dh, dlm_head: &mut dw },
        logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
        Some(&none),
        &mut grad,
    )
    .unwrap();
    assert!(dw.host().unwrap().iter().all(|&z| z == 0.0));
}

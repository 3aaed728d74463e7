//! The fused GRPO loss (log-prob fused with the lm_head, then the clipped ratio and k3 KL): on
//! the CPU and on CUDA (bf16, f32) against fwd → loss → bwd composed from the f64 references,
//! and on CUDA at policy == old == reference, where the ratio must be exactly 1.
mod common;
use am3safety::ops::grpo::{self, Aggregation, GrpoBatch, GrpoHyper};
use am3safety::ops::logprob::{self, cpu, LogitPrecision, Tuning};
use am3safety::tensor::{DType, Device};
use common::*;

#[path = "support/logprob.rs"]
mod logprob_support;
use logprob_support::*;

/// The fused GRPO loss on `dev` against fwd → loss → bwd composed from the f64 references.
fn check_grpo_fused(dev: &Device, dtypes: &[(DType, Tol)]) -> Vec<String> {
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
            cpu::fwd(
                cpu::FwdOut { logp: &mut lp, lse: &mut ls, entropy: None },
                cpu::Inputs { hidden: &x64, lm_head: &w64, targets: &p.tg, dims: logprob::Dims { t, h, v } },
                Some(&m64),
            )
            .unwrap();
            let old: Vec<f64> = lp.iter().map(|&x| x - [0.0, 0.05, -0.05, 0.6, -0.6][rng.below(5)]).collect();
            let rf: Vec<f64> = lp.iter().map(|&x| x + rng.range(-0.5, 0.5)).collect();
            let adv: Vec<f64> = (0..rows).map(|_| rng.normal()).collect();
            // Round the inputs through f32 first: that is what the device sees.
            let r32 = |v: &[f64]| v.iter().map(|&x| x as f32 as f64).collect::<Vec<f64>>();
            let (old, rf, adv) = (r32(&old), r32(&rf), r32(&adv));
            // The Bf16 pass on the GPU too; in bf16 it is held to the bf16-rounded-logit reference.
            // var: 1 = ExactF32, 3 = Bf16 (rounds the logits to bf16).
            let variants: &[u8] = if matches!(dev, Device::Cuda(_)) { &[1, 3] } else { &[1] };
            let rounded = (dt == DType::BF16 && variants.len() > 1).then(|| {
                fwd_bf16_logits(
                    cpu::Inputs { hidden: &x64, lm_head: &w64, targets: &p.tg, dims: logprob::Dims { t, h, v } },
                    Some(&m64),
                )
            });
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
                let s64 = grpo::cpu::loss_fwd_bwd::<f64>(
                    &mut dl,
                    lp,
                    &grpo::GrpoBatch { old_logp: &old, ref_logp: &rf, mask: &m64, adv: &adv, rows, l },
                    &hp,
                    agg,
                );
                let (dh, dw) = if rounded.is_some() && bf {
                    bwd_bf16_logits(
                        cpu::Inputs { hidden: &x64, lm_head: &w64, targets: &p.tg, dims: logprob::Dims { t, h, v } },
                        &dl,
                        ls,
                    )
                } else {
                    let mut dh = vec![0f64; t * h];
                    let mut dw = vec![0f64; v * h];
                    cpu::bwd(
                        &mut dh,
                        &mut dw,
                        cpu::Inputs { hidden: &x64, lm_head: &w64, targets: &p.tg, dims: logprob::Dims { t, h, v } },
                        &dl,
                        ls,
                    )
                    .unwrap();
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
                let out = logprob::FusedOut { logp: &mut blp, entropy: None, dhidden: &mut bdh, dlm_head: &mut bdw };
                let x = logprob::Inputs { hidden: &bx, lm_head: &bw, targets: &btg, dims: logprob::Dims { t, h, v } };
                let s = grpo::fused_loss_with(dev, &tune, out, x, &batch, &hp, agg).unwrap();
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
                    if e.is_nan() || e > tol.value() {
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
    let fails = check_grpo_fused(&Device::Cpu, &[(DType::F32, Tol::F32Reference)]);
    assert!(fails.is_empty(), "grpo fused cpu: {} failure(s):\n{}", fails.len(), fails.join("\n"));
}

#[test]
fn grpo_fused_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("grpo_fused_cuda_matches_cpu") else { return };
    let fails = check_grpo_fused(&gpu, &[(DType::BF16, Tol::LogprobBf16), (DType::F32, Tol::F32Reference)]);
    assert!(fails.is_empty(), "grpo fused cuda vs cpu: {} failure(s):\n{}", fails.len(), fails.join("\n"));
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
            logprob::fwd_with(
                &gpu,
                &tune,
                logprob::FwdOut { logp: &mut old, lse: &mut ls, entropy: None },
                logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
                Some(&bm),
            )
            .unwrap();
            let batch = GrpoBatch { old_logp: &old, ref_logp: &old, mask: &bm, adv: &ba, rows, l };
            for agg in [Aggregation::TokenMean, Aggregation::SeqMean] {
                let (mut lp, mut dh, mut dw) = (
                    up(&vec![f32::NAN; t], DType::F32),
                    up(&vec![f32::NAN; t * h], DType::BF16),
                    up(&vec![0.0; v * h], DType::F32),
                );
                let out = logprob::FusedOut { logp: &mut lp, entropy: None, dhidden: &mut dh, dlm_head: &mut dw };
                let xs = logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } };
                let s = grpo::fused_loss_with(&gpu, &tune, out, xs, &batch, &hp, agg).unwrap();
                let (nl, dl) = bit_diff(&gpu.to_vec(&lp).unwrap(), &gpu.to_vec(&old).unwrap());
                // loss = −Σ_tokens w_row · mask · A_row at ρ = 1 and k3 = 0.
                let m64 = to64(&mask);
                let (wrow, _) = grpo::cpu::row_weights::<f64>(&m64, rows, l, agg);
                let want: f64 = (0..t).map(|i| -wrow[i / l] * m64[i] * adv[i / l] as f64).sum();
                let el = (s.loss - want).abs() / want.abs().max(1e-3);
                let what = format!("grpo ratio {name} [rows={rows} l={l} h={h} v={v}] {agg:?}");
                println!("{what}: logp vs old {nl} of {t} differ (max {dl:.2e}); clip_frac {:e}, mean_kl {:e}, loss {:.6} vs {want:.6} (rel {el:.1e})", s.clip_frac, s.mean_kl, s.loss);
                if nl > 0 || s.clip_frac != 0.0 || s.mean_kl != 0.0 || el.is_nan() || el > Tol::F32Reference.value() {
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

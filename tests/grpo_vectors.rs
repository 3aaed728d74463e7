//! GRPO reward / advantage / loss against the reference vectors
//! (../shared/fixtures/grpo_vectors.safetensors, or $AM3_GRPO_VECTORS; hyper-parameters from its
//! metadata header): every tensor within 1e-10 relative on the CPU in f64 and 1e-5 on the GPU in
//! f32. Plus finite differences of the loss, edge cases, and GPU-vs-CPU at random shapes.
mod common;
#[path = "support/grpo_vectors.rs"]
mod vectors;
use am3safety::ops::grpo::{self, cpu, Aggregation, GrpoHyper, LossStats, RewardBufs};
use am3safety::tensor::{DType, Device};
use common::*;
use std::collections::HashMap;
use vectors::{load, Vectors};

fn rel_scalar(a: f64, b: f64) -> f64 {
    if !a.is_finite() {
        return f64::INFINITY;
    }
    (a - b).abs() / b.abs().max(1e-300)
}

const AGGS: [(Aggregation, &str, &str, &str); 2] = [
    (Aggregation::TokenMean, "loss_token_mean", "grad_token_mean", "token-mean"),
    (Aggregation::SeqMean, "loss_seq_mean", "grad_seq_mean", "seq-mean"),
];

#[test]
fn grpo_vectors_cpu_f64() {
    let vx = load();
    let (p, n, t, rows, l) = vx.dims();
    let r = cpu::turn_rewards::<f64>(vx.get("safe"), vx.get("help"), grpo::RewardDims { p, n, t }, &vx.hp).unwrap();
    let mut worst = 0f64;
    for (name, got) in [
        ("turn_mean", &r.turn_mean),
        ("turn_var", &r.turn_var),
        ("turn_importance", &r.turn_importance),
        ("turn_weight", &r.turn_weight),
        ("reward", &r.reward),
        ("advantage", &r.advantage),
    ] {
        let e = rel_err64(got, vx.get(name));
        println!("grpo cpu f64 {name}: rel err {e:.2e}");
        worst = worst.max(e);
        assert!(e <= 1e-10, "grpo cpu f64 {name}: rel err {e:.2e} > 1e-10");
    }
    for (agg, lname, gname, what) in AGGS {
        let mut d = vec![f64::NAN; rows * l];
        let s = cpu::loss_fwd_bwd::<f64>(
            &mut d,
            vx.get("logp"),
            &grpo::GrpoBatch {
                old_logp: vx.get("old_logp"),
                ref_logp: vx.get("ref_logp"),
                mask: vx.get("mask"),
                adv: vx.get("advantage"),
                rows,
                l,
            },
            &vx.hp,
            agg,
        );
        let el = rel_scalar(s.loss, vx.get(lname)[0]);
        let eg = rel_err64(&d, vx.get(gname));
        println!("grpo cpu f64 {what}: loss {:.12} (ref {:.12}) rel err {el:.2e}; grad rel err {eg:.2e}; clip frac {:.4}, mean kl {:.3e}", s.loss, vx.get(lname)[0], s.clip_frac, s.mean_kl);
        assert!(el <= 1e-10, "grpo cpu f64 {lname}: rel err {el:.2e}");
        assert!(eg <= 1e-10, "grpo cpu f64 {gname}: rel err {eg:.2e}");
        assert!((0.0..=1.0).contains(&s.clip_frac) && s.mean_kl >= 0.0, "grpo stats out of range: {s:?}");
    }
    println!("grpo cpu f64: worst reward-side rel err {worst:.2e}");
}

/// The public f32 entry points on the CPU backend (what the trainer calls without a GPU).
#[test]
fn grpo_vectors_cpu_backend_f32() {
    let vx = load();
    check_device_f32(&Device::Cpu, &vx, "cpu");
}

#[test]
fn grpo_vectors_cuda_f32() {
    let Some(gpu) = cuda_or_skip("grpo_vectors_cuda_f32") else { return };
    let vx = load();
    check_device_f32(&gpu, &vx, "cuda");
}

/// rewards and loss_fwd_bwd on `dev` in f32 against the vectors, 1e-5; the statistics against the
/// f64 reference.
fn check_device_f32(dev: &Device, vx: &Vectors, label: &str) {
    let (p, n, t, rows, l) = vx.dims();
    let up = |name: &str| dev.upload(&vx.f32(name), DType::F32).unwrap();
    let mut out = RewardBufs::new(dev, p, n, t).unwrap();
    for b in [&mut out.turn_mean, &mut out.turn_var, &mut out.turn_importance, &mut out.turn_weight] {
        *b = dev.upload(&vec![f32::NAN; p * t], DType::F32).unwrap();
    }
    for b in [&mut out.reward, &mut out.advantage] {
        *b = dev.upload(&vec![f32::NAN; p * n], DType::F32).unwrap();
    }
    grpo::rewards(dev, &mut out, &up("safe"), &up("help"), grpo::RewardDims { p, n, t }, &vx.hp).unwrap();
    let mut fails = Vec::new();
    for (name, b) in [
        ("turn_mean", &out.turn_mean),
        ("turn_var", &out.turn_var),
        ("turn_importance", &out.turn_importance),
        ("turn_weight", &out.turn_weight),
        ("reward", &out.reward),
        ("advantage", &out.advantage),
    ] {
        let e = rel_err(&dev.to_vec(b).unwrap(), &vx.f32(name));
        println!("grpo {label} f32 {name}: rel err {e:.2e}");
        if e > 1e-5 {
            fails.push(format!("{name}: {e:.2e}"));
        }
    }
    let (logp, old, rf, mask, adv) = (up("logp"), up("old_logp"), up("ref_logp"), up("mask"), up("advantage"));
    for (agg, lname, gname, what) in AGGS {
        let mut d = dev.upload(&vec![f32::NAN; rows * l], DType::F32).unwrap();
        let s = grpo::loss_fwd_bwd(
            dev,
            &mut d,
            &logp,
            &grpo::GrpoBatch { old_logp: &old, ref_logp: &rf, mask: &mask, adv: &adv, rows, l },
            &vx.hp,
            agg,
        )
        .unwrap();
        let mut d64 = vec![0f64; rows * l];
        let s64 = cpu::loss_fwd_bwd::<f64>(
            &mut d64,
            vx.get("logp"),
            &grpo::GrpoBatch {
                old_logp: vx.get("old_logp"),
                ref_logp: vx.get("ref_logp"),
                mask: vx.get("mask"),
                adv: vx.get("advantage"),
                rows,
                l,
            },
            &vx.hp,
            agg,
        );
        let el = rel_scalar(s.loss, vx.get(lname)[0]);
        let eg = rel_err(&dev.to_vec(&d).unwrap(), &vx.f32(gname));
        let ec = (s.clip_frac - s64.clip_frac).abs();
        let ek = rel_scalar(s.mean_kl, s64.mean_kl);
        println!("grpo {label} f32 {what}: loss rel err {el:.2e}, grad rel err {eg:.2e}, clip frac {:.4} vs {:.4}, mean kl rel err {ek:.2e}", s.clip_frac, s64.clip_frac);
        for (nm, e) in [(lname, el), (gname, eg), ("clip_frac (abs)", ec), ("mean_kl", ek)] {
            if e > 1e-5 {
                fails.push(format!("{nm}: {e:.2e}"));
            }
        }
    }
    assert!(fails.is_empty(), "grpo {label} f32 above 1e-5: {fails:?}");
}

/// d loss / d logp against central differences of the f64 loss, on the vectors' data.
#[test]
fn grpo_loss_cpu_gradcheck() {
    let vx = load();
    let (_, _, _, rows, l) = vx.dims();
    for (agg, _, _, what) in AGGS {
        let (old, rf, mask, adv) = (vx.get("old_logp"), vx.get("ref_logp"), vx.get("mask"), vx.get("advantage"));
        let mut d = vec![0f64; rows * l];
        cpu::loss_fwd_bwd::<f64>(
            &mut d,
            vx.get("logp"),
            &grpo::GrpoBatch { old_logp: old, ref_logp: rf, mask, adv, rows, l },
            &vx.hp,
            agg,
        );
        let mut scratch = vec![0f64; rows * l];
        gradcheck(
            &format!("grpo loss {what} dlogp"),
            vx.get("logp"),
            &d,
            &mut |lp| {
                cpu::loss_fwd_bwd::<f64>(
                    &mut scratch,
                    lp,
                    &grpo::GrpoBatch { old_logp: old, ref_logp: rf, mask, adv, rows, l },
                    &vx.hp,
                    agg,
                )
                .loss
            },
            400,
            1e-4,
        );
    }
}

/// Σ over tokens of |weighted per-token loss| (f64), the scale of the loss's rounding error.
fn loss_scale(logp: &[f32], batch: &grpo::GrpoBatch<[f32]>, hp: &GrpoHyper, agg: Aggregation) -> f64 {
    let grpo::GrpoBatch { old_logp: old, ref_logp: rf, mask, adv, rows, l } = *batch;
    let (w, _) = cpu::row_weights::<f64>(&to64(mask), rows, l, agg);
    (0..rows * l)
        .filter(|&i| mask[i] != 0.0)
        .map(|i| {
            (mask[i] as f64
                * w[i / l]
                * cpu::token::<f64>(logp[i] as f64, old[i] as f64, rf[i] as f64, adv[i / l] as f64, hp).0)
                .abs()
        })
        .sum()
}

fn hyper() -> GrpoHyper {
    GrpoHyper { lambda: 1.0, tau: 0.5, beta_help: 0.5, eps_low: 0.2, eps_high: 0.28, beta_kl: 0.04, adv_eps: 1e-4 }
}

#[test]
fn grpo_metadata_errors_and_edges() {
    let mut m: HashMap<String, String> = [
        ("lambda", "2"),
        ("tau", "0.3"),
        ("beta_help", "1"),
        ("eps_low", "0.1"),
        ("eps_high", "0.2"),
        ("beta_kl", "0"),
        ("adv_eps", "1e-6"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(GrpoHyper::from_metadata(&m).unwrap().lambda, 2.0);
    m.insert("tau".into(), "abc".into());
    let e = GrpoHyper::from_metadata(&m).unwrap_err().to_string();
    assert!(e.contains("tau"), "{e}");
    m.remove("tau");
    assert!(GrpoHyper::from_metadata(&m).is_err());
    // One rollout: no group to compare against, advantage 0.
    let r =
        cpu::turn_rewards::<f64>(&[0.2, 0.9], &[0.5, 0.5], grpo::RewardDims { p: 1, n: 1, t: 2 }, &hyper()).unwrap();
    assert_eq!(r.advantage, vec![0.0]);
    // Identical rollouts: advantage 0.
    let r = cpu::turn_rewards::<f64>(&[0.3; 6], &[0.1; 6], grpo::RewardDims { p: 1, n: 3, t: 2 }, &hyper()).unwrap();
    assert!(r.advantage.iter().all(|&a| a.abs() < 1e-12), "{:?}", r.advantage);
    assert!(cpu::turn_rewards::<f64>(&[0.3; 5], &[0.1; 6], grpo::RewardDims { p: 1, n: 3, t: 2 }, &hyper()).is_err());
    // Seq-mean skips empty sequences; an all-masked batch has zero loss and gradient.
    let (rows, l) = (3, 4);
    let mask = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
    let (w, total) = cpu::row_weights::<f64>(&mask, rows, l, Aggregation::SeqMean);
    assert_eq!((w, total), (vec![0.25, 0.0, 0.5], 3.0));
    let mut d = vec![1.0; rows * l];
    let s = cpu::loss_fwd_bwd::<f64>(
        &mut d,
        &[-1.0; 12],
        &grpo::GrpoBatch {
            old_logp: &[-1.1; 12],
            ref_logp: &[-0.9; 12],
            mask: &[0.0; 12],
            adv: &[1.0, -1.0, 0.5],
            rows,
            l,
        },
        &hyper(),
        Aggregation::TokenMean,
    );
    assert_eq!(s, LossStats::default());
    assert!(d.iter().all(|&x| x == 0.0));
    // Bad shapes are errors naming the op and the argument.
    let dev = Device::Cpu;
    let b = |n: usize| dev.zeros_f32(n).unwrap();
    let e = grpo::loss_fwd_bwd(
        &dev,
        &mut b(12),
        &b(12),
        &grpo::GrpoBatch { old_logp: &b(12), ref_logp: &b(11), mask: &b(12), adv: &b(3), rows, l },
        &hyper(),
        Aggregation::TokenMean,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("grpo_loss") && e.contains("ref_logp"), "{e}");
}

/// GPU (f32) vs the f64 CPU reference at random shapes, odd and size-1 ones included, with empty
/// sequences and ratios on both sides of the clip range.
#[test]
fn grpo_cuda_matches_cpu_random() {
    let Some(gpu) = cuda_or_skip("grpo_cuda_matches_cpu_random") else { return };
    let hp = hyper();
    let mut rng = Rng::new(11);
    let mut fails = Vec::new();
    for &(p, n, t) in &[(1usize, 1usize, 1usize), (5, 3, 7), (2, 16, 3), (7, 33, 5)] {
        let safe = rng.uniform_vec(p * n * t, 0.0, 1.0);
        let help = rng.uniform_vec(p * n * t, 0.0, 1.0);
        let r64 = cpu::turn_rewards::<f64>(&to64(&safe), &to64(&help), grpo::RewardDims { p, n, t }, &hp).unwrap();
        let mut out = RewardBufs::new(&gpu, p, n, t).unwrap();
        out.advantage = gpu.upload(&vec![f32::NAN; p * n], DType::F32).unwrap();
        out.turn_weight = gpu.upload(&vec![f32::NAN; p * t], DType::F32).unwrap();
        grpo::rewards(
            &gpu,
            &mut out,
            &gpu.upload(&safe, DType::F32).unwrap(),
            &gpu.upload(&help, DType::F32).unwrap(),
            grpo::RewardDims { p, n, t },
            &hp,
        )
        .unwrap();
        for (name, b, want) in [
            ("turn_weight", &out.turn_weight, &r64.turn_weight),
            ("reward", &out.reward, &r64.reward),
            ("advantage", &out.advantage, &r64.advantage),
        ] {
            let got = gpu.to_vec(b).unwrap();
            let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
            // n = 1 gives all-zero advantages: compare absolutely there.
            let e = if want.iter().all(|&x| x == 0.0) { max_abs(&got, &want) } else { rel_err(&got, &want) };
            println!("grpo rewards cuda [{p}x{n}x{t}] {name}: err {e:.2e}");
            if e > 1e-5 {
                fails.push(format!("rewards [{p}x{n}x{t}] {name}: {e:.2e}"));
            }
        }
    }
    for &(rows, l) in &[(1usize, 1usize), (5, 33), (64, 1000), (3, 4099)] {
        let logp: Vec<f32> = (0..rows * l).map(|_| -(rng.uniform() * 5.0) as f32).collect();
        // Ratios well inside and well outside the clip range, never near its edges.
        let old: Vec<f32> = logp.iter().map(|&x| x - [0.0f32, 0.05, -0.05, 0.6, -0.6][rng.below(5)]).collect();
        let rf: Vec<f32> = logp.iter().map(|&x| x + rng.range(-0.5, 0.5) as f32).collect();
        let mut mask: Vec<f32> = (0..rows * l).map(|_| (rng.uniform() < 0.7) as u8 as f32).collect();
        if rows > 2 {
            mask[l..2 * l].iter_mut().for_each(|m| *m = 0.0); // an empty sequence
        }
        let adv: Vec<f32> = (0..rows).map(|_| rng.normal() as f32).collect();
        let up = |v: &[f32]| gpu.upload(v, DType::F32).unwrap();
        let (bl, bo, br, bm, ba) = (up(&logp), up(&old), up(&rf), up(&mask), up(&adv));
        for agg in [Aggregation::TokenMean, Aggregation::SeqMean] {
            let mut d = up(&vec![f32::NAN; rows * l]);
            let s = grpo::loss_fwd_bwd(
                &gpu,
                &mut d,
                &bl,
                &grpo::GrpoBatch { old_logp: &bo, ref_logp: &br, mask: &bm, adv: &ba, rows, l },
                &hp,
                agg,
            )
            .unwrap();
            let mut d64 = vec![0f64; rows * l];
            let s64 = cpu::loss_fwd_bwd::<f64>(
                &mut d64,
                &to64(&logp),
                &grpo::GrpoBatch {
                    old_logp: &to64(&old),
                    ref_logp: &to64(&rf),
                    mask: &to64(&mask),
                    adv: &to64(&adv),
                    rows,
                    l,
                },
                &hp,
                agg,
            );
            let want: Vec<f32> = d64.iter().map(|&x| x as f32).collect();
            let eg = rel_err(&gpu.to_vec(&d).unwrap(), &want);
            // The loss can be a small difference of large terms: measure it against Σ|terms|.
            let host =
                grpo::GrpoBatch { old_logp: &old[..], ref_logp: &rf[..], mask: &mask[..], adv: &adv[..], rows, l };
            let el = (s.loss - s64.loss).abs() / loss_scale(&logp, &host, &hp, agg).max(1e-30);
            let ec = (s.clip_frac - s64.clip_frac).abs();
            let ek = rel_scalar(s.mean_kl, s64.mean_kl);
            println!("grpo loss cuda [{rows}x{l}] {agg:?}: loss rel {el:.2e}, grad rel {eg:.2e}, clip frac {:.4} vs {:.4}, kl rel {ek:.2e}", s.clip_frac, s64.clip_frac);
            for (nm, e) in [("loss", el), ("grad", eg), ("clip_frac", ec), ("mean_kl", ek)] {
                if e > 1e-5 {
                    fails.push(format!("loss [{rows}x{l}] {agg:?} {nm}: {e:.2e}"));
                }
            }
        }
    }
    assert!(fails.is_empty(), "grpo cuda vs cpu above 1e-5: {fails:?}");
}

/// The fused GRPO loss (lm_head + log-prob + loss in one pass) at both `LogitPrecision`s (var 1 =
/// ExactF32, 3 = Bf16), on the GPU: each one's loss statistics against the f64 loss of its own
/// log-probs (1e-5: the callback wiring), and the two against each other — in f32 to 1e-5 (same
/// math, other order); in bf16 the Bf16 pass rounds the logits to bf16, so it differs from the
/// exact pass by that rounding (printed, held to 5e-2 to catch indexing bugs).
#[test]
fn grpo_fused_variants_cuda() {
    use am3safety::ops::grpo::GrpoBatch;
    use am3safety::ops::logprob::{self, LogitPrecision, Tuning};
    let Some(gpu) = cuda_or_skip("grpo_fused_variants_cuda") else { return };
    let hp = hyper();
    let mut rng = Rng::new(12);
    let mut fails = Vec::new();
    for &(rows, l, h, v) in &[(4usize, 37usize, 48usize, 1000usize), (2, 5, 40, 152_064)] {
        let t = rows * l;
        let x = rng.normal_vec(t * h, 1.0);
        let w = rng.normal_vec(v * h, 4.0 / (h as f64).sqrt());
        let tg: Vec<i32> = (0..t).map(|_| rng.below(v) as i32).collect();
        let mut mask: Vec<f32> = (0..t).map(|i| (i == 0 || rng.uniform() < 0.7) as u8 as f32).collect();
        if rows > 2 {
            mask[l..2 * l].iter_mut().for_each(|m| *m = 0.0);
        }
        let adv: Vec<f32> = (0..rows).map(|_| rng.normal() as f32).collect();
        let offs: Vec<f32> = (0..t).map(|_| [0.0f32, 0.05, -0.05, 0.6, -0.6][rng.below(5)]).collect();
        let kl: Vec<f32> = (0..t).map(|_| rng.range(-0.5, 0.5) as f32).collect();
        for (dt, tol) in [(DType::F32, 1e-5f64), (DType::BF16, 5e-2)] {
            let up = |v: &[f32], d: DType| gpu.upload(v, d).unwrap();
            let (bx, bw, btg, bm, ba) =
                (up(&x, dt), up(&w, dt), gpu.upload_i32(&tg).unwrap(), up(&mask, DType::F32), up(&adv, DType::F32));
            // Old / reference log-probs near the policy's (from the split forward).
            let (mut lp0, mut ls0) = (up(&vec![0.0; t], DType::F32), up(&vec![0.0; t], DType::F32));
            logprob::fwd(
                &gpu,
                logprob::FwdOut { logp: &mut lp0, lse: &mut ls0, entropy: None },
                logprob::Inputs { hidden: &bx, lm_head: &bw, targets: &btg, dims: logprob::Dims { t, h, v } },
                None,
            )
            .unwrap();
            let lp0 = gpu.to_vec(&lp0).unwrap();
            let old: Vec<f32> = lp0.iter().zip(&offs).map(|(a, b)| a - b).collect();
            let rf: Vec<f32> = lp0.iter().zip(&kl).map(|(a, b)| a + b).collect();
            let (bo, br) = (up(&old, DType::F32), up(&rf, DType::F32));
            let batch = GrpoBatch { old_logp: &bo, ref_logp: &br, mask: &bm, adv: &ba, rows, l };
            for agg in [Aggregation::TokenMean, Aggregation::SeqMean] {
                let mut outs = Vec::new();
                for var in [1u8, 3] {
                    let tune = Tuning {
                        fused_bytes: 3 * v * dt.size(),
                        precision: if var == 3 { LogitPrecision::Bf16 } else { LogitPrecision::ExactF32 },
                        ..Tuning::exact()
                    };
                    let (mut blp, mut bdh, mut bdw) = (
                        up(&vec![f32::NAN; t], DType::F32),
                        up(&vec![f32::NAN; t * h], dt),
                        up(&vec![0.0; v * h], DType::F32),
                    );
                    let out =
                        logprob::FusedOut { logp: &mut blp, entropy: None, dhidden: &mut bdh, dlm_head: &mut bdw };
                    let x =
                        logprob::Inputs { hidden: &bx, lm_head: &bw, targets: &btg, dims: logprob::Dims { t, h, v } };
                    let s = grpo::fused_loss_with(&gpu, &tune, out, x, &batch, &hp, agg).unwrap();
                    let got_lp = gpu.to_vec(&blp).unwrap();
                    let mut d64 = vec![0f64; t];
                    let s64 = cpu::loss_fwd_bwd::<f64>(
                        &mut d64,
                        &to64(&got_lp),
                        &grpo::GrpoBatch {
                            old_logp: &to64(&old),
                            ref_logp: &to64(&rf),
                            mask: &to64(&mask),
                            adv: &to64(&adv),
                            rows,
                            l,
                        },
                        &hp,
                        agg,
                    );
                    let host = grpo::GrpoBatch {
                        old_logp: &old[..],
                        ref_logp: &rf[..],
                        mask: &mask[..],
                        adv: &adv[..],
                        rows,
                        l,
                    };
                    let el = (s.loss - s64.loss).abs() / loss_scale(&got_lp, &host, &hp, agg).max(1e-30);
                    let ec = (s.clip_frac - s64.clip_frac).abs();
                    let ek = rel_scalar(s.mean_kl, s64.mean_kl);
                    let what =
                        format!("grpo fused v{var} cuda {} [rows={rows} l={l} h={h} v={v}] {agg:?}", dt.suffix());
                    println!(
                        "{what}: loss {:.6} rel {el:.2e}, clip frac {:.4} vs {:.4}, kl rel {ek:.2e}",
                        s.loss, s.clip_frac, s64.clip_frac
                    );
                    for (nm, e) in [("loss", el), ("clip_frac", ec), ("mean_kl", ek)] {
                        if e.is_nan() || e > 1e-5 {
                            fails.push(format!("{what} {nm} vs its own logp: {e:.2e}"));
                        }
                    }
                    outs.push((got_lp, gpu.to_vec(&bdh).unwrap(), gpu.to_vec(&bdw).unwrap()));
                }
                // The Bf16 pass against the exact pass.
                for (i, j, tl) in [(1usize, 0usize, tol)] {
                    let (a, b) = (&outs[j], &outs[i]);
                    for (nm, e) in [
                        ("logp", rel_err(&b.0, &a.0)),
                        ("dhidden", rel_err(&b.1, &a.1)),
                        ("dlm_head", rel_err(&b.2, &a.2)),
                    ] {
                        let names = ["exact", "bf16"];
                        println!("grpo fused {} vs {} cuda {} [rows={rows} l={l} h={h} v={v}] {agg:?} {nm}: rel diff {e:.2e}", names[i], names[j], dt.suffix());
                        if e.is_nan() || e > tl {
                            fails.push(format!(
                                "{} vs {} {} [{rows}x{l}x{h}x{v}] {agg:?} {nm}: {e:.2e}",
                                names[i],
                                names[j],
                                dt.suffix()
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(fails.is_empty(), "grpo fused variants: {} failure(s):\n{}", fails.len(), fails.join("\n"));
}

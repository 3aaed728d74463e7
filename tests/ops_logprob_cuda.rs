//! Grouped log-prob fused with the lm_head on CUDA (skipped without a GPU): bf16 at 1e-2 and f32
//! at 1e-5 against the naive f64 computation at odd T, H, V (V = 152,064 included), with default
//! and tiny chunk sizes so every tile / chunk / vector-or-scalar path runs; `fwd` against the
//! fused pass bit for bit at Bf16 precision; the automatic split-K plan; dlm_head written when
//! every token is masked.
mod common;
use am3safety::ops::logprob::{self, GradChunk, LogitPrecision, Tuning};
use am3safety::tensor::{Buf, DType, Device};
use common::*;

#[path = "support/logprob.rs"]
mod logprob_support;
use logprob_support::*;

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
fn check_gpu(gpu: &Device, base: &Problem, dt: DType, tunes: &[(&str, Tuning)], tol: Tol) -> Vec<String> {
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
        if e.is_nan() || e > tol.value() {
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
            logprob::fwd_with(
                gpu,
                tune,
                logprob::FwdOut { logp: &mut lp, lse: &mut ls, entropy: Some(&mut en) },
                logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
                mask,
            )
            .unwrap();
            cmp(format!("fwd logp {shape} masked={masked}{tag}"), dl(&lp), &want.logp);
            cmp(format!("fwd lse {shape} masked={masked}{tag}"), dl(&ls), &want.lse);
            cmp(format!("fwd entropy {shape} masked={masked}{tag}"), dl(&en), &want.ent);
            // Backward from the GPU's own lse, dlogp = g · mask (zeros are skipped).
            let gm: Vec<f32> = (0..t).map(|i| if masked && p.mask[i] == 0.0 { 0.0 } else { p.g[i] }).collect();
            let mut dh = nan(t * h, dt);
            let mut dw = up(&dw_init, DType::F32);
            logprob::bwd_with(
                gpu,
                tune,
                logprob::BwdOut { dhidden: &mut dh, dlm_head: Some(&mut dw) },
                logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
                &up(&gm, DType::F32),
                &ls,
            )
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
                logprob::FusedOut { logp: &mut lp2, entropy: Some(&mut en2), dhidden: &mut dh2, dlm_head: &mut dw2 },
                logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
                mask,
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
        for (dt, tol) in [(DType::BF16, Tol::LogprobBf16), (DType::F32, Tol::F32Reference)] {
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
        for (dt, tol) in [(DType::BF16, Tol::LogprobBf16), (DType::F32, Tol::F32Reference)] {
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
                    logprob::fwd_with(
                        &gpu,
                        &tune,
                        logprob::FwdOut { logp: &mut lp, lse: &mut ls, entropy: Some(&mut en) },
                        logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
                        mask,
                    )
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
                        logprob::FusedOut {
                            logp: &mut lp2,
                            entropy: Some(&mut en2),
                            dhidden: &mut dh,
                            dlm_head: &mut dw,
                        },
                        logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
                        mask,
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
                logprob::fwd_with(
                    &gpu,
                    &exact,
                    logprob::FwdOut { logp: &mut lp, lse: &mut ls, entropy: None },
                    logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
                    mask,
                )
                .unwrap();
                if let Some(b) = fused_bf16 {
                    let e = max_abs(&gpu.to_vec(&lp).unwrap(), &b);
                    println!("logprob exact fwd vs fused bf16 {} [t={t} h={h} v={v}] masked={masked}: max |logp diff| {e:.2e} (info: what a ratio would see without item 4)", dt.suffix());
                }
            }
        }
    }
    assert!(fails.is_empty(), "logprob fwd vs fused: {} failure(s):\n{}", fails.len(), fails.join("\n"));
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
            logprob::FusedOut { logp: &mut lp, entropy: None, dhidden: &mut dh, dlm_head: &mut dw },
            logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
            Some(&none),
            &mut grad,
        )
        .unwrap();
        let ok = [&lp, &dh, &dw].iter().all(|b| gpu.to_vec(b).unwrap().iter().all(|&z| z == 0.0));
        // bwd with dlogp = 0 everywhere.
        let mut dw2 = up(&vec![f32::NAN; v * h], DType::F32);
        logprob::bwd_with(
            &gpu,
            &tune,
            logprob::BwdOut { dhidden: &mut dh, dlm_head: Some(&mut dw2) },
            logprob::Inputs { hidden: &x, lm_head: &w, targets: &tg, dims: logprob::Dims { t, h, v } },
            &none,
            &none,
        )
        .unwrap();
        let ok2 =
            gpu.to_vec(&dw2).unwrap().iter().all(|&z| z == 0.0) && gpu.to_vec(&dh).unwrap().iter().all(|&z| z == 0.0);
        println!("logprob cuda dw_overwrite all masked v{var}: fused outputs zero {ok}, bwd outputs zero {ok2}");
        if !ok || !ok2 {
            fails.push(format!("v{var}: fused zero {ok}, bwd zero {ok2}"));
        }
    }
    assert!(fails.is_empty(), "dw_overwrite all masked: {fails:?}");
}

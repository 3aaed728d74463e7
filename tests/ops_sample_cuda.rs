//! The sampler on CUDA (skipped without a GPU): kept sets, CPU agreement, chi-square with the
//! same tokens as the CPU, batch invariance, NaN/inf logits and buffer reuse.
mod common;
use am3safety::ops::sample::{cpu, stream_key, SampleParams, Sampler};
use am3safety::tensor::{DType, Device};
use common::*;

#[path = "support/ops_sample.rs"]
mod ops_sample_support;
use ops_sample_support::*;

#[test]
fn sample_cuda_kept_sets_exact() {
    let Some(gpu) = cuda_or_skip("sample_cuda_kept_sets_exact") else { return };
    for dt in [DType::F32, DType::BF16] {
        for (name, row, p, want) in kept_cases() {
            let row = if dt == DType::BF16 { bf16_round(&row) } else { row };
            let v = row.len();
            let cpu_thr = cpu::threshold(&row, &p).unwrap();
            let keys: Vec<u64> = (0..64).map(|i| stream_key(4, 4, 4, i)).collect();
            let rows: Vec<f32> = (0..64).flat_map(|_| row.clone()).collect();
            let (out, thr) = gpu_run(&gpu, &rows, v, &vec![p; 64], &keys, dt);
            let inv = p.inv_temperature();
            let kept: Vec<usize> = (0..v).filter(|&j| cpu::scaled(row[j], inv) >= thr[0]).collect();
            println!("cuda kept {} {name}: threshold {} (cpu {cpu_thr})", dt.suffix(), thr[0]);
            assert_eq!(thr[0].to_bits(), cpu_thr.to_bits(), "{} {name}: threshold", dt.suffix());
            if dt == DType::F32 {
                assert_eq!(kept, want, "{name}");
            }
            for (i, s) in out.iter().enumerate() {
                let (c, _) = cpu::sample(&row, &p, keys[i]).unwrap();
                same_token(&row, &p, keys[i], s.token, c.token, &format!("{} {name} key {i}", dt.suffix()));
                assert!(kept.contains(&(s.token as usize)), "{name}");
            }
        }
    }
}

/// GPU vs CPU on random rows with ties and -inf, bf16 and f32, small and full vocabularies.
#[test]
fn sample_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("sample_cuda_matches_cpu") else { return };
    let mut rng = Rng::new(13);
    let params = [
        sp(1.0, 0, 1.0),
        sp(0.7, 50, 1.0),
        sp(0.7, 0, 0.9),
        sp(1.0, 20, 0.95),
        sp(1.3, 0, 0.5),
        sp(0.6, 1, 1.0),
        sp(1.0, 1_000_000, 1.0),
        sp(0.9, 0, 1e-7),
        sp(0.25, 5, 0.7),
        SampleParams::greedy(),
    ];
    let (mut disagree, mut total, mut worst_lp) = (0usize, 0usize, 0f64);
    for dt in [DType::F32, DType::BF16] {
        for v in [1usize, 3, 8, 1000, 1001, 32_000, 152_064] {
            let rows = 2 * params.len();
            let mut logits = rng.normal_vec(rows * v, 3.0);
            for r in 0..rows {
                let row = &mut logits[r * v..(r + 1) * v];
                if r % 4 == 1 {
                    row.iter_mut().for_each(|x| *x = (*x * 2.0).round() * 0.5); // ties
                }
                if r % 4 == 2 && v > 2 {
                    row.iter_mut().step_by(5).for_each(|x| *x = NEG_INF);
                }
                if r % 4 == 3 && v > 1 {
                    let m = row.iter().copied().fold(NEG_INF, f32::max);
                    row[v / 2] = m; // tied max
                }
            }
            if dt == DType::BF16 {
                logits = bf16_round(&logits);
            }
            let ps: Vec<SampleParams> = (0..rows).map(|r| params[r % params.len()]).collect();
            let keys: Vec<u64> = (0..rows).map(|r| stream_key(13, v as u64, r as u64, dt as u64)).collect();
            let (out, thr) = gpu_run(&gpu, &logits, v, &ps, &keys, dt);
            for r in 0..rows {
                let row = &logits[r * v..(r + 1) * v];
                let p = &ps[r];
                let (c, cthr) = cpu::sample(row, p, keys[r]).unwrap();
                assert_eq!(
                    thr[r].to_bits(),
                    cthr.to_bits(),
                    "{} V={v} row {r} {p:?}: threshold {} vs cpu {cthr}",
                    dt.suffix(),
                    thr[r]
                );
                let g = out[r];
                total += 1;
                disagree +=
                    same_token(row, p, keys[r], g.token, c.token, &format!("{} V={v} row {r} {p:?}", dt.suffix()))
                        as usize;
                let want = log_softmax64(row, p)[g.token as usize];
                let e = (g.logp as f64 - want).abs();
                worst_lp = worst_lp.max(e);
                assert!(e <= 1e-4, "{} V={v} row {r} {p:?}: logp {} vs {want}", dt.suffix(), g.logp);
                if g.token == c.token {
                    assert!(
                        (g.logp - c.logp).abs() <= 1e-5 * c.logp.abs().max(1.0),
                        "logp gpu {} vs cpu {}",
                        g.logp,
                        c.logp
                    );
                }
            }
            println!("sample cuda {} V={v}: {rows} rows ok", dt.suffix());
        }
    }
    println!("sample cuda vs cpu: {disagree} of {total} tokens differ (near-ties), worst logp err {worst_lp:.2e}");
}

#[test]
fn sample_cuda_chi_square_and_tokens_equal() {
    let Some(gpu) = cuda_or_skip("sample_cuda_chi_square_and_tokens_equal") else { return };
    for dt in [DType::F32, DType::BF16] {
        let row = if dt == DType::BF16 { bf16_round(&CHI_LOGITS) } else { CHI_LOGITS.to_vec() };
        for (vi, p) in chi_variants().iter().enumerate() {
            let keys: Vec<u64> = (0..CHI_DRAWS).map(|i| chi_key(vi, i)).collect();
            let logits: Vec<f32> = (0..CHI_DRAWS).flat_map(|_| row.clone()).collect();
            let (out, _) = gpu_run(&gpu, &logits, 8, &vec![*p; CHI_DRAWS], &keys, dt);
            let mut counts = vec![0usize; 8];
            let mut differ = 0;
            for (i, s) in out.iter().enumerate() {
                counts[s.token as usize] += 1;
                let c = cpu::sample(&row, p, keys[i]).unwrap().0;
                differ += same_token(&row, p, keys[i], s.token, c.token, &format!("{} chi {vi} draw {i}", dt.suffix()))
                    as usize;
            }
            println!(
                "cuda {} chi variant {vi}: {differ} of {CHI_DRAWS} tokens differ from the CPU's (near-ties)",
                dt.suffix()
            );
            if dt == DType::F32 {
                check_chi(&counts, p, "cuda f32");
            }
        }
    }
}

#[test]
fn sample_cuda_batch_invariance() {
    let Some(gpu) = cuda_or_skip("sample_cuda_batch_invariance") else { return };
    check_batch_invariance(&gpu, DType::F32);
    check_batch_invariance(&gpu, DType::BF16);
}

/// The GPU's safe behaviour: NaN reads as -inf, +inf as f32::MAX; a row with no finite logit is
/// an error naming it; a sampler is reused across calls of different sizes.
#[test]
fn sample_cuda_nan_inf_and_reuse() {
    let Some(gpu) = cuda_or_skip("sample_cuda_nan_inf_and_reuse") else { return };
    let v = 1000;
    let mut rng = Rng::new(14);
    let mut logits = rng.normal_vec(3 * v, 2.0);
    logits[3] = f32::NAN;
    logits[v + 10] = f32::INFINITY;
    logits[2 * v + 7] = f32::NAN;
    let params = [sp(1.0, 0, 1.0), sp(0.8, 5, 0.9), SampleParams::greedy()];
    let keys = [1u64, 2, 3];
    let mut s = Sampler::new(&gpu, 8, v).unwrap();
    for dt in [DType::F32, DType::BF16] {
        let l = if dt == DType::BF16 { bf16_round(&logits) } else { logits.clone() };
        let out = s.sample(&gpu, &gpu.upload(&l, dt).unwrap(), 3, &params, &keys).unwrap();
        let fixed: Vec<f32> = l
            .iter()
            .map(|&x| {
                if x.is_nan() {
                    NEG_INF
                } else if x == f32::INFINITY {
                    f32::MAX
                } else {
                    x
                }
            })
            .collect();
        for r in 0..3 {
            let (c, _) = cpu::sample(&fixed[r * v..(r + 1) * v], &params[r], keys[r]).unwrap();
            same_token(
                &fixed[r * v..(r + 1) * v],
                &params[r],
                keys[r],
                out[r].token,
                c.token,
                &format!("{} nan row {r}", dt.suffix()),
            );
        }
        assert_eq!(out[1].token as usize, 10, "the +inf logit must win");
        // One row of only NaN / -inf: an error naming it.
        let mut bad = l.clone();
        bad[v..2 * v].iter_mut().enumerate().for_each(|(j, x)| *x = if j % 2 == 0 { f32::NAN } else { NEG_INF });
        let e = s.sample(&gpu, &gpu.upload(&bad, dt).unwrap(), 3, &params, &keys).unwrap_err().to_string();
        assert!(e.contains("row 1") && e.contains("no finite logit"), "{e}");
        // Reuse with fewer rows, and a logits buffer longer than rows × vocab.
        let one = s.sample(&gpu, &gpu.upload(&l, dt).unwrap(), 1, &params[2..], &keys[2..]).unwrap();
        let (c, _) = cpu::sample(&fixed[..v], &params[2], keys[2]).unwrap();
        same_token(&fixed[..v], &params[2], keys[2], one[0].token, c.token, "reuse");
        assert_eq!(s.thresholds(&gpu).unwrap().len(), 1);
    }
    // A CPU sampler refuses the GPU.
    let mut cs = Sampler::new(&Device::Cpu, 1, v).unwrap();
    assert!(cs.sample(&gpu, &gpu.upload(&logits[..v], DType::F32).unwrap(), 1, &params[..1], &keys[..1]).is_err());
}

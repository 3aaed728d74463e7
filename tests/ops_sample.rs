//! Token sampling (src/ops/sample.rs, kernels/sample.cu): exact kept sets for top-k / top-p with
//! ties, greedy = argmax, a chi-square fit of the draws to the renormalised softmax, batch
//! independence, logp = full-vocab log-softmax at T, parameter and NaN errors, a host emulation
//! of the kernel's bisection algorithm against the sort-based reference, and the GPU (bf16, f32)
//! against the CPU.
mod common;
use am3safety::ops::sample::{cpu, stream_key, SampleParams, Sampled, Sampler};
use am3safety::tensor::{DType, Device};
use common::*;

const NEG_INF: f32 = f32::NEG_INFINITY;

fn sp(t: f32, k: usize, p: f32) -> SampleParams {
    SampleParams::new(t, k, p).unwrap()
}

/// Natural logs of weights, so that at T = 1 the probabilities are the normalised weights.
fn ln_weights(w: &[f64]) -> Vec<f32> {
    w.iter().map(|&x| x.ln() as f32).collect()
}

/// Hand-made rows with their exact kept sets (ties at every boundary).
fn kept_cases() -> Vec<(&'static str, Vec<f32>, SampleParams, Vec<usize>)> {
    let a = vec![1.0, 3.0, 2.0, 3.0, 2.0, 0.0];
    let w = ln_weights(&[4.0, 2.0, 2.0, 1.0, 1.0]); // p = .4 .2 .2 .1 .1
    let all5: Vec<usize> = (0..5).collect();
    let minf = vec![NEG_INF, 0.0, NEG_INF, 1.0];
    let mut c = vec![
        ("k=1 ties at max", a.clone(), sp(1.0, 1, 1.0), vec![1, 3]),
        ("k=2", a.clone(), sp(1.0, 2, 1.0), vec![1, 3]),
        ("k=3 boundary tie", a.clone(), sp(1.0, 3, 1.0), vec![1, 2, 3, 4]),
        ("k=4", a.clone(), sp(1.0, 4, 1.0), vec![1, 2, 3, 4]),
        ("k=5", a.clone(), sp(1.0, 5, 1.0), vec![0, 1, 2, 3, 4]),
        ("k=V", a.clone(), sp(1.0, 6, 1.0), (0..6).collect()),
        ("k>V", a.clone(), sp(1.0, 100, 1.0), (0..6).collect()),
        ("k=0 off", a.clone(), sp(0.7, 0, 1.0), (0..6).collect()),
        ("greedy ties", a.clone(), SampleParams::greedy(), vec![1, 3]),
        ("p=0.3", w.clone(), sp(1.0, 0, 0.3), vec![0]),
        ("p=0.5 tie kept", w.clone(), sp(1.0, 0, 0.5), vec![0, 1, 2]),
        ("p=0.65", w.clone(), sp(1.0, 0, 0.65), vec![0, 1, 2]),
        ("p=0.85 tie kept", w.clone(), sp(1.0, 0, 0.85), all5.clone()),
        ("p=0.95", w.clone(), sp(1.0, 0, 0.95), all5.clone()),
        ("p=1 off", w.clone(), sp(1.0, 0, 1.0), all5.clone()),
        ("p tiny", w.clone(), sp(1.0, 0, 1e-30), vec![0]),
        ("p smallest f32", w.clone(), sp(1.0, 0, f32::from_bits(1)), vec![0]),
        ("k=2 tie beyond k", w.clone(), sp(1.0, 2, 1.0), vec![0, 1, 2]),
        ("k=4 tie beyond k", w.clone(), sp(1.0, 4, 1.0), all5.clone()),
        // Renormalised over the top-3 survivors: .5 .25 .25.
        ("k=3 p=0.6", w.clone(), sp(1.0, 3, 0.6), vec![0, 1, 2]),
        ("k=3 p=0.45", w.clone(), sp(1.0, 3, 0.45), vec![0]),
        ("k=1 p=0.5", w.clone(), sp(1.0, 1, 0.5), vec![0]),
        // T = 0.5 squares the weights: .615 .154 .154 .038 .038.
        ("T=0.5 p=0.7", w.clone(), sp(0.5, 0, 0.7), vec![0, 1, 2]),
        ("T=0.5 p=0.6", w.clone(), sp(0.5, 0, 0.6), vec![0]),
        ("T=2 p=0.55", w.clone(), sp(2.0, 0, 0.55), vec![0, 1, 2]),
        ("tiny p, tied max", vec![2.0, 2.0, 1.0], sp(1.0, 0, 1e-9), vec![0, 1]),
        ("k=3 reaches -inf", minf.clone(), sp(1.0, 3, 1.0), vec![0, 1, 2, 3]),
        ("k=2 with -inf", minf.clone(), sp(1.0, 2, 1.0), vec![1, 3]),
        ("p=0.999 drops -inf", minf.clone(), sp(1.0, 0, 0.999), vec![1, 3]),
        ("V=1", vec![-5.0], sp(1.3, 1, 0.1), vec![0]),
    ];
    // A long flat row: every value tied.
    c.push(("flat k=7", vec![0.25; 300], sp(0.9, 7, 1.0), (0..300).collect()));
    c.push(("flat p=0.1", vec![0.25; 300], sp(0.9, 0, 0.1), (0..300).collect()));
    c
}

#[test]
fn sample_kept_sets_exact_cpu() {
    for (name, row, p, want) in kept_cases() {
        let got = cpu::kept_set(&row, &p).unwrap();
        println!("kept {name}: {got:?}");
        assert_eq!(got, want, "{name}");
        // Every draw lands in the kept set (and -inf tokens are never drawn).
        for i in 0..200u64 {
            let (s, thr) = cpu::sample(&row, &p, stream_key(1, 2, 3, i)).unwrap();
            assert!(want.contains(&(s.token as usize)), "{name}: token {} outside {want:?}", s.token);
            assert!(row[s.token as usize] > NEG_INF, "{name}: drew a -inf token");
            assert_eq!(thr, cpu::threshold(&row, &p).unwrap());
        }
    }
}

#[test]
fn sample_greedy_is_argmax_lowest_index() {
    let mut rng = Rng::new(5);
    for v in [1usize, 2, 7, 100, 5000] {
        for t in [1.0f32, 0.3, 2.5] {
            let mut row = rng.normal_vec(v, 2.0);
            // Tie the max at a later index.
            let (jm, &m) = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).unwrap();
            if v > 3 {
                let late = (jm + 1 + rng.below(v - 1)) % v;
                row[late] = m;
            }
            let first = row.iter().position(|&x| x == m).unwrap();
            let mut p = SampleParams::greedy();
            p.temperature = t;
            for key in [0u64, 1, u64::MAX] {
                let (s, thr) = cpu::sample(&row, &p, key).unwrap();
                assert_eq!(s.token as usize, first, "v={v} T={t}");
                assert_eq!(thr, cpu::scaled(m, p.inv_temperature()));
                let want = log_softmax64(&row, &p)[first];
                assert!((s.logp as f64 - want).abs() < 1e-5, "greedy logp {} vs {want}", s.logp);
            }
        }
    }
}

/// f64 log-softmax of x = logit × (1/T) (x in f32, as sampled), over the full row.
fn log_softmax64(row: &[f32], p: &SampleParams) -> Vec<f64> {
    let inv = p.inv_temperature();
    let x: Vec<f64> = row.iter().map(|&l| cpu::scaled(l, inv) as f64).collect();
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v - lse).collect()
}

#[test]
fn sample_logp_is_full_vocab_log_softmax() {
    let mut rng = Rng::new(6);
    let params = [
        sp(1.0, 0, 1.0),
        sp(0.7, 50, 1.0),
        sp(0.7, 0, 0.9),
        sp(1.3, 20, 0.5),
        sp(0.2, 3, 0.95),
        SampleParams::greedy(),
    ];
    let mut worst = 0f64;
    for (v, scale) in [(8usize, 1.0), (1000, 3.0), (152_064, 3.0)] {
        let row = rng.normal_vec(v, scale);
        for (i, p) in params.iter().enumerate() {
            let lsm = log_softmax64(&row, p);
            let (s, _) = cpu::sample(&row, p, stream_key(9, v as u64, i as u64, 0)).unwrap();
            let want = lsm[s.token as usize];
            let e = (s.logp as f64 - want).abs();
            worst = worst.max(e);
            assert!(e <= 5e-6 + 1e-6 * want.abs(), "V={v} {p:?}: logp {} vs log-softmax {want} (err {e:.2e})", s.logp);
        }
    }
    println!("sample logp vs f64 log-softmax: worst abs err {worst:.2e}");
}

/// Chi-square quantile by Wilson-Hilferty at z standard deviations (upper tail).
fn chi2_critical(df: usize, z: f64) -> f64 {
    let d = df as f64;
    let a = 2.0 / (9.0 * d);
    d * (1.0 - a + z * a.sqrt()).powi(3)
}

/// The renormalised softmax over the kept set at T, in f64.
fn expected_probs(row: &[f32], p: &SampleParams) -> Vec<f64> {
    let kept = cpu::kept_set(row, p).unwrap();
    let lsm = log_softmax64(row, p);
    let mut e = vec![0f64; row.len()];
    for &j in &kept {
        e[j] = lsm[j].exp();
    }
    let z: f64 = e.iter().sum();
    e.iter().map(|v| v / z).collect()
}

/// Pearson chi-square of `counts` against `probs` (cells with probability 0 must be empty).
fn chi_square(counts: &[usize], probs: &[f64], name: &str) -> (f64, usize) {
    let n: usize = counts.iter().sum();
    let (mut chi, mut df) = (0f64, 0usize);
    for (j, (&c, &pj)) in counts.iter().zip(probs).enumerate() {
        if pj == 0.0 {
            assert_eq!(c, 0, "{name}: token {j} outside the kept set drawn {c} times");
            continue;
        }
        let e = pj * n as f64;
        chi += (c as f64 - e).powi(2) / e;
        df += 1;
    }
    (chi, df.saturating_sub(1))
}

const CHI_LOGITS: [f32; 8] = [1.0, 0.5, 0.2, -0.3, 2.0, 0.0, -1.0, 1.5];

fn chi_variants() -> Vec<SampleParams> {
    vec![sp(0.7, 0, 1.0), sp(0.7, 4, 1.0), sp(0.7, 0, 0.8), sp(0.7, 5, 0.9), sp(1.0, 0, 0.97)]
}

/// The draws for one variant: N keys of one fixed seed, so the test is deterministic.
const CHI_DRAWS: usize = 40_000;
fn chi_key(variant: usize, i: usize) -> u64 {
    stream_key(20_260_101, variant as u64, 7, i as u64)
}

fn check_chi(counts: &[usize], p: &SampleParams, name: &str) {
    let probs = expected_probs(&CHI_LOGITS, p);
    let (chi, df) = chi_square(counts, &probs, name);
    // z = 4.5: a 3e-6 false-alarm level for a fixed, reproducible set of draws.
    let crit = chi2_critical(df.max(1), 4.5);
    println!("chi-square {name} {p:?}: {chi:.2} on {df} df (critical {crit:.2}); counts {counts:?}");
    assert!(chi <= crit, "{name}: chi-square {chi:.2} > {crit:.2} on {df} df; counts {counts:?} vs probs {probs:?}");
}

#[test]
fn sample_chi_square_matches_renormalised_softmax_cpu() {
    for (vi, p) in chi_variants().iter().enumerate() {
        let mut counts = vec![0usize; 8];
        for i in 0..CHI_DRAWS {
            counts[cpu::sample(&CHI_LOGITS, p, chi_key(vi, i)).unwrap().0.token as usize] += 1;
        }
        check_chi(&counts, p, "cpu");
    }
}

/// Five rows of different shapes of logits, params and keys.
fn batch5(v: usize, seed: u64) -> (Vec<f32>, Vec<SampleParams>, Vec<u64>) {
    let mut rng = Rng::new(seed);
    let logits = rng.normal_vec(5 * v, 2.0);
    let params = vec![sp(0.8, 0, 1.0), SampleParams::greedy(), sp(1.0, 10, 0.9), sp(0.6, 0, 0.7), sp(1.2, 3, 1.0)];
    let keys = (0..5).map(|r| stream_key(seed, r, 1, 2)).collect();
    (logits, params, keys)
}

/// Row r sampled alone, in a batch of 5 and at another position gives the same result.
fn check_batch_invariance(dev: &Device, dt: DType) {
    let v = 777;
    let (logits, params, keys) = batch5(v, 77);
    let mut s = Sampler::new(dev, 5, v).unwrap();
    let all = s.sample(dev, &dev.upload(&logits, dt).unwrap(), 5, &params, &keys).unwrap();
    for r in 0..5 {
        let alone = s
            .sample(dev, &dev.upload(&logits[r * v..(r + 1) * v], dt).unwrap(), 1, &params[r..r + 1], &keys[r..r + 1])
            .unwrap();
        assert_eq!(alone[0], all[r], "{}: row {r} alone vs in a batch", dev.name());
        // Row r moved to the last position of a batch with the others shuffled.
        let order: Vec<usize> = (0..5).filter(|&i| i != r).chain([r]).collect();
        let lg: Vec<f32> = order.iter().flat_map(|&i| logits[i * v..(i + 1) * v].to_vec()).collect();
        let ps: Vec<SampleParams> = order.iter().map(|&i| params[i]).collect();
        let ks: Vec<u64> = order.iter().map(|&i| keys[i]).collect();
        let moved = s.sample(dev, &dev.upload(&lg, dt).unwrap(), 5, &ps, &ks).unwrap();
        assert_eq!(moved[4], all[r], "{}: row {r} moved to position 4", dev.name());
    }
    println!("batch invariance {} {}: ok, {all:?}", dev.name(), dt.suffix());
}

#[test]
fn sample_batch_invariance_cpu() {
    check_batch_invariance(&Device::Cpu, DType::F32);
}

#[test]
fn sample_param_and_input_errors() {
    for (t, ok) in [
        (0.0f32, false),
        (-1.0, false),
        (f32::NAN, false),
        (f32::INFINITY, false),
        (1e-31, false),
        (1e-30, true),
        (5.0, true),
    ] {
        let r = SampleParams::new(t, 0, 1.0);
        assert_eq!(r.is_ok(), ok, "T={t}");
        if let Err(e) = r {
            let e = e.to_string();
            assert!(e.contains("temperature") && e.contains("inf)"), "{e}");
        }
    }
    for (p, ok) in [(0.0f32, false), (-0.1, false), (1.0001, false), (f32::NAN, false), (1.0, true), (1e-20, true)] {
        let r = SampleParams::new(1.0, 0, p);
        assert_eq!(r.is_ok(), ok, "top_p={p}");
        if let Err(e) = r {
            let e = e.to_string();
            assert!(e.contains("top_p") && e.contains("(0, 1]"), "{e}");
        }
    }
    let dev = Device::Cpu;
    let mut s = Sampler::new(&dev, 3, 4).unwrap();
    let good = dev.upload(&[0.0; 12], DType::F32).unwrap();
    let p = [sp(1.0, 0, 1.0); 3];
    let e = s.sample(&dev, &good, 4, &[p[0]; 4], &[0; 4]).unwrap_err().to_string();
    assert!(e.contains("max_rows"), "{e}");
    let e = s.sample(&dev, &good, 3, &p[..2], &[0; 3]).unwrap_err().to_string();
    assert!(e.contains("params"), "{e}");
    let short = dev.upload(&[0.0; 11], DType::F32).unwrap();
    let e = s.sample(&dev, &short, 3, &p, &[0; 3]).unwrap_err().to_string();
    assert!(e.contains("logits"), "{e}");
    let mut bad = p;
    bad[1].top_p = 2.0;
    let e = format!("{:#}", s.sample(&dev, &good, 3, &bad, &[0; 3]).unwrap_err());
    assert!(e.contains("row 1") && e.contains("top_p"), "{e}");
    // NaN and +inf logits name the row and the token; an all -inf row is an error.
    for (val, what) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let mut l = vec![0.0; 12];
        l[2 * 4 + 3] = val;
        let e = format!("{:#}", s.sample(&dev, &dev.upload(&l, DType::F32).unwrap(), 3, &p, &[0; 3]).unwrap_err());
        println!("{what} logit: {e}");
        assert!(e.contains("row 2") && e.contains("token 3"), "{e}");
    }
    let mut l = vec![0.0; 12];
    l[4..8].fill(NEG_INF);
    let e = format!("{:#}", s.sample(&dev, &dev.upload(&l, DType::F32).unwrap(), 3, &p, &[0; 3]).unwrap_err());
    assert!(e.contains("row 1") && e.contains("no finite logit"), "{e}");
    assert!(Sampler::new(&dev, 1, 0).is_err());
    // A longer logits buffer: its first rows × vocab are used.
    let mut s = Sampler::new(&dev, 3, 4).unwrap();
    let out = s.sample(&dev, &good, 2, &p[..2], &[5, 6]).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(s.thresholds(&dev).unwrap().len(), 2);
}

#[test]
fn sample_det_math_accuracy() {
    // exp on [-32, 0] and ln on the Gumbel ranges, against f64.
    let mut worst_e = 0f64;
    for i in 0..=320_000 {
        let d = -(i as f32) * 1e-4;
        let got = cpu::exp_neg(d) as f64;
        let want = (d as f64).exp();
        worst_e = worst_e.max((got - want).abs() / want);
    }
    assert_eq!(cpu::exp_neg(0.0), 1.0);
    assert_eq!(cpu::exp_neg(-32.5), 0.0);
    assert_eq!(cpu::exp_neg(NEG_INF), 0.0);
    let mut worst_l = 0f64;
    let mut x = 5.9e-8f32;
    while x < 40.0 {
        let got = cpu::ln_pos(x) as f64;
        let want = (x as f64).ln();
        worst_l = worst_l.max((got - want).abs() / want.abs().max(1e-3));
        x *= 1.000_37;
    }
    // Near 1 (u close to 1 gives -ln u ~ 1 - u): relative accuracy.
    for k in 1..2000u32 {
        let u = 1.0 - k as f32 * f32::EPSILON * 0.5;
        let got = cpu::ln_pos(u) as f64;
        let want = (u as f64).ln();
        assert!((got - want).abs() <= 4e-7 * want.abs(), "ln({u}) = {got} vs {want}");
    }
    println!("det exp worst rel err {worst_e:.2e}, det ln worst err {worst_l:.2e}");
    assert!(worst_e < 4e-7, "exp_neg rel err {worst_e:.2e}");
    assert!(worst_l < 4e-7, "ln_pos err {worst_l:.2e}");
    // Uniforms strictly inside (0, 1); Gumbel within its documented bounds.
    let (mut umin, mut umax) = (1f32, 0f32);
    for j in 0..200_000 {
        let u = cpu::uniform(stream_key(1, 0, 0, 0), j);
        umin = umin.min(u);
        umax = umax.max(u);
        let g = cpu::gumbel(stream_key(1, 0, 0, 0), j);
        assert!(g > -2.9 && g < 16.7, "gumbel {g}");
    }
    assert!(umin > 0.0 && umax < 1.0 && umin < 1e-4 && umax > 1.0 - 1e-4, "{umin} {umax}");
    assert_eq!(cpu::gumbel(0, 0).to_bits(), cpu::gumbel(0, 0).to_bits());
}

#[test]
fn sample_stream_key_mixes() {
    let mut seen = std::collections::HashSet::new();
    for seed in 0..4u64 {
        for d in 0..10u64 {
            for r in 0..10u64 {
                for s in 0..25u64 {
                    assert!(seen.insert(stream_key(seed, d, r, s)), "collision at {seed} {d} {r} {s}");
                }
            }
        }
    }
    // Avalanche: one flipped input bit changes about half of the key's bits.
    let base = stream_key(11, 22, 33, 44);
    let mut total = 0u32;
    let mut n = 0u32;
    for bit in 0..64 {
        for k in [
            stream_key(11 ^ (1 << bit), 22, 33, 44),
            stream_key(11, 22 ^ (1 << bit), 33, 44),
            stream_key(11, 22, 33 ^ (1 << bit), 44),
            stream_key(11, 22, 33, 44 ^ (1 << bit)),
        ] {
            let f = (k ^ base).count_ones();
            assert!((12..=52).contains(&f), "bit {bit}: {f} bits flipped");
            total += f;
            n += 1;
        }
    }
    let mean = total as f64 / n as f64;
    println!("stream_key avalanche: mean {mean:.2} of 64 bits");
    assert!((30.0..=34.0).contains(&mean), "mean flipped bits {mean}");
}

// ---- A host emulation of the kernel's algorithm (bisection, fixed-point masses, per-thread
// pruned Gumbel argmax over a 1024-thread strided scan) against the sort-based reference. ----

fn emu_sample(row: &[f32], p: &SampleParams, key: u64) -> (usize, f32) {
    const TH: usize = 1024;
    let v = row.len();
    let inv = p.inv_temperature();
    let x: Vec<f32> = row.iter().map(|&l| cpu::scaled(l, inv)).collect();
    let kf = |x: f32| cpu::fkey(x);
    // A: max with the lowest index, min.
    let (mut m, mut bi, mut mn) = (NEG_INF, usize::MAX, f32::INFINITY);
    for (j, &xj) in x.iter().enumerate() {
        if xj > m {
            (m, bi) = (xj, j);
        }
        mn = mn.min(xj);
    }
    let km = kf(m);
    let mut kk = 0u32;
    if !p.greedy && p.top_k > 0 && p.top_k < v {
        let (mut lo, mut hi) = (kf(mn), km + 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let c = x.iter().filter(|&&xj| kf(xj) >= mid).count();
            if c >= p.top_k {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        kk = lo;
    }
    let zs: u64 = x.iter().filter(|&&xj| kf(xj) >= kk).map(|&xj| cpu::mass_q(xj, m)).sum();
    let kmin = x.iter().filter(|&&xj| kf(xj) >= kk && cpu::mass_q(xj, m) > 0).map(|&xj| kf(xj)).min().unwrap();
    if p.greedy {
        return (bi, m);
    }
    let mut kt = kk;
    if p.top_p < 1.0 {
        let target = p.top_p as f64 * zs as f64;
        let (mut lo, mut hi) = (kmin, km + 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let c: u64 = x.iter().filter(|&&xj| kf(xj) >= mid).map(|&xj| cpu::mass_q(xj, m)).sum();
            if c as f64 >= target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        kt = lo;
    }
    let thr =
        if kt == 0 { NEG_INF } else { f32::from_bits(if kt & 0x8000_0000 != 0 { kt & 0x7fff_ffff } else { !kt }) };
    // Per-thread pruned argmax, then the block reduction (value, then lowest index).
    let mut best = (NEG_INF, usize::MAX);
    for t in 0..TH.min(v) {
        let (mut bs, mut bj) = (NEG_INF, usize::MAX);
        for j in (t..v).step_by(TH) {
            if kf(x[j]) >= kt && x[j] + 17.0 >= bs {
                let s = x[j] + cpu::gumbel(key, j);
                if s > bs || (s == bs && j < bj) {
                    (bs, bj) = (s, j);
                }
            }
        }
        if bs > best.0 || (bs == best.0 && bj < best.1) {
            best = (bs, bj);
        }
    }
    (best.1, thr)
}

#[test]
fn sample_kernel_algorithm_matches_reference() {
    let mut rng = Rng::new(12);
    let params = [
        sp(1.0, 0, 1.0),
        sp(0.7, 1, 1.0),
        sp(0.7, 40, 1.0),
        sp(0.7, 0, 0.9),
        sp(1.0, 0, 0.3),
        sp(0.5, 17, 0.8),
        sp(2.0, 3000, 0.99),
        sp(1.0, 5, 1e-6),
        SampleParams::greedy(),
    ];
    let mut n = 0;
    for (v, kind) in [(1usize, 0), (5, 0), (64, 1), (3000, 0), (3000, 1), (3000, 2), (5000, 3)] {
        for rep in 0..3 {
            let mut row = rng.normal_vec(v, 3.0);
            match kind {
                1 => row.iter_mut().for_each(|x| *x = x.round()), // heavy ties
                2 => row.iter_mut().step_by(3).for_each(|x| *x = NEG_INF),
                3 => row.iter_mut().enumerate().for_each(|(j, x)| *x = if j % 2 == 0 { -*x * 20.0 } else { *x }), // wide range, both signs
                _ => {}
            }
            if v > 1 {
                row[v - 1] = row.iter().copied().fold(NEG_INF, f32::max); // tied max at the end
            }
            for (i, p) in params.iter().enumerate() {
                let key = stream_key(3, v as u64, rep, i as u64);
                let (s, thr) = cpu::sample(&row, p, key).unwrap();
                let (tok, ethr) = emu_sample(&row, p, key);
                assert_eq!(ethr.to_bits(), thr.to_bits(), "V={v} kind {kind} {p:?}: threshold {ethr} vs {thr}");
                assert_eq!(tok, s.token as usize, "V={v} kind {kind} {p:?}: token");
                n += 1;
            }
        }
    }
    println!("kernel algorithm emulation = reference on {n} rows");
}

// ---------------------------------- GPU vs CPU ----------------------------------

/// Checks a GPU token against the CPU's; returns whether they differ. A difference is tolerated
/// only where the two perturbed scores x + g are within 1e-5 relative (an ulp-level difference in
/// them could flip such a near-tie) and the GPU token is kept. The arithmetic deciding tokens is
/// designed to be bit-identical on both, so no difference is expected at all.
fn same_token(row: &[f32], p: &SampleParams, key: u64, gpu_tok: i32, cpu_tok: i32, ctx: &str) -> bool {
    if gpu_tok == cpu_tok {
        return false;
    }
    let inv = p.inv_temperature();
    assert!(!p.greedy, "{ctx}: greedy token {gpu_tok} vs cpu {cpu_tok}");
    let score = |j: i32| cpu::scaled(row[j as usize], inv) as f64 + cpu::gumbel(key, j as usize) as f64;
    let (a, b) = (score(gpu_tok), score(cpu_tok));
    assert!(
        (a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1.0),
        "{ctx}: token {gpu_tok} vs cpu {cpu_tok} (scores {a} vs {b})"
    );
    assert!(
        cpu::kept_set(row, p).unwrap().contains(&(gpu_tok as usize)),
        "{ctx}: GPU token {gpu_tok} outside the kept set"
    );
    true
}

/// The GPU's results for rows of `logits` (uploaded as `dt`), plus its thresholds.
fn gpu_run(
    gpu: &Device, logits: &[f32], v: usize, params: &[SampleParams], keys: &[u64], dt: DType,
) -> (Vec<Sampled>, Vec<f32>) {
    let rows = params.len();
    let mut s = Sampler::new(gpu, rows, v).unwrap();
    let out = s.sample(gpu, &gpu.upload(logits, dt).unwrap(), rows, params, keys).unwrap();
    let thr = s.thresholds(gpu).unwrap();
    (out, thr)
}

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

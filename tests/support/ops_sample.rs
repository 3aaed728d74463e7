//! The sampler tests' shared part: sampling parameters, the kept-set cases, the f64 log-softmax,
//! the chi-square machinery, the batch-invariance check and the GPU run.
#![allow(dead_code)]

use super::common::*;
use am3safety::ops::sample::{cpu, stream_key, SampleParams, Sampled, Sampler};
use am3safety::tensor::{DType, Device};

pub const NEG_INF: f32 = f32::NEG_INFINITY;

pub fn sp(t: f32, k: usize, p: f32) -> SampleParams {
    SampleParams::new(t, k, p).unwrap()
}

/// Natural logs of weights, so that at T = 1 the probabilities are the normalised weights.
pub fn ln_weights(w: &[f64]) -> Vec<f32> {
    w.iter().map(|&x| x.ln() as f32).collect()
}

/// Hand-made rows with their exact kept sets (ties at every boundary).
pub fn kept_cases() -> Vec<(&'static str, Vec<f32>, SampleParams, Vec<usize>)> {
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

/// f64 log-softmax of x = logit × (1/T) (x in f32, as sampled), over the full row.
pub fn log_softmax64(row: &[f32], p: &SampleParams) -> Vec<f64> {
    let inv = p.inv_temperature();
    let x: Vec<f64> = row.iter().map(|&l| cpu::scaled(l, inv) as f64).collect();
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v - lse).collect()
}

/// Chi-square quantile by Wilson-Hilferty at z standard deviations (upper tail).
pub fn chi2_critical(df: usize, z: f64) -> f64 {
    let d = df as f64;
    let a = 2.0 / (9.0 * d);
    d * (1.0 - a + z * a.sqrt()).powi(3)
}

/// The renormalised softmax over the kept set at T, in f64.
pub fn expected_probs(row: &[f32], p: &SampleParams) -> Vec<f64> {
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
pub fn chi_square(counts: &[usize], probs: &[f64], name: &str) -> (f64, usize) {
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

pub const CHI_LOGITS: [f32; 8] = [1.0, 0.5, 0.2, -0.3, 2.0, 0.0, -1.0, 1.5];

pub fn chi_variants() -> Vec<SampleParams> {
    vec![sp(0.7, 0, 1.0), sp(0.7, 4, 1.0), sp(0.7, 0, 0.8), sp(0.7, 5, 0.9), sp(1.0, 0, 0.97)]
}

/// The draws for one variant: N keys of one fixed seed, so the test is deterministic.
pub const CHI_DRAWS: usize = 40_000;

pub fn chi_key(variant: usize, i: usize) -> u64 {
    stream_key(20_260_101, variant as u64, 7, i as u64)
}

pub fn check_chi(counts: &[usize], p: &SampleParams, name: &str) {
    let probs = expected_probs(&CHI_LOGITS, p);
    let (chi, df) = chi_square(counts, &probs, name);
    // z = 4.5: a 3e-6 false-alarm level for a fixed, reproducible set of draws.
    let crit = chi2_critical(df.max(1), 4.5);
    println!("chi-square {name} {p:?}: {chi:.2} on {df} df (critical {crit:.2}); counts {counts:?}");
    assert!(chi <= crit, "{name}: chi-square {chi:.2} > {crit:.2} on {df} df; counts {counts:?} vs probs {probs:?}");
}

/// Five rows of different shapes of logits, params and keys.
pub fn batch5(v: usize, seed: u64) -> (Vec<f32>, Vec<SampleParams>, Vec<u64>) {
    let mut rng = Rng::new(seed);
    let logits = rng.normal_vec(5 * v, 2.0);
    let params = vec![sp(0.8, 0, 1.0), SampleParams::greedy(), sp(1.0, 10, 0.9), sp(0.6, 0, 0.7), sp(1.2, 3, 1.0)];
    let keys = (0..5).map(|r| stream_key(seed, r, 1, 2)).collect();
    (logits, params, keys)
}

/// Row r sampled alone, in a batch of 5 and at another position gives the same result.
pub fn check_batch_invariance(dev: &Device, dt: DType) {
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

/// Checks a GPU token against the CPU's; returns whether they differ. A difference is tolerated
/// only where the two perturbed scores x + g are within 1e-5 relative (an ulp-level difference in
/// them could flip such a near-tie) and the GPU token is kept. The arithmetic deciding tokens is
/// designed to be bit-identical on both, so no difference is expected at all.
pub fn same_token(row: &[f32], p: &SampleParams, key: u64, gpu_tok: i32, cpu_tok: i32, ctx: &str) -> bool {
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
pub fn gpu_run(
    gpu: &Device, logits: &[f32], v: usize, params: &[SampleParams], keys: &[u64], dt: DType,
) -> (Vec<Sampled>, Vec<f32>) {
    let rows = params.len();
    let mut s = Sampler::new(gpu, rows, v).unwrap();
    let out = s.sample(gpu, &gpu.upload(logits, dt).unwrap(), rows, params, keys).unwrap();
    let thr = s.thresholds(gpu).unwrap();
    (out, thr)
}

//! The sampler on the CPU: kept sets with ties, greedy = argmax (lowest index), the log-prob of the
//! sampled token over the full vocabulary, chi-square against the renormalised softmax, batch
//! invariance, parameter and input errors, the deterministic math, the stream keys, and the
//! kernel's algorithm emulated in Rust against the reference.
mod common;
use am3safety::ops::sample::{cpu, stream_key, SampleParams, Sampler};
use am3safety::tensor::{DType, Device};
use common::*;

#[path = "support/ops_sample.rs"]
mod ops_sample_support;
use ops_sample_support::*;

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

//! Fused attention: CPU backward vs finite differences (f64); CPU packing and decode consistency;
//! input validation; CUDA (bf16 tensor cores, f32 and other head dims on CUDA cores) vs the CPU
//! for forward, backward and decode over a KV cache, outputs poisoned with NaN before each run;
//! the bf16 GPU checks run the planned kernels (the plain calls) and each live tensor-core kernel
//! explicitly (`AttnFwdKernel::{Q64, Q128}`, `AttnBwdKernel::{QHead, KvHead}`,
//! `AttnDecodeKernel::{Rows64, Rows16}`), the KvHead backward also alone after the Q64 forward,
//! and the Q128 forward alone (out and lse).
mod common;
use am3safety::ops::attention::{
    self, cpu, AttnBwdKernel, AttnDecodeKernel, AttnFwdKernel, AttnShape, FwdOut, FwdSaved, KvCache, Qkv, QkvGrads,
    Varlen,
};
use am3safety::tensor::{DType, Device};
use common::*;

fn shape(hq: usize, hkv: usize, d: usize, causal: bool) -> AttnShape {
    AttnShape::new(hq, hkv, d, causal)
}

/// Σ out·g for the gradchecks.
fn loss64(q: &[f64], k: &[f64], v: &[f64], g: &[f64], cu: &[i32], s: &AttnShape) -> f64 {
    let t = *cu.last().unwrap() as usize;
    let (mut out, mut lse) = (vec![0.0; t * s.hq * s.d], vec![0.0; s.hq * t]);
    cpu::fwd(FwdOut { out: &mut out, lse: &mut lse }, Qkv { q, k, v }, cu, s);
    dot(&out, g)
}

#[test]
fn attention_cpu_gradcheck() {
    let mut rng = Rng::new(11);
    let cases: &[(&[i32], usize, usize, usize, bool)] = &[
        (&[0, 1], 1, 1, 3, true),
        (&[0, 3, 8], 4, 2, 5, true),
        (&[0, 3, 8], 4, 2, 5, false),
        (&[0, 0, 4, 6], 3, 1, 4, true), // an empty sequence, GQA 3
        (&[0, 7], 2, 2, 1, false),
    ];
    for &(cu, hq, hkv, d, causal) in cases {
        let s = shape(hq, hkv, d, causal);
        let t = *cu.last().unwrap() as usize;
        let q = probe(&mut rng, t * hq * d);
        let k = probe(&mut rng, t * hkv * d);
        let v = probe(&mut rng, t * hkv * d);
        let g = probe(&mut rng, t * hq * d);
        let (mut out, mut lse) = (vec![0.0; t * hq * d], vec![0.0; hq * t]);
        cpu::fwd(FwdOut { out: &mut out, lse: &mut lse }, Qkv { q: &q, k: &k, v: &v }, cu, &s);
        let (mut dq, mut dk, mut dv) = (vec![9.0; q.len()], vec![9.0; k.len()], vec![9.0; v.len()]);
        let saved = FwdSaved { q: &q[..], k: &k, v: &v, out: &out, lse: &lse };
        cpu::bwd(QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv }, &g, saved, cu, &s);
        let tag = format!("cu {cu:?} hq {hq} hkv {hkv} d {d} causal {causal}");
        gradcheck(&format!("attention dq [{tag}]"), &q, &dq, &mut |x| loss64(x, &k, &v, &g, cu, &s), 64, 1e-6);
        gradcheck(&format!("attention dk [{tag}]"), &k, &dk, &mut |x| loss64(&q, x, &v, &g, cu, &s), 64, 1e-6);
        gradcheck(&format!("attention dv [{tag}]"), &v, &dv, &mut |x| loss64(&q, &k, x, &g, cu, &s), 64, 1e-6);
    }
}

/// The lse the forward saves is log Σ exp(scale·q·k) and the output is a convex combination of v.
#[test]
fn attention_cpu_lse_and_single_key() {
    let s = shape(2, 1, 3, true);
    let q = [1.0f64, 2.0, 0.5, -1.0, 0.0, 3.0, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0];
    let k = [0.5f64, -0.5, 1.0, 2.0, 1.0, 0.0];
    let v = [1.0f64, 2.0, 3.0, -3.0, -2.0, -1.0];
    let cu = [0, 2];
    let (mut out, mut lse) = (vec![0.0; 12], vec![0.0; 4]);
    cpu::fwd(FwdOut { out: &mut out, lse: &mut lse }, Qkv { q: &q, k: &k, v: &v }, &cu, &s);
    // Token 0 sees only key 0: out = v_0 exactly, lse = scale·q·k_0.
    let sc = s.scale as f64;
    assert!((lse[0] - sc * (0.5 - 1.0 + 0.5)).abs() < Tol::F64Reference.value());
    assert_eq!(&out[0..3], &v[0..3]);
    // Token 1, head 1 (q = 0): uniform over both keys.
    let want: Vec<f64> = (0..3).map(|c| 0.5 * (v[c] + v[3 + c])).collect();
    assert!(rel_err64(&out[9..12], &want) < Tol::F64Reference.value());
    assert!((lse[3] - 2f64.ln()).abs() < Tol::F64Reference.value());
}

/// Packing sequences back to back gives each sequence exactly what it gets alone.
#[test]
fn attention_cpu_varlen_is_per_sequence() {
    let mut rng = Rng::new(12);
    let (hq, hkv, d) = (4, 2, 6);
    let lens = [5usize, 1, 9];
    for causal in [true, false] {
        let s = shape(hq, hkv, d, causal);
        let mut cu = vec![0i32];
        for l in lens {
            cu.push(cu.last().unwrap() + l as i32);
        }
        let t = *cu.last().unwrap() as usize;
        let (q, k, v) = (probe(&mut rng, t * hq * d), probe(&mut rng, t * hkv * d), probe(&mut rng, t * hkv * d));
        let (mut out, mut lse) = (vec![0.0; t * hq * d], vec![0.0; hq * t]);
        cpu::fwd(FwdOut { out: &mut out, lse: &mut lse }, Qkv { q: &q, k: &k, v: &v }, &cu, &s);
        for (b, w) in cu.windows(2).enumerate() {
            let (a, n) = (w[0] as usize, (w[1] - w[0]) as usize);
            let (mut o1, mut l1) = (vec![0.0; n * hq * d], vec![0.0; hq * n]);
            let (kv, e) = (a * hkv * d, (a + n) * hkv * d);
            let x = Qkv { q: &q[a * hq * d..(a + n) * hq * d], k: &k[kv..e], v: &v[kv..e] };
            cpu::fwd(FwdOut { out: &mut o1, lse: &mut l1 }, x, &[0, n as i32], &s);
            assert_eq!(&out[a * hq * d..(a + n) * hq * d], &o1[..], "sequence {b} out (causal {causal})");
            for h in 0..hq {
                assert_eq!(&lse[h * t + a..h * t + a + n], &l1[h * n..(h + 1) * n], "sequence {b} lse head {h}");
            }
        }
    }
}

/// Decode over a cache = the causal forward's last rows; checked through the public API on the CPU.
#[test]
fn attention_cpu_decode_matches_fwd() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(13);
    let (hq, hkv, d) = (6, 2, 8);
    let s = shape(hq, hkv, d, true);
    let prompt = [4usize, 1, 7];
    let (b, n_new, max_len) = (prompt.len(), 3usize, 16usize);
    let mut cache = KvCache::new(&dev, b, max_len, hkv, d).unwrap();
    // Full sequences: prompt then n_new tokens; k/v/q per sequence [len, h, d].
    let full: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = prompt
        .iter()
        .map(|&p| {
            let n = p + n_new;
            (rng.normal_vec(n * hq * d, 1.0), rng.normal_vec(n * hkv * d, 1.0), rng.normal_vec(n * hkv * d, 1.0))
        })
        .collect();
    // Prefill the prompts (varlen append), then the new tokens (uniform append).
    let mut cu = vec![0i32];
    let (mut kp, mut vp) = (vec![], vec![]);
    for (i, &p) in prompt.iter().enumerate() {
        kp.extend_from_slice(&full[i].1[..p * hkv * d]);
        vp.extend_from_slice(&full[i].2[..p * hkv * d]);
        cu.push(cu.last().unwrap() + p as i32);
    }
    let seqs = Varlen::new(&dev, &cu).unwrap();
    cache.append_varlen(&dev, &dev.upload_act(&kp).unwrap(), &dev.upload_act(&vp).unwrap(), &seqs).unwrap();
    let (mut kn, mut vn, mut qn) = (vec![], vec![], vec![]);
    for (i, &p) in prompt.iter().enumerate() {
        kn.extend_from_slice(&full[i].1[p * hkv * d..]);
        vn.extend_from_slice(&full[i].2[p * hkv * d..]);
        qn.extend_from_slice(&full[i].0[p * hq * d..]);
    }
    cache.append(&dev, &dev.upload_act(&kn).unwrap(), &dev.upload_act(&vn).unwrap(), n_new).unwrap();
    assert_eq!(cache.lens(), &[7, 4, 10]);
    let mut out = dev.upload_act(&vec![f32::NAN; b * n_new * hq * d]).unwrap();
    attention::decode(&dev, &mut out, &dev.upload_act(&qn).unwrap(), &cache, n_new, &s).unwrap();
    let out = dev.to_vec(&out).unwrap();
    for (i, &p) in prompt.iter().enumerate() {
        let n = p + n_new;
        let (mut o, mut l) = (vec![0f32; n * hq * d], vec![0f32; hq * n]);
        let x = Qkv { q: &full[i].0[..], k: &full[i].1[..], v: &full[i].2[..] };
        cpu::fwd(FwdOut { out: &mut o, lse: &mut l }, x, &[0, n as i32], &s);
        let got = &out[i * n_new * hq * d..(i + 1) * n_new * hq * d];
        let e = rel_err(got, &o[p * hq * d..]);
        println!("decode vs fwd, sequence {i}: rel err {e:.2e}");
        assert!(e < Tol::CpuOpSelf.value(), "decode vs fwd, sequence {i}: rel err {e:.2e}");
    }
    // Truncate and clear keep the lengths consistent.
    cache.truncate(&dev, 1, 2).unwrap();
    assert_eq!(cache.lens(), &[7, 2, 10]);
    cache.clear(&dev).unwrap();
    assert_eq!(cache.lens(), &[0, 0, 0]);
}

#[test]
fn attention_rejects_bad_input() {
    let dev = Device::Cpu;
    assert!(Varlen::new(&dev, &[0, 5, 3]).is_err(), "non-monotone cu_seqlens");
    assert!(Varlen::new(&dev, &[1, 5]).is_err(), "cu_seqlens[0] != 0");
    assert!(Varlen::new(&dev, &[0]).is_err(), "no sequence");
    let seqs = Varlen::new(&dev, &[0, 2, 5]).unwrap();
    assert_eq!((seqs.nseq(), seqs.total(), seqs.max_len), (2, 5, 3));
    let s = shape(4, 2, 8, true);
    let q = dev.zeros_act(5 * 4 * 8).unwrap();
    let kv = dev.zeros_act(5 * 2 * 8).unwrap();
    let mut out = dev.zeros_act(5 * 4 * 8).unwrap();
    let mut lse = dev.zeros_f32(4 * 5).unwrap();
    let (x, wrong_k) = (Qkv { q: &q, k: &kv, v: &kv }, Qkv { q: &q, k: &q, v: &kv });
    let e = attention::fwd(&dev, FwdOut { out: &mut out, lse: &mut lse }, wrong_k, &seqs, &s).unwrap_err();
    assert!(format!("{e}").contains("attention_fwd: k"), "{e}");
    let bad = shape(4, 3, 8, true);
    let o = FwdOut { out: &mut out, lse: &mut lse };
    assert!(attention::fwd(&dev, o, x, &seqs, &bad).is_err(), "hq not a multiple of hkv");
    let mut short_lse = dev.zeros_f32(3).unwrap();
    let o = FwdOut { out: &mut out, lse: &mut short_lse };
    assert!(attention::fwd(&dev, o, x, &seqs, &s).is_err(), "short lse");
    attention::fwd(&dev, FwdOut { out: &mut out, lse: &mut lse }, x, &seqs, &s).unwrap();
    let mut cache = KvCache::new(&dev, 2, 4, 2, 8).unwrap();
    let one = dev.zeros_act(2 * 2 * 8).unwrap();
    let mut o = dev.zeros_act(2 * 4 * 8).unwrap();
    let q1 = dev.zeros_act(2 * 4 * 8).unwrap();
    assert!(attention::decode(&dev, &mut o, &q1, &cache, 1, &s).is_err(), "decode before append");
    cache.append(&dev, &one, &one, 1).unwrap();
    attention::decode(&dev, &mut o, &q1, &cache, 1, &s).unwrap();
    let five = dev.zeros_act(2 * 5 * 2 * 8).unwrap();
    assert!(cache.append(&dev, &five, &five, 5).is_err(), "append past max_len");
    assert_eq!(cache.lens(), &[1, 1], "a failed append must not change the lengths");
}

/// The kernels of one run: None = the plain calls (`fwd`/`bwd`, the plans), else explicit ones.
type Kernels = Option<(AttnFwdKernel, AttnBwdKernel)>;

/// One forward + backward of `x` on `dev` in `dt`: (out, lse, dq, dk, dv), every output
/// NaN-poisoned first.
fn run_fwd_bwd(
    dev: &Device, dt: DType, x: Qkv<[f32]>, dout: &[f32], cu: &[i32], s: &AttnShape, kernels: Kernels,
) -> [Vec<f32>; 5] {
    let (q, k, v) = (x.q, x.k, x.v);
    let t = *cu.last().unwrap() as usize;
    let seqs = Varlen::new(dev, cu).unwrap();
    let up = |x: &[f32]| dev.upload(x, dt).unwrap();
    let nan = |n: usize, dt: DType| dev.upload(&vec![f32::NAN; n], dt).unwrap();
    let (qb, kb, vb, dob) = (up(q), up(k), up(v), up(dout));
    let mut out = nan(q.len(), dt);
    let mut lse = nan(s.hq * t, DType::F32);
    let (mut dq, mut dk, mut dv) = (nan(q.len(), dt), nan(k.len(), dt), nan(v.len(), dt));
    let xb = Qkv { q: &qb, k: &kb, v: &vb };
    let o = FwdOut { out: &mut out, lse: &mut lse };
    match kernels {
        None => attention::fwd(dev, o, xb, &seqs, s).unwrap(),
        Some((kf, _)) => attention::fwd_with(dev, o, xb, &seqs, s, kf).unwrap(),
    }
    let saved = FwdSaved { q: &qb, k: &kb, v: &vb, out: &out, lse: &lse };
    let grads = QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv };
    match kernels {
        None => attention::bwd(dev, grads, &dob, saved, &seqs, s).unwrap(),
        Some((_, kbw)) => attention::bwd_with(dev, grads, &dob, saved, &seqs, s, kbw).unwrap(),
    }
    [&out, &lse, &dq, &dk, &dv].map(|b| dev.to_vec(b).unwrap())
}

fn cu_of(lens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    cu
}

#[test]
fn attention_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("attention_cuda_matches_cpu") else { return };
    let mut rng = Rng::new(14);
    // (sequence lengths, hq, hkv, causal): length 1, odd lengths around the 64-row tiles, GQA 1/4/7,
    // an empty sequence, non-causal packing, and vision-style windows of 64 tokens.
    let windows = vec![64usize; 12];
    // Many (window, head) items (more than three blocks per SM); ragged and empty windows.
    let many: Vec<usize> = (0..44).map(|i| [64, 64, 33, 64, 1, 64, 0, 50][i % 8]).collect();
    let cases: Vec<(Vec<usize>, usize, usize, bool)> = vec![
        (vec![1], 4, 4, true),
        (vec![17], 4, 1, true),
        (vec![63, 64, 65, 1, 129], 7, 1, true),
        (vec![130, 0, 203], 2, 2, false),
        (vec![300], 8, 2, true),
        (vec![5, 77], 14, 2, false),
        (windows, 16, 16, false),
        // several 128-row tiles of the Q128 forward with ragged ends, causal and not
        (vec![383, 128, 2], 4, 2, true),
        (vec![257, 129], 2, 1, false),
        (many.clone(), 16, 8, false),
        (many, 12, 4, true),
    ];
    for &d in &[64usize, 80, 128, 32] {
        for (lens, hq, hkv, causal) in &cases {
            let (hq, hkv, causal) = (*hq, *hkv, *causal);
            let cu = cu_of(lens);
            let t = *cu.last().unwrap() as usize;
            let s = shape(hq, hkv, d, causal);
            let q = bf16_round(&rng.normal_vec(t * hq * d, 1.0));
            let k = bf16_round(&rng.normal_vec(t * hkv * d, 1.0));
            let v = bf16_round(&rng.normal_vec(t * hkv * d, 1.0));
            let dout = bf16_round(&rng.normal_vec(t * hq * d, 1.0));
            let want = run_fwd_bwd(&Device::Cpu, DType::F32, Qkv { q: &q, k: &k, v: &v }, &dout, &cu, &s, None);
            let tc = matches!(d, 64 | 80 | 128);
            let mut runs: Vec<(DType, Kernels)> = vec![(DType::BF16, None), (DType::F32, None)];
            if tc {
                runs.push((DType::BF16, Some((AttnFwdKernel::Q64, AttnBwdKernel::QHead))));
                runs.push((DType::BF16, Some((AttnFwdKernel::Q128, AttnBwdKernel::KvHead))));
            }
            for (dt, kernels) in runs {
                let got = run_fwd_bwd(&gpu, dt, Qkv { q: &q, k: &k, v: &v }, &dout, &cu, &s, kernels);
                let tol = if dt == DType::BF16 { Tol::AttentionBf16.value() } else { Tol::F32Reference.value() };
                let path = match kernels {
                    None if dt == DType::BF16 && tc => "tensor cores, planned".to_string(),
                    None => "cuda cores".to_string(),
                    Some((kf, kbw)) => format!("tensor cores {kf:?} + {kbw:?}"),
                };
                for (i, name) in ["out", "lse", "dq", "dk", "dv"].iter().enumerate() {
                    // dq and dk vanish where every row sees a single key (p = 1, so dS = 0): their
                    // error is measured against the gradient scale ‖dv‖ as well.
                    let floor = if matches!(*name, "dq" | "dk") { norm2(&want[4]) } else { 0.0 };
                    let e = rel_err_floor(&got[i], &want[i], floor);
                    let tag = format!(
                        "attention {name} {} ({path}) d {d} hq {hq} hkv {hkv} causal {causal} lens {lens:?}",
                        dt.suffix()
                    );
                    println!("{tag}: rel err {e:.2e}");
                    assert!(
                        e <= tol,
                        "{tag}: rel err {e:.2e} > {tol:.0e} (inf = an element left unwritten or non-finite)"
                    );
                }
            }
        }
    }
}

/// The KvHead backward alone (kernels/attention_bwd.cu): the Q64 forward gives out and lse,
/// then `bwd_with(.., AttnBwdKernel::KvHead)` against the CPU, dq/dk/dv NaN-poisoned. Shapes that reach its
/// special paths: windows (one step per q head), blocks walking many (q head, query tile) steps
/// with the double-buffered Q (GQA 7 over 300 tokens: 35 steps; GQA 7 over 829 tokens), ragged
/// varlen ends (1, 63, 65, 130, 200: warps whose 32 keys or queries lie partly or wholly past the
/// end), an empty sequence, the causal diagonal (warp (keys 32-63, queries 0-31) fully masked),
/// non-causal packing, MHA (GQA 1), and q scaled by 4 (peaked P: exp2 of large negative
/// arguments).
#[test]
fn attention_cuda_bwd_kvhead_matches_cpu() {
    let Some(gpu) = cuda_or_skip("attention_cuda_bwd_kvhead_matches_cpu") else { return };
    let mut rng = Rng::new(18);
    // (sequence lengths, hq, hkv, causal, q scale)
    let cases: Vec<BwdCase> = vec![
        (vec![1], 7, 1, true, 1.0),
        (vec![65], 1, 1, true, 1.0),
        (vec![64, 33, 0, 64, 1], 16, 16, false, 1.0),
        (vec![1, 63, 65, 130, 200], 4, 4, true, 1.0),
        (vec![1, 63, 65, 130, 200], 4, 4, false, 1.0),
        (vec![1, 63, 65, 130, 200], 4, 1, false, 1.0),
        (vec![300, 17], 7, 1, true, 1.0),
        (vec![200, 0, 129], 8, 2, false, 1.0),
        (vec![700, 129], 14, 2, true, 1.0),
        (vec![257, 64], 4, 1, true, 4.0),
    ];
    bwd_alone_matches_cpu(&gpu, &mut rng, &cases, AttnBwdKernel::KvHead);
}

/// The Q128 forward alone (kernels/attention_fwd.cu) against the CPU forward, out and lse
/// NaN-poisoned. Shapes that reach its special paths: a single 65-token sequence (one 128-row
/// block: warp 3 idle, warp 2 with one real row, a 1-key ragged second K/V tile), ragged varlen
/// ends (1, 63, 65, 130, 200) with GQA 7 causal and GQA 2 non-causal, 9 query tiles per sequence
/// (dispatched longest first) with an empty sequence, a CLIP-sized non-causal batch (577 tokens),
/// and q scaled by 4 (peaked rows: the running max moves by large steps, so the online rescale
/// of O and l is exercised). lse is held to 1e-3 (it is computed from f32 scores).
#[test]
fn attention_cuda_fwd_q128_matches_cpu() {
    let Some(gpu) = cuda_or_skip("attention_cuda_fwd_q128_matches_cpu") else { return };
    let mut rng = Rng::new(17);
    // (lengths, hq, hkv, causal, q scale)
    let cases: Vec<(Vec<usize>, usize, usize, bool, f64)> = vec![
        (vec![65], 1, 1, true, 1.0),
        (vec![1, 63, 65, 130, 200], 7, 1, true, 1.0),
        (vec![1, 63, 65, 130, 200], 4, 2, false, 1.0),
        (vec![1100, 0, 333], 4, 1, true, 1.0),
        (vec![577, 200], 4, 4, false, 1.0),
        (vec![517], 8, 2, true, 4.0),
        (vec![300, 129], 6, 3, false, 4.0),
    ];
    for &d in &[64usize, 80, 128] {
        for (lens, hq, hkv, causal, qmul) in &cases {
            let (hq, hkv, causal) = (*hq, *hkv, *causal);
            let cu = cu_of(lens);
            let t = *cu.last().unwrap() as usize;
            let s = shape(hq, hkv, d, causal);
            let q = bf16_round(&rng.normal_vec(t * hq * d, *qmul));
            let k = bf16_round(&rng.normal_vec(t * hkv * d, 1.0));
            let v = bf16_round(&rng.normal_vec(t * hkv * d, 1.0));
            let (mut o_ref, mut l_ref) = (vec![0f32; q.len()], vec![0f32; hq * t]);
            cpu::fwd(FwdOut { out: &mut o_ref, lse: &mut l_ref }, Qkv { q: &q, k: &k, v: &v }, &cu, &s);
            let dev = &gpu;
            let seqs = Varlen::new(dev, &cu).unwrap();
            let up = |x: &[f32]| dev.upload(x, DType::BF16).unwrap();
            let mut out = dev.upload(&vec![f32::NAN; q.len()], DType::BF16).unwrap();
            let mut lse = dev.upload(&vec![f32::NAN; hq * t], DType::F32).unwrap();
            let (qb, kb, vb) = (up(&q), up(&k), up(&v));
            let o = FwdOut { out: &mut out, lse: &mut lse };
            attention::fwd_with(dev, o, Qkv { q: &qb, k: &kb, v: &vb }, &seqs, &s, AttnFwdKernel::Q128).unwrap();
            let (out, lse) = (dev.to_vec(&out).unwrap(), dev.to_vec(&lse).unwrap());
            for (name, got, want, tol) in
                [("out", &out, &o_ref, Tol::AttentionBf16), ("lse", &lse, &l_ref, Tol::AttentionLseBf16)]
            {
                let (e, tol) = (rel_err(got, want), tol.value());
                let tag = format!("attention {name} bf16 (Q128 fwd) d {d} hq {hq} hkv {hkv} causal {causal} q scale {qmul} lens {lens:?}");
                println!("{tag}: rel err {e:.2e}");
                assert!(e <= tol, "{tag}: rel err {e:.2e} > {tol:.0e} (inf = an element left unwritten or non-finite)");
            }
        }
    }
}

/// One decode turn: (q, k_new, v_new, n_new), q [B, n_new, hq, d], k/v [B, n_new, hkv, d].
type Turn = (Vec<f32>, Vec<f32>, Vec<f32>, usize);

/// The prompts prefilled before the turns: their lengths and packed keys and values [T, hkv, d].
struct Prefill<'a> {
    lens: &'a [usize],
    k: &'a [f32],
    v: &'a [f32],
}

/// Decode on `dev` in `dt` through a prefill (varlen append), then two turns: n_new tokens and
/// then one more; returns both turns' outputs (NaN-poisoned before each).
fn run_decode(
    dev: &Device, dt: DType, pre: &Prefill, turns: &[Turn], max_len: usize, s: &AttnShape,
    kernel: Option<AttnDecodeKernel>,
) -> Vec<Vec<f32>> {
    let (prompt, kp, vp) = (pre.lens, pre.k, pre.v);
    let mut cache = KvCache::with_dtype(dev, dt, prompt.len(), max_len, s.hkv, s.d).unwrap();
    let seqs = Varlen::new(dev, &cu_of(prompt)).unwrap();
    cache.append_varlen(dev, &dev.upload(kp, dt).unwrap(), &dev.upload(vp, dt).unwrap(), &seqs).unwrap();
    let mut outs = vec![];
    for (q, k, v, n_new) in turns {
        cache.append(dev, &dev.upload(k, dt).unwrap(), &dev.upload(v, dt).unwrap(), *n_new).unwrap();
        let mut out = dev.upload(&vec![f32::NAN; q.len()], dt).unwrap();
        let qb = dev.upload(q, dt).unwrap();
        // Rows16 takes at most 16 query rows per kv head: larger turns run Rows64.
        match kernel {
            None => attention::decode(dev, &mut out, &qb, &cache, *n_new, s).unwrap(),
            Some(AttnDecodeKernel::Rows16) if n_new * (s.hq / s.hkv) > 16 => {
                attention::decode_with(dev, &mut out, &qb, &cache, *n_new, s, AttnDecodeKernel::Rows64).unwrap()
            }
            Some(k) => attention::decode_with(dev, &mut out, &qb, &cache, *n_new, s, k).unwrap(),
        }
        outs.push(dev.to_vec(&out).unwrap());
    }
    outs
}

#[test]
fn attention_cuda_decode_matches_cpu() {
    let Some(gpu) = cuda_or_skip("attention_cuda_decode_matches_cpu") else { return };
    let mut rng = Rng::new(15);
    // (prompt lengths, hq, hkv, n_new of the first turn, causal): a one-token prompt, prompts
    // long enough to split the cache into many chunks, GQA 7/4/1, a user turn of 20 tokens
    // (140 query rows per kv head: three 64-row tiles), chunks of several tiles.
    let cases: Vec<(Vec<usize>, usize, usize, usize, bool)> = vec![
        (vec![1, 70, 300, 1500], 7, 1, 1, true),
        (vec![33, 2], 8, 2, 3, true),
        (vec![129, 64, 1000], 4, 4, 1, true),
        (vec![200, 31], 28, 4, 20, true),
        (vec![90, 7], 4, 2, 2, false),
        // 64 (sequence, kv head) pairs: the split leaves several 64-key tiles per chunk (on 132 SMs).
        (vec![1500, 700, 64, 1, 1000, 333, 90, 1200], 8, 8, 1, true),
        // The Rows16 kernel at its limit (16 rows: 2 new tokens × GQA 8), a long cache split
        // into multi-tile chunks (three-stage ring), and one kv head for the wave sizing.
        (vec![5000, 3], 8, 1, 2, true),
        (vec![2100], 16, 1, 1, false),
    ];
    for &d in &[64usize, 80, 128, 32] {
        for (prompt, hq, hkv, n_new, causal) in &cases {
            let (hq, hkv, n_new, causal) = (*hq, *hkv, *n_new, *causal);
            let s = shape(hq, hkv, d, causal);
            let b = prompt.len();
            let tp: usize = prompt.iter().sum();
            let max_len = prompt.iter().max().unwrap() + n_new + 1;
            let kp = bf16_round(&rng.normal_vec(tp * hkv * d, 1.0));
            let vp = bf16_round(&rng.normal_vec(tp * hkv * d, 1.0));
            let turns: Vec<Turn> = [n_new, 1]
                .iter()
                .map(|&n| {
                    let q = bf16_round(&rng.normal_vec(b * n * hq * d, 1.0));
                    let k = bf16_round(&rng.normal_vec(b * n * hkv * d, 1.0));
                    let v = bf16_round(&rng.normal_vec(b * n * hkv * d, 1.0));
                    (q, k, v, n)
                })
                .collect();
            let pre = Prefill { lens: prompt, k: &kp, v: &vp };
            let want = run_decode(&Device::Cpu, DType::F32, &pre, &turns, max_len, &s, None);
            let mut runs: Vec<(DType, Option<AttnDecodeKernel>)> = vec![(DType::BF16, None), (DType::F32, None)];
            if matches!(d, 64 | 80 | 128) {
                runs.push((DType::BF16, Some(AttnDecodeKernel::Rows64)));
                runs.push((DType::BF16, Some(AttnDecodeKernel::Rows16)));
            }
            for (dt, kernel) in runs {
                let got = run_decode(&gpu, dt, &pre, &turns, max_len, &s, kernel);
                let tol = if dt == DType::BF16 { Tol::AttentionBf16.value() } else { Tol::F32Reference.value() };
                for (turn, (a, w)) in got.iter().zip(&want).enumerate() {
                    let e = rel_err(a, w);
                    let tag = format!("decode {} {kernel:?} d {d} hq {hq} hkv {hkv} prompts {prompt:?} turn {turn} (n_new {}) causal {causal}", dt.suffix(), turns[turn].3);
                    println!("{tag}: rel err {e:.2e}");
                    assert!(
                        e <= tol,
                        "{tag}: rel err {e:.2e} > {tol:.0e} (inf = an element left unwritten or non-finite)"
                    );
                }
            }
        }
    }
}

/// (sequence lengths, hq, hkv, causal, q scale).
type BwdCase = (Vec<usize>, usize, usize, bool, f32);

/// A backward kernel alone: the Q64 forward gives out and lse, then `bwd_with(.., kernel)`
/// against the CPU at every case and d 64/80/128, dq/dk/dv NaN-poisoned.
fn bwd_alone_matches_cpu(gpu: &Device, rng: &mut Rng, cases: &[BwdCase], kernel: AttnBwdKernel) {
    for &d in &[64usize, 80, 128] {
        for (lens, hq, hkv, causal, qmul) in cases {
            let (hq, hkv, causal, qmul) = (*hq, *hkv, *causal, *qmul);
            let cu = cu_of(lens);
            let t = *cu.last().unwrap() as usize;
            let s = shape(hq, hkv, d, causal);
            let q: Vec<f32> = bf16_round(&rng.normal_vec(t * hq * d, 1.0)).iter().map(|x| x * qmul).collect();
            let k = bf16_round(&rng.normal_vec(t * hkv * d, 1.0));
            let v = bf16_round(&rng.normal_vec(t * hkv * d, 1.0));
            let dout = bf16_round(&rng.normal_vec(t * hq * d, 1.0));
            let want = run_fwd_bwd(&Device::Cpu, DType::F32, Qkv { q: &q, k: &k, v: &v }, &dout, &cu, &s, None);
            let dev = gpu;
            let seqs = Varlen::new(dev, &cu).unwrap();
            let up = |x: &[f32]| dev.upload(x, DType::BF16).unwrap();
            let nan = |n: usize, dt: DType| dev.upload(&vec![f32::NAN; n], dt).unwrap();
            let (qb, kb, vb, dob) = (up(&q), up(&k), up(&v), up(&dout));
            let mut out = nan(q.len(), DType::BF16);
            let mut lse = nan(hq * t, DType::F32);
            let o = FwdOut { out: &mut out, lse: &mut lse };
            attention::fwd_with(dev, o, Qkv { q: &qb, k: &kb, v: &vb }, &seqs, &s, AttnFwdKernel::Q64).unwrap();
            let (mut dq, mut dk, mut dv) =
                (nan(q.len(), DType::BF16), nan(k.len(), DType::BF16), nan(v.len(), DType::BF16));
            let saved = FwdSaved { q: &qb, k: &kb, v: &vb, out: &out, lse: &lse };
            let grads = QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv };
            attention::bwd_with(dev, grads, &dob, saved, &seqs, &s, kernel).unwrap();
            let got = [&dq, &dk, &dv].map(|b| dev.to_vec(b).unwrap());
            for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
                // As in attention_cuda_matches_cpu: dq and dk are also measured against ‖dv‖.
                let floor = if i < 2 { norm2(&want[4]) } else { 0.0 };
                let e = rel_err_floor(&got[i], &want[2 + i], floor);
                let tag = format!("attention {name} bf16 (Q64 fwd, {kernel:?} bwd) d {d} hq {hq} hkv {hkv} causal {causal} q x{qmul} lens {lens:?}");
                println!("{tag}: rel err {e:.2e}");
                let tol = Tol::AttentionBf16.value();
                assert!(e <= tol, "{tag}: rel err {e:.2e} > {tol:.0e} (inf = an element left unwritten or non-finite)");
            }
        }
    }
}

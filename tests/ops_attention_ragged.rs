//! The rollout engine's attention pieces: ragged decode (`attention::decode_varlen`: each
//! sequence its own number of new tokens, 0 for an idle slot) against the plain CPU forward
//! over each full sequence; the KV-cache prefix copy; and CUDA (bf16, f32) against the CPU,
//! outputs poisoned with NaN first.
mod common;
use am3safety::ops::attention::{self, cpu, AttnShape, FwdOut, KvCache, Qkv, Varlen};
use am3safety::tensor::{DType, Device};
use common::*;

fn cu_of(lens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    cu
}

/// Per sequence: q [len, hq, d], k/v [len, hkv, d].
type Seq = (Vec<f32>, Vec<f32>, Vec<f32>);

fn seqs(rng: &mut Rng, lens: &[usize], s: &AttnShape) -> Vec<Seq> {
    lens.iter()
        .map(|&n| {
            (
                rng.normal_vec(n * s.hq * s.d, 1.0),
                rng.normal_vec(n * s.hkv * s.d, 1.0),
                rng.normal_vec(n * s.hkv * s.d, 1.0),
            )
        })
        .collect()
}

/// Prefill `prompt[b]` tokens of each sequence, then one ragged step of `new[b]` tokens;
/// returns the step's outputs [Σ new, hq, d].
fn ragged(
    dev: &Device, dt: DType, all: &[Seq], prompt: &[usize], new: &[usize], s: &AttnShape, max_len: usize,
) -> Vec<f32> {
    let (hq, hkv, d) = (s.hq, s.hkv, s.d);
    let mut cache = KvCache::with_dtype(dev, dt, all.len(), max_len, hkv, d).unwrap();
    let pick = |range: &dyn Fn(usize) -> (usize, usize), which: usize, w: usize| -> Vec<f32> {
        all.iter()
            .enumerate()
            .flat_map(|(b, x)| {
                let (a, e) = range(b);
                let v = match which {
                    0 => &x.0,
                    1 => &x.1,
                    _ => &x.2,
                };
                v[a * w * d..e * w * d].to_vec()
            })
            .collect()
    };
    let pre = |b: usize| (0, prompt[b]);
    let step = |b: usize| (prompt[b], prompt[b] + new[b]);
    let up = |v: Vec<f32>| dev.upload(&v, dt).unwrap();
    cache
        .append_varlen(
            dev,
            &up(pick(&pre, 1, hkv)),
            &up(pick(&pre, 2, hkv)),
            &Varlen::new(dev, &cu_of(prompt)).unwrap(),
        )
        .unwrap();
    let cu = Varlen::new(dev, &cu_of(new)).unwrap();
    cache.append_varlen(dev, &up(pick(&step, 1, hkv)), &up(pick(&step, 2, hkv)), &cu).unwrap();
    let q = pick(&step, 0, hq);
    let mut out = up(vec![f32::NAN; q.len()]);
    attention::decode_varlen(dev, &mut out, &up(q), &cache, &cu, s).unwrap();
    dev.to_vec(&out).unwrap()
}

/// The same rows from a plain forward over each whole sequence.
fn reference(all: &[Seq], prompt: &[usize], new: &[usize], s: &AttnShape) -> Vec<f32> {
    let (hq, d) = (s.hq, s.d);
    let mut out = Vec::new();
    for (b, x) in all.iter().enumerate() {
        let n = prompt[b] + new[b];
        let (mut o, mut lse) = (vec![0f32; n * hq * d], vec![0f32; hq * n]);
        let (nq, nkv) = (n * hq * d, n * s.hkv * d);
        let xn = Qkv { q: &x.0[..nq], k: &x.1[..nkv], v: &x.2[..nkv] };
        cpu::fwd(FwdOut { out: &mut o, lse: &mut lse }, xn, &[0, n as i32], s);
        out.extend_from_slice(&o[prompt[b] * hq * d..]);
    }
    out
}

const CASES: [(&[usize], &[usize]); 4] = [
    (&[5, 1, 9, 3], &[1, 0, 4, 1]), // decode, an idle slot, a prefill
    (&[2, 7], &[6, 1]),
    (&[4, 4, 4], &[1, 1, 1]), // uniform: the tensor-core decode path on a GPU
    (&[1, 30, 3], &[0, 0, 12]),
];

#[test]
fn ragged_decode_equals_the_full_forward_on_the_cpu() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(21);
    for (hq, hkv, d) in [(6, 2, 8), (4, 4, 16)] {
        let s = AttnShape::new(hq, hkv, d, true);
        for (prompt, new) in CASES {
            let lens: Vec<usize> = prompt.iter().zip(new).map(|(a, b)| a + b).collect();
            let all = seqs(&mut rng, &lens, &s);
            let got = ragged(&dev, DType::F32, &all, prompt, new, &s, 64);
            let want = reference(&all, prompt, new, &s);
            assert_eq!(got, want, "hq {hq} hkv {hkv} prompt {prompt:?} new {new:?}");
        }
    }
}

#[test]
fn prefix_copy_gives_the_copied_slot_the_same_cache() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(22);
    let s = AttnShape::new(4, 2, 8, true);
    let mut cache = KvCache::new(&dev, 3, 16, 2, 8).unwrap();
    let (k, v) = (rng.normal_vec(7 * 16, 1.0), rng.normal_vec(7 * 16, 1.0));
    cache
        .append_varlen(
            &dev,
            &dev.upload_act(&k).unwrap(),
            &dev.upload_act(&v).unwrap(),
            &Varlen::new(&dev, &[0, 7, 7, 7]).unwrap(),
        )
        .unwrap();
    cache.copy_prefix(&dev, 0, 2, 5).unwrap();
    assert_eq!(cache.lens(), &[7, 0, 5]);
    let row = 16;
    let kc = cache.k.host().unwrap();
    assert_eq!(&kc[2 * 16 * row..(2 * 16 + 5) * row], &kc[..5 * row]);
    assert!(cache.copy_prefix(&dev, 0, 1, 8).is_err(), "more tokens than the source holds");
    let _ = s;
}

#[test]
fn ragged_decode_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("ragged_decode_cuda_matches_cpu") else { return };
    let mut rng = Rng::new(23);
    for (hq, hkv, d) in [(28, 4, 128), (8, 8, 64), (6, 2, 80)] {
        let s = AttnShape::new(hq, hkv, d, true);
        for (prompt, new) in CASES {
            let lens: Vec<usize> = prompt.iter().zip(new).map(|(a, b)| a + b).collect();
            let all = seqs(&mut rng, &lens, &s);
            let want = ragged(&Device::Cpu, DType::F32, &all, prompt, new, &s, 64);
            for (dt, tol) in [(DType::F32, Tol::F32Reference), (DType::BF16, Tol::AttentionBf16)] {
                let got = ragged(&gpu, dt, &all, prompt, new, &s, 64);
                let e = rel_err(&got, &want);
                println!("ragged decode {dt:?} hq {hq} hkv {hkv} d {d} new {new:?}: {e:.2e}");
                assert!(e < tol.value(), "{dt:?} {new:?}: {e:.2e}");
            }
        }
    }
    // The prefix copy on the device.
    let mut c = KvCache::with_dtype(&gpu, DType::BF16, 2, 8, 1, 64).unwrap();
    let k = rng.normal_vec(3 * 64, 1.0);
    c.append_varlen(
        &gpu,
        &gpu.upload(&k, DType::BF16).unwrap(),
        &gpu.upload(&k, DType::BF16).unwrap(),
        &Varlen::new(&gpu, &[0, 3, 3]).unwrap(),
    )
    .unwrap();
    c.copy_prefix(&gpu, 0, 1, 3).unwrap();
    let all = gpu.to_vec(&c.k).unwrap();
    assert_eq!(&all[8 * 64..11 * 64], &all[..3 * 64]);
}

//! AdamW: the CPU step vs an independent f64 loop written from the update rule (bias correction,
//! decoupled decay, grad scaling), the sum of squares, error paths, and CUDA vs the CPU (param
//! must equal bf16(master) bit for bit).
mod common;
use am3safety::ops::adamw::{self, AdamW};
use am3safety::tensor::{DType, Device};
use common::*;

const HP: AdamW = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };

/// The textbook AdamW step in f64, from the rule (not from the implementation):
/// w ← w − lr·wd·w; m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²;
/// w ← w − lr · m̂ / (√v̂ + eps), m̂ = m / (1−β1^t), v̂ = v / (1−β2^t).
fn reference_step(w: &mut [f64], m: &mut [f64], v: &mut [f64], grad: &[f64], hp: &AdamW, t: i32, gs: f64) {
    let (lr, b1, b2, eps, wd) = (hp.lr as f64, hp.beta1 as f64, hp.beta2 as f64, hp.eps as f64, hp.weight_decay as f64);
    for i in 0..w.len() {
        let g = grad[i] * gs;
        w[i] -= lr * wd * w[i];
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        let mhat = m[i] / (1.0 - b1.powi(t));
        let vhat = v[i] / (1.0 - b2.powi(t));
        w[i] -= lr * mhat / (vhat.sqrt() + eps);
    }
}

#[test]
fn adamw_cpu_matches_f64_rule() {
    let d = Device::Cpu;
    let mut rng = Rng::new(31);
    for &n in &[1usize, 7, 37, 1000] {
        let w0 = rng.normal_vec(n, 1.0);
        let (mut w, mut m, mut v) = (to64(&w0), vec![0.0; n], vec![0.0; n]);
        let mut param = d.upload(&vec![f32::NAN; n], DType::F32).unwrap();
        let mut master = d.upload(&w0, DType::F32).unwrap();
        let (mut mb, mut vb) = (d.zeros_f32(n).unwrap(), d.zeros_f32(n).unwrap());
        for t in 1..=6u64 {
            let g = rng.normal_vec(n, 0.1 * t as f64);
            let gs = if t % 2 == 0 { 0.5 } else { 1.0 };
            reference_step(&mut w, &mut m, &mut v, &to64(&g), &HP, t as i32, gs as f64);
            adamw::step(
                &d,
                adamw::Bufs {
                    param: &mut param,
                    master: &mut master,
                    grad: &d.upload(&g, DType::F32).unwrap(),
                    m: &mut mb,
                    v: &mut vb,
                },
                n,
                &HP,
                t,
                gs,
            )
            .unwrap();
            let (pw, mw, mm, vv) =
                (d.to_vec(&param).unwrap(), d.to_vec(&master).unwrap(), d.to_vec(&mb).unwrap(), d.to_vec(&vb).unwrap());
            let errs = [
                ("master", rel_err64(&to64(&mw), &w)),
                ("m", rel_err64(&to64(&mm), &m)),
                ("v", rel_err64(&to64(&vv), &v)),
            ];
            for (name, e) in errs {
                println!("adamw cpu n={n} step {t}: {name} rel err vs f64 rule {e:.2e}");
                assert!(e < 2e-6, "adamw cpu n={n} step {t}: {name} rel err {e:.2e}");
            }
            assert_eq!(pw, mw, "CPU param must equal master");
        }
        // The update moved the weights by about lr per step (Adam's normalised step).
        let moved = rel_err64(&w, &to64(&w0));
        assert!(moved > 1e-3, "weights barely moved: {moved:.2e}");
    }
}

#[test]
fn adamw_first_step_is_sign_like() {
    // t = 1: m̂ = g and v̂ = g², so after the decay the update is lr·sign(g) (up to eps), and a
    // zero gradient leaves only the decay.
    let d = Device::Cpu;
    let w0 = [2.0f32, -1.0, 0.5];
    let g = [3.0f32, -0.001, 0.0];
    let mut master = d.upload(&w0, DType::F32).unwrap();
    let mut param = d.zeros_f32(3).unwrap();
    let (mut m, mut v) = (d.zeros_f32(3).unwrap(), d.zeros_f32(3).unwrap());
    adamw::step(
        &d,
        adamw::Bufs {
            param: &mut param,
            master: &mut master,
            grad: &d.upload(&g, DType::F32).unwrap(),
            m: &mut m,
            v: &mut v,
        },
        3,
        &HP,
        1,
        1.0,
    )
    .unwrap();
    let got = d.to_vec(&master).unwrap();
    let decay = 1.0 - 1e-2 * 0.1;
    let want = [2.0 * decay - 0.01, -decay + 0.01, 0.5 * decay];
    for i in 0..3 {
        println!("first step element {i}: {} want {}", got[i], want[i]);
        assert!((got[i] as f64 - want[i]).abs() < 1e-6, "element {i}: {} want {}", got[i], want[i]);
    }
}

#[test]
fn adamw_errors() {
    let d = Device::Cpu;
    let mk = |n| d.zeros_f32(n).unwrap();
    let (mut p, mut w, g, mut m, mut v) = (mk(4), mk(4), mk(4), mk(4), mk(4));
    let e =
        adamw::step(&d, adamw::Bufs { param: &mut p, master: &mut w, grad: &g, m: &mut m, v: &mut v }, 4, &HP, 0, 1.0)
            .unwrap_err()
            .to_string();
    println!("step 0: {e}");
    assert!(e.contains("1-based"), "{e}");
    let e = adamw::step(
        &d,
        adamw::Bufs { param: &mut p, master: &mut w, grad: &mk(3), m: &mut m, v: &mut v },
        4,
        &HP,
        1,
        1.0,
    )
    .unwrap_err()
    .to_string();
    println!("short grad: {e}");
    assert!(e.contains("adamw_step") && e.contains("grad"), "{e}");
    let e = adamw::sum_squares(&d, &mk(3), 4).unwrap_err().to_string();
    assert!(e.contains("sum_squares"), "{e}");
}

#[test]
fn sum_squares_cpu() {
    let d = Device::Cpu;
    let x = [3.0f32, -4.0, 0.5];
    let s = adamw::sum_squares(&d, &d.upload(&x, DType::F32).unwrap(), 3).unwrap();
    assert_eq!(s, 25.25);
    assert_eq!(adamw::sum_squares(&d, &d.zeros_f32(0).unwrap(), 0).unwrap(), 0.0);
}

#[test]
fn adamw_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("adamw_cuda_matches_cpu") else { return };
    let cpu = Device::Cpu;
    let mut rng = Rng::new(32);
    // (param dtype, grad dtype): bf16 gradients are GradStore::Bf16Linear's.
    for &(pdt, gdt) in &[(DType::BF16, DType::F32), (DType::F32, DType::F32), (DType::BF16, DType::BF16)] {
        for &n in &[1usize, 7, 8, 9, 1000, 4099, 100_003, 2_000_001] {
            let w0 = rng.normal_vec(n, 0.05);
            let m0 = rng.normal_vec(n, 1e-3);
            let v0: Vec<f32> = rng.uniform_vec(n, 0.0, 1e-5);
            let mut state = Vec::new();
            for dev in [&cpu, &gpu] {
                let dt = if dev.is_cuda() { pdt } else { DType::F32 };
                state.push((
                    dev.upload(&vec![f32::NAN; n], dt).unwrap(),
                    dev.upload(&w0, DType::F32).unwrap(),
                    dev.upload(&m0, DType::F32).unwrap(),
                    dev.upload(&v0, DType::F32).unwrap(),
                ));
            }
            for t in 1..=3u64 {
                let g = rng.normal_vec(n, 1e-2);
                // The CPU gets the same values the bf16 buffer holds.
                let g = if gdt == DType::BF16 { bf16_round(&g) } else { g };
                let gs = [1.0f32, 0.25, 0.7][t as usize - 1];
                for (dev, (p, w, m, v)) in [&cpu, &gpu].into_iter().zip(state.iter_mut()) {
                    let gb = dev.upload(&g, if dev.is_cuda() { gdt } else { DType::F32 }).unwrap();
                    adamw::step(dev, adamw::Bufs { param: p, master: w, grad: &gb, m, v }, n, &HP, t, gs).unwrap();
                }
            }
            let read = |i: usize, dev: &Device| -> Vec<Vec<f32>> {
                let (p, w, m, v) = &state[i];
                [p, w, m, v].iter().map(|b| dev.to_vec(b).unwrap()).collect()
            };
            let (c, g) = (read(0, &cpu), read(1, &gpu));
            for (k, name) in [(1, "master"), (2, "m"), (3, "v")] {
                let e = rel_err(&g[k], &c[k]);
                println!("adamw param {} grad {} n={n}: {name} rel err {e:.2e}", pdt.suffix(), gdt.suffix());
                assert_err(
                    &format!("adamw param {} grad {} n={n}: {name}", pdt.suffix(), gdt.suffix()),
                    e,
                    Tol::F32Reference,
                );
            }
            // The parameter is exactly the GPU's own master rounded to the param dtype.
            let want = if pdt == DType::BF16 { bf16_round(&g[1]) } else { g[1].clone() };
            let bad = g[0].iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(
                bad.is_none(),
                "adamw param {} n={n}: element {:?}: param {} != rounded master {}",
                pdt.suffix(),
                bad,
                bad.map_or(0.0, |i| g[0][i]),
                bad.map_or(0.0, |i| want[i])
            );
            println!("adamw param {} n={n}: param == {}(master) bit for bit", pdt.suffix(), pdt.suffix());
        }
    }
}

#[test]
fn sum_squares_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("sum_squares_cuda_matches_cpu") else { return };
    {
        {
            let mut rng = Rng::new(33);
            for &dt in &[DType::F32, DType::BF16] {
                for &n in &[1usize, 7, 8, 9, 1000, 100_003, 2_000_001, 20_000_001] {
                    let x = bf16_round(&rng.normal_vec(n, 0.01));
                    let want =
                        adamw::sum_squares(&Device::Cpu, &Device::Cpu.upload(&x, DType::F32).unwrap(), n).unwrap();
                    let xb = gpu.upload(&x, dt).unwrap();
                    let got = adamw::sum_squares(&gpu, &xb, n).unwrap();
                    let again = adamw::sum_squares(&gpu, &xb, n).unwrap();
                    let e = (got - want).abs() / want.abs().max(1e-300);
                    println!("sum_squares {} n={n}: {got:.12e} vs cpu {want:.12e}, rel err {e:.2e}", dt.suffix());
                    assert_err(&format!("sum_squares {} n={n}", dt.suffix()), e, Tol::F64Reference);
                    assert_eq!(got.to_bits(), again.to_bits(), "sum_squares {} n={n} not deterministic", dt.suffix());
                }
            }
        }
    }
}

//! Activations: SwiGLU and the three GELUs. CPU backward vs finite differences (f64), CPU forward
//! vs known values, the HF name mapping, and CUDA (bf16 and f32) vs the CPU.
mod common;
use am3safety::ops::act::{self, cpu, Gelu};
use am3safety::tensor::{DType, Device};
use common::*;

const GELUS: [Gelu; 3] = [Gelu::Tanh, Gelu::Erf, Gelu::Quick];
/// Odd and even sizes, around the 8-element vector width and past one grid wave.
const SIZES: &[usize] = &[1, 7, 8, 9, 33, 1000, 4097, 100_003, 2_000_001];

#[test]
fn swiglu_cpu_gradcheck() {
    let mut rng = Rng::new(11);
    for &n in &[1usize, 7, 33, 100] {
        // Spread gate over the sigmoid's whole range, saturated ends included.
        let gate: Vec<f64> = (0..n).map(|_| 4.0 * rng.normal()).collect();
        let up = probe(&mut rng, n);
        let w = probe(&mut rng, n);
        let loss = |g: &[f64], u: &[f64]| {
            let mut o = vec![0.0; n];
            cpu::swiglu_fwd(&mut o, g, u);
            dot(&o, &w)
        };
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        cpu::swiglu_bwd(&mut dg, &mut du, &w, &gate, &up);
        gradcheck(&format!("swiglu dgate n={n}"), &gate, &dg, &mut |g| loss(g, &up), 100, 1e-6);
        gradcheck(&format!("swiglu dup n={n}"), &up, &du, &mut |u| loss(&gate, u), 100, 1e-6);
    }
}

#[test]
fn gelu_cpu_gradcheck() {
    let mut rng = Rng::new(12);
    for kind in GELUS {
        for &n in &[1usize, 7, 64] {
            let x: Vec<f64> = (0..n).map(|_| 3.0 * rng.normal()).collect();
            let w = probe(&mut rng, n);
            let mut dx = vec![0.0; n];
            cpu::gelu_bwd(&mut dx, &w, &x, kind);
            let mut loss = |xp: &[f64]| {
                let mut o = vec![0.0; n];
                cpu::gelu_fwd(&mut o, xp, kind);
                dot(&o, &w)
            };
            // 1e-5: near gelu's zero (x ≈ -0.75) the relative measure magnifies the f64 erf and
            // finite-difference noise (worst seen 9.6e-7).
            gradcheck(&format!("gelu {kind:?} dx n={n}"), &x, &dx, &mut loss, 64, 1e-5);
        }
    }
}

#[test]
fn gelu_known_values() {
    // PyTorch: F.gelu(1.) = 0.8413447460685429, F.gelu(1., approximate="tanh") = 0.8411919906082768,
    // F.gelu(-2.) = -0.04550026389635842; quick_gelu(1.) = sigmoid(1.702).
    let quick1 = 1.0 / (1.0 + (-1.702f64).exp());
    for (kind, x, want) in [
        (Gelu::Erf, 1.0, 0.8413447460685429),
        (Gelu::Erf, -2.0, -0.04550026389635842),
        (Gelu::Tanh, 1.0, 0.8411919906082768),
        (Gelu::Quick, 1.0, quick1),
        (Gelu::Erf, 0.0, 0.0),
        (Gelu::Tanh, 0.0, 0.0),
        (Gelu::Quick, 0.0, 0.0),
    ] {
        let got = cpu::gelu(x, kind);
        println!("gelu {kind:?}({x}) = {got:.16} (want {want:.16})");
        assert!((got - want).abs() < 1e-12, "gelu {kind:?}({x}) = {got} want {want}");
    }
    let mut o = [0.0f64];
    cpu::swiglu_fwd(&mut o, &[1.0], &[2.0]);
    let want = 2.0 / (1.0 + (-1.0f64).exp());
    assert!((o[0] - want).abs() < 1e-15, "swiglu(1, 2) = {} want {want}", o[0]);
}

#[test]
fn gelu_from_hf_names() {
    for (name, want) in [
        ("gelu", Gelu::Erf),
        ("gelu_python", Gelu::Erf),
        ("gelu_pytorch_tanh", Gelu::Tanh),
        ("gelu_new", Gelu::Tanh),
        ("gelu_fast", Gelu::Tanh),
        ("quick_gelu", Gelu::Quick),
        ("Quick_GELU", Gelu::Quick),
    ] {
        assert_eq!(Gelu::from_hf(name).unwrap(), want, "{name}");
    }
    for bad in ["silu", "swish", "relu", "gelu_10", ""] {
        let e = Gelu::from_hf(bad).unwrap_err().to_string();
        println!("from_hf({bad:?}) -> {e}");
        assert!(e.contains("hidden_act"), "{bad}: {e}");
    }
}

#[test]
fn act_bad_lengths_are_errors() {
    let d = Device::Cpu;
    let (a, b) = (d.zeros_f32(4).unwrap(), d.zeros_f32(5).unwrap());
    let mut o = d.zeros_f32(4).unwrap();
    let e = act::swiglu_fwd(&d, &mut o, &a, &b, 4).unwrap_err().to_string();
    assert!(e.contains("swiglu_fwd") && e.contains("up"), "{e}");
    let e = act::gelu_fwd(&d, &mut o, &b, 4, Gelu::Erf).unwrap_err().to_string();
    assert!(e.contains("gelu_fwd") && e.contains('x'), "{e}");
}

fn check_close(what: &str, dt: DType, n: usize, got: &[f32], want: &[f32]) {
    let tol = if dt == DType::BF16 { Tol::Bf16Op.value() } else { Tol::F32Reference.value() };
    let e = rel_err(got, want);
    println!("{what} {} n={n}: rel err {e:.2e} (max abs {:.2e})", dt.suffix(), max_abs(got, want));
    assert!(e <= tol, "{what} {} n={n}: rel err {e:.2e} > {tol:.0e}", dt.suffix());
}

#[test]
fn swiglu_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("swiglu_cuda_matches_cpu") else { return };
    let mut rng = Rng::new(13);
    for &dt in &[DType::BF16, DType::F32] {
        for &n in SIZES {
            let round = |v: Vec<f32>| if dt == DType::BF16 { bf16_round(&v) } else { v };
            let gate = round(rng.normal_vec(n, 3.0));
            let up = round(rng.normal_vec(n, 1.0));
            let dout = round(rng.normal_vec(n, 1.0));
            let run = |dev: &Device, dt: DType| -> (Vec<f32>, Vec<f32>, Vec<f32>) {
                let (g, u, d) =
                    (dev.upload(&gate, dt).unwrap(), dev.upload(&up, dt).unwrap(), dev.upload(&dout, dt).unwrap());
                let nan = vec![f32::NAN; n];
                let mut o = dev.upload(&nan, dt).unwrap();
                act::swiglu_fwd(dev, &mut o, &g, &u, n).unwrap();
                let (mut dg, mut du) = (dev.upload(&nan, dt).unwrap(), dev.upload(&nan, dt).unwrap());
                act::swiglu_bwd(dev, &mut dg, &mut du, &d, &g, &u, n).unwrap();
                (dev.to_vec(&o).unwrap(), dev.to_vec(&dg).unwrap(), dev.to_vec(&du).unwrap())
            };
            let (o0, dg0, du0) = run(&Device::Cpu, DType::F32);
            let (o1, dg1, du1) = run(&gpu, dt);
            check_close("swiglu out", dt, n, &o1, &o0);
            check_close("swiglu dgate", dt, n, &dg1, &dg0);
            check_close("swiglu dup", dt, n, &du1, &du0);
        }
    }
}

#[test]
fn gelu_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("gelu_cuda_matches_cpu") else { return };
    {
        {
            let mut rng = Rng::new(14);
            for kind in GELUS {
                for &dt in &[DType::BF16, DType::F32] {
                    for &n in SIZES {
                        let round = |v: Vec<f32>| if dt == DType::BF16 { bf16_round(&v) } else { v };
                        let x = round(rng.normal_vec(n, 3.0));
                        let dout = round(rng.normal_vec(n, 1.0));
                        let run = |dev: &Device, dt: DType| -> (Vec<f32>, Vec<f32>) {
                            let (xb, db) = (dev.upload(&x, dt).unwrap(), dev.upload(&dout, dt).unwrap());
                            let nan = vec![f32::NAN; n];
                            let mut o = dev.upload(&nan, dt).unwrap();
                            act::gelu_fwd(dev, &mut o, &xb, n, kind).unwrap();
                            let mut dx = dev.upload(&nan, dt).unwrap();
                            act::gelu_bwd(dev, &mut dx, &db, &xb, n, kind).unwrap();
                            (dev.to_vec(&o).unwrap(), dev.to_vec(&dx).unwrap())
                        };
                        let (o0, dx0) = run(&Device::Cpu, DType::F32);
                        let (o1, dx1) = run(&gpu, dt);
                        check_close(&format!("gelu {kind:?} out"), dt, n, &o1, &o0);
                        check_close(&format!("gelu {kind:?} dx"), dt, n, &dx1, &dx0);
                    }
                }
            }
        }
    }
}

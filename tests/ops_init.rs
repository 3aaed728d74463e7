//! Counter-based init: CPU statistics and determinism; CUDA (f32, bf16) equals the CPU.
mod common;
use am3safety::ops::init;
use am3safety::tensor::{DType, Device};
use common::*;

#[test]
fn init_cpu_is_standard_normal_and_deterministic() {
    let n = 200_000;
    let mut x = vec![0f32; n];
    init::cpu::normal(&mut x, 42, 0.0, 1.0);
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    println!("init: mean {mean:.4}, var {var:.4}");
    assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
    let mut y = vec![0f32; n];
    init::cpu::normal(&mut y, 42, 0.0, 1.0);
    assert_eq!(x, y);
    init::cpu::normal(&mut y, 43, 0.0, 1.0);
    assert_ne!(x, y);
}

#[test]
fn init_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("init_cuda_matches_cpu") else { return };
    for &n in &[1usize, 7, 1000, 1_234_567] {
        let mut want = vec![0f32; n];
        init::cpu::normal(&mut want, 9, 0.5, 0.02);
        for (dt, tol) in [(DType::F32, Tol::F32Reference.value()), (DType::BF16, Tol::Bf16Op.value())] {
            let mut x = gpu.upload(&vec![f32::NAN; n], dt).unwrap();
            init::normal(&gpu, &mut x, n, 9, 0.5, 0.02).unwrap();
            let e = rel_err(&gpu.to_vec(&x).unwrap(), &want);
            println!("init {} n={n}: rel err {e:.2e}", dt.suffix());
            assert!(e <= tol, "init {} n={n}: rel err {e:.2e}", dt.suffix());
        }
    }
    let _ = Device::Cpu;
}

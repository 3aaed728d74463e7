//! GEMM: the CPU GEMM against a naive f64 product for every transpose combination; cuBLAS
//! (bf16 in, bf16 or f32 out; f32 in/out) against the CPU; linear fwd/bwd shapes.
mod common;
use am3safety::ops::matmul::{self, cpu};
use am3safety::tensor::{DType, Device};
use common::*;

fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av as f64 * bv as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

const SHAPES: &[(usize, usize, usize)] = &[(1, 1, 1), (3, 5, 7), (17, 33, 65), (64, 80, 128), (129, 257, 96)];

#[test]
fn cpu_gemm_matches_naive() {
    let mut rng = Rng::new(3);
    for &(m, n, k) in SHAPES {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = rng.normal_vec(m * k, 1.0);
            let b = rng.normal_vec(k * n, 1.0);
            let c0 = rng.normal_vec(m * n, 1.0);
            let mut c = c0.clone();
            cpu::gemm(&mut c, &a, &b, matmul::Mm { m, n, k, trans_a: ta, trans_b: tb, alpha: 0.5, beta: 1.0 });
            let want: Vec<f32> = naive(&a, &b, m, n, k, ta, tb).iter().zip(&c0).map(|(x, y)| 0.5 * x + y).collect();
            let e = rel_err(&c, &want);
            assert!(e < 1e-6, "gemm {m}x{n}x{k} ta={ta} tb={tb}: rel err {e:.2e}");
        }
    }
}

#[test]
fn cuda_gemm_matches_cpu() {
    let Some(gpu) = cuda_or_skip("cuda_gemm_matches_cpu") else { return };
    let mut rng = Rng::new(4);
    for &(m, n, k) in SHAPES {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for (ab, ct, tol) in
                [(DType::BF16, DType::BF16, 1e-2), (DType::BF16, DType::F32, 1e-5), (DType::F32, DType::F32, 1e-5)]
            {
                let round = |v: Vec<f32>| if ab == DType::BF16 { bf16_round(&v) } else { v };
                let a = round(rng.normal_vec(m * k, 1.0));
                let b = round(rng.normal_vec(k * n, 1.0));
                let c0 = round(rng.normal_vec(m * n, 1.0));
                let mut want = c0.clone();
                cpu::gemm(&mut want, &a, &b, matmul::Mm { m, n, k, trans_a: ta, trans_b: tb, alpha: 1.0, beta: 1.0 });
                let (ga, gb) = (gpu.upload(&a, ab).unwrap(), gpu.upload(&b, ab).unwrap());
                let mut gc = gpu.upload(&c0, ct).unwrap();
                matmul::fwd(
                    &gpu,
                    &mut gc,
                    &ga,
                    &gb,
                    matmul::Mm { m, n, k, trans_a: ta, trans_b: tb, alpha: 1.0, beta: 1.0 },
                )
                .unwrap();
                let got = gpu.to_vec(&gc).unwrap();
                let e = rel_err(&got, &want);
                // bf16 output rounds the result: allow bf16 resolution; f32 output: only accumulation order.
                let tol = if ct == DType::BF16 {
                    tol
                } else if ab == DType::F32 {
                    1e-5
                } else {
                    2e-5
                };
                println!("gemm {}->{} {m}x{n}x{k} ta={ta} tb={tb}: rel err {e:.2e}", ab.suffix(), ct.suffix());
                assert!(
                    e <= tol,
                    "cuBLAS gemm {}->{} {m}x{n}x{k} ta={ta} tb={tb}: rel err {e:.2e} > {tol:.0e}",
                    ab.suffix(),
                    ct.suffix()
                );
            }
        }
    }
    // Strided batch.
    let (m, n, k, cnt) = (33, 17, 40, 5);
    let a = bf16_round(&rng.normal_vec(cnt * m * k, 1.0));
    let b = bf16_round(&rng.normal_vec(cnt * k * n, 1.0));
    let mut want = vec![0f32; cnt * m * n];
    matmul::batched(
        &Device::Cpu,
        &mut Device::Cpu.upload(&want, DType::F32).unwrap(),
        &Device::Cpu.upload(&a, DType::F32).unwrap(),
        &Device::Cpu.upload(&b, DType::F32).unwrap(),
        matmul::Mm::new(m, n, k).trans_b(),
        cnt,
    )
    .unwrap();
    let mut wc = Device::Cpu.upload(&want, DType::F32).unwrap();
    matmul::batched(
        &Device::Cpu,
        &mut wc,
        &Device::Cpu.upload(&a, DType::F32).unwrap(),
        &Device::Cpu.upload(&b, DType::F32).unwrap(),
        matmul::Mm::new(m, n, k).trans_b(),
        cnt,
    )
    .unwrap();
    want = Device::Cpu.to_vec(&wc).unwrap();
    let mut gc = gpu.zeros(DType::F32, cnt * m * n).unwrap();
    matmul::batched(
        &gpu,
        &mut gc,
        &gpu.upload(&a, DType::BF16).unwrap(),
        &gpu.upload(&b, DType::BF16).unwrap(),
        matmul::Mm::new(m, n, k).trans_b(),
        cnt,
    )
    .unwrap();
    let e = rel_err(&gpu.to_vec(&gc).unwrap(), &want);
    println!("gemm batched x{cnt}: rel err {e:.2e}");
    assert!(e < 2e-5, "strided batched gemm: rel err {e:.2e}");
}

#[test]
fn matmul_rejects_bad_shapes() {
    let d = Device::Cpu;
    let a = d.upload(&[1.0; 6], DType::F32).unwrap();
    let b = d.upload(&[1.0; 6], DType::F32).unwrap();
    let mut c = d.zeros_f32(5).unwrap();
    let err = matmul::fwd(&d, &mut c, &a, &b, matmul::Mm::new(2, 2, 3)).unwrap_err();
    assert!(format!("{err}").contains("c has 5 elements"), "{err}");
}

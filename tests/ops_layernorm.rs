//! LayerNorm: CPU forward vs a direct formula, CPU backward vs finite differences (f64), argument
//! errors, and CUDA (bf16 and f32) vs the CPU, including the shared-memory (> 48 KiB) and
//! global-memory accumulation paths of the backward and non-zero starting dw/db (+=).
mod common;
use am3safety::ops::layernorm::{self, cpu};
use am3safety::tensor::{DType, Device};
use common::*;

#[test]
fn layernorm_cpu_matches_direct_formula() {
    let mut rng = Rng::new(10);
    let (rows, cols) = (3usize, 37usize);
    let x: Vec<f64> = (0..rows * cols).map(|_| 2.0 + rng.normal()).collect();
    let w = probe(&mut rng, cols);
    let b = probe(&mut rng, cols);
    let eps = 1e-5f32;
    let (mut y, mut m, mut r) = (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
    cpu::fwd(layernorm::Fwd { y: &mut y, mean: &mut m, rstd: &mut r, x: &x, w: &w, b: &b }, rows, cols, eps);
    let mut want = vec![0.0; rows * cols];
    for row in 0..rows {
        let xr = &x[row * cols..(row + 1) * cols];
        let mu: f64 = xr.iter().sum::<f64>() / cols as f64;
        // Population variance via E[x²] − mean² (a different formula from the reference's).
        let var = xr.iter().map(|v| v * v).sum::<f64>() / cols as f64 - mu * mu;
        for c in 0..cols {
            want[row * cols + c] = (xr[c] - mu) / (var + eps as f64).sqrt() * w[c] + b[c];
        }
    }
    let e = rel_err64(&y, &want);
    println!("layernorm cpu fwd vs direct formula: rel err {e:.2e}");
    assert_err("layernorm cpu f64 vs closed form", e, Tol::F64Reference);
}

#[test]
fn layernorm_cpu_gradcheck() {
    let mut rng = Rng::new(11);
    for &(rows, cols) in &[(1usize, 1usize), (2, 3), (3, 7), (4, 33), (2, 64)] {
        let x: Vec<f64> = (0..rows * cols).map(|_| 0.5 + rng.normal()).collect();
        let w: Vec<f64> = (0..cols).map(|_| 1.0 + 0.3 * rng.normal()).collect();
        let b: Vec<f64> = probe(&mut rng, cols);
        let g = probe(&mut rng, rows * cols);
        let eps = 1e-5;
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let (mut y, mut m, mut r) = (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
            cpu::fwd(layernorm::Fwd { y: &mut y, mean: &mut m, rstd: &mut r, x, w, b }, rows, cols, eps);
            dot(&y, &g)
        };
        let (mut y, mut m, mut r) = (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
        cpu::fwd(layernorm::Fwd { y: &mut y, mean: &mut m, rstd: &mut r, x: &x, w: &w, b: &b }, rows, cols, eps);
        let (mut dx, mut dw, mut db) = (vec![0.0; rows * cols], vec![0.0; cols], vec![0.0; cols]);
        cpu::bwd(
            layernorm::Bwd { dx: &mut dx, dw: &mut dw, db: &mut db, dy: &g, x: &x, w: &w, mean: &m, rstd: &r },
            rows,
            cols,
        );
        println!("layernorm gradcheck [{rows}x{cols}]");
        gradcheck("layernorm dx", &x, &dx, &mut |xp| loss(xp, &w, &b), 64, 1e-6);
        gradcheck("layernorm dw", &w, &dw, &mut |wp| loss(&x, wp, &b), 64, 1e-6);
        gradcheck("layernorm db", &b, &db, &mut |bp| loss(&x, &w, bp), 64, 1e-6);
    }
}

#[test]
fn layernorm_bad_arguments_are_errors() {
    let dev = Device::Cpu;
    let (rows, cols) = (2, 3);
    let x = dev.upload(&[1.0; 6], DType::F32).unwrap();
    let w = dev.upload(&[1.0; 3], DType::F32).unwrap();
    let b = dev.upload(&[0.0; 2], DType::F32).unwrap(); // wrong length
    let mut y = dev.zeros_f32(6).unwrap();
    let (mut m, mut r) = (dev.zeros_f32(rows).unwrap(), dev.zeros_f32(rows).unwrap());
    let e = layernorm::fwd(
        &dev,
        layernorm::Fwd { y: &mut y, mean: &mut m, rstd: &mut r, x: &x, w: &w, b: &b },
        rows,
        cols,
        1e-5,
    )
    .unwrap_err()
    .to_string();
    println!("layernorm bad b: {e}");
    assert!(e.contains("layernorm_fwd") && e.contains("b"), "{e}");
    let mut m1 = dev.zeros_f32(1).unwrap();
    let e = layernorm::fwd(
        &dev,
        layernorm::Fwd { y: &mut y, mean: &mut m1, rstd: &mut r, x: &x, w: &w, b: &w },
        rows,
        cols,
        1e-5,
    )
    .unwrap_err()
    .to_string();
    println!("layernorm bad mean: {e}");
    assert!(e.contains("mean"), "{e}");
    let mut di = dev.zeros(DType::I32, cols).unwrap();
    let (mut dx, mut db) = (dev.zeros_f32(6).unwrap(), dev.zeros_f32(cols).unwrap());
    let e = layernorm::bwd(
        &dev,
        layernorm::Bwd { dx: &mut dx, dw: &mut di, db: &mut db, dy: &x, x: &x, w: &w, mean: &m, rstd: &r },
        rows,
        cols,
    )
    .unwrap_err()
    .to_string();
    println!("layernorm bad dw dtype: {e}");
    assert!(e.contains("layernorm_bwd") && e.contains("dw"), "{e}");
}

#[test]
fn layernorm_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("layernorm_cuda_matches_cpu") else { return };
    // Both kernels: the plan's (Vec16 where it applies) and Rows forced with `fwd_with` /
    // `bwd_with`, the same checks.
    for force_rows in [false, true] {
        check_cuda(&gpu, force_rows);
    }
}

#[test]
fn layernorm_plans() {
    use layernorm::{LayerNormBwdKernel as B, LayerNormFwdKernel as F};
    let (bf, f) = (DType::BF16, DType::F32);
    assert_eq!(layernorm::plan_fwd(bf, 1000, 4096, true), F::Vec16 { vpt: 2 });
    assert_eq!(layernorm::plan_bwd(f, 1000, 4096, true), B::Vec16 { vpt: 4 });
    assert_eq!(layernorm::plan_fwd(bf, 577, 1024, true), F::Vec16 { vpt: 1 });
    assert_eq!(layernorm::plan_bwd(bf, 2, 4104, true), B::Vec16 { vpt: 4 });
    assert_eq!(layernorm::plan_fwd(bf, 3, 12289, true), F::Rows);
    assert_eq!(layernorm::plan_bwd(bf, 4, 12800, true), B::Rows);
    assert_eq!(layernorm::plan_fwd(bf, 600, 1024, false), F::Rows);
    assert_eq!(layernorm::plan_bwd(bf, 600, 1024, false), B::Rows);
}

fn check_cuda(gpu: &Device, force_rows: bool) {
    let var = if force_rows { " rows" } else { "" };
    let cpu_dev = Device::Cpu;
    let mut rng = Rng::new(12);
    // ROW_SHAPES plus: 8000 cols (64 KB of shared accumulators, above the 48 KB default),
    // 12289 cols (past the shared-memory limit: global accumulation, odd so scalar),
    // 12800 cols (global accumulation, vector path), 4000 rows (several rows per block).
    let mut shapes: Vec<(usize, usize)> = ROW_SHAPES.to_vec();
    shapes.extend_from_slice(&[(5, 8000), (3, 12289), (4, 12800), (4000, 96), (600, 1024)]);
    // Vec16: many rows per block (prefetch; 2 vectors per thread in bf16, 4 in f32) and 4 vectors
    // per thread with partly inactive lanes.
    shapes.extend_from_slice(&[(1000, 4096), (2, 4104)]);
    for &dt in &[DType::BF16, DType::F32] {
        for &(rows, cols) in &shapes {
            let round = |v: Vec<f32>| if dt == DType::BF16 { bf16_round(&v) } else { v };
            // A non-zero mean per row checks the centring.
            let x = round((0..rows * cols).map(|i| rng.normal() as f32 + 0.5 * ((i / cols) % 5) as f32).collect());
            let w = round(rng.uniform_vec(cols, 0.5, 1.5));
            let b = round(rng.normal_vec(cols, 0.5));
            let dy = round(rng.normal_vec(rows * cols, 1.0));
            let dw0 = rng.normal_vec(cols, 1.0); // dw/db accumulate into these (+=)
            let db0 = rng.normal_vec(cols, 1.0);
            let run = |dev: &Device, dt: DType| -> [Vec<f32>; 6] {
                let up = |v: &[f32], d: DType| dev.upload(v, d).unwrap();
                let (xb, wb, bb, dyb) = (up(&x, dt), up(&w, dt), up(&b, dt), up(&dy, dt));
                let mut y = up(&vec![f32::NAN; rows * cols], dt);
                let mut m = up(&vec![f32::NAN; rows], DType::F32);
                let mut r = up(&vec![f32::NAN; rows], DType::F32);
                let rows_kernel = force_rows && dev.gpu().is_some();
                if rows_kernel {
                    let k = layernorm::LayerNormFwdKernel::Rows;
                    layernorm::fwd_with(
                        dev,
                        k,
                        layernorm::Fwd { y: &mut y, mean: &mut m, rstd: &mut r, x: &xb, w: &wb, b: &bb },
                        rows,
                        cols,
                        1e-5,
                    )
                } else {
                    layernorm::fwd(
                        dev,
                        layernorm::Fwd { y: &mut y, mean: &mut m, rstd: &mut r, x: &xb, w: &wb, b: &bb },
                        rows,
                        cols,
                        1e-5,
                    )
                }
                .unwrap();
                let mut dx = up(&vec![f32::NAN; rows * cols], dt);
                let (mut dw, mut db) = (up(&dw0, DType::F32), up(&db0, DType::F32));
                if rows_kernel {
                    let k = layernorm::LayerNormBwdKernel::Rows;
                    layernorm::bwd_with(
                        dev,
                        k,
                        layernorm::Bwd {
                            dx: &mut dx,
                            dw: &mut dw,
                            db: &mut db,
                            dy: &dyb,
                            x: &xb,
                            w: &wb,
                            mean: &m,
                            rstd: &r,
                        },
                        rows,
                        cols,
                    )
                } else {
                    layernorm::bwd(
                        dev,
                        layernorm::Bwd {
                            dx: &mut dx,
                            dw: &mut dw,
                            db: &mut db,
                            dy: &dyb,
                            x: &xb,
                            w: &wb,
                            mean: &m,
                            rstd: &r,
                        },
                        rows,
                        cols,
                    )
                }
                .unwrap();
                [&y, &m, &r, &dx, &dw, &db].map(|b| dev.to_vec(b).unwrap())
            };
            let want = run(&cpu_dev, DType::F32);
            let got = run(gpu, dt);
            let tol = if dt == DType::BF16 { Tol::Bf16Op.value() } else { Tol::F32Reference.value() };
            // dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dy·w cancels to ~0 when a row has one
            // element: judge it against the size of rstd·g, the term that cancelled.
            let rstd = &want[2];
            let term: Vec<f32> = (0..rows * cols).map(|i| rstd[i / cols] * dy[i] * w[i % cols]).collect();
            let dx_scale = norm2(&term);
            for (k, name) in ["y", "mean", "rstd", "dx", "dw", "db"].iter().enumerate() {
                let e = if *name == "dx" {
                    rel_err_scaled(&got[k], &want[k], dx_scale)
                } else {
                    rel_err(&got[k], &want[k])
                };
                println!(
                    "layernorm{var} {name} {} [{rows}x{cols}]: rel err {e:.2e} (max abs {:.2e})",
                    dt.suffix(),
                    max_abs(&got[k], &want[k])
                );
                assert!(e <= tol, "layernorm{var} {name} {} [{rows}x{cols}]: rel err {e:.2e} > {tol:.0e}", dt.suffix());
            }
        }
    }
}

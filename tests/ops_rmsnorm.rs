//! RMSNorm: CPU backward vs finite differences (f64); CUDA (bf16 and f32) vs the CPU.
mod common;
use am3safety::ops::rmsnorm::{self, cpu, RmsNormBwdKernel};
use am3safety::tensor::{DType, Device};
use common::*;

#[test]
fn rmsnorm_cpu_gradcheck() {
    let mut rng = Rng::new(1);
    for &(rows, cols) in &[(1usize, 1usize), (3, 7), (4, 33)] {
        let x: Vec<f64> = probe(&mut rng, rows * cols);
        let w: Vec<f64> = (0..cols).map(|_| 1.0 + 0.3 * rng.normal()).collect();
        let g = probe(&mut rng, rows * cols);
        let eps = 1e-6;
        let loss = |x: &[f64], w: &[f64]| {
            let (mut y, mut r) = (vec![0.0; rows * cols], vec![0.0; rows]);
            cpu::fwd(rmsnorm::Fwd { y: &mut y, rstd: &mut r, x, w }, rows, cols, eps);
            dot(&y, &g)
        };
        let (mut y, mut r) = (vec![0.0; rows * cols], vec![0.0; rows]);
        cpu::fwd(rmsnorm::Fwd { y: &mut y, rstd: &mut r, x: &x, w: &w }, rows, cols, eps);
        let (mut dx, mut dw) = (vec![0.0; rows * cols], vec![0.0; cols]);
        cpu::bwd(rmsnorm::Bwd { dx: &mut dx, dw: &mut dw, dy: &g, x: &x, w: &w, rstd: &r }, rows, cols);
        gradcheck("rmsnorm dx", &x, &dx, &mut |xp| loss(xp, &w), 64, 1e-6);
        gradcheck("rmsnorm dw", &w, &dw, &mut |wp| loss(&x, wp), 64, 1e-6);
    }
}

#[test]
fn rmsnorm_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("rmsnorm_cuda_matches_cpu") else { return };
    // Both kernels: the plan's (Vec16 where it applies) and Rows forced with `bwd_with`, the same
    // checks.
    for force_rows in [false, true] {
        check_cuda(&gpu, force_rows);
    }
}

#[test]
fn rmsnorm_bwd_plan() {
    use RmsNormBwdKernel::*;
    let (bf, f) = (DType::BF16, DType::F32);
    assert_eq!(rmsnorm::plan_bwd(bf, 1000, 4096, true), Vec16 { vpt: 2 });
    assert_eq!(rmsnorm::plan_bwd(f, 1000, 4096, true), Vec16 { vpt: 4 });
    assert_eq!(rmsnorm::plan_bwd(bf, 700, 1280, true), Vec16 { vpt: 1 });
    assert_eq!(rmsnorm::plan_bwd(bf, 2, 4104, true), Vec16 { vpt: 4 });
    assert_eq!(rmsnorm::plan_bwd(bf, 2, 4104, false), Rows);
    assert_eq!(rmsnorm::plan_bwd(bf, 5, 8200, true), Rows);
    assert_eq!(rmsnorm::plan_bwd(f, 3, 8192, true), Rows);
    assert_eq!(rmsnorm::plan_bwd(bf, 3, 4097, true), Rows);
    assert_eq!(rmsnorm::plan_bwd(bf, 0, 4096, true), Rows);
}

#[test]
fn rmsnorm_bwd_forced_vec16_errors_when_it_cannot_run() {
    let Some(gpu) = cuda_or_skip("rmsnorm_bwd_forced_vec16_errors_when_it_cannot_run") else { return };
    let (rows, cols) = (5, 8200);
    let up = |n: usize| gpu.upload(&vec![1.0; n], DType::BF16).unwrap();
    let (mut dx, dy, x, w) = (up(rows * cols), up(rows * cols), up(rows * cols), up(cols));
    let rstd = gpu.upload(&vec![1.0; rows], DType::F32).unwrap();
    let mut dw = gpu.zeros_f32(cols).unwrap();
    let e = rmsnorm::bwd_with(
        &gpu,
        RmsNormBwdKernel::Vec16 { vpt: 4 },
        rmsnorm::Bwd { dx: &mut dx, dw: &mut dw, dy: &dy, x: &x, w: &w, rstd: &rstd },
        rows,
        cols,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("rmsnorm_bwd") && e.contains("Vec16"), "{e}");
}

/// ROW_SHAPES plus Vec16's cases: many rows per block with the next-row prefetch (1000 x 4096:
/// 2 vectors per thread in bf16, 4 in f32), the Qwen vision width, 4 vectors per thread with
/// partly inactive lanes (4104), and rows too long for Vec16 (8200 bf16, 8192 f32: Rows).
const V2_SHAPES: &[(usize, usize)] = &[(1000, 4096), (700, 1280), (2, 4104), (3, 8192), (5, 8200)];

fn check_cuda(gpu: &Device, force_rows: bool) {
    let var = if force_rows { " rows" } else { "" };
    let cpu_dev = Device::Cpu;
    let mut rng = Rng::new(2);
    for &dt in &[DType::BF16, DType::F32] {
        for &(rows, cols) in ROW_SHAPES.iter().chain(V2_SHAPES) {
            let round = |v: Vec<f32>| if dt == DType::BF16 { bf16_round(&v) } else { v };
            let x = round(rng.normal_vec(rows * cols, 1.0));
            let w = round(rng.uniform_vec(cols, 0.5, 1.5));
            let dy = round(rng.normal_vec(rows * cols, 1.0));
            let run = |dev: &Device, dt: DType| -> (Vec<f32>, Vec<f32>, Vec<f32>) {
                let (xb, wb, dyb) =
                    (dev.upload(&x, dt).unwrap(), dev.upload(&w, dt).unwrap(), dev.upload(&dy, dt).unwrap());
                let mut y = dev.upload(&vec![f32::NAN; rows * cols], dt).unwrap();
                let mut r = dev.upload(&vec![f32::NAN; rows], DType::F32).unwrap();
                rmsnorm::fwd(dev, rmsnorm::Fwd { y: &mut y, rstd: &mut r, x: &xb, w: &wb }, rows, cols, 1e-6).unwrap();
                let mut dx = dev.upload(&vec![f32::NAN; rows * cols], dt).unwrap();
                let mut dw = dev.zeros_f32(cols).unwrap();
                if force_rows && dev.gpu().is_some() {
                    rmsnorm::bwd_with(
                        dev,
                        RmsNormBwdKernel::Rows,
                        rmsnorm::Bwd { dx: &mut dx, dw: &mut dw, dy: &dyb, x: &xb, w: &wb, rstd: &r },
                        rows,
                        cols,
                    )
                } else {
                    rmsnorm::bwd(
                        dev,
                        rmsnorm::Bwd { dx: &mut dx, dw: &mut dw, dy: &dyb, x: &xb, w: &wb, rstd: &r },
                        rows,
                        cols,
                    )
                }
                .unwrap();
                (dev.to_vec(&y).unwrap(), dev.to_vec(&dx).unwrap(), dev.to_vec(&dw).unwrap())
            };
            let (y0, dx0, dw0) = run(&cpu_dev, DType::F32);
            let (y1, dx1, dw1) = run(gpu, dt);
            let tol = if dt == DType::BF16 { Tol::Bf16Op.value() } else { Tol::F32Reference.value() };
            // dx = rstd·(dy·w − x·rstd²·mean(dy·w·x)): the two terms cancel exactly when a row has
            // one element, so judge dx against the size of its first term.
            let r0 = Device::Cpu
                .to_vec(&{
                    let (xb, wb) =
                        (Device::Cpu.upload(&x, DType::F32).unwrap(), Device::Cpu.upload(&w, DType::F32).unwrap());
                    let (mut y, mut r) =
                        (Device::Cpu.zeros_f32(rows * cols).unwrap(), Device::Cpu.zeros_f32(rows).unwrap());
                    rmsnorm::fwd(
                        &Device::Cpu,
                        rmsnorm::Fwd { y: &mut y, rstd: &mut r, x: &xb, w: &wb },
                        rows,
                        cols,
                        1e-6,
                    )
                    .unwrap();
                    r
                })
                .unwrap();
            let term: Vec<f32> = (0..rows * cols).map(|i| r0[i / cols] * dy[i] * w[i % cols]).collect();
            let dx_scale = norm2(&term);
            for (name, a, b) in [("y", &y1, &y0), ("dx", &dx1, &dx0), ("dw", &dw1, &dw0)] {
                let e = if name == "dx" { rel_err_scaled(a, b, dx_scale) } else { rel_err(a, b) };
                println!("rmsnorm{var} {name} {} [{rows}x{cols}]: rel err {e:.2e}", dt.suffix());
                assert!(e <= tol, "rmsnorm{var} {name} {} [{rows}x{cols}]: rel err {e:.2e} > {tol:.0e}", dt.suffix());
            }
        }
    }
}

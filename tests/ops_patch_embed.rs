//! Vision patch embedding (window-order gather + GEMM): CPU dW vs finite differences (f64), the
//! CPU forward vs a direct Conv3d over an image, and CUDA (bf16, f32) vs the CPU with and without
//! a permutation; the row moves (gather / scatter / take) on both devices.
mod common;
use am3safety::ops::patch_embed::{self, cpu, gather_rows, scatter_rows, take_rows, RowIndex};
use am3safety::tensor::{DType, Device};
use common::*;

fn shuffled(rng: &mut Rng, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

#[test]
fn patch_embed_cpu_gradcheck() {
    let mut rng = Rng::new(11);
    for &(n, k, d) in &[(1usize, 1usize, 1usize), (5, 7, 3), (8, 12, 5)] {
        let x = probe(&mut rng, n * k);
        let w = probe(&mut rng, d * k);
        let g = probe(&mut rng, n * d);
        let perm: Vec<i32> = shuffled(&mut rng, n).into_iter().map(|p| p as i32).collect();
        let loss = |w: &[f64]| {
            let mut y = vec![0.0; n * d];
            cpu::fwd(&mut y, &x, w, Some(&perm), patch_embed::Dims { n, k, d });
            dot(&y, &g)
        };
        let mut dw = vec![0.0; d * k];
        cpu::bwd(&mut dw, &g, &x, Some(&perm), patch_embed::Dims { n, k, d });
        gradcheck(&format!("patch_embed dw [{n}x{k}->{d}]"), &w, &dw, &mut |wp| loss(wp), 64, 1e-6);
    }
}

/// The GEMM over processor-ordered rows equals a stride-14 Conv3d over a 2-frame image.
#[test]
fn patch_embed_matches_conv3d() {
    let (ps, tp, c, gh, gw, d) = (14usize, 2usize, 3usize, 4usize, 6usize, 5usize);
    let (h, w) = (gh * ps, gw * ps);
    let k = c * tp * ps * ps;
    let mut rng = Rng::new(12);
    let img: Vec<f64> = probe(&mut rng, c * tp * h * w); // [c, t, h, w]
    let wt: Vec<f64> = probe(&mut rng, d * k); // [d, c, t, 14, 14]
                                               // Processor row order: 2x2 merge blocks in raster order, (c, t, py, px) inside a row.
    let mut rows = Vec::new();
    let mut coords = Vec::new();
    for bh in 0..gh / 2 {
        for bw in 0..gw / 2 {
            for ih in 0..2 {
                for iw in 0..2 {
                    let (r, col) = (bh * 2 + ih, bw * 2 + iw);
                    coords.push((r, col));
                    for ci in 0..c {
                        for t in 0..tp {
                            for py in 0..ps {
                                for px in 0..ps {
                                    rows.push(img[((ci * tp + t) * h + r * ps + py) * w + col * ps + px]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let n = gh * gw;
    let mut y = vec![0.0; n * d];
    cpu::fwd(&mut y, &rows, &wt, None, patch_embed::Dims { n, k, d });
    let mut want = vec![0.0; n * d];
    for (i, &(r, col)) in coords.iter().enumerate() {
        for o in 0..d {
            let mut s = 0.0;
            for ci in 0..c {
                for t in 0..tp {
                    for py in 0..ps {
                        for px in 0..ps {
                            s += img[((ci * tp + t) * h + r * ps + py) * w + col * ps + px]
                                * wt[(((o * c + ci) * tp + t) * ps + py) * ps + px];
                        }
                    }
                }
            }
            want[i * d + o] = s;
        }
    }
    let e = rel_err64(&y, &want);
    println!("patch_embed vs conv3d: rel err {e:.2e}");
    assert_err("patch_embed", e, Tol::F64Reference);
}

#[test]
fn patch_embed_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("patch_embed_cuda_matches_cpu") else { return };
    let cpu_dev = Device::Cpu;
    let mut rng = Rng::new(13);
    let shapes: &[(usize, usize, usize)] =
        &[(1, 1, 1), (3, 7, 5), (17, 1176, 32), (64, 1176, 80), (333, 1176, 1280), (1024, 1176, 1280)];
    for &dt in &[DType::BF16, DType::F32] {
        for &(n, k, d) in shapes {
            for use_perm in [false, true] {
                let x = rng.normal_vec(n * k, 1.0);
                let w = rng.normal_vec(d * k, 0.05);
                let dy = rng.normal_vec(n * d, 1.0);
                let dw0 = rng.normal_vec(d * k, 1.0); // dw accumulates onto this
                let order = shuffled(&mut rng, n);
                let run = |dev: &Device, dt: DType| -> (Vec<f32>, Vec<f32>) {
                    let perm = use_perm.then(|| RowIndex::new(dev, &order, n).unwrap());
                    let xb = dev.upload(&x, DType::F32).unwrap();
                    let (wb, dyb) = (dev.upload(&w, dt).unwrap(), dev.upload(&dy, dt).unwrap());
                    let mut y = dev.upload(&vec![f32::NAN; n * d], dt).unwrap();
                    patch_embed::fwd(dev, &mut y, &xb, &wb, perm.as_ref(), patch_embed::Dims { n, k, d }).unwrap();
                    let mut dw = dev.upload(&dw0, DType::F32).unwrap();
                    patch_embed::bwd(dev, &mut dw, &dyb, &xb, perm.as_ref(), patch_embed::Dims { n, k, d }).unwrap();
                    (dev.to_vec(&y).unwrap(), dev.to_vec(&dw).unwrap())
                };
                // The CPU reference sees what the GPU sees: bf16-rounded weights, pixels and dy.
                let (y0, dw_0) = if dt == DType::BF16 {
                    let (xr, wr, dyr) = (bf16_round(&x), bf16_round(&w), bf16_round(&dy));
                    let perm: Option<Vec<i32>> = use_perm.then(|| order.iter().map(|&p| p as i32).collect());
                    let mut y = vec![0f32; n * d];
                    cpu::fwd(&mut y, &xr, &wr, perm.as_deref(), patch_embed::Dims { n, k, d });
                    let mut dw = dw0.clone();
                    cpu::bwd(&mut dw, &dyr, &xr, perm.as_deref(), patch_embed::Dims { n, k, d });
                    (y, dw)
                } else {
                    run(&cpu_dev, DType::F32)
                };
                let (y1, dw1) = run(&gpu, dt);
                let tol = if dt == DType::BF16 { Tol::Bf16Op.value() } else { Tol::F32Reference.value() };
                for (name, a, b) in [("y", &y1, &y0), ("dw", &dw1, &dw_0)] {
                    let e = rel_err(a, b);
                    println!("patch_embed {name} {} [{n}x{k}->{d}] perm={use_perm}: rel err {e:.2e}", dt.suffix());
                    assert!(
                        e <= tol,
                        "patch_embed {name} {} [{n}x{k}->{d}] perm={use_perm}: rel err {e:.2e} > {tol:.0e}",
                        dt.suffix()
                    );
                }
            }
        }
    }
}

/// gather, take and scatter on `dev`: returns (gathered, x after take, out after scatter).
fn row_moves(
    dev: &Device, dt: DType, x: &[f32], base: &[f32], idx: &[usize], bound: usize, cols: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = idx.len();
    let ri = RowIndex::new(dev, idx, bound).unwrap();
    let xb = dev.upload(x, dt).unwrap();
    let mut g = dev.upload(&vec![f32::NAN; n * cols], dt).unwrap();
    gather_rows(dev, &mut g, &xb, &ri, cols).unwrap();
    let mut xt = dev.upload(x, dt).unwrap();
    let mut t = dev.upload(&vec![f32::NAN; n * cols], dt).unwrap();
    take_rows(dev, &mut t, &mut xt, &ri, cols).unwrap();
    assert_eq!(dev.to_vec(&t).unwrap(), dev.to_vec(&g).unwrap(), "take_rows and gather_rows disagree");
    let src = dev.upload(&x[..n * cols], dt).unwrap();
    let mut out = dev.upload(base, dt).unwrap();
    scatter_rows(dev, &mut out, &src, &ri, cols).unwrap();
    (dev.to_vec(&g).unwrap(), dev.to_vec(&xt).unwrap(), dev.to_vec(&out).unwrap())
}

#[test]
fn row_moves_cpu() {
    let (bound, cols) = (5usize, 3usize);
    let x: Vec<f32> = (0..bound * cols).map(|i| i as f32 + 1.0).collect();
    let base = vec![-1.0f32; bound * cols];
    let (g, xt, out) = row_moves(&Device::Cpu, DType::F32, &x, &base, &[3, 0], bound, cols);
    assert_eq!(g, vec![10.0, 11.0, 12.0, 1.0, 2.0, 3.0]);
    assert_eq!(xt, vec![0.0, 0.0, 0.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 0.0, 0.0, 0.0, 13.0, 14.0, 15.0]);
    assert_eq!(out, vec![4.0, 5.0, 6.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 2.0, 3.0, -1.0, -1.0, -1.0]);
    assert!(RowIndex::new(&Device::Cpu, &[1, 1], 3).is_err(), "duplicate rows must be rejected");
    assert!(RowIndex::new(&Device::Cpu, &[3], 3).is_err(), "out-of-range rows must be rejected");
}

#[test]
fn row_moves_cuda_match_cpu() {
    let Some(gpu) = cuda_or_skip("row_moves_cuda_match_cpu") else { return };
    let mut rng = Rng::new(14);
    for &dt in &[DType::BF16, DType::F32] {
        for &(bound, n, cols) in &[(1usize, 1usize, 1usize), (7, 3, 5), (40, 40, 64), (333, 100, 3584), (90, 17, 1280)]
        {
            let x = bf16_round(&rng.normal_vec(bound * cols, 1.0));
            let base = bf16_round(&rng.normal_vec(bound * cols, 1.0));
            let idx: Vec<usize> = shuffled(&mut rng, bound).into_iter().take(n).collect();
            let want = row_moves(&Device::Cpu, DType::F32, &x, &base, &idx, bound, cols);
            let got = row_moves(&gpu, dt, &x, &base, &idx, bound, cols);
            for (name, a, b) in [("gather", &got.0, &want.0), ("take", &got.1, &want.1), ("scatter", &got.2, &want.2)] {
                let e = rel_err(a, b);
                println!("rows {name} {} [bound {bound}, n {n}, cols {cols}]: rel err {e:.2e}", dt.suffix());
                assert!(
                    e == 0.0,
                    "rows {name} {} [bound {bound}, n {n}, cols {cols}]: rel err {e:.2e} (moves must be exact)",
                    dt.suffix()
                );
            }
        }
    }
}

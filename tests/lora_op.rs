//! The LoRA op: forward against the explicit product, gradcheck, the CPU dispatch against the
//! reference, CUDA against the CPU.
mod common;
use am3safety::ops::lora::{self, cpu, Adapter};
use am3safety::ops::matmul::Linear;
use am3safety::tensor::{DType, Device};
use common::*;

#[path = "support/lora_model.rs"]
mod lora_support;

/// (t, din, dout, r): odd sizes, size 1, rank above din.
const OP_SHAPES: &[(usize, usize, usize, usize)] =
    &[(1, 1, 1, 1), (3, 7, 5, 2), (5, 16, 9, 4), (4, 3, 11, 8), (9, 33, 17, 3)];

fn normal64(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.normal()).collect()
}

/// s·(x·Aᵀ)·Bᵀ by the definition, f64.
fn explicit(x: &[f64], ad: Adapter<[f64]>, dims: Linear) -> Vec<f64> {
    let (Adapter { a, b, rank: r, scale }, Linear { t, din, dout }) = (ad, dims);
    let s = scale as f64;
    let mut u = vec![0f64; t * r];
    for i in 0..t {
        for k in 0..r {
            u[i * r + k] = (0..din).map(|j| x[i * din + j] * a[k * din + j]).sum();
        }
    }
    let mut y = vec![0f64; t * dout];
    for i in 0..t {
        for o in 0..dout {
            y[i * dout + o] = s * (0..r).map(|k| u[i * r + k] * b[o * r + k]).sum::<f64>();
        }
    }
    y
}

#[test]
fn lora_op_forward_matches_explicit_product() {
    let mut rng = Rng::new(11);
    for &(t, din, dout, r) in OP_SHAPES {
        let (x, a, b, y0) = (
            normal64(&mut rng, t * din),
            normal64(&mut rng, r * din),
            normal64(&mut rng, dout * r),
            normal64(&mut rng, t * dout),
        );
        let mut y = y0.clone();
        cpu::fwd(&mut y, &x, lora::Adapter { a: &a, b: &b, rank: r, scale: 0.75 }, Linear { t, din, dout });
        let want: Vec<f64> = explicit(&x, Adapter { a: &a, b: &b, rank: r, scale: 0.75 }, Linear { t, din, dout })
            .iter()
            .zip(&y0)
            .map(|(d, y)| y + d)
            .collect();
        let e = rel_err64(&y, &want);
        println!("lora fwd {t}x{din}->{dout} r{r}: rel err {e:.2e} (y += branch)");
        assert!(e < 1e-13, "lora fwd {t}x{din}->{dout} r{r}: {e:.2e}");
    }
}

#[test]
fn lora_op_gradcheck() {
    let mut rng = Rng::new(12);
    let s = 1.5f32;
    for &(t, din, dout, r) in OP_SHAPES {
        let (x, a, b) = (normal64(&mut rng, t * din), normal64(&mut rng, r * din), normal64(&mut rng, dout * r));
        let g = probe(&mut rng, t * dout);
        let loss = |x: &[f64], a: &[f64], b: &[f64]| {
            let mut y = vec![0f64; t * dout];
            cpu::fwd(&mut y, x, lora::Adapter { a, b, rank: r, scale: s }, Linear { t, din, dout });
            dot(&y, &g)
        };
        let (mut dx, mut da, mut db) = (vec![0f64; t * din], vec![0f64; r * din], vec![0f64; dout * r]);
        cpu::bwd(
            lora::Grads { dx: Some(&mut dx), da: Some(&mut da), db: Some(&mut db) },
            &g,
            &x,
            lora::Adapter { a: &a, b: &b, rank: r, scale: s },
            Linear { t, din, dout },
        );
        let tag = format!("{t}x{din}->{dout} r{r}");
        gradcheck(&format!("lora dx {tag}"), &x, &dx, &mut |xp| loss(xp, &a, &b), 64, 1e-5);
        gradcheck(&format!("lora dA {tag}"), &a, &da, &mut |ap| loss(&x, ap, &b), 64, 1e-5);
        gradcheck(&format!("lora dB {tag}"), &b, &db, &mut |bp| loss(&x, &a, bp), 64, 1e-5);
        // Every output accumulates: a second call adds the same again.
        let (mut dx2, mut da2, mut db2) = (dx.clone(), da.clone(), db.clone());
        cpu::bwd(
            lora::Grads { dx: Some(&mut dx2), da: Some(&mut da2), db: Some(&mut db2) },
            &g,
            &x,
            lora::Adapter { a: &a, b: &b, rank: r, scale: s },
            Linear { t, din, dout },
        );
        for (two, one) in [(&dx2, &dx), (&da2, &da), (&db2, &db)] {
            let want: Vec<f64> = one.iter().map(|v| 2.0 * v).collect();
            assert!(rel_err64(two, &want) < 1e-14, "lora bwd {tag}: outputs must accumulate");
        }
    }
}

#[test]
fn lora_op_cpu_dispatch_matches_reference() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(13);
    let (t, din, dout, r) = (6, 10, 7, 3);
    let (x, a, b, dy) = (
        rng.normal_vec(t * din, 1.0),
        rng.normal_vec(r * din, 1.0),
        rng.normal_vec(dout * r, 1.0),
        rng.normal_vec(t * dout, 1.0),
    );
    let up = |v: &[f32]| dev.upload(v, DType::F32).unwrap();
    let (bx, ba, bb, bdy) = (up(&x), up(&a), up(&b), up(&dy));
    let ad = Adapter { a: &ba, b: &bb, rank: r, scale: 2.0 };
    let mut y = dev.zeros_f32(t * dout).unwrap();
    lora::fwd(&dev, &mut y, &bx, &ad, Linear { t, din, dout }).unwrap();
    let mut want = vec![0f32; t * dout];
    cpu::fwd(&mut want, &x, lora::Adapter { a: &a, b: &b, rank: r, scale: 2.0 }, Linear { t, din, dout });
    assert_eq!(dev.to_vec(&y).unwrap(), want);
    // A frozen adapter (no dA, dB) gives the same dx.
    let (mut dx1, mut dx2) = (dev.zeros_f32(t * din).unwrap(), dev.zeros_f32(t * din).unwrap());
    let (mut da, mut db) = (dev.zeros_f32(r * din).unwrap(), dev.zeros_f32(dout * r).unwrap());
    lora::bwd(
        &dev,
        lora::Grads { dx: Some(&mut dx1), da: Some(&mut da), db: Some(&mut db) },
        &bdy,
        &bx,
        &ad,
        Linear { t, din, dout },
    )
    .unwrap();
    lora::bwd(&dev, lora::Grads { dx: Some(&mut dx2), da: None, db: None }, &bdy, &bx, &ad, Linear { t, din, dout })
        .unwrap();
    assert_eq!(dev.to_vec(&dx1).unwrap(), dev.to_vec(&dx2).unwrap());
    // Bad shapes and ranks are errors naming the op and argument.
    let e = lora::fwd(&dev, &mut y, &bx, &ad, Linear { t, din: din + 1, dout }).unwrap_err().to_string();
    assert!(e.contains("lora_fwd") && e.contains(" a "), "{e}");
    let e = lora::bwd(
        &dev,
        lora::Grads { dx: None, da: Some(&mut dev.zeros_f32(3).unwrap()), db: None },
        &bdy,
        &bx,
        &ad,
        Linear { t, din, dout },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("lora_bwd") && e.contains("da"), "{e}");
    let bad = Adapter { rank: 0, ..ad };
    assert!(lora::fwd(&dev, &mut y, &bx, &bad, Linear { t, din, dout }).is_err());
}

/// The GPU against the CPU for both dtypes. Outputs accumulate (+=), so instead of NaN poison
/// each case runs twice: from zeros (the branch alone, judged precisely) and from random
/// starting values (the accumulation).
#[test]
fn lora_op_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("lora_op_cuda_matches_cpu") else { return };
    let shapes: &[(usize, usize, usize, usize)] =
        &[(1, 1, 1, 1), (3, 7, 5, 2), (17, 33, 65, 8), (64, 128, 80, 16), (129, 257, 96, 4), (200, 512, 1000, 64)];
    let mut rng = Rng::new(14);
    for (dt, tol) in [(DType::BF16, Tol::Bf16Op.value()), (DType::F32, Tol::F32Reference.value())] {
        for &(t, din, dout, r) in shapes {
            for accumulate in [false, true] {
                let round = |v: Vec<f32>| if dt == DType::BF16 { bf16_round(&v) } else { v };
                let init = |rng: &mut Rng, n: usize| if accumulate { rng.normal_vec(n, 1.0) } else { vec![0.0; n] };
                let x = round(rng.normal_vec(t * din, 1.0));
                let a = round(rng.normal_vec(r * din, 0.5));
                let b = round(rng.normal_vec(dout * r, 0.5));
                let dy = round(rng.normal_vec(t * dout, 1.0));
                let (y0, dx0) = (round(init(&mut rng, t * dout)), round(init(&mut rng, t * din)));
                let (da0, db0) = (init(&mut rng, r * din), init(&mut rng, dout * r));
                let scale = 0.8f32;
                // CPU reference (f32).
                let mut want_y = y0.clone();
                cpu::fwd(&mut want_y, &x, lora::Adapter { a: &a, b: &b, rank: r, scale }, Linear { t, din, dout });
                let (mut want_dx, mut want_da, mut want_db) = (dx0.clone(), da0.clone(), db0.clone());
                cpu::bwd(
                    lora::Grads { dx: Some(&mut want_dx), da: Some(&mut want_da), db: Some(&mut want_db) },
                    &dy,
                    &x,
                    lora::Adapter { a: &a, b: &b, rank: r, scale },
                    Linear { t, din, dout },
                );
                // GPU.
                let upd = |v: &[f32]| gpu.upload(v, dt).unwrap();
                let (gx, ga, gb, gdy) = (upd(&x), upd(&a), upd(&b), upd(&dy));
                let (mut gy, mut gdx) = (upd(&y0), upd(&dx0));
                let (mut gda, mut gdb) = (gpu.upload(&da0, DType::F32).unwrap(), gpu.upload(&db0, DType::F32).unwrap());
                let ad = Adapter { a: &ga, b: &gb, rank: r, scale };
                lora::fwd(&gpu, &mut gy, &gx, &ad, Linear { t, din, dout }).unwrap();
                lora::bwd(
                    &gpu,
                    lora::Grads { dx: Some(&mut gdx), da: Some(&mut gda), db: Some(&mut gdb) },
                    &gdy,
                    &gx,
                    &ad,
                    Linear { t, din, dout },
                )
                .unwrap();
                let tag = format!(
                    "lora {} {t}x{din}->{dout} r{r} {}",
                    dt.suffix(),
                    if accumulate { "accumulate" } else { "from zero" }
                );
                for (what, g, w) in
                    [("y", &gy, &want_y), ("dx", &gdx, &want_dx), ("dA", &gda, &want_da), ("dB", &gdb, &want_db)]
                {
                    let got = gpu.to_vec(g).unwrap();
                    let e = rel_err(&got, w);
                    println!("{tag} {what}: rel err {e:.2e} (tol {tol:.0e})");
                    assert!(e <= tol, "{tag} {what}: rel err {e:.2e} > {tol:.0e}");
                }
            }
        }
    }
}

//! Elementwise ops: bias add / bias backward (finite differences in f64, += accumulation), the
//! CPU semantics and error paths, and CUDA (bf16 and f32) vs the CPU, with the casts checked bit
//! for bit against round-to-nearest-even.
mod common;
use am3safety::ops::elementwise::{self as ew, cpu};
use am3safety::tensor::{Buf, DType, Device};
use common::*;

const SIZES: &[usize] = &[1, 7, 8, 9, 33, 1000, 4097, 100_003, 2_000_001];

#[test]
fn bias_cpu_gradcheck() {
    let mut rng = Rng::new(21);
    for &(rows, cols) in &[(1usize, 1usize), (3, 7), (5, 33)] {
        let x = probe(&mut rng, rows * cols);
        let b = probe(&mut rng, cols);
        let w = probe(&mut rng, rows * cols);
        let mut loss = |bp: &[f64]| {
            let mut y = x.clone();
            cpu::bias_add(&mut y, bp, rows, cols);
            dot(&y, &w)
        };
        let mut db = vec![0.0; cols];
        cpu::bias_bwd(&mut db, &w, rows, cols);
        gradcheck(&format!("bias db [{rows}x{cols}]"), &b, &db, &mut loss, 64, 1e-6);
    }
}

#[test]
fn cpu_semantics() {
    let d = Device::Cpu;
    let mut y = d.upload(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], DType::F32).unwrap();
    ew::bias_add(&d, &mut y, &d.upload(&[10.0, 20.0, 30.0], DType::F32).unwrap(), 2, 3).unwrap();
    assert_eq!(d.to_vec(&y).unwrap(), vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
    // bias_bwd accumulates.
    let mut db = d.upload(&[1.0, 1.0, 1.0], DType::F32).unwrap();
    ew::bias_bwd(&d, &mut db, &y, 2, 3).unwrap();
    assert_eq!(d.to_vec(&db).unwrap(), vec![26.0, 48.0, 70.0]);
    let x = d.upload(&[1.0, -1.0, 0.5, 0.0, 2.0, 3.0], DType::F32).unwrap();
    ew::add_inplace(&d, &mut y, &x, 6).unwrap();
    assert_eq!(d.to_vec(&y).unwrap(), vec![12.0, 21.0, 33.5, 14.0, 27.0, 39.0]);
    let mut o = d.zeros_f32(6).unwrap();
    ew::add_into(&d, &mut o, &y, &x, 6).unwrap();
    assert_eq!(d.to_vec(&o).unwrap(), vec![13.0, 20.0, 34.0, 14.0, 29.0, 42.0]);
    ew::scale_inplace(&d, &mut o, 0.5, 6).unwrap();
    assert_eq!(d.to_vec(&o).unwrap(), vec![6.5, 10.0, 17.0, 7.0, 14.5, 21.0]);
    ew::fill(&d, &mut o, -2.0, 6).unwrap();
    assert_eq!(d.to_vec(&o).unwrap(), vec![-2.0; 6]);
    ew::copy_rows(&d, &mut o, 1, &x, 3, 3).unwrap();
    assert_eq!(d.to_vec(&o).unwrap(), vec![-2.0, 0.0, 2.0, 3.0, -2.0, -2.0]);
    let mut c = d.zeros(DType::BF16, 6).unwrap();
    ew::cast(&d, &mut c, &x, 6).unwrap();
    assert_eq!(d.to_vec(&c).unwrap(), d.to_vec(&x).unwrap());
    let mut ids = d.upload_i32(&[0, 0, 0, 0]).unwrap();
    ew::copy_rows(&d, &mut ids, 2, &d.upload_i32(&[7, 8, 9]).unwrap(), 1, 2).unwrap();
    assert_eq!(d.to_vec_i32(&ids).unwrap(), vec![0, 0, 8, 9]);
}

#[test]
fn bad_arguments_are_errors() {
    let d = Device::Cpu;
    let mut y = d.zeros_f32(6).unwrap();
    let b = d.zeros_f32(4).unwrap();
    let msgs = [
        ew::bias_add(&d, &mut y, &b, 2, 3).unwrap_err().to_string(),
        ew::bias_bwd(&d, &mut d.zeros_f32(3).unwrap(), &b, 2, 3).unwrap_err().to_string(),
        ew::add_inplace(&d, &mut y, &b, 6).unwrap_err().to_string(),
        ew::fill(&d, &mut y, 0.0, 5).unwrap_err().to_string(),
        ew::copy_rows(&d, &mut y, 4, &b, 0, 3).unwrap_err().to_string(),
        ew::copy_rows(&d, &mut y, 0, &b, 2, 3).unwrap_err().to_string(),
        ew::copy_rows(&d, &mut y, usize::MAX, &b, 0, 2).unwrap_err().to_string(),
        ew::copy_rows(&d, &mut y, 0, &d.upload_i32(&[1]).unwrap(), 0, 1).unwrap_err().to_string(),
        ew::cast(&d, &mut y, &d.upload_i32(&[1; 6]).unwrap(), 6).unwrap_err().to_string(),
        ew::bias_add(&d, &mut y, &b, usize::MAX, 3).unwrap_err().to_string(),
    ];
    for m in &msgs {
        println!("error: {m}");
    }
    for (m, op) in msgs.iter().zip([
        "bias_add",
        "bias_bwd",
        "add_inplace",
        "fill",
        "copy_rows",
        "copy_rows",
        "copy_rows",
        "copy_rows",
    ]) {
        assert!(m.contains(op), "{m}");
    }
}

fn poisoned(dev: &Device, n: usize, dt: DType) -> Buf {
    dev.upload(&vec![f32::NAN; n], dt).unwrap()
}

fn check_close(what: &str, dt: DType, shape: &str, got: &[f32], want: &[f32]) {
    let tol = if dt == DType::BF16 { 1e-2 } else { 1e-5 };
    let e = rel_err(got, want);
    println!("{what} {} {shape}: rel err {e:.2e}", dt.suffix());
    assert!(e <= tol, "{what} {} {shape}: rel err {e:.2e} > {tol:.0e}", dt.suffix());
}

/// `ew::bias_bwd`, or `bias_bwd_with(Scalar)` on the GPU when `force_scalar`.
fn bias_bwd(dev: &Device, force_scalar: bool, db: &mut Buf, dy: &Buf, rows: usize, cols: usize) {
    if force_scalar && dev.gpu().is_some() {
        ew::bias_bwd_with(dev, ew::BiasBwdKernel::Scalar, db, dy, rows, cols)
    } else {
        ew::bias_bwd(dev, db, dy, rows, cols)
    }
    .unwrap()
}

#[test]
fn bias_bwd_plan() {
    use ew::BiasBwdKernel::*;
    assert_eq!(ew::plan_bias_bwd(DType::BF16, 4096, true), Vec16);
    assert_eq!(ew::plan_bias_bwd(DType::BF16, 3420, true), Scalar);
    assert_eq!(ew::plan_bias_bwd(DType::F32, 3420, true), Vec16);
    assert_eq!(ew::plan_bias_bwd(DType::BF16, 257, true), Scalar);
    assert_eq!(ew::plan_bias_bwd(DType::BF16, 1024, false), Scalar);
}

#[test]
fn bias_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("bias_cuda_matches_cpu") else { return };
    // Both kernels: the plan's (Vec16 where it applies) and Scalar forced with `bias_bwd_with`,
    // the same checks.
    for force_scalar in [false, true] {
        println!("bias_add/bias_bwd: {}", if force_scalar { "Scalar forced" } else { "planned kernel" });
        {
            let mut rng = Rng::new(22);
            // (3000, 4096): Vec16 with several row chunks and a ragged last chunk.
            let shapes: Vec<(usize, usize)> = ROW_SHAPES
                .iter()
                .copied()
                .chain([(4096, 1), (3000, 3), (2048, 1024), (1, 18944), (3000, 4096)])
                .collect();
            for &dt in &[DType::BF16, DType::F32] {
                for &(rows, cols) in &shapes {
                    let round = |v: Vec<f32>| if dt == DType::BF16 { bf16_round(&v) } else { v };
                    let y = round(rng.normal_vec(rows * cols, 1.0));
                    let b = round(rng.normal_vec(cols, 1.0));
                    let db0: Vec<f32> = rng.normal_vec(cols, 1.0); // db accumulates onto this
                    let run = |dev: &Device, dt: DType| -> (Vec<f32>, Vec<f32>) {
                        let mut yb = dev.upload(&y, dt).unwrap();
                        ew::bias_add(dev, &mut yb, &dev.upload(&b, dt).unwrap(), rows, cols).unwrap();
                        let mut db = dev.upload(&db0, DType::F32).unwrap();
                        // The backward of y's sum: column sums of the (biased) y.
                        bias_bwd(dev, force_scalar, &mut db, &yb, rows, cols);
                        (dev.to_vec(&yb).unwrap(), dev.to_vec(&db).unwrap())
                    };
                    let (y0, d0) = run(&Device::Cpu, DType::F32);
                    let (y1, d1) = run(&gpu, dt);
                    let shape = format!("[{rows}x{cols}]");
                    check_close("bias_add y", dt, &shape, &y1, &y0);
                    // The GPU sums the bf16-rounded y; compare against the CPU on those values.
                    let want = if dt == DType::BF16 {
                        let yr = bf16_round(&y0);
                        let mut db = db0.clone();
                        cpu::bias_bwd(&mut db, &yr, rows, cols);
                        db
                    } else {
                        d0
                    };
                    check_close("bias_bwd db", dt, &shape, &d1, &want);
                }
            }
        }
    }
}

#[test]
fn bias_bwd_cuda_is_deterministic() {
    let Some(gpu) = cuda_or_skip("bias_bwd_cuda_is_deterministic") else { return };
    // Both kernels: the plan's (Vec16 where it applies) and Scalar forced with `bias_bwd_with`,
    // the same checks.
    for force_scalar in [false, true] {
        println!("bias_bwd determinism: {}", if force_scalar { "Scalar forced" } else { "planned kernel" });
        {
            let mut rng = Rng::new(23);
            // 257 columns are not whole 16-byte vectors (Scalar even in the plan); 1024 are.
            for (rows, cols) in [(4099, 257), (4099, 1024)] {
                let dy = gpu.upload(&rng.normal_vec(rows * cols, 1.0), DType::BF16).unwrap();
                let once = || {
                    let mut db = gpu.zeros_f32(cols).unwrap();
                    bias_bwd(&gpu, force_scalar, &mut db, &dy, rows, cols);
                    gpu.to_vec(&db).unwrap()
                };
                let a = once();
                for _ in 0..3 {
                    let b = once();
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "bias_bwd [{rows}x{cols}] is not bit-reproducible"
                    );
                }
                println!("bias_bwd [{rows}x{cols}]: 4 runs bit-identical");
            }
        }
    }
}

#[test]
fn streaming_ops_cuda_match_cpu() {
    let Some(gpu) = cuda_or_skip("streaming_ops_cuda_match_cpu") else { return };
    let mut rng = Rng::new(24);
    for &dt in &[DType::BF16, DType::F32] {
        for &n in SIZES {
            let round = |v: Vec<f32>| if dt == DType::BF16 { bf16_round(&v) } else { v };
            let a = round(rng.normal_vec(n, 1.0));
            let b = round(rng.normal_vec(n, 1.0));
            let run = |dev: &Device, dt: DType| -> Vec<Vec<f32>> {
                let (ab, bb) = (dev.upload(&a, dt).unwrap(), dev.upload(&b, dt).unwrap());
                let mut y = dev.upload(&a, dt).unwrap();
                ew::add_inplace(dev, &mut y, &bb, n).unwrap();
                let mut o = poisoned(dev, n, dt);
                ew::add_into(dev, &mut o, &ab, &bb, n).unwrap();
                let mut s = dev.upload(&b, dt).unwrap();
                ew::scale_inplace(dev, &mut s, -0.375, n).unwrap();
                let mut f = poisoned(dev, n, dt);
                ew::fill(dev, &mut f, 0.625, n).unwrap();
                let mut z = poisoned(dev, n, dt);
                ew::fill(dev, &mut z, 0.0, n).unwrap();
                [y, o, s, f, z].iter().map(|x| dev.to_vec(x).unwrap()).collect()
            };
            let want = run(&Device::Cpu, DType::F32);
            let got = run(&gpu, dt);
            for (name, (g, w)) in
                ["add_inplace", "add_into", "scale_inplace", "fill", "fill(0)"].iter().zip(got.iter().zip(&want))
            {
                check_close(name, dt, &format!("n={n}"), g, w);
            }
            assert!(got[4].iter().all(|&x| x.to_bits() == 0), "fill(0) n={n}: not all +0.0");
        }
    }
}

/// Values that exercise rounding: exact ties both ways, near-overflow, infinities, signed zero,
/// subnormals, plus random values.
fn cast_inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
    let special = [
        f32::from_bits(0x3F80_8000), // 1 + 2^-8: tie, rounds down to even 1.0
        f32::from_bits(0x3F81_8000), // tie, rounds up to even
        f32::from_bits(0x3F80_8001), // just above a tie: rounds up
        f32::from_bits(0xBF80_7FFF), // just below a tie (negative): rounds down in magnitude
        f32::MAX,                    // rounds to +inf in bf16
        3.389_531_4e38,              // largest finite bf16
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        0.0,
        1e-40, // subnormal
        -3e-39,
        f32::MIN_POSITIVE,
        65504.0,
        -1.0 / 3.0,
    ];
    let mut v = rng.normal_vec(n, 100.0);
    for (i, s) in special.iter().enumerate() {
        if i < n {
            v[i * 7 % n] = *s;
        }
    }
    v
}

#[test]
fn cast_cuda_rounds_to_nearest_even() {
    let Some(gpu) = cuda_or_skip("cast_cuda_rounds_to_nearest_even") else { return };
    {
        {
            {
                let mut rng = Rng::new(25);
                for &n in SIZES {
                    let x = cast_inputs(&mut rng, n);
                    let src = gpu.upload(&x, DType::F32).unwrap();
                    // f32 -> bf16: bits must equal half's round-to-nearest-even.
                    let mut h = poisoned(&gpu, n, DType::BF16);
                    ew::cast(&gpu, &mut h, &src, n).unwrap();
                    let got = gpu.to_vec(&h).unwrap();
                    let want = bf16_round(&x);
                    let bad = got.iter().zip(&want).position(|(g, w)| g.to_bits() != w.to_bits());
                    if let Some(i) = bad {
                        panic!("cast f32->bf16 n={n}: element {i}: {:e} ({:#010x}) -> {:e} ({:#010x}), want {:e} ({:#010x})",
                        x[i], x[i].to_bits(), got[i], got[i].to_bits(), want[i], want[i].to_bits());
                    }
                    // bf16 -> f32 is exact.
                    let mut f = poisoned(&gpu, n, DType::F32);
                    ew::cast(&gpu, &mut f, &h, n).unwrap();
                    let back = gpu.to_vec(&f).unwrap();
                    assert!(
                        back.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
                        "cast bf16->f32 n={n} not exact"
                    );
                    // Same-dtype cast copies.
                    for dt in [DType::F32, DType::BF16] {
                        let s = gpu.upload(&x, dt).unwrap();
                        let mut c = poisoned(&gpu, n, dt);
                        ew::cast(&gpu, &mut c, &s, n).unwrap();
                        let (g, w) = (gpu.to_vec(&c).unwrap(), gpu.to_vec(&s).unwrap());
                        assert!(
                            g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "cast {0}->{0} n={n} not a copy",
                            dt.suffix()
                        );
                    }
                    println!("cast n={n}: f32->bf16 bit-exact (RNE), bf16->f32 exact, same-dtype copies exact");
                }
            }
        }
    }
}

#[test]
fn fill_f32_streaming_cuda_writes_every_element() {
    let Some(gpu) = cuda_or_skip("fill_f32_streaming_cuda_writes_every_element") else { return };
    for &n in SIZES {
        let mut b = poisoned(&gpu, n, DType::F32);
        ew::fill_f32_streaming(&gpu, &mut b, 1.5, n).unwrap();
        let got = gpu.to_vec(&b).unwrap();
        assert!(got.iter().all(|&x| x == 1.5), "fill_f32_streaming n={n}: not every element written");
    }
    println!("fill_f32_streaming: every element written at {} sizes", SIZES.len());
}

#[test]
fn copy_rows_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("copy_rows_cuda_matches_cpu") else { return };
    let mut rng = Rng::new(26);
    // (dst len, dst_off, src len, src_off, n): odd offsets make the ranges misaligned.
    let cases =
        [(10, 0, 10, 0, 10), (10, 3, 7, 1, 5), (1000, 999, 1, 0, 1), (5000, 17, 4999, 3, 4096), (64, 5, 64, 0, 0)];
    for &dt in &[DType::BF16, DType::F32] {
        for &(dl, doff, sl, soff, n) in &cases {
            let d0 = bf16_round(&rng.normal_vec(dl, 1.0));
            let s0 = bf16_round(&rng.normal_vec(sl, 1.0));
            let run = |dev: &Device, dt: DType| {
                let mut d = dev.upload(&d0, dt).unwrap();
                ew::copy_rows(dev, &mut d, doff, &dev.upload(&s0, dt).unwrap(), soff, n).unwrap();
                dev.to_vec(&d).unwrap()
            };
            let (want, got) = (run(&Device::Cpu, DType::F32), run(&gpu, dt));
            assert_eq!(got, want, "copy_rows {} dst[{doff}..+{n}] of {dl} <- src[{soff}..] of {sl}", dt.suffix());
            println!("copy_rows {} dst[{doff}..+{n}] of {dl} <- src[{soff}..] of {sl}: exact", dt.suffix());
        }
    }
    let mut ids = gpu.upload_i32(&[0, 0, 0, 0, 0]).unwrap();
    ew::copy_rows(&gpu, &mut ids, 1, &gpu.upload_i32(&[5, 6, 7]).unwrap(), 0, 3).unwrap();
    assert_eq!(gpu.to_vec_i32(&ids).unwrap(), vec![0, 5, 6, 7, 0]);
    let e = ew::copy_rows(&gpu, &mut ids, 3, &gpu.upload_i32(&[5, 6, 7]).unwrap(), 0, 3).unwrap_err();
    println!("copy_rows out of range on the GPU: {e}");
}

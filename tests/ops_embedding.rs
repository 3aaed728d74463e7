//! Embedding: CPU forward vs a direct gather, CPU backward vs finite differences (f64) with
//! repeated ids, out-of-range ids as errors (CPU and CUDA, with and without `ids_host`), the
//! kernels' own guard against a stale `ids_host`, and CUDA (bf16 and f32) vs the CPU.
mod common;
use am3safety::ops::embedding::{self, cpu};
use am3safety::tensor::{DType, Device};
use common::*;

#[test]
fn embedding_cpu_fwd_gathers_rows() {
    let (t, c, v) = (4usize, 3usize, 5usize);
    let table: Vec<f64> = (0..v * c).map(|i| i as f64).collect();
    let ids = [4, 0, 4, 2];
    let mut out = vec![f64::NAN; t * c];
    cpu::fwd(&mut out, &table, &ids, t, c);
    let want: Vec<f64> = ids.iter().flat_map(|&id| (0..c).map(move |k| (id as usize * c + k) as f64)).collect();
    assert_eq!(out, want);
}

#[test]
fn embedding_cpu_gradcheck() {
    let mut rng = Rng::new(30);
    for &(t, c, v) in &[(1usize, 1usize, 1usize), (5, 3, 4), (9, 7, 3)] {
        let ids: Vec<i32> = (0..t).map(|_| rng.below(v) as i32).collect(); // repeats when t > v
        let table = probe(&mut rng, v * c);
        let g = probe(&mut rng, t * c);
        let mut dtable = vec![0.0; v * c];
        cpu::bwd(&mut dtable, &g, &ids, t, c);
        println!("embedding gradcheck [t={t} c={c} v={v}] ids {ids:?}");
        gradcheck(
            "embedding dtable",
            &table,
            &dtable,
            &mut |tp| {
                let mut out = vec![0.0; t * c];
                cpu::fwd(&mut out, tp, &ids, t, c);
                dot(&out, &g)
            },
            64,
            1e-6,
        );
    }
}

/// Every way of passing a bad id must fail before any launch, naming the position and the id.
fn expect_id_errors(dev: &Device) {
    let (t, c, v) = (4usize, 2usize, 6usize);
    let table = dev.upload(&vec![1.0; v * c], dev.act_dtype()).unwrap();
    for (bad, pos) in [(vec![0, 1, 6, 2], 2usize), (vec![-1, 0, 0, 0], 0), (vec![0, 0, 0, 99], 3)] {
        let ids = dev.upload_i32(&bad).unwrap();
        let id = bad[pos];
        for host in [Some(bad.as_slice()), None] {
            let mut out = dev.zeros_act(t * c).unwrap();
            let e =
                embedding::fwd(dev, &mut out, &table, &ids, host, embedding::Dims { t, c, v }).unwrap_err().to_string();
            println!("embedding fwd {} ids {bad:?} host {}: {e}", dev.name(), host.is_some());
            assert!(
                e.contains("embedding_fwd")
                    && e.contains(&format!("position {pos}"))
                    && e.contains(&format!("id {id} ")),
                "{e}"
            );
            let dout = dev.zeros_act(t * c).unwrap();
            let mut dtable = dev.zeros_f32(v * c).unwrap();
            let e = embedding::bwd(dev, &mut dtable, &dout, &ids, host, embedding::Dims { t, c, v })
                .unwrap_err()
                .to_string();
            assert!(e.contains("embedding_bwd") && e.contains(&format!("position {pos}")), "{e}");
        }
    }
    // Length and dtype errors.
    let ids = dev.upload_i32(&[0, 1, 2]).unwrap();
    let mut out = dev.zeros_act(t * c).unwrap();
    let e = embedding::fwd(dev, &mut out, &table, &ids, None, embedding::Dims { t, c, v }).unwrap_err().to_string();
    assert!(e.contains("ids"), "{e}");
    let fids = dev.upload(&[0.0; 4], DType::F32).unwrap();
    let e = embedding::fwd(dev, &mut out, &table, &fids, None, embedding::Dims { t, c, v }).unwrap_err().to_string();
    assert!(e.contains("ids") && e.contains("i32"), "{e}");
    let ids = dev.upload_i32(&[0, 1, 2, 3]).unwrap();
    let e = embedding::fwd(dev, &mut out, &table, &ids, Some(&[0, 1]), embedding::Dims { t, c, v })
        .unwrap_err()
        .to_string();
    assert!(e.contains("ids_host"), "{e}");
}

#[test]
fn embedding_bad_ids_are_errors_cpu() {
    expect_id_errors(&Device::Cpu);
}

#[test]
fn embedding_bad_ids_are_errors_cuda() {
    let Some(gpu) = cuda_or_skip("embedding_bad_ids_are_errors_cuda") else { return };
    expect_id_errors(&gpu);
}

/// A caller passing an `ids_host` that disagrees with the device ids gets no out-of-bounds access:
/// the bad row comes out NaN, its gradient is dropped, and the valid rows are unaffected.
#[test]
fn embedding_cuda_kernel_guards_stale_ids_host() {
    let Some(gpu) = cuda_or_skip("embedding_cuda_kernel_guards_stale_ids_host") else { return };
    let (t, c, v) = (3usize, 16usize, 4usize);
    let tab: Vec<f32> = (0..v * c).map(|i| i as f32).collect();
    for dt in [DType::BF16, DType::F32] {
        let table = gpu.upload(&tab, dt).unwrap();
        let ids = gpu.upload_i32(&[1, 1_000_000, 3]).unwrap();
        let mut out = gpu.zeros(dt, t * c).unwrap();
        embedding::fwd(&gpu, &mut out, &table, &ids, Some(&[1, 2, 3]), embedding::Dims { t, c, v }).unwrap();
        let o = gpu.to_vec(&out).unwrap();
        assert!(o[c..2 * c].iter().all(|x| x.is_nan()), "row with a bad id should be NaN: {:?}", &o[c..2 * c]);
        let want: Vec<f32> = bf16_round(&[&tab[c..2 * c], &tab[3 * c..4 * c]].concat());
        assert_eq!([&o[..c], &o[2 * c..]].concat(), want, "{}: valid rows", dt.suffix());
        let dout = gpu.upload(&vec![1.0; t * c], dt).unwrap();
        let mut dtable = gpu.zeros_f32(v * c).unwrap();
        embedding::bwd(&gpu, &mut dtable, &dout, &ids, Some(&[1, 2, 3]), embedding::Dims { t, c, v }).unwrap();
        let d = gpu.to_vec(&dtable).unwrap();
        let want: Vec<f32> = (0..v * c).map(|i| if i / c == 1 || i / c == 3 { 1.0 } else { 0.0 }).collect();
        assert_eq!(d, want, "{}: dtable", dt.suffix());
        println!("embedding stale ids_host {}: guarded", dt.suffix());
    }
}

#[test]
fn embedding_cuda_matches_cpu() {
    let Some(gpu) = cuda_or_skip("embedding_cuda_matches_cpu") else { return };
    let cpu_dev = Device::Cpu;
    let mut rng = Rng::new(31);
    // (tokens, cols, vocab): odd cols (scalar path), heavy id repetition (atomic contention),
    // more tokens than one grid pass of blocks.
    let shapes: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (3, 7, 5),
        (17, 80, 11),
        (33, 129, 50),
        (64, 1000, 300),
        (7, 3584, 20),
        (500, 64, 3),
        (20000, 72, 1000),
    ];
    for &dt in &[DType::BF16, DType::F32] {
        for &(t, c, v) in shapes {
            let round = |v: Vec<f32>| if dt == DType::BF16 { bf16_round(&v) } else { v };
            let table = round(rng.normal_vec(v * c, 1.0));
            let dout = round(rng.normal_vec(t * c, 1.0));
            let ids: Vec<i32> = (0..t).map(|_| rng.below(v) as i32).collect();
            let dtable0 = rng.normal_vec(v * c, 1.0); // the gradient accumulates (+=)
            let run = |dev: &Device, dt: DType, host: bool| -> (Vec<f32>, Vec<f32>) {
                let tb = dev.upload(&table, dt).unwrap();
                let idb = dev.upload_i32(&ids).unwrap();
                let ih = if host { Some(ids.as_slice()) } else { None };
                let mut out = dev.upload(&vec![f32::NAN; t * c], dt).unwrap();
                embedding::fwd(dev, &mut out, &tb, &idb, ih, embedding::Dims { t, c, v }).unwrap();
                let db = dev.upload(&dout, dt).unwrap();
                let mut dtable = dev.upload(&dtable0, DType::F32).unwrap();
                embedding::bwd(dev, &mut dtable, &db, &idb, ih, embedding::Dims { t, c, v }).unwrap();
                (dev.to_vec(&out).unwrap(), dev.to_vec(&dtable).unwrap())
            };
            let (out0, dt0) = run(&cpu_dev, DType::F32, true);
            for host in [true, false] {
                let (out1, dt1) = run(&gpu, dt, host);
                // The gather is exact; the scatter-add differs only in summation order.
                let tol = if dt == DType::BF16 { Tol::Bf16Op.value() } else { Tol::F32Reference.value() };
                for (name, a, b, tol) in [("out", &out1, &out0, 0.0), ("dtable", &dt1, &dt0, tol)] {
                    let e = rel_err(a, b);
                    println!("embedding {name} {} [t={t} c={c} v={v}] ids_host={host}: rel err {e:.2e}", dt.suffix());
                    assert!(
                        e <= tol,
                        "embedding {name} {} [t={t} c={c} v={v}]: rel err {e:.2e} > {tol:.0e}",
                        dt.suffix()
                    );
                }
            }
        }
    }
}

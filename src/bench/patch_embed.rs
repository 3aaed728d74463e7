//! Bench suite "patch_embed": the Qwen2.5-VL-7B vision patch embedding (window-order gather of
//! f32 pixel rows into bf16 + the cuBLAS GEMM, forward and dW backward) and the row moves that
//! carry vision rows into the text sequence. Shapes: 16 images of 1036×756 px ≈ 16·3996 patches
//! of 1176 values, D = 1280; row moves of 16k merged tokens × 3584 (the text hidden size).
//! FLOPs count the GEMM (2·N·K·D); bytes the floor traffic (pixels read once as f32, the
//! gathered operand written and read once as bf16, weights and outputs once). Each row checks
//! its first 4 output rows against the CPU reference.

use super::{time_gpu, BenchRow};
use crate::check::rel_err;
use crate::ops::patch_embed::{self, cpu, gather_rows, RowIndex};
use crate::rng::Rng;
use crate::tensor::{DType, Device};
use anyhow::Result;

pub fn run(dev: &Device, quick: bool) -> Result<Vec<BenchRow>> {
    let Device::Cuda(g) = dev else { return Ok(Vec::new()) };
    let (warm, iters) = if quick { (1, 3) } else { (3, 10) };
    let (n, k, d) = (if quick { 4096 } else { 16 * 3996 }, 1176usize, 1280usize);
    let mut rng = Rng::new(0x9a7c);
    let x = rng.normal_vec(n * k, 1.0);
    let w = bf16_round(&rng.normal_vec(d * k, 0.03));
    let dy = bf16_round(&rng.normal_vec(n * d, 1.0));
    // A window-like permutation: reverse blocks of 4 rows.
    let perm: Vec<usize> = (0..n).map(|i| (n / 4 - 1 - i / 4) * 4 + i % 4).collect();
    let p = RowIndex::new(dev, &perm, n)?;
    let (xb, wb, dyb) = (dev.upload(&x, DType::F32)?, dev.upload(&w, DType::BF16)?, dev.upload(&dy, DType::BF16)?);
    let mut y = dev.zeros(DType::BF16, n * d)?;
    let mut dw = dev.zeros_f32(d * k)?;
    let fwd_ms = time_gpu(g, warm, iters, &mut || {
        patch_embed::fwd(dev, &mut y, &xb, &wb, Some(&p), patch_embed::Dims { n, k, d })
    })?;
    let bwd_ms = time_gpu(g, warm, iters, &mut || {
        patch_embed::bwd(dev, &mut dw, &dyb, &xb, Some(&p), patch_embed::Dims { n, k, d })
    })?;

    // CPU check of the first 4 output rows (bf16-rounded pixels, as the gather casts them).
    let c = 4.min(n);
    let xs: Vec<f32> = perm[..c].iter().flat_map(|&r| bf16_round(&x[r * k..(r + 1) * k])).collect();
    let mut y_ref = vec![0f32; c * d];
    cpu::fwd(&mut y_ref, &xs, &w, None, patch_embed::Dims { n: c, k, d });
    let err = rel_err(&dev.to_vec(&y)?[..c * d], &y_ref);

    let flops = 2.0 * (n * k * d) as f64;
    let gather_b = (n * k) as f64 * (4.0 + 2.0 + 2.0); // f32 read, bf16 write, bf16 read by the GEMM
    let shape = format!("{n}x{k} -> {d}");
    let note = "gather kernel + cuBLAS bf16 GEMM";
    let mut rows = vec![
        BenchRow {
            op: "patch_embed_fwd".into(),
            shape: shape.clone(),
            ms: fwd_ms,
            bytes: gather_b + ((d * k + n * d) * 2) as f64,
            flops,
            rel_err: Some(err),
            note: note.into(),
        },
        BenchRow {
            op: "patch_embed_bwd (dW)".into(),
            shape,
            ms: bwd_ms,
            bytes: gather_b + (n * d * 2 + d * k * 8) as f64,
            flops,
            rel_err: None,
            note: note.into(),
        },
    ];

    // Row gather at the text width: window order → image order for 16k merged tokens.
    let (rows_n, cols) = (if quick { 4096 } else { 16384 }, 3584usize);
    let src = bf16_round(&rng.normal_vec(rows_n * cols, 1.0));
    let order: Vec<usize> = (0..rows_n).rev().collect();
    let idx = RowIndex::new(dev, &order, rows_n)?;
    let sb = dev.upload(&src, DType::BF16)?;
    let mut out = dev.zeros(DType::BF16, rows_n * cols)?;
    let ms = time_gpu(g, warm, iters, &mut || gather_rows(dev, &mut out, &sb, &idx, cols))?;
    let got = dev.to_vec(&out)?;
    let want: Vec<f32> = order[..c].iter().flat_map(|&r| src[r * cols..(r + 1) * cols].to_vec()).collect();
    rows.push(BenchRow {
        op: "gather_rows".into(),
        shape: format!("{rows_n}x{cols} bf16"),
        ms,
        bytes: (2 * rows_n * cols * 2) as f64,
        flops: 0.0,
        rel_err: Some(rel_err(&got[..c * cols], &want)),
        note: "one block per row, 16-byte vectors".into(),
    });
    Ok(rows)
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

//! Bench suite "norms": the memory-bound row ops — RMSNorm and LayerNorm forward and backward,
//! RoPE forward and the embedding gather — at LLM sizes in bf16 (≥ 64 MB of traffic each).
//! Floor bytes count each input read once and each output written once (parameter gradients as
//! a read plus a write, since they accumulate). Each row also reports the relative error of the
//! first few output rows against the CPU reference (for the backward ops, of dx).

use super::{time_gpu, BenchRow};
use crate::check::rel_err;
use crate::ops::{embedding, layernorm, rmsnorm, rope};
use crate::rng::Rng;
use crate::tensor::{DType, Device};
use anyhow::Result;

/// Leading rows compared with the CPU reference.
const CHECK_ROWS: usize = 8;
const BF: f64 = 2.0; // bytes per bf16
const F4: f64 = 4.0; // bytes per f32 / i32

pub fn run(dev: &Device, quick: bool) -> Result<Vec<BenchRow>> {
    let Device::Cuda(g) = dev else { return Ok(Vec::new()) };
    // 16384 x 4096 bf16 = 128 MiB per activation tensor.
    let (rows, cols) = (if quick { 4096 } else { 16384 }, 4096usize);
    let (warm, iters) = if quick { (2, 5) } else { (5, 20) };
    let n = rows * cols;
    let k = CHECK_ROWS.min(rows);
    let mut rng = Rng::new(0x6e6f726d);
    // Random non-zero inputs, rounded to bf16 as the upload does so the CPU check sees the same values.
    let x = bf16_round(rng.uniform_vec(n, -2.0, 2.0));
    let dy = bf16_round(rng.uniform_vec(n, -1.0, 1.0));
    let w = bf16_round(rng.uniform_vec(cols, 0.5, 1.5));
    let b = bf16_round(rng.uniform_vec(cols, -0.5, 0.5));
    let bf = DType::BF16;
    let (xb, dyb, wb, bb) = (dev.upload(&x, bf)?, dev.upload(&dy, bf)?, dev.upload(&w, bf)?, dev.upload(&b, bf)?);
    let (xk, dyk) = (&x[..k * cols], &dy[..k * cols]);
    let shape = format!("[{rows}x{cols}] bf16");
    let (r, c) = (rows as f64, cols as f64);
    let mut out = Vec::new();

    // RMSNorm.
    let mut y = dev.zeros(bf, n)?;
    let mut rstd = dev.zeros_f32(rows)?;
    let ms = time_gpu(g, warm, iters, &mut || {
        rmsnorm::fwd(dev, rmsnorm::Fwd { y: &mut y, rstd: &mut rstd, x: &xb, w: &wb }, rows, cols, 1e-6)
    })?;
    let (mut yr, mut rr) = (vec![0f32; k * cols], vec![0f32; k]);
    rmsnorm::cpu::fwd(rmsnorm::Fwd { y: &mut yr, rstd: &mut rr, x: xk, w: &w }, k, cols, 1e-6);
    let err = rel_err(&dev.to_vec(&y)?[..k * cols], &yr);
    out.push(row("rmsnorm_fwd", &shape, ms, 2.0 * BF * r * c + BF * c + F4 * r, err));

    let mut dx = dev.zeros(bf, n)?;
    let mut dw = dev.zeros_f32(cols)?;
    let (mut dxr, mut dwr) = (vec![0f32; k * cols], vec![0f32; cols]);
    rmsnorm::cpu::bwd(rmsnorm::Bwd { dx: &mut dxr, dw: &mut dwr, dy: dyk, x: xk, w: &w, rstd: &rr }, k, cols);
    // The Rows kernel (verified) and the plan's (Vec16 at this shape) side by side; the plan's dw
    // is compared with Rows' after one call from zero.
    let mut dw_rows = Vec::new();
    let planned = rmsnorm::plan_bwd(bf, rows, cols, true);
    for kernel in [rmsnorm::RmsNormBwdKernel::Rows, planned] {
        let vec = kernel != rmsnorm::RmsNormBwdKernel::Rows;
        let ms = time_gpu(g, warm, iters, &mut || {
            rmsnorm::bwd_with(
                dev,
                kernel,
                rmsnorm::Bwd { dx: &mut dx, dw: &mut dw, dy: &dyb, x: &xb, w: &wb, rstd: &rstd },
                rows,
                cols,
            )
        })?;
        let err = rel_err(&dev.to_vec(&dx)?[..k * cols], &dxr);
        let mut dw1 = dev.zeros_f32(cols)?;
        rmsnorm::bwd_with(
            dev,
            kernel,
            rmsnorm::Bwd { dx: &mut dx, dw: &mut dw1, dy: &dyb, x: &xb, w: &wb, rstd: &rstd },
            rows,
            cols,
        )?;
        let dwv = dev.to_vec(&dw1)?;
        let note = if vec { format!("{kernel:?}; dw vs Rows {:.1e}", rel_err(&dwv, &dw_rows)) } else { String::new() };
        dw_rows = dwv;
        let mut rw = row(
            if vec { "rmsnorm_bwd" } else { "rmsnorm_bwd rows" },
            &shape,
            ms,
            3.0 * BF * r * c + BF * c + F4 * r + 2.0 * F4 * c,
            err,
        );
        rw.note = note;
        out.push(rw);
    }

    // LayerNorm.
    let mut mean = dev.zeros_f32(rows)?;
    let (mut yr, mut mr, mut rr) = (vec![0f32; k * cols], vec![0f32; k], vec![0f32; k]);
    layernorm::cpu::fwd(
        layernorm::Fwd { y: &mut yr, mean: &mut mr, rstd: &mut rr, x: xk, w: &w, b: &b },
        k,
        cols,
        1e-5,
    );
    for kernel in [layernorm::plan_fwd(bf, rows, cols, true), layernorm::LayerNormFwdKernel::Rows] {
        // Rows last, so the backward below uses its mean/rstd.
        let vec = kernel != layernorm::LayerNormFwdKernel::Rows;
        let ms = time_gpu(g, warm, iters, &mut || {
            layernorm::fwd_with(
                dev,
                kernel,
                layernorm::Fwd { y: &mut y, mean: &mut mean, rstd: &mut rstd, x: &xb, w: &wb, b: &bb },
                rows,
                cols,
                1e-5,
            )
        })?;
        let err = rel_err(&dev.to_vec(&y)?[..k * cols], &yr)
            .max(rel_err(&dev.to_vec(&mean)?[..k], &mr))
            .max(rel_err(&dev.to_vec(&rstd)?[..k], &rr));
        let mut rw = row(
            if vec { "layernorm_fwd" } else { "layernorm_fwd rows" },
            &shape,
            ms,
            2.0 * BF * r * c + 2.0 * BF * c + 2.0 * F4 * r,
            err,
        );
        rw.note = if vec { format!("{kernel:?}; err covers y, mean, rstd") } else { String::new() };
        out.push(rw);
    }

    let mut db = dev.zeros_f32(cols)?;
    let (mut dxr, mut dwr, mut dbr) = (vec![0f32; k * cols], vec![0f32; cols], vec![0f32; cols]);
    layernorm::cpu::bwd(
        layernorm::Bwd { dx: &mut dxr, dw: &mut dwr, db: &mut dbr, dy: dyk, x: xk, w: &w, mean: &mr, rstd: &rr },
        k,
        cols,
    );
    let mut p_rows = (Vec::new(), Vec::new());
    for kernel in [layernorm::LayerNormBwdKernel::Rows, layernorm::plan_bwd(bf, rows, cols, true)] {
        let vec = kernel != layernorm::LayerNormBwdKernel::Rows;
        let ms = time_gpu(g, warm, iters, &mut || {
            layernorm::bwd_with(
                dev,
                kernel,
                layernorm::Bwd {
                    dx: &mut dx,
                    dw: &mut dw,
                    db: &mut db,
                    dy: &dyb,
                    x: &xb,
                    w: &wb,
                    mean: &mean,
                    rstd: &rstd,
                },
                rows,
                cols,
            )
        })?;
        let err = rel_err(&dev.to_vec(&dx)?[..k * cols], &dxr);
        let (mut dw1, mut db1) = (dev.zeros_f32(cols)?, dev.zeros_f32(cols)?);
        layernorm::bwd_with(
            dev,
            kernel,
            layernorm::Bwd {
                dx: &mut dx,
                dw: &mut dw1,
                db: &mut db1,
                dy: &dyb,
                x: &xb,
                w: &wb,
                mean: &mean,
                rstd: &rstd,
            },
            rows,
            cols,
        )?;
        let p = (dev.to_vec(&dw1)?, dev.to_vec(&db1)?);
        let note = if vec {
            format!("{kernel:?}; dw, db vs Rows {:.1e}, {:.1e}", rel_err(&p.0, &p_rows.0), rel_err(&p.1, &p_rows.1))
        } else {
            String::new()
        };
        p_rows = p;
        let mut rw = row(
            if vec { "layernorm_bwd" } else { "layernorm_bwd rows" },
            &shape,
            ms,
            3.0 * BF * r * c + BF * c + 2.0 * F4 * r + 4.0 * F4 * c,
            err,
        );
        rw.note = note;
        out.push(rw);
    }
    drop((y, dx));

    // RoPE on q-like activations [tokens, 32 heads, 128], in place (x is overwritten each call:
    // the check below reruns one call on a fresh copy).
    let (heads, hd) = (32usize, 128usize);
    let tokens = n / (heads * hd);
    let pos: Vec<i32> = (0..tokens as i32).collect();
    let (cos, sin) = rope::table_1d(&pos, hd, 1e6)?;
    let (cb, sb) = rope::upload_table(dev, &cos, &sin)?;
    let mut q = dev.upload(&x, bf)?;
    let ms = time_gpu(g, warm, iters, &mut || rope::fwd(dev, &mut q, &cb, &sb, tokens, heads, hd))?;
    let mut q = dev.upload(&x, bf)?;
    rope::fwd(dev, &mut q, &cb, &sb, tokens, heads, hd)?;
    let kt = k.min(tokens);
    let mut qr = x[..kt * heads * hd].to_vec();
    rope::cpu::fwd(&mut qr, &cos[..kt * hd / 2], &sin[..kt * hd / 2], kt, heads, hd);
    let err = rel_err(&dev.to_vec(&q)?[..kt * heads * hd], &qr);
    let (t, h, d) = (tokens as f64, heads as f64, hd as f64);
    out.push(row(
        "rope_fwd",
        &format!("[{tokens}x{heads}x{hd}] bf16"),
        ms,
        2.0 * BF * t * h * d + 2.0 * F4 * t * d / 2.0,
        err,
    ));
    drop(q);

    // Embedding gather from a LLaVA-sized vocabulary.
    let vocab = 32064usize;
    let table = bf16_round(rng.uniform_vec(vocab * cols, -1.0, 1.0));
    let tb = dev.upload(&table, bf)?;
    let ids: Vec<i32> = (0..rows).map(|_| rng.below(vocab) as i32).collect();
    let idb = dev.upload_i32(&ids)?;
    let mut e = dev.zeros(bf, n)?;
    let ms = time_gpu(g, warm, iters, &mut || {
        embedding::fwd(dev, &mut e, &tb, &idb, Some(&ids), embedding::Dims { t: rows, c: cols, v: vocab })
    })?;
    let mut er = vec![0f32; k * cols];
    embedding::cpu::fwd(&mut er, &table, &ids[..k], k, cols);
    let err = rel_err(&dev.to_vec(&e)?[..k * cols], &er);
    out.push(row("embedding_fwd", &format!("[{rows}x{cols}] V={vocab} bf16"), ms, 2.0 * BF * r * c + F4 * r, err));
    Ok(out)
}

fn row(op: &str, shape: &str, ms: f64, bytes: f64, err: f64) -> BenchRow {
    BenchRow { op: op.into(), shape: shape.into(), ms, bytes, flops: 0.0, rel_err: Some(err), note: String::new() }
}

/// Rounds through bf16 in place (the collect reuses the allocation).
fn bf16_round(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()
}

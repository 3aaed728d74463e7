//! Bench suite "lora": the LoRA branch (`ops::lora`, cuBLAS GEMMs) next to the base projection
//! it rides on, at Qwen2.5-7B shapes (T = 4096 tokens, q/o 3584², gate/up 3584→18944, down
//! 18944→3584) and ranks 16 and 64, bf16. Reported per shape: the base linear forward, the
//! branch forward, the frozen base's backward (dx only) and the branch backward (dx, dA, dB).
//! FLOPs: base 2·T·in·out per GEMM; branch forward 2·T·r·(in + out), backward
//! 2·T·r·(3·in + 2·out) (u recomputed). Floor bytes: inputs read once, outputs written once, an
//! accumulated output read and written. The branch is memory-bound (it rereads and rewrites y
//! or dx), so its rows are judged by GB/s. The first rows of y are checked against the CPU.

use super::{time_gpu, BenchRow};
use crate::check::rel_err;
use crate::ops::{lora, matmul};
use crate::rng::Rng;
use crate::tensor::{DType, Device};
use anyhow::Result;

const BF: f64 = 2.0;
const F4: f64 = 4.0;
/// Rows of y compared with the CPU reference.
const CHECK_ROWS: usize = 4;

pub fn run(dev: &Device, quick: bool) -> Result<Vec<BenchRow>> {
    let Device::Cuda(g) = dev else { return Ok(Vec::new()) };
    let t = if quick { 1024 } else { 4096 };
    let (warm, iters) = if quick { (2, 5) } else { (5, 20) };
    let shapes: &[(&str, usize, usize)] =
        &[("q/o_proj", 3584, 3584), ("gate/up_proj", 3584, 18944), ("down_proj", 18944, 3584)];
    let ranks: &[usize] = if quick { &[16] } else { &[16, 64] };
    let bf = DType::BF16;
    let mut rng = Rng::new(0x10_4a);
    let mut out = Vec::new();
    for &(name, din, dout) in shapes {
        let x = bf16_round(rng.uniform_vec(t * din, -1.0, 1.0));
        let w = bf16_round(rng.uniform_vec(dout * din, -0.02, 0.02));
        let dy = bf16_round(rng.uniform_vec(t * dout, -1.0, 1.0));
        let (xb, wb, dyb) = (dev.upload(&x, bf)?, dev.upload(&w, bf)?, dev.upload(&dy, bf)?);
        let (mut y, mut dx) = (dev.zeros(bf, t * dout)?, dev.zeros(bf, t * din)?);
        let (ti, di, dof) = (t as f64, din as f64, dout as f64);
        let shape = format!("{name} [{t}x{din}]->{dout} bf16");
        let ms = time_gpu(g, warm, iters, &mut || {
            matmul::linear_fwd(dev, &mut y, &xb, &wb, None, matmul::Linear { t, din, dout })
        })?;
        out.push(BenchRow {
            op: "linear_fwd (base)".into(),
            shape: shape.clone(),
            ms,
            bytes: BF * (ti * di + dof * di + ti * dof),
            flops: 2.0 * ti * di * dof,
            ..Default::default()
        });
        let ms = time_gpu(g, warm, iters, &mut || matmul::fwd(dev, &mut dx, &dyb, &wb, matmul::Mm::new(t, din, dout)))?;
        out.push(BenchRow {
            op: "linear_bwd dx (frozen)".into(),
            shape: shape.clone(),
            ms,
            bytes: BF * (ti * dof + dof * di + ti * di),
            flops: 2.0 * ti * di * dof,
            ..Default::default()
        });
        for &r in ranks {
            let a = bf16_round(rng.uniform_vec(r * din, -1.0 / di.sqrt(), 1.0 / di.sqrt()));
            let b = bf16_round(rng.uniform_vec(dout * r, -0.05, 0.05));
            let (ab, bb) = (dev.upload(&a, bf)?, dev.upload(&b, bf)?);
            let ad = lora::Adapter { a: &ab, b: &bb, rank: r, scale: 2.0 };
            let (rf, ab_bytes) = (r as f64, BF * (r * din + dout * r) as f64);
            let tag = format!("{shape} r{r}");
            // Check the first rows of one branch forward from zero.
            let mut y0 = dev.zeros(bf, t * dout)?;
            lora::fwd(dev, &mut y0, &xb, &ad, matmul::Linear { t, din, dout })?;
            let k = CHECK_ROWS.min(t);
            let mut want = vec![0f32; k * dout];
            lora::cpu::fwd(
                &mut want,
                &x[..k * din],
                lora::Adapter { a: &a, b: &b, rank: r, scale: 2.0 },
                matmul::Linear { t: k, din, dout },
            );
            let err = rel_err(&dev.to_vec(&y0)?[..k * dout], &want);
            let ms =
                time_gpu(g, warm, iters, &mut || lora::fwd(dev, &mut y, &xb, &ad, matmul::Linear { t, din, dout }))?;
            let bytes = BF * ti * di + ab_bytes + 2.0 * BF * ti * dof + 2.0 * BF * ti * rf;
            out.push(BenchRow {
                op: "lora_fwd (branch, y +=)".into(),
                shape: tag.clone(),
                ms,
                bytes,
                flops: 2.0 * ti * rf * (di + dof),
                rel_err: Some(err),
                ..Default::default()
            });
            let (mut da, mut db) = (dev.zeros_f32(r * din)?, dev.zeros_f32(dout * r)?);
            let ms = time_gpu(g, warm, iters, &mut || {
                lora::bwd(
                    dev,
                    lora::Grads { dx: Some(&mut dx), da: Some(&mut da), db: Some(&mut db) },
                    &dyb,
                    &xb,
                    &ad,
                    matmul::Linear { t, din, dout },
                )
            })?;
            let bytes = 2.0 * BF * ti * di
                + BF * ti * dof
                + ab_bytes
                + 2.0 * F4 * (r * din + dout * r) as f64
                + 4.0 * BF * ti * rf;
            out.push(BenchRow {
                op: "lora_bwd (dx +=, dA, dB)".into(),
                shape: tag,
                ms,
                bytes,
                flops: 2.0 * ti * rf * (3.0 * di + 2.0 * dof),
                ..Default::default()
            });
        }
    }
    Ok(out)
}

fn bf16_round(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()
}

//! The "elementwise" bench suite: SwiGLU, GELU, bias add / backward, the residual add, the casts,
//! the fused AdamW step and the gradient sum of squares, at 64M elements (16M with --quick; every
//! op moves ≥ 64 MB). Memory-bound, so the table's GB/s against 4.2 TB/s is the figure of merit.
//! Floor bytes: each input read once and each output written once (in-place buffers count as a
//! read and a write); AdamW reads grad, m, v, master and writes m, v, master and the bf16 param.
//! Out-of-place results are checked against the CPU reference on a prefix.

use super::{time_gpu, BenchRow};
use crate::ops::act::{self, Gelu};
use crate::ops::adamw::{self, AdamW};
use crate::ops::elementwise::{self as ew, BiasBwdKernel};
use crate::rng::Rng;
use crate::tensor::{Buf, DType, Device};
use anyhow::Result;

/// Elements compared against the CPU reference.
const CHECK: usize = 1 << 16;

pub fn run(dev: &Device, quick: bool) -> Result<Vec<BenchRow>> {
    let Device::Cuda(g) = dev else { return Ok(Vec::new()) };
    let n: usize = if quick { 16 << 20 } else { 64 << 20 };
    let (warm, iters) = if quick { (3, 10) } else { (5, 25) };
    let time = |f: &mut dyn FnMut() -> Result<()>| time_gpu(g, warm, iters, f);
    let shape = format!("n={}M", n >> 20);
    let nf = n as f64;
    let mut rows = Vec::new();
    let mut rng = Rng::new(0xE1E);
    let bf = DType::BF16;

    // Host copies are rounded to bf16 so the CPU reference sees what the GPU sees.
    let gate_h = bf16_round(random(&mut rng, n, 2.0));
    let up_h = bf16_round(random(&mut rng, n, 1.0));
    let dout_h = bf16_round(random(&mut rng, n, 1.0));
    let gate = dev.upload(&gate_h, bf)?;
    let up = dev.upload(&up_h, bf)?;
    let dout = dev.upload(&dout_h, bf)?;
    let mut out = dev.zeros(bf, n)?;
    let mut out2 = dev.zeros(bf, n)?;

    let ms = time(&mut || act::swiglu_fwd(dev, &mut out, &gate, &up, n))?;
    let mut want = vec![0f32; CHECK];
    act::cpu::swiglu_fwd(&mut want, &gate_h[..CHECK], &up_h[..CHECK]);
    let err = prefix_err(dev, &out, &want)?;
    rows.push(row("swiglu_fwd", &shape, ms, 3.0 * 2.0 * nf, Some(err), "bf16"));

    let ms = time(&mut || act::swiglu_bwd(dev, &mut out, &mut out2, &dout, &gate, &up, n))?;
    let (mut dg, mut du) = (vec![0f32; CHECK], vec![0f32; CHECK]);
    act::cpu::swiglu_bwd(&mut dg, &mut du, &dout_h[..CHECK], &gate_h[..CHECK], &up_h[..CHECK]);
    let err = prefix_err(dev, &out, &dg)?.max(prefix_err(dev, &out2, &du)?);
    rows.push(row("swiglu_bwd", &shape, ms, 5.0 * 2.0 * nf, Some(err), "bf16"));

    for kind in [Gelu::Tanh, Gelu::Erf, Gelu::Quick] {
        let ms = time(&mut || act::gelu_fwd(dev, &mut out, &gate, n, kind))?;
        let mut want = vec![0f32; CHECK];
        act::cpu::gelu_fwd(&mut want, &gate_h[..CHECK], kind);
        let err = prefix_err(dev, &out, &want)?;
        rows.push(row(&format!("gelu_fwd {kind:?}"), &shape, ms, 2.0 * 2.0 * nf, Some(err), "bf16"));
    }
    let ms = time(&mut || act::gelu_bwd(dev, &mut out, &dout, &gate, n, Gelu::Tanh))?;
    let mut want = vec![0f32; CHECK];
    act::cpu::gelu_bwd(&mut want, &dout_h[..CHECK], &gate_h[..CHECK], Gelu::Tanh);
    let err = prefix_err(dev, &out, &want)?;
    rows.push(row("gelu_bwd Tanh", &shape, ms, 3.0 * 2.0 * nf, Some(err), "bf16"));

    // Bias over [n / 4096, 4096] (a Qwen2-7B-sized hidden of 3584 would leave a remainder).
    let cols = 4096;
    let brows = n / cols;
    let bias = dev.upload(&bf16_round(random(&mut rng, cols, 1.0)), bf)?;
    let mut y = dev.upload(&up_h, bf)?;
    let ms = time(&mut || ew::bias_add(dev, &mut y, &bias, brows, cols))?;
    rows.push(row(
        "bias_add",
        &format!("[{brows}x{cols}]"),
        ms,
        2.0 * 2.0 * nf + 2.0 * cols as f64,
        None,
        "bf16, in place",
    ));
    let mut db = dev.zeros_f32(cols)?;
    let mut db_scalar = Vec::new();
    for kernel in [BiasBwdKernel::Scalar, BiasBwdKernel::Vec16] {
        let ms = time(&mut || ew::bias_bwd_with(dev, kernel, &mut db, &dout, brows, cols))?;
        // One call from zero; Vec16 is compared with Scalar (both deterministic).
        let mut db1 = dev.zeros_f32(cols)?;
        ew::bias_bwd_with(dev, kernel, &mut db1, &dout, brows, cols)?;
        let d = dev.to_vec(&db1)?;
        let (name, err, note) = if kernel == BiasBwdKernel::Vec16 {
            ("bias_bwd", Some(vec_err(&d, &db_scalar)), "bf16 dy, f32 db +=; Vec16, err vs Scalar")
        } else {
            ("bias_bwd scalar", None, "bf16 dy, f32 db +=")
        };
        db_scalar = d;
        rows.push(row(name, &format!("[{brows}x{cols}]"), ms, 2.0 * nf + 8.0 * cols as f64, err, note));
    }

    let ms = time(&mut || ew::add_inplace(dev, &mut y, &dout, n))?;
    rows.push(row("add_inplace", &shape, ms, 3.0 * 2.0 * nf, None, "bf16"));
    drop((y, out2));

    let mut f = dev.zeros_f32(n)?;
    // One vector per thread with streaming stores; the write-only reference below has the same
    // stores and grid (the cast writes 2/3 of its bytes). Its output feeds the f32 -> bf16 cast.
    let ms = time(&mut || ew::cast(dev, &mut f, &gate, n))?;
    let err = prefix_err(dev, &f, &gate_h[..CHECK])?;
    rows.push(row("cast bf16->f32", &shape, ms, 6.0 * nf, Some(err), "st.global.cs, one-shot grid"));
    let mut w = dev.zeros_f32(n)?;
    let ms = time(&mut || ew::fill_f32_streaming(dev, &mut w, 1.5, n))?;
    rows.push(row("fill f32 (write-only ref)", &shape, ms, 4.0 * nf, None, "write ceiling for the cast"));
    drop(w);
    let ms = time(&mut || ew::cast(dev, &mut out, &f, n))?;
    let err = prefix_err(dev, &out, &gate_h[..CHECK])?;
    rows.push(row("cast f32->bf16", &shape, ms, 6.0 * nf, Some(err), ""));
    drop((gate, up, dout, out));

    // AdamW on n parameters: f32 master / grad / m / v, bf16 param.
    let mut master = f;
    let grad = dev.upload(&random(&mut rng, n, 1e-2), DType::F32)?;
    let mut m = dev.upload(&random(&mut rng, n, 1e-3), DType::F32)?;
    let mut v = dev.upload(&random(&mut rng, n, 1e-3).iter().map(|x| x * x).collect::<Vec<f32>>(), DType::F32)?;
    let mut param = dev.zeros(bf, n)?;
    let hp = AdamW { lr: 1e-5, weight_decay: 0.1, ..AdamW::default() };
    let ms = time(&mut || {
        adamw::step(
            dev,
            adamw::Bufs { param: &mut param, master: &mut master, grad: &grad, m: &mut m, v: &mut v },
            n,
            &hp,
            10,
            0.5,
        )
    })?;
    rows.push(row("adamw_step", &shape, ms, 30.0 * nf, None, "f32 master/m/v/grad, bf16 param"));

    let ms = time(&mut || adamw::sum_squares(dev, &grad, n).map(|_| ()))?;
    rows.push(row("sum_squares", &shape, ms, 4.0 * nf, None, "f32, includes the partials' download"));
    Ok(rows)
}

fn row(op: &str, shape: &str, ms: f64, bytes: f64, rel_err: Option<f64>, note: &str) -> BenchRow {
    BenchRow { op: op.into(), shape: shape.into(), ms, bytes, flops: 0.0, rel_err, note: note.into() }
}

/// n random values: a normal pattern of odd length tiled (drawing 64M normals would dominate the
/// run), never exactly zero.
fn random(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    let pat: Vec<f32> =
        rng.normal_vec(n.min((1 << 20) + 7), scale).into_iter().map(|x| if x == 0.0 { 1e-3 } else { x }).collect();
    pat.iter().copied().cycle().take(n).collect()
}

fn bf16_round(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()
}

/// ‖a − b‖ / ‖b‖ of two host vectors (infinite when a has a non-finite entry).
fn vec_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    num.sqrt() / den.sqrt().max(1e-30)
}

/// ‖got − want‖ / ‖want‖ over the first want.len() elements of a device buffer.
fn prefix_err(dev: &Device, b: &Buf, want: &[f32]) -> Result<f64> {
    let got = dev.to_vec(b)?;
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in got.iter().zip(want) {
        if !x.is_finite() {
            return Ok(f64::INFINITY);
        }
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    Ok(num.sqrt() / den.sqrt().max(1e-30))
}

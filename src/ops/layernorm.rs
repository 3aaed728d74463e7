//! LayerNorm with weight and bias (CLIP in LLaVA-NeXT): y = (x − mean)·rstd·w + b, where
//! rstd = 1/sqrt(var + eps) and var is the population (biased) variance, as `nn.LayerNorm`.
//! Forward saves mean and rstd [rows] (f32). Kernel: kernels/layernorm.cu.

use super::rmsnorm::{aligned16, check_vec16, colsum_reduce, vec16_vpt, VecLaunch};
use super::{check, check_dtype, same_float_dtype};
use crate::cuda::api;
use crate::cuda::{cfg_1d, cfg_rows, dptr};
use crate::tensor::{Buf, DType, Device};
use anyhow::Result;

/// Largest row that keeps the backward's dw/db running sums in shared memory (2·cols f32 per
/// block, ≤ 96 KiB so two blocks still fit on an SM); longer rows accumulate in global memory.
const SMEM_MAX_COLS: usize = 12 * 1024;
/// `__launch_bounds__` of the backward kernel.
const BWD_MAX_THREADS: u32 = 512;

/// The kernel of a layernorm forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerNormFwdKernel {
    /// layernorm_fwd: one block per row, any row length and alignment.
    Rows,
    /// layernorm_fwd_vec16_vpt{vpt}: persistent blocks, each thread holding `vpt` 16-byte column vectors
    /// of a row in registers (x read once, the next row prefetched). Rows of whole 16-byte
    /// vectors, at most 4 per thread, 16-byte aligned y, x, w, b.
    Vec16 { vpt: usize },
}

/// The kernel of a layernorm backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerNormBwdKernel {
    /// layernorm_bwd: one block per run of rows, dw/db running sums in shared memory (rows up to
    /// 12 Ki columns) or in the partial buffer; any row length and alignment.
    Rows,
    /// layernorm_bwd_vec16_vpt{vpt}: as rmsnorm's Vec16 (one pass over x and dy, rows in registers),
    /// dw/db partials in a cached scratch. Rows of whole 16-byte vectors, at most 4 per thread,
    /// 16-byte aligned dx, dy, x, w.
    Vec16 { vpt: usize },
}

/// The forward kernel for `rows` rows of `cols` columns; `aligned`: y, x, w and b all 16-byte
/// aligned. Vec16 wherever it applies (0.0818 ms, 78.2 % of 4.2 TB/s against 57 % for Rows on the
/// H200, PERF.md round 3); Rows otherwise.
pub fn plan_fwd(dtype: DType, rows: usize, cols: usize, aligned: bool) -> LayerNormFwdKernel {
    match vec16_vpt(dtype, rows, cols) {
        Some(vpt) if aligned => LayerNormFwdKernel::Vec16 { vpt },
        _ => LayerNormFwdKernel::Rows,
    }
}

/// The backward kernel; `aligned`: dx, dy, x and w all 16-byte aligned. Vec16 wherever it applies
/// (0.1278 ms, 75.1 % against 53 % for Rows, PERF.md round 3); Rows otherwise.
pub fn plan_bwd(dtype: DType, rows: usize, cols: usize, aligned: bool) -> LayerNormBwdKernel {
    match vec16_vpt(dtype, rows, cols) {
        Some(vpt) if aligned => LayerNormBwdKernel::Vec16 { vpt },
        _ => LayerNormBwdKernel::Rows,
    }
}

/// The buffers of a forward: y [rows, cols] and the saved mean, rstd [rows] (f32) from
/// x [rows, cols], w [cols] and b [cols]. `B` is `Buf` for the op and a slice for the CPU reference.
pub struct Fwd<'a, B: ?Sized = Buf> {
    pub y: &'a mut B,
    pub mean: &'a mut B,
    pub rstd: &'a mut B,
    pub x: &'a B,
    pub w: &'a B,
    pub b: &'a B,
}

/// The buffers of a backward: dx [rows, cols] (=), dw [cols] and db [cols] (f32, +=) from dy, x,
/// w and the saved mean, rstd. `B` is `Buf` for the op and a slice for the CPU reference.
pub struct Bwd<'a, B: ?Sized = Buf> {
    pub dx: &'a mut B,
    pub dw: &'a mut B,
    pub db: &'a mut B,
    pub dy: &'a B,
    pub x: &'a B,
    pub w: &'a B,
    pub mean: &'a B,
    pub rstd: &'a B,
}

/// y [rows, cols], mean [rows] (f32), rstd [rows] (f32) = layernorm(x [rows, cols], w [cols], b [cols]).
pub fn fwd(dev: &Device, bufs: Fwd, rows: usize, cols: usize, eps: f32) -> Result<()> {
    let kernel = match dev {
        Device::Cpu => LayerNormFwdKernel::Rows,
        Device::Cuda(g) => plan_fwd(bufs.y.dtype(), rows, cols, aligned16(g, &[&*bufs.y, bufs.x, bufs.w, bufs.b])?),
    };
    fwd_with(dev, kernel, bufs, rows, cols, eps)
}

/// `fwd` with an explicit kernel (the bench and tests run each); an error when Vec16 cannot take
/// the call. On the CPU the kernel is ignored.
pub fn fwd_with(dev: &Device, kernel: LayerNormFwdKernel, bufs: Fwd, rows: usize, cols: usize, eps: f32) -> Result<()> {
    let Fwd { y, mean, rstd, x, w, b } = bufs;
    let op = "layernorm_fwd";
    for (buf, n, a) in [
        (&*y, rows * cols, "y"),
        (x, rows * cols, "x"),
        (w, cols, "w"),
        (b, cols, "b"),
        (&*mean, rows, "mean"),
        (&*rstd, rows, "rstd"),
    ] {
        check(buf, n, op, a)?;
    }
    check_dtype(mean, DType::F32, op, "mean")?;
    check_dtype(rstd, DType::F32, op, "rstd")?;
    if rows == 0 || cols == 0 {
        // Nothing to normalise (an empty row has no mean); leave the outputs as they are.
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            let (y, mean, rstd) = (y.host_mut()?, mean.host_mut()?, rstd.host_mut()?);
            let (x, w, b) = (x.host()?, w.host()?, b.host()?);
            cpu::fwd(Fwd { y, mean, rstd, x, w, b }, rows, cols, eps);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[y, x, w, b])?;
            let (yp, mp, rp, xp, wp, bp) = (y.ptr(g)?, mean.ptr(g)?, rstd.ptr(g)?, x.ptr(g)?, w.ptr(g)?, b.ptr(g)?);
            let (r, c) = (rows as i32, cols as i32);
            let a =
                api::layernorm::LayernormFwd { y: yp, mean: mp, rstd: rp, x: xp, w: wp, b: bp, rows: r, cols: c, eps };
            if let LayerNormFwdKernel::Vec16 { vpt } = kernel {
                check_vec16(op, kernel, dt, rows, cols, vpt, aligned16(g, &[y, x, w, b])?)?;
                let plan = VecLaunch::new(g, rows, vpt, cols / (16 / dt.size()), 4);
                return api::layernorm::LayernormFwdVec16::from(a).launch(g, vpt as u32, dt, plan.cfg(0));
            }
            a.launch(g, dt, cfg_rows(rows, block_for(cols, dt), 0))
        }
    }
}

/// dx [rows, cols] (=), dw [cols] and db [cols] (f32, +=) from dy, x, w and the saved mean, rstd.
pub fn bwd(dev: &Device, bufs: Bwd, rows: usize, cols: usize) -> Result<()> {
    let kernel = match dev {
        Device::Cpu => LayerNormBwdKernel::Rows,
        Device::Cuda(g) => plan_bwd(bufs.dx.dtype(), rows, cols, aligned16(g, &[&*bufs.dx, bufs.dy, bufs.x, bufs.w])?),
    };
    bwd_with(dev, kernel, bufs, rows, cols)
}

/// `bwd` with an explicit kernel (the bench and tests run each); an error when Vec16 cannot take
/// the call. On the CPU the kernel is ignored.
pub fn bwd_with(dev: &Device, kernel: LayerNormBwdKernel, bufs: Bwd, rows: usize, cols: usize) -> Result<()> {
    let Bwd { dx, dw, db, dy, x, w, mean, rstd } = bufs;
    let op = "layernorm_bwd";
    for (buf, n, a) in [
        (&*dx, rows * cols, "dx"),
        (dy, rows * cols, "dy"),
        (x, rows * cols, "x"),
        (w, cols, "w"),
        (mean, rows, "mean"),
        (rstd, rows, "rstd"),
        (&*dw, cols, "dw"),
        (&*db, cols, "db"),
    ] {
        check(buf, n, op, a)?;
    }
    for (buf, a) in [(mean, "mean"), (rstd, "rstd"), (&*dw, "dw"), (&*db, "db")] {
        check_dtype(buf, DType::F32, op, a)?;
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            let (dx, dw, db) = (dx.host_mut()?, dw.host_mut()?, db.host_mut()?);
            let (dy, x, w, mean, rstd) = (dy.host()?, x.host()?, w.host()?, mean.host()?, rstd.host()?);
            cpu::bwd(Bwd { dx, dw, db, dy, x, w, mean, rstd }, rows, cols);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[dx, dy, x, w])?;
            if let LayerNormBwdKernel::Vec16 { vpt } = kernel {
                // One pass over x and dy (rows in registers), dw/db partials in a cached
                // scratch [nblocks, 2, cols], reduced in a fixed order.
                check_vec16(op, kernel, dt, rows, cols, vpt, aligned16(g, &[dx, dy, x, w])?)?;
                let plan = VecLaunch::new(g, rows, vpt, cols / (16 / dt.size()), 3);
                let part = g.scratch_f32(plan.nblocks * 2 * cols)?;
                let pp = dptr(&*part, &g.stream);
                let a = api::layernorm::LayernormBwdVec16 {
                    dx: dx.ptr(g)?,
                    part: pp,
                    dy: dy.ptr(g)?,
                    x: x.ptr(g)?,
                    w: w.ptr(g)?,
                    mean: mean.ptr(g)?,
                    rstd: rstd.ptr(g)?,
                    rows: rows as i32,
                    cols: cols as i32,
                };
                // db running sums in shared memory: cols f32 (<= 32 KiB: cols <= 1024 vectors).
                a.launch(g, vpt as u32, dt, plan.cfg((cols * 4) as u32))?;
                return colsum_reduce(g, dw.ptr(g)?, db.ptr(g)?, pp, plan.nblocks, 2 * cols, cols);
            }
            // Enough blocks to fill the GPU; each owns a run of rows and writes one partial [dw; db] row.
            let nblocks = rows.clamp(1, 2 * g.sm_count as usize);
            let rpb = rows.div_ceil(nblocks).max(1);
            let nblocks = rows.div_ceil(rpb).max(1);
            // [nblocks, 2, cols]
            let part = dev.zeros_f32(nblocks * 2 * cols)?;
            // The kernel is built for <= 512 threads (two blocks per SM at <= 64 registers).
            let block = block_for(cols, dt).min(BWD_MAX_THREADS);
            // Running dw/db column sums in shared memory when they fit, else in `part` itself.
            let use_smem = cols <= SMEM_MAX_COLS;
            let smem = if use_smem { (2 * cols * 4) as u32 } else { 0 };
            api::layernorm::LayernormBwd {
                dx: dx.ptr(g)?,
                part: part.ptr(g)?,
                dy: dy.ptr(g)?,
                x: x.ptr(g)?,
                w: w.ptr(g)?,
                mean: mean.ptr(g)?,
                rstd: rstd.ptr(g)?,
                rows: rows as i32,
                cols: cols as i32,
                rows_per_block: rpb as i32,
                use_smem: use_smem as i32,
            }
            .launch(g, dt, cfg_rows(nblocks, block, smem))?;
            api::layernorm::LayernormParamReduce {
                dw: dw.ptr(g)?,
                db: db.ptr(g)?,
                part: part.ptr(g)?,
                nparts: nblocks as i32,
                cols: cols as i32,
            }
            .launch(g, cfg_1d(2 * cols, 256))
        }
    }
}

/// Threads per row: enough 16-byte lanes to cover the row once, within [32, 1024].
fn block_for(cols: usize, dt: DType) -> u32 {
    let lanes = cols.div_ceil(16 / dt.size());
    (lanes.next_power_of_two().clamp(32, 1024)) as u32
}

pub mod cpu {
    use super::{Bwd, Fwd};
    use crate::real::Real;

    /// Two-pass statistics (mean, then the centred sum of squares), as the kernel does.
    pub fn fwd<R: Real>(bufs: Fwd<[R]>, rows: usize, cols: usize, eps: f32) {
        let Fwd { y, mean, rstd, x, w, b } = bufs;
        let n = R::from_f64(cols as f64);
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let mu = xr.iter().fold(R::ZERO, |a, &v| a + v) / n;
            let var = xr.iter().fold(R::ZERO, |a, &v| a + (v - mu) * (v - mu)) / n;
            let rs = R::ONE / (var + R::from_f64(eps as f64)).sqrt();
            mean[r] = mu;
            rstd[r] = rs;
            for c in 0..cols {
                y[r * cols + c] = (xr[c] - mu) * rs * w[c] + b[c];
            }
        }
    }

    pub fn bwd<R: Real>(bufs: Bwd<[R]>, rows: usize, cols: usize) {
        let Bwd { dx, dw, db, dy, x, w, mean, rstd } = bufs;
        let n = R::from_f64(cols as f64);
        for r in 0..rows {
            let o = r * cols;
            let (mu, rs) = (mean[r], rstd[r]);
            let (mut sg, mut sgx) = (R::ZERO, R::ZERO);
            for c in 0..cols {
                let g = dy[o + c] * w[c];
                sg += g;
                sgx += g * (x[o + c] - mu) * rs;
            }
            let (mg, mgx) = (sg / n, sgx / n);
            for c in 0..cols {
                let xh = (x[o + c] - mu) * rs;
                dx[o + c] = rs * (dy[o + c] * w[c] - mg - xh * mgx);
                dw[c] += dy[o + c] * xh;
                db[c] += dy[o + c];
            }
        }
    }
}

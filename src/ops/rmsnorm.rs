//! RMSNorm (Qwen2, Llama, Mistral, the Qwen vision tower): y = x · rsqrt(mean(x²) + eps) · w.
//! Forward saves rstd [rows] (f32). Kernel: kernels/rmsnorm.cu.

use super::{check, check_dtype, kname, same_float_dtype};
use crate::cuda::{cfg_1d, cfg_rows, Arg};
use crate::tensor::{Buf, DType, Device};
use anyhow::Result;

/// y [rows, cols], rstd [rows] (f32) = rmsnorm(x [rows, cols], w [cols]).
#[allow(clippy::too_many_arguments)]
pub fn fwd(dev: &Device, y: &mut Buf, rstd: &mut Buf, x: &Buf, w: &Buf, rows: usize, cols: usize, eps: f32) -> Result<()> {
    let op = "rmsnorm_fwd";
    check(x, rows * cols, op, "x")?;
    check(y, rows * cols, op, "y")?;
    check(w, cols, op, "w")?;
    check(rstd, rows, op, "rstd")?;
    check_dtype(rstd, DType::F32, op, "rstd")?;
    match dev {
        Device::Cpu => {
            cpu::fwd(y.host_mut()?, rstd.host_mut()?, x.host()?, w.host()?, rows, cols, eps);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[y, x, w])?;
            let args = [
                Arg::Ptr(y.ptr(g)?),
                Arg::Ptr(rstd.ptr(g)?),
                Arg::Ptr(x.ptr(g)?),
                Arg::Ptr(w.ptr(g)?),
                Arg::I32(rows as i32),
                Arg::I32(cols as i32),
                Arg::F32(eps),
            ];
            g.launch("rmsnorm", &kname(op, dt), cfg_rows(rows, block_for(cols, dt), 0), &args)
        }
    }
}

/// dx [rows, cols] (=), dw [cols] (f32, +=) from dy, x, w and the saved rstd.
#[allow(clippy::too_many_arguments)]
pub fn bwd(dev: &Device, dx: &mut Buf, dw: &mut Buf, dy: &Buf, x: &Buf, w: &Buf, rstd: &Buf, rows: usize, cols: usize) -> Result<()> {
    let op = "rmsnorm_bwd";
    for (b, n, a) in [(&*dx, rows * cols, "dx"), (dy, rows * cols, "dy"), (x, rows * cols, "x"), (w, cols, "w"), (rstd, rows, "rstd"), (&*dw, cols, "dw")] {
        check(b, n, op, a)?;
    }
    check_dtype(dw, DType::F32, op, "dw")?;
    match dev {
        Device::Cpu => {
            cpu::bwd(dx.host_mut()?, dw.host_mut()?, dy.host()?, x.host()?, w.host()?, rstd.host()?, rows, cols);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[dx, dy, x, w])?;
            // Enough blocks to fill the GPU; each owns a run of rows and writes one partial dw row.
            let nblocks = rows.clamp(1, 2 * g.sm_count as usize);
            let rpb = rows.div_ceil(nblocks).max(1);
            let nblocks = rows.div_ceil(rpb).max(1);
            let part = dev.zeros_f32(nblocks * cols)?;
            let args = [
                Arg::Ptr(dx.ptr(g)?),
                Arg::Ptr(part.ptr(g)?),
                Arg::Ptr(dy.ptr(g)?),
                Arg::Ptr(x.ptr(g)?),
                Arg::Ptr(w.ptr(g)?),
                Arg::Ptr(rstd.ptr(g)?),
                Arg::I32(rows as i32),
                Arg::I32(cols as i32),
                Arg::I32(rpb as i32),
            ];
            g.launch("rmsnorm", &kname(op, dt), cfg_rows(nblocks, block_for(cols, dt), 0), &args)?;
            let args = [Arg::Ptr(dw.ptr(g)?), Arg::Ptr(part.ptr(g)?), Arg::I32(nblocks as i32), Arg::I32(cols as i32), Arg::I32(1)];
            g.launch("rmsnorm", "rmsnorm_dw_reduce", cfg_1d(cols, 256), &args)
        }
    }
}

/// Threads per row: enough 16-byte lanes to cover the row once, within [32, 1024].
fn block_for(cols: usize, dt: DType) -> u32 {
    let lanes = cols.div_ceil(16 / dt.size());
    (lanes.next_power_of_two().clamp(32, 1024)) as u32
}

pub mod cpu {
    use crate::real::Real;

    pub fn fwd<R: Real>(y: &mut [R], rstd: &mut [R], x: &[R], w: &[R], rows: usize, cols: usize, eps: f32) {
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let ss = xr.iter().fold(R::ZERO, |a, &v| a + v * v);
            let rs = R::ONE / (ss / R::from_f64(cols as f64) + R::from_f64(eps as f64)).sqrt();
            rstd[r] = rs;
            for c in 0..cols {
                y[r * cols + c] = xr[c] * rs * w[c];
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn bwd<R: Real>(dx: &mut [R], dw: &mut [R], dy: &[R], x: &[R], w: &[R], rstd: &[R], rows: usize, cols: usize) {
        for r in 0..rows {
            let o = r * cols;
            let rs = rstd[r];
            let mut dot = R::ZERO;
            for c in 0..cols {
                dot += dy[o + c] * w[c] * x[o + c];
            }
            dot /= R::from_f64(cols as f64);
            for c in 0..cols {
                dx[o + c] = rs * (dy[o + c] * w[c] - x[o + c] * rs * rs * dot);
                dw[c] += dy[o + c] * x[o + c] * rs;
            }
        }
    }
}

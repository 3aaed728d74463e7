//! RMSNorm (Qwen2, Llama, Mistral, the Qwen vision tower): y = x · rsqrt(mean(x²) + eps) · w.
//! Forward saves rstd [rows] (f32). Kernel: kernels/rmsnorm.cu.

use super::{check, check_dtype, same_float_dtype};
use crate::cuda::api;
use crate::cuda::{cfg_1d, cfg_rows, dptr, Gpu};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};
use cudarc::driver::LaunchConfig;

/// The buffers of a forward: y [rows, cols] and the saved rstd [rows] (f32) from x [rows, cols]
/// and w [cols]. `B` is `Buf` for the op and a slice for the CPU reference.
pub struct Fwd<'a, B: ?Sized = Buf> {
    pub y: &'a mut B,
    pub rstd: &'a mut B,
    pub x: &'a B,
    pub w: &'a B,
}

/// The buffers of a backward: dx [rows, cols] (=) and dw [cols] (f32, +=) from dy, x, w and the
/// saved rstd. `B` is `Buf` for the op and a slice for the CPU reference.
pub struct Bwd<'a, B: ?Sized = Buf> {
    pub dx: &'a mut B,
    pub dw: &'a mut B,
    pub dy: &'a B,
    pub x: &'a B,
    pub w: &'a B,
    pub rstd: &'a B,
}

/// y [rows, cols], rstd [rows] (f32) = rmsnorm(x [rows, cols], w [cols]).
pub fn fwd(dev: &Device, bufs: Fwd, rows: usize, cols: usize, eps: f32) -> Result<()> {
    let Fwd { y, rstd, x, w } = bufs;
    let op = "rmsnorm_fwd";
    check(x, rows * cols, op, "x")?;
    check(y, rows * cols, op, "y")?;
    check(w, cols, op, "w")?;
    check(rstd, rows, op, "rstd")?;
    check_dtype(rstd, DType::F32, op, "rstd")?;
    match dev {
        Device::Cpu => {
            let (y, rstd, x, w) = (y.host_mut()?, rstd.host_mut()?, x.host()?, w.host()?);
            cpu::fwd(Fwd { y, rstd, x, w }, rows, cols, eps);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[y, x, w])?;
            api::rmsnorm::RmsnormFwd {
                y: y.ptr(g)?,
                rstd: rstd.ptr(g)?,
                x: x.ptr(g)?,
                w: w.ptr(g)?,
                rows: rows as i32,
                cols: cols as i32,
                eps,
            }
            .launch(g, dt, cfg_rows(rows, block_for(cols, dt), 0))
        }
    }
}

/// The kernel of an rmsnorm backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RmsNormBwdKernel {
    /// rmsnorm_bwd: one block per run of rows, x and dy read twice with scalar loads, dw partials
    /// in a fresh [blocks, cols] buffer; any row length and alignment.
    Rows,
    /// rmsnorm_bwd_vec16_vpt{vpt}: persistent blocks, each thread holding `vpt` 16-byte column vectors
    /// of a row in registers (one pass over x and dy), dw partials in a cached scratch. Rows of
    /// whole 16-byte vectors, at most 4 per thread (1024 vectors: 8192 bf16 / 4096 f32 columns),
    /// 16-byte aligned dx, dy, x, w.
    Vec16 { vpt: usize },
}

/// The backward kernel for `rows` rows of `cols` columns; `aligned`: dx, dy, x and w all 16-byte
/// aligned. Vec16 wherever it applies (0.1182 ms, 81.1 % of 4.2 TB/s against 24 % for Rows on the
/// H200, PERF.md round 3); Rows otherwise.
pub fn plan_bwd(dtype: DType, rows: usize, cols: usize, aligned: bool) -> RmsNormBwdKernel {
    match vec16_vpt(dtype, rows, cols) {
        Some(vpt) if aligned => RmsNormBwdKernel::Vec16 { vpt },
        _ => RmsNormBwdKernel::Rows,
    }
}

/// dx [rows, cols] (=), dw [cols] (f32, +=) from dy, x, w and the saved rstd.
pub fn bwd(dev: &Device, bufs: Bwd, rows: usize, cols: usize) -> Result<()> {
    let kernel = match dev {
        Device::Cpu => RmsNormBwdKernel::Rows,
        Device::Cuda(g) => plan_bwd(bufs.dx.dtype(), rows, cols, aligned16(g, &[&*bufs.dx, bufs.dy, bufs.x, bufs.w])?),
    };
    bwd_with(dev, kernel, bufs, rows, cols)
}

/// `bwd` with an explicit kernel (the bench and tests run each); an error when Vec16 cannot take
/// the call (row length, alignment, or a `vpt` other than the one the row needs). On the CPU the
/// kernel is ignored.
pub fn bwd_with(dev: &Device, kernel: RmsNormBwdKernel, bufs: Bwd, rows: usize, cols: usize) -> Result<()> {
    let Bwd { dx, dw, dy, x, w, rstd } = bufs;
    let op = "rmsnorm_bwd";
    for (b, n, a) in [
        (&*dx, rows * cols, "dx"),
        (dy, rows * cols, "dy"),
        (x, rows * cols, "x"),
        (w, cols, "w"),
        (rstd, rows, "rstd"),
        (&*dw, cols, "dw"),
    ] {
        check(b, n, op, a)?;
    }
    check_dtype(dw, DType::F32, op, "dw")?;
    match dev {
        Device::Cpu => {
            let (dx, dw) = (dx.host_mut()?, dw.host_mut()?);
            let (dy, x, w, rstd) = (dy.host()?, x.host()?, w.host()?, rstd.host()?);
            cpu::bwd(Bwd { dx, dw, dy, x, w, rstd }, rows, cols);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[dx, dy, x, w])?;
            if let RmsNormBwdKernel::Vec16 { vpt } = kernel {
                check_vec16(op, kernel, dt, rows, cols, vpt, aligned16(g, &[dx, dy, x, w])?)?;
                let plan = VecLaunch::new(g, rows, vpt, cols / (16 / dt.size()), 3);
                return bwd_vec16(g, &plan, Bwd { dx, dw, dy, x, w, rstd }, rows, cols);
            }
            // Enough blocks to fill the GPU; each owns a run of rows and writes one partial dw row.
            let nblocks = rows.clamp(1, 2 * g.sm_count as usize);
            let rpb = rows.div_ceil(nblocks).max(1);
            let nblocks = rows.div_ceil(rpb).max(1);
            let part = dev.zeros_f32(nblocks * cols)?;
            api::rmsnorm::RmsnormBwd {
                dx: dx.ptr(g)?,
                dw_part: part.ptr(g)?,
                dy: dy.ptr(g)?,
                x: x.ptr(g)?,
                w: w.ptr(g)?,
                rstd: rstd.ptr(g)?,
                rows: rows as i32,
                cols: cols as i32,
                rows_per_block: rpb as i32,
            }
            .launch(g, dt, cfg_rows(nblocks, block_for(cols, dt), 0))?;
            api::rmsnorm::RmsnormDwReduce {
                dw: dw.ptr(g)?,
                part: part.ptr(g)?,
                nparts: nblocks as i32,
                cols: cols as i32,
                accumulate: 1,
            }
            .launch(g, cfg_1d(cols, 256))
        }
    }
}

/// The 16-byte vectors per thread of the vector row kernels (rmsnorm_bwd, layernorm_fwd/bwd
/// Vec16) for a row of `cols` elements: None when they do not apply (rows not whole 16-byte
/// vectors, more than 4 vectors per thread, no rows or columns, rows past the 32-bit range).
pub(crate) fn vec16_vpt(dt: DType, rows: usize, cols: usize) -> Option<usize> {
    let n = 16 / dt.size();
    if rows == 0 || cols == 0 || !cols.is_multiple_of(n) || rows > i32::MAX as usize {
        return None;
    }
    let nvec = cols / n;
    [1usize, 2, 4].into_iter().find(|&v| nvec <= 256 * v)
}

/// An error for an explicit Vec16 kernel that cannot take the call.
pub(crate) fn check_vec16(
    op: &str, kernel: impl std::fmt::Debug, dt: DType, rows: usize, cols: usize, vpt: usize, aligned: bool,
) -> Result<()> {
    let want = vec16_vpt(dt, rows, cols);
    if !aligned || want != Some(vpt) {
        bail!(
            "{op}: kernel {kernel:?} needs rows of whole 16-byte vectors, at most 4 per thread, vpt = the row's \
             ({}), and 16-byte aligned buffers (got {} {rows} x {cols}, aligned = {aligned})",
            want.map_or("none".to_string(), |v| v.to_string()),
            dt.suffix()
        );
    }
    Ok(())
}

/// Every pointer 16-byte aligned (the 16-byte vector loads need it).
pub(crate) fn aligned16(g: &Gpu, bufs: &[&Buf]) -> Result<bool> {
    for b in bufs {
        if !b.ptr(g)?.is_multiple_of(16) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Launch shape of the Vec16 row kernels (rmsnorm_bwd, layernorm_fwd/bwd): persistent blocks
/// of `block` threads, each thread owning `vpt` 16-byte column vectors of every row it visits.
pub(crate) struct VecLaunch {
    pub vpt: usize,
    pub block: u32,
    pub nblocks: usize,
}

impl VecLaunch {
    /// For `rows` rows of `nvec` 16-byte vectors at `vpt` per thread (checked by the caller).
    /// `per_sm`: blocks resident per SM at the kernel's `__launch_bounds__` for vpt <= 2 (the
    /// grid is one wave of them); vpt = 4 kernels keep their registers at one block per SM.
    pub(crate) fn new(g: &Gpu, rows: usize, vpt: usize, nvec: usize, per_sm: usize) -> VecLaunch {
        let block = nvec.div_ceil(vpt).next_power_of_two().clamp(32, 256) as u32;
        let per_sm = if vpt <= 2 { per_sm.max(1) } else { 1 };
        let nblocks = rows.min(g.sm_count as usize * per_sm).max(1);
        VecLaunch { vpt, block, nblocks }
    }

    pub(crate) fn cfg(&self, smem: u32) -> LaunchConfig {
        cfg_rows(self.nblocks, self.block, smem)
    }
}

/// out0[j] += Σ_p part[p][j] for j < split, out1[j − split] += … for split ≤ j < ncols, summed in
/// a fixed order (deterministic). `part` is [nparts, ncols] f32 (kernel param_colsum_reduce).
pub(crate) fn colsum_reduce(
    g: &Gpu, out0: u64, out1: u64, part: u64, nparts: usize, ncols: usize, split: usize,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (ncols.div_ceil(32).max(1) as u32, 1, 1),
        block_dim: (32, 16, 1),
        shared_mem_bytes: 0,
    };
    api::rmsnorm::ParamColsumReduce {
        out0,
        out1,
        part,
        nparts: nparts as i32,
        ncols: ncols as i32,
        split: split as i32,
    }
    .launch(g, cfg)
}

/// Vec16 backward: one pass over x and dy (rows held in registers), dw partials in a cached scratch.
fn bwd_vec16(g: &Gpu, plan: &VecLaunch, bufs: Bwd, rows: usize, cols: usize) -> Result<()> {
    let Bwd { dx, dw, dy, x, w, rstd } = bufs;
    let dt = dx.dtype();
    let part = g.scratch_f32(plan.nblocks * cols)?; // [nblocks, cols]
    let pp = dptr(&*part, &g.stream);
    let a = api::rmsnorm::RmsnormBwdVec16 {
        dx: dx.ptr(g)?,
        part: pp,
        dy: dy.ptr(g)?,
        x: x.ptr(g)?,
        w: w.ptr(g)?,
        rstd: rstd.ptr(g)?,
        rows: rows as i32,
        cols: cols as i32,
    };
    a.launch(g, plan.vpt as u32, dt, plan.cfg(0))?;
    let dwp = dw.ptr(g)?;
    colsum_reduce(g, dwp, dwp, pp, plan.nblocks, cols, cols)
}

/// Threads per row: enough 16-byte lanes to cover the row once, within [32, 1024].
fn block_for(cols: usize, dt: DType) -> u32 {
    let lanes = cols.div_ceil(16 / dt.size());
    (lanes.next_power_of_two().clamp(32, 1024)) as u32
}

pub mod cpu {
    use super::{Bwd, Fwd};
    use crate::real::Real;

    pub fn fwd<R: Real>(bufs: Fwd<[R]>, rows: usize, cols: usize, eps: f32) {
        let Fwd { y, rstd, x, w } = bufs;
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

    pub fn bwd<R: Real>(bufs: Bwd<[R]>, rows: usize, cols: usize) {
        let Bwd { dx, dw, dy, x, w, rstd } = bufs;
        for (r, &rs) in rstd.iter().enumerate().take(rows) {
            let o = r * cols;
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

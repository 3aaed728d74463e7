//! Elementwise ops on flat buffers: bias add and its column-sum backward, residual adds, scaling,
//! fill, f32 ↔ bf16 casts (round to nearest even) and element-range copies. Kernels:
//! kernels/elementwise.cu. `cfg_stream` is the grid shape of every streaming kernel (act, adamw too).

use super::{check, check_dtype, same_float_dtype};
use crate::cuda::api;
use crate::cuda::{cfg_1d, Gpu};
use crate::tensor::{Buf, DType, Device};
use anyhow::{anyhow, bail, Result};
use cudarc::driver::LaunchConfig;

/// Threads per block of the streaming kernels.
pub const BLOCK: u32 = 256;
/// Elements per thread per loop trip (the kernels' 8-element vectors).
pub const PER_THREAD: usize = 8;

/// Grid-stride launch over `n` elements: enough blocks to cover n once, capped at one full wave
/// (8 blocks of 256 threads per SM); the kernels loop over the rest.
pub fn cfg_stream(g: &Gpu, n: usize) -> LaunchConfig {
    let want = n.div_ceil(PER_THREAD * BLOCK as usize).max(1);
    let cap = (g.sm_count as usize * 8).max(1);
    LaunchConfig { grid_dim: (want.min(cap) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// As `cfg_stream`, with the grid capped at `per_sm` blocks per SM: for the V2 kernels whose
/// registers allow fewer than 8 resident blocks, so the grid is one full wave, not one and a bit.
pub fn cfg_stream_per_sm(g: &Gpu, n: usize, per_sm: usize) -> LaunchConfig {
    let mut c = cfg_stream(g, n);
    c.grid_dim.0 = c.grid_dim.0.min((g.sm_count as usize * per_sm).max(1) as u32);
    c
}

/// A size that a kernel takes as `int`; an error, not a wrap-around, when it does not fit.
pub fn i32_arg(x: usize, op: &str, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| anyhow!("{op}: {what} = {x} exceeds the kernel's 32-bit range"))
}

/// rows · cols without silent overflow.
pub fn numel(rows: usize, cols: usize, op: &str) -> Result<usize> {
    rows.checked_mul(cols).ok_or_else(|| anyhow!("{op}: {rows} x {cols} overflows"))
}

/// y [rows, cols] += b [cols] (in place).
pub fn bias_add(dev: &Device, y: &mut Buf, b: &Buf, rows: usize, cols: usize) -> Result<()> {
    let op = "bias_add";
    let n = numel(rows, cols, op)?;
    check(y, n, op, "y")?;
    check(b, cols, op, "b")?;
    match dev {
        Device::Cpu => {
            cpu::bias_add(y.host_mut()?, b.host()?, rows, cols);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[y, b])?;
            if n == 0 {
                return Ok(());
            }
            api::elementwise::BiasAdd { y: y.ptr(g)?, b: b.ptr(g)?, n: n as i64, cols: i32_arg(cols, op, "cols")? }
                .launch(g, dt, cfg_stream(g, n))
        }
    }
}

/// The kernel of a bias gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasBwdKernel {
    /// bias_bwd: 32-column tiles × row chunks, one element per thread per row, partials in a
    /// fresh [chunks, cols] buffer; any row length and alignment.
    Scalar,
    /// bias_bwd_vec16: 32 16-byte column vectors per block, 4 rows in flight per thread, partials in
    /// a cached scratch. Rows of whole 16-byte vectors, dy 16-byte aligned.
    Vec16,
}

/// The bias-gradient kernel for rows of `cols` columns; `aligned`: dy 16-byte aligned. Vec16
/// wherever it applies (0.0411 ms, 77.9 % of 4.2 TB/s against 58 % for Scalar on the H200,
/// PERF.md round 3); Scalar otherwise.
pub fn plan_bias_bwd(dtype: DType, cols: usize, aligned: bool) -> BiasBwdKernel {
    if aligned && cols.is_multiple_of(16 / dtype.size()) {
        BiasBwdKernel::Vec16
    } else {
        BiasBwdKernel::Scalar
    }
}

/// db [cols] (f32, +=) += column sums of dy [rows, cols]. On the GPU: per-chunk partial sums,
/// then an in-order reduction over chunks, so the result is deterministic.
pub fn bias_bwd(dev: &Device, db: &mut Buf, dy: &Buf, rows: usize, cols: usize) -> Result<()> {
    let kernel = match dev {
        Device::Cpu => BiasBwdKernel::Scalar,
        Device::Cuda(g) => plan_bias_bwd(dy.dtype(), cols, dy.ptr(g)?.is_multiple_of(16)),
    };
    bias_bwd_with(dev, kernel, db, dy, rows, cols)
}

/// `bias_bwd` with an explicit kernel (the bench and tests run each); an error when Vec16 cannot
/// take the call (rows not whole 16-byte vectors, dy misaligned). On the CPU the kernel is ignored.
pub fn bias_bwd_with(
    dev: &Device, kernel: BiasBwdKernel, db: &mut Buf, dy: &Buf, rows: usize, cols: usize,
) -> Result<()> {
    let op = "bias_bwd";
    check(dy, numel(rows, cols, op)?, op, "dy")?;
    check(db, cols, op, "db")?;
    check_dtype(db, DType::F32, op, "db")?;
    match dev {
        Device::Cpu => {
            cpu::bias_bwd(db.host_mut()?, dy.host()?, rows, cols);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[dy])?;
            if rows == 0 || cols == 0 {
                return Ok(());
            }
            if kernel == BiasBwdKernel::Vec16 {
                let aligned = dy.ptr(g)?.is_multiple_of(16);
                if !aligned || !cols.is_multiple_of(16 / dt.size()) {
                    bail!(
                        "{op}: kernel Vec16 needs rows of whole 16-byte vectors and a 16-byte aligned dy (got {} cols = {cols}, aligned = {aligned})",
                        dt.suffix()
                    );
                }
                return bias_bwd_vec16(g, db, dy, rows, cols, dt);
            }
            // Column tiles of 32 × row chunks: about one wave of 256-thread blocks, and each
            // chunk at least 8 rows (one per row lane) so the partial buffer stays small.
            let tiles = cols.div_ceil(32);
            let target = g.sm_count as usize * 8;
            let chunks = (target / tiles).clamp(1, rows.div_ceil(8).clamp(1, 65535));
            let rpc = rows.div_ceil(chunks);
            let chunks = rows.div_ceil(rpc);
            let part = dev.zeros_f32(chunks * cols)?; // [chunks, cols]
            let cfg = LaunchConfig {
                grid_dim: (
                    u32::try_from(tiles).map_err(|_| anyhow!("{op}: cols = {cols} too large"))?,
                    chunks as u32,
                    1,
                ),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            api::elementwise::BiasBwd {
                part: part.ptr(g)?,
                dy: dy.ptr(g)?,
                rows: i32_arg(rows, op, "rows")?,
                cols: i32_arg(cols, op, "cols")?,
                rpc: i32_arg(rpc, op, "rows per chunk")?,
            }
            .launch(g, dt, cfg)?;
            api::elementwise::BiasBwdReduce {
                db: db.ptr(g)?,
                part: part.ptr(g)?,
                nparts: i32_arg(chunks, op, "chunks")?,
                cols: i32_arg(cols, op, "cols")?,
            }
            .launch(g, cfg_1d(cols, 256))
        }
    }
}

/// Vec16 bias gradient: 16-byte loads of dy, 4 rows in flight per thread, partials in the cached
/// scratch [chunks, cols], then the fixed-order column reduction shared with the norms.
fn bias_bwd_vec16(g: &Gpu, db: &mut Buf, dy: &Buf, rows: usize, cols: usize, dt: DType) -> Result<()> {
    let op = "bias_bwd";
    let tiles = (cols / (16 / dt.size())).div_ceil(32); // 32 column vectors per block
                                                        // About one wave of 256-thread blocks (6 per SM at the kernel's 38 registers), each chunk at
                                                        // least 32 rows (4 per row lane).
    let target = g.sm_count as usize * 6;
    let chunks = (target / tiles).clamp(1, rows.div_ceil(32).clamp(1, 65535));
    let rpc = rows.div_ceil(chunks);
    let chunks = rows.div_ceil(rpc);
    let part = g.scratch_f32(chunks * cols)?; // [chunks, cols]
    let pp = crate::cuda::dptr(&*part, &g.stream);
    let cfg = LaunchConfig {
        grid_dim: (u32::try_from(tiles).map_err(|_| anyhow!("{op}: cols = {cols} too large"))?, chunks as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    api::elementwise::BiasBwdVec16 {
        part: pp,
        dy: dy.ptr(g)?,
        rows: i32_arg(rows, op, "rows")?,
        cols: i32_arg(cols, op, "cols")?,
        rpc: i32_arg(rpc, op, "rows per chunk")?,
    }
    .launch(g, dt, cfg)?;
    let dbp = db.ptr(g)?;
    super::rmsnorm::colsum_reduce(g, dbp, dbp, pp, chunks, cols, cols)
}

/// y += x (the residual stream).
pub fn add_inplace(dev: &Device, y: &mut Buf, x: &Buf, n: usize) -> Result<()> {
    let op = "add_inplace";
    check(y, n, op, "y")?;
    check(x, n, op, "x")?;
    match dev {
        Device::Cpu => {
            for (a, b) in y.host_mut()?.iter_mut().zip(x.host()?) {
                *a += *b;
            }
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[y, x])?;
            if n == 0 {
                return Ok(());
            }
            api::elementwise::AddInplace { y: y.ptr(g)?, x: x.ptr(g)?, n: n as i64 }.launch(g, dt, cfg_stream(g, n))
        }
    }
}

/// out = a + b.
pub fn add_into(dev: &Device, out: &mut Buf, a: &Buf, b: &Buf, n: usize) -> Result<()> {
    let op = "add_into";
    check(out, n, op, "out")?;
    check(a, n, op, "a")?;
    check(b, n, op, "b")?;
    match dev {
        Device::Cpu => {
            for ((o, x), y) in out.host_mut()?.iter_mut().zip(a.host()?).zip(b.host()?) {
                *o = *x + *y;
            }
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[out, a, b])?;
            if n == 0 {
                return Ok(());
            }
            api::elementwise::AddInto { out: out.ptr(g)?, a: a.ptr(g)?, b: b.ptr(g)?, n: n as i64 }.launch(
                g,
                dt,
                cfg_stream(g, n),
            )
        }
    }
}

/// y *= s.
pub fn scale_inplace(dev: &Device, y: &mut Buf, s: f32, n: usize) -> Result<()> {
    let op = "scale_inplace";
    check(y, n, op, "y")?;
    match dev {
        Device::Cpu => {
            for a in y.host_mut()? {
                *a *= s;
            }
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[y])?;
            if n == 0 {
                return Ok(());
            }
            api::elementwise::ScaleInplace { y: y.ptr(g)?, s, n: n as i64 }.launch(g, dt, cfg_stream(g, n))
        }
    }
}

/// y[..] = value (fill with 0.0 to zero a gradient buffer).
pub fn fill(dev: &Device, y: &mut Buf, value: f32, n: usize) -> Result<()> {
    let op = "fill";
    check(y, n, op, "y")?;
    match dev {
        Device::Cpu => {
            y.host_mut()?.fill(value);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[y])?;
            if n == 0 {
                return Ok(());
            }
            api::elementwise::Fill { y: y.ptr(g)?, v: value, n: n as i64 }.launch(g, dt, cfg_stream(g, n))
        }
    }
}

/// dst = src converted to dst's dtype: f32 → bf16 rounds to nearest even (as PyTorch), bf16 → f32
/// is exact, and equal dtypes copy. On the CPU every float buffer is f32, so this is a copy.
pub fn cast(dev: &Device, dst: &mut Buf, src: &Buf, n: usize) -> Result<()> {
    let op = "cast";
    check(dst, n, op, "dst")?;
    check(src, n, op, "src")?;
    for (b, a) in [(&*dst, "dst"), (src, "src")] {
        if b.dtype() == DType::I32 {
            bail!("{op}: {a} is i32; cast converts between float dtypes only");
        }
    }
    match dev {
        Device::Cpu => {
            dst.host_mut()?.copy_from_slice(src.host()?);
            Ok(())
        }
        Device::Cuda(g) => {
            let (d, s, n64) = (dst.ptr(g)?, src.ptr(g)?, n as i64);
            match (src.dtype(), dst.dtype()) {
                (DType::F32, DType::BF16) if n > 0 => {
                    api::elementwise::CastF32Bf16 { dst: d, src: s, n: n64 }.launch(g, cfg_stream(g, n))
                }
                // bf16 -> f32: one vector per thread, streaming stores (PERF.md: cast).
                (DType::BF16, DType::F32) if n > 0 => {
                    api::elementwise::CastBf16F32 { dst: d, src: s, n: n64 }.launch(g, cfg_one_shot(n))
                }
                (DType::F32, DType::BF16) | (DType::BF16, DType::F32) => Ok(()),
                _ => dtod(g, dst, 0, src, 0, n), // same dtype: a copy
            }
        }
    }
}

/// One thread per 8 elements, no grid-stride loop (the bf16 -> f32 cast).
fn cfg_one_shot(n: usize) -> LaunchConfig {
    let blocks = (n / 8).div_ceil(BLOCK as usize).max(1);
    LaunchConfig {
        grid_dim: (blocks.min(i32::MAX as usize) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The write-only reference for the cast's bandwidth: dst[..n] = v (f32, streaming stores, the
/// bf16 -> f32 cast's grid). Bench use.
pub fn fill_f32_streaming(dev: &Device, dst: &mut Buf, v: f32, n: usize) -> Result<()> {
    check(dst, n, "fill_f32_streaming", "dst")?;
    check_dtype(dst, DType::F32, "fill_f32_streaming", "dst")?;
    match dev {
        Device::Cpu => {
            dst.host_mut()?[..n].fill(v);
            Ok(())
        }
        Device::Cuda(g) => {
            let cfg = cfg_one_shot(2 * n); // n/4 threads
            api::elementwise::FillF32Cs { dst: dst.ptr(g)?, v, n: n as i64 }.launch(g, cfg)
        }
    }
}

/// dst[dst_off .. dst_off + n] = src[src_off .. src_off + n] (same dtype; i32 too).
pub fn copy_rows(dev: &Device, dst: &mut Buf, dst_off: usize, src: &Buf, src_off: usize, n: usize) -> Result<()> {
    let op = "copy_rows";
    for (b, off, what) in [(&*dst, dst_off, "dst"), (src, src_off, "src")] {
        match off.checked_add(n) {
            Some(end) if end <= b.len() => {}
            _ => bail!("{op}: {what} range {off}..{off}+{n} exceeds its {} elements", b.len()),
        }
    }
    if dst.dtype() != src.dtype() {
        bail!("{op}: dst is {} but src is {} (use cast)", dst.dtype().suffix(), src.dtype().suffix());
    }
    match dev {
        Device::Cpu => {
            if dst.dtype() == DType::I32 {
                dst.host_i32_mut()?[dst_off..dst_off + n].copy_from_slice(&src.host_i32()?[src_off..src_off + n]);
            } else {
                dst.host_mut()?[dst_off..dst_off + n].copy_from_slice(&src.host()?[src_off..src_off + n]);
            }
            Ok(())
        }
        Device::Cuda(g) => dtod(g, dst, dst_off, src, src_off, n),
    }
}

/// Device-to-device copy of n elements on the stream (caller checked ranges and dtypes).
fn dtod(g: &Gpu, dst: &mut Buf, dst_off: usize, src: &Buf, src_off: usize, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let (d, s) = (dst.ptr_at(g, dst_off)?, src.ptr_at(g, src_off)?);
    // SAFETY: both ranges were checked to lie inside live device buffers of the same dtype, and
    // `dst` is borrowed mutably, so the two ranges cannot overlap.
    unsafe { cudarc::driver::result::memcpy_dtod_async(d, s, n * src.dtype().size(), g.stream.cu_stream()) }
        .map_err(|e| anyhow!("device-to-device copy of {n} elements: {e}"))
}

pub mod cpu {
    use crate::real::Real;

    /// y [rows, cols] += b [cols].
    pub fn bias_add<R: Real>(y: &mut [R], b: &[R], rows: usize, cols: usize) {
        for r in 0..rows {
            for c in 0..cols {
                y[r * cols + c] += b[c];
            }
        }
    }

    /// db [cols] += Σ_r dy [r, cols].
    pub fn bias_bwd<R: Real>(db: &mut [R], dy: &[R], rows: usize, cols: usize) {
        for r in 0..rows {
            for c in 0..cols {
                db[c] += dy[r * cols + c];
            }
        }
    }
}

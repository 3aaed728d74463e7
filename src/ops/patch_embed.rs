//! The Qwen2.5-VL vision patch embedding: Conv3d(3→D, kernel = stride = (2, 14, 14), no bias).
//! Because stride = kernel, it is a GEMM over flattened patches: `y = x[perm] · Wᵀ` with
//! x [patches, 3·2·14·14] (the processor's (c, t, py, px) row order, f32) and W [D, 1176].
//! `perm` fuses the vision tower's window reordering into the same pass: output row i is patch
//! `perm[i]`. On CUDA a gather kernel (kernels/patch_embed.cu) builds the window-ordered operand in
//! the GEMM dtype, then cuBLAS multiplies; backward regathers and accumulates dW (f32, +=).
//! Pixels are not trainable, so there is no dx.
//! Also the row moves that carry vision rows around (window order ↔ image order ↔ the
//! `<|image_pad|>` positions of the text): `gather_rows`, `scatter_rows` and `take_rows`.

use super::{check, check_dtype, same_float_dtype};
use crate::cuda::api;
use crate::cuda::blas::{Gemm, GemmType};
use crate::cuda::{cfg_rows, Gpu};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};

/// A validated row index list: entry i names a row of a buffer with `bound` rows. Entries are
/// distinct (a permutation, or the `<|image_pad|>` positions), kept on the host and the device.
pub struct RowIndex {
    pub host: Vec<i32>, // [n]
    pub dev: Buf,       // [n] i32
    pub bound: usize,
}

impl RowIndex {
    pub fn new(dev: &Device, idx: &[usize], bound: usize) -> Result<Self> {
        let mut seen = vec![false; bound];
        let mut host = Vec::with_capacity(idx.len());
        for (i, &p) in idx.iter().enumerate() {
            if p >= bound {
                bail!("row index: entry {i} = {p} is out of range for {bound} rows");
            }
            if std::mem::replace(&mut seen[p], true) {
                bail!("row index: row {p} is named twice (entry {i})");
            }
            host.push(p as i32);
        }
        Ok(Self { dev: dev.upload_i32(&host)?, host, bound })
    }
    /// An index for `gather_rows` only, where a row may be read more than once.
    pub fn with_repeats(dev: &Device, idx: &[usize], bound: usize) -> Result<Self> {
        if let Some((i, &p)) = idx.iter().enumerate().find(|(_, &p)| p >= bound) {
            bail!("row index: entry {i} = {p} is out of range for {bound} rows");
        }
        let host: Vec<i32> = idx.iter().map(|&p| p as i32).collect();
        Ok(Self { dev: dev.upload_i32(&host)?, host, bound })
    }
    pub fn len(&self) -> usize {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
}

/// The sizes of a patch embedding: n patches (output rows) of k pixel values each, embedded in d.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub k: usize,
    pub d: usize,
}

/// y [n, d] = x[perm] · wᵀ, with x [n_src, k] f32 pixel rows (n_src = n without perm), w [d, k].
pub fn fwd(dev: &Device, y: &mut Buf, x: &Buf, w: &Buf, perm: Option<&RowIndex>, dims: Dims) -> Result<()> {
    let Dims { n, k, d } = dims;
    let op = "patch_embed_fwd";
    let n_src = check_inputs(op, x, perm, n, k)?;
    check(y, n * d, op, "y")?;
    check(w, d * k, op, "w")?;
    match dev {
        Device::Cpu => {
            cpu::fwd(y.host_mut()?, x.host()?, w.host()?, perm.map(|p| p.host.as_slice()), dims);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[y, w])?;
            let xg = gather(dev, g, x, perm, n_src, dims, dt)?;
            g.blas.gemm(&Gemm {
                m: n,
                n: d,
                k,
                trans_a: false,
                trans_b: true,
                alpha: 1.0,
                beta: 0.0,
                a: xg.ptr(g)?,
                b: w.ptr(g)?,
                c: y.ptr(g)?,
                ab_type: gemm_type(dt),
                c_type: gemm_type(dt),
                batch: (1, 0, 0, 0),
            })
        }
    }
}

/// dw [d, k] (f32, +=) = dyᵀ · x[perm], dy [n, d].
pub fn bwd(dev: &Device, dw: &mut Buf, dy: &Buf, x: &Buf, perm: Option<&RowIndex>, dims: Dims) -> Result<()> {
    let Dims { n, k, d } = dims;
    let op = "patch_embed_bwd";
    let n_src = check_inputs(op, x, perm, n, k)?;
    check(dy, n * d, op, "dy")?;
    check(dw, d * k, op, "dw")?;
    check_dtype(dw, DType::F32, op, "dw")?;
    match dev {
        Device::Cpu => {
            cpu::bwd(dw.host_mut()?, dy.host()?, x.host()?, perm.map(|p| p.host.as_slice()), dims);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = dy.dtype();
            if dt == DType::I32 {
                bail!("{op}: dy must be a float buffer");
            }
            let xg = gather(dev, g, x, perm, n_src, dims, dt)?;
            g.blas.gemm(&Gemm {
                m: d,
                n: k,
                k: n,
                trans_a: true,
                trans_b: false,
                alpha: 1.0,
                beta: 1.0,
                a: dy.ptr(g)?,
                b: xg.ptr(g)?,
                c: dw.ptr(g)?,
                ab_type: gemm_type(dt),
                c_type: GemmType::F32,
                batch: (1, 0, 0, 0),
            })
        }
    }
}

/// Checks x (f32 [n_src, k]) and perm (n long); returns n_src.
fn check_inputs(op: &str, x: &Buf, perm: Option<&RowIndex>, n: usize, k: usize) -> Result<usize> {
    check_dtype(x, DType::F32, op, "x")?;
    let n_src = match perm {
        Some(p) => {
            if p.len() != n {
                bail!("{op}: perm has {} entries, expected {n}", p.len());
            }
            p.bound
        }
        None => n,
    };
    check(x, n_src * k, op, "x")?;
    Ok(n_src)
}

fn gemm_type(dt: DType) -> GemmType {
    if dt == DType::BF16 {
        GemmType::Bf16
    } else {
        GemmType::F32
    }
}

/// The window-ordered GEMM operand [n, k] in `dt`, from x [n_src, k].
fn gather(dev: &Device, g: &Gpu, x: &Buf, perm: Option<&RowIndex>, n_src: usize, dims: Dims, dt: DType) -> Result<Buf> {
    let Dims { n, k, .. } = dims;
    let out = dev.zeros(dt, n * k)?;
    let pptr = match perm {
        Some(p) => p.dev.ptr(g)?,
        None => 0,
    };
    api::patch_embed::PatchEmbedGather {
        out: out.ptr(g)?,
        x: x.ptr(g)?,
        perm: pptr,
        n: n as i32,
        n_src: n_src as i32,
        k: k as i32,
    }
    .launch(g, dt, cfg_rows(n, 256, 0))?;
    Ok(out)
}

/// out [n, cols] (=) = x [idx.bound, cols] rows at idx.
pub fn gather_rows(dev: &Device, out: &mut Buf, x: &Buf, idx: &RowIndex, cols: usize) -> Result<()> {
    let op = "gather_rows";
    check(out, idx.len() * cols, op, "out")?;
    check(x, idx.bound * cols, op, "x")?;
    match dev {
        Device::Cpu => {
            let (o, x) = (out.host_mut()?, x.host()?);
            for (i, &r) in idx.host.iter().enumerate() {
                o[i * cols..][..cols].copy_from_slice(&x[r as usize * cols..][..cols]);
            }
            Ok(())
        }
        Device::Cuda(g) => rows_launch(g, "rows_gather", out, x, idx, cols, Some(0)),
    }
}

/// As `gather_rows`, then zeroes the gathered rows of x: the backward of `scatter_rows`, which
/// overwrote those rows (their earlier values get no gradient).
pub fn take_rows(dev: &Device, out: &mut Buf, x: &mut Buf, idx: &RowIndex, cols: usize) -> Result<()> {
    let op = "take_rows";
    check(out, idx.len() * cols, op, "out")?;
    check(x, idx.bound * cols, op, "x")?;
    match dev {
        Device::Cpu => {
            let (o, x) = (out.host_mut()?, x.host_mut()?);
            for (i, &r) in idx.host.iter().enumerate() {
                let src = &mut x[r as usize * cols..][..cols];
                o[i * cols..][..cols].copy_from_slice(src);
                src.fill(0.0);
            }
            Ok(())
        }
        Device::Cuda(g) => rows_launch(g, "rows_gather", out, x, idx, cols, Some(1)),
    }
}

/// out [idx.bound, cols] rows at idx (=) x [n, cols]; the other rows of out are kept.
pub fn scatter_rows(dev: &Device, out: &mut Buf, x: &Buf, idx: &RowIndex, cols: usize) -> Result<()> {
    let op = "scatter_rows";
    check(out, idx.bound * cols, op, "out")?;
    check(x, idx.len() * cols, op, "x")?;
    match dev {
        Device::Cpu => {
            let (o, x) = (out.host_mut()?, x.host()?);
            for (i, &r) in idx.host.iter().enumerate() {
                o[r as usize * cols..][..cols].copy_from_slice(&x[i * cols..][..cols]);
            }
            Ok(())
        }
        Device::Cuda(g) => rows_launch(g, "rows_scatter", out, x, idx, cols, None),
    }
}

/// Launches rows_gather (`zero_src` Some) or rows_scatter (None): one block per moved row.
fn rows_launch(
    g: &Gpu, base: &str, out: &Buf, x: &Buf, idx: &RowIndex, cols: usize, zero_src: Option<i32>,
) -> Result<()> {
    let dt = same_float_dtype(base, &[out, x])?;
    if idx.is_empty() || cols == 0 {
        return Ok(());
    }
    let (o, xp, ip) = (out.ptr(g)?, x.ptr(g)?, idx.dev.ptr(g)?);
    let (n, bound, cols) = (idx.len() as i32, idx.bound as i32, cols as i32);
    let cfg = cfg_rows(idx.len(), 128, 0);
    match zero_src {
        Some(zero_src) => {
            api::patch_embed::RowsGather { out: o, x: xp, idx: ip, n, n_src: bound, cols, zero_src }.launch(g, dt, cfg)
        }
        None => api::patch_embed::RowsScatter { out: o, x: xp, idx: ip, n, n_out: bound, cols }.launch(g, dt, cfg),
    }
}

pub mod cpu {
    use super::Dims;
    use crate::real::Real;

    fn src(perm: Option<&[i32]>, i: usize) -> usize {
        perm.map_or(i, |p| p[i] as usize)
    }

    /// y [n, d] = x[perm] [n, k] · w [d, k]ᵀ.
    pub fn fwd<R: Real>(y: &mut [R], x: &[R], w: &[R], perm: Option<&[i32]>, dims: Dims) {
        let Dims { n, k, d } = dims;
        for i in 0..n {
            let xr = &x[src(perm, i) * k..][..k];
            for o in 0..d {
                let wr = &w[o * k..][..k];
                y[i * d + o] = xr.iter().zip(wr).fold(R::ZERO, |a, (&p, &q)| a + p * q);
            }
        }
    }

    /// dw [d, k] += dy [n, d]ᵀ · x[perm] [n, k].
    pub fn bwd<R: Real>(dw: &mut [R], dy: &[R], x: &[R], perm: Option<&[i32]>, dims: Dims) {
        let Dims { n, k, d } = dims;
        for i in 0..n {
            let xr = &x[src(perm, i) * k..][..k];
            for o in 0..d {
                let g = dy[i * d + o];
                for (a, &p) in dw[o * k..][..k].iter_mut().zip(xr) {
                    *a += g * p;
                }
            }
        }
    }
}

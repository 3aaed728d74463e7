//! The LoRA branch of a linear layer (low-rank adaptation, PEFT layout): with A [r, din] and
//! B [dout, r], `y += scale·(x·Aᵀ)·Bᵀ` where scale = alpha / r. The base product y = x·Wᵀ (+b)
//! is `matmul::linear_fwd`'s; this op only adds the branch, and its backward adds the branch's
//! share of dx (+=, like the forward's y +=) and accumulates dA, dB (f32, +=).
//!
//! No kernel of its own: on CUDA both directions are cuBLAS GEMMs through `ops::matmul` (the
//! rank is small, so the branch costs about 2·r/din of the base GEMM). The intermediate
//! u = x·Aᵀ [t, r] is recomputed in the backward rather than kept: it costs one thin GEMM and
//! keeps the block's saved activations unchanged. On CUDA u (and dy·B) are held in the
//! activation dtype, as PEFT's bf16 forward does. The CPU runs the generic reference below.

use super::matmul::{self, Linear, Mm};
use super::{check, check_dtype, same_float_dtype};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};

/// One adapter: A [rank, din], B [dout, rank] (the model's dtype) and scale = alpha / rank.
/// `B` is `Buf` for the op and a slice for the CPU reference.
pub struct Adapter<'a, B: ?Sized = Buf> {
    pub a: &'a B,
    pub b: &'a B,
    pub rank: usize,
    pub scale: f32,
}

impl<B: ?Sized> Clone for Adapter<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: ?Sized> Copy for Adapter<'_, B> {}

/// The gradients a backward adds to, each skipped when None: dx [t, din] (+=), dA [r, din] and
/// dB [dout, r] (f32, +=). `B` is `Buf` for the op and a slice for the CPU reference.
pub struct Grads<'a, B: ?Sized = Buf> {
    pub dx: Option<&'a mut B>,
    pub da: Option<&'a mut B>,
    pub db: Option<&'a mut B>,
}

fn check_adapter(op: &str, ad: &Adapter, din: usize, dout: usize) -> Result<()> {
    if ad.rank == 0 {
        bail!("{op}: rank must be positive");
    }
    check(ad.a, ad.rank * din, op, "a")?;
    check(ad.b, dout * ad.rank, op, "b")
}

/// y [t, dout] += scale·(x [t, din]·Aᵀ)·Bᵀ.
pub fn fwd(dev: &Device, y: &mut Buf, x: &Buf, ad: &Adapter, dims: Linear) -> Result<()> {
    let Linear { t, din, dout } = dims;
    let op = "lora_fwd";
    check_adapter(op, ad, din, dout)?;
    check(x, t * din, op, "x")?;
    check(y, t * dout, op, "y")?;
    let r = ad.rank;
    match dev {
        Device::Cpu => {
            let slices = Adapter { a: ad.a.host()?, b: ad.b.host()?, rank: r, scale: ad.scale };
            cpu::fwd(y.host_mut()?, x.host()?, slices, dims);
            Ok(())
        }
        Device::Cuda(_) => {
            let dt = same_float_dtype(op, &[y, x, ad.a, ad.b])?;
            if t == 0 {
                return Ok(());
            }
            let mut u = dev.zeros(dt, t * r)?; // [t, r]
            matmul::fwd(dev, &mut u, x, ad.a, Mm::new(t, r, din).trans_b())?;
            matmul::fwd(dev, y, &u, ad.b, Mm::new(t, dout, r).trans_b().alpha(ad.scale).beta(1.0))
        }
    }
}

/// Backward of `fwd` from dy [t, dout]: dx [t, din] += scale·(dy·B)·A (when given);
/// dA [r, din] (f32, +=) = scale·(dy·B)ᵀ·x; dB [dout, r] (f32, +=) = scale·dyᵀ·(x·Aᵀ).
/// A frozen adapter passes `da`/`db` as None and still contributes to dx.
pub fn bwd(dev: &Device, grads: Grads, dy: &Buf, x: &Buf, ad: &Adapter, dims: Linear) -> Result<()> {
    let (Grads { dx, da, db }, Linear { t, din, dout }) = (grads, dims);
    let op = "lora_bwd";
    check_adapter(op, ad, din, dout)?;
    let r = ad.rank;
    check(x, t * din, op, "x")?;
    check(dy, t * dout, op, "dy")?;
    if let Some(dx) = dx.as_deref() {
        check(dx, t * din, op, "dx")?;
    }
    if let Some(da) = da.as_deref() {
        check(da, r * din, op, "da")?;
        check_dtype(da, DType::F32, op, "da")?;
    }
    if let Some(db) = db.as_deref() {
        check(db, dout * r, op, "db")?;
        check_dtype(db, DType::F32, op, "db")?;
    }
    match dev {
        Device::Cpu => {
            let dx = match dx {
                Some(b) => Some(b.host_mut()?),
                None => None,
            };
            let da = match da {
                Some(b) => Some(b.host_mut()?),
                None => None,
            };
            let db = match db {
                Some(b) => Some(b.host_mut()?),
                None => None,
            };
            let slices = Adapter { a: ad.a.host()?, b: ad.b.host()?, rank: r, scale: ad.scale };
            cpu::bwd(Grads { dx, da, db }, dy.host()?, x.host()?, slices, dims);
            Ok(())
        }
        Device::Cuda(_) => {
            let dt = same_float_dtype(op, &[dy, x, ad.a, ad.b])?;
            if let Some(dx) = dx.as_deref() {
                same_float_dtype(op, &[dx, x])?;
            }
            if t == 0 {
                return Ok(());
            }
            if let Some(db) = db {
                let mut u = dev.zeros(dt, t * r)?; // [t, r] = x·Aᵀ
                matmul::fwd(dev, &mut u, x, ad.a, Mm::new(t, r, din).trans_b())?;
                matmul::fwd(dev, db, dy, &u, Mm::new(dout, r, t).trans_a().alpha(ad.scale).beta(1.0))?;
            }
            if dx.is_none() && da.is_none() {
                return Ok(());
            }
            let mut v = dev.zeros(dt, t * r)?; // [t, r] = dy·B
            matmul::fwd(dev, &mut v, dy, ad.b, Mm::new(t, r, dout))?;
            if let Some(da) = da {
                matmul::fwd(dev, da, &v, x, Mm::new(r, din, t).trans_a().alpha(ad.scale).beta(1.0))?;
            }
            if let Some(dx) = dx {
                matmul::fwd(dev, dx, &v, ad.a, Mm::new(t, din, r).alpha(ad.scale).beta(1.0))?;
            }
            Ok(())
        }
    }
}

pub mod cpu {
    use super::{Adapter, Grads};
    use crate::ops::matmul::Linear;
    use crate::real::Real;

    /// u = x_i·Aᵀ for one row (length r).
    fn project<R: Real>(u: &mut [R], xi: &[R], a: &[R], din: usize) {
        for (k, uk) in u.iter_mut().enumerate() {
            let ak = &a[k * din..(k + 1) * din];
            *uk = xi.iter().zip(ak).fold(R::ZERO, |s, (&p, &q)| s + p * q);
        }
    }

    pub fn fwd<R: Real>(y: &mut [R], x: &[R], ad: Adapter<[R]>, dims: Linear) {
        let (Adapter { a, b, rank: r, scale }, Linear { t, din, dout }) = (ad, dims);
        let s = R::from_f64(scale as f64);
        let mut u = vec![R::ZERO; r];
        for i in 0..t {
            project(&mut u, &x[i * din..(i + 1) * din], a, din);
            for o in 0..dout {
                let bo = &b[o * r..(o + 1) * r];
                let d = u.iter().zip(bo).fold(R::ZERO, |acc, (&p, &q)| acc + p * q);
                y[i * dout + o] += s * d;
            }
        }
    }

    pub fn bwd<R: Real>(grads: Grads<[R]>, dy: &[R], x: &[R], ad: Adapter<[R]>, dims: Linear) {
        let Grads { mut dx, mut da, mut db } = grads;
        let (Adapter { a, b, rank: r, scale }, Linear { t, din, dout }) = (ad, dims);
        let s = R::from_f64(scale as f64);
        let (mut u, mut v) = (vec![R::ZERO; r], vec![R::ZERO; r]);
        for i in 0..t {
            let (xi, dyi) = (&x[i * din..(i + 1) * din], &dy[i * dout..(i + 1) * dout]);
            // v = dy_i·B [r]
            v.iter_mut().for_each(|e| *e = R::ZERO);
            for (o, &g) in dyi.iter().enumerate() {
                for k in 0..r {
                    v[k] += g * b[o * r + k];
                }
            }
            if let Some(db) = db.as_deref_mut() {
                project(&mut u, xi, a, din);
                for (o, &g) in dyi.iter().enumerate() {
                    for k in 0..r {
                        db[o * r + k] += s * g * u[k];
                    }
                }
            }
            if let Some(da) = da.as_deref_mut() {
                for k in 0..r {
                    let vk = s * v[k];
                    for j in 0..din {
                        da[k * din + j] += vk * xi[j];
                    }
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                let dxi = &mut dx[i * din..(i + 1) * din];
                for k in 0..r {
                    let vk = s * v[k];
                    let ak = &a[k * din..(k + 1) * din];
                    for j in 0..din {
                        dxi[j] += vk * ak[j];
                    }
                }
            }
        }
    }
}

//! Matrix products. CUDA: cuBLAS with f32 accumulation (src/cuda/blas.rs). CPU: a blocked,
//! multi-threaded f32 GEMM written as row·row dot products so the inner loop vectorises.
//!
//! `fwd`: C[m,n] = alpha·op(A)[m,k]·op(B)[k,n] + beta·C, row-major. C may be f32 while A and B
//! are bf16 (weight gradients accumulate in f32 with beta = 1).
//! `linear_fwd` / `linear_bwd`: y = x·Wᵀ + b with W [out, in] (PyTorch layout).

use super::{check, check_dtype, elementwise};
use crate::cuda::blas::{Gemm, GemmType};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};

fn gemm_type(d: DType, what: &str) -> Result<GemmType> {
    match d {
        DType::BF16 => Ok(GemmType::Bf16),
        DType::F32 => Ok(GemmType::F32),
        DType::I32 => bail!("matmul: {what} is an i32 buffer"),
    }
}

/// The shape and scalars of C [m, n] = alpha·op(A) [m, k]·op(B) [k, n] + beta·C; `trans_a`: A is
/// stored [k, m], `trans_b`: B is stored [n, k].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

impl Mm {
    /// C [m, n] = A [m, k]·B [k, n]: no transposes, alpha = 1, beta = 0.
    pub fn new(m: usize, n: usize, k: usize) -> Mm {
        Mm { m, n, k, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }
    }

    /// A stored transposed ([k, m]).
    pub fn trans_a(self) -> Mm {
        Mm { trans_a: true, ..self }
    }

    /// B stored transposed ([n, k]).
    pub fn trans_b(self) -> Mm {
        Mm { trans_b: true, ..self }
    }

    pub fn alpha(self, alpha: f32) -> Mm {
        Mm { alpha, ..self }
    }

    /// beta = 1 accumulates into C.
    pub fn beta(self, beta: f32) -> Mm {
        Mm { beta, ..self }
    }
}

/// The sizes of a linear layer: x [t, din], W [dout, din], y [t, dout].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    pub t: usize,
    pub din: usize,
    pub dout: usize,
}

/// The gradients a linear backward writes: dx [t, din] (=, skipped when None), dw [dout, din]
/// (+=), db [dout] (f32, +=, skipped when None).
pub struct LinearGrads<'a> {
    pub dx: Option<&'a mut Buf>,
    pub dw: &'a mut Buf,
    pub db: Option<&'a mut Buf>,
}

/// C = alpha·op(A)·op(B) + beta·C (row-major; see the module doc).
pub fn fwd(dev: &Device, c: &mut Buf, a: &Buf, b: &Buf, mm: Mm) -> Result<()> {
    batched(dev, c, a, b, mm, 1)
}

/// `count` independent products over consecutive [m,k]/[k,n]/[m,n] blocks of a, b and c.
pub fn batched(dev: &Device, c: &mut Buf, a: &Buf, b: &Buf, mm: Mm, count: usize) -> Result<()> {
    let Mm { m, n, k, trans_a, trans_b, alpha, beta } = mm;
    let op = "matmul";
    check(a, count * m * k, op, "a")?;
    check(b, count * k * n, op, "b")?;
    check(c, count * m * n, op, "c")?;
    match dev {
        Device::Cpu => {
            let (a, b, c) = (a.host()?, b.host()?, c.host_mut()?);
            for i in 0..count {
                cpu::gemm(
                    &mut c[i * m * n..(i + 1) * m * n],
                    &a[i * m * k..(i + 1) * m * k],
                    &b[i * k * n..(i + 1) * k * n],
                    mm,
                );
            }
            Ok(())
        }
        Device::Cuda(g) => {
            let ab = gemm_type(a.dtype(), "a")?;
            if b.dtype() != a.dtype() {
                bail!("matmul: a is {} but b is {}", a.dtype().suffix(), b.dtype().suffix());
            }
            let ct = gemm_type(c.dtype(), "c")?;
            if ab == GemmType::F32 && ct == GemmType::Bf16 {
                bail!("matmul: f32 operands cannot write a bf16 output");
            }
            g.blas.gemm(&Gemm {
                m,
                n,
                k,
                trans_a,
                trans_b,
                alpha,
                beta,
                a: a.ptr(g)?,
                b: b.ptr(g)?,
                c: c.ptr(g)?,
                ab_type: ab,
                c_type: ct,
                batch: (count, m * k, k * n, m * n),
            })
        }
    }
}

/// y [t, dout] = x [t, din] · w[dout, din]ᵀ (+ bias [dout]).
pub fn linear_fwd(dev: &Device, y: &mut Buf, x: &Buf, w: &Buf, bias: Option<&Buf>, dims: Linear) -> Result<()> {
    let Linear { t, din, dout } = dims;
    fwd(dev, y, x, w, Mm::new(t, dout, din).trans_b())?;
    if let Some(b) = bias {
        elementwise::bias_add(dev, y, b, t, dout)?;
    }
    Ok(())
}

/// dx [t, din] (=) = dy·w; dw [dout, din] (+=) = dyᵀ·x; db [dout] (f32, +=) = Σ_t dy.
/// dw is f32, or bf16 on CUDA (`GradStore::Bf16Linear`: cuBLAS reads the bf16 dw, adds the
/// product in f32 and rounds once).
pub fn linear_bwd(dev: &Device, grads: LinearGrads, dy: &Buf, x: &Buf, w: &Buf, dims: Linear) -> Result<()> {
    let (LinearGrads { dx, dw, db }, Linear { t, din, dout }) = (grads, dims);
    if !(dw.dtype() == DType::F32 || (dw.dtype() == DType::BF16 && dy.dtype() == DType::BF16)) {
        check_dtype(dw, DType::F32, "linear_bwd", "dw")?;
    }
    if let Some(dx) = dx {
        fwd(dev, dx, dy, w, Mm::new(t, din, dout))?;
    }
    fwd(dev, dw, dy, x, Mm::new(dout, din, t).trans_a().beta(1.0))?;
    if let Some(db) = db {
        elementwise::bias_bwd(dev, db, dy, t, dout)?;
    }
    Ok(())
}

pub mod cpu {
    use super::Mm;

    /// C = alpha·op(A)·op(B) + beta·C in f32. Operands are first brought to the "A rows · B rows"
    /// form ([m,k] and [n,k]) so every output is a dot product of two contiguous rows.
    pub fn gemm(c: &mut [f32], a: &[f32], b: &[f32], mm: Mm) {
        let Mm { m, n, k, trans_a, trans_b, alpha, beta } = mm;
        let at;
        let a_rows: &[f32] = if trans_a {
            at = transpose(a, k, m);
            &at
        } else {
            a
        };
        let bt;
        let b_rows: &[f32] = if trans_b {
            b
        } else {
            bt = transpose(b, k, n);
            &bt
        };
        let threads =
            if m * n * k > 1 << 16 { std::thread::available_parallelism().map_or(1, |p| p.get()).min(8) } else { 1 };
        let rows_per = m.div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for (ti, cchunk) in c.chunks_mut(rows_per * n).enumerate() {
                let r0 = ti * rows_per;
                s.spawn(move || {
                    let rows = cchunk.len() / n.max(1);
                    // Block over B rows so a block of B stays in cache across the A rows.
                    const JB: usize = 64;
                    for j0 in (0..n).step_by(JB) {
                        let j1 = (j0 + JB).min(n);
                        for i in 0..rows {
                            let ar = &a_rows[(r0 + i) * k..(r0 + i + 1) * k];
                            for j in j0..j1 {
                                let br = &b_rows[j * k..(j + 1) * k];
                                let d = dot(ar, br);
                                let o = &mut cchunk[i * n + j];
                                *o = if beta == 0.0 { alpha * d } else { alpha * d + beta * *o };
                            }
                        }
                    }
                });
            }
        });
    }

    /// Dot product with 8 independent accumulators (vectorises; deterministic order).
    #[inline]
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let chunks = a.len() / 8;
        for c in 0..chunks {
            let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s = 0f32;
        for i in chunks * 8..a.len() {
            s += a[i] * b[i];
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s
    }

    /// [r, c] row-major → [c, r].
    pub fn transpose(x: &[f32], r: usize, c: usize) -> Vec<f32> {
        let mut t = vec![0f32; r * c];
        const B: usize = 32;
        for i0 in (0..r).step_by(B) {
            for j0 in (0..c).step_by(B) {
                for i in i0..(i0 + B).min(r) {
                    for j in j0..(j0 + B).min(c) {
                        t[j * r + i] = x[i * c + j];
                    }
                }
            }
        }
        t
    }
}

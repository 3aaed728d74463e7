//! Fused AdamW step with f32 master weights (torch.optim.AdamW semantics: decoupled weight decay,
//! bias-corrected moments), plus the sum of squares behind global-norm gradient clipping.
//! Kernel: kernels/adamw.cu. Zeroing a gradient buffer is `elementwise::fill(.., 0.0, ..)`.

use super::elementwise::cfg_stream;
use super::{check, check_dtype, same_float_dtype};
use crate::cuda::api;
use crate::cuda::dptr;
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    /// PyTorch's defaults.
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// Step-dependent scalars, computed in f64 as PyTorch does in Python.
#[derive(Clone, Copy, Debug)]
pub struct StepScalars {
    /// 1 − lr·wd.
    pub decay: f64,
    /// lr / (1 − β1^t).
    pub step_size: f64,
    /// √(1 − β2^t).
    pub sqrt_bc2: f64,
}

impl AdamW {
    pub fn scalars(&self, step: u64) -> Result<StepScalars> {
        if step == 0 {
            bail!("adamw step: step is 1-based (bias correction divides by 1 - beta1^step)");
        }
        let t = step.min(i32::MAX as u64) as i32;
        let (lr, b1, b2) = (self.lr as f64, self.beta1 as f64, self.beta2 as f64);
        Ok(StepScalars {
            decay: 1.0 - lr * self.weight_decay as f64,
            step_size: lr / (1.0 - b1.powi(t)),
            sqrt_bc2: (1.0 - b2.powi(t)).sqrt(),
        })
    }
}

/// The buffers of one AdamW step: the parameter, its f32 master copy, its gradient and the f32
/// moments m, v. `B` is `Buf` for the op and a slice for the CPU reference.
pub struct Bufs<'a, B: ?Sized = Buf> {
    pub param: &'a mut B,
    pub master: &'a mut B,
    pub grad: &'a B,
    pub m: &'a mut B,
    pub v: &'a mut B,
}

/// One AdamW step on n parameters. grad (f32, or bf16 on CUDA) is multiplied by `grad_scale` first (clipping and
/// accumulation averaging); master, m, v (f32) are updated in place, and `param` (bf16 on the GPU,
/// or f32; f32 on the CPU) receives the new master rounded to its dtype. `step` is 1-based.
pub fn step(dev: &Device, bufs: Bufs, n: usize, hp: &AdamW, step: u64, grad_scale: f32) -> Result<()> {
    let Bufs { param, master, grad, m, v } = bufs;
    let op = "adamw_step";
    for (b, a) in [(&*param, "param"), (&*master, "master"), (grad, "grad"), (&*m, "m"), (&*v, "v")] {
        check(b, n, op, a)?;
    }
    for (b, a) in [(&*master, "master"), (&*m, "m"), (&*v, "v")] {
        check_dtype(b, DType::F32, op, a)?;
    }
    // bf16 gradients (GradStore::Bf16Linear) only exist on the GPU.
    let grad_bf16 = grad.dtype() == DType::BF16 && matches!(dev, Device::Cuda(_));
    if !grad_bf16 {
        check_dtype(grad, DType::F32, op, "grad")?;
    }
    let sc = hp.scalars(step)?;
    match dev {
        Device::Cpu => {
            let hp64 = Hp64::new(hp, &sc, grad_scale);
            let (param, master, grad) = (param.host_mut()?, master.host_mut()?, grad.host()?);
            cpu::step(Bufs { param, master, grad, m: m.host_mut()?, v: v.host_mut()? }, &hp64);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[param])?;
            if n == 0 {
                return Ok(());
            }
            let cfg = cfg_stream(g, n);
            let a = api::adamw::AdamwStep {
                param: param.ptr(g)?,
                master: master.ptr(g)?,
                grad: grad.ptr(g)?,
                m: m.ptr(g)?,
                v: v.ptr(g)?,
                n: n as i64,
                b1: hp.beta1,
                b2: hp.beta2,
                eps: hp.eps,
                decay: sc.decay as f32,
                step_size: sc.step_size as f32,
                sqrt_bc2: sc.sqrt_bc2 as f32,
                grad_scale,
            };
            if grad_bf16 {
                // The same parameters, with the gradient read as bf16.
                return api::adamw::AdamwStepG16::from(a).launch(g, dt, cfg);
            }
            a.launch(g, dt, cfg)
        }
    }
}

/// Σ x² over n elements, in f64 (for the global gradient norm). Deterministic: on the GPU each
/// block writes a double partial and the host sums them in order.
pub fn sum_squares(dev: &Device, x: &Buf, n: usize) -> Result<f64> {
    let op = "sum_squares";
    check(x, n, op, "x")?;
    match dev {
        Device::Cpu => Ok(cpu::sum_squares(x.host()?)),
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[x])?;
            if n == 0 {
                return Ok(0.0);
            }
            let cfg = cfg_stream(g, n);
            let nblocks = cfg.grid_dim.0 as usize;
            // Two vectors per thread per trip; the f64 partials [nblocks] live in the cached
            // f32 scratch (two words each, 256-byte aligned), and only they are downloaded.
            let part = g.scratch_f32(2 * nblocks)?;
            api::adamw::SumSquares { part: dptr(&*part, &g.stream), x: x.ptr(g)?, n: n as i64 }.launch(g, dt, cfg)?;
            let mut words = vec![0f32; 2 * nblocks];
            g.stream.memcpy_dtoh(&part.slice(0..2 * nblocks), &mut words)?;
            g.sync()?;
            // Little-endian: the low word of each f64 comes first.
            let sum = words
                .chunks_exact(2)
                .map(|w| f64::from_bits(w[0].to_bits() as u64 | (w[1].to_bits() as u64) << 32))
                .sum();
            Ok(sum)
        }
    }
}

/// The hyper-parameters as the CPU reference takes them (any `Real`).
#[derive(Clone, Copy, Debug)]
pub struct Hp64 {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub decay: f64,
    pub step_size: f64,
    pub sqrt_bc2: f64,
    pub grad_scale: f64,
}

impl Hp64 {
    pub fn new(hp: &AdamW, sc: &StepScalars, grad_scale: f32) -> Hp64 {
        Hp64 {
            beta1: hp.beta1 as f64,
            beta2: hp.beta2 as f64,
            eps: hp.eps as f64,
            decay: sc.decay,
            step_size: sc.step_size,
            sqrt_bc2: sc.sqrt_bc2,
            grad_scale: grad_scale as f64,
        }
    }
}

pub mod cpu {
    use super::{Bufs, Hp64};
    use crate::real::Real;

    /// The kernel's arithmetic, in `R`: decay, moments (m by lerp as torch), bias-corrected update.
    pub fn step<R: Real>(bufs: Bufs<[R]>, hp: &Hp64) {
        let Bufs { param, master, grad, m, v } = bufs;
        let f = R::from_f64;
        let (b1, b2, eps, decay, step_size, sqrt_bc2, gs) =
            (f(hp.beta1), f(hp.beta2), f(hp.eps), f(hp.decay), f(hp.step_size), f(hp.sqrt_bc2), f(hp.grad_scale));
        for i in 0..master.len() {
            let g = grad[i] * gs;
            let mut p = master[i] * decay;
            m[i] += (R::ONE - b1) * (g - m[i]);
            v[i] = b2 * v[i] + (R::ONE - b2) * g * g;
            let denom = v[i].sqrt() / sqrt_bc2 + eps;
            p -= step_size * (m[i] / denom);
            master[i] = p;
            param[i] = p;
        }
    }

    pub fn sum_squares(x: &[f32]) -> f64 {
        x.iter().map(|&v| v as f64 * v as f64).sum()
    }
}

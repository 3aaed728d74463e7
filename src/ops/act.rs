//! Activations: SwiGLU (out = silu(gate) · up, the gated MLP of Qwen2 / Llama and the Qwen2.5-VL
//! vision tower) and the GELU family of the vision towers and projectors, forward and backward.
//! Both are pure elementwise maps, so backward needs only the forward's inputs.
//! Kernel: kernels/act.cu.

use super::elementwise::{cfg_stream, cfg_stream_per_sm};
use super::{check, same_float_dtype};
use crate::cuda::api;
use crate::tensor::{Buf, Device};
use anyhow::{bail, Result};

/// The GELU variants found in HF configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): gelu_pytorch_tanh, gelu_new, gelu_fast.
    Tanh,
    /// 0.5·x·(1 + erf(x/√2)): nn.GELU() (HF "gelu").
    Erf,
    /// x·sigmoid(1.702·x): CLIP's quick_gelu.
    Quick,
}

impl Gelu {
    /// Maps an HF `hidden_act` / `projector_hidden_act` string to a GELU.
    pub fn from_hf(name: &str) -> Result<Gelu> {
        Ok(match name.trim().to_ascii_lowercase().as_str() {
            "gelu" | "gelu_python" => Gelu::Erf,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "gelu_accurate" => Gelu::Tanh,
            "quick_gelu" => Gelu::Quick,
            "silu" | "swish" => bail!("hidden_act {name:?} is a gated (SwiGLU) MLP: use act::swiglu_fwd, not a GELU"),
            _ => bail!(
                "unsupported hidden_act {name:?} (known: gelu, gelu_python, gelu_pytorch_tanh, gelu_new, gelu_fast, gelu_accurate, quick_gelu; silu via swiglu)"
            ),
        })
    }

    /// The kernel's `kind` argument (see kernels/act.cu).
    fn code(self) -> i32 {
        match self {
            Gelu::Tanh => 0,
            Gelu::Erf => 1,
            Gelu::Quick => 2,
        }
    }
}

/// out [n] = silu(gate) · up.
pub fn swiglu_fwd(dev: &Device, out: &mut Buf, gate: &Buf, up: &Buf, n: usize) -> Result<()> {
    let op = "swiglu_fwd";
    check(out, n, op, "out")?;
    check(gate, n, op, "gate")?;
    check(up, n, op, "up")?;
    match dev {
        Device::Cpu => {
            cpu::swiglu_fwd(out.host_mut()?, gate.host()?, up.host()?);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[out, gate, up])?;
            if n == 0 {
                return Ok(());
            }
            api::act::SwigluFwd { out: out.ptr(g)?, gate: gate.ptr(g)?, up: up.ptr(g)?, n: n as i64 }.launch(
                g,
                dt,
                cfg_stream(g, n),
            )
        }
    }
}

/// dgate, dup [n] (=) from dout and the forward's gate and up.
pub fn swiglu_bwd(
    dev: &Device, dgate: &mut Buf, dup: &mut Buf, dout: &Buf, gate: &Buf, up: &Buf, n: usize,
) -> Result<()> {
    let op = "swiglu_bwd";
    for (b, a) in [(&*dgate, "dgate"), (&*dup, "dup"), (dout, "dout"), (gate, "gate"), (up, "up")] {
        check(b, n, op, a)?;
    }
    match dev {
        Device::Cpu => {
            cpu::swiglu_bwd(dgate.host_mut()?, dup.host_mut()?, dout.host()?, gate.host()?, up.host()?);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[dgate, dup, dout, gate, up])?;
            if n == 0 {
                return Ok(());
            }
            api::act::SwigluBwd {
                dgate: dgate.ptr(g)?,
                dup: dup.ptr(g)?,
                dout: dout.ptr(g)?,
                gate: gate.ptr(g)?,
                up: up.ptr(g)?,
                n: n as i64,
            }
            .launch(g, dt, cfg_stream(g, n))
        }
    }
}

/// out [n] = gelu(x).
pub fn gelu_fwd(dev: &Device, out: &mut Buf, x: &Buf, n: usize, kind: Gelu) -> Result<()> {
    let op = "gelu_fwd";
    check(out, n, op, "out")?;
    check(x, n, op, "x")?;
    match dev {
        Device::Cpu => {
            cpu::gelu_fwd(out.host_mut()?, x.host()?, kind);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[out, x])?;
            if n == 0 {
                return Ok(());
            }
            // Two vectors per thread per trip, A&S erf for bf16; __launch_bounds__(256, 6).
            api::act::GeluFwd { out: out.ptr(g)?, x: x.ptr(g)?, n: n as i64, kind: kind.code() }.launch(
                g,
                dt,
                cfg_stream_per_sm(g, n, 6),
            )
        }
    }
}

/// dx [n] (=) = dout · gelu'(x).
pub fn gelu_bwd(dev: &Device, dx: &mut Buf, dout: &Buf, x: &Buf, n: usize, kind: Gelu) -> Result<()> {
    let op = "gelu_bwd";
    check(dx, n, op, "dx")?;
    check(dout, n, op, "dout")?;
    check(x, n, op, "x")?;
    match dev {
        Device::Cpu => {
            cpu::gelu_bwd(dx.host_mut()?, dout.host()?, x.host()?, kind);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[dx, dout, x])?;
            if n == 0 {
                return Ok(());
            }
            api::act::GeluBwd { dx: dx.ptr(g)?, dout: dout.ptr(g)?, x: x.ptr(g)?, n: n as i64, kind: kind.code() }
                .launch(g, dt, cfg_stream(g, n))
        }
    }
}

pub mod cpu {
    use super::Gelu;
    use crate::real::Real;

    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    const GELU_C: f64 = 0.044715;
    const QUICK_A: f64 = 1.702;

    fn sigmoid<R: Real>(x: R) -> R {
        R::ONE / (R::ONE + (-x).exp())
    }

    pub fn swiglu_fwd<R: Real>(out: &mut [R], gate: &[R], up: &[R]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }

    pub fn swiglu_bwd<R: Real>(dgate: &mut [R], dup: &mut [R], dout: &[R], gate: &[R], up: &[R]) {
        for i in 0..dout.len() {
            let (d, g, u) = (dout[i], gate[i], up[i]);
            let s = sigmoid(g);
            dup[i] = d * g * s;
            dgate[i] = d * u * s * (R::ONE + g * (R::ONE - s));
        }
    }

    pub fn gelu<R: Real>(x: R, kind: Gelu) -> R {
        let half = R::from_f64(0.5);
        match kind {
            Gelu::Tanh => {
                let k = R::from_f64(SQRT_2_OVER_PI);
                half * x * (R::ONE + (k * (x + R::from_f64(GELU_C) * x * x * x)).tanh())
            }
            Gelu::Erf => half * x * (R::ONE + (x * R::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf()),
            Gelu::Quick => x * sigmoid(R::from_f64(QUICK_A) * x),
        }
    }

    /// d gelu(x) / dx.
    pub fn gelu_grad<R: Real>(x: R, kind: Gelu) -> R {
        let half = R::from_f64(0.5);
        match kind {
            Gelu::Tanh => {
                let (k, c) = (R::from_f64(SQRT_2_OVER_PI), R::from_f64(GELU_C));
                let x2 = x * x;
                let t = (k * x * (R::ONE + c * x2)).tanh();
                half * (R::ONE + t) + half * x * (R::ONE - t * t) * k * (R::ONE + R::from_f64(3.0) * c * x2)
            }
            Gelu::Erf => {
                let inv_sqrt_2pi = R::from_f64(0.398_942_280_401_432_7);
                half * (R::ONE + (x * R::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf())
                    + x * inv_sqrt_2pi * (-half * x * x).exp()
            }
            Gelu::Quick => {
                let a = R::from_f64(QUICK_A);
                let s = sigmoid(a * x);
                s + a * x * s * (R::ONE - s)
            }
        }
    }

    pub fn gelu_fwd<R: Real>(out: &mut [R], x: &[R], kind: Gelu) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = gelu(v, kind);
        }
    }

    pub fn gelu_bwd<R: Real>(dx: &mut [R], dout: &[R], x: &[R], kind: Gelu) {
        for i in 0..x.len() {
            dx[i] = dout[i] * gelu_grad(x[i], kind);
        }
    }
}

//! Counter-based random initialisation (kernels/init.cu): value i of a tensor is a function of
//! (seed, i) alone, the same on the GPU and the CPU (up to float rounding), and independent of
//! how the work is split. Used to build large random models (benches) without host traffic.

use super::elementwise::cfg_stream;
use super::same_float_dtype;
use crate::cuda::api;
use crate::tensor::{Buf, Device};
use anyhow::Result;

/// Fills `x` [n] with N(mean, std²) samples.
pub fn normal(dev: &Device, x: &mut Buf, n: usize, seed: u64, mean: f32, std: f32) -> Result<()> {
    super::check(x, n, "init_normal", "x")?;
    match dev {
        Device::Cpu => {
            cpu::normal(x.host_mut()?, seed, mean, std);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype("init_normal", &[x])?;
            api::init::InitNormal { out: x.ptr(g)?, n: n as i64, seed, mean, std }.launch(g, dt, cfg_stream(g, n))
        }
    }
}

pub mod cpu {
    fn mix64(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The same samples as the kernel (computed in f64 here, f32 there).
    pub fn value(seed: u64, i: usize) -> f64 {
        let h = mix64(seed.wrapping_add(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1)));
        let u1 = ((h >> 40) as f64 + 1.0) / 16_777_217.0;
        let u2 = ((h >> 16) & 0xFF_FFFF) as f64 / 16_777_216.0;
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn normal(x: &mut [f32], seed: u64, mean: f32, std: f32) {
        for (i, v) in x.iter_mut().enumerate() {
            *v = (mean as f64 + std as f64 * value(seed, i)) as f32;
        }
    }
}

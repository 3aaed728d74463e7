//! `Device` (CPU or one CUDA GPU) and `Buf`, a flat typed buffer on it.
//!
//! There are no strides and no autograd: every op takes contiguous buffers plus explicit shapes
//! (llm.c style). The CPU computes in f32, so on the CPU a "bf16" buffer is stored as f32; on the
//! GPU activations and weights are bf16 and statistics, parameter gradients and master weights f32.

use crate::cuda::{dptr, Gpu};
use anyhow::{bail, Result};
use cudarc::driver::CudaSlice;
use half::bf16;
use std::sync::{Arc, Once};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 => 2,
        }
    }
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        }
    }
}

#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<Gpu>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DevicePref {
    /// CUDA when a GPU is present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

static FALLBACK_NOTE: Once = Once::new();

impl Device {
    pub fn pick(pref: DevicePref) -> Result<Device> {
        match pref {
            DevicePref::Cpu => Ok(Device::Cpu),
            DevicePref::Cuda => match Gpu::open()? {
                Some(g) => Ok(Device::Cuda(g)),
                None => bail!("--device cuda was asked for, but no CUDA driver or device was found"),
            },
            DevicePref::Auto => match Gpu::open() {
                Ok(Some(g)) => Ok(Device::Cuda(g)),
                Ok(None) => {
                    FALLBACK_NOTE.call_once(|| eprintln!("am3: no CUDA device found; using the CPU backend"));
                    Ok(Device::Cpu)
                }
                Err(e) => {
                    FALLBACK_NOTE.call_once(|| eprintln!("am3: CUDA unusable ({e:#}); using the CPU backend"));
                    Ok(Device::Cpu)
                }
            },
        }
    }

    /// The GPU if one is present (for tests, which skip without one).
    pub fn cuda_if_present() -> Option<Device> {
        match Gpu::open() {
            Ok(Some(g)) => Some(Device::Cuda(g)),
            _ => None,
        }
    }

    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(g) => format!("cuda ({})", g.name),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        match self {
            Device::Cuda(g) => Some(g),
            Device::Cpu => None,
        }
    }

    /// The dtype of activations and weights on this device.
    pub fn act_dtype(&self) -> DType {
        match self {
            Device::Cpu => DType::F32,
            Device::Cuda(_) => DType::BF16,
        }
    }

    pub fn zeros(&self, dtype: DType, n: usize) -> Result<Buf> {
        Ok(match (self, dtype) {
            (Device::Cpu, DType::F32 | DType::BF16) => Buf::HostF32(vec![0.0; n]),
            (Device::Cpu, DType::I32) => Buf::HostI32(vec![0; n]),
            (Device::Cuda(g), DType::F32) => Buf::DevF32(g.alloc::<f32>(n)?, n),
            (Device::Cuda(g), DType::BF16) => Buf::DevBf16(g.alloc::<bf16>(n)?, n),
            (Device::Cuda(g), DType::I32) => Buf::DevI32(g.alloc::<i32>(n)?, n),
        })
    }

    pub fn zeros_act(&self, n: usize) -> Result<Buf> {
        self.zeros(self.act_dtype(), n)
    }

    pub fn zeros_f32(&self, n: usize) -> Result<Buf> {
        self.zeros(DType::F32, n)
    }

    /// Uploads f32 host data as `dtype` (bf16 rounds to nearest even).
    pub fn upload(&self, v: &[f32], dtype: DType) -> Result<Buf> {
        Ok(match (self, dtype) {
            (Device::Cpu, DType::F32) => Buf::HostF32(v.to_vec()),
            // The CPU backend computes in f32: its "bf16" buffers are f32.
            (Device::Cpu, DType::BF16) => Buf::HostF32(v.to_vec()),
            (Device::Cuda(g), DType::F32) => Buf::DevF32(g.upload(v)?, v.len()),
            (Device::Cuda(g), DType::BF16) => {
                let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
                Buf::DevBf16(g.upload(&h)?, v.len())
            }
            (_, DType::I32) => bail!("upload: use upload_i32 for integer data"),
        })
    }

    pub fn upload_act(&self, v: &[f32]) -> Result<Buf> {
        self.upload(v, self.act_dtype())
    }

    pub fn upload_i32(&self, v: &[i32]) -> Result<Buf> {
        Ok(match self {
            Device::Cpu => Buf::HostI32(v.to_vec()),
            Device::Cuda(g) => Buf::DevI32(g.upload(v)?, v.len()),
        })
    }

    /// Copies any float buffer back as f32.
    pub fn to_vec(&self, b: &Buf) -> Result<Vec<f32>> {
        Ok(match (self, b) {
            (_, Buf::HostF32(v)) => v.clone(),
            (Device::Cuda(g), Buf::DevF32(s, n)) => g.download(s, *n)?,
            (Device::Cuda(g), Buf::DevBf16(s, n)) => g.download(s, *n)?.into_iter().map(|x| x.to_f32()).collect(),
            _ => bail!("to_vec: {} buffer is not a float buffer on {}", b.dtype().suffix(), self.name()),
        })
    }

    pub fn to_vec_i32(&self, b: &Buf) -> Result<Vec<i32>> {
        Ok(match (self, b) {
            (_, Buf::HostI32(v)) => v.clone(),
            (Device::Cuda(g), Buf::DevI32(s, n)) => g.download(s, *n)?,
            _ => bail!("to_vec_i32: {} buffer is not an i32 buffer", b.dtype().suffix()),
        })
    }

    pub fn sync(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(g) => g.sync(),
        }
    }
}

/// A flat buffer. Device variants carry their logical length (allocations are at least 1 long).
pub enum Buf {
    HostF32(Vec<f32>),
    HostI32(Vec<i32>),
    DevF32(CudaSlice<f32>, usize),
    DevBf16(CudaSlice<bf16>, usize),
    DevI32(CudaSlice<i32>, usize),
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({}, {})", self.dtype().suffix(), self.len())
    }
}

impl Buf {
    pub fn len(&self) -> usize {
        match self {
            Buf::HostF32(v) => v.len(),
            Buf::HostI32(v) => v.len(),
            Buf::DevF32(_, n) | Buf::DevBf16(_, n) | Buf::DevI32(_, n) => *n,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            Buf::HostF32(_) | Buf::DevF32(..) => DType::F32,
            Buf::DevBf16(..) => DType::BF16,
            Buf::HostI32(_) | Buf::DevI32(..) => DType::I32,
        }
    }
    pub fn is_host(&self) -> bool {
        matches!(self, Buf::HostF32(_) | Buf::HostI32(_))
    }

    /// Checks the length; `what` names the tensor in the error.
    pub fn expect_len(&self, n: usize, what: &str) -> Result<&Self> {
        if self.len() != n {
            bail!("{what}: expected {n} elements, got {}", self.len());
        }
        Ok(self)
    }

    pub fn host(&self) -> Result<&[f32]> {
        match self {
            Buf::HostF32(v) => Ok(v),
            _ => bail!("expected a host f32 buffer, got {:?}", self),
        }
    }
    pub fn host_mut(&mut self) -> Result<&mut [f32]> {
        match self {
            Buf::HostF32(v) => Ok(v),
            other => bail!("expected a host f32 buffer, got {:?}", other),
        }
    }
    pub fn host_i32(&self) -> Result<&[i32]> {
        match self {
            Buf::HostI32(v) => Ok(v),
            _ => bail!("expected a host i32 buffer, got {:?}", self),
        }
    }
    pub fn host_i32_mut(&mut self) -> Result<&mut [i32]> {
        match self {
            Buf::HostI32(v) => Ok(v),
            other => bail!("expected a host i32 buffer, got {:?}", other),
        }
    }

    /// Raw device address (plus an element offset) for kernel arguments.
    pub fn ptr(&self, gpu: &Gpu) -> Result<u64> {
        self.ptr_at(gpu, 0)
    }
    pub fn ptr_at(&self, gpu: &Gpu, offset: usize) -> Result<u64> {
        if offset > self.len() {
            bail!("offset {offset} past the end of {:?}", self);
        }
        let s = &gpu.stream;
        Ok(match self {
            Buf::DevF32(d, _) => dptr(d, s) + (offset * 4) as u64,
            Buf::DevBf16(d, _) => dptr(d, s) + (offset * 2) as u64,
            Buf::DevI32(d, _) => dptr(d, s) + (offset * 4) as u64,
            _ => bail!("expected a device buffer, got {:?}", self),
        })
    }
}

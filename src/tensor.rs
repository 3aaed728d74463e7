//! `Device` (CPU or one CUDA GPU) and `Buf`, a flat typed buffer on it.
//!
//! There are no strides and no autograd: every op takes contiguous buffers plus explicit shapes
//! (llm.c style). The CPU computes in f32, so on the CPU a "bf16" buffer is stored as f32; on the
//! GPU activations and weights are bf16 and statistics, parameter gradients and master weights f32.
//!
//! Allocation never aborts: host buffers are allocated fallibly (an absurd size is an error
//! naming the bytes and the memory available), device ones through `Gpu::alloc`.

use crate::cuda::{dptr, Gpu};
use anyhow::{anyhow, bail, Result};
use cudarc::driver::CudaSlice;
use half::bf16;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

/// Buffers allocated through `Device` (zeros and uploads), on either device, since the start of
/// the process: the rollout engine's decode step must leave it unchanged (tests/rollout_alloc.rs).
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// The process-wide count of `Device` buffer allocations so far.
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

fn count_allocation() {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
}

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

    /// Memory free for new buffers and where the number comes from: on the CPU MemAvailable
    /// (or the cgroup's limit, when lower), on a GPU the driver's free memory. None if unknown.
    pub fn available_memory(&self) -> Option<(u64, &'static str)> {
        match self {
            Device::Cpu => host_available(),
            Device::Cuda(g) => match g.mem_info() {
                (_, 0) => None,
                (free, _) => Some((free as u64, "free GPU memory")),
            },
        }
    }

    pub fn zeros(&self, dtype: DType, n: usize) -> Result<Buf> {
        count_allocation();
        Ok(match (self, dtype) {
            (Device::Cpu, DType::F32 | DType::BF16) => Buf::HostF32(host_zeros(n)?),
            (Device::Cpu, DType::I32) => Buf::HostI32(host_zeros(n)?),
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
        count_allocation();
        Ok(match (self, dtype) {
            (Device::Cpu, DType::F32) => Buf::HostF32(host_copy(v)?),
            // The CPU backend computes in f32: its "bf16" buffers are f32.
            (Device::Cpu, DType::BF16) => Buf::HostF32(host_copy(v)?),
            (Device::Cuda(g), DType::F32) => Buf::DevF32(g.upload(v)?, v.len()),
            (Device::Cuda(g), DType::BF16) => {
                let mut h: Vec<bf16> = host_vec_with_capacity(v.len())?;
                h.extend(v.iter().map(|&x| bf16::from_f32(x)));
                Buf::DevBf16(g.upload(&h)?, v.len())
            }
            (_, DType::I32) => bail!("upload: use upload_i32 for integer data"),
        })
    }

    pub fn upload_act(&self, v: &[f32]) -> Result<Buf> {
        self.upload(v, self.act_dtype())
    }

    pub fn upload_i32(&self, v: &[i32]) -> Result<Buf> {
        count_allocation();
        Ok(match self {
            Device::Cpu => Buf::HostI32(host_copy(v)?),
            Device::Cuda(g) => Buf::DevI32(g.upload(v)?, v.len()),
        })
    }

    /// Copies any float buffer back as f32.
    pub fn to_vec(&self, b: &Buf) -> Result<Vec<f32>> {
        Ok(match (self, b) {
            (_, Buf::HostF32(v)) => host_copy(v)?,
            (Device::Cuda(g), Buf::DevF32(s, n)) => g.download(s, *n)?,
            (Device::Cuda(g), Buf::DevBf16(s, n)) => {
                let h = g.download(s, *n)?;
                let mut out: Vec<f32> = host_vec_with_capacity(h.len())?;
                out.extend(h.into_iter().map(|x| x.to_f32()));
                out
            }
            _ => bail!("to_vec: {} buffer is not a float buffer on {}", b.dtype().suffix(), self.name()),
        })
    }

    pub fn to_vec_i32(&self, b: &Buf) -> Result<Vec<i32>> {
        Ok(match (self, b) {
            (_, Buf::HostI32(v)) => host_copy(v)?,
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

/// Host requests at least this large are first compared with the memory available (smaller
/// ones are not worth reading /proc for).
const CHECK_HOST_BYTES: usize = 64 << 20;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// MemAvailable from /proc/meminfo, or what the cgroup (v2, else v1) still allows when less.
pub fn host_available() -> Option<(u64, &'static str)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let kb: u64 = s.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
        Some((kb * 1024, "MemAvailable in /proc/meminfo"))
    });
    let read_u64 = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let cgroup = match (read_u64("/sys/fs/cgroup/memory.max"), read_u64("/sys/fs/cgroup/memory.current")) {
        (Some(max), Some(cur)) => Some((max.saturating_sub(cur), "the cgroup's memory.max")),
        _ => match (
            read_u64("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            read_u64("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        ) {
            // v1 reports "no limit" as a huge number.
            (Some(max), Some(cur)) if max < 1 << 60 => {
                Some((max.saturating_sub(cur), "the cgroup's memory.limit_in_bytes"))
            }
            _ => None,
        },
    };
    match (meminfo, cgroup) {
        (Some(m), Some(c)) => Some(if c.0 < m.0 { c } else { m }),
        (m, c) => m.or(c),
    }
}

/// Checks a host request of `n` elements of `T`: its byte size must not overflow and, when
/// large, must fit in what is available.
fn host_request<T>(n: usize) -> Result<usize> {
    let bytes = n
        .checked_mul(std::mem::size_of::<T>())
        .ok_or_else(|| anyhow!("host allocation of {n} elements overflows the address space"))?;
    if bytes >= CHECK_HOST_BYTES {
        if let Some((avail, src)) = host_available() {
            if bytes as u64 > avail {
                bail!(
                    "host allocation of {:.1} MiB does not fit: {:.1} MiB available ({src})",
                    mib(bytes),
                    mib(avail as usize)
                );
            }
        }
    }
    Ok(bytes)
}

fn host_alloc_error(bytes: usize) -> anyhow::Error {
    let avail =
        host_available().map_or(String::new(), |(a, src)| format!("; {:.1} MiB available ({src})", mib(a as usize)));
    anyhow!("host allocation of {:.1} MiB failed{avail}", mib(bytes))
}

/// An empty vector with room for `n` elements, or an error instead of an abort.
pub fn host_vec_with_capacity<T>(n: usize) -> Result<Vec<T>> {
    let bytes = host_request::<T>(n)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| host_alloc_error(bytes))?;
    Ok(v)
}

/// `n` zeros, allocated zeroed (lazily, like `vec![0; n]`), or an error instead of an abort.
pub fn host_zeros<T: bytemuck::Zeroable>(n: usize) -> Result<Vec<T>> {
    let bytes = host_request::<T>(n)?;
    if n == 0 || bytes == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(n).map_err(|_| host_alloc_error(bytes))?;
    // SAFETY: the layout has a non-zero size; a null return is handled.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        return Err(host_alloc_error(bytes));
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of [T; n], which is
    // what a Vec of capacity n uses, and all-zero bytes are a valid T (Zeroable).
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

/// A copy of `v`, or an error instead of an abort.
pub fn host_copy<T: Copy>(v: &[T]) -> Result<Vec<T>> {
    let mut out = host_vec_with_capacity(v.len())?;
    out.extend_from_slice(v);
    Ok(out)
}

/// Copies `v` over the first v.len() elements of `d` (nothing for an empty `v`).
fn htod_prefix<T: cudarc::driver::DeviceRepr>(g: &Gpu, d: &mut CudaSlice<T>, v: &[T]) -> Result<()> {
    if !v.is_empty() {
        g.stream.memcpy_htod(v, &mut d.slice_mut(..v.len()))?;
    }
    Ok(())
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

    /// Elements the allocation holds; `set_len` may move the logical length up to this.
    pub fn capacity(&self) -> usize {
        match self {
            Buf::HostF32(v) => v.capacity(),
            Buf::HostI32(v) => v.capacity(),
            Buf::DevF32(d, _) => d.len(),
            Buf::DevBf16(d, _) => d.len(),
            Buf::DevI32(d, _) => d.len(),
        }
    }

    /// Sets the logical length within the capacity, without allocating: preallocated scratch
    /// serves every step shape up to its size (host elements past the old length read 0).
    pub fn set_len(&mut self, n: usize) -> Result<()> {
        if n > self.capacity() {
            bail!("buffer {:?}: length {n} exceeds its capacity {}", self, self.capacity());
        }
        match self {
            Buf::HostF32(v) => v.resize(n, 0.0),
            Buf::HostI32(v) => v.resize(n, 0),
            Buf::DevF32(_, l) | Buf::DevBf16(_, l) | Buf::DevI32(_, l) => *l = n,
        }
        Ok(())
    }

    /// Overwrites the buffer with `v` (its length becomes v.len(), within the capacity): the
    /// upload of a step's ids, offsets and positions into preallocated device memory.
    pub fn write_i32(&mut self, dev: &Device, v: &[i32]) -> Result<()> {
        self.set_len(v.len())?;
        match (self, dev) {
            (Buf::HostI32(h), _) => h.copy_from_slice(v),
            (Buf::DevI32(d, _), Device::Cuda(g)) => htod_prefix(g, d, v)?,
            (b, _) => bail!("write_i32: buffer {b:?} is not an i32 buffer on {}", dev.name()),
        }
        Ok(())
    }

    /// `write_i32` for f32 data (f32 buffers only: rounding to bf16 would need a staging copy).
    pub fn write_f32(&mut self, dev: &Device, v: &[f32]) -> Result<()> {
        self.set_len(v.len())?;
        match (self, dev) {
            (Buf::HostF32(h), _) => h.copy_from_slice(v),
            (Buf::DevF32(d, _), Device::Cuda(g)) => htod_prefix(g, d, v)?,
            (b, _) => bail!("write_f32: buffer {b:?} is not an f32 buffer on {}", dev.name()),
        }
        Ok(())
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

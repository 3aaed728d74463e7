//! The CUDA runtime: one context and one stream, lazily loaded kernel modules, typed launches.
//! cudarc's multi-stream event tracking is switched off: everything runs in order on one stream,
//! so kernels take raw device pointers (which also makes sub-buffer offsets free).

pub mod api;
pub mod blas;
pub mod kernels;

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A kernel argument: device pointers travel as u64, scalars by value.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: blas::Blas,
    pub name: String,
    pub sm_count: u32,
    modules: Mutex<HashMap<api::Module, Arc<CudaModule>>>,
    /// Loaded kernels, indexed by their id in `api::KERNELS`.
    funcs: Mutex<Vec<Option<CudaFunction>>>,
    /// The reusable f32 scratch of `scratch_f32` (grown, never shrunk).
    scratch: Mutex<Option<Arc<CudaSlice<f32>>>>,
}

impl Gpu {
    /// Opens device 0, or returns Ok(None) when no driver library or no device is present.
    /// (cudarc panics when a library is missing, so presence is checked first.)
    pub fn open() -> Result<Option<Arc<Gpu>>> {
        // SAFETY: only probes whether the shared library loads.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Ok(None);
        }
        if std::env::var("AM3_FORCE_CPU").is_ok_and(|v| v == "1") {
            return Ok(None);
        }
        match CudaContext::device_count() {
            Ok(n) if n > 0 => {}
            _ => return Ok(None),
        }
        // SAFETY: probes the cuBLAS library before cudarc would panic on it.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            bail!("a CUDA device is present but libcublas could not be loaded (add CUDA's lib64 to LD_LIBRARY_PATH)");
        }
        let ctx = CudaContext::new(0).context("creating the CUDA context on device 0")?;
        // SAFETY: we use a single stream, so cross-stream event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = blas::Blas::new(stream.clone())?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let sm_count =
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).unwrap_or(1) as u32;
        Ok(Some(Arc::new(Gpu {
            ctx,
            stream,
            blas,
            name,
            sm_count,
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(vec![None; api::KERNELS.len()]),
            scratch: Mutex::new(None),
        })))
    }

    fn module(&self, m: api::Module) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock().map_err(|_| anyhow!("module cache poisoned"))?;
        if let Some(loaded) = mods.get(&m) {
            return Ok(loaded.clone());
        }
        let loaded = kernels::load(&self.ctx, m.name())?;
        mods.insert(m, loaded.clone());
        Ok(loaded)
    }

    /// The kernel `api::KERNELS[id]`, loaded on first use.
    fn func(&self, id: usize) -> Result<CudaFunction> {
        let info = api::KERNELS.get(id).ok_or_else(|| anyhow!("no kernel with id {id}"))?;
        if let Some(Some(f)) = self.funcs.lock().map_err(|_| anyhow!("function cache poisoned"))?.get(id) {
            return Ok(f.clone());
        }
        let f = self
            .module(info.module)?
            .load_function(info.name)
            .with_context(|| format!("kernel {} not found in module {}", info.name, info.module.name()))?;
        self.funcs.lock().map_err(|_| anyhow!("function cache poisoned"))?[id] = Some(f.clone());
        Ok(f)
    }

    /// Launches `api::KERNELS[id]` on the stream; the generated launchers in `api` are the only
    /// callers, and pass the arguments in the kernel's order and kinds. Errors name the kernel.
    pub fn launch_kernel(&self, id: usize, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = self.func(id)?;
        let info = &api::KERNELS[id];
        if args.len() != info.params.len() || args.iter().zip(info.params).any(|(a, p)| api::Kind::of(a) != p.1) {
            bail!("launch of {}::{}: arguments {args:?} do not match its parameters", info.module.name(), info.name);
        }
        if cfg.shared_mem_bytes > 48 * 1024 {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.shared_mem_bytes as i32,
            )
            .with_context(|| format!("raising the shared-memory limit of {}", info.name))?;
        }
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::U64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        // SAFETY: the argument count and kinds match the kernel's declaration (generated from
        // it, checked above, and tests/kernel_symbols.rs checks the table against the PTX); the
        // launchers in src/ops pass pointers to live buffers whose sizes they have checked.
        unsafe { b.launch(cfg) }.with_context(|| format!("launching {}::{}", info.module.name(), info.name))?;
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().context("CUDA stream synchronize (an earlier kernel failed)")
    }

    /// `n` zeroed elements; failure (out of memory, or a size past the address space) is an
    /// error naming the bytes and the card's free memory.
    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        let Some(bytes) = n.checked_mul(std::mem::size_of::<T>()).filter(|&b| b <= isize::MAX as usize) else {
            let (free, total) = self.mem_info();
            bail!(
                "GPU allocation of {n} elements of {} bytes overflows; {} of {} free on {}",
                std::mem::size_of::<T>(),
                gib(free),
                gib(total),
                self.name
            );
        };
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| oom_error(self, bytes, e))
    }

    /// An f32 scratch buffer of at least `n` elements (contents undefined) for an op's
    /// temporaries such as per-block partial sums, reused across calls so the hot path does not
    /// allocate. Safe because all work is in order on one stream: the op enqueues every kernel
    /// that touches the scratch before it drops the Arc. While another holder keeps the pooled
    /// buffer (another thread mid-op), a fresh one is returned instead.
    pub fn scratch_f32(&self, n: usize) -> Result<Arc<CudaSlice<f32>>> {
        let mut slot = self.scratch.lock().map_err(|_| anyhow!("scratch pool poisoned"))?;
        match slot.as_ref() {
            Some(s) if Arc::strong_count(s) > 1 => return Ok(Arc::new(self.alloc::<f32>(n)?)),
            Some(s) if s.len() >= n => return Ok(s.clone()),
            _ => {}
        }
        *slot = None; // free the small one before allocating the larger
        let s = Arc::new(self.alloc::<f32>(n.next_power_of_two())?);
        *slot = Some(s.clone());
        Ok(s)
    }

    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        let mut d = self.alloc::<T>(v.len())?;
        if !v.is_empty() {
            self.stream.memcpy_htod(v, &mut d).context("host-to-device copy")?;
        }
        Ok(d)
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, d: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        let mut v: Vec<T> = crate::tensor::host_vec_with_capacity(d.len())?;
        v.resize(d.len(), T::default());
        self.stream.memcpy_dtoh(d, &mut v).context("device-to-host copy")?;
        self.sync()?;
        v.truncate(n);
        Ok(v)
    }

    pub fn mem_info(&self) -> (usize, usize) {
        self.ctx.mem_get_info().unwrap_or((0, 0))
    }
}

/// The raw device address of a slice (no event tracking: see the module doc).
pub fn dptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

fn gib(bytes: usize) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn oom_error(gpu: &Gpu, bytes: usize, e: cudarc::driver::DriverError) -> anyhow::Error {
    let (free, total) = gpu.mem_info();
    anyhow!(
        "GPU allocation of {:.1} MiB failed ({e}); {} of {} free on {}",
        bytes as f64 / (1 << 20) as f64,
        gib(free),
        gib(total),
        gpu.name
    )
}

/// Grid of ceil(n / block) blocks of `block` threads.
pub fn cfg_1d(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(block).max(1), 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row.
pub fn cfg_rows(rows: usize, block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem }
}

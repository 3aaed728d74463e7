//! The embedded kernel modules (see build.rs) and how they are loaded: the nvcc fatbin when there
//! is one and it loads on this GPU, else NVRTC compiles the embedded source for the device's arch,
//! once per process.

use anyhow::{anyhow, Context, Result};
use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::sync::Arc;

pub struct KernelModule {
    pub name: &'static str,
    pub source: &'static str,
    pub fatbin: Option<&'static [u8]>,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

pub fn find(name: &str) -> Result<&'static KernelModule> {
    KERNEL_MODULES.iter().find(|m| m.name == name).ok_or_else(|| anyhow!("no kernel module named {name}"))
}

pub fn load(ctx: &Arc<CudaContext>, name: &'static str) -> Result<Arc<CudaModule>> {
    let m = find(name)?;
    // AM3_FORCE_NVRTC=1 skips the fatbins: the path a build without nvcc takes (tested on the GPU).
    let force_nvrtc = std::env::var("AM3_FORCE_NVRTC").is_ok_and(|v| v == "1");
    if let Some(fb) = m.fatbin.filter(|_| !force_nvrtc) {
        match ctx.load_module(Ptx::from_binary(fb.to_vec())) {
            Ok(module) => return Ok(module),
            Err(e) => eprintln!("am3: fatbin for {name} did not load ({e}); compiling it with NVRTC"),
        }
    }
    let (maj, min) = ctx.compute_capability().context("reading the compute capability")?;
    let ptx = compile_nvrtc(m, &format!("sm_{maj}{min}"))?;
    ctx.load_module(ptx).with_context(|| format!("loading the NVRTC module {name}"))
}

/// Is libnvrtc loadable (probing first: cudarc panics on a missing library)?
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes whether the shared library loads.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles a module's embedded source with NVRTC for `arch` (e.g. "sm_90"); needs no GPU.
pub fn compile_nvrtc(m: &KernelModule, arch: &str) -> Result<Ptx> {
    if !nvrtc_present() {
        return Err(anyhow!("kernel module {}: no usable fatbin and libnvrtc is not present", m.name));
    }
    let arch: &'static str = Box::leak(arch.to_string().into_boxed_str());
    let opts = CompileOptions {
        arch: Some(arch),
        options: vec!["-std=c++17".into(), "-default-device".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(m.source, opts).map_err(|e| anyhow!("NVRTC failed on kernel module {}: {e}", m.name))
}

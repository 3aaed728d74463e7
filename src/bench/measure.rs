//! Timing and memory for the workload suites: every run's time (CUDA events on a GPU, wall
//! clock on the CPU), memory in use sampled by a background thread (the driver's free memory
//! on a GPU, the process's resident set on the CPU), and what card, driver and commit ran.

use crate::tensor::Device;
use anyhow::{Context, Result};
use cudarc::driver::sys;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Seconds of each of `iters` runs of `f` after `warmup` untimed ones.
pub fn time_runs(dev: &Device, warmup: usize, iters: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    dev.sync()?;
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        match dev {
            Device::Cuda(g) => {
                let start =
                    g.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).context("creating a CUDA event")?;
                let stop =
                    g.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).context("creating a CUDA event")?;
                start.record(&g.stream)?;
                f()?;
                stop.record(&g.stream)?;
                stop.synchronize()?;
                out.push(start.elapsed_ms(&stop)? as f64 * 1e-3);
            }
            Device::Cpu => {
                let t = Instant::now();
                f()?;
                out.push(t.elapsed().as_secs_f64());
            }
        }
    }
    Ok(out)
}

/// Memory in use now: device memory (total − free) on a GPU, resident set on the CPU.
pub fn in_use(dev: &Device) -> u64 {
    match dev {
        Device::Cuda(g) => {
            let (free, total) = g.mem_info();
            (total - free) as u64
        }
        Device::Cpu => rss(),
    }
}

fn rss() -> u64 {
    // statm: size resident ... in pages.
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .unwrap_or(0);
    pages * 4096
}

/// What `MemWatch` samples, for messages and the JSON.
pub fn memory_source(dev: &Device) -> &'static str {
    if dev.is_cuda() {
        "device memory in use (cuMemGetInfo), sampled every 1 ms"
    } else {
        "process resident set (/proc/self/statm), sampled every 1 ms"
    }
}

/// Samples memory in use every millisecond until stopped.
pub struct MemWatch {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<(f64, u64)>>>,
    pub t0: Instant,
}

impl MemWatch {
    pub fn start(dev: &Device) -> MemWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let ctx = dev.gpu().map(|g| g.ctx.clone());
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut v = Vec::new();
            loop {
                let bytes = match &ctx {
                    Some(c) => c.mem_get_info().map(|(free, total)| (total - free) as u64).unwrap_or(0),
                    None => rss(),
                };
                v.push((t0.elapsed().as_secs_f64(), bytes));
                if s.load(Ordering::Relaxed) {
                    return v;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        MemWatch { stop, handle: Some(handle), t0 }
    }

    /// (seconds since start, bytes) samples; the last one is taken at the stop.
    pub fn finish(mut self) -> Vec<(f64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

/// The highest sample in [a, b] seconds; the nearest sample when none fell inside.
pub fn peak_in(samples: &[(f64, u64)], a: f64, b: f64) -> u64 {
    let inside = samples.iter().filter(|(t, _)| *t >= a && *t <= b).map(|s| s.1).max();
    inside.unwrap_or_else(|| {
        let mid = 0.5 * (a + b);
        samples.iter().min_by(|x, y| (x.0 - mid).abs().total_cmp(&(y.0 - mid).abs())).map_or(0, |s| s.1)
    })
}

pub fn peak(samples: &[(f64, u64)]) -> u64 {
    samples.iter().map(|s| s.1).max().unwrap_or(0)
}

/// The card's name, or "cpu".
pub fn card(dev: &Device) -> String {
    match dev.gpu() {
        Some(g) => g.name.clone(),
        None => "cpu".into(),
    }
}

/// The CUDA driver API version and the kernel module's, when there is a GPU.
pub fn driver(dev: &Device) -> String {
    if !dev.is_cuda() {
        return "none".into();
    }
    let mut v: std::ffi::c_int = 0;
    // SAFETY: the driver library is loaded (a device was opened); one out-parameter.
    let api = match unsafe { sys::cuDriverGetVersion(&mut v) } {
        sys::CUresult::CUDA_SUCCESS => format!("CUDA {}.{}", v / 1000, (v % 1000) / 10),
        _ => "CUDA ?".into(),
    };
    let module = std::fs::read_to_string("/proc/driver/nvidia/version").ok().and_then(|s| {
        s.lines().next().and_then(|l| {
            l.split_whitespace()
                .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
                .map(String::from)
        })
    });
    match module {
        Some(m) => format!("{api}, NVIDIA {m}"),
        None => api,
    }
}

/// `$AM3_COMMIT` (for copies without `.git`, like the GPU machine's), else `git rev-parse HEAD`
/// where the bench runs, else "unknown".
pub fn git_commit() -> String {
    if let Some(c) = std::env::var("AM3_COMMIT").ok().filter(|c| !c.trim().is_empty()) {
        return c.trim().to_string();
    }
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

//! Kernel benchmarks shared by `benches/kernels.rs` and `am3 bench`: CUDA-event timing (median
//! of many runs after warm-up) and a table of achieved GB/s and TFLOP/s against the H200
//! ceilings measured for this project (4.2 TB/s copy, 770 TFLOP/s bf16 GEMM).
//! Each area adds a `src/bench/<area>.rs` with `pub fn run(dev: &Device, quick: bool) -> Result<Vec<BenchRow>>`
//! and one line in `SUITES`.
//!
//! The workload suites (`am3 bench --shape S | --model DIR`: train, vision, prefill, rollout,
//! grpo; any device) live in `workloads`, `rollout` and `grpo_step`, with their shapes
//! (`shape`), synthetic inputs (`synth`), memory plan (`plan`), timing (`measure`), report
//! (`report`) and command line (`cli`).

pub mod attention;
pub mod cli;
pub mod elementwise;
pub mod grpo_step;
pub mod logprob;
pub mod lora;
pub mod measure;
pub mod norms;
pub mod patch_embed;
pub mod plan;
pub mod report;
pub mod rollout;
pub mod shape;
pub mod synth;
pub mod train7b;
pub mod workloads;

use crate::cuda::Gpu;
use crate::tensor::Device;
use anyhow::{Context, Result};
use cudarc::driver::sys;

pub const HBM_BYTES_PER_S: f64 = 4.2e12;
pub const BF16_FLOP_PER_S: f64 = 770e12;

#[derive(Clone, Debug, Default)]
pub struct BenchRow {
    pub op: String,
    pub shape: String,
    /// Median milliseconds per call.
    pub ms: f64,
    /// Floor bytes moved (each input read once, each output written once).
    pub bytes: f64,
    /// Floating-point operations counted for the call.
    pub flops: f64,
    /// Max relative error against the CPU reference, when the bench checked it.
    pub rel_err: Option<f64>,
    pub note: String,
}

impl BenchRow {
    pub fn gbps(&self) -> f64 {
        self.bytes / (self.ms * 1e-3) / 1e9
    }
    pub fn tflops(&self) -> f64 {
        self.flops / (self.ms * 1e-3) / 1e12
    }
}

/// Median time in ms of `f` over `iters` runs after `warmup` runs, timed with CUDA events.
pub fn time_gpu(gpu: &Gpu, warmup: usize, iters: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    gpu.sync()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = gpu.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).context("creating a CUDA event")?;
        let stop = gpu.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).context("creating a CUDA event")?;
        start.record(&gpu.stream)?;
        f()?;
        stop.record(&gpu.stream)?;
        stop.synchronize()?;
        times.push(start.elapsed_ms(&stop)? as f64);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Median wall time in ms of `f` (for the CPU backend).
pub fn time_cpu(warmup: usize, iters: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = std::time::Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

pub type Suite = (&'static str, fn(&Device, bool) -> Result<Vec<BenchRow>>);

/// Every bench suite, by area.
pub const SUITES: &[Suite] = &[
    ("norms", norms::run),
    ("elementwise", elementwise::run),
    ("attention", attention::run),
    ("patch_embed", patch_embed::run),
    ("logprob", logprob::run),
    ("train7b", train7b::run),
    ("lora", lora::run),
    ("rollout", rollout::run),
];

pub fn format_table(rows: &[BenchRow]) -> String {
    let mut s = format!(
        "{:<28} {:<34} {:>10} {:>9} {:>7} {:>9} {:>7} {:>9}  {}\n",
        "op", "shape", "ms", "GB/s", "%4.2T", "TFLOP/s", "%770T", "rel err", "note"
    );
    for r in rows {
        let err = r.rel_err.map(|e| format!("{e:.1e}")).unwrap_or_else(|| "-".into());
        let (gb, tf) = (r.gbps(), r.tflops());
        s.push_str(&format!(
            "{:<28} {:<34} {:>10.4} {:>9.1} {:>6.1}% {:>9.1} {:>6.1}% {:>9}  {}\n",
            r.op,
            r.shape,
            r.ms,
            gb,
            100.0 * gb * 1e9 / HBM_BYTES_PER_S,
            tf,
            100.0 * tf * 1e12 / BF16_FLOP_PER_S,
            err,
            r.note
        ));
    }
    s
}

/// Runs the named suites (all when `only` is empty).
pub fn run_suites(dev: &Device, quick: bool, only: &[String]) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for (name, f) in SUITES {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        match f(dev, quick) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                rows.push(BenchRow { op: name.to_string(), note: format!("FAILED: {e:#}"), ..Default::default() })
            }
        }
    }
    Ok(rows)
}

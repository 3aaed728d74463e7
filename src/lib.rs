//! am3safety: AM3Safety (arXiv 2601.04736) training for vision-language models.
//! Hand-written CUDA kernels with a complete plain-Rust CPU reference backend.

pub mod bench; // defines: bench harness (CUDA-event timing, GB/s and TFLOP/s table), suites per area
pub mod check; // defines: error norms, the per-op tolerance table (Tol), assert_close, the fixture finder
pub mod checkpoint; // defines: Checkpoint (memory-mapped safetensors model dirs), atomic sharded saving, fixture reading
pub mod cuda; // defines: Gpu (context, stream, module cache, launch), blas (cuBLAS GEMM), kernels (embedded modules)
pub mod data; // defines: image decoding and Pillow-compatible bicubic resize (datasets follow)
pub mod eval; // defines: am3 eval metrics (ASR, over-refusal, win rates, bootstrap CIs), report and chart
pub mod grpo; // defines: turn-aware GRPO rewards/advantages and the clipped-surrogate update over rollouts
pub mod judge; // defines: Judge trait (rules, OpenAI-compatible http, local model) and its score types
pub mod models; // defines: model families (qwen2_5_vl: config, processor, positions, chat), JSON config field reader
pub mod ops; // defines: one file per op, CPU reference + CUDA launcher side by side
pub mod real;
pub mod rng;
pub mod rollout; // defines: the rollout engine (batched multi-turn generation over KV caches) // defines: Real (f32/f64 for the CPU references), erf
pub mod stages; // defines: training stages (sft), examples and packing // defines: Rng (SplitMix64)
pub mod tensor; // defines: Device, Buf, DType
pub mod train; // defines: LR schedule, metrics JSONL, atomic file/dir writes, progress display

//! am3safety: AM3Safety (arXiv 2601.04736) training for vision-language models (Qwen2.5-VL,
//! LLaVA-NeXT): a cold-start refusal SFT, then GRPO over whole dialogues with turn-aware rewards,
//! and the eval. Hand-written CUDA kernels, each with a plain-Rust CPU reference; the CPU path is
//! a complete (slow) backend.

pub mod bench; // defines: kernel suites (CUDA-event timing, GB/s and TFLOP/s table) and workload suites (train, vision, prefill, rollout, grpo)
pub mod check; // defines: error norms, the per-op tolerance table (Tol), assert_close, the fixture finder
pub mod checkpoint; // defines: Checkpoint (memory-mapped safetensors model dirs), atomic sharded saving, fixture reading
pub mod cuda; // defines: Gpu (context, stream, module cache), api (typed launchers generated from kernels/*.cu), blas (cuBLAS GEMM), kernels (embedded modules)
pub mod data; // defines: image decoding and Pillow-compatible bicubic resize, the JSONL dataset, converters (SafeMT), the demo dataset
pub mod eval; // defines: am3 eval metrics (ASR, over-refusal, win rates, bootstrap CIs), report and chart
pub mod grpo; // defines: turn-aware GRPO rewards/advantages and the clipped-surrogate update over rollouts
pub mod judge; // defines: Judge trait (rules, OpenAI-compatible http, local model) and its score types
pub mod models; // defines: model families (qwen2_5_vl, llava_next: config, processor, chat, model), shared blocks and LoRA, the tiny default, size limits
pub mod ops; // defines: one module per op, CPU reference + CUDA launcher side by side
pub mod real; // defines: Real (f32/f64 for the CPU references), erf
pub mod rng; // defines: Rng (SplitMix64)
pub mod rollout; // defines: the rollout engine (batched multi-turn generation over KV caches)
pub mod stages; // defines: the commands (sft, grpo, eval, generate, forward, export, demo, data), examples and packing, VlModel
pub mod tensor; // defines: Device, Buf, DType
pub mod train; // defines: LR schedule, AdamW optimizer, metrics JSONL, atomic file/dir writes, the run directory, flags, progress display

//! Model-independent pieces of the training engine: the learning-rate schedule, the metrics log,
//! atomic saves and the progress display.

pub mod atomic; // defines: write_file, write_dir, StagedFile, StagedDir, recover_dir
pub mod metrics; // defines: StepMetrics, MetricsWriter (JSONL, one flushed line per step), read_metrics
pub mod progress; // defines: Progress (indicatif bar on a terminal, plain log lines otherwise)
pub mod schedule; // defines: LrSchedule, LrKind (constant / linear / cosine with warm-up)
pub mod optim; // defines: Optimizer (AdamW with f32 masters, clipping, state save/load)

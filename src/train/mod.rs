//! Model-independent pieces of the training engine: the learning-rate schedule, the metrics log,
//! atomic saves, the run directory (lock, clean-up, resume checks) and the progress display.

pub mod atomic; // defines: write_file, write_dir, StagedFile, StagedDir, recover_dir
pub mod exact_json; // defines: parse, from_str (JSON with exactly round-tripping floats)
pub mod flags; // defines: whole (clap parser), int_in, float_in (range checks naming the allowed range)
pub mod metrics; // defines: StepMetrics, MetricsWriter (JSONL, one flushed line per step), read_metrics, truncate_after
pub mod optim; // defines: Optimizer (AdamW with f32 masters, clipping, state save/load)
pub mod progress; // defines: Progress (indicatif bar on a terminal, plain log lines otherwise)
pub mod run_dir; // defines: RunDir, Mode, Start, Identity, Hasher, guard_output_file, require_same_settings, write/verify_checksums, latest_checkpoint
pub mod schedule; // defines: LrSchedule, LrKind (constant / linear / cosine with warm-up)

//! Cold-start refusal SFT (`am3 sft`): supervised fine-tuning of Qwen2.5-VL or LLaVA-NeXT (the
//! `--model` directory's config.json decides; see `stages::model`) on refusal VQA samples mixed
//! with general ones. The loss is the mean NLL of the assistant tokens of a step
//! (token-mean over every micro-batch of the step), computed by the fused log-prob op, so no
//! [tokens × vocab] logits tensor is ever held.
//!
//! Exact choices: AdamW with f32 master weights and decoupled weight decay on every trainable
//! tensor; global-norm clipping of the token-averaged gradient; warm-up then linear/cosine decay;
//! a fixed, seed-determined plan of micro-batches, so `--resume` continues bit for bit on the CPU.
//! Checkpoints (HF layout + `train_state/`) are written atomically every `save_every` steps and at
//! the end; `latest` names the newest complete one.
//!
//! LoRA (`--lora-rank R`, see `stages::lora`): adapters on the chosen projections, the base
//! frozen; checkpoints hold the merged weights (`--lora-save merged`) or PEFT adapter files.

mod args; // SftArgs (clap/TOML), SftPlan (resolved settings), resolve, check_optim_step
mod checkpoint; // trainer_state.json, the tiny model's identity, save_checkpoint, latest_checkpoint
mod data; // demo_data, loading and encoding a JSONL file (EncodedData), plan_micro_batches
mod loss; // nll_micro_batch (and its per-layer-step form), eval_nll
mod model_io; // Loaded, load_model, save_model, save_side_files
mod train; // run (the SFT run: resume, memory checks, step loop), memory_in_use

pub use args::{check_optim_step, SftArgs, SftPlan};
pub use checkpoint::latest_checkpoint;
pub use data::{
    demo_data, encode_data, encode_data_within, encode_file, encode_file_with, load_examples, load_examples_for,
    load_examples_skipping, plan_micro_batches, EncodedData,
};
pub use loss::{eval_nll, nll_micro_batch, nll_micro_batch_stepped};
pub use model_io::{load_model, save_model, save_side_files, Loaded};
pub use train::{memory_in_use, run};

//! `am3 sft`'s settings: the clap/TOML arguments (`SftArgs`), their resolution and range
//! checks into the resolved `SftPlan`.

use crate::models::common::params::GradStore;
use crate::stages::lora::{resolve_lora, MAX_LORA_RANK};
use crate::tensor::DevicePref;
use crate::train::flags::{float_in, int_in, whole, End};
use crate::train::schedule::{LrKind, LrSchedule};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

// Allowed ranges of the whole-number settings (checked on the command line and after merging
// a config file; the float ranges are in `resolve`).
const STEPS: (u64, u64) = (1, 1_000_000_000);
const BATCH_TOKENS: (u64, u64) = (16, 1 << 30);
const GRAD_ACCUM: (u64, u64) = (1, 65_536);
const SAVE_EVERY: (u64, u64) = (1, 1_000_000_000);
const LORA_RANK: (u64, u64) = (0, MAX_LORA_RANK);
const ANY: (u64, u64) = (0, u64::MAX);

/// Every SFT setting. Flags override `--config FILE.toml`, which overrides these defaults.
#[derive(clap::Args, Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftArgs {
    /// Model directory (HF layout; Qwen2.5-VL or LLaVA-NeXT, per its config.json). Default: the
    /// embedded tiny Qwen2.5-VL, randomly initialised.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data (JSON Lines; see README "Dataset format"). Default: the bundled demo set.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory: checkpoints, metrics.jsonl. Default: runs/sft. One an earlier run used
    /// needs --resume or --overwrite.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, value_enum)]
    #[serde(skip)]
    pub device: Option<DevicePref>,
    /// TOML file with any of these settings (same names, with underscores).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Optimizer steps (default: 100; 1 to 10^9).
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<u64, { STEPS.0 }, { STEPS.1 }>)]
    pub steps: Option<u64>,
    /// Peak learning rate, in (0, 1] (default 2e-3 for the tiny default model, else 1e-5, or
    /// 1e-4 with LoRA).
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Warm-up steps, at most --steps (default: 5% of the steps).
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<u64, { STEPS.0 - 1 }, { STEPS.1 }>)]
    pub warmup: Option<u64>,
    /// constant | linear | cosine (default cosine).
    #[arg(long)]
    pub schedule: Option<String>,
    /// Final LR as a fraction of the peak, in [0, 1] (default 0.1).
    #[arg(long, allow_negative_numbers = true)]
    pub min_lr_ratio: Option<f64>,
    /// Tokens per micro-batch (packed, default 1024; 16 to 2^30).
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize, { BATCH_TOKENS.0 }, { BATCH_TOKENS.1 }>)]
    pub batch_tokens: Option<usize>,
    /// Micro-batches per optimizer step (default 1; 1 to 65536).
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize, { GRAD_ACCUM.0 }, { GRAD_ACCUM.1 }>)]
    pub grad_accum: Option<usize>,
    /// Global gradient-norm clip, in [0, 10^6] (default 1.0; 0 turns it off).
    #[arg(long, allow_negative_numbers = true)]
    pub clip: Option<f64>,
    /// Decoupled AdamW weight decay, in [0, 1] (default 0).
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// AdamW beta1, in [0, 1) (default 0.9).
    #[arg(long, allow_negative_numbers = true)]
    pub beta1: Option<f64>,
    /// AdamW beta2, in [0, 1) (default 0.95).
    #[arg(long, allow_negative_numbers = true)]
    pub beta2: Option<f64>,
    /// Seed for the data order and the tiny model's init (default 0).
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<u64, { ANY.0 }, { ANY.1 }>)]
    pub seed: Option<u64>,
    /// Save a checkpoint every K steps (default: 20; the last step always saves).
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<u64, { SAVE_EVERY.0 }, { SAVE_EVERY.1 }>)]
    pub save_every: Option<u64>,
    /// Recompute every layer's activations in backward (less memory, one extra forward).
    #[arg(long)]
    pub recompute: Option<bool>,
    /// Do not update the vision tower (no AdamW state for it, and the backward skips it).
    #[arg(long)]
    pub freeze_vision: Option<bool>,
    /// Gradient storage: f32 | bf16 (linear-layer weight gradients in bf16 on the GPU, the rest
    /// f32) | auto (the default: f32 unless only bf16 leaves room for the optimizer state, as
    /// for a full fine-tune of a 7B model on one 141 GB card).
    #[arg(long)]
    pub grad_dtype: Option<String>,
    /// whole (the default: one AdamW step after the backward) | per-layer (full fine-tune: each
    /// decoder layer is updated as soon as its gradient is final, so one layer's gradient is
    /// stored instead of all of them; needs --clip 0 and --grad-accum 1).
    #[arg(long)]
    pub optim_step: Option<String>,
    /// LoRA rank; 0 (the default) trains every weight. With LoRA only the adapters train.
    #[arg(long, allow_negative_numbers = true, value_parser = whole::<usize, { LORA_RANK.0 }, { LORA_RANK.1 }>)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha, in (0, 10^6]: the adapters' output is scaled by alpha / rank (default 2·rank).
    #[arg(long, allow_negative_numbers = true)]
    pub lora_alpha: Option<f64>,
    /// Projections to adapt, comma-separated (default: all seven of the text decoder):
    /// q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; Qwen2.5-VL's vision
    /// blocks also take visual.qkv, visual.proj, visual.gate_proj, visual.up_proj, visual.down_proj.
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// merged (full HF weights with the adapters merged in, the default) | adapter (PEFT
    /// adapter_model.safetensors + adapter_config.json).
    #[arg(long)]
    pub lora_save: Option<String>,
    /// Continue from the newest checkpoint in --out (same settings, data and model required).
    #[arg(long)]
    #[serde(skip)]
    pub resume: bool,
    /// Replace the earlier run in --out (its checkpoints, latest and metrics.jsonl) instead of
    /// refusing to touch it.
    #[arg(long)]
    #[serde(skip)]
    pub overwrite: bool,
    /// Leave out invalid samples (bad lines, images that do not decode, …; each is still
    /// reported as file:line: reason) instead of stopping.
    #[arg(long)]
    pub skip_bad: Option<bool>,
    /// Stop after this many steps of this run (for tests and time-boxed jobs).
    #[arg(long, hide = true, allow_negative_numbers = true, value_parser = whole::<u64, { STEPS.0 }, { STEPS.1 }>)]
    #[serde(skip)]
    pub stop_after: Option<u64>,
}

/// Resolved settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SftPlan {
    pub steps: u64,
    pub lr: f64,
    pub warmup: u64,
    pub schedule: String,
    pub min_lr_ratio: f64,
    pub batch_tokens: usize,
    pub grad_accum: usize,
    pub clip: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub seed: u64,
    pub save_every: u64,
    pub recompute: bool,
    pub freeze_vision: bool,
    /// LoRA (rank 0: off; then the other LoRA fields are empty).
    #[serde(default)]
    pub lora_rank: usize,
    #[serde(default)]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_targets: Vec<String>,
    #[serde(default)]
    pub lora_save: String,
    /// auto | f32 | bf16 (see `--grad-dtype`).
    #[serde(default = "default_grad_dtype")]
    pub grad_dtype: String,
    /// whole | per-layer (see `--optim-step`). Not written when whole, so the runs saved before
    /// the flag existed resume unchanged.
    #[serde(default = "crate::train::optim::whole_step", skip_serializing_if = "crate::train::optim::is_whole_step")]
    pub optim_step: String,
}

impl SftPlan {
    /// `--optim-step per-layer`.
    pub fn per_layer(&self) -> bool {
        crate::train::optim::is_per_layer_step(&self.optim_step)
    }
}

fn default_grad_dtype() -> String {
    "auto".into()
}

impl SftArgs {
    /// Flags over the TOML file over the defaults; every value range-checked.
    pub fn resolve(mut self) -> Result<(SftArgs, SftPlan)> {
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let file: SftArgs = toml::from_str(&text).with_context(|| format!("{}: bad SFT config", path.display()))?;
            macro_rules! merge { ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f.clone(); } )* } }
            merge!(
                model,
                data,
                out,
                steps,
                lr,
                warmup,
                schedule,
                min_lr_ratio,
                batch_tokens,
                grad_accum,
                clip,
                weight_decay,
                beta1,
                beta2,
                seed,
                save_every,
                recompute,
                freeze_vision,
                lora_rank,
                lora_alpha,
                lora_targets,
                lora_save,
                skip_bad,
                grad_dtype,
                optim_step
            );
        }
        if self.resume && self.overwrite {
            bail!("--resume and --overwrite exclude each other: continue the run in --out, or replace it");
        }
        use End::{Closed, Open};
        let steps = int_in("--steps", self.steps.unwrap_or(100), STEPS.0, STEPS.1)?;
        if let Some(k) = self.stop_after {
            int_in("--stop-after", k, STEPS.0, STEPS.1)?;
        }
        let (lora_rank, lora_alpha, lora_targets, lora_save) =
            resolve_lora(self.lora_rank, self.lora_alpha, self.lora_targets.as_deref(), self.lora_save.as_deref())?;
        let grad_dtype = self.grad_dtype.clone().unwrap_or_else(default_grad_dtype);
        if grad_dtype != "auto" {
            grad_dtype.parse::<GradStore>().context("--grad-dtype (auto, f32 or bf16)")?;
        }
        let schedule = self.schedule.clone().unwrap_or_else(|| "cosine".into());
        let kind: LrKind = schedule.parse().context("--schedule")?;
        let lr = self.lr.unwrap_or(if self.model.is_none() {
            2e-3
        } else if lora_rank > 0 {
            1e-4
        } else {
            1e-5
        });
        let plan = SftPlan {
            steps,
            lr: float_in("--lr", lr, 0.0, Open, 1.0, Closed)?,
            warmup: int_in("--warmup", self.warmup.unwrap_or(steps / 20), 0, steps)
                .context("--warmup may not exceed --steps")?,
            schedule,
            min_lr_ratio: float_in("--min-lr-ratio", self.min_lr_ratio.unwrap_or(0.1), 0.0, Closed, 1.0, Closed)?,
            batch_tokens: int_in("--batch-tokens", self.batch_tokens.unwrap_or(1024), BATCH_TOKENS.0, BATCH_TOKENS.1)?,
            grad_accum: int_in("--grad-accum", self.grad_accum.unwrap_or(1), GRAD_ACCUM.0, GRAD_ACCUM.1)?,
            clip: float_in("--clip", self.clip.unwrap_or(1.0), 0.0, Closed, 1e6, Closed)?,
            weight_decay: float_in("--weight-decay", self.weight_decay.unwrap_or(0.0), 0.0, Closed, 1.0, Closed)?,
            beta1: float_in("--beta1", self.beta1.unwrap_or(0.9), 0.0, Closed, 1.0, Open)?,
            beta2: float_in("--beta2", self.beta2.unwrap_or(0.95), 0.0, Closed, 1.0, Open)?,
            seed: self.seed.unwrap_or(0),
            save_every: int_in("--save-every", self.save_every.unwrap_or(20), SAVE_EVERY.0, SAVE_EVERY.1)?,
            recompute: self.recompute.unwrap_or(false),
            freeze_vision: self.freeze_vision.unwrap_or(false),
            lora_rank,
            lora_alpha,
            lora_targets,
            lora_save,
            grad_dtype,
            optim_step: self.optim_step.clone().unwrap_or_else(crate::train::optim::whole_step),
        };
        check_optim_step(&plan)?;
        LrSchedule::new(kind, plan.lr, plan.warmup, plan.steps, plan.min_lr_ratio)?;
        Ok((self, plan))
    }
}

/// `--optim-step` against the other settings (`optim::check_optim_step`).
pub fn check_optim_step(plan: &SftPlan) -> Result<()> {
    crate::train::optim::check_optim_step(&plan.optim_step, plan.clip, plan.grad_accum, plan.lora_rank).map(|_| ())
}

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

use super::examples::{micro_batches, pack, Example, Packed};
use super::lora::{resolve_lora, LoraSave, MAX_LORA_RANK};
use super::model::{save_weights, Encoder, Processor, VlModel};
use crate::checkpoint::safetensors_io::{write_atomic, SaveDtype};
use crate::data::dataset::{load_jsonl_with, Kind, LoadOptions};
use crate::models::common::lora::LoraConfig;
use crate::models::common::params::GradStore;
use crate::models::qwen2_5_vl::chat::load_tokenizer;
use crate::models::qwen2_5_vl::config::{QwenPreprocessorConfig, QwenVlConfig};
use crate::models::qwen2_5_vl::model::{QwenVl, Recompute};
use crate::models::{limits, tiny};
use crate::ops::adamw::AdamW;
use crate::rng::Rng;
use crate::tensor::{Device, DevicePref};
use crate::train::exact_json;
use crate::train::flags::{float_in, int_in, whole, End};
use crate::train::metrics::{read_metrics, StepMetrics};
use crate::train::optim::slot_key;
use crate::train::optim::Optimizer;
use crate::train::progress::Progress;
use crate::train::run_dir::{self, require_same_settings, Identity, Mode, RunDir, Start};
use crate::train::schedule::{LrKind, LrSchedule};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

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
    /// Do not update the vision tower.
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
    #[serde(default = "default_optim_step", skip_serializing_if = "is_whole")]
    pub optim_step: String,
}

fn default_optim_step() -> String {
    "whole".into()
}

fn is_whole(s: &str) -> bool {
    s == "whole"
}

impl SftPlan {
    /// `--optim-step per-layer`.
    pub fn per_layer(&self) -> bool {
        self.optim_step == "per-layer"
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
            optim_step: self.optim_step.clone().unwrap_or_else(default_optim_step),
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

/// The bundled demo data: `$AM3_DEMO_DATA`, else `data/demo/train.jsonl` under the current
/// directory, else in the checkout this binary was built from.
pub fn demo_data() -> PathBuf {
    if let Ok(p) = std::env::var("AM3_DEMO_DATA") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("data/demo/train.jsonl");
    if local.is_file() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/demo/train.jsonl")
}

/// The model, tokenizer and processor settings to train.
pub struct Loaded {
    pub model: VlModel,
    pub tok: Tokenizer,
    pub pp: Processor,
    /// Where the tokenizer/processor files came from (copied into checkpoints), if a directory.
    pub src_dir: Option<PathBuf>,
}

pub fn load_model(dev: &Device, dir: Option<&Path>, seed: u64) -> Result<Loaded> {
    match dir {
        None => {
            let tok = tiny::tokenizer()?;
            let cfg = tiny::config(&tok)?;
            let model = tiny::build(dev, cfg, tiny::INIT_SEED ^ seed)?.into();
            Ok(Loaded { model, tok, pp: Processor::Qwen(tiny::preprocessor()?), src_dir: None })
        }
        Some(d) => {
            let model = VlModel::load(dev, d)?;
            let tok = load_tokenizer(d)?.with_context(|| format!("{}: no tokenizer.json", d.display()))?;
            let pp = Processor::load(d, &model)?;
            Ok(Loaded { model, tok, pp, src_dir: Some(d.to_path_buf()) })
        }
    }
}

/// Loads and encodes a JSONL file for a Qwen2.5-VL model (every bad line reported with
/// file:line).
pub fn load_examples(
    path: &Path, tok: &Tokenizer, cfg: &QwenVlConfig, pp: &QwenPreprocessorConfig,
) -> Result<Vec<Example>> {
    let tmpl = crate::models::qwen2_5_vl::chat::ChatTemplate::new(tok, cfg)?;
    encode_file(path, &Encoder::Qwen { tmpl, cfg, pp })
}

/// Loads a JSONL file and encodes every sample for the model behind `enc` (any problem fails
/// the load, all of them listed).
pub fn encode_file(path: &Path, enc: &Encoder) -> Result<Vec<Example>> {
    encode_file_with(path, enc, false)
}

/// As `encode_file`; with `skip_bad`, invalid samples are reported on stderr and left out.
pub fn encode_file_with(path: &Path, enc: &Encoder, skip_bad: bool) -> Result<Vec<Example>> {
    Ok(encode_data(path, enc, skip_bad)?.examples)
}

/// A dataset encoded for a model.
pub struct EncodedData {
    pub examples: Vec<Example>,
    /// The images the kept samples use, in order (for the data's identity).
    pub images: Vec<PathBuf>,
    /// Every sample left out, as `file:line: reason` (only under `skip_bad`).
    pub skipped: Vec<String>,
}

/// Loads `path` and encodes every sample (images decoded and preprocessed) before deciding:
/// every problem of every sample — bad lines and fields, images that do not decode, templates
/// that fail — is collected. Without `skip_bad` any problem fails the load listing them all;
/// with it the bad samples are left out, each one reported on stderr.
pub fn encode_data(path: &Path, enc: &Encoder, skip_bad: bool) -> Result<EncodedData> {
    encode_data_within(path, enc, skip_bad, usize::MAX)
}

/// `encode_data`, where a sample longer than `batch_tokens` or the model's positions is a
/// problem too (`file:line: N tokens, limit M`), found before any step trains on it.
pub fn encode_data_within(path: &Path, enc: &Encoder, skip_bad: bool, batch_tokens: usize) -> Result<EncodedData> {
    let max_tokens = limits::sample_token_limit(batch_tokens, enc.max_positions());
    let loaded = load_jsonl_with(path, LoadOptions { skip_bad: true, ..Default::default() })?;
    let mut problems: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
    let (mut examples, mut images) = (Vec::with_capacity(loaded.samples.len()), Vec::new());
    for s in &loaded.samples {
        match enc.encode(s) {
            Ok(ex) if ex.len() > max_tokens => {
                problems.push(limits::sample_too_long(&s.origin, &s.id, ex.len(), batch_tokens, enc.max_positions()))
            }
            Ok(ex) => {
                examples.push(ex);
                images.extend(s.images.iter().cloned());
            }
            Err(e) => {
                // `encode` prefixes "sample ID (file:line): "; report it as file:line first.
                let msg = format!("{e:#}");
                let prefix = format!("sample {} ({}): ", s.id, s.origin);
                let reason = msg.strip_prefix(&prefix).unwrap_or(&msg);
                problems.push(format!("{}: sample {:?}: {reason}", s.origin, s.id));
            }
        }
    }
    if !problems.is_empty() && !skip_bad {
        let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        bail!(
            "{}: {} problem(s) in the dataset (fix them, or pass --skip-bad true to leave those samples out):\n{}",
            path.display(),
            problems.len(),
            list.join("\n")
        );
    }
    for p in &problems {
        eprintln!("am3 sft: skipped {p}");
    }
    if examples.is_empty() {
        bail!("{}: no usable sample ({} skipped)", path.display(), problems.len());
    }
    let bad_lines: std::collections::BTreeSet<usize> = loaded.errors.iter().map(|e| e.line).collect();
    let skipped = bad_lines.len() + loaded.samples.len() - examples.len();
    if skipped > 0 {
        eprintln!("am3 sft: {skipped} of {} samples skipped", skipped + examples.len());
    }
    Ok(EncodedData { examples, images, skipped: problems })
}

/// Encodes `path` for the loaded model, with its tokenizer and processor.
pub fn load_examples_for(path: &Path, l: &Loaded) -> Result<Vec<Example>> {
    encode_file(path, &Encoder::new(&l.model, &l.tok, &l.pp)?)
}

/// `load_examples_for`, leaving out (and reporting) invalid lines when `skip_bad`.
pub fn load_examples_skipping(path: &Path, l: &Loaded, skip_bad: bool) -> Result<Vec<Example>> {
    encode_file_with(path, &Encoder::new(&l.model, &l.tok, &l.pp)?, skip_bad)
}

/// The whole run's micro-batches, fixed by the seed: epoch k visits the examples in a
/// seed-and-k shuffled order.
pub fn plan_micro_batches(examples: &[Example], plan: &SftPlan) -> Vec<Vec<usize>> {
    let lens: Vec<usize> = examples.iter().map(|e| e.len()).collect();
    let need = plan.steps as usize * plan.grad_accum;
    let mut out = Vec::with_capacity(need);
    let mut epoch = 0u64;
    while out.len() < need {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        let mut rng = Rng::new(plan.seed.wrapping_mul(1_000_003).wrapping_add(epoch));
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        out.extend(micro_batches(&order, &lens, plan.batch_tokens));
        epoch += 1;
    }
    out.truncate(need);
    out
}

/// Σ −w·log p(target) over a packed micro-batch, and its backward when `train`.
/// Returns (summed NLL, target count).
pub fn nll_micro_batch(
    dev: &Device, model: &mut VlModel, p: &Packed, rc: &Recompute, train: bool,
) -> Result<(f64, f64)> {
    let fwd = model.forward(dev, p, rc)?;
    let targets = dev.upload_i32(&p.targets)?;
    let w = dev.upload(&p.weights, crate::tensor::DType::F32)?;
    let (logp, lse) = model.logprobs(dev, &fwd, &targets, Some(&w))?;
    let lp = dev.to_vec(&logp)?;
    let nll: f64 = lp.iter().zip(&p.weights).map(|(&l, &w)| -(l as f64) * w as f64).sum();
    let n: f64 = p.weights.iter().map(|&w| w as f64).sum();
    if train {
        let neg: Vec<f32> = p.weights.iter().map(|&w| -w).collect();
        let dlogp = dev.upload(&neg, crate::tensor::DType::F32)?;
        model.backward_logprobs(dev, &fwd, &targets, &lse, &dlogp)?;
    }
    Ok((nll, n))
}

/// `nll_micro_batch` (train) with the per-layer optimizer step: `step` updates each layer as
/// soon as its gradient is final.
pub fn nll_micro_batch_stepped(
    dev: &Device, model: &mut VlModel, p: &Packed, rc: &Recompute, step: &mut crate::models::common::lm::StepFn,
) -> Result<(f64, f64)> {
    let fwd = model.forward(dev, p, rc)?;
    let targets = dev.upload_i32(&p.targets)?;
    let w = dev.upload(&p.weights, crate::tensor::DType::F32)?;
    let (logp, lse) = model.logprobs(dev, &fwd, &targets, Some(&w))?;
    let lp = dev.to_vec(&logp)?;
    let nll: f64 = lp.iter().zip(&p.weights).map(|(&l, &w)| -(l as f64) * w as f64).sum();
    let n: f64 = p.weights.iter().map(|&w| w as f64).sum();
    let neg: Vec<f32> = p.weights.iter().map(|&w| -w).collect();
    let dlogp = dev.upload(&neg, crate::tensor::DType::F32)?;
    model.backward_logprobs_stepped(dev, &fwd, &targets, &lse, &dlogp, 1.0, step)?;
    Ok((nll, n))
}

/// Mean NLL per assistant token over `examples` of `kind` (all kinds when None), no gradients.
pub fn eval_nll(
    dev: &Device, model: &mut VlModel, examples: &[Example], kind: Option<Kind>, batch_tokens: usize,
) -> Result<f64> {
    let idx: Vec<usize> = (0..examples.len()).filter(|&i| kind.is_none_or(|k| examples[i].kind == k)).collect();
    let lens: Vec<usize> = examples.iter().map(|e| e.len()).collect();
    let (mut s, mut n) = (0.0, 0.0);
    for mb in micro_batches(&idx, &lens, batch_tokens) {
        let refs: Vec<&Example> = mb.iter().map(|&i| &examples[i]).collect();
        let (a, b) = nll_micro_batch(dev, model, &pack(&refs), &Recompute::default(), false)?;
        s += a;
        n += b;
    }
    Ok(if n > 0.0 { s / n } else { f64::NAN })
}

/// `trainer_state.json` of a checkpoint: where the run stands and what it was started with.
#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    plan: SftPlan,
    data: PathBuf,
    model: Option<PathBuf>,
    /// The data and model the run started with (checked by `--resume`).
    data_id: Identity,
    model_id: Identity,
}

/// What the embedded tiny model is made of (its weights follow from these and the seed).
fn tiny_identity() -> Identity {
    let seed = tiny::INIT_SEED.to_le_bytes();
    Identity::of_bytes(
        "(the embedded tiny model)",
        &[
            ("config.json", tiny::CONFIG_JSON.as_bytes()),
            ("tokenizer.json", tiny::TOKENIZER_JSON.as_bytes()),
            ("preprocessor_config.json", tiny::PREPROCESSOR_JSON.as_bytes()),
            ("init seed", &seed),
        ],
    )
}

/// What a checkpoint's `checksums.json` covers: everything `--resume` reads.
const RESUME_STATE: [&str; 2] = ["trainer_state.json", "train_state"];

/// Runs SFT; returns the final checkpoint directory.
pub fn run(args: SftArgs) -> Result<PathBuf> {
    let (args, plan) = args.resolve()?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs/sft"));
    let data = args.data.clone().unwrap_or_else(demo_data);
    let mut inputs: Vec<(&str, &Path)> = vec![("--data", &data)];
    if let Some(m) = &args.model {
        inputs.push(("--model", m));
    }
    // Lock and check the directory before the (slow) loading.
    let rd = RunDir::open(&out, Mode { resume: args.resume, overwrite: args.overwrite }, &inputs)?;
    let dev = Device::pick(args.device.unwrap_or(DevicePref::Auto))?;

    let mut l = load_model(&dev, args.model.as_deref(), plan.seed)?;
    if plan.lora_rank > 0 {
        let lc = LoraConfig {
            rank: plan.lora_rank,
            alpha: plan.lora_alpha,
            targets: plan.lora_targets.clone(),
            seed: plan.seed,
        };
        l.model.enable_lora(&dev, &lc)?;
    }
    let enc = encode_data_within(
        &data,
        &Encoder::new(&l.model, &l.tok, &l.pp)?,
        args.skip_bad.unwrap_or(false),
        plan.batch_tokens,
    )?;
    let data_id = Identity::of_data(&data, &enc.images)?;
    let model_id = match &args.model {
        Some(d) => Identity::of_model_dir(d)?,
        None => tiny_identity(),
    };
    let examples = enc.examples;
    let mbs = plan_micro_batches(&examples, &plan);
    let kind: LrKind = plan.schedule.parse()?;
    let sched = LrSchedule::new(kind, plan.lr, plan.warmup, plan.steps, plan.min_lr_ratio)?;
    let rc = if plan.recompute { Recompute::all(l.model.tdims().n_layers) } else { Recompute::default() };
    let hp = AdamW {
        lr: plan.lr as f32,
        beta1: plan.beta1 as f32,
        beta2: plan.beta2 as f32,
        eps: 1e-8,
        weight_decay: plan.weight_decay as f32,
    };
    let freeze = plan.freeze_vision;
    // Only tensors that receive gradients (LLaVA's vision layers past the feature layer don't).
    // CPU: the gradients, AdamW state and a micro-batch's activations must fit before they are
    // allocated (the GPU is checked below, after the gradients).
    let n_trainable: usize = l.model.trainable_entries().iter().map(|(r, _)| r.numel()).sum();
    let max_mb = mbs.iter().map(|mb| mb.iter().map(|&i| examples[i].len()).sum::<usize>()).max().unwrap_or(0);
    let td = l.model.tdims();
    let kept_layers = if plan.recompute { 1 } else { td.n_layers };
    // No head-gradient sink under LoRA any more: the frozen head's dW is skipped. (With
    // --optim-step per-layer this still counts every gradient: an over-estimate.)
    limits::ensure_training_fits(
        &dev,
        n_trainable as u64,
        0,
        max_mb as u64,
        kept_layers as u64,
        td.layer.d as u64,
        td.layer.inter as u64,
    )?;
    let has_grad = l.model.grad_keys(&dev)?;
    if plan.per_layer() {
        // Drop the whole-model gradients grad_keys allocated before the optimizer state exists.
        l.model.set_per_layer_grads(true);
        l.model.zero_grads(&dev)?;
    }
    let vision: std::collections::BTreeSet<String> =
        l.model.param_entries().iter().filter(|(r, _)| l.model.is_vision(&r.name)).map(|(r, _)| slot_key(r)).collect();
    let trainable = move |r: &crate::models::common::params::ParamRef| {
        has_grad.contains(&slot_key(r)) && !(freeze && vision.contains(&slot_key(r)))
    };
    if let Device::Cuda(g) = &dev {
        // Say how much is needed before a run dies in the middle of a step: the optimizer state
        // (12 bytes per trainable parameter) plus a margin for one step's activations.
        let n_train: usize =
            l.model.trainable_entries().iter().filter(|(r, _)| trainable(r)).map(|(r, _)| r.numel()).sum();
        let need = n_train as f64 * 12.0 + 4.0 * (1u64 << 30) as f64;
        let (mut free, total) = g.mem_info();
        // The gradients were just allocated in f32; bf16 linear-weight gradients give back
        // 2 bytes per such parameter.
        let grad_refs: Vec<_> = l.model.params_and_grads().iter().map(|(r, _, _)| r.clone()).collect();
        let saving = GradStore::F32.bytes(&dev, &grad_refs) - GradStore::Bf16Linear.bytes(&dev, &grad_refs);
        let want_bf16 = match plan.grad_dtype.as_str() {
            "auto" => plan.lora_rank == 0 && need > free as f64 && need <= (free + saving) as f64,
            s => s.parse::<GradStore>()? == GradStore::Bf16Linear,
        };
        if want_bf16 {
            l.model.set_grad_store(GradStore::Bf16Linear);
            l.model.zero_grads(&dev)?;
            free = g.mem_info().0;
            eprintln!(
                "am3 sft: linear-layer gradients in bf16 ({:.1} GiB less than f32)",
                saving as f64 / (1u64 << 30) as f64
            );
        }
        if need > free as f64 {
            let gib = |b: f64| b / (1u64 << 30) as f64;
            bail!(
                "not enough GPU memory: the AdamW state (f32 master, exp_avg, exp_avg_sq) of {:.2} B trainable parameters plus ~4 GiB of activations needs {:.1} GiB, but only {:.1} of {:.1} GiB are free on {} after the weights and gradients; use --freeze-vision, --lora-rank N, --grad-dtype bf16, --recompute true or --optim-step per-layer (with --clip 0)",
                n_train as f64 / 1e9, gib(need), gib(free as f64), gib(total as f64), g.name
            );
        }
    }
    let mut opt = Optimizer::new(&dev, hp, &l.model.trainable_entries(), &trainable)?;

    let mut start = 0u64;
    let mut resumed_from = None;
    match rd.start()? {
        Start::Resume { checkpoint: ck } => {
            let path = ck.join("trainer_state.json");
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let saved =
                exact_json::parse(&text).with_context(|| format!("{}: bad trainer_state.json", ck.display()))?;
            require_same_settings(saved.get("plan").unwrap_or(&Value::Null), &serde_json::to_value(&plan)?, &ck)?;
            let st: TrainerState =
                serde_json::from_value(saved).with_context(|| format!("{}: bad trainer_state.json", ck.display()))?;
            st.data_id.require_same(&data_id, "--data", &ck)?;
            st.model_id.require_same(&model_id, "--model", &ck)?;
            if st.step == 0 || st.step > plan.steps {
                bail!("{}: step {} is outside the run's 1..={}", path.display(), st.step, plan.steps);
            }
            let params = l.model.params_mut();
            opt.load(&dev, &ck.join("train_state"), params, st.step)?;
            start = st.step;
            eprintln!("am3 sft: resuming from {} (step {start})", ck.display());
            resumed_from = Some(ck);
        }
        Start::Fresh => rd.begin_fresh()?,
    }
    if let (Some(ck), true) = (&resumed_from, start == plan.steps) {
        // A finished run: only a final line a kill cut off is still to write.
        let done = std::fs::metadata(rd.metrics_path()).is_ok()
            && read_metrics(rd.metrics_path())?.last().is_some_and(|v| {
                v.get("step").and_then(Value::as_u64) == Some(plan.steps) && v.get("refusal_loss").is_some()
            });
        if !done {
            let mut metrics = rd.metrics(start)?;
            let r1 = eval_nll(&dev, &mut l.model, &examples, Some(Kind::Refusal), plan.batch_tokens)?;
            metrics.write_value(&serde_json::json!({"step": plan.steps, "refusal_loss": r1}))?;
            metrics.sync()?;
        }
        eprintln!("am3 sft: the run in {} is already complete ({} steps)", out.display(), plan.steps);
        return Ok(ck.clone());
    }
    let mut metrics = rd.metrics(start)?;
    let n_params: usize = l.model.param_entries().iter().map(|(r, _)| r.numel()).sum();
    eprintln!(
        "am3 sft: {} examples from {}, {} steps, {:.2}M parameters ({:.2}M trainable) on {}",
        examples.len(),
        data.display(),
        plan.steps,
        n_params as f64 / 1e6,
        opt.num_params() as f64 / 1e6,
        dev.name()
    );
    if start == 0 {
        let r0 = eval_nll(&dev, &mut l.model, &examples, Some(Kind::Refusal), plan.batch_tokens)?;
        metrics.write_value(&serde_json::json!({"step": 0, "refusal_loss": r0}))?;
    }

    let bar = Progress::new(plan.steps, "sft");
    let end = args.stop_after.map_or(plan.steps, |k| (start + k).min(plan.steps));
    let mut last_ck = None;
    let ids = (&data_id, &model_id);
    for step in start..end {
        let t0 = Instant::now();
        l.model.zero_grads(&dev)?;
        let (mut nll, mut ntok, mut tokens) = (0.0, 0.0, 0usize);
        let group = &mbs[step as usize * plan.grad_accum..(step as usize + 1) * plan.grad_accum];
        let n_step: f64 = group.iter().flatten().map(|&i| examples[i].n_targets() as f64).sum();
        let lr = sched.lr(step);
        let rep = if plan.per_layer() {
            // One micro-batch (check_optim_step): its backward runs the step.
            let mut ls = opt.begin_layered(lr, 1.0 / n_step.max(1.0));
            for mb in group {
                let refs: Vec<&Example> = mb.iter().map(|&i| &examples[i]).collect();
                let p = pack(&refs);
                tokens += p.tokens();
                let (a, b) = nll_micro_batch_stepped(&dev, &mut l.model, &p, &rc, &mut |pg| ls.apply(&dev, pg))?;
                nll += a;
                ntok += b;
            }
            ls.finish()?
        } else {
            for mb in group {
                let refs: Vec<&Example> = mb.iter().map(|&i| &examples[i]).collect();
                let p = pack(&refs);
                tokens += p.tokens();
                let (a, b) = nll_micro_batch(&dev, &mut l.model, &p, &rc, true)?;
                nll += a;
                ntok += b;
            }
            opt.step(&dev, l.model.params_and_grads(), lr, 1.0 / n_step.max(1.0), plan.clip)?
        };
        dev.sync()?;
        let dt = t0.elapsed().as_secs_f64();
        let loss = nll / ntok.max(1.0);
        metrics.write(&StepMetrics {
            step: step + 1,
            loss,
            lr,
            grad_norm: rep.grad_norm,
            tokens_per_s: tokens as f64 / dt,
            memory_bytes: memory_in_use(&dev),
            extra: Default::default(),
        })?;
        bar.update(step + 1, &format!("loss {loss:.4} lr {lr:.2e} |g| {:.3}", rep.grad_norm));
        if (step + 1) % plan.save_every == 0 || step + 1 == plan.steps {
            metrics.sync()?;
            last_ck = Some(save_checkpoint(&dev, &rd, step + 1, &l, &opt, &plan, &data, args.model.as_deref(), ids)?);
        }
    }
    if end == plan.steps {
        let r1 = eval_nll(&dev, &mut l.model, &examples, Some(Kind::Refusal), plan.batch_tokens)?;
        metrics.write_value(&serde_json::json!({"step": plan.steps, "refusal_loss": r1}))?;
        bar.finish(&format!("done: refusal loss {r1:.4}"));
    } else {
        bar.finish("stopped");
    }
    metrics.sync()?;
    match last_ck {
        Some(c) => Ok(c),
        None => rd.latest_checkpoint()?.with_context(|| format!("no checkpoint was written to {}", out.display())),
    }
}

pub fn memory_in_use(dev: &Device) -> Option<u64> {
    match dev {
        Device::Cuda(g) => {
            let (free, total) = g.mem_info();
            Some((total - free) as u64)
        }
        Device::Cpu => {
            let s = std::fs::read_to_string("/proc/self/status").ok()?;
            let kb: u64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        }
    }
}

/// The newest complete checkpoint in `out` (see `run_dir::latest_checkpoint`).
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    run_dir::latest_checkpoint(out)
}

/// Writes `out/checkpoint-NNNNNN` atomically: the HF layout (sharded safetensors + index,
/// config, tokenizer and processor files) plus `train_state/`, `trainer_state.json` and the
/// checksums of both; then points `out/latest` at it.
#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    dev: &Device, rd: &RunDir, step: u64, l: &Loaded, opt: &Optimizer, plan: &SftPlan, data: &Path,
    model_dir: Option<&Path>, ids: (&Identity, &Identity),
) -> Result<PathBuf> {
    rd.save_checkpoint(step, &RESUME_STATE, |tmp| {
        let how: LoraSave = if plan.lora_rank > 0 { plan.lora_save.parse()? } else { LoraSave::Merged };
        let base = if how == LoraSave::Adapter {
            super::export::adapter_base(dev, l, rd.path(), model_dir)?
        } else {
            String::new()
        };
        l.model.save_trained(dev, tmp, if dev.is_cuda() { SaveDtype::BF16 } else { SaveDtype::F32 }, how, &base)?;
        save_side_files(l, tmp)?;
        opt.save(dev, &tmp.join("train_state"))?;
        let st = TrainerState {
            step,
            plan: plan.clone(),
            data: data.to_path_buf(),
            model: model_dir.map(Path::to_path_buf),
            data_id: ids.0.clone(),
            model_id: ids.1.clone(),
        };
        write_atomic(&tmp.join("trainer_state.json"), serde_json::to_string_pretty(&st)?.as_bytes())
    })
}

/// A Qwen2.5-VL model's weights as HF checkpoint tensors (canonical names), in `dtype`, shards
/// of at most 5 GB, and its config.json (`VlModel::save` for either family).
pub fn save_model(dev: &Device, model: &QwenVl, dir: &Path, dtype: SaveDtype) -> Result<()> {
    save_weights(dev, model.param_entries(), &|n| n.to_string(), dir, dtype)?;
    model.cfg.save_as(dir, super::lora::hf_dtype(dtype))
}

pub fn save_side_files(l: &Loaded, dir: &Path) -> Result<()> {
    l.tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("saving tokenizer.json: {e}"))?;
    match &l.src_dir {
        Some(src) => {
            // Qwen's and llava-hf's processor and tokenizer files, whichever the source has.
            for f in [
                "preprocessor_config.json",
                "processor_config.json",
                "tokenizer_config.json",
                "generation_config.json",
                "chat_template.json",
                "chat_template.jinja",
                "special_tokens_map.json",
                "added_tokens.json",
                "tokenizer.model",
                "vocab.json",
                "merges.txt",
            ] {
                if src.join(f).is_file() {
                    std::fs::copy(src.join(f), dir.join(f)).with_context(|| format!("copying {f}"))?;
                }
            }
        }
        None => {
            std::fs::write(dir.join("preprocessor_config.json"), tiny::PREPROCESSOR_JSON)?;
            // The embedded tiny model: its config follows from the tokenizer.
            let cfg = tiny::config(&l.tok)?;
            let gen = serde_json::json!({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": false});
            std::fs::write(dir.join("generation_config.json"), serde_json::to_string_pretty(&gen)?)?;
            super::export::write_tiny_hf_files(&l.tok, dir)?;
        }
    }
    Ok(())
}

//! `am3 grpo`'s settings: the clap/TOML arguments (`GrpoArgs`), their resolution and range
//! checks into the resolved `GrpoPlan` (and the judge's config), and the hyper-parameters the
//! plan gives the loss, the rewards and the sampler.

use crate::grpo::reward::{RewardHyper, TurnWeighting};
use crate::judge::config::JudgeConfig;
use crate::models::common::params::GradStore;
use crate::ops::grpo::{Aggregation, GrpoHyper};
use crate::ops::sample::SampleParams;
use crate::stages::lora::resolve_lora;
use crate::tensor::DevicePref;
use crate::train::flags::{float_in, int_in, End};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoArgs {
    /// Start checkpoint (HF layout). Default: the demo SFT checkpoint (runs/sft/latest).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt dialogues (JSON Lines; user turns, assistant turns optional). Default: data/demo/grpo.jsonl.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory (checkpoints, metrics.jsonl). Default: runs/grpo.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, value_enum)]
    #[serde(skip)]
    pub device: Option<DevicePref>,
    /// TOML file with any of these settings (underscores) and a [judge] table.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// rules | http | model (default rules).
    #[arg(long)]
    pub judge: Option<String>,
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub dialogues_per_step: Option<usize>,
    /// Rollouts per dialogue (N).
    #[arg(long)]
    pub n: Option<usize>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub ppo_epochs: Option<usize>,
    /// Rollouts per optimizer step.
    #[arg(long)]
    pub mini_batch: Option<usize>,
    /// Tokens per packed micro-batch (gradient accumulation inside a mini-batch).
    #[arg(long)]
    pub batch_tokens: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub lambda: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub tau: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub beta_help: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub eps_low: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub eps_high: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub beta_kl: Option<f64>,
    /// variance | mean | min-mean | last.
    #[arg(long)]
    pub turn_weighting: Option<String>,
    /// token-mean | seq-mean.
    #[arg(long)]
    pub loss_agg: Option<String>,
    /// Leave out groups whose rewards are all equal (no signal).
    #[arg(long)]
    pub skip_flat: Option<bool>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub save_every: Option<u64>,
    #[arg(long, allow_negative_numbers = true)]
    pub clip: Option<f64>,
    #[arg(long)]
    pub recompute: Option<bool>,
    /// Do not update the vision tower (no AdamW state for it; default false, as in `am3 sft`).
    #[arg(long)]
    pub freeze_vision: Option<bool>,
    /// Rollouts decoded at once (KV-cache slots).
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// LoRA rank (0: full fine-tune). The reference is then the base weights (adapters off).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Comma-separated projections (default: the seven of every text layer).
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// merged | adapter.
    #[arg(long)]
    pub lora_save: Option<String>,
    /// auto | f32 | bf16: storage of the linear-layer weight gradients (as `am3 sft`); auto picks
    /// bf16 on a GPU when a full fine-tune's f32 gradients would not fit.
    #[arg(long)]
    pub grad_dtype: Option<String>,
    /// whole (the default) | per-layer: each decoder layer is updated as soon as its gradient is
    /// final (as `am3 sft`); needs --clip 0, a full fine-tune, and every mini-batch in one
    /// micro-batch (--batch-tokens).
    #[arg(long)]
    pub optim_step: Option<String>,
    #[arg(long, conflicts_with = "overwrite")]
    #[serde(skip)]
    pub resume: bool,
    /// Replace an earlier run in --out (its checkpoints and metrics) instead of refusing.
    #[arg(long)]
    #[serde(skip)]
    pub overwrite: bool,
    /// Stop after this many steps of this run (tests, time-boxed jobs).
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub stop_after: Option<u64>,
}

/// Resolved settings (saved in every checkpoint; `--resume` requires the same).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GrpoPlan {
    pub judge: String,
    pub steps: u64,
    pub dialogues_per_step: usize,
    pub n: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub lr: f64,
    pub ppo_epochs: usize,
    pub mini_batch: usize,
    pub batch_tokens: usize,
    pub lambda: f64,
    pub tau: f64,
    pub beta_help: f64,
    pub eps_low: f64,
    pub eps_high: f64,
    pub beta_kl: f64,
    pub adv_eps: f64,
    pub turn_weighting: TurnWeighting,
    pub loss_agg: String,
    pub skip_flat: bool,
    pub seed: u64,
    pub save_every: u64,
    pub clip: f64,
    pub recompute: bool,
    #[serde(default)]
    pub freeze_vision: bool,
    pub max_batch: usize,
    #[serde(default)]
    pub lora_rank: usize,
    #[serde(default)]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_targets: Vec<String>,
    #[serde(default)]
    pub lora_save: String,
    #[serde(default = "auto")]
    pub grad_dtype: String,
    /// whole | per-layer; not written when whole (older runs resume unchanged).
    #[serde(default = "crate::train::optim::whole_step", skip_serializing_if = "crate::train::optim::is_whole_step")]
    pub optim_step: String,
}

impl GrpoPlan {
    /// `--optim-step per-layer`.
    pub fn per_layer(&self) -> bool {
        crate::train::optim::is_per_layer_step(&self.optim_step)
    }
}

fn auto() -> String {
    "auto".into()
}

impl GrpoArgs {
    /// Flags over the TOML file over the defaults (see the README for where each comes from).
    pub fn resolve(mut self) -> Result<(GrpoArgs, GrpoPlan, JudgeConfig)> {
        let mut jcfg = JudgeConfig::default();
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            jcfg = JudgeConfig::from_toml(&text).with_context(|| path.display().to_string())?;
            let mut table: toml::Table =
                toml::from_str(&text).with_context(|| format!("{}: bad GRPO config", path.display()))?;
            table.remove("judge");
            let file: GrpoArgs = table.try_into().with_context(|| format!("{}: bad GRPO config", path.display()))?;
            macro_rules! merge { ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f.clone(); } )* } }
            merge!(
                model,
                data,
                out,
                judge,
                steps,
                dialogues_per_step,
                n,
                max_new_tokens,
                temperature,
                top_p,
                top_k,
                lr,
                ppo_epochs,
                mini_batch,
                batch_tokens,
                lambda,
                tau,
                beta_help,
                eps_low,
                eps_high,
                beta_kl,
                turn_weighting,
                loss_agg,
                skip_flat,
                seed,
                save_every,
                clip,
                recompute,
                freeze_vision,
                max_batch,
                lora_rank,
                lora_alpha,
                lora_targets,
                lora_save,
                grad_dtype,
                optim_step
            );
        }
        let steps = int_in("--steps", self.steps.unwrap_or(8), 1, 100_000_000)?;
        let n = int_in("--n", self.n.unwrap_or(8), 1, 4096)?;
        let loss_agg = self.loss_agg.clone().unwrap_or_else(|| "token-mean".into());
        agg_of(&loss_agg)?;
        let judge = self.judge.clone().unwrap_or_else(|| jcfg.kind.clone());
        let (lora_rank, lora_alpha, lora_targets, lora_save) =
            resolve_lora(self.lora_rank, self.lora_alpha, self.lora_targets.as_deref(), self.lora_save.as_deref())?;
        let plan = GrpoPlan {
            judge,
            steps,
            dialogues_per_step: int_in("--dialogues-per-step", self.dialogues_per_step.unwrap_or(8), 1, 1 << 20)?,
            n,
            max_new_tokens: int_in("--max-new-tokens", self.max_new_tokens.unwrap_or(32), 1, 1 << 20)?,
            temperature: f32_in("--temperature", self.temperature.unwrap_or(1.0), 1e-3, 100.0)?,
            top_p: f32_in("--top-p", self.top_p.unwrap_or(1.0), 1e-6, 1.0)?,
            top_k: self.top_k.unwrap_or(0),
            lr: float_in(
                "--lr",
                self.lr.unwrap_or(if self.model.is_none() { 1e-3 } else { 1e-6 }),
                0.0,
                End::Closed,
                1.0,
                End::Closed,
            )?,
            ppo_epochs: int_in("--ppo-epochs", self.ppo_epochs.unwrap_or(1), 1, 64)?,
            mini_batch: int_in("--mini-batch", self.mini_batch.unwrap_or(8), 1, 1 << 20)?,
            batch_tokens: int_in("--batch-tokens", self.batch_tokens.unwrap_or(4096), 16, 1 << 30)?,
            lambda: float_in("--lambda", self.lambda.unwrap_or(1.0), 0.0, End::Closed, 1e6, End::Closed)?,
            tau: float_in("--tau", self.tau.unwrap_or(0.5), 0.0, End::Closed, 1.0, End::Closed)?,
            beta_help: float_in("--beta-help", self.beta_help.unwrap_or(0.5), 0.0, End::Closed, 1e6, End::Closed)?,
            eps_low: float_in("--eps-low", self.eps_low.unwrap_or(0.2), 0.0, End::Closed, 1.0, End::Closed)?,
            eps_high: float_in("--eps-high", self.eps_high.unwrap_or(0.28), 0.0, End::Closed, 10.0, End::Closed)?,
            beta_kl: float_in("--beta-kl", self.beta_kl.unwrap_or(0.04), 0.0, End::Closed, 1e3, End::Closed)?,
            adv_eps: 1e-4,
            turn_weighting: self.turn_weighting.as_deref().unwrap_or("variance").parse()?,
            loss_agg,
            skip_flat: self.skip_flat.unwrap_or(true),
            seed: self.seed.unwrap_or(0),
            save_every: int_in("--save-every", self.save_every.unwrap_or(steps), 1, u64::MAX)?,
            clip: float_in("--clip", self.clip.unwrap_or(1.0), 0.0, End::Closed, 1e9, End::Closed)?,
            recompute: self.recompute.unwrap_or(false),
            freeze_vision: self.freeze_vision.unwrap_or(false),
            max_batch: int_in("--max-batch", self.max_batch.unwrap_or(64).max(n), 1, 1 << 20)?,
            lora_rank,
            lora_alpha,
            lora_targets,
            lora_save,
            grad_dtype: {
                let g = self.grad_dtype.clone().unwrap_or_else(auto);
                if g != "auto" {
                    g.parse::<GradStore>().context("--grad-dtype (auto, f32 or bf16)")?;
                }
                g
            },
            optim_step: self.optim_step.clone().unwrap_or_else(crate::train::optim::whole_step),
        };
        crate::train::optim::check_optim_step(&plan.optim_step, plan.clip, 1, plan.lora_rank)?;
        Ok((self, plan, jcfg))
    }
}

/// `float_in` over a closed range for an f32 setting (through its shortest decimal, so the
/// message shows the value as typed).
fn f32_in(flag: &str, v: f32, lo: f64, hi: f64) -> Result<f32> {
    let x: f64 = v.to_string().parse().unwrap_or(f64::NAN);
    float_in(flag, x, lo, End::Closed, hi, End::Closed)?;
    Ok(v)
}

pub(super) fn agg_of(s: &str) -> Result<Aggregation> {
    match s {
        "token-mean" => Ok(Aggregation::TokenMean),
        "seq-mean" => Ok(Aggregation::SeqMean),
        _ => bail!("--loss-agg {s:?}: expected token-mean or seq-mean"),
    }
}

impl GrpoPlan {
    pub fn hyper(&self) -> GrpoHyper {
        GrpoHyper {
            lambda: self.lambda,
            tau: self.tau,
            beta_help: self.beta_help,
            eps_low: self.eps_low,
            eps_high: self.eps_high,
            beta_kl: self.beta_kl,
            adv_eps: self.adv_eps,
        }
    }
    pub fn reward(&self) -> RewardHyper {
        RewardHyper {
            lambda: self.lambda,
            tau: self.tau,
            beta_help: self.beta_help,
            adv_eps: self.adv_eps,
            weighting: self.turn_weighting,
        }
    }
    pub fn sampling(&self) -> Result<SampleParams> {
        SampleParams::new(self.temperature, self.top_k, self.top_p)
    }
}

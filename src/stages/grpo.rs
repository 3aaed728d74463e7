//! `am3 grpo`: multi-turn GRPO in one process. Each step takes `dialogues_per_step` prompt
//! dialogues, generates N rollouts of every assistant turn with the rollout engine (the
//! policy's own weights, no copy), has the judge score every turn, turns the scores into
//! turn-aware rewards and group advantages (grpo::reward), computes the old policy's log-probs
//! with the training forward and the frozen reference's, and runs `ppo_epochs` passes of the
//! clipped surrogate + k3 KL over mini-batches (grpo::update). Checkpoints, `--resume`,
//! progress and metrics work as in `am3 sft`; the data order and every random stream follow
//! from (seed, step), so a resumed CPU run equals an uninterrupted one bit for bit.

use crate::checkpoint::safetensors_io::SaveDtype;
use crate::data::dataset::{load_jsonl_with, LoadOptions, Purpose, Sample};
use crate::grpo::judged::judged_rollouts;
use crate::grpo::memory::MemoryPlan;
use crate::grpo::reward::{group_reward, weight_stats, RewardHyper, TurnWeighting};
use crate::grpo::update::{self, TrainRow};
use crate::judge::stream::Streaming;
use crate::judge::{config::JudgeConfig, from_config, Judge, JudgeOutput};
use crate::models::common::lora::LoraConfig;
use crate::models::common::params::GradStore;
use crate::models::qwen2_5_vl::model::Recompute;
use crate::ops::adamw::AdamW;
use crate::ops::grpo::{Aggregation, GrpoHyper};
use crate::ops::sample::SampleParams;
use crate::rng::Rng;
use crate::rollout::engine::cache_plan;
use crate::rollout::{generate_with, DialogueSpec, Rollout, RolloutConfig};
use crate::stages::lora::{resolve_lora, LoraSave};
use crate::stages::model::VlModel;
use crate::stages::sft::{latest_checkpoint, load_model, memory_in_use, save_side_files, Loaded};
use crate::tensor::{Device, DevicePref};
use crate::train::atomic::write_file as write_atomic;
use crate::train::exact_json;
use crate::train::flags::{float_in, int_in, End};
use crate::train::optim::{slot_key, Optimizer};
use crate::train::progress::Progress;
use crate::train::run_dir::{require_same_settings, Identity, Mode, RunDir, Start};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    #[serde(default = "whole", skip_serializing_if = "is_whole")]
    pub optim_step: String,
}

fn whole() -> String {
    "whole".into()
}

fn is_whole(s: &str) -> bool {
    s == "whole"
}

impl GrpoPlan {
    /// `--optim-step per-layer`.
    pub fn per_layer(&self) -> bool {
        self.optim_step == "per-layer"
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
            optim_step: self.optim_step.clone().unwrap_or_else(whole),
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

fn agg_of(s: &str) -> Result<Aggregation> {
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

#[derive(Serialize, Deserialize)]
struct GrpoState {
    step: u64,
    plan: GrpoPlan,
    data: PathBuf,
    /// The run's start model (the reference), not the checkpoint.
    model: PathBuf,
    /// AdamW steps taken (several per GRPO step: epochs × mini-batches).
    opt_steps: u64,
    data_id: Identity,
    model_id: Identity,
}

/// A 64-bit mix of the run seed with a counter (data order, sampling and shuffles per step).
fn mix(seed: u64, k: u64) -> u64 {
    let mut r = Rng::new(seed ^ k.wrapping_mul(0x9E3779B97F4A7C15));
    r.next_u64()
}

/// The dialogues of step `step`: consecutive slices of a per-epoch shuffle of the file.
fn pick(len: usize, per_step: usize, seed: u64, step: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(per_step);
    for k in 0..per_step {
        let g = step as usize * per_step + k;
        let (epoch, at) = (g / len, g % len);
        let mut order: Vec<usize> = (0..len).collect();
        let mut rng = Rng::new(mix(seed, 1_000_000 + epoch as u64));
        for i in (1..len).rev() {
            order.swap(i, rng.below(i + 1));
        }
        out.push(order[at]);
    }
    out
}

/// The default start model: the demo SFT's newest checkpoint.
fn default_model() -> Result<PathBuf> {
    match latest_checkpoint(Path::new("runs/sft"))? {
        Some(p) => Ok(p),
        None => bail!("am3 grpo: no --model and no SFT checkpoint in runs/sft; run `am3 sft` first (or `am3 demo` for the whole pipeline)"),
    }
}

/// What one step measured (also the metrics line).
pub struct StepReport {
    pub json: serde_json::Value,
}

/// The training state a run carries from step to step.
pub struct Trainer {
    pub plan: GrpoPlan,
    pub l: Loaded,
    reference: Option<VlModel>,
    opt: Optimizer,
    judge: Box<dyn Judge>,
    samples: Vec<Sample>,
    specs: Vec<DialogueSpec>,
    rc: Recompute,
}

impl Trainer {
    pub fn new(dev: &Device, plan: GrpoPlan, model_dir: &Path, data: &Path, jcfg: &JudgeConfig) -> Result<Trainer> {
        let mut l = load_model(dev, Some(model_dir), plan.seed)?;
        if plan.lora_rank > 0 {
            let lc = LoraConfig {
                rank: plan.lora_rank,
                alpha: plan.lora_alpha,
                targets: plan.lora_targets.clone(),
                seed: plan.seed,
            };
            l.model.enable_lora(dev, &lc)?;
        }
        // Full fine-tune: a frozen copy of the start weights. LoRA: the policy with its adapters
        // off is the reference, so no copy.
        let reference =
            if plan.beta_kl > 0.0 && plan.lora_rank == 0 { Some(VlModel::load(dev, model_dir)?) } else { None };
        let loaded = load_jsonl_with(data, LoadOptions { skip_bad: false, purpose: Purpose::Prompts })?;
        if loaded.samples.is_empty() {
            bail!("{}: no dialogues", data.display());
        }
        let specs: Vec<DialogueSpec> = loaded.samples.iter().map(DialogueSpec::from_sample).collect();
        let judge = from_config(&plan.judge, jcfg, dev)?;
        // Gradient storage before the gradients exist: bf16 linear-weight gradients when asked,
        // or (auto) when a full fine-tune's f32 gradients, masters and moments would not fit.
        let bf16 = match plan.grad_dtype.as_str() {
            "auto" => match dev {
                Device::Cuda(g) if plan.lora_rank == 0 => {
                    // The weights (and the reference) are loaded already; 16 B per parameter are
                    // f32 gradients plus master, exp_avg and exp_avg_sq.
                    let n: usize = l.model.param_entries().iter().map(|(r, _)| r.numel()).sum();
                    (n * 16) as f64 > 0.85 * g.mem_info().0 as f64
                }
                _ => false,
            },
            s => s.parse::<GradStore>()? == GradStore::Bf16Linear,
        };
        if bf16 {
            l.model.set_grad_store(GradStore::Bf16Linear);
        }
        let has_grad = l.model.grad_keys(dev)?;
        if plan.per_layer() {
            // Drop the whole-model gradients grad_keys allocated before the optimizer state exists.
            l.model.set_per_layer_grads(true);
            l.model.zero_grads(dev)?;
        }
        let trainable = move |r: &crate::models::common::params::ParamRef| has_grad.contains(&slot_key(r));
        let hp = AdamW { lr: plan.lr as f32, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let opt = Optimizer::new(dev, hp, &l.model.trainable_entries(), &trainable)?;
        let rc = if plan.recompute { Recompute::all(l.model.tdims().n_layers) } else { Recompute::default() };
        // The memory plan, printed always and checked on a GPU before the first step.
        let slots = plan.max_batch.min(plan.dialogues_per_step * plan.n).max(plan.n);
        let (max_len, kv) = cache_plan(dev, &l.model, &l.tok, &l.pp, &specs, slots, plan.max_new_tokens)?;
        let trainable = opt.num_params();
        let mem = MemoryPlan::new(
            dev,
            &l.model,
            trainable,
            reference.is_some(),
            kv,
            plan.batch_tokens.max(max_len),
            plan.recompute,
            l.model.grad_store(),
        );
        let mem = if plan.per_layer() { mem.per_layer(dev, &l.model) } else { mem };
        eprintln!("am3 grpo: memory plan ({slots} slots × {max_len} tokens): {}", mem.describe());
        mem.check(dev, mem.weights + mem.reference + mem.grads + mem.optimizer)?;
        Ok(Trainer { plan, l, reference, opt, judge, samples: loaded.samples, specs, rc })
    }

    /// Replaces the judge (tests; a judge built outside the config).
    pub fn set_judge(&mut self, j: Box<dyn Judge>) {
        self.judge = j;
    }

    /// One GRPO step: rollouts, judging, rewards, old/reference log-probs, update.
    pub fn step(&mut self, dev: &Device, step: u64) -> Result<StepReport> {
        let p = self.plan.clone();
        let t0 = Instant::now();
        let picked = pick(self.specs.len(), p.dialogues_per_step, p.seed, step);
        let specs: Vec<DialogueSpec> = picked.iter().map(|&i| self.specs[i].clone()).collect();
        let cfg = RolloutConfig {
            n: p.n,
            max_new_tokens: p.max_new_tokens,
            sample: p.sampling()?,
            seed: mix(p.seed, step),
            max_batch: p.max_batch,
            max_len: None,
        };
        // Each dialogue goes to the judge once its N rollouts are done (the http judge then
        // works while the engine decodes the rest).
        let mut stream = Streaming::new(self.judge.as_mut());
        let mut done: Vec<Vec<Rollout>> = vec![Vec::new(); specs.len()];
        let mut order: Vec<usize> = Vec::new();
        let samples = &self.samples;
        let (rollouts, mut bank, rs) = generate_with(
            dev,
            &self.l.model,
            &self.l.tok,
            &self.l.pp,
            &specs,
            &cfg,
            &mut |_, _| {},
            &mut |r: &Rollout| {
                done[r.dialogue].push(r.clone());
                if done[r.dialogue].len() == p.n {
                    let g = &mut done[r.dialogue];
                    g.sort_by_key(|r| r.index);
                    let refs: Vec<&Rollout> = g.iter().collect();
                    stream.push(judged_rollouts(&samples[picked[r.dialogue]], &refs))?;
                    order.push(r.dialogue);
                }
                Ok(())
            },
        )?;
        let t_roll = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let streamed = stream.collect()?;
        // Back to dialogue order.
        let mut judged = JudgeOutput {
            requests: streamed.requests,
            failures: streamed.failures,
            retries: streamed.retries,
            scores: vec![Vec::new(); specs.len()],
        };
        for (k, sc) in order.iter().zip(streamed.scores) {
            judged.scores[*k] = sc;
        }
        let groups: Vec<Vec<&Rollout>> =
            (0..specs.len()).map(|d| rollouts.iter().filter(|r| r.dialogue == d).collect()).collect();
        let t_judge = t1.elapsed().as_secs_f64();
        // Rewards per group, then the rows the update trains on.
        let mut rows: Vec<TrainRow> = Vec::new();
        let (mut rewards, mut adv_sq, mut flat_groups, mut missing) = (Vec::new(), 0.0, 0usize, 0usize);
        let max_t = specs.iter().map(|s| s.turns.len()).max().unwrap_or(0);
        let (mut s_sum, mut h_sum, mut cnt) = (vec![0.0; max_t], vec![0.0; max_t], vec![0usize; max_t]);
        let mut alpha: Vec<f64> = vec![0.0; max_t];
        let (mut ent, mut amin, mut amax) = (0.0, f64::INFINITY, f64::NEG_INFINITY);
        for (d, g) in groups.iter().enumerate() {
            let sc: Vec<Vec<Option<(f64, f64)>>> = (0..g.len())
                .map(|i| {
                    judged
                        .scores
                        .get(d)
                        .and_then(|x| x.get(i))
                        .map(|turns| turns.iter().map(|t| t.as_ref().map(|t| (t.safety, t.help))).collect())
                        .unwrap_or_default()
                })
                .collect();
            for turns in &sc {
                for (t, x) in turns.iter().enumerate() {
                    if let Some((s, h)) = x {
                        s_sum[t] += s;
                        h_sum[t] += h;
                        cnt[t] += 1;
                    }
                }
            }
            let gr = group_reward(&sc, &p.reward());
            missing += gr.missing;
            let (e, lo, hi) = weight_stats(&gr);
            ent += e / groups.len() as f64;
            amin = amin.min(lo);
            amax = amax.max(hi);
            for (t, w) in gr.turn_weight.iter().enumerate() {
                alpha[t] += w / groups.len() as f64;
            }
            rewards.extend_from_slice(&gr.reward);
            if gr.flat {
                flat_groups += 1;
                if p.skip_flat {
                    continue;
                }
            }
            for (r, &a) in g.iter().zip(&gr.advantage) {
                adv_sq += a * a;
                let ex = r.example(&self.l.model, &mut bank, &specs[d].id)?;
                let mut sampler = vec![0f32; ex.len()];
                for t in &r.turns {
                    for (k, pos) in t.span.clone().enumerate() {
                        sampler[pos - 1] = t.logps[k];
                    }
                }
                rows.push(TrainRow {
                    example: ex,
                    advantage: a,
                    sampler_logp: sampler,
                    old_logp: Vec::new(),
                    ref_logp: Vec::new(),
                });
            }
        }
        bank.release_embeds();
        drop(bank);
        // Mini-batches (a seeded shuffle of the rows) and their micro-batches.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        let mut rng = Rng::new(mix(p.seed, 2_000_000 + step));
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let minis: Vec<Vec<Vec<usize>>> =
            order.chunks(p.mini_batch).map(|c| update::micro(&rows, c, p.batch_tokens)).collect();
        // Old-policy and reference log-probs with the update's packing.
        let t2 = Instant::now();
        for mbs in &minis {
            let old = update::logprobs(dev, &self.l.model, &rows, mbs, p.temperature, &self.rc)?;
            for (i, lp) in old.into_iter().enumerate() {
                if !lp.is_empty() {
                    rows[i].old_logp = lp;
                }
            }
        }
        let t_old = t2.elapsed().as_secs_f64();
        let t3 = Instant::now();
        for mbs in &minis {
            let refs = match &self.reference {
                Some(m) => update::logprobs(dev, m, &rows, mbs, p.temperature, &self.rc)?,
                None if p.beta_kl > 0.0 && p.lora_rank > 0 => {
                    self.l.model.without_adapters(|m| update::logprobs(dev, m, &rows, mbs, p.temperature, &self.rc))?
                }
                None => rows.iter().map(|_| Vec::new()).collect(),
            };
            for (i, lp) in refs.into_iter().enumerate() {
                if !lp.is_empty() {
                    rows[i].ref_logp = lp;
                }
            }
        }
        for r in rows.iter_mut() {
            if r.ref_logp.is_empty() {
                r.ref_logp = r.old_logp.clone();
            }
        }
        let t_ref = t3.elapsed().as_secs_f64();
        let (mut gap_sum, mut gap_max, mut gap_n) = (0.0f64, 0.0f64, 0usize);
        for r in &rows {
            for t in 0..r.example.len() {
                if r.example.weights[t] != 0.0 {
                    let g = (r.sampler_logp[t] as f64 - r.old_logp[t] as f64).abs();
                    gap_sum += g;
                    gap_max = gap_max.max(g);
                    gap_n += 1;
                }
            }
        }
        // The update.
        let t4 = Instant::now();
        let agg = agg_of(&p.loss_agg)?;
        let (mut loss, mut kl, mut clip_lo, mut clip_hi, mut entropy, mut first_dev, mut passes, mut gnorm) =
            (0.0, 0.0, 0.0, 0.0, 0.0, f64::NAN, 0usize, 0.0);
        for _epoch in 0..p.ppo_epochs {
            for mbs in &minis {
                self.l.model.zero_grads(dev)?;
                let (hp, model, rc) = (p.hyper(), &mut self.l.model, &self.rc);
                let (st, rep) = if p.per_layer() {
                    // The backward of the mini-batch's one micro-batch runs the optimizer step.
                    let mut ls = self.opt.begin_layered(p.lr, 1.0);
                    let st = update::pass(
                        dev,
                        model,
                        &rows,
                        mbs,
                        p.temperature,
                        &hp,
                        agg,
                        rc,
                        Some(&mut |pg| ls.apply(dev, pg)),
                    )?;
                    (st, ls.finish()?)
                } else {
                    let st = update::pass(dev, model, &rows, mbs, p.temperature, &hp, agg, rc, None)?;
                    (st, self.opt.step(dev, self.l.model.params_and_grads(), p.lr, 1.0, p.clip)?)
                };
                if first_dev.is_nan() {
                    first_dev = st.max_ratio_dev;
                }
                gnorm = rep.grad_norm;
                loss += st.loss;
                kl += st.kl;
                clip_lo += st.clip_low;
                clip_hi += st.clip_high;
                entropy += st.entropy;
                passes += 1;
            }
        }
        dev.sync()?;
        let t_upd = t4.elapsed().as_secs_f64();
        let k = passes.max(1) as f64;
        let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
        let rm = mean(&rewards);
        let rstd = (rewards.iter().map(|r| (r - rm) * (r - rm)).sum::<f64>() / rewards.len().max(1) as f64).sqrt();
        let per_turn = |v: &[f64]| -> Vec<f64> {
            v.iter().zip(&cnt).map(|(s, &c)| if c > 0 { s / c as f64 } else { f64::NAN }).collect()
        };
        let mut len_turn = vec![0.0; max_t];
        let mut len_cnt = vec![0usize; max_t];
        for r in &rollouts {
            for (t, tt) in r.turns.iter().enumerate() {
                len_turn[t] += tt.ids.len() as f64;
                len_cnt[t] += 1;
            }
        }
        let lens: Vec<f64> = len_turn.iter().zip(&len_cnt).map(|(s, &c)| s / c.max(1) as f64).collect();
        let gen_tokens: usize = rollouts.iter().map(|r| r.generated_tokens()).sum();
        let total_s = t0.elapsed().as_secs_f64();
        let json = json!({
            "step": step + 1,
            "reward_mean": rm, "reward_std": rstd,
            "safety_per_turn": per_turn(&s_sum), "help_per_turn": per_turn(&h_sum),
            "alpha_per_turn": alpha, "alpha_min": amin, "alpha_max": amax, "alpha_entropy": ent,
            "adv_std": (adv_sq / rows.len().max(1) as f64).sqrt(),
            "loss": loss / k, "kl": kl / k, "clip_frac_low": clip_lo / k, "clip_frac_high": clip_hi / k, "entropy": entropy / k,
            "ratio_dev_first_pass": if first_dev.is_nan() { 0.0 } else { first_dev },
            "grad_norm": gnorm,
            "response_len_per_turn": lens,
            "cut_frac": rs.cut_turns as f64 / rs.turns.max(1) as f64,
            "judge_failures": judged.failures, "judge_missing": missing, "judge_retries": judged.retries,
            "flat_groups": flat_groups, "rows": rows.len(), "train_tokens": rows.iter().map(|r| r.example.len()).sum::<usize>(),
            "logp_gap_mean": gap_sum / gap_n.max(1) as f64, "logp_gap_max": gap_max,
            "rollout_s": t_roll, "judge_s": t_judge, "old_logp_s": t_old, "ref_logp_s": t_ref, "update_s": t_upd, "step_s": total_s,
            "rollout_tokens_per_s": gen_tokens as f64 / t_roll.max(1e-9),
            "tokens_per_s": gen_tokens as f64 / total_s.max(1e-9),
            "memory_bytes": memory_in_use(dev),
        });
        Ok(StepReport { json })
    }

    /// Writes the checkpoint's files into `tmp` (HF layout + train_state + trainer_state.json).
    fn write_checkpoint(&self, dev: &Device, tmp: &Path, st: &GrpoState) -> Result<()> {
        let how: LoraSave = if self.plan.lora_rank > 0 { self.plan.lora_save.parse()? } else { LoraSave::Merged };
        self.l.model.save_trained(
            dev,
            tmp,
            if dev.is_cuda() { SaveDtype::BF16 } else { SaveDtype::F32 },
            how,
            &crate::stages::lora::base_model_ref(&st.model)?,
        )?;
        save_side_files(&self.l, tmp)?;
        self.opt.save(dev, &tmp.join("train_state"))?;
        write_atomic(tmp.join("trainer_state.json"), serde_json::to_string_pretty(st)?.as_bytes())
    }
}

/// The bundled GRPO prompts.
pub fn demo_prompts() -> PathBuf {
    let local = PathBuf::from("data/demo/grpo.jsonl");
    if local.is_file() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/demo/grpo.jsonl")
}

/// Runs GRPO; returns the final checkpoint directory.
pub fn run(args: GrpoArgs) -> Result<PathBuf> {
    let (args, plan, jcfg) = args.resolve()?;
    let dev = Device::pick(args.device.unwrap_or(DevicePref::Auto))?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs/grpo"));
    let data = args.data.clone().unwrap_or_else(demo_prompts);
    let start_model = match &args.model {
        Some(m) => m.clone(),
        None => default_model()?,
    };
    let rd = RunDir::open(
        &out,
        Mode { resume: args.resume, overwrite: args.overwrite },
        &[("--model", &start_model), ("--data", &data)],
    )?;
    let model_id = Identity::of_model_dir(&start_model)?;
    let mut tr = Trainer::new(&dev, plan.clone(), &start_model, &data, &jcfg)?;
    let images: Vec<PathBuf> = tr.samples.iter().flat_map(|s| s.images.clone()).collect();
    let data_id = Identity::of_data(&data, &images)?;
    let (mut start, mut opt_steps) = (0u64, 0u64);
    match rd.start()? {
        Start::Resume { checkpoint: ck } => {
            let path = ck.join("trainer_state.json");
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let saved =
                exact_json::parse(&text).with_context(|| format!("{}: bad trainer_state.json", ck.display()))?;
            require_same_settings(
                saved.get("plan").unwrap_or(&serde_json::Value::Null),
                &serde_json::to_value(&plan)?,
                &ck,
            )?;
            let st: GrpoState =
                serde_json::from_value(saved).with_context(|| format!("{}: bad trainer_state.json", ck.display()))?;
            st.data_id.require_same(&data_id, "--data", &ck)?;
            st.model_id.require_same(&model_id, "--model", &ck)?;
            if st.step == 0 || st.step > plan.steps {
                bail!("{}: step {} is outside the run's 1..={}", path.display(), st.step, plan.steps);
            }
            (start, opt_steps) = (st.step, st.opt_steps);
            // The trainable tensors (all weights, or the adapters) come back from the f32
            // masters; the model was built from the start weights, which stay the reference.
            let params = tr.l.model.params_mut();
            tr.opt.load(&dev, &ck.join("train_state"), params, opt_steps)?;
            eprintln!("am3 grpo: resuming from {} (step {start})", ck.display());
        }
        Start::Fresh => rd.begin_fresh()?,
    }
    let _ = opt_steps;
    let mut metrics = rd.metrics(start)?;
    eprintln!(
        "am3 grpo: {} dialogues from {}, {} steps × {} dialogues × {} rollouts, judge {}, from {} on {}",
        tr.specs.len(),
        data.display(),
        plan.steps,
        plan.dialogues_per_step,
        plan.n,
        tr.judge.name(),
        start_model.display(),
        dev.name()
    );
    let bar = Progress::new(plan.steps, "grpo");
    let end = args.stop_after.map_or(plan.steps, |k| (start + k).min(plan.steps));
    let mut last = None;
    for step in start..end {
        let rep = tr.step(&dev, step)?;
        metrics.write_value(&rep.json)?;
        let j = &rep.json;
        bar.update(
            step + 1,
            &format!(
                "reward {:.3} kl {:.4} {:.1} tok/s",
                j["reward_mean"].as_f64().unwrap_or(0.0),
                j["kl"].as_f64().unwrap_or(0.0),
                j["tokens_per_s"].as_f64().unwrap_or(0.0)
            ),
        );
        if (step + 1) % plan.save_every == 0 || step + 1 == plan.steps {
            let st = GrpoState {
                step: step + 1,
                plan: plan.clone(),
                data: data.clone(),
                model: start_model.clone(),
                opt_steps: tr.opt.step,
                data_id: data_id.clone(),
                model_id: model_id.clone(),
            };
            last = Some(rd.save_checkpoint(step + 1, &["trainer_state.json", "train_state"], |tmp| {
                tr.write_checkpoint(&dev, tmp, &st)
            })?);
        }
    }
    bar.finish(if end == plan.steps { "done" } else { "stopped" });
    metrics.sync()?;
    match last {
        Some(c) => Ok(c),
        None => rd.latest_checkpoint()?.with_context(|| format!("no checkpoint was written to {}", out.display())),
    }
}

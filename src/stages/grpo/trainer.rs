//! The GRPO `Trainer`: the policy, reference, optimizer, judge and prompts a run carries, one
//! GRPO step (rollouts, judging, rewards, old/reference log-probs, update), and the files of a
//! checkpoint.

use super::args::{agg_of, GrpoPlan};
use crate::checkpoint::safetensors_io::SaveDtype;
use crate::data::dataset::{load_jsonl_with, LoadOptions, Purpose, Sample};
use crate::grpo::judged::judged_rollouts;
use crate::grpo::memory::{MemoryInput, MemoryPlan};
use crate::grpo::reward::{group_reward, weight_stats};
use crate::grpo::update::{self, TrainRow};
use crate::judge::stream::Streaming;
use crate::judge::{config::JudgeConfig, from_config, Judge, JudgeOutput};
use crate::models::common::lora::LoraConfig;
use crate::models::common::params::GradStore;
use crate::models::qwen2_5_vl::model::Recompute;
use crate::ops::adamw::AdamW;
use crate::rng::Rng;
use crate::rollout::engine::cache_plan;
use crate::rollout::{generate_with, DialogueSpec, Hooks, Rollout, RolloutConfig};
use crate::stages::lora::LoraSave;
use crate::stages::model::VlModel;
use crate::stages::sft::{load_model, memory_in_use, save_side_files, Loaded};
use crate::tensor::Device;
use crate::train::atomic::write_file as write_atomic;
use crate::train::optim::{slot_key, Optimizer};
use crate::train::run_dir::Identity;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Serialize, Deserialize)]
pub(super) struct GrpoState {
    pub(super) step: u64,
    pub(super) plan: GrpoPlan,
    pub(super) data: PathBuf,
    /// The run's start model (the reference), not the checkpoint.
    pub(super) model: PathBuf,
    /// AdamW steps taken (several per GRPO step: epochs × mini-batches).
    pub(super) opt_steps: u64,
    pub(super) data_id: Identity,
    pub(super) model_id: Identity,
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

/// What one step measured (also the metrics line).
pub struct StepReport {
    pub json: serde_json::Value,
}

/// The training state a run carries from step to step.
pub struct Trainer {
    pub plan: GrpoPlan,
    pub l: Loaded,
    reference: Option<VlModel>,
    pub(super) opt: Optimizer,
    pub(super) judge: Box<dyn Judge>,
    pub(super) samples: Vec<Sample>,
    pub(super) specs: Vec<DialogueSpec>,
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
        // --freeze-vision: the tower's weights get no optimizer state, are never stepped, and the
        // backward skips the tower.
        l.model.set_frozen_vision(plan.freeze_vision);
        let vision: std::collections::BTreeSet<String> = if plan.freeze_vision {
            l.model
                .param_entries()
                .iter()
                .filter(|(r, _)| l.model.is_vision(&r.name))
                .map(|(r, _)| slot_key(r))
                .collect()
        } else {
            Default::default()
        };
        let trainable = move |r: &crate::models::common::params::ParamRef| {
            has_grad.contains(&slot_key(r)) && !vision.contains(&slot_key(r))
        };
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
            MemoryInput {
                trainable,
                reference: reference.is_some(),
                kv_cache: kv,
                batch_tokens: plan.batch_tokens.max(max_len),
                recompute: plan.recompute,
                store: l.model.grad_store(),
            },
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
            Hooks {
                progress: &mut |_, _| {},
                on_done: &mut |r: &Rollout| {
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
                let (hp, model) = (p.hyper(), &mut self.l.model);
                let cfg = update::PassCfg { temp: p.temperature, hp: &hp, agg, rc: &self.rc };
                let (st, rep) = if p.per_layer() {
                    // The backward of the mini-batch's one micro-batch runs the optimizer step.
                    let mut ls = self.opt.begin_layered(p.lr, 1.0);
                    let st = update::pass(dev, model, &rows, mbs, &cfg, Some(&mut |pg| ls.apply(dev, pg)))?;
                    (st, ls.finish()?)
                } else {
                    let st = update::pass(dev, model, &rows, mbs, &cfg, None)?;
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
    pub(super) fn write_checkpoint(&self, dev: &Device, tmp: &Path, st: &GrpoState) -> Result<()> {
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

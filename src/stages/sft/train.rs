//! The SFT run (`run`): the run directory, model and data, the memory checks, `--resume`, and
//! the step loop with its metrics and checkpoints.

use super::args::SftArgs;
use super::checkpoint::{save_checkpoint, tiny_identity, RunOrigin, TrainerState};
use super::data::{demo_data, encode_data_within, plan_micro_batches};
use super::loss::{eval_nll, nll_micro_batch, nll_micro_batch_stepped};
use super::model_io::load_model;
use crate::data::dataset::Kind;
use crate::models::common::lora::LoraConfig;
use crate::models::common::params::GradStore;
use crate::models::limits;
use crate::models::qwen2_5_vl::model::Recompute;
use crate::ops::adamw::AdamW;
use crate::stages::examples::{pack, Example};
use crate::stages::model::Encoder;
use crate::tensor::{Device, DevicePref};
use crate::train::exact_json;
use crate::train::metrics::{read_metrics, StepMetrics};
use crate::train::optim::slot_key;
use crate::train::optim::Optimizer;
use crate::train::progress::Progress;
use crate::train::run_dir::{require_same_settings, Identity, Mode, RunDir, Start};
use crate::train::schedule::{LrKind, LrSchedule};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    // A frozen tower is not back-propagated through at all (its gradients stay zero).
    l.model.set_frozen_vision(freeze);
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
    let origin = RunOrigin {
        plan: &plan,
        data: &data,
        model_dir: args.model.as_deref(),
        data_id: &data_id,
        model_id: &model_id,
    };
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
            last_ck = Some(save_checkpoint(&dev, &rd, step + 1, &l, &opt, &origin)?);
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

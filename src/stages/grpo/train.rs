//! The GRPO run (`run`): the start model and prompts, the run directory, `--resume`, and the
//! step loop with its metrics and checkpoints.

use super::args::GrpoArgs;
use super::trainer::{GrpoState, Trainer};
use crate::stages::sft::latest_checkpoint;
use crate::tensor::{Device, DevicePref};
use crate::train::exact_json;
use crate::train::progress::Progress;
use crate::train::run_dir::{require_same_settings, Identity, Mode, RunDir, Start};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The default start model: the demo SFT's newest checkpoint.
fn default_model() -> Result<PathBuf> {
    match latest_checkpoint(Path::new("runs/sft"))? {
        Some(p) => Ok(p),
        None => bail!("am3 grpo: no --model and no SFT checkpoint in runs/sft; run `am3 sft` first (or `am3 demo` for the whole pipeline)"),
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

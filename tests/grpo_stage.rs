//! `am3 grpo` on the CPU: the stage's own reward/advantage and loss code against the reference
//! vectors (1e-10 in f64), the ratio exactly 1 on the first pass, a resumed run equal to an
//! uninterrupted one bit for bit, and a judge that fails mid-step survived and counted.
mod common;
#[path = "support/grpo_vectors.rs"]
mod vectors;

use am3safety::grpo::reward::{group_reward, RewardHyper, TurnWeighting};
use am3safety::grpo::update::{row_loss, PassStats, RowTokens};
use am3safety::judge::{Judge, JudgeDialogue, JudgeOutput, PairQuery, PairVerdict, TurnScore};
use am3safety::stages::grpo::{self, GrpoArgs, Trainer};
use am3safety::stages::sft::{self, SftArgs};
use am3safety::tensor::Device;
use common::rel_err64;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[test]
fn reward_and_loss_match_the_reference_vectors() {
    let v = vectors::load();
    let (p, n, t, rows, l) = v.dims();
    let hp = RewardHyper {
        lambda: v.hp.lambda,
        tau: v.hp.tau,
        beta_help: v.hp.beta_help,
        adv_eps: v.hp.adv_eps,
        weighting: TurnWeighting::Variance,
    };
    let (safe, help) = (v.get("safe"), v.get("help"));
    let mut got: [Vec<f64>; 6] = Default::default();
    for d in 0..p {
        let sc: Vec<Vec<Option<(f64, f64)>>> = (0..n)
            .map(|i| (0..t).map(|j| Some((safe[(d * n + i) * t + j], help[(d * n + i) * t + j]))).collect())
            .collect();
        let g = group_reward(&sc, &hp);
        got[0].extend(&g.turn_mean);
        got[1].extend(&g.turn_var);
        got[2].extend(&g.turn_importance);
        got[3].extend(&g.turn_weight);
        got[4].extend(&g.reward);
        got[5].extend(&g.advantage);
    }
    for (k, name) in
        ["turn_mean", "turn_var", "turn_importance", "turn_weight", "reward", "advantage"].iter().enumerate()
    {
        let e = rel_err64(&got[k], v.get(name));
        println!("{name}: {e:.2e}");
        assert!(e < 1e-10, "{name}: {e:.2e}");
    }
    // The update's per-row loss with the mini-batch divisor, over the fixture's rows.
    let adv = got[5].clone();
    let (mask, old, rf, logp) = (v.get("mask"), v.get("old_logp"), v.get("ref_logp"), v.get("logp"));
    let count = |r: usize| mask[r * l..(r + 1) * l].iter().filter(|&&m| m != 0.0).count();
    let total: usize = (0..rows).map(count).sum();
    let nonempty = (0..rows).filter(|&r| count(r) > 0).count();
    for (agg, lname, gname) in
        [("token", "loss_token_mean", "grad_token_mean"), ("seq", "loss_seq_mean", "grad_seq_mean")]
    {
        let mut st = PassStats::default();
        let mut grad = Vec::with_capacity(rows * l);
        #[allow(clippy::needless_range_loop)]
        for r in 0..rows {
            let w = if agg == "token" { 1.0 / total as f64 } else { 1.0 / (count(r).max(1) * nonempty) as f64 };
            let sl = r * l..(r + 1) * l;
            let x = RowTokens { logp: &logp[sl.clone()], old: &old[sl.clone()], rf: &rf[sl.clone()], mask: &mask[sl] };
            grad.extend(row_loss(x, adv[r], w, &v.hp, &mut st));
        }
        let le = (st.loss - v.get(lname)[0]).abs() / v.get(lname)[0].abs();
        let ge = rel_err64(&grad, v.get(gname));
        println!("{lname}: {le:.2e}, {gname}: {ge:.2e}");
        assert!(le < 1e-10 && ge < 1e-10, "{agg}: loss {le:.2e} grad {ge:.2e}");
    }
}

#[test]
fn missing_scores_are_left_out_not_zeroed() {
    let hp = RewardHyper { lambda: 1.0, tau: 0.5, beta_help: 0.5, adv_eps: 1e-4, weighting: TurnWeighting::Variance };
    let full = vec![vec![Some((1.0, 0.5)), Some((0.0, 0.2))], vec![Some((1.0, 0.1)), Some((1.0, 0.9))]];
    let mut gap = full.clone();
    gap.push(vec![Some((1.0, 0.5)), None]);
    let g = group_reward(&gap, &hp);
    // Turn 2's mean over the two rollouts that have it, not over three with a 0.
    assert_eq!(g.turn_mean[1], 0.5);
    assert_eq!(g.missing, 1);
    // A rollout with no score gets the mean reward: advantage 0.
    let none = vec![full[0].clone(), full[1].clone(), vec![None, None]];
    let g = group_reward(&none, &hp);
    assert!(g.advantage[2].abs() < 1e-12);
    for w in [TurnWeighting::Mean, TurnWeighting::MinMean, TurnWeighting::Last] {
        let g = group_reward(&full, &RewardHyper { weighting: w, ..hp });
        assert!(g.reward.iter().all(|r| r.is_finite()), "{w:?}");
    }
    let g = group_reward(&full, &RewardHyper { weighting: TurnWeighting::Last, ..hp });
    assert_eq!(g.reward, vec![0.0 + 0.5 * 0.2, 1.0 + 0.5 * 0.9]);
}

/// One SFT checkpoint of the tiny default for every test here (30 steps: quick, and not yet
/// refusing everything).
fn sft_checkpoint() -> &'static Path {
    static CK: OnceLock<PathBuf> = OnceLock::new();
    CK.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("am3-grpo-test-sft-{}", std::process::id()));
        let args = SftArgs { out: Some(out), steps: Some(30), save_every: Some(30), ..Default::default() };
        sft::run(args).unwrap()
    })
}

fn grpo_args(out: &Path, steps: u64) -> GrpoArgs {
    GrpoArgs {
        model: Some(sft_checkpoint().to_path_buf()),
        out: Some(out.to_path_buf()),
        steps: Some(steps),
        dialogues_per_step: Some(3),
        n: Some(3),
        max_new_tokens: Some(12),
        mini_batch: Some(4),
        ppo_epochs: Some(2),
        save_every: Some(2),
        lr: Some(1e-3),
        ..Default::default()
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3-grpo-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn ratio_is_one_on_the_first_pass_and_resume_is_bit_exact() {
    let a = tmp("straight");
    let ck_a = grpo::run(grpo_args(&a, 4)).unwrap();
    let m = lines(&a.join("metrics.jsonl"));
    assert_eq!(m.len(), 4);
    for l in &m {
        assert_eq!(
            l["ratio_dev_first_pass"].as_f64().unwrap(),
            0.0,
            "old-policy log-probs equal the policy's at the start of each step"
        );
        for k in [
            "reward_mean",
            "kl",
            "loss",
            "rollout_s",
            "update_s",
            "logp_gap_max",
            "clip_frac_low",
            "clip_frac_high",
            "entropy",
        ] {
            assert!(l[k].as_f64().is_some_and(f64::is_finite), "{k} in {l}");
        }
        // The sampler never draws the image placeholders (their logits are −inf there), so its
        // log-probs exceed the trainer's full-vocabulary ones by −log(1 − p(placeholders)).
        assert!(l["logp_gap_max"].as_f64().unwrap() < 0.05, "sampler vs trainer log-probs: {l}");
    }
    // The same run stopped after 2 steps and resumed.
    let b = tmp("resumed");
    let first = GrpoArgs { stop_after: Some(2), ..grpo_args(&b, 4) };
    grpo::run(first).unwrap();
    let ck_b = grpo::run(GrpoArgs { resume: true, ..grpo_args(&b, 4) }).unwrap();
    let wa = std::fs::read(ck_a.join("model.safetensors")).unwrap();
    let wb = std::fs::read(ck_b.join("model.safetensors")).unwrap();
    assert!(wa == wb, "resumed weights differ from the uninterrupted run's");
    let mb = lines(&b.join("metrics.jsonl"));
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        for k in [
            "rollout_s",
            "judge_s",
            "old_logp_s",
            "ref_logp_s",
            "update_s",
            "step_s",
            "rollout_tokens_per_s",
            "tokens_per_s",
            "memory_bytes",
        ] {
            v.as_object_mut().unwrap().remove(k);
        }
        v
    };
    assert_eq!(m.iter().map(strip).collect::<Vec<_>>(), mb.iter().map(strip).collect::<Vec<_>>());
    // Changed settings are refused on resume.
    let err = format!("{:#}", grpo::run(GrpoArgs { resume: true, lr: Some(5e-4), ..grpo_args(&b, 4) }).unwrap_err());
    assert!(err.contains("differ"), "{err}");
}

/// A judge whose second call loses every score of the first dialogue.
struct Flaky {
    calls: usize,
}

impl Judge for Flaky {
    fn name(&self) -> String {
        "flaky".into()
    }
    fn score(&mut self, ds: &[JudgeDialogue]) -> anyhow::Result<JudgeOutput> {
        self.calls += 1;
        let mut out = JudgeOutput::default();
        for (d, dl) in ds.iter().enumerate() {
            let lost = self.calls == 2 && d == 0;
            out.scores.push(
                dl.answers
                    .iter()
                    .map(|a| {
                        a.iter()
                            .map(|ans| {
                                (!lost).then(|| TurnScore {
                                    safety: (ans.len() % 3) as f64 / 2.0,
                                    help: 0.5,
                                    unsafe_flag: false,
                                    refused: false,
                                    raw: String::new(),
                                    fallback: false,
                                })
                            })
                            .collect()
                    })
                    .collect(),
            );
            out.failures += lost as usize * dl.answers.len();
        }
        Ok(out)
    }
    fn compare(&mut self, p: &[PairQuery]) -> anyhow::Result<Vec<PairVerdict>> {
        Ok(p.iter()
            .map(|_| PairVerdict {
                helpful: am3safety::judge::Preference::Tie,
                harmless: am3safety::judge::Preference::Tie,
            })
            .collect())
    }
}

#[test]
fn a_judge_failure_mid_step_is_survived_and_counted() {
    let dev = Device::Cpu;
    let (args, plan, jcfg) = grpo_args(&tmp("flaky"), 3).resolve().unwrap();
    let mut tr = Trainer::new(&dev, plan, args.model.as_deref().unwrap(), &grpo::demo_prompts(), &jcfg).unwrap();
    tr.set_judge(Box::new(Flaky { calls: 0 }));
    for step in 0..3 {
        let r = tr.step(&dev, step).unwrap();
        let missing = r.json["judge_missing"].as_u64().unwrap();
        assert_eq!(missing > 0, step == 1, "step {step}: {}", r.json);
        assert!(r.json["loss"].as_f64().unwrap().is_finite());
    }
}

#[test]
fn lora_grpo_reference_is_the_base_and_only_adapters_change() {
    let dev = Device::Cpu;
    let out = tmp("lora");
    let args = GrpoArgs { lora_rank: Some(4), lora_save: Some("adapter".into()), ..grpo_args(&out, 2) };
    let (args, plan, jcfg) = args.resolve().unwrap();
    let base = args.model.clone().unwrap();
    let mut tr = Trainer::new(&dev, plan, &base, &grpo::demo_prompts(), &jcfg).unwrap();
    let snapshot = |m: &am3safety::stages::model::VlModel| -> Vec<(String, Vec<f32>)> {
        m.param_entries().iter().map(|(r, b)| (r.name.clone(), dev.to_vec(b).unwrap())).collect()
    };
    let before = snapshot(&tr.l.model);
    let adapters_before: Vec<Vec<f32>> =
        tr.l.model.trainable_entries().iter().map(|(_, b)| dev.to_vec(b).unwrap()).collect();
    for step in 0..2 {
        let r = tr.step(&dev, step).unwrap();
        assert!(r.json["kl"].as_f64().unwrap().is_finite());
    }
    assert_eq!(before, snapshot(&tr.l.model), "LoRA GRPO changed a base weight");
    let adapters_after: Vec<Vec<f32>> =
        tr.l.model.trainable_entries().iter().map(|(_, b)| dev.to_vec(b).unwrap()).collect();
    assert_ne!(adapters_before, adapters_after, "the adapters did not train");
    // The reference (adapters off) is the base model's forward, bit for bit.
    let base_model = am3safety::stages::model::VlModel::load(&dev, &base).unwrap();
    let l = am3safety::stages::sft::load_model(&dev, Some(&base), 0).unwrap();
    let ex = am3safety::stages::sft::load_examples_for(&am3safety::stages::sft::demo_data(), &l).unwrap();
    let p = am3safety::stages::examples::pack(&[&ex[0]]);
    let rc = am3safety::models::qwen2_5_vl::model::Recompute::default();
    let off =
        tr.l.model
            .without_adapters(|m| dev.to_vec(&m.logits(&dev, &m.forward(&dev, &p, &rc).unwrap()).unwrap()).unwrap());
    let want = dev.to_vec(&base_model.logits(&dev, &base_model.forward(&dev, &p, &rc).unwrap()).unwrap()).unwrap();
    assert_eq!(off, want, "adapter-off forward differs from the base model");
    let on = dev.to_vec(&tr.l.model.logits(&dev, &tr.l.model.forward(&dev, &p, &rc).unwrap()).unwrap()).unwrap();
    assert_ne!(on, want, "the trained adapters change the policy");
}

#[test]
fn a_used_out_needs_resume_or_overwrite_and_resume_checks_the_data() {
    let out = tmp("used");
    grpo::run(grpo_args(&out, 1)).unwrap();
    let err = format!("{:#}", grpo::run(grpo_args(&out, 1)).unwrap_err());
    assert!(err.contains("--resume") && err.contains("--overwrite"), "{err}");
    grpo::run(GrpoArgs { overwrite: true, ..grpo_args(&out, 1) }).unwrap();
    // A different prompt file on --resume is refused, naming --data.
    let other = sft::demo_data(); // the SFT file: valid prompts too
    let err =
        format!("{:#}", grpo::run(GrpoArgs { resume: true, data: Some(other), ..grpo_args(&out, 1) }).unwrap_err());
    assert!(err.contains("--data"), "{err}");
}

#[test]
fn freeze_vision_keeps_the_tower_and_trains_the_rest() {
    let dev = Device::Cpu;
    let out = tmp("freeze-vision");
    let (args, plan, jcfg) = GrpoArgs { freeze_vision: Some(true), ..grpo_args(&out, 2) }.resolve().unwrap();
    let mut tr = Trainer::new(&dev, plan, args.model.as_ref().unwrap(), &grpo::demo_prompts(), &jcfg).unwrap();
    let snapshot = |m: &am3safety::stages::model::VlModel, vision: bool| -> Vec<(String, Vec<f32>)> {
        let mine = m.param_entries().into_iter().filter(|(r, _)| m.is_vision(&r.name) == vision);
        mine.map(|(r, b)| (r.name.clone(), dev.to_vec(b).unwrap())).collect()
    };
    let (vision0, text0) = (snapshot(&tr.l.model, true), snapshot(&tr.l.model, false));
    assert!(!vision0.is_empty(), "the tiny model has a vision tower");
    for step in 0..2 {
        tr.step(&dev, step).unwrap();
    }
    // (assert!, not assert_eq!: a failure would print every weight)
    assert!(vision0 == snapshot(&tr.l.model, true), "--freeze-vision changed a vision weight");
    assert!(text0 != snapshot(&tr.l.model, false), "the language model did not train");
}

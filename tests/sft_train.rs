//! SFT end to end on the CPU: the loss on refusal samples falls, a saved checkpoint loads back
//! with identical logits, `--resume` continues bit for bit, and a kill at any moment leaves the
//! last checkpoint intact (and the next run removes what the killed one left half-written).
mod common;
use am3safety::checkpoint::safetensors_io::SaveDtype;
use am3safety::models::qwen2_5_vl::model::{QwenVl, Recompute};
use am3safety::models::tiny;
use am3safety::stages::examples::pack;
use am3safety::stages::sft::{self, latest_checkpoint, load_examples, SftArgs};
use am3safety::tensor::{Device, DevicePref};
use am3safety::train::metrics::read_metrics;
use common::am3_bin;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn args(out: &Path, steps: u64, save_every: u64) -> SftArgs {
    SftArgs {
        out: Some(out.to_path_buf()),
        steps: Some(steps),
        save_every: Some(save_every),
        device: Some(DevicePref::Cpu),
        ..Default::default()
    }
}

#[test]
fn sft_demo_halves_refusal_loss() {
    let out = tmp("halves");
    sft::run(args(&out, 40, 40)).unwrap();
    let m = read_metrics(out.join("metrics.jsonl")).unwrap();
    let r: Vec<f64> = m.iter().filter_map(|v| v.get("refusal_loss").and_then(|x| x.as_f64())).collect();
    let steps = m.iter().filter(|v| v.get("loss").is_some()).count();
    println!("refusal loss {:.4} -> {:.4} over {steps} steps", r[0], r[r.len() - 1]);
    assert_eq!(steps, 40, "one metrics line per step");
    assert!(r.len() == 2 && r[1] <= 0.5 * r[0], "refusal loss did not halve: {r:?}");
    for v in &m {
        if v.get("loss").is_some() {
            for k in ["lr", "grad_norm", "tokens_per_s", "memory_bytes"] {
                assert!(v.get(k).is_some(), "metrics line lacks {k}: {v}");
            }
        }
    }
}

#[test]
fn saved_checkpoint_loads_with_identical_logits() {
    let dev = Device::Cpu;
    let tok = tiny::tokenizer().unwrap();
    let cfg = tiny::config(&tok).unwrap();
    let model = tiny::build(&dev, cfg.clone(), 7).unwrap();
    let dir = tmp("ckpt");
    sft::save_model(&dev, &model, &dir, SaveDtype::F32).unwrap();
    let back = QwenVl::load(&dev, &dir).unwrap();
    let ex = load_examples(&sft::demo_data(), &tok, &cfg, &tiny::preprocessor().unwrap()).unwrap();
    let p = pack(&[&ex[0], &ex[1]]);
    let l0 = dev
        .to_vec(&model.logits(&dev, &model.forward(&dev, &p.batch(), &Recompute::default()).unwrap()).unwrap())
        .unwrap();
    let l1 = dev
        .to_vec(&back.logits(&dev, &back.forward(&dev, &p.batch(), &Recompute::default()).unwrap()).unwrap())
        .unwrap();
    assert_eq!(l0.len(), l1.len());
    assert!(l0.iter().zip(&l1).all(|(a, b)| a.to_bits() == b.to_bits()), "logits differ after save/load");
    // A checkpoint written by a run is a complete HF directory that loads too.
    let out = tmp("ckpt-run");
    let ck = sft::run(args(&out, 2, 2)).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "trainer_state.json"] {
        assert!(ck.join(f).is_file(), "checkpoint lacks {f}");
    }
    QwenVl::load(&dev, &ck).unwrap();
}

fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn resume_is_bit_for_bit() {
    let a = tmp("resume-a");
    let ck_a = sft::run(args(&a, 6, 3)).unwrap();
    let b = tmp("resume-b");
    sft::run(SftArgs { stop_after: Some(4), ..args(&b, 6, 3) }).unwrap();
    // Step 4 ran but was not saved: resume goes back to step 3's checkpoint.
    assert!(latest_checkpoint(&b).unwrap().unwrap().ends_with("checkpoint-000003"));
    let ck_b = sft::run(SftArgs { resume: true, ..args(&b, 6, 3) }).unwrap();
    assert_eq!(
        file_bytes(&ck_a.join("model.safetensors")),
        file_bytes(&ck_b.join("model.safetensors")),
        "weights differ after resume"
    );
    assert_eq!(
        file_bytes(&ck_a.join("train_state/model.safetensors")),
        file_bytes(&ck_b.join("train_state/model.safetensors")),
        "optimizer state differs after resume"
    );
    let losses = |d: &Path| -> Vec<(u64, f64)> {
        read_metrics(d.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?)))
            .collect()
    };
    assert_eq!(losses(&a), losses(&b), "per-step losses differ after resume");
}

#[test]
fn kill_leaves_last_checkpoint_intact() {
    let out = tmp("kill");
    let exe = am3_bin();
    let mut killed_after_ck = 0;
    for round in 0..4u64 {
        let mut child = std::process::Command::new(&exe)
            .args(["sft", "--device", "cpu", "--steps", "30", "--save-every", "1", "--out"])
            .arg(&out)
            .args(if round > 0 { vec!["--resume"] } else { vec![] })
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill at a varying moment, often in the middle of a save (one every step).
        std::thread::sleep(std::time::Duration::from_millis(1500 + 370 * round));
        let _ = child.kill();
        let _ = child.wait();
        if let Some(ck) = latest_checkpoint(&out).unwrap() {
            killed_after_ck += 1;
            QwenVl::load(&Device::Cpu, &ck)
                .unwrap_or_else(|e| panic!("round {round}: {} does not load: {e:#}", ck.display()));
            assert!(ck.join("train_state/model.safetensors").is_file());
            serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(ck.join("trainer_state.json")).unwrap())
                .unwrap();
        }
    }
    assert!(killed_after_ck > 0, "no checkpoint was written before the kills");
    // And the run still completes from whatever was left.
    let ck = sft::run(SftArgs { resume: true, ..args(&out, 30, 1) }).unwrap();
    assert!(ck.ends_with("checkpoint-000030"));
    // The killed runs' temporary entries (half-written checkpoints, `latest`) were cleaned up,
    // and no lock is left.
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn bad_data_lines_are_reported_or_skipped() {
    let dir = tmp("badlines");
    std::fs::create_dir_all(&dir).unwrap();
    let demo = std::fs::read_to_string(sft::demo_data()).unwrap();
    let demo_dir = std::fs::canonicalize(sft::demo_data()).unwrap().parent().unwrap().to_path_buf();
    // Two good samples (image paths made absolute) and one line with an unknown role.
    let good: Vec<String> =
        demo.lines().take(2).map(|l| l.replace("\"images/", &format!("\"{}/images/", demo_dir.display()))).collect();
    let bad = r#"{"id":"x","kind":"general","images":[],"messages":[{"role":"robot","content":"hi"},{"role":"assistant","content":"ok"}]}"#;
    let file = dir.join("data.jsonl");
    std::fs::write(&file, format!("{}\n{}\n{}\n", good[0], bad, good[1])).unwrap();
    let a = |skip| SftArgs { data: Some(file.clone()), skip_bad: Some(skip), ..args(&dir.join("out"), 1, 1) };
    let err = format!("{:#}", sft::run(a(false)).unwrap_err());
    assert!(err.contains("data.jsonl:2"), "the error does not name file:line: {err}");
    sft::run(a(true)).unwrap();
}

#[test]
fn grad_dtype_is_checked_and_recorded() {
    let out = tmp("graddtype");
    let bad = SftArgs { grad_dtype: Some("fp8".into()), ..args(&out, 1, 1) };
    let err = format!("{:#}", sft::run(bad).unwrap_err());
    assert!(err.contains("--grad-dtype") && err.contains("fp8"), "{err}");
    // On the CPU every gradient is f32 whatever the setting; the run works and records it.
    let (_, plan) = SftArgs { grad_dtype: Some("bf16".into()), ..args(&out, 1, 1) }.resolve().unwrap();
    assert_eq!(plan.grad_dtype, "bf16");
    let (_, plan) = args(&out, 1, 1).resolve().unwrap();
    assert_eq!(plan.grad_dtype, "auto");
    sft::run(SftArgs { grad_dtype: Some("bf16".into()), ..args(&out, 2, 2) }).unwrap();
    assert!(out.join("checkpoint-000002").exists(), "no checkpoint written");
}

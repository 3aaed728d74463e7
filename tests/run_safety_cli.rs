//! Nothing in `OUT` is lost or changed silently, through `am3 sft`: reruns, two runs on one
//! directory, `--skip-bad`, resume checks of settings, data, model and checksums, metrics lines
//! written once, every flag range-checked.
mod common;
use am3safety::stages::sft::{self, SftArgs};
use am3safety::tensor::DevicePref;
use am3safety::train::metrics::read_metrics;
use am3safety::train::run_dir::LOCK_FILE;
use common::am3_bin;
use std::path::Path;
use std::process::{Command, Stdio};

#[path = "support/run_safety.rs"]
mod run_safety_support;
use run_safety_support::*;

#[test]
fn rerun_without_resume_is_refused_and_overwrite_replaces_the_run() {
    let d = tmp("rerun");
    let data = small_data(&d.join("data"), 6);
    let out = d.join("out");
    sft::run(args(&out, &data, 4, 2)).unwrap();
    let metrics = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let e = err_of(sft::run(args(&out, &data, 2, 2)));
    assert!(e.contains("--resume") && e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics, "a refused run touched metrics.jsonl");
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "checkpoint-000004");
    // A refused --overwrite (bad data) still leaves the old run alone.
    let e = err_of(sft::run(SftArgs { overwrite: true, ..args(&out, &d.join("missing.jsonl"), 2, 2) }));
    assert!(e.contains("missing.jsonl"), "{e}");
    assert!(out.join("checkpoint-000004").is_dir() && std::fs::read(out.join("metrics.jsonl")).unwrap() == metrics);
    let ck = sft::run(SftArgs { overwrite: true, ..args(&out, &data, 2, 2) }).unwrap();
    assert!(ck.ends_with("checkpoint-000002"));
    let left: Vec<String> = names(&out).into_iter().filter(|n| !n.starts_with('.')).collect();
    assert_eq!(left, vec!["checkpoint-000002", "latest", "metrics.jsonl"], "the old run's checkpoints are mixed in");
    let steps: Vec<u64> =
        read_metrics(out.join("metrics.jsonl")).unwrap().iter().filter_map(|v| v["step"].as_u64()).collect();
    assert_eq!(steps, vec![0, 1, 2, 2]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn two_runs_on_one_directory_one_is_refused_naming_the_holder() {
    let d = tmp("concurrent");
    let data = small_data(&d.join("data"), 6);
    let out = d.join("out");
    let spawn = || {
        Command::new(am3_bin())
            .args(["sft", "--device", "cpu", "--steps", "6", "--save-every", "3", "--batch-tokens", "512", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (pa, pb) = (a.id(), b.id());
    let (oa, ob) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (ea, eb) = (String::from_utf8_lossy(&oa.stderr), String::from_utf8_lossy(&ob.stderr));
    assert!(oa.status.success() != ob.status.success(), "both or neither ran:\n{ea}\n---\n{eb}");
    let (winner, loser_err) = if oa.status.success() { (pa, eb) } else { (pb, ea) };
    assert!(loser_err.contains("in use by another run") && loser_err.contains(&format!("PID {winner}")), "{loser_err}");
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 1, 2, 3, 4, 5, 6, 6], "metrics.jsonl of two runs interleaved");
    assert!(!out.join(LOCK_FILE).exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn skip_bad_covers_images_and_every_problem_is_reported() {
    let d = tmp("skipbad");
    let data = small_data(&d.join("data"), 6);
    // Lines 2 and 5 point at truncated PNGs, line 4 is not JSON.
    let mut lines: Vec<String> = std::fs::read_to_string(&data).unwrap().lines().map(String::from).collect();
    let with_image: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].contains(".png")).collect();
    assert!(with_image.len() >= 4, "the demo samples need images");
    for (k, &i) in [with_image[1], with_image[3]].iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(&lines[i]).unwrap();
        let img = v["images"][0].as_str().unwrap().to_string();
        let bytes = std::fs::read(&img).unwrap();
        let cut = d.join(format!("data/truncated-{k}.png"));
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        lines[i] = lines[i].replace(&img, cut.to_str().unwrap());
    }
    lines.insert(3, "{\"id\": \"broken\", ".to_string());
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let f = data.to_str().unwrap();
    let bad_lines: Vec<String> = {
        let t = std::fs::read_to_string(&data).unwrap();
        t.lines()
            .enumerate()
            .filter(|(_, l)| l.contains("truncated-") || l.contains("broken"))
            .map(|(i, _)| format!("{f}:{}", i + 1))
            .collect()
    };
    assert_eq!(bad_lines.len(), 3);
    let out = d.join("out");
    let e = err_of(sft::run(args(&out, &data, 1, 1)));
    for l in &bad_lines {
        assert!(e.contains(&format!("{l}:")), "{l} not reported:\n{e}");
    }
    assert!(e.contains("3 problem(s)") && e.contains("decoding image"), "{e}");
    let o = am3(
        &[
            "sft",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--batch-tokens",
            "512",
            "--skip-bad",
            "true",
            "--data",
            f,
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for l in &bad_lines {
        assert!(err.contains(&format!("skipped {l}:")), "{l} not reported:\n{err}");
    }
    assert!(err.contains("3 of 7 samples skipped") && err.contains("4 examples"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn resume_checks_settings_data_model_and_checksums() {
    let d = tmp("resume");
    let data = small_data(&d.join("data"), 6);
    // A model directory to train from: a checkpoint of a one-step run.
    let model = sft::run(args(&d.join("base"), &data, 1, 1)).unwrap();
    let out = d.join("out");
    let a = |data: &Path, model: &Path| SftArgs {
        model: Some(model.to_path_buf()),
        resume: true,
        ..args(&out, data, 4, 2)
    };
    sft::run(SftArgs { stop_after: Some(2), resume: false, ..a(&data, &model) }).unwrap();
    let ck = out.join("checkpoint-000002");

    let e = err_of(sft::run(SftArgs { lr: Some(5e-4), clip: Some(0.5), ..a(&data, &model) }));
    assert!(e.contains("--lr is 0.0005 now but 0.00001 in the run") && e.contains("--clip is 0.5 now but 1.0"), "{e}");
    // Another data file with the same content, then the same file changed.
    let copy = d.join("data/copy.jsonl");
    std::fs::copy(&data, &copy).unwrap();
    let e = err_of(sft::run(a(&copy, &model)));
    assert!(e.contains("--data") && e.contains("copy.jsonl") && e.contains("was started with"), "{e}");
    let orig = std::fs::read(&data).unwrap();
    std::fs::write(&data, [orig.as_slice(), b"\n"].concat()).unwrap();
    let e = err_of(sft::run(a(&data, &model)));
    assert!(e.contains("--data") && e.contains("changed since the run") && e.contains("data.jsonl"), "{e}");
    std::fs::write(&data, &orig).unwrap();
    // Another model directory, then the model's config edited.
    let model2 = d.join("model2");
    std::fs::create_dir_all(&model2).unwrap();
    for f in names(&model) {
        if model.join(&f).is_file() {
            std::fs::copy(model.join(&f), model2.join(&f)).unwrap();
        }
    }
    let e = err_of(sft::run(a(&data, &model2)));
    assert!(e.contains("--model") && e.contains("model2"), "{e}");
    // A run started from model2, whose config.json is then edited (whitespace only: it still loads).
    let out2 = d.join("out2");
    sft::run(SftArgs { out: Some(out2.clone()), resume: false, stop_after: Some(2), ..a(&data, &model2) }).unwrap();
    let cfg = std::fs::read_to_string(model2.join("config.json")).unwrap();
    std::fs::write(model2.join("config.json"), format!("{cfg}\n ")).unwrap();
    let e = err_of(sft::run(SftArgs { out: Some(out2.clone()), ..a(&data, &model2) }));
    assert!(e.contains("--model") && e.contains("changed since the run") && e.contains("config.json"), "{e}");

    // An edited step count, then a zeroed optimizer tensor.
    let ts = ck.join("trainer_state.json");
    let state = std::fs::read_to_string(&ts).unwrap();
    std::fs::write(&ts, state.replace("\"step\": 2", "\"step\": 3")).unwrap();
    let e = err_of(sft::run(a(&data, &model)));
    assert!(e.contains("trainer_state.json") && e.contains("checksum"), "{e}");
    std::fs::write(&ts, &state).unwrap();
    let st = ck.join("train_state/model.safetensors");
    let saved = std::fs::read(&st).unwrap();
    zero_first_tensor(&st);
    let e = err_of(sft::run(a(&data, &model)));
    assert!(e.contains("train_state/model.safetensors") && e.contains("checksum"), "{e}");
    std::fs::write(&st, &saved).unwrap();
    // Unchanged, it resumes.
    assert!(sft::run(a(&data, &model)).unwrap().ends_with("checkpoint-000004"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn metrics_lines_are_written_once() {
    let d = tmp("metrics-once");
    let data = small_data(&d.join("data"), 6);
    let out = d.join("out");
    sft::run(SftArgs { stop_after: Some(4), ..args(&out, &data, 6, 3) }).unwrap();
    let first = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(first.lines().count(), 5, "{first}");
    sft::run(SftArgs { resume: true, ..args(&out, &data, 6, 3) }).unwrap();
    let done = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    // Steps 0..=3 were checkpointed: those lines stay byte for byte; step 4 is redone.
    let kept: String = first.lines().take(4).map(|l| format!("{l}\n")).collect();
    assert!(done.starts_with(&kept), "earlier lines were rewritten:\n{first}\n---\n{done}");
    let steps: Vec<u64> =
        read_metrics(out.join("metrics.jsonl")).unwrap().iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![0, 1, 2, 3, 4, 5, 6, 6]);
    // Every float reads back as the text says (Rust's parser is exact).
    for (line, v) in done.lines().zip(read_metrics(out.join("metrics.jsonl")).unwrap()) {
        let text = line.split("\"loss\":").nth(1).map(|r| r.split([',', '}']).next().unwrap().to_string());
        if let Some(t) = text {
            assert_eq!(t.parse::<f64>().unwrap().to_bits(), v["loss"].as_f64().unwrap().to_bits(), "{line}");
        }
    }
    // Resuming a finished run writes nothing.
    let ck = sft::run(SftArgs { resume: true, ..args(&out, &data, 6, 3) }).unwrap();
    assert!(ck.ends_with("checkpoint-000006"));
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(), done, "a finished run's resume appended");
    // A kill after the last checkpoint but before the final line: the resume adds just that.
    let cut = done[..done.len() - 1].rfind('\n').unwrap() + 1;
    assert!(done[cut..].contains("refusal_loss"), "{done}");
    std::fs::write(out.join("metrics.jsonl"), &done[..cut]).unwrap();
    sft::run(SftArgs { resume: true, ..args(&out, &data, 6, 3) }).unwrap();
    let again = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(again.lines().count(), done.lines().count());
    assert!(again.starts_with(&done[..cut]));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn every_flag_is_range_checked() {
    let out = tmp("flags");
    let base = || SftArgs { out: Some(out.clone()), device: Some(DevicePref::Cpu), ..Default::default() };
    let cases: Vec<(SftArgs, &str)> = vec![
        (SftArgs { batch_tokens: Some(0), ..base() }, "--batch-tokens 0 is out of range: allowed [16, 1073741824]"),
        (SftArgs { batch_tokens: Some(1), ..base() }, "--batch-tokens 1 is out of range"),
        (SftArgs { grad_accum: Some(0), ..base() }, "--grad-accum 0 is out of range: allowed [1, 65536]"),
        (SftArgs { save_every: Some(0), ..base() }, "--save-every 0 is out of range: allowed [1, 1000000000]"),
        (SftArgs { steps: Some(0), ..base() }, "--steps 0 is out of range: allowed [1, 1000000000]"),
        (SftArgs { clip: Some(-1.0), ..base() }, "--clip -1 is out of range: allowed [0, 1000000]"),
        (SftArgs { clip: Some(f64::NAN), ..base() }, "--clip NaN is out of range"),
        (SftArgs { weight_decay: Some(-5.0), ..base() }, "--weight-decay -5 is out of range: allowed [0, 1]"),
        (SftArgs { beta1: Some(-0.5), ..base() }, "--beta1 -0.5 is out of range: allowed [0, 1)"),
        (SftArgs { beta1: Some(1.0), ..base() }, "--beta1 1 is out of range: allowed [0, 1)"),
        (SftArgs { beta1: Some(f64::NAN), ..base() }, "--beta1 NaN is out of range"),
        (SftArgs { beta2: Some(1.5), ..base() }, "--beta2 1.5 is out of range: allowed [0, 1)"),
        (SftArgs { lr: Some(-1.0), ..base() }, "--lr -1 is out of range: allowed (0, 1]"),
        (SftArgs { lr: Some(f64::INFINITY), ..base() }, "--lr inf is out of range"),
        (SftArgs { min_lr_ratio: Some(2.0), ..base() }, "--min-lr-ratio 2 is out of range: allowed [0, 1]"),
        (SftArgs { warmup: Some(500), ..base() }, "--warmup 500 is out of range: allowed [0, 100]"),
        (
            SftArgs { lora_rank: Some(4), lora_alpha: Some(-1.0), ..base() },
            "--lora-alpha -1 is out of range: allowed (0, 1000000]",
        ),
        (SftArgs { schedule: Some("cosnie".into()), ..base() }, "cosnie"),
        (SftArgs { stop_after: Some(0), ..base() }, "--stop-after 0 is out of range"),
    ];
    for (a, want) in cases {
        let e = err_of(a.resolve());
        assert!(e.contains(want), "want {want:?}, got {e}");
    }
    // The same from a config file.
    std::fs::create_dir_all(&out).unwrap();
    let cfg = out.join("sft.toml");
    std::fs::write(&cfg, "grad_accum = 0\n").unwrap();
    let e = err_of(SftArgs { config: Some(cfg.clone()), ..base() }.resolve());
    assert!(e.contains("--grad-accum 0 is out of range: allowed [1, 65536]"), "{e}");
    // On the command line, negative numbers after a space reach the range check too.
    let o = out.to_str().unwrap();
    for (flags, want) in [
        (vec!["--lr", "-1"], "--lr -1 is out of range: allowed (0, 1]"),
        (vec!["--clip=NaN"], "--clip NaN is out of range: allowed [0, 1000000]"),
        (vec!["--beta1", "1"], "--beta1 1 is out of range: allowed [0, 1)"),
        (vec!["--steps", "-1"], "-1 is out of range: allowed [1, 1000000000]"),
        (vec!["--batch-tokens", "0"], "0 is out of range: allowed [16, 1073741824]"),
        (vec!["--grad-accum", "1.5"], "expected a whole number in [1, 65536]"),
    ] {
        let mut a = vec!["sft", "--device", "cpu", "--out", o];
        a.extend(flags.iter().copied());
        let r = am3(&a, None);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && err.contains(want), "{flags:?}: want {want:?}, got {err}");
    }
    assert!(!out.join("metrics.jsonl").exists(), "a refused run wrote metrics");
    let _ = std::fs::remove_dir_all(&out);
}

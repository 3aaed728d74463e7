//! The run directory (`src/train/run_dir/`) itself: the lock and its holder, stale temporary
//! entries, a used directory, outputs overlapping inputs, checksums, metrics round trips, the
//! model identity, the newest complete checkpoint.
mod common;
use am3safety::checkpoint::safetensors_io::parse_header;
use am3safety::train::metrics::{read_metrics, truncate_after, MetricsWriter, StepMetrics};
use am3safety::train::run_dir::{
    self, guard_output_file, verify_checksums, write_checksums, Identity, Mode, RunDir, Start, LOCK_FILE,
};
use std::path::Path;

#[path = "support/run_safety.rs"]
mod run_safety_support;
use run_safety_support::*;

#[test]
fn lock_names_the_holder_and_stale_locks_are_taken_over() {
    let d = tmp("lock");
    let rd = RunDir::open(&d, Mode::default(), &[]).unwrap();
    let lock = d.join(LOCK_FILE);
    assert_eq!(std::fs::read_to_string(&lock).unwrap().trim(), std::process::id().to_string());
    let e = err_of(RunDir::open(&d, Mode::default(), &[]));
    assert!(e.contains("in use by another run") && e.contains(&format!("PID {}", std::process::id())), "{e}");
    drop(rd);
    assert!(!lock.exists(), "the lock file outlived its run");
    // A lock file left by a killed run (no OS lock held, its PID gone) is taken over.
    let dead = dead_pid();
    std::fs::write(&lock, format!("{dead}\n")).unwrap();
    let rd = RunDir::open(&d, Mode::default(), &[]).unwrap();
    assert_eq!(std::fs::read_to_string(&lock).unwrap().trim(), std::process::id().to_string());
    drop(rd);
    // The CLI says so.
    std::fs::write(&lock, format!("{dead}\n")).unwrap();
    let data = small_data(&d.join("data"), 4);
    let o = am3(
        &[
            "sft",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--batch-tokens",
            "512",
            "--data",
            data.to_str().unwrap(),
            "--out",
            d.to_str().unwrap(),
        ],
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains(&format!("took over the stale lock of PID {dead}")), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn stale_temporary_entries_of_dead_runs_are_removed() {
    let d = tmp("temps");
    std::fs::create_dir_all(&d).unwrap();
    let (dead, live) = (dead_pid(), std::process::id());
    let stale = [
        format!(".checkpoint-000003.tmp-{dead}-0"),
        format!(".latest.tmp-{dead}"),
        format!(".metrics.jsonl.tmp-{dead}-4"),
    ];
    std::fs::create_dir_all(d.join(&stale[0]).join("train_state")).unwrap();
    std::fs::write(d.join(&stale[0]).join("train_state/model.safetensors"), vec![0u8; 4096]).unwrap();
    std::fs::write(d.join(&stale[1]), "checkpoint-000003").unwrap();
    std::fs::write(d.join(&stale[2]), "{}").unwrap();
    // A live process's temp entry and files that are not a run's stay.
    let keep = [format!(".checkpoint-000004.tmp-{live}-0"), "notes.txt".to_string(), ".hidden".to_string()];
    std::fs::create_dir_all(d.join(&keep[0])).unwrap();
    std::fs::write(d.join(&keep[1]), "mine").unwrap();
    std::fs::write(d.join(&keep[2]), "mine").unwrap();
    let rd = RunDir::open(&d, Mode::default(), &[]).unwrap();
    let left = names(&d);
    for s in &stale {
        assert!(!left.contains(s), "{s} was not removed: {left:?}");
    }
    for k in &keep {
        assert!(left.contains(k), "{k} was removed: {left:?}");
    }
    drop(rd);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_used_directory_needs_resume_or_overwrite() {
    let d = tmp("used");
    std::fs::create_dir_all(d.join("checkpoint-000002")).unwrap();
    std::fs::write(d.join("metrics.jsonl"), "{\"step\":0}\n").unwrap();
    std::fs::write(d.join("latest"), "checkpoint-000002").unwrap();
    std::fs::write(d.join("notes.txt"), "not a run's").unwrap();
    let e = err_of(RunDir::open(&d, Mode::default(), &[]));
    assert!(
        e.contains("earlier run") && e.contains("--resume") && e.contains("--overwrite") && e.contains("metrics.jsonl"),
        "{e}"
    );
    let e = err_of(RunDir::open(&d, Mode { resume: true, overwrite: true }, &[]));
    assert!(e.contains("exclude each other"), "{e}");
    // --overwrite clears the run's entries (only when the run actually starts), nothing else.
    let rd = RunDir::open(&d, Mode { resume: false, overwrite: true }, &[]).unwrap();
    assert_eq!(rd.start().unwrap(), Start::Fresh);
    assert!(d.join("metrics.jsonl").exists(), "cleared before the run started");
    rd.begin_fresh().unwrap();
    assert_eq!(names(&d), vec![LOCK_FILE.to_string(), "notes.txt".to_string()]);
    drop(rd);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn outputs_overlapping_inputs_are_refused() {
    let d = tmp("overlap");
    let model = d.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("model.safetensors"), "x").unwrap();
    let inputs = d.join("inputs.safetensors");
    std::fs::write(&inputs, "x").unwrap();
    let ins: [(&str, &Path); 2] = [("--inputs", &inputs), ("--model", &model)];
    for bad in [
        model.join("model.safetensors"),
        model.join("new.safetensors"),
        model.join("sub/x.safetensors"),
        inputs.clone(),
        d.join("model/../inputs.safetensors"),
        d.join("./model/model.safetensors"),
    ] {
        let e = err_of(guard_output_file("--out", &bad, &ins));
        assert!(e.contains("--out") && (e.contains("--inputs") || e.contains("--model")), "{}: {e}", bad.display());
    }
    // Links to an input count as the input.
    std::os::unix::fs::symlink(&inputs, d.join("link.safetensors")).unwrap();
    std::os::unix::fs::symlink(&model, d.join("model-link")).unwrap();
    assert!(guard_output_file("--out", &d.join("link.safetensors"), &ins).is_err());
    assert!(guard_output_file("--out", &d.join("model-link/model.safetensors"), &ins).is_err());
    guard_output_file("--out", &d.join("out.safetensors"), &ins).unwrap();
    // A run's --out inside its model, or its model inside what --out's runs replace.
    let e = err_of(RunDir::open(&model.join("runs"), Mode::default(), &[("--model", &model)]));
    assert!(e.contains("--model"), "{e}");
    let out = d.join("out");
    let e = err_of(RunDir::open(
        &out,
        Mode { resume: false, overwrite: true },
        &[("--model", &out.join("checkpoint-000010"))],
    ));
    assert!(e.contains("--model") && e.contains("checkpoint-000010"), "{e}");
    let e = err_of(RunDir::open(&out, Mode::default(), &[("--data", &out)]));
    assert!(e.contains("--data"), "{e}");
    RunDir::open(&out, Mode::default(), &[("--data", &out.join("my-data/train.jsonl"))]).unwrap();
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn checksums_catch_edits_and_additions() {
    let d = tmp("checksums");
    std::fs::create_dir_all(d.join("train_state")).unwrap();
    std::fs::write(d.join("trainer_state.json"), "{\"step\": 4}").unwrap();
    std::fs::write(d.join("train_state/model.safetensors"), vec![7u8; 10_000]).unwrap();
    std::fs::write(d.join("model.safetensors"), "not covered").unwrap();
    write_checksums(&d, &["trainer_state.json", "train_state"]).unwrap();
    verify_checksums(&d).unwrap();
    std::fs::write(d.join("model.safetensors"), "still not covered").unwrap();
    verify_checksums(&d).unwrap();
    std::fs::write(d.join("trainer_state.json"), "{\"step\": 5}").unwrap();
    let e = err_of(verify_checksums(&d));
    assert!(e.contains("trainer_state.json") && e.contains("checksum"), "{e}");
    std::fs::write(d.join("trainer_state.json"), "{\"step\": 4}").unwrap();
    let mut b = vec![7u8; 10_000];
    b[5000..5004].fill(0);
    std::fs::write(d.join("train_state/model.safetensors"), &b).unwrap();
    let e = err_of(verify_checksums(&d));
    assert!(e.contains("train_state/model.safetensors"), "{e}");
    std::fs::write(d.join("train_state/model.safetensors"), vec![7u8; 10_000]).unwrap();
    std::fs::write(d.join("train_state/extra.safetensors"), "x").unwrap();
    let e = err_of(verify_checksums(&d));
    assert!(e.contains("train_state/extra.safetensors"), "{e}");
    std::fs::remove_file(d.join("train_state/extra.safetensors")).unwrap();
    std::fs::remove_file(d.join("checksums.json")).unwrap();
    assert!(err_of(verify_checksums(&d)).contains("checksums.json"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn metrics_floats_round_trip_and_truncation_keeps_lines() {
    let d = tmp("metrics");
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("metrics.jsonl");
    // Values serde_json's own best-effort parser reads one ULP off.
    let awkward = [-3.8496568983293076e-144, 2.1720335030726068e-23, 0.1 + 0.2, 1.0 / 3.0, 6.02214076e23, 5e-324];
    let mut w = MetricsWriter::create_new(&p).unwrap();
    for (k, &x) in awkward.iter().enumerate() {
        w.write(&StepMetrics {
            step: k as u64 + 1,
            loss: x,
            lr: x * 7.0,
            grad_norm: x.sqrt().abs(),
            ..Default::default()
        })
        .unwrap();
    }
    drop(w);
    assert!(MetricsWriter::create_new(&p).is_err(), "create_new replaced a log");
    let back = read_metrics(&p).unwrap();
    for (k, &x) in awkward.iter().enumerate() {
        assert_eq!(back[k]["loss"].as_f64().unwrap().to_bits(), x.to_bits(), "loss {x:e}");
        assert_eq!(back[k]["lr"].as_f64().unwrap().to_bits(), (x * 7.0).to_bits());
    }
    let before = std::fs::read(&p).unwrap();
    truncate_after(&p, 3).unwrap();
    let after = std::fs::read(&p).unwrap();
    let cut = before.iter().enumerate().filter(|(_, &b)| b == b'\n').nth(2).unwrap().0 + 1;
    assert_eq!(after, before[..cut], "truncation rewrote the lines it kept");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn model_identity_names_the_changed_file() {
    let d = tmp("identity");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), "{\"a\": 1}").unwrap();
    // A safetensors file: header plus 1 MiB of data (sampled, not read whole).
    let header = b"{\"w\":{\"dtype\":\"F32\",\"shape\":[262144],\"data_offsets\":[0,1048576]}}".to_vec();
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend(&header);
    st.extend(vec![1u8; 1 << 20]);
    std::fs::write(d.join("model.safetensors"), &st).unwrap();
    parse_header(&st, &d).unwrap();
    let a = Identity::of_model_dir(&d).unwrap();
    assert_eq!(a, Identity::of_model_dir(&d).unwrap());
    std::fs::write(d.join("config.json"), "{\"a\": 2}").unwrap();
    let b = Identity::of_model_dir(&d).unwrap();
    let e = err_of(a.require_same(&b, "--model", Path::new("RUN")));
    assert!(e.contains("--model") && e.contains("config.json") && !e.contains("model.safetensors"), "{e}");
    // Weights rewritten with the same shapes: the sampled blocks see it.
    std::fs::write(d.join("config.json"), "{\"a\": 1}").unwrap();
    st[8 + header.len()..].fill(2);
    std::fs::write(d.join("model.safetensors"), &st).unwrap();
    let e = err_of(a.require_same(&Identity::of_model_dir(&d).unwrap(), "--model", Path::new("RUN")));
    assert!(e.contains("model.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn latest_checkpoint_is_the_newest_complete_one() {
    let d = tmp("latest");
    for s in [2u64, 10, 4] {
        let c = d.join(format!("checkpoint-{s:06}"));
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join("trainer_state.json"), "{}").unwrap();
    }
    std::fs::create_dir_all(d.join("checkpoint-000012")).unwrap(); // incomplete: no trainer_state.json
    std::fs::write(d.join("latest"), "checkpoint-000004").unwrap(); // lagging: a kill between the renames
    assert!(run_dir::latest_checkpoint(&d).unwrap().unwrap().ends_with("checkpoint-000010"));
    let _ = std::fs::remove_dir_all(&d);
}

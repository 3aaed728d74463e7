//! Issue #19, "nothing lost, nothing silent", for `am3 sft` and the run directory it writes:
//! a used --out needs --resume or --overwrite, a lock keeps a second run out (naming the
//! holder's PID), dead runs' temporary entries are cleaned up, --skip-bad covers images too,
//! --resume checks data, model, settings and checksums, metrics lines are written once, and
//! every flag is range-checked. (`am3 forward`'s input and output checks: tests/cli_forward.rs.)
mod common;
use am3safety::checkpoint::safetensors_io::parse_header;
use am3safety::stages::sft::{self, demo_data, SftArgs};
use am3safety::tensor::DevicePref;
use am3safety::train::metrics::{read_metrics, truncate_after, MetricsWriter, StepMetrics};
use am3safety::train::run_dir::{
    self, guard_output_file, verify_checksums, write_checksums, Identity, Mode, RunDir, Start, LOCK_FILE,
};
use common::am3_bin;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3-safety-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A PID no process has (a child that ran and was reaped).
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    pid
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// The first `n` demo samples in `dir/data.jsonl`, image paths made absolute.
fn small_data(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let demo = std::fs::read_to_string(demo_data()).unwrap();
    let demo_dir = std::fs::canonicalize(demo_data()).unwrap().parent().unwrap().to_path_buf();
    let lines: Vec<String> =
        demo.lines().take(n).map(|l| l.replace("\"images/", &format!("\"{}/images/", demo_dir.display()))).collect();
    let f = dir.join("data.jsonl");
    std::fs::write(&f, lines.join("\n") + "\n").unwrap();
    f
}

fn args(out: &Path, data: &Path, steps: u64, save_every: u64) -> SftArgs {
    SftArgs {
        out: Some(out.to_path_buf()),
        data: Some(data.to_path_buf()),
        steps: Some(steps),
        save_every: Some(save_every),
        batch_tokens: Some(512),
        device: Some(DevicePref::Cpu),
        ..Default::default()
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn am3(args: &[&str], env_data: Option<&Path>) -> std::process::Output {
    let mut c = Command::new(am3_bin());
    c.args(args);
    if let Some(d) = env_data {
        c.env("AM3_DEMO_DATA", d);
    }
    c.output().unwrap()
}

// ------------------------------------------------------------------ the run directory

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

// ------------------------------------------------------------------ am3 sft

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

/// Writes element 0 of the first tensor in a safetensors file as zeros.
fn zero_first_tensor(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let h = parse_header(&b, path).unwrap();
    let t = &h.tensors[0];
    b[t.start..t.end].fill(0);
    std::fs::write(path, b).unwrap();
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

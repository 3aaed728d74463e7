//! The run-directory tests' shared part: temporary directories, a dead PID, small data, `am3 sft`
//! invocations and their errors.
#![allow(dead_code)]

use super::common::*;
use am3safety::checkpoint::safetensors_io::parse_header;
use am3safety::stages::sft::{demo_data, SftArgs};
use am3safety::tensor::DevicePref;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3-safety-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A PID no process has (a child that ran and was reaped).
pub fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    pid
}

pub fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// The first `n` demo samples in `dir/data.jsonl`, image paths made absolute.
pub fn small_data(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let demo = std::fs::read_to_string(demo_data()).unwrap();
    let demo_dir = std::fs::canonicalize(demo_data()).unwrap().parent().unwrap().to_path_buf();
    let lines: Vec<String> =
        demo.lines().take(n).map(|l| l.replace("\"images/", &format!("\"{}/images/", demo_dir.display()))).collect();
    let f = dir.join("data.jsonl");
    std::fs::write(&f, lines.join("\n") + "\n").unwrap();
    f
}

pub fn args(out: &Path, data: &Path, steps: u64, save_every: u64) -> SftArgs {
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

pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

pub fn am3(args: &[&str], env_data: Option<&Path>) -> std::process::Output {
    let mut c = Command::new(am3_bin());
    c.args(args);
    if let Some(d) = env_data {
        c.env("AM3_DEMO_DATA", d);
    }
    c.output().unwrap()
}

/// Writes element 0 of the first tensor in a safetensors file as zeros.
pub fn zero_first_tensor(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let h = parse_header(&b, path).unwrap();
    let t = &h.tensors[0];
    b[t.start..t.end].fill(0);
    std::fs::write(path, b).unwrap();
}

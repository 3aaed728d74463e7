//! The Qwen2.5-VL data tests' shared part: the fixture directory and its tensors, temporary
//! directories, error text, image grids.
#![allow(dead_code)]

use super::common::*;
use am3safety::checkpoint::read_tensor_file;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    let dir = fixture_dir("qwen2_5_vl_tiny");
    assert!(dir.join("config.json").is_file(), "Qwen fixtures not found at {} (set AM3_FIXTURES)", dir.display());
    dir
}

/// A fresh, empty temporary directory for one test.
pub fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3_qwen_data_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

pub fn tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    read_tensor_file(path).unwrap()
}

pub fn as_i32(v: &[f64]) -> Vec<i32> {
    v.iter().map(|&x| x as i32).collect()
}

pub fn grids_of(v: &[f64]) -> Vec<[usize; 3]> {
    v.chunks(3).map(|c| [c[0] as usize, c[1] as usize, c[2] as usize]).collect()
}

//! The GRPO reference vectors (../shared/fixtures/grpo_vectors.safetensors, or
//! $AM3_GRPO_VECTORS): every tensor in f64, the hyper-parameters from the metadata header.
#![allow(dead_code)]

use super::common::grpo_vectors_path;
use am3safety::ops::grpo::GrpoHyper;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;

pub struct Vectors {
    pub hp: GrpoHyper,
    pub t: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Vectors {
    pub fn get(&self, name: &str) -> &[f64] {
        &self.t.get(name).unwrap_or_else(|| panic!("grpo vectors: no tensor `{name}`")).1
    }
    pub fn shape(&self, name: &str) -> &[usize] {
        &self.t.get(name).unwrap_or_else(|| panic!("grpo vectors: no tensor `{name}`")).0
    }
    pub fn f32(&self, name: &str) -> Vec<f32> {
        self.get(name).iter().map(|&x| x as f32).collect()
    }
    /// (P, N, T, rows, L)
    pub fn dims(&self) -> (usize, usize, usize, usize, usize) {
        let s = self.shape("safe");
        let l = self.shape("logp");
        (s[0], s[1], s[2], l[0], l[1])
    }
}

pub fn load() -> Vectors {
    let path = grpo_vectors_path();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!("reading the GRPO reference vectors {}: {e} (set AM3_GRPO_VECTORS)", path.display())
    });
    let (_, meta) = SafeTensors::read_metadata(&bytes).expect("grpo vectors: bad safetensors header");
    let meta = meta.metadata().clone().expect("grpo vectors: no metadata header");
    let hp = GrpoHyper::from_metadata(&meta).expect("grpo vectors: hyper-parameters");
    println!("grpo vectors {}: {hp:?}", path.display());
    let st = SafeTensors::deserialize(&bytes).expect("grpo vectors: bad safetensors file");
    let mut t = HashMap::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), Dtype::F64, "grpo vectors: {name} is not f64");
        let v: Vec<f64> = view.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
        t.insert(name, (view.shape().to_vec(), v));
    }
    let v = Vectors { hp, t };
    let (p, n, tt, rows, l) = v.dims();
    assert_eq!(rows, p * n, "grpo vectors: logp rows should be P·N");
    println!("grpo vectors: P={p} N={n} T={tt} L={l}");
    v
}

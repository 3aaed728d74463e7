//! Parameters keyed by checkpoint name. Every device tensor of a model is a `ParamRef`: a whole
//! checkpoint tensor, or a row range of one (Qwen's fused vision `attn.qkv` is kept as separate
//! q, k, v tensors). Loading slices the rows out of the checkpoint; `assemble` glues gradient
//! pieces back into full tensors, so callers only ever see checkpoint names and shapes.

use crate::checkpoint::Checkpoint;
use crate::tensor::{Buf, Device};
use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// Full tensors by checkpoint name: name → (shape, f32 values).
pub type NamedTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Rows `row0 .. row0 + rows` (along dim 0) of the checkpoint tensor `name` of shape `full_shape`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamRef {
    pub name: String,
    pub full_shape: Vec<usize>,
    pub row0: usize,
    pub rows: usize,
}

impl ParamRef {
    pub fn whole(name: &str, shape: &[usize]) -> Self {
        ParamRef { name: name.to_string(), full_shape: shape.to_vec(), row0: 0, rows: shape.first().copied().unwrap_or(1) }
    }
    pub fn piece(name: &str, full_shape: &[usize], row0: usize, rows: usize) -> Self {
        ParamRef { name: name.to_string(), full_shape: full_shape.to_vec(), row0, rows }
    }
    /// Elements per row (the product of the trailing dims).
    pub fn row_len(&self) -> usize {
        self.full_shape.iter().skip(1).product()
    }
    pub fn numel(&self) -> usize {
        self.rows * self.row_len()
    }
    pub fn is_whole(&self) -> bool {
        self.row0 == 0 && Some(&self.rows) == self.full_shape.first()
    }
}

/// Reads the piece `r` from `ckpt` (first of `r.name` and its `aliases` present) as f32.
pub fn read_piece(ckpt: &Checkpoint, r: &ParamRef, aliases: &dyn Fn(&str) -> Vec<String>) -> Result<Vec<f32>> {
    let mut names = vec![r.name.clone()];
    names.extend(aliases(&r.name));
    let Some(name) = names.iter().find(|n| ckpt.has(n)) else {
        bail!("checkpoint {}: tensor `{}` not found (also tried {:?})", ckpt.dir().display(), r.name, &names[1..]);
    };
    let full = ckpt.get_f32(name, &r.full_shape)?;
    let (a, n) = (r.row0 * r.row_len(), r.numel());
    if a + n > full.len() {
        bail!("tensor `{name}`: rows {}..{} are outside its shape {:?}", r.row0, r.row0 + r.rows, r.full_shape);
    }
    Ok(full[a..a + n].to_vec())
}

/// Full tensors (name → (shape, f32 values)) from pieces; every row of each tensor must be covered.
pub fn assemble(dev: &Device, pieces: Vec<(ParamRef, &Buf)>) -> Result<NamedTensors> {
    let mut out = NamedTensors::new();
    let mut covered: BTreeMap<String, usize> = BTreeMap::new();
    for (r, buf) in pieces {
        if buf.len() != r.numel() {
            bail!("tensor `{}` rows {}..{}: buffer has {} elements, expected {}", r.name, r.row0, r.row0 + r.rows, buf.len(), r.numel());
        }
        let vals = dev.to_vec(buf)?;
        let entry = out.entry(r.name.clone()).or_insert_with(|| (r.full_shape.clone(), vec![0.0; r.full_shape.iter().product()]));
        if entry.0 != r.full_shape {
            bail!("tensor `{}`: pieces disagree on its shape ({:?} vs {:?})", r.name, entry.0, r.full_shape);
        }
        let a = r.row0 * r.row_len();
        entry.1[a..a + vals.len()].copy_from_slice(&vals);
        *covered.entry(r.name).or_default() += r.rows;
    }
    for (name, (shape, _)) in &out {
        let rows = shape.first().copied().unwrap_or(1);
        if covered.get(name) != Some(&rows) {
            bail!("tensor `{name}`: pieces cover {:?} of its {rows} rows", covered.get(name));
        }
    }
    Ok(out)
}

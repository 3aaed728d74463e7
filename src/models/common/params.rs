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
        ParamRef {
            name: name.to_string(),
            full_shape: shape.to_vec(),
            row0: 0,
            rows: shape.first().copied().unwrap_or(1),
        }
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
    let piece = &full[a..a + n];
    // A NaN or inf weight would only show up as NaN logits; name the tensor at load instead.
    if let Some(k) = piece.iter().position(|x| !x.is_finite()) {
        let at = ckpt.file_of(name).map_or_else(|| ckpt.dir().display().to_string(), |f| f.display().to_string());
        bail!("{at}: tensor `{name}` holds {} at element {} (weights must be finite)", piece[k], a + k);
    }
    Ok(piece.to_vec())
}

/// Full tensors (name → (shape, f32 values)) from pieces; every row of each tensor must be covered.
pub fn assemble(dev: &Device, pieces: Vec<(ParamRef, &Buf)>) -> Result<NamedTensors> {
    let mut out = NamedTensors::new();
    let mut covered: BTreeMap<String, usize> = BTreeMap::new();
    for (r, buf) in pieces {
        if buf.len() != r.numel() {
            bail!(
                "tensor `{}` rows {}..{}: buffer has {} elements, expected {}",
                r.name,
                r.row0,
                r.row0 + r.rows,
                buf.len(),
                r.numel()
            );
        }
        let vals = dev.to_vec(buf)?;
        let entry = out
            .entry(r.name.clone())
            .or_insert_with(|| (r.full_shape.clone(), vec![0.0; r.full_shape.iter().product()]));
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

/// How parameter gradients are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GradStore {
    /// Every gradient in f32 (exact accumulation; 4 bytes per parameter).
    #[default]
    F32,
    /// On CUDA, the gradients of the linear-layer weight matrices in bf16 (the cuBLAS dW GEMM
    /// accumulates in f32 and rounds once per product); everything else (norms, biases,
    /// embeddings, lm_head, patch embeddings) stays f32. Saves 2 bytes per parameter on ~87 %
    /// of a 7B model, which is what lets a full fine-tune fit on one 141 GB card.
    Bf16Linear,
}

impl GradStore {
    /// The dtype of `r`'s gradient buffer on `dev` (the CPU always stores f32).
    pub fn dtype(self, dev: &Device, r: &ParamRef) -> crate::tensor::DType {
        use crate::tensor::DType;
        match (self, dev) {
            (GradStore::Bf16Linear, Device::Cuda(_)) if is_linear_weight(r) => DType::BF16,
            _ => DType::F32,
        }
    }

    /// Bytes of gradient storage for `params` under this policy.
    pub fn bytes(self, dev: &Device, params: &[ParamRef]) -> usize {
        params.iter().map(|r| r.numel() * self.dtype(dev, r).size()).sum()
    }
}

/// A linear layer's weight matrix: its gradient comes from one cuBLAS dW GEMM (which can
/// accumulate into bf16), unlike embeddings (scatter-add), the lm_head (the fused log-prob's
/// chunked f32 accumulation), norms and biases.
pub fn is_linear_weight(r: &ParamRef) -> bool {
    r.full_shape.len() == 2 && r.name.ends_with(".weight") && !r.name.contains("embed") && !r.name.contains("lm_head")
}

impl std::str::FromStr for GradStore {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(GradStore::F32),
            "bf16" => Ok(GradStore::Bf16Linear),
            _ => bail!("gradient dtype `{s}`: expected f32 or bf16"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    #[test]
    fn grad_store_picks_linear_weights_only_on_cuda() {
        let cpu = Device::Cpu;
        let lin = ParamRef::whole("model.layers.0.mlp.up_proj.weight", &[8, 4]);
        assert_eq!(GradStore::Bf16Linear.dtype(&cpu, &lin), DType::F32, "the CPU stores f32");
        assert_eq!(GradStore::F32.dtype(&cpu, &lin), DType::F32);
        for (name, shape, linear) in [
            ("model.layers.0.self_attn.q_proj.weight", vec![8, 4], true),
            ("visual.blocks.0.attn.qkv.weight", vec![12, 4], true),
            ("model.layers.0.self_attn.q_proj.bias", vec![8], false),
            ("model.norm.weight", vec![4], false),
            ("model.embed_tokens.weight", vec![16, 4], false),
            ("lm_head.weight", vec![16, 4], false),
            ("language_model.lm_head.weight", vec![16, 4], false),
            ("visual.patch_embed.proj.weight", vec![4, 3, 2, 14, 14], false),
            ("vision_tower.vision_model.embeddings.position_embedding.weight", vec![5, 4], false),
        ] {
            assert_eq!(is_linear_weight(&ParamRef::whole(name, &shape)), linear, "{name}");
        }
        assert_eq!("bf16".parse::<GradStore>().unwrap(), GradStore::Bf16Linear);
        assert!("fp8".parse::<GradStore>().unwrap_err().to_string().contains("fp8"));
    }
}

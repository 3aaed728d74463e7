//! `am3 forward`: one forward (and optionally backward) of a model on an inputs file laid out
//! like the fixtures' `inputs.safetensors`, for comparing against other implementations.
//!
//! The model directory's config.json decides the family (`model_type` qwen2_5_vl or llava_next).
//! Inputs (every value checked: ids, grids and sizes whole numbers of a non-BOOL dtype, floats
//! finite, each error naming the tensor and element): `input_ids` [1, S] (any int or float dtype), `loss_mask` [1, S] (optional; default all
//! ones), and the images: for Qwen2.5-VL `pixel_values` [patches, patch_dim] with
//! `image_grid_thw` [n, 3]; for LLaVA-NeXT `pixel_values` [n, max_tiles, 3, S, S] (a processor
//! batch, padded along the tile axis) or compact [Σ tiles, 3, S, S], with `image_sizes` [n, 2]
//! (original height, width).
//! Outputs (f32 unless noted): `logits` [S, V]; `token_logprobs` [S−1] = log p(ids[t+1] | ids[..=t]);
//! `objective` [1] = Σ_t loss_mask[t+1]·token_logprobs[t]; Qwen only: `position_ids` [3, S] (i64,
//! M-RoPE); with `--grads`, d objective / d parameter for every parameter that receives one, keyed
//! by the checkpoint's own tensor names.

use super::examples::Packed;
use super::model::{Net, VlModel};
use crate::checkpoint::safetensors_io::write_atomic;
use crate::checkpoint::safetensors_io::{decode_f64, parse_header, StDtype};
use crate::models::llava_next::model::{strip_tile_padding, LlavaNext};
use crate::models::qwen2_5_vl::model::Recompute;
use crate::models::qwen2_5_vl::positions::mrope_positions;
use crate::tensor::{DType, Device, DevicePref};
use crate::train::run_dir::guard_output_file;
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct ForwardArgs {
    /// Model directory (HF layout: config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Inputs file (safetensors, laid out like the fixtures' inputs.safetensors).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Output safetensors file (written atomically; never one of the inputs or a file of the
    /// model directory).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DevicePref,
    /// Also write the gradient of `objective` for every parameter.
    #[arg(long)]
    pub grads: bool,
}

type Tensors = HashMap<String, (Vec<usize>, Vec<f64>)>;

fn take<'a>(t: &'a Tensors, name: &str, file: &Path) -> Result<&'a (Vec<usize>, Vec<f64>)> {
    t.get(name).with_context(|| format!("{}: no tensor `{name}`", file.display()))
}

/// The inputs file as name → (dtype, shape, values as f64).
fn read_inputs(path: &Path) -> Result<(Tensors, HashMap<String, StDtype>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let header = parse_header(&bytes, path)?;
    let (mut vals, mut dtypes) = (Tensors::new(), HashMap::new());
    for t in header.tensors {
        vals.insert(t.name.clone(), (t.shape.clone(), decode_f64(t.dtype, &bytes[t.start..t.end])));
        dtypes.insert(t.name, t.dtype);
    }
    Ok((vals, dtypes))
}

/// Element `k` of a row-major tensor of `shape` as `[i, j, …]`.
fn index_of(mut k: usize, shape: &[usize]) -> String {
    let mut idx = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        if n > 0 {
            idx[d] = k % n;
            k /= n;
        }
    }
    format!("{idx:?}")
}

/// A value for a message: plain, or in exponent form when long.
fn show(x: f64) -> String {
    if x.is_finite() && x.abs() >= 1e15 {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

/// The checks every input tensor gets: its values finite, and for integer tensors (ids, grids,
/// sizes) whole numbers in `[min, i32::MAX]` of a non-BOOL dtype. Errors name file, tensor and
/// element.
struct Check<'a> {
    file: &'a Path,
    vals: &'a Tensors,
    dtypes: &'a HashMap<String, StDtype>,
}

impl Check<'_> {
    fn finite(&self, name: &str) -> Result<()> {
        let (shape, v) = &self.vals[name];
        // f32 is what the model sees: a finite f64 beyond its range is inf there.
        if let Some(k) = v.iter().position(|x| !x.is_finite() || x.abs() > f32::MAX as f64) {
            bail!(
                "{}: `{name}` holds {} at {}; inputs must be finite f32 values",
                self.file.display(),
                show(v[k]),
                index_of(k, shape)
            );
        }
        Ok(())
    }

    fn whole(&self, name: &str, min: i64) -> Result<()> {
        let (shape, v) = &self.vals[name];
        if self.dtypes[name] == StDtype::Bool {
            bail!("{}: `{name}` has dtype BOOL; it holds whole numbers (an integer dtype, or a float one with whole values)", self.file.display());
        }
        for (k, &x) in v.iter().enumerate() {
            let why = if !x.is_finite() || x.fract() != 0.0 {
                "must be a whole number"
            } else if x < min as f64 {
                if min == 0 {
                    "must not be negative"
                } else {
                    "must be positive"
                }
            } else if x > i32::MAX as f64 {
                "is too large"
            } else {
                continue;
            };
            bail!("{}: `{name}` holds {} at {}: {why}", self.file.display(), show(x), index_of(k, shape));
        }
        Ok(())
    }
}

/// The tensors `am3 forward` reads, per family.
const QWEN_INPUTS: [&str; 4] = ["input_ids", "loss_mask", "pixel_values", "image_grid_thw"];
const LLAVA_INPUTS: [&str; 4] = ["input_ids", "loss_mask", "pixel_values", "image_sizes"];

pub fn run(a: &ForwardArgs) -> Result<()> {
    // The output replaces its path atomically: never an input, nor a file of the model.
    guard_output_file("--out", &a.out, &[("--inputs", &a.inputs), ("--model", &a.model)])?;
    let dev = Device::pick(a.device)?;
    let (inputs, dtypes) = read_inputs(&a.inputs)?;
    let chk = Check { file: &a.inputs, vals: &inputs, dtypes: &dtypes };
    let (shape, ids) = take(&inputs, "input_ids", &a.inputs)?;
    if shape.len() != 2 || shape[0] != 1 {
        bail!("{}: input_ids has shape {shape:?}, expected [1, S] (batch 1)", a.inputs.display());
    }
    chk.whole("input_ids", 0)?;
    let ids: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    let s = ids.len();
    if s < 2 {
        bail!("{}: input_ids needs at least 2 tokens", a.inputs.display());
    }
    let loss_mask: Vec<f32> = match inputs.get("loss_mask") {
        Some((_, v)) if v.len() == s => {
            chk.finite("loss_mask")?;
            v.iter().map(|&x| x as f32).collect()
        }
        Some((sh, _)) => bail!("{}: loss_mask has shape {sh:?}, expected [1, {s}]", a.inputs.display()),
        None => vec![1.0; s],
    };
    for name in ["pixel_values", "image_grid_thw", "image_sizes"] {
        if inputs.contains_key(name) {
            if name == "pixel_values" {
                if dtypes[name] == StDtype::Bool {
                    bail!("{}: `pixel_values` has dtype BOOL; expected a float dtype", a.inputs.display());
                }
                chk.finite(name)?;
            } else {
                chk.whole(name, 1)?;
            }
        }
    }
    let mut model = VlModel::load_model_or_adapter(&dev, &a.model)?;
    let known: &[&str] = match model.net {
        Net::Qwen(_) => &QWEN_INPUTS,
        Net::Llava(_) => &LLAVA_INPUTS,
    };
    let mut unused: Vec<&String> = inputs.keys().filter(|k| !known.contains(&k.as_str())).collect();
    if !unused.is_empty() {
        unused.sort();
        eprintln!(
            "am3 forward: {}: ignoring tensors a {} model does not read: {unused:?}",
            a.inputs.display(),
            model.family().model_type()
        );
    }
    let mut p = Packed { ids: ids.clone(), cu_seqlens: vec![0, s as i32], ..Default::default() };
    match &model.net {
        Net::Qwen(m) => {
            let (pixels, grids) = match (inputs.get("pixel_values"), inputs.get("image_grid_thw")) {
                (Some((_, p)), Some((gs, g))) => {
                    if gs.len() != 2 || gs[1] != 3 {
                        bail!("{}: image_grid_thw has shape {gs:?}, expected [n, 3]", a.inputs.display());
                    }
                    (
                        p.iter().map(|&x| x as f32).collect(),
                        g.chunks(3).map(|c| [c[0] as usize, c[1] as usize, c[2] as usize]).collect(),
                    )
                }
                (None, None) => (Vec::new(), Vec::new()),
                _ => bail!("{}: pixel_values and image_grid_thw must come together", a.inputs.display()),
            };
            p.pos3 = mrope_positions(&ids, &grids, &m.cfg)?.0;
            (p.pixels, p.grids) = (pixels, grids);
        }
        Net::Llava(m) => (p.pixels, p.image_sizes) = llava_images(&inputs, m, &a.inputs)?,
    }
    let f = model.forward(&dev, &p, &Recompute::default())?;
    let logits = dev.to_vec(&model.logits(&dev, &f)?)?;
    // Inputs and weights are finite; a non-finite logit is an overflow in the model itself.
    if let Some(k) = logits.iter().position(|x| !x.is_finite()) {
        let v = logits.len() / s;
        bail!("the forward produced a non-finite logit ({} at token {}, vocabulary entry {}) from finite inputs and weights", logits[k], k / v, k % v);
    }
    // A next id past the vocabulary (LLaVA's placeholder may lie there) has no log-prob: 0.
    let vocab = model.tdims().vocab as i32;
    let mut targets: Vec<i32> = ids[1..].to_vec();
    targets.push(0);
    let mut valid = vec![1f32; s];
    valid[s - 1] = 0.0;
    for (t, v) in targets.iter_mut().zip(valid.iter_mut()) {
        if *t < 0 || *t >= vocab {
            (*t, *v) = (0, 0.0);
        }
    }
    let (tb, vb) = (dev.upload_i32(&targets)?, dev.upload(&valid, DType::F32)?);
    let (logp, lse) = model.logprobs(&dev, &f, &tb, Some(&vb))?;
    let logp = dev.to_vec(&logp)?;
    let dlogp: Vec<f32> = (0..s).map(|t| if t + 1 < s { loss_mask[t + 1] * valid[t] } else { 0.0 }).collect();
    let objective: f64 = (0..s).map(|t| dlogp[t] as f64 * logp[t] as f64).sum();
    let mut out: Vec<(String, Vec<usize>, OutData)> = Vec::new();
    out.push(("logits".into(), vec![s, logits.len() / s], OutData::F32(logits)));
    out.push(("token_logprobs".into(), vec![s - 1], OutData::F32(logp[..s - 1].to_vec())));
    out.push(("objective".into(), vec![1], OutData::F32(vec![objective as f32])));
    if !p.pos3.is_empty() {
        out.push(("position_ids".into(), vec![3, s], OutData::I64(p.pos3.iter().map(|&x| x as i64).collect())));
    }
    if a.grads {
        model.zero_grads(&dev)?;
        model.backward_logprobs(&dev, &f, &tb, &lse, &dev.upload(&dlogp, DType::F32)?)?;
        for (name, (shape, g)) in model.grads_by_name(&dev)? {
            out.push((name, shape, OutData::F32(g)));
        }
    }
    write_tensors(&a.out, &out)?;
    eprintln!("am3 forward: wrote {} tensors to {}", out.len(), a.out.display());
    Ok(())
}

/// Compact pixels [Σ tiles, 3, S, S] and the original (height, width) of each image.
type LlavaImages = (Vec<f32>, Vec<(usize, usize)>);

/// LLaVA-NeXT images of an inputs file: compact pixels [Σ tiles, 3, S, S] (a padded processor
/// batch [n, max_tiles, 3, S, S] loses its padding tiles) and the original sizes.
fn llava_images(inputs: &Tensors, m: &LlavaNext, file: &Path) -> Result<LlavaImages> {
    let ((ps, pv), (ss, sv)) = match (inputs.get("pixel_values"), inputs.get("image_sizes")) {
        (Some(p), Some(s)) => (p, s),
        (None, None) => return Ok((Vec::new(), Vec::new())),
        _ => bail!("{}: pixel_values and image_sizes must come together", file.display()),
    };
    if sv.len() % 2 != 0 || ss.last() != Some(&2) {
        bail!("{}: image_sizes has shape {ss:?}, expected [n, 2]", file.display());
    }
    let sizes: Vec<(usize, usize)> = sv.chunks(2).map(|c| (c[0] as usize, c[1] as usize)).collect();
    let tiles: Vec<usize> = m.geometries(&sizes)?.iter().map(|g| g.num_tiles()).collect();
    let tile_len = m.vdims.tile_len();
    let pixels: Vec<f32> = pv.iter().map(|&x| x as f32).collect();
    let tail: usize = ps.iter().rev().take(3).product();
    if ps.len() < 4 || tail != tile_len {
        bail!(
            "{}: pixel_values has shape {ps:?}; expected [.., 3, {s}, {s}] tiles of the model's vision image_size",
            file.display(),
            s = m.cfg.vision.image_size
        );
    }
    let pixels = match ps.len() {
        5 if ps[0] == sizes.len() => strip_tile_padding(&pixels, ps[1], &tiles, tile_len)
            .with_context(|| format!("{}: pixel_values", file.display()))?,
        4 => pixels,
        _ => bail!(
            "{}: pixel_values has shape {ps:?}, expected [{}, max_tiles, 3, S, S] or [tiles, 3, S, S]",
            file.display(),
            sizes.len()
        ),
    };
    Ok((pixels, sizes))
}

pub enum OutData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// Writes named tensors as one safetensors file, atomically.
pub fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, OutData)]) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| match d {
            OutData::F32(v) => bytemuck::cast_slice(v).to_vec(),
            OutData::I64(v) => bytemuck::cast_slice(v).to_vec(),
        })
        .collect();
    let mut views = BTreeMap::new();
    for ((name, shape, d), b) in tensors.iter().zip(&bytes) {
        let dt = match d {
            OutData::F32(_) => Dtype::F32,
            OutData::I64(_) => Dtype::I64,
        };
        views.insert(
            name.clone(),
            TensorView::new(dt, shape.clone(), b).with_context(|| format!("tensor {name}: shape {shape:?}"))?,
        );
    }
    let data = safetensors::serialize(&views, None).context("serializing the outputs")?;
    write_atomic(path, &data)
}

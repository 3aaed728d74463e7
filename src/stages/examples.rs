//! Training examples: a dataset sample rendered with the model's chat template, its images
//! preprocessed, and next-token targets with weights (1 on assistant tokens). Qwen2.5-VL
//! examples carry M-RoPE positions and image grids; LLaVA-NeXT ones the images' original sizes
//! (their positions restart at 0 in every sequence, so none are stored). `pack` lays several
//! examples back to back as one varlen batch.

use crate::data::dataset::{Kind, Sample};
use crate::models::llava_next::chat::{LlavaChatOptions, LlavaChatTemplate};
use crate::models::llava_next::config::{LlavaNextConfig, LlavaPreprocessorConfig};
use crate::models::llava_next::model::Batch as LlavaBatch;
use crate::models::llava_next::packing::AnyresGeometry;
use crate::models::llava_next::processor::process_image_file as process_llava_image_file;
use crate::models::qwen2_5_vl::chat::{ChatOptions, ChatTemplate};
use crate::models::qwen2_5_vl::config::{QwenPreprocessorConfig, QwenVlConfig};
use crate::models::qwen2_5_vl::model::Batch;
use crate::models::qwen2_5_vl::positions::mrope_positions;
use crate::models::qwen2_5_vl::processor::process_image_file;
use anyhow::{bail, Context, Result};

#[derive(Clone, Debug)]
pub struct Example {
    pub id: String,
    pub kind: Kind,
    pub ids: Vec<i32>,                    // [S]
    pub targets: Vec<i32>,                // [S]: ids[t+1] (0 at the last position)
    pub weights: Vec<f32>,                // [S]: 1 where targets[t] is an assistant token
    pub pos3: Vec<i32>,                   // [3, S] (Qwen; empty for LLaVA)
    pub pixels: Vec<f32>,                 // Qwen: [patches, patch_dim]; LLaVA: [tiles, 3, S, S]; images in prompt order
    pub grids: Vec<[usize; 3]>,           // Qwen
    pub image_sizes: Vec<(usize, usize)>, // LLaVA: original (height, width) per image
}

impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    pub fn n_targets(&self) -> usize {
        self.weights.iter().filter(|&&w| w != 0.0).count()
    }
}

/// Renders, tokenises and preprocesses one sample. Errors name the sample's file:line.
pub fn encode(s: &Sample, tmpl: &ChatTemplate, cfg: &QwenVlConfig, pp: &QwenPreprocessorConfig) -> Result<Example> {
    let ctx = || format!("sample {} ({})", s.id, s.origin);
    let mut imgs = Vec::with_capacity(s.images.len());
    for p in &s.images {
        imgs.push(process_image_file(p, pp).with_context(ctx)?);
    }
    let grids_by_index: Vec<[usize; 3]> = imgs.iter().map(|i| i.grid_thw).collect();
    let ct = tmpl.encode_chat(&s.to_chat(), &grids_by_index, &ChatOptions::default()).with_context(ctx)?;
    let mut pixels = Vec::new();
    for &k in &ct.image_order {
        pixels.extend_from_slice(&imgs[k].pixel_values);
    }
    let (pos3, _) = mrope_positions(&ct.ids, &ct.grids, cfg).with_context(ctx)?;
    let n = ct.ids.len();
    let mut targets = vec![0i32; n];
    let mut weights = vec![0f32; n];
    for t in 0..n.saturating_sub(1) {
        targets[t] = ct.ids[t + 1];
        weights[t] = ct.loss_mask[t + 1] as f32;
    }
    Ok(Example {
        id: s.id.clone(),
        kind: s.kind,
        ids: ct.ids,
        targets,
        weights,
        pos3,
        pixels,
        grids: ct.grids,
        image_sizes: Vec::new(),
    })
}

/// The LLaVA-NeXT form of [`encode`]: anyres tiles (compact, `[tiles, 3, S, S]`), each image's
/// `<image>` expanded to the model's token count, `opts` (e.g. `vicuna_eos`) for the template.
/// A target id past the vocabulary (the placeholder may lie there) is replaced by 0; it is
/// never weighted.
pub fn encode_llava(
    s: &Sample, tmpl: &LlavaChatTemplate, cfg: &LlavaNextConfig, pp: &LlavaPreprocessorConfig, opts: &LlavaChatOptions,
) -> Result<Example> {
    let ctx = || format!("sample {} ({})", s.id, s.origin);
    let mut imgs = Vec::with_capacity(s.images.len());
    let mut counts = Vec::with_capacity(s.images.len());
    for p in &s.images {
        let img = process_llava_image_file(p, pp).with_context(ctx)?;
        counts.push(AnyresGeometry::for_config(img.image_size, cfg).with_context(ctx)?.num_tokens());
        imgs.push(img);
    }
    let ct = tmpl.encode_chat(&s.to_chat(), &counts, opts).with_context(ctx)?;
    let (mut pixels, mut image_sizes) = (Vec::new(), Vec::new());
    for &k in &ct.image_order {
        pixels.extend_from_slice(&imgs[k].pixel_values);
        image_sizes.push(imgs[k].image_size);
    }
    let n = ct.ids.len();
    let vocab = cfg.text.vocab_size as i32;
    let mut targets = vec![0i32; n];
    let mut weights = vec![0f32; n];
    for t in 0..n.saturating_sub(1) {
        let (id, w) = (ct.ids[t + 1], ct.loss_mask[t + 1] as f32);
        if id < 0 || id >= vocab {
            if w != 0.0 {
                bail!("sample {} ({}): target token {id} lies outside the vocabulary of {vocab}", s.id, s.origin);
            }
            continue;
        }
        targets[t] = id;
        weights[t] = w;
    }
    Ok(Example {
        id: s.id.clone(),
        kind: s.kind,
        ids: ct.ids,
        targets,
        weights,
        pos3: Vec::new(),
        pixels,
        grids: Vec::new(),
        image_sizes,
    })
}

/// Several examples packed back to back (no padding), as the model's varlen batch wants them.
#[derive(Clone, Debug, Default)]
pub struct Packed {
    pub ids: Vec<i32>,
    pub targets: Vec<i32>,
    pub weights: Vec<f32>,
    pub pos3: Vec<i32>,
    pub cu_seqlens: Vec<i32>,
    pub pixels: Vec<f32>,
    pub grids: Vec<[usize; 3]>,
    pub image_sizes: Vec<(usize, usize)>,
}

impl Packed {
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            ids: &self.ids,
            cu_seqlens: &self.cu_seqlens,
            pos3: &self.pos3,
            pixels: &self.pixels,
            grids: &self.grids,
        }
    }
    /// The LLaVA-NeXT batch (positions come from `cu_seqlens`).
    pub fn llava_batch(&self) -> LlavaBatch<'_> {
        LlavaBatch {
            ids: &self.ids,
            cu_seqlens: &self.cu_seqlens,
            pixels: &self.pixels,
            image_sizes: &self.image_sizes,
        }
    }
}

pub fn pack(examples: &[&Example]) -> Packed {
    let total: usize = examples.iter().map(|e| e.len()).sum();
    // M-RoPE rows only when the examples have them (Qwen).
    let with_pos = examples.iter().any(|e| !e.pos3.is_empty());
    let mut p =
        Packed { cu_seqlens: vec![0], pos3: vec![0; if with_pos { 3 * total } else { 0 }], ..Default::default() };
    let mut off = 0usize;
    for e in examples {
        let s = e.len();
        p.ids.extend_from_slice(&e.ids);
        p.targets.extend_from_slice(&e.targets);
        p.weights.extend_from_slice(&e.weights);
        if with_pos && e.pos3.len() == 3 * s {
            for r in 0..3 {
                p.pos3[r * total + off..r * total + off + s].copy_from_slice(&e.pos3[r * s..(r + 1) * s]);
            }
        }
        p.pixels.extend_from_slice(&e.pixels);
        p.grids.extend_from_slice(&e.grids);
        p.image_sizes.extend_from_slice(&e.image_sizes);
        off += s;
        p.cu_seqlens.push(off as i32);
    }
    p
}

/// Groups example indices (in the given order) into micro-batches of at most `max_tokens`
/// tokens each (an example longer than that gets a micro-batch of its own).
pub fn micro_batches(order: &[usize], lens: &[usize], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_len = 0;
    for &i in order {
        if !cur.is_empty() && cur_len + lens[i] > max_tokens {
            out.push(std::mem::take(&mut cur));
            cur_len = 0;
        }
        cur.push(i);
        cur_len += lens[i];
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

//! The images of one engine call. Each distinct file is registered once: its size is read from
//! the header, which is all the prompt needs (placeholder counts, Qwen's grid). The pixels are
//! decoded and preprocessed only when a rollout first shows the image, run through the vision
//! tower (several images per call, up to a patch budget) and dropped; the embeddings are shared
//! by every rollout that shows it. So a call over a whole benchmark file never holds every
//! image's pixels at once. A training example re-prepares the pixels it needs (`inputs`).

use crate::data::image::image_size;
use crate::models::llava_next::packing::AnyresGeometry;
use crate::models::llava_next::processor::process_image_file as process_llava;
use crate::models::qwen2_5_vl::processor::{grid_for_size, image_tokens, process_image_file as process_qwen};
use crate::ops::patch_embed::{gather_rows, scatter_rows, RowIndex};
use crate::stages::model::{Net, Processor, VlModel};
use crate::tensor::{Buf, Device};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Most vision patches (Qwen) or tiles × 576 (LLaVA) per tower call.
const PATCH_BUDGET: usize = 16384;

/// One registered image.
struct Entry {
    path: PathBuf,
    /// The first dialogue that showed it (`dialogue ID (file:line)`), for decode errors.
    who: String,
    /// Qwen: the patch grid [t, h, w]; LLaVA: None.
    grid: Option<[usize; 3]>,
    /// The original (height, width).
    size: (usize, usize),
    tokens: usize,
    /// Vision patches (Qwen) or tiles × 576 (LLaVA), for the tower's batch budget.
    patches: usize,
    /// Preprocessed pixels while needed: Qwen patches [n, patch_dim] or LLaVA tiles [n, 3, S, S].
    pixels: Option<Vec<f32>>,
    embeds: Option<Buf>,
}

pub struct ImageBank {
    pp: Processor,
    by_path: HashMap<PathBuf, usize>,
    entries: Vec<Entry>,
}

impl std::fmt::Debug for ImageBank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageBank({} images)", self.entries.len())
    }
}

impl ImageBank {
    /// An empty bank preprocessing with `pp` (the model's image processor settings).
    pub fn new(pp: &Processor) -> Self {
        ImageBank { pp: pp.clone(), by_path: HashMap::new(), entries: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn path(&self, i: usize) -> &Path {
        &self.entries[i].path
    }

    /// The bank index of `path`, registering it (its size from the header) on first sight;
    /// `who` names the dialogue showing it, for errors when it is decoded later.
    pub fn add(&mut self, model: &VlModel, path: &Path, who: &str) -> Result<usize> {
        if let Some(&i) = self.by_path.get(path) {
            return Ok(i);
        }
        let size = image_size(path)?;
        let (grid, tokens, patches) = match (&model.net, &self.pp) {
            (Net::Qwen(m), Processor::Qwen(pp)) => {
                let g = grid_for_size(size.0, size.1, pp).with_context(|| path.display().to_string())?;
                (Some(g), image_tokens(g, m.cfg.vision.spatial_merge_size.max(1)), g.iter().product())
            }
            (Net::Llava(m), Processor::Llava(_)) => {
                let geo = AnyresGeometry::for_config(size, &m.cfg).with_context(|| path.display().to_string())?;
                (None, geo.num_tokens(), geo.num_tiles() * 576)
            }
            _ => bail!("the image processor settings are not for a {} model", model.family().model_type()),
        };
        let i = self.entries.len();
        self.by_path.insert(path.to_path_buf(), i);
        self.entries.push(Entry {
            path: path.to_path_buf(),
            who: who.to_string(),
            grid,
            size,
            tokens,
            patches,
            pixels: None,
            embeds: None,
        });
        Ok(i)
    }

    /// Placeholder tokens image i takes in the prompt.
    pub fn tokens(&self, i: usize) -> usize {
        self.entries[i].tokens
    }

    /// The Qwen grid of image i (None for LLaVA).
    pub fn grid(&self, i: usize) -> Option<[usize; 3]> {
        self.entries[i].grid
    }

    /// Decodes and preprocesses image i if its pixels are not held; checks that they agree with
    /// the size its header gave.
    fn prepare(&mut self, i: usize) -> Result<()> {
        let e = &mut self.entries[i];
        if e.pixels.is_some() {
            return Ok(());
        }
        let ctx = || format!("image {} of {}", e.path.display(), e.who);
        let pixels = match &self.pp {
            Processor::Qwen(pp) => {
                let img = process_qwen(&e.path, pp).with_context(ctx)?;
                if Some(img.grid_thw) != e.grid {
                    bail!(
                        "image {}: decoded to grid {:?}, its header said {:?}",
                        e.path.display(),
                        img.grid_thw,
                        e.grid
                    );
                }
                img.pixel_values
            }
            Processor::Llava(pp) => {
                let img = process_llava(&e.path, pp).with_context(ctx)?;
                if img.image_size != e.size {
                    bail!("image {}: decoded to {:?}, its header said {:?}", e.path.display(), img.image_size, e.size);
                }
                img.pixel_values
            }
        };
        e.pixels = Some(pixels);
        Ok(())
    }

    /// Runs the tower on every image of `which` that has no embeddings yet (several per call),
    /// then drops their pixels.
    pub fn ensure_embeds(&mut self, dev: &Device, model: &VlModel, which: &[usize]) -> Result<()> {
        let mut todo: Vec<usize> = which.iter().copied().filter(|&i| self.entries[i].embeds.is_none()).collect();
        todo.sort_unstable();
        todo.dedup();
        let mut chunk: Vec<usize> = Vec::new();
        let mut budget = 0;
        for i in todo {
            let p = self.entries[i].patches;
            if !chunk.is_empty() && budget + p > PATCH_BUDGET {
                self.embed_chunk(dev, model, &std::mem::take(&mut chunk))?;
                budget = 0;
            }
            budget += p;
            chunk.push(i);
        }
        if !chunk.is_empty() {
            self.embed_chunk(dev, model, &chunk)?;
        }
        Ok(())
    }

    fn embed_chunk(&mut self, dev: &Device, model: &VlModel, chunk: &[usize]) -> Result<()> {
        let d = model.tdims().layer.d;
        for &i in chunk {
            self.prepare(i)?;
        }
        let (pixels, grids, sizes) = self.gather(chunk);
        let all = match &model.net {
            Net::Qwen(m) => m.image_embeds(dev, &pixels, &grids)?,
            Net::Llava(m) => m.image_embeds(dev, &pixels, &sizes)?,
        };
        drop(pixels);
        let total: usize = chunk.iter().map(|&i| self.entries[i].tokens).sum();
        if all.len() != total * d {
            bail!("vision tower gave {} rows for {total} image tokens", all.len() / d.max(1));
        }
        let mut off = 0;
        for &i in chunk {
            let e = &mut self.entries[i];
            let idx = RowIndex::new(dev, &(off..off + e.tokens).collect::<Vec<_>>(), total)?;
            let mut rows = dev.zeros(all.dtype(), e.tokens * d)?;
            gather_rows(dev, &mut rows, &all, &idx, d)?;
            e.embeds = Some(rows);
            e.pixels = None;
            off += e.tokens;
        }
        Ok(())
    }

    /// The embeddings of `which` (in order, repeats allowed) back to back, [Σ tokens, d].
    pub fn rows_for(&self, dev: &Device, which: &[usize], d: usize) -> Result<Option<Buf>> {
        if which.is_empty() {
            return Ok(None);
        }
        let total: usize = which.iter().map(|&i| self.entries[i].tokens).sum();
        let mut out: Option<Buf> = None;
        let mut off = 0;
        for &i in which {
            let e = &self.entries[i];
            let Some(emb) = &e.embeds else { bail!("image {} has no embeddings yet", e.path.display()) };
            let o = match out.as_mut() {
                Some(o) => o,
                None => out.insert(dev.zeros(emb.dtype(), total * d)?),
            };
            let at = RowIndex::new(dev, &(off..off + e.tokens).collect::<Vec<_>>(), total)?;
            scatter_rows(dev, o, emb, &at, d)?;
            off += e.tokens;
        }
        Ok(out)
    }

    /// Frees the device embeddings (before a training update).
    pub fn release_embeds(&mut self) {
        self.entries.iter_mut().for_each(|e| e.embeds = None);
    }

    /// The held pixels of `which` in order: Qwen patches and grids, or LLaVA tiles and sizes.
    #[allow(clippy::type_complexity)]
    fn gather(&self, which: &[usize]) -> (Vec<f32>, Vec<[usize; 3]>, Vec<(usize, usize)>) {
        let (mut px, mut grids, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
        for &i in which {
            let e = &self.entries[i];
            px.extend_from_slice(e.pixels.as_deref().unwrap_or_default());
            match e.grid {
                Some(g) => grids.push(g),
                None => sizes.push(e.size),
            }
        }
        (px, grids, sizes)
    }

    /// The model inputs of images `which` in order (decoded again if their pixels were
    /// dropped, then kept: a dialogue's N rollouts train on the same images).
    #[allow(clippy::type_complexity)]
    pub fn inputs(&mut self, which: &[usize]) -> Result<(Vec<f32>, Vec<[usize; 3]>, Vec<(usize, usize)>)> {
        for &i in which {
            self.prepare(i)?;
        }
        Ok(self.gather(which))
    }
}

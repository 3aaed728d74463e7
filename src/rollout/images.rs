//! The images of one engine call: each distinct file is decoded and preprocessed once, and its
//! embeddings (vision tower + merger/projector) are computed once, when a rollout first shows
//! it, then shared by every rollout that shows it. The tower runs on several images per call,
//! up to a patch budget, so its activations stay small.

use crate::models::llava_next::packing::AnyresGeometry;
use crate::models::llava_next::processor::process_image_file as process_llava;
use crate::models::qwen2_5_vl::processor::process_image_file as process_qwen;
use crate::ops::patch_embed::{gather_rows, scatter_rows, RowIndex};
use crate::stages::model::{Net, Processor, VlModel};
use crate::tensor::{Buf, Device};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Most vision patches (Qwen) or tiles × 576 (LLaVA) per tower call.
const PATCH_BUDGET: usize = 16384;

/// One preprocessed image.
#[derive(Clone, Debug)]
pub enum Prepared {
    /// Patches [n, patch_dim] and the grid [t, h, w] in patches.
    Qwen { pixels: Vec<f32>, grid: [usize; 3] },
    /// Tiles [n, 3, S, S] and the original (height, width).
    Llava { pixels: Vec<f32>, size: (usize, usize), tiles: usize },
}

#[derive(Default)]
pub struct ImageBank {
    by_path: HashMap<PathBuf, usize>,
    pub paths: Vec<PathBuf>,
    pub prepared: Vec<Prepared>,
    tokens: Vec<usize>,
    embeds: Vec<Option<Buf>>,
}

impl std::fmt::Debug for ImageBank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageBank({} images)", self.paths.len())
    }
}

impl ImageBank {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The bank index of `path`, preprocessing it on first sight (errors name the file).
    pub fn add(&mut self, model: &VlModel, pp: &Processor, path: &Path) -> Result<usize> {
        if let Some(&i) = self.by_path.get(path) {
            return Ok(i);
        }
        let (prep, tokens) = match (&model.net, pp) {
            (Net::Qwen(m), Processor::Qwen(pp)) => {
                let img = process_qwen(path, pp)?;
                let merge = m.cfg.vision.spatial_merge_size.max(1);
                let g = img.grid_thw;
                (Prepared::Qwen { pixels: img.pixel_values, grid: g }, g[0] * g[1] * g[2] / (merge * merge))
            }
            (Net::Llava(m), Processor::Llava(pp)) => {
                let img = process_llava(path, pp)?;
                let n = AnyresGeometry::for_config(img.image_size, &m.cfg).with_context(|| format!("{}", path.display()))?.num_tokens();
                (Prepared::Llava { pixels: img.pixel_values, size: img.image_size, tiles: img.num_tiles }, n)
            }
            _ => bail!("the image processor settings are not for a {} model", model.family().model_type()),
        };
        let i = self.paths.len();
        self.by_path.insert(path.to_path_buf(), i);
        self.paths.push(path.to_path_buf());
        self.prepared.push(prep);
        self.tokens.push(tokens);
        self.embeds.push(None);
        Ok(i)
    }

    /// Placeholder tokens image i takes in the prompt.
    pub fn tokens(&self, i: usize) -> usize {
        self.tokens[i]
    }

    /// The Qwen grid of image i (None for LLaVA).
    pub fn grid(&self, i: usize) -> Option<[usize; 3]> {
        match &self.prepared[i] {
            Prepared::Qwen { grid, .. } => Some(*grid),
            Prepared::Llava { .. } => None,
        }
    }

    fn patches(&self, i: usize) -> usize {
        match &self.prepared[i] {
            Prepared::Qwen { grid, .. } => grid[0] * grid[1] * grid[2],
            Prepared::Llava { tiles, .. } => tiles * 576,
        }
    }

    /// Runs the tower on every image of `which` that has no embeddings yet (several per call).
    pub fn ensure_embeds(&mut self, dev: &Device, model: &VlModel, which: &[usize]) -> Result<()> {
        let mut todo: Vec<usize> = which.iter().copied().filter(|&i| self.embeds[i].is_none()).collect();
        todo.sort_unstable();
        todo.dedup();
        let mut chunk: Vec<usize> = Vec::new();
        let mut budget = 0;
        for i in todo {
            if !chunk.is_empty() && budget + self.patches(i) > PATCH_BUDGET {
                self.embed_chunk(dev, model, &std::mem::take(&mut chunk))?;
                budget = 0;
            }
            budget += self.patches(i);
            chunk.push(i);
        }
        if !chunk.is_empty() {
            self.embed_chunk(dev, model, &chunk)?;
        }
        Ok(())
    }

    fn embed_chunk(&mut self, dev: &Device, model: &VlModel, chunk: &[usize]) -> Result<()> {
        let d = model.tdims().layer.d;
        let mut pixels = Vec::new();
        let all = match &model.net {
            Net::Qwen(m) => {
                let mut grids = Vec::new();
                for &i in chunk {
                    if let Prepared::Qwen { pixels: p, grid } = &self.prepared[i] {
                        pixels.extend_from_slice(p);
                        grids.push(*grid);
                    }
                }
                m.image_embeds(dev, &pixels, &grids)?
            }
            Net::Llava(m) => {
                let mut sizes = Vec::new();
                for &i in chunk {
                    if let Prepared::Llava { pixels: p, size, .. } = &self.prepared[i] {
                        pixels.extend_from_slice(p);
                        sizes.push(*size);
                    }
                }
                m.image_embeds(dev, &pixels, &sizes)?
            }
        };
        let total: usize = chunk.iter().map(|&i| self.tokens[i]).sum();
        if all.len() != total * d {
            bail!("vision tower gave {} rows for {total} image tokens", all.len() / d.max(1));
        }
        let mut off = 0;
        for &i in chunk {
            let n = self.tokens[i];
            let idx = RowIndex::new(dev, &(off..off + n).collect::<Vec<_>>(), total)?;
            let mut rows = dev.zeros(all.dtype(), n * d)?;
            gather_rows(dev, &mut rows, &all, &idx, d)?;
            self.embeds[i] = Some(rows);
            off += n;
        }
        Ok(())
    }

    /// The embeddings of `which` (in order, repeats allowed) back to back, [Σ tokens, d].
    pub fn rows_for(&self, dev: &Device, which: &[usize], d: usize) -> Result<Option<Buf>> {
        if which.is_empty() {
            return Ok(None);
        }
        let total: usize = which.iter().map(|&i| self.tokens[i]).sum();
        let mut out: Option<Buf> = None;
        let mut off = 0;
        for &i in which {
            let Some(e) = &self.embeds[i] else { bail!("image {} has no embeddings yet", self.paths[i].display()) };
            let o = match out.as_mut() {
                Some(o) => o,
                None => out.insert(dev.zeros(e.dtype(), total * d)?),
            };
            let n = self.tokens[i];
            let at = RowIndex::new(dev, &(off..off + n).collect::<Vec<_>>(), total)?;
            scatter_rows(dev, o, e, &at, d)?;
            off += n;
        }
        Ok(out)
    }

    /// Frees the device embeddings (before a training update).
    pub fn release_embeds(&mut self) {
        self.embeds.iter_mut().for_each(|e| *e = None);
    }

    /// The model inputs of images `which` in order: Qwen pixels and grids, or LLaVA tiles and sizes.
    #[allow(clippy::type_complexity)]
    pub fn inputs(&self, which: &[usize]) -> (Vec<f32>, Vec<[usize; 3]>, Vec<(usize, usize)>) {
        let (mut px, mut grids, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
        for &i in which {
            match &self.prepared[i] {
                Prepared::Qwen { pixels, grid } => {
                    px.extend_from_slice(pixels);
                    grids.push(*grid);
                }
                Prepared::Llava { pixels, size, .. } => {
                    px.extend_from_slice(pixels);
                    sizes.push(*size);
                }
            }
        }
        (px, grids, sizes)
    }
}

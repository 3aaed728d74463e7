//! Anyres geometry of LLaVA-NeXT (model-spec B2, B3, B6), shared by the image processor, the
//! prompt builder and the model: which pinpoint canvas an image gets
//! ([`select_best_resolution`]), the size it is resized to inside that canvas and its padding,
//! how many `<image>` tokens it takes, and the pack plan — for every one of those tokens, which
//! vision feature row fills it (a base-image patch, an anyres-tile patch kept by the unpadding,
//! or the learned `image_newline`).
//!
//! All arithmetic follows transformers' Python exactly: `int()` truncation and first-wins ties
//! in the pinpoint choice, `ceil` in the patching size, and the unpadding's float scale rounded
//! to 7 decimals before truncation, with the crop applied symmetrically.

use super::config::LlavaNextConfig;
use anyhow::{bail, Result};
use std::ops::Range;

/// `select_best_resolution`: the pinpoint (height, width) that keeps the most of the original
/// resolution when the image is scaled to fit it, the least wasted canvas breaking ties, and
/// the earliest pinpoint winning exact ties.
pub fn select_best_resolution(orig_hw: (usize, usize), pinpoints: &[(usize, usize)]) -> Result<(usize, usize)> {
    let (h, w) = orig_hw;
    if h == 0 || w == 0 {
        bail!("select_best_resolution: image of size {h}x{w} has an empty side");
    }
    let mut best: Option<(usize, usize)> = None;
    let (mut max_eff, mut min_waste) = (0usize, usize::MAX);
    for &(ph, pw) in pinpoints {
        if ph == 0 || pw == 0 {
            bail!("select_best_resolution: pinpoint [{ph}, {pw}] has an empty side");
        }
        let s = (pw as f64 / w as f64).min(ph as f64 / h as f64);
        // int() truncates toward zero, as `as usize` does for non-negative floats.
        let eff = (((w as f64 * s) as usize) * ((h as f64 * s) as usize)).min(w * h);
        let waste = ph * pw - eff;
        if best.is_none() || eff > max_eff || (eff == max_eff && waste < min_waste) {
            best = Some((ph, pw));
            max_eff = eff;
            min_waste = waste;
        }
    }
    match best {
        Some(b) => Ok(b),
        None => bail!("select_best_resolution: the pinpoint list is empty"),
    }
}

/// `get_patch_output_size`: the (height, width) an image is resized to so that it fits the
/// canvas `target_hw` with its aspect ratio kept (one side fills the canvas, the other is
/// `ceil`ed and capped).
pub fn patch_output_size(orig_hw: (usize, usize), target_hw: (usize, usize)) -> (usize, usize) {
    let ((h, w), (th, tw)) = (orig_hw, target_hw);
    let sw = tw as f64 / w as f64;
    let sh = th as f64 / h as f64;
    if sw < sh {
        (((h as f64 * sw).ceil() as usize).min(th), tw)
    } else {
        (th, ((w as f64 * sh).ceil() as usize).min(tw))
    }
}

/// Python's `int(round(x, 7))` for x ≥ 0: rounding to 7 decimals only matters for truncation
/// when it carries into the next integer, i.e. when the fraction is ≥ 0.99999995.
fn trunc_round7(x: f64) -> usize {
    let f = x.floor();
    // x − floor(x) is exact in f64; the tie value 0.99999995 is not representable in binary,
    // so no exact ties occur.
    if x - f >= 0.999_999_95 {
        f as usize + 1
    } else {
        f as usize
    }
}

/// `unpad_image` on a feature grid of `cur_hw` = (rows, cols) for an image of original size
/// `orig_hw`: the rows and columns kept. The padding is cropped symmetrically by
/// (cur − new) // 2 on each side, so an odd difference keeps one extra row/column.
pub fn unpad_ranges(orig_hw: (usize, usize), cur_hw: (usize, usize)) -> (Range<usize>, Range<usize>) {
    let ((h, w), (ch, cw)) = (orig_hw, cur_hw);
    let orig_aspect = w as f64 / h as f64;
    let cur_aspect = cw as f64 / ch as f64;
    if orig_aspect > cur_aspect {
        let scale = cw as f64 / w as f64;
        let new_h = trunc_round7(h as f64 * scale).min(ch);
        let p = (ch - new_h) / 2;
        (p..ch - p, 0..cw)
    } else {
        let scale = ch as f64 / h as f64;
        let new_w = trunc_round7(w as f64 * scale).min(cw);
        let p = (cw - new_w) / 2;
        (0..ch, p..cw - p)
    }
}

/// Where the feature of one `<image>` token comes from.
///
/// The vision tower sees the processed tiles of one image in `pixel_values` order — tile 0 is
/// the base image (the whole image squashed to one tile), tiles 1..=T are the anyres tiles in
/// raster order — and gives g×g patch features per tile (CLS dropped), each tile's in raster
/// order: feature matrix `[1 + T, g·g, D]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackSrc {
    /// Patch `i` (row-major, 0..g²) of the base image's features (`pixel_values` tile 0).
    Base(usize),
    /// Patch (`row`, `col`) (each 0..g) of anyres tile `tile` (0-based over the anyres tiles,
    /// raster order over the tile grid, i.e. `pixel_values` tile `tile + 1`).
    Tile { tile: usize, row: usize, col: usize },
    /// The learned `image_newline` vector, closing one row of the unpadded grid.
    Newline,
}

impl PackSrc {
    /// The row of the per-image feature matrix `[(1 + T)·g², D]` this token copies, or None for
    /// the newline. `g` is the number of patches per tile side.
    pub fn feature_row(&self, g: usize) -> Option<usize> {
        match *self {
            PackSrc::Base(i) => Some(i),
            PackSrc::Tile { tile, row, col } => Some((tile + 1) * g * g + row * g + col),
            PackSrc::Newline => None,
        }
    }
}

/// The complete anyres layout of one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnyresGeometry {
    /// Original (height, width) — what `image_sizes` holds.
    pub orig_hw: (usize, usize),
    /// The chosen pinpoint canvas (height, width).
    pub best_hw: (usize, usize),
    /// Size of the resized image inside the canvas.
    pub resized_hw: (usize, usize),
    /// Black padding above and left of it (the remainder goes below/right).
    pub pad_top_left: (usize, usize),
    /// Tile side in pixels (vision image_size).
    pub tile_px: usize,
    /// Patches per tile side.
    pub g: usize,
    /// Anyres tiles (rows, cols) over the canvas.
    pub grid: (usize, usize),
    /// Rows and columns of the (grid.0·g) × (grid.1·g) feature grid kept by the unpadding.
    pub keep_rows: Range<usize>,
    pub keep_cols: Range<usize>,
}

impl AnyresGeometry {
    /// The layout of an image of `orig_hw` for the given pinpoints, tile size and patch size.
    pub fn new(
        orig_hw: (usize, usize), pinpoints: &[(usize, usize)], tile_px: usize, patch_px: usize,
    ) -> Result<AnyresGeometry> {
        let best = select_best_resolution(orig_hw, pinpoints)?;
        Self::with_canvas(orig_hw, best, tile_px, patch_px)
    }

    /// The layout of an image of `orig_hw` for a model: its pinpoints, tile and patch size.
    pub fn for_config(orig_hw: (usize, usize), cfg: &LlavaNextConfig) -> Result<AnyresGeometry> {
        Self::new(orig_hw, &cfg.image_grid_pinpoints, cfg.vision.image_size, cfg.vision.patch_size)
    }

    /// The layout for an already chosen canvas `best_hw`.
    pub fn with_canvas(
        orig_hw: (usize, usize), best_hw: (usize, usize), tile_px: usize, patch_px: usize,
    ) -> Result<AnyresGeometry> {
        let (h, w) = orig_hw;
        if h == 0 || w == 0 {
            bail!("anyres: image of size {h}x{w} has an empty side");
        }
        if tile_px == 0 || patch_px == 0 || !tile_px.is_multiple_of(patch_px) {
            bail!("anyres: tile size {tile_px} is not a positive multiple of the patch size {patch_px}");
        }
        let (bh, bw) = best_hw;
        if bh == 0 || bw == 0 || bh % tile_px != 0 || bw % tile_px != 0 {
            bail!("anyres: canvas {bh}x{bw} is not a positive multiple of the tile size {tile_px}");
        }
        let g = tile_px / patch_px;
        let grid = (bh / tile_px, bw / tile_px);
        let resized_hw = patch_output_size(orig_hw, best_hw);
        let pad_top_left = ((bh - resized_hw.0) / 2, (bw - resized_hw.1) / 2);
        let (keep_rows, keep_cols) = unpad_ranges(orig_hw, (grid.0 * g, grid.1 * g));
        Ok(AnyresGeometry { orig_hw, best_hw, resized_hw, pad_top_left, tile_px, g, grid, keep_rows, keep_cols })
    }

    /// Anyres tiles (without the base image).
    pub fn num_grid_tiles(&self) -> usize {
        self.grid.0 * self.grid.1
    }

    /// Tiles the processor emits for this image: the base plus the anyres tiles.
    pub fn num_tiles(&self) -> usize {
        1 + self.num_grid_tiles()
    }

    /// Base-image tokens, g² (CLS dropped).
    pub fn base_tokens(&self) -> usize {
        self.g * self.g
    }

    /// Unpadded grid tokens plus one newline per kept row: H'·(W' + 1).
    pub fn grid_tokens(&self) -> usize {
        self.keep_rows.len() * (self.keep_cols.len() + 1)
    }

    /// `<image>` tokens for this image: g² + H'·(W' + 1).
    pub fn num_tokens(&self) -> usize {
        self.base_tokens() + self.grid_tokens()
    }

    /// Where each token's feature comes from, in token order: the g² base patches, then the
    /// kept rows of the tile grid top to bottom, each row's kept columns left to right followed
    /// by one `Newline`. Length [`Self::num_tokens`].
    pub fn plan(&self) -> Vec<PackSrc> {
        let g = self.g;
        let mut out = Vec::with_capacity(self.num_tokens());
        out.extend((0..g * g).map(PackSrc::Base));
        for r in self.keep_rows.clone() {
            for c in self.keep_cols.clone() {
                // Grid cell (r, c) lies in tile (r / g, c / g) at patch (r % g, c % g).
                out.push(PackSrc::Tile { tile: (r / g) * self.grid.1 + c / g, row: r % g, col: c % g });
            }
            out.push(PackSrc::Newline);
        }
        out
    }
}

/// The pack plan of one image (see [`AnyresGeometry::plan`]): `orig_hw` its original size,
/// `best_hw` the chosen pinpoint canvas, `tile_px` the vision image_size, `patches_per_side` g.
pub fn pack_plan(
    orig_hw: (usize, usize), best_hw: (usize, usize), tile_px: usize, patches_per_side: usize,
) -> Result<Vec<PackSrc>> {
    if patches_per_side == 0 || !tile_px.is_multiple_of(patches_per_side) {
        bail!("pack_plan: {patches_per_side} patches per side do not divide the tile size {tile_px}");
    }
    Ok(AnyresGeometry::with_canvas(orig_hw, best_hw, tile_px, tile_px / patches_per_side)?.plan())
}

/// `<image>` tokens an image of `orig_hw` takes (the processor's count, which the model's
/// packing reproduces).
pub fn image_token_count(
    orig_hw: (usize, usize), pinpoints: &[(usize, usize)], tile_px: usize, patch_px: usize,
) -> Result<usize> {
    Ok(AnyresGeometry::new(orig_hw, pinpoints, tile_px, patch_px)?.num_tokens())
}

/// A plan as a gather index for a kernel: `feature_row` per token, −1 for the newline.
pub fn gather_index(plan: &[PackSrc], g: usize) -> Vec<i32> {
    plan.iter().map(|s| s.feature_row(g).map_or(-1, |r| r as i32)).collect()
}

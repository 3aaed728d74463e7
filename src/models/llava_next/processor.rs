//! The LLaVA-NeXT image processor (`LlavaNextImageProcessor`, anyres; model-spec B3): the
//! image is resized (aspect kept, bicubic) into its best pinpoint canvas and padded with black,
//! the canvas is cut into tiles in raster order, and the whole image squashed to one tile comes
//! first as the base image; every tile is rescaled and CLIP-normalised into `[3, S, S]`.
//! The geometry lives in `packing` (shared with the token count and the model's packing); the
//! decoding and the Pillow-compatible bicubic resize in `crate::data::image`.
//!
//! The fixtures' resizes are reproduced exactly by Pillow 13's bicubic, including its choice of
//! which pass runs first ([`resize_bicubic_pillow`]); torchvision's antialiased bicubic (another
//! transformers backend) can differ by one uint8 level. Pixels that are not resampled (the
//! padding, images already at their target size) match either exactly.

use super::config::LlavaPreprocessorConfig;
use super::packing::AnyresGeometry;
use crate::data::image::{load_rgb, resize_bicubic, RgbImage};
use anyhow::{bail, Result};
use std::path::Path;

/// One image after preprocessing.
#[derive(Clone, Debug)]
pub struct ProcessedImage {
    /// `[tiles, 3, S, S]`: the base image first, then the anyres tiles in raster order.
    pub pixel_values: Vec<f32>,
    /// Tiles including the base (1 + grid rows·cols).
    pub num_tiles: usize,
    /// Tile side S in pixels.
    pub tile_size: usize,
    /// The original (height, width): the model's `image_sizes` entry.
    pub image_size: (usize, usize),
    /// The layout the tiles were cut with (also gives the token count and pack plan).
    pub geometry: AnyresGeometry,
}

impl ProcessedImage {
    /// Values per tile, 3·S·S.
    pub fn tile_len(&self) -> usize {
        3 * self.tile_size * self.tile_size
    }
}

/// Pillow's `Image.resize(BICUBIC)` with the pass order of Pillow 13 (which made the
/// fixtures): the vertical pass runs first when the height shrinks by more than twice as many
/// pixels as the width, (h − H) > 2·(w − W) with h − H > 0; otherwise horizontal first. Each
/// pass rounds to uint8, so the order changes pixels (by up to ~15 levels on high-contrast
/// images). Built from single-axis calls of `resize_bicubic`, each exactly one Pillow pass.
pub fn resize_bicubic_pillow(img: &RgbImage, new_w: usize, new_h: usize) -> Result<RgbImage> {
    let (w, h) = (img.width as i64, img.height as i64);
    let dh = h - new_h as i64;
    let vertical_first = dh > 0 && dh > (w - new_w as i64) * 2;
    // One axis per call, so the order is ours whatever `resize_bicubic` does with two.
    let first =
        if vertical_first { resize_bicubic(img, img.width, new_h)? } else { resize_bicubic(img, new_w, img.height)? };
    resize_bicubic(&first, new_w, new_h)
}

/// Per-channel map u8 → normalised value (computed in f64, rounded once to f32), `[3][256]`.
fn normalize_lut(cfg: &LlavaPreprocessorConfig) -> Vec<f32> {
    let scale = if cfg.do_rescale { cfg.rescale_factor } else { 1.0 };
    let mut lut = vec![0f32; 3 * 256];
    for c in 0..3 {
        for u in 0..256 {
            let x = u as f64 * scale;
            let y = if cfg.do_normalize { (x - cfg.image_mean[c] as f64) / cfg.image_std[c] as f64 } else { x };
            lut[c * 256 + u] = y as f32;
        }
    }
    lut
}

/// Writes the S×S window of `img` at (`y0`, `x0`) as `[3, S, S]` normalised values. Pixels
/// outside `img` (the canvas padding, when `img` is the unpadded resized image placed at
/// `offset`) are black, i.e. u8 0.
fn write_tile(dst: &mut [f32], img: &RgbImage, offset: (usize, usize), y0: usize, x0: usize, s: usize, lut: &[f32]) {
    let (oy, ox) = offset;
    for c in 0..3 {
        let black = lut[c * 256];
        for y in 0..s {
            let row = &mut dst[(c * s + y) * s..(c * s + y + 1) * s];
            let cy = y0 + y;
            if cy < oy || cy >= oy + img.height {
                row.fill(black);
                continue;
            }
            let iy = cy - oy;
            for (x, v) in row.iter_mut().enumerate() {
                let cx = x0 + x;
                *v = if cx < ox || cx >= ox + img.width {
                    black
                } else {
                    lut[c * 256 + img.at(cx - ox, iy, c) as usize]
                };
            }
        }
    }
}

/// Preprocesses one RGB image.
pub fn process_image(img: &RgbImage, cfg: &LlavaPreprocessorConfig) -> Result<ProcessedImage> {
    let s = cfg.tile_size();
    if s == 0 {
        bail!("LLaVA-NeXT preprocessing: the tile size (size.shortest_edge) is 0");
    }
    // The patch size does not change the pixels; 1 keeps the geometry valid for any tile size.
    let geo = AnyresGeometry::new((img.height, img.width), &cfg.image_grid_pinpoints, s, 1)?;
    let lut = normalize_lut(cfg);
    let tile_len = 3 * s * s;
    let mut pv: Vec<f32> = crate::tensor::host_zeros(geo.num_tiles() * tile_len)?; // [tiles, 3, S, S]

    // Base image: the whole image squashed to S×S (aspect ratio not kept).
    let base_img;
    let base = if (img.height, img.width) == (s, s) {
        img
    } else {
        base_img = resize_bicubic_pillow(img, s, s)?;
        &base_img
    };
    write_tile(&mut pv[..tile_len], base, (0, 0), 0, 0, s, &lut);

    // Anyres tiles: the aspect-kept resize placed on the black canvas, cut in raster order.
    let (rh, rw) = geo.resized_hw;
    let resized_img;
    let resized = if (rh, rw) == (img.height, img.width) {
        img
    } else {
        resized_img = resize_bicubic_pillow(img, rw, rh)?;
        &resized_img
    };
    for ty in 0..geo.grid.0 {
        for tx in 0..geo.grid.1 {
            let t = 1 + ty * geo.grid.1 + tx;
            write_tile(&mut pv[t * tile_len..(t + 1) * tile_len], resized, geo.pad_top_left, ty * s, tx * s, s, &lut);
        }
    }
    Ok(ProcessedImage {
        pixel_values: pv,
        num_tiles: geo.num_tiles(),
        tile_size: s,
        image_size: (img.height, img.width),
        geometry: geo,
    })
}

/// Decodes and preprocesses an image file.
pub fn process_image_file(path: impl AsRef<Path>, cfg: &LlavaPreprocessorConfig) -> Result<ProcessedImage> {
    process_image(&load_rgb(path)?, cfg)
}

/// A batch of images as the model takes them.
#[derive(Clone, Debug)]
pub struct ProcessedBatch {
    /// `[images, max_tiles, 3, S, S]`; images with fewer tiles are zero-padded (in normalised
    /// space) along the tile axis, and the model ignores those rows.
    pub pixel_values: Vec<f32>,
    pub max_tiles: usize,
    /// Real tiles per image.
    pub num_tiles: Vec<usize>,
    /// Original (height, width) per image.
    pub image_sizes: Vec<(usize, usize)>,
    pub tile_size: usize,
}

/// Stacks processed images into one batch (transformers' `do_pad` along the tile axis).
pub fn batch_images(imgs: &[ProcessedImage]) -> Result<ProcessedBatch> {
    let Some(first) = imgs.first() else { bail!("batch_images: no images") };
    let s = first.tile_size;
    if let Some(bad) = imgs.iter().find(|p| p.tile_size != s) {
        bail!("batch_images: tile sizes differ ({s} and {})", bad.tile_size);
    }
    let max_tiles = imgs.iter().map(|p| p.num_tiles).max().unwrap_or(0);
    let tile_len = 3 * s * s;
    let mut pv: Vec<f32> = crate::tensor::host_zeros(imgs.len() * max_tiles * tile_len)?;
    for (i, p) in imgs.iter().enumerate() {
        let o = i * max_tiles * tile_len;
        pv[o..o + p.pixel_values.len()].copy_from_slice(&p.pixel_values);
    }
    Ok(ProcessedBatch {
        pixel_values: pv,
        max_tiles,
        num_tiles: imgs.iter().map(|p| p.num_tiles).collect(),
        image_sizes: imgs.iter().map(|p| p.image_size).collect(),
        tile_size: s,
    })
}

//! The Qwen2.5-VL image processor (`Qwen2VLImageProcessor`, model-spec A3): smart_resize to
//! multiples of patch·merge (28) within the pixel limits, bicubic resize (Pillow-compatible),
//! rescale and CLIP normalisation, the still frame repeated to the temporal patch size, and
//! patches flattened in the processor's order, where every 4 consecutive rows form one 2×2
//! merge block (the order the vision merger relies on).

use super::config::QwenPreprocessorConfig;
use crate::data::image::{load_rgb, resize_bicubic, RgbImage};
use anyhow::{bail, Result};
use std::path::Path;

/// One image after preprocessing.
#[derive(Clone, Debug)]
pub struct ProcessedImage {
    /// `[grid_t·grid_h·grid_w, 3·temporal·patch·patch]`.
    pub pixel_values: Vec<f32>,
    /// `[grid_t, grid_h, grid_w]` in patches (not merged tokens).
    pub grid_thw: [usize; 3],
    /// Values per patch row (1176 for 14-pixel patches).
    pub patch_dim: usize,
}

impl ProcessedImage {
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }
}

/// Placeholder tokens an image of grid `g` takes in the prompt: t·h·w / merge².
pub fn image_tokens(g: [usize; 3], merge_size: usize) -> usize {
    g[0] * g[1] * g[2] / (merge_size * merge_size)
}

/// Target (height, width) for an image of `height`×`width`, with Python's arithmetic:
/// round-half-to-even to the nearest multiple of `factor`, then scaled (keeping the aspect
/// ratio) into [min_pixels, max_pixels]. An aspect ratio above 200 is an error.
pub fn smart_resize(
    height: usize, width: usize, factor: usize, min_pixels: usize, max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 || factor == 0 {
        bail!("smart_resize: image {height}x{width} (factor {factor}) has an empty side");
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        bail!("smart_resize: image {height}x{width} has aspect ratio {ratio:.1}, above the limit of 200");
    }
    let mut hb = (h / f).round_ties_even() as usize * factor;
    let mut wb = (w / f).round_ties_even() as usize * factor;
    let pixels = (height * width) as f64;
    if hb * wb > max_pixels {
        let beta = (pixels / max_pixels as f64).sqrt();
        hb = ((h / beta / f).floor() as usize * factor).max(factor);
        wb = ((w / beta / f).floor() as usize * factor).max(factor);
    } else if hb * wb < min_pixels {
        let beta = (min_pixels as f64 / pixels).sqrt();
        hb = (h * beta / f).ceil() as usize * factor;
        wb = (w * beta / f).ceil() as usize * factor;
    }
    if hb == 0 || wb == 0 {
        bail!("smart_resize: image {height}x{width} resizes to {hb}x{wb} with min_pixels {min_pixels}");
    }
    Ok((hb, wb))
}

/// The (height, width) an image of `height`×`width` is resized to (smart_resize, or kept when
/// `do_resize` is off, which needs both sides multiples of patch·merge).
pub fn target_size(height: usize, width: usize, cfg: &QwenPreprocessorConfig) -> Result<(usize, usize)> {
    let factor = cfg.patch_size * cfg.merge_size;
    if cfg.do_resize {
        return smart_resize(height, width, factor, cfg.min_pixels, cfg.max_pixels);
    }
    if !height.is_multiple_of(factor) || !width.is_multiple_of(factor) {
        bail!("image {height}x{width}: with do_resize off both sides must be multiples of {factor}");
    }
    Ok((height, width))
}

/// The patch grid `[1, h, w]` of an image of `height`×`width`, known before decoding it.
pub fn grid_for_size(height: usize, width: usize, cfg: &QwenPreprocessorConfig) -> Result<[usize; 3]> {
    let (h, w) = target_size(height, width, cfg)?;
    Ok([1, h / cfg.patch_size, w / cfg.patch_size])
}

/// Preprocesses one RGB image.
pub fn process_image(img: &RgbImage, cfg: &QwenPreprocessorConfig) -> Result<ProcessedImage> {
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let resized;
    let (h, w) = target_size(img.height, img.width, cfg)?;
    let img = if (h, w) == (img.height, img.width) {
        img
    } else {
        resized = resize_bicubic(img, w, h)?;
        &resized
    };
    let (h, w) = (img.height, img.width);

    // Per-channel affine map u8 → normalised value, computed in f64 and rounded once.
    let scale = if cfg.do_rescale { cfg.rescale_factor } else { 1.0 };
    let mut lut = vec![0f32; 3 * 256];
    for c in 0..3 {
        for u in 0..256 {
            let x = u as f64 * scale;
            let y = if cfg.do_normalize { (x - cfg.image_mean[c] as f64) / cfg.image_std[c] as f64 } else { x };
            lut[c * 256 + u] = y as f32;
        }
    }

    let (gh, gw) = (h / p, w / p);
    // A still image is `tp` identical frames: grid_t = 1.
    let grid = [1usize, gh, gw];
    let patch_dim = 3 * tp * p * p;
    let mut out: Vec<f32> = crate::tensor::host_zeros(gh * gw * patch_dim)?; // [patches, patch_dim]
    let mut row = 0usize;
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for ih in 0..m {
                for iw in 0..m {
                    let (py0, px0) = ((bh * m + ih) * p, (bw * m + iw) * p);
                    let dst = &mut out[row * patch_dim..(row + 1) * patch_dim];
                    // Row layout (channel, frame, py, px).
                    for c in 0..3 {
                        for t in 0..tp {
                            for py in 0..p {
                                let o = ((c * tp + t) * p + py) * p;
                                let src = ((py0 + py) * w + px0) * 3 + c;
                                for px in 0..p {
                                    dst[o + px] = lut[c * 256 + img.data[src + px * 3] as usize];
                                }
                            }
                        }
                    }
                    row += 1;
                }
            }
        }
    }
    Ok(ProcessedImage { pixel_values: out, grid_thw: grid, patch_dim })
}

/// Decodes and preprocesses an image file.
pub fn process_image_file(path: impl AsRef<Path>, cfg: &QwenPreprocessorConfig) -> Result<ProcessedImage> {
    process_image(&load_rgb(path)?, cfg)
}

/// Several images, concatenated along the patch dimension as the model takes them:
/// `pixel_values [Σ patches, patch_dim]` and one grid per image.
pub fn process_images(imgs: &[RgbImage], cfg: &QwenPreprocessorConfig) -> Result<(Vec<f32>, Vec<[usize; 3]>)> {
    let mut pv = Vec::new();
    let mut grids = Vec::with_capacity(imgs.len());
    for img in imgs {
        let p = process_image(img, cfg)?;
        pv.extend_from_slice(&p.pixel_values);
        grids.push(p.grid_thw);
    }
    Ok((pv, grids))
}

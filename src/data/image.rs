//! RGB images for the image processors: PNG/JPEG decoding (`image` crate) to 8-bit RGB as
//! `PIL.Image.open(f).convert("RGB")` gives it (alpha dropped, no EXIF rotation, 16-bit samples
//! truncated to their high byte), and a bicubic resize that reproduces Pillow's `Image.resize(...,
//! BICUBIC)`: separable passes (in Pillow's order), the a = −0.5 cubic kernel widened by
//! the scale when downsampling (antialiasing), weights normalised and quantised to 22-bit fixed
//! point, and each pass rounded and clamped to uint8 (checked bit-exact against Pillow 13.0).

use anyhow::{bail, Context, Result};
use std::path::Path;

/// An 8-bit RGB image, row-major `[height, width, 3]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps `[height, width, 3]` bytes.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<RgbImage> {
        if width == 0 || height == 0 {
            bail!("image of size {width}x{height}: both sides must be positive");
        }
        if data.len() != width * height * 3 {
            bail!("image of size {width}x{height} needs {} bytes, got {}", width * height * 3, data.len());
        }
        Ok(RgbImage { width, height, data })
    }

    /// Channel `c` of pixel (x, y).
    pub fn at(&self, x: usize, y: usize, c: usize) -> u8 {
        self.data[(y * self.width + x) * 3 + c]
    }
}

/// (height, width) of a PNG or JPEG file from its header, without decoding the pixels.
pub fn image_size(path: impl AsRef<Path>) -> Result<(usize, usize)> {
    let path = path.as_ref();
    let (w, h) = image::image_dimensions(path)
        .with_context(|| format!("reading the size of image {} (not a readable PNG or JPEG)", path.display()))?;
    if w == 0 || h == 0 {
        bail!("image {} is empty ({w}x{h})", path.display());
    }
    Ok((h as usize, w as usize))
}

/// Reads and decodes a PNG or JPEG file.
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    decode_rgb(&bytes, &path.display().to_string())
}

/// Decodes PNG or JPEG bytes; `name` (a path or dataset key) is used in errors.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<RgbImage> {
    use image::DynamicImage as D;
    let img = image::load_from_memory(bytes)
        .with_context(|| format!("decoding image {name} (not a readable PNG or JPEG)"))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        bail!("image {name} is empty ({w}x{h})");
    }
    let data = match &img {
        // PIL reads 16-bit colour PNGs by keeping each sample's high byte.
        D::ImageRgb16(b) => b.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        D::ImageRgba16(b) => {
            b.as_raw().chunks_exact(4).flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8]).collect()
        }
        _ => img.to_rgb8().into_raw(),
    };
    RgbImage::new(w, h, data)
}

/// Fixed-point precision of Pillow's 8-bit resampler (32 − 8 − 2 bits).
const PRECISION_BITS: u32 = 22;

/// The bicubic kernel with a = −0.5 (Keys), support 2.
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output index: the first input index, the tap count, and `ksize` quantised weights.
struct Taps {
    first: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<i32>, // [out, ksize]
    ksize: usize,
}

/// The resampling taps mapping `inp` samples to `out` samples over the whole extent.
fn taps(inp: usize, out: usize) -> Taps {
    let scale = inp as f64 / out as f64;
    // Downsampling widens the kernel by the scale: each output averages a wider input window.
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv = 1.0 / filterscale;
    let mut first = Vec::with_capacity(out);
    let mut count = Vec::with_capacity(out);
    let mut weights = vec![0i32; out * ksize];
    let mut w = vec![0f64; ksize];
    for o in 0..out {
        let center = (o as f64 + 0.5) * scale;
        // Truncation toward zero then clamping, as Pillow's (int) casts do.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(inp as i64).max(lo as i64) as usize;
        let n = (hi - lo).min(ksize);
        let mut sum = 0.0;
        for (i, wi) in w.iter_mut().enumerate().take(n) {
            *wi = cubic((i as f64 + lo as f64 - center + 0.5) * inv);
            sum += *wi;
        }
        for i in 0..n {
            let v = if sum != 0.0 { w[i] / sum } else { w[i] };
            let q = v * (1u64 << PRECISION_BITS) as f64;
            // Round half away from zero, as Pillow does when quantising.
            weights[o * ksize + i] = if q < 0.0 { (q - 0.5) as i32 } else { (q + 0.5) as i32 };
        }
        first.push(lo);
        count.push(n);
    }
    Taps { first, count, weights, ksize }
}

/// Rounds the fixed-point accumulator and clamps it to a byte.
#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One resampling pass along x: `[h, w_in, 3]` → `[h, w_out, 3]`.
fn pass_horizontal(src: &[u8], h: usize, w_in: usize, w_out: usize) -> Vec<u8> {
    let t = taps(w_in, w_out);
    let mut dst = vec![0u8; h * w_out * 3];
    for y in 0..h {
        let row = &src[y * w_in * 3..(y + 1) * w_in * 3];
        for o in 0..w_out {
            let k = &t.weights[o * t.ksize..o * t.ksize + t.count[o]];
            let base = t.first[o];
            for c in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &wk) in k.iter().enumerate() {
                    acc += row[(base + i) * 3 + c] as i64 * wk as i64;
                }
                dst[(y * w_out + o) * 3 + c] = clip8(acc);
            }
        }
    }
    dst
}

/// One resampling pass along y: `[h_in, w, 3]` → `[h_out, w, 3]`.
fn pass_vertical(src: &[u8], w: usize, h_in: usize, h_out: usize) -> Vec<u8> {
    let t = taps(h_in, h_out);
    let stride = w * 3;
    let mut dst = vec![0u8; h_out * stride];
    let mut acc = vec![0i64; stride];
    for o in 0..h_out {
        acc.fill(1 << (PRECISION_BITS - 1));
        let k = &t.weights[o * t.ksize..o * t.ksize + t.count[o]];
        for (i, &wk) in k.iter().enumerate() {
            let row = &src[(t.first[o] + i) * stride..(t.first[o] + i + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as i64 * wk as i64;
            }
        }
        for (d, &a) in dst[o * stride..(o + 1) * stride].iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    dst
}

/// Resizes to `new_w`×`new_h` exactly as Pillow's `Image.resize((new_w, new_h), BICUBIC)` does
/// for an RGB image. An axis whose size does not change is not resampled (so a same-size resize
/// is the identity). Pass order follows Pillow 13: horizontal first, unless the height loses
/// more than twice as many pixels as the width, then vertical first (Pillow ≤ 12 always ran
/// horizontal first; the two differ by a few levels only in that case).
pub fn resize_bicubic(img: &RgbImage, new_w: usize, new_h: usize) -> Result<RgbImage> {
    if new_w == 0 || new_h == 0 {
        bail!("resize_bicubic: target size {new_w}x{new_h} must be positive");
    }
    let (w, h) = (img.width, img.height);
    let shrink_h = h as i64 - new_h as i64;
    let shrink_w = w as i64 - new_w as i64;
    let vertical_first = shrink_h > 0 && shrink_h > 2 * shrink_w;
    let mut data = img.data.clone();
    if vertical_first {
        if new_h != h {
            data = pass_vertical(&data, w, h, new_h);
        }
        if new_w != w {
            data = pass_horizontal(&data, new_h, w, new_w);
        }
    } else {
        if new_w != w {
            data = pass_horizontal(&data, h, w, new_w);
        }
        if new_h != h {
            data = pass_vertical(&data, new_w, h, new_h);
        }
    }
    RgbImage::new(new_w, new_h, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for &(i, o) in &[(100usize, 112usize), (130, 140), (1000, 28), (7, 3), (3, 7), (1, 5), (5, 1)] {
            let t = taps(i, o);
            for k in 0..o {
                let s: i64 = t.weights[k * t.ksize..k * t.ksize + t.count[k]].iter().map(|&w| w as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= t.count[k] as i64, "{i}->{o} out {k}: sum {s}");
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::new(13, 9, vec![77; 13 * 9 * 3]).unwrap();
        for &(w, h) in &[(28usize, 28usize), (5, 4), (13, 30), (1, 1)] {
            let r = resize_bicubic(&img, w, h).unwrap();
            assert!(r.data.iter().all(|&v| v == 77), "{w}x{h}");
        }
    }
}

//! Qwen2.5-VL images and positions: smart_resize, processed pixels against the fixtures, image
//! errors, bicubic resize against Pillow, M-RoPE positions against the reference.
mod common;

use am3safety::data::image::{load_rgb, resize_bicubic, RgbImage};
use am3safety::models::qwen2_5_vl::config::{QwenPreprocessorConfig, QwenVlConfig};
use am3safety::models::qwen2_5_vl::positions::{mrope_positions, MropeState};
use am3safety::models::qwen2_5_vl::processor::{process_image, smart_resize};

#[path = "support/qwen_data.rs"]
mod qwen_data_support;
use qwen_data_support::*;

#[test]
fn smart_resize_examples() {
    let (mn, mx) = (3136, 12845056);
    for &((h, w), want) in &[
        ((768, 1024), (756, 1036)),
        ((480, 640), (476, 644)),
        ((1080, 1920), (1092, 1932)),
        ((224, 224), (224, 224)),
        ((70, 70), (56, 56)),
        ((20, 20), (56, 56)),
        ((112, 140), (112, 140)),
        ((100, 130), (112, 140)),
    ] {
        assert_eq!(smart_resize(h, w, 28, mn, mx).unwrap(), want, "{h}x{w}");
    }
    // Over the pixel budget: scaled down, sides floored to multiples of 28.
    let (h, w) = smart_resize(4000, 3000, 28, mn, 1003520).unwrap();
    assert!(h % 28 == 0 && w % 28 == 0 && h * w <= 1003520, "{h}x{w}");
    assert!(smart_resize(10, 2500, 28, mn, mx).unwrap_err().to_string().contains("aspect ratio"));
}

#[test]
fn processed_pixels_match_fixtures() {
    let dir = fixtures();
    let pcfg = QwenPreprocessorConfig::load(&dir).unwrap();
    for k in 0..2 {
        let path = dir.join(format!("image{k}.png"));
        let img = load_rgb(&path).unwrap();
        let refs = tensors(&dir.join(format!("image{k}_processed.safetensors")));
        let (pshape, pv) = &refs["pixel_values"];
        let grid = grids_of(&refs["image_grid_thw"].1)[0];
        let out = process_image(&img, &pcfg).unwrap();
        assert_eq!(out.grid_thw, grid, "image{k} grid");
        assert_eq!(vec![out.num_patches(), out.patch_dim], *pshape, "image{k} shape");
        let want: Vec<f32> = pv.iter().map(|&x| x as f32).collect();
        let err = common::max_abs(&out.pixel_values, &want);
        let lsb = 1.0 / 255.0 / 0.26130258; // one uint8 level after normalisation (largest std⁻¹)
        let off: usize = out.pixel_values.iter().zip(&want).filter(|(a, b)| (**a - **b).abs() > 1e-5).count();
        let resized = (img.height, img.width) != (grid[1] * 14, grid[2] * 14);
        println!(
            "image{k} {}x{} -> grid {grid:?} ({}): max abs err {err:.3e} (= {:.2} uint8 levels), {off} of {} values differ by > 1e-5",
            img.height,
            img.width,
            if resized { "resized, Pillow bicubic" } else { "no resize" },
            err / lsb,
            want.len()
        );
        let tol = if resized { 2e-2 } else { 1e-5 };
        assert!(err <= tol, "image{k}: max abs err {err:.3e} > {tol:.0e}");
    }
}

#[test]
fn image_errors_and_resize_identity() {
    let t = tmp_dir("image_errors");
    let bad = t.join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    let msg = err_text(load_rgb(&bad));
    assert!(msg.contains("broken.png"), "{msg}");
    let msg = err_text(load_rgb(t.join("missing.jpg")));
    assert!(msg.contains("missing.jpg"), "{msg}");
    let img = load_rgb(fixtures().join("image1.png")).unwrap();
    assert_eq!(resize_bicubic(&img, img.width, img.height).unwrap(), img);
    // A 2× upscale keeps a horizontal ramp monotone and within range.
    let ramp = RgbImage::new(8, 2, (0..2).flat_map(|_| (0..8).flat_map(|x| [x as u8 * 30; 3])).collect()).unwrap();
    let up = resize_bicubic(&ramp, 16, 4).unwrap();
    let row: Vec<u8> = (0..16).map(|x| up.at(x, 0, 0)).collect();
    assert!(row.windows(2).all(|w| w[0] <= w[1]), "{row:?}");
    let _ = std::fs::remove_dir_all(&t);
}

/// Pillow 13.0 `Image.resize(..., BICUBIC)` outputs of a synthetic image, as FNV-1a-64 hashes of
/// the RGB bytes plus the first two pixels. Covers down- and upscaling, mixed axes and both pass
/// orders (11×29→8×7 and 30×90→28×28 run the vertical pass first).
/// ((width, height) in, (width, height) out, FNV-1a-64 of the output, its first two pixels).
type ResizeCase = ((usize, usize), (usize, usize), u64, [u8; 6]);

#[test]
fn bicubic_resize_matches_pillow() {
    let cases: [ResizeCase; 6] = [
        ((23, 17), (9, 5), 0xf758328de5ee6ac1, [117, 138, 135, 144, 139, 142]),
        ((11, 29), (8, 7), 0x90fc21caa2d2d110, [102, 138, 133, 125, 153, 128]),
        ((9, 6), (20, 13), 0x4b0ea62d8f07e08a, [0, 42, 95, 0, 48, 101]),
        ((40, 40), (28, 28), 0x636c402f24ca2a1b, [33, 91, 157, 98, 155, 152]),
        ((37, 19), (56, 28), 0xa600186bb9e53cd8, [0, 45, 98, 9, 62, 114]),
        ((30, 90), (28, 28), 0x2462c9b33dd71c1c, [84, 133, 124, 137, 127, 161]),
    ];
    for ((w, h), (nw, nh), hash, head) in cases {
        let data: Vec<u8> = (0..h)
            .flat_map(|y| {
                (0..w).flat_map(move |x| {
                    (0..3).map(move |c| ((x * 37 + y * 91 + c * 53 + (x * y) % 17 * 13) % 256) as u8)
                })
            })
            .collect();
        let out = resize_bicubic(&RgbImage::new(w, h, data).unwrap(), nw, nh).unwrap();
        let fnv = out.data.iter().fold(0xcbf29ce484222325u64, |a, &b| (a ^ b as u64).wrapping_mul(0x100000001b3));
        println!("bicubic {w}x{h} -> {nw}x{nh}: hash {fnv:016x} (Pillow {hash:016x})");
        assert_eq!(&out.data[..6], &head, "{w}x{h} -> {nw}x{nh}: first pixels");
        assert_eq!(fnv, hash, "{w}x{h} -> {nw}x{nh}: output differs from Pillow");
    }
}

#[test]
fn mrope_positions_match_reference() {
    let dir = fixtures();
    let cfg = QwenVlConfig::load(&dir).unwrap();
    let inputs = tensors(&dir.join("inputs.safetensors"));
    let reference = tensors(&dir.join("reference.safetensors"));
    let ids = as_i32(&inputs["input_ids"].1);
    let grids = grids_of(&inputs["image_grid_thw"].1);
    let (rshape, rpos) = &reference["position_ids"];
    assert_eq!(rshape, &vec![3, ids.len()]);
    let want = as_i32(rpos);
    let (pos, delta) = mrope_positions(&ids, &grids, &cfg).unwrap();
    let mismatches = pos.iter().zip(&want).filter(|(a, b)| a != b).count();
    println!("position_ids: {} tokens, {mismatches} mismatches, rope delta {delta}", ids.len());
    assert_eq!(pos, want);
    assert_eq!(delta, want.iter().max().unwrap() + 1 - ids.len() as i32);

    // Appending in chunks (split anywhere, even inside an image run) gives the same ids.
    for split in [1usize, 6, 10, 26, 27, 50, 85] {
        let mut st = MropeState::new(&cfg);
        let (a, b) = ids.split_at(split);
        let images_in_a = {
            let mut n = 0;
            for (i, &t) in a.iter().enumerate() {
                if t == 590 && (i == 0 || a[i - 1] != 590) {
                    n += 1;
                }
            }
            n
        };
        let pa = st.append(a, &grids[..images_in_a]).unwrap();
        let pb = st.append(b, &grids[images_in_a..]).unwrap();
        for r in 0..3 {
            let row: Vec<i32> =
                pa[r * a.len()..(r + 1) * a.len()].iter().chain(&pb[r * b.len()..(r + 1) * b.len()]).copied().collect();
            assert_eq!(row, want[r * ids.len()..(r + 1) * ids.len()], "split at {split}, row {r}");
        }
        assert_eq!(st.delta(), delta);
    }

    // Pure text is arange on all rows; decoding continues at next_position.
    let (p, d) = mrope_positions(&[5, 6, 7], &[], &cfg).unwrap();
    assert_eq!((p, d), (vec![0, 1, 2, 0, 1, 2, 0, 1, 2], 0));
    // Spec worked example: 11 text, image grid 1×18×24, 10 text → delta −96.
    let mut ex = vec![1i32; 11];
    ex.extend(std::iter::repeat_n(590, 108));
    ex.extend(std::iter::repeat_n(1, 10));
    let (p, d) = mrope_positions(&ex, &[[1, 18, 24]], &cfg).unwrap();
    assert_eq!((d, p[129 + 11 + 107], p[2 * 129 + 11 + 107], p[118 + 1]), (-96, 19, 22, 23));

    // Errors: wrong grid count, short image run.
    assert!(mrope_positions(&ids, &grids[..1], &cfg).is_err());
    assert!(mrope_positions(&ex, &[[1, 18, 24], [1, 2, 2]], &cfg).is_err());
    let msg = err_text(mrope_positions(&ex, &[[1, 18, 26]], &cfg));
    assert!(msg.contains("needs 117"), "{msg}");
}

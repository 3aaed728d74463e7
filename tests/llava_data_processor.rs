//! LLaVA-NeXT image preprocessing against the fixtures (anyres tiles, padding, resampling), the
//! image token counts, and the packing plan of image features with their newlines.

mod common;
use common::*;
#[path = "support/fixture_tokenizers.rs"]
mod fixture_tokenizers;

use am3safety::checkpoint::Checkpoint;
use am3safety::data::image::{load_rgb, RgbImage};
use am3safety::models::llava_next::chat::placeholder_runs;
use am3safety::models::llava_next::config::{resolve, LlavaPreprocessorConfig};
use am3safety::models::llava_next::packing::{
    gather_index, image_token_count, pack_plan, select_best_resolution, AnyresGeometry, PackSrc,
};
use am3safety::models::llava_next::processor::{batch_images, process_image, process_image_file};

#[path = "support/llava_data.rs"]
mod llava_data_support;
use llava_data_support::*;

/// Compares our pixel_values for imageK with the fixture's, printing the errors over pixels
/// that are not resampled (the canvas padding) and over resampled ones. image1's base image
/// (130x90 -> 56x56) needs Pillow 13's vertical-first pass order to match.
#[test]
fn preprocess_matches_fixtures() {
    let fx = llava_fixtures();
    let cfg = fixture_config();
    let pcfg = LlavaPreprocessorConfig::load(&fx, &cfg).unwrap();
    let mut processed = Vec::new();
    for k in 0..2 {
        let img = load_rgb(fx.join(format!("image{k}.png"))).unwrap();
        let p = process_image(&img, &pcfg).unwrap();
        let r = read(&format!("image{k}_processed.safetensors"));
        let (shape, want) = &r["pixel_values"];
        let sizes: Vec<usize> = r["image_sizes"].1.iter().map(|&x| x as usize).collect();
        let s = p.tile_size;
        assert_eq!(shape, &vec![p.num_tiles, 3, s, s], "image{k}: tile count/shape");
        assert_eq!(sizes, vec![p.image_size.0, p.image_size.1], "image{k}: image_sizes");
        let g = &p.geometry;
        let (mut pad_err, mut res_err, mut n_pad, mut n_over) = (0f64, 0f64, 0usize, 0usize);
        let mut worst_lsb = 0f64;
        for t in 0..p.num_tiles {
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        let i = ((t * 3 + c) * s + y) * s + x;
                        let e = (p.pixel_values[i] as f64 - want[i]).abs();
                        worst_lsb = worst_lsb.max(e * pcfg.image_std[c] as f64 * 255.0);
                        n_over += (e > 1e-5) as usize;
                        // Canvas coordinates of an anyres tile pixel; the base tile is all resampled.
                        let is_pad = t > 0 && {
                            let (ty, tx) = ((t - 1) / g.grid.1, (t - 1) % g.grid.1);
                            let (cy, cx) = (ty * s + y, tx * s + x);
                            cy < g.pad_top_left.0
                                || cy >= g.pad_top_left.0 + g.resized_hw.0
                                || cx < g.pad_top_left.1
                                || cx >= g.pad_top_left.1 + g.resized_hw.1
                        };
                        if is_pad {
                            pad_err = pad_err.max(e);
                            n_pad += 1;
                        } else {
                            res_err = res_err.max(e);
                        }
                    }
                }
            }
        }
        println!(
            "preprocess image{k} ({}x{} -> canvas {:?}, resized {:?}, {} tiles): max abs err {:.3e} on {} padding values (no resize), {:.3e} on resampled values ({:.2} uint8 levels); {} of {} values differ by > 1e-5",
            p.image_size.0, p.image_size.1, g.best_hw, g.resized_hw, p.num_tiles, pad_err, n_pad, res_err, worst_lsb, n_over, want.len()
        );
        assert!(n_pad > 0, "image{k}: expected some padding");
        assert!(pad_err <= 1e-5, "image{k}: padding differs by {pad_err:e}");
        // Pillow 13's bicubic (pass order included) reproduces the fixtures bit for bit, so the
        // no-resize bound holds everywhere (the target for resampled values is 2e-2).
        assert!(res_err <= 1e-5, "image{k}: resampled values differ by {res_err:e}");
        processed.push(p);
    }
    // The batch matches inputs.safetensors (both images stacked, no tile padding needed here).
    let b = batch_images(&processed).unwrap();
    let inp = read("inputs.safetensors");
    let (shape, want) = &inp["pixel_values"];
    assert_eq!(shape, &vec![2, b.max_tiles, 3, b.tile_size, b.tile_size]);
    let sizes: Vec<usize> = inp["image_sizes"].1.iter().map(|&x| x as usize).collect();
    assert_eq!(sizes, b.image_sizes.iter().flat_map(|&(h, w)| [h, w]).collect::<Vec<_>>());
    let err = max_abs(&b.pixel_values, &want.iter().map(|&x| x as f32).collect::<Vec<_>>());
    println!("preprocess batch vs inputs.safetensors pixel_values: max abs err {err:.3e}");
    assert!(err <= 1e-5);
}

/// Images that need no resampling at all: every value must match the plain formula.
#[test]
fn preprocess_exact_without_resize() {
    let pcfg = LlavaPreprocessorConfig::for_model(&fixture_config());
    let mut rng = Rng::new(3);
    for &(h, w) in &[(56usize, 56usize), (112, 56), (112, 112)] {
        let data: Vec<u8> = (0..h * w * 3).map(|_| (rng.next_u64() % 256) as u8).collect();
        let img = RgbImage::new(w, h, data).unwrap();
        let p = process_image(&img, &pcfg).unwrap();
        let g = &p.geometry;
        let s = 56;
        assert_eq!(g.resized_hw, (h, w), "{h}x{w}: no resize expected");
        let norm = |u: u8, c: usize| ((u as f64 / 255.0 - pcfg.image_mean[c] as f64) / pcfg.image_std[c] as f64) as f32;
        let mut err = 0f64;
        for t in 1..p.num_tiles {
            let (ty, tx) = ((t - 1) / g.grid.1, (t - 1) % g.grid.1);
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        let (cy, cx) = (ty * s + y, tx * s + x);
                        let (iy, ix) =
                            (cy as isize - g.pad_top_left.0 as isize, cx as isize - g.pad_top_left.1 as isize);
                        let u = if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            img.at(ix as usize, iy as usize, c)
                        } else {
                            0
                        };
                        let got = p.pixel_values[((t * 3 + c) * s + y) * s + x];
                        err = err.max((got - norm(u, c)).abs() as f64);
                    }
                }
            }
        }
        if (h, w) == (s, s) {
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        err = err.max((p.pixel_values[(c * s + y) * s + x] - norm(img.at(x, y, c), c)).abs() as f64);
                    }
                }
            }
        }
        println!(
            "preprocess {h}x{w} (canvas {:?}, {} tiles, no resize): max abs err {err:.3e}",
            g.best_hw, p.num_tiles
        );
        assert!(err <= 1e-5);
    }
    // A file path that does not exist names itself.
    let e = format!("{:#}", process_image_file("/nonexistent/x.png", &pcfg).unwrap_err());
    assert!(e.contains("/nonexistent/x.png"), "{e}");
}

#[test]
fn token_counts_match_fixture_input_ids() {
    let cfg = fixture_config();
    let inp = read("inputs.safetensors");
    let ids: Vec<i32> = inp["input_ids"].1.iter().map(|&x| x as i32).collect();
    let sizes: Vec<usize> = inp["image_sizes"].1.iter().map(|&x| x as usize).collect();
    let runs = placeholder_runs(&ids, cfg.image_token_index);
    let counts: Vec<usize> = runs.iter().map(|r| r.len()).collect();
    assert_eq!(runs.len() * 2, sizes.len(), "one placeholder run per image");
    for (k, &n) in counts.iter().enumerate() {
        let hw = (sizes[2 * k], sizes[2 * k + 1]);
        let geo = AnyresGeometry::for_config(hw, &cfg).unwrap();
        println!(
            "image{k} {hw:?}: canvas {:?}, grid {:?}, kept rows {:?} cols {:?} -> {} tokens (input_ids hold {n})",
            geo.best_hw,
            geo.grid,
            geo.keep_rows,
            geo.keep_cols,
            geo.num_tokens()
        );
        assert_eq!(geo.num_tokens(), n, "image{k}");
        let v = read("vision_reference.safetensors");
        assert_eq!(v[&format!("image{k}_embeds")].0[0], n, "image{k}: vision_reference rows");
    }
}

#[test]
fn token_counts_match_spec_examples() {
    let pins: Vec<(usize, usize)> = vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];
    // model-spec B2.
    for &((h, w), want) in &[
        ((808, 1100), 2340),
        ((480, 640), 2340),
        ((640, 480), 2352),
        ((336, 336), 1176),
        ((1080, 1920), 1948),
        ((500, 500), 2928),
        ((300, 1000), 2182),
    ] {
        let n = image_token_count((h, w), &pins, 336, 14).unwrap();
        println!("{h}x{w}: {n} tokens");
        assert_eq!(n, want, "{h}x{w}");
    }
    assert_eq!(select_best_resolution((336, 336), &pins).unwrap(), (336, 672), "first-wins tie");
    // model-spec B6 tiny check: 70x100 with 56-pixel tiles -> canvas 112x112, unpad to 6x8, 70 tokens.
    let tiny: Vec<(usize, usize)> = pins.iter().map(|&(h, w)| (h / 6, w / 6)).collect();
    let g = AnyresGeometry::new((70, 100), &tiny, 56, 14).unwrap();
    assert_eq!((g.best_hw, g.keep_rows.len(), g.keep_cols.len(), g.num_tokens()), ((112, 112), 6, 8, 70));
}

#[test]
fn pack_plan_structure() {
    let pins: Vec<(usize, usize)> = vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];
    for &(h, w) in &[(808usize, 1100usize), (640, 480), (336, 336), (1080, 1920), (300, 1000), (1000, 300), (37, 2000)]
    {
        let geo = AnyresGeometry::new((h, w), &pins, 336, 14).unwrap();
        let plan = geo.plan();
        let g = geo.g;
        assert_eq!(plan, pack_plan((h, w), geo.best_hw, 336, 24).unwrap());
        assert_eq!(plan.len(), geo.num_tokens());
        assert!(plan[..g * g].iter().enumerate().all(|(i, s)| *s == PackSrc::Base(i)), "base block first, in order");
        let newlines: Vec<usize> =
            plan.iter().enumerate().filter(|(_, s)| **s == PackSrc::Newline).map(|(i, _)| i).collect();
        let row_len = geo.keep_cols.len() + 1;
        assert_eq!(newlines.len(), geo.keep_rows.len());
        assert!(
            newlines.iter().enumerate().all(|(r, &i)| i == g * g + (r + 1) * row_len - 1),
            "a newline closes every row"
        );
        // Tile cells: distinct, in range, row-major over the kept window of the feature grid.
        let idx = gather_index(&plan, g);
        let rows: Vec<i32> = idx.iter().copied().filter(|&r| r >= g as i32 * g as i32).collect();
        assert!(rows.windows(2).all(|p| p[0] != p[1]));
        assert!(rows.iter().all(|&r| (r as usize) < geo.num_tiles() * g * g));
        let mut prev: Option<(usize, usize)> = None;
        for s in &plan[g * g..] {
            if let PackSrc::Tile { tile, row, col } = *s {
                let (gy, gx) = ((tile / geo.grid.1) * g + row, (tile % geo.grid.1) * g + col);
                assert!(geo.keep_rows.contains(&gy) && geo.keep_cols.contains(&gx));
                if let Some(p) = prev {
                    assert!((gy, gx) > p, "row-major order");
                }
                prev = Some((gy, gx));
            }
        }
        // Symmetric crop: the dropped margins differ by at most... zero (both sides drop p).
        let (hc, wc) = (geo.grid.0 * g, geo.grid.1 * g);
        assert_eq!(geo.keep_rows.start, hc - geo.keep_rows.end);
        assert_eq!(geo.keep_cols.start, wc - geo.keep_cols.end);
        println!(
            "pack plan {h}x{w}: canvas {:?}, grid {:?}, kept {}x{} of {hc}x{wc}, {} tokens",
            geo.best_hw,
            geo.grid,
            geo.keep_rows.len(),
            geo.keep_cols.len(),
            plan.len()
        );
    }
    // Invalid canvases are errors, not panics.
    assert!(pack_plan((10, 10), (100, 336), 336, 24).is_err());
    assert!(pack_plan((10, 10), (336, 336), 336, 25).is_err());
    assert!(select_best_resolution((0, 5), &pins).is_err());
}

/// The newline rows of `vision_reference` (the packed features transformers fed the LLM) are
/// exactly where the plan puts `Newline`, and hold `image_newline`.
#[test]
fn pack_plan_newlines_in_vision_reference() {
    let cfg = fixture_config();
    let ck = Checkpoint::open(llava_fixtures()).unwrap();
    let newline = ck.get_f32(&resolve(&ck, "image_newline").unwrap(), &[cfg.text.hidden_size]).unwrap();
    let v = read("vision_reference.safetensors");
    let inp = read("inputs.safetensors");
    let sizes: Vec<usize> = inp["image_sizes"].1.iter().map(|&x| x as usize).collect();
    let d = cfg.text.hidden_size;
    for k in 0..sizes.len() / 2 {
        let geo = AnyresGeometry::new(
            (sizes[2 * k], sizes[2 * k + 1]),
            &cfg.image_grid_pinpoints,
            cfg.vision.image_size,
            cfg.vision.patch_size,
        )
        .unwrap();
        let plan = geo.plan();
        let (shape, emb) = &v[&format!("image{k}_embeds")];
        assert_eq!(shape, &vec![plan.len(), d]);
        let mut worst_nl = 0f64;
        for (j, s) in plan.iter().enumerate() {
            let row: Vec<f32> = emb[j * d..(j + 1) * d].iter().map(|&x| x as f32).collect();
            let e = max_abs(&row, &newline);
            if *s == PackSrc::Newline {
                worst_nl = worst_nl.max(e);
            } else {
                assert!(e > 1e-3, "image{k} token {j} ({s:?}) equals image_newline");
            }
        }
        println!("image{k}: {} newline rows match image_newline to {worst_nl:.1e}", geo.keep_rows.len());
        assert!(worst_nl <= 1e-6);
    }
}

//! Shared test helpers: seeded inputs, error norms, finite differences, the GPU skip rule.
#![allow(dead_code)]

pub use am3safety::rng::Rng;
use am3safety::tensor::Device;

// The error norms, the tolerance table and the fixture finder live in src/check.rs; the names
// the tests always used stay here (`rel_err_scaled` is `rel_err_floor`).
#[allow(unused_imports)]
pub use am3safety::check::{
    assert_close, assert_err, fixture_dir, fixtures_root, grpo_vectors_path, max_abs, norm2, rel_err, rel_err64,
    rel_err_floor, rel_err_floor as rel_err_scaled, Tol,
};

/// Rounds f32 values through bf16, as an upload to the GPU does.
pub fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

pub fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The GPU for GPU-vs-CPU tests, or None after printing the one skip line.
pub fn cuda_or_skip(test: &str) -> Option<Device> {
    match Device::cuda_if_present() {
        Some(d) => Some(d),
        None => {
            println!("{test}: skipped: no CUDA device");
            None
        }
    }
}

/// Central finite differences in f64: checks d(loss)/d(x) = `analytic` for the scalar loss
/// `f(x)`, at a sample of up to `max_points` coordinates. Returns the worst relative error.
pub fn gradcheck(
    name: &str, x: &[f64], analytic: &[f64], f: &mut dyn FnMut(&[f64]) -> f64, max_points: usize, tol: f64,
) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let h = 1e-6;
    let step = (x.len() / max_points.max(1)).max(1);
    let mut xp = x.to_vec();
    let mut worst = 0f64;
    let scale = analytic.iter().fold(0f64, |a, g| a.max(g.abs())).max(1e-8);
    for i in (0..x.len()).step_by(step) {
        xp[i] = x[i] + h;
        let fp = f(&xp);
        xp[i] = x[i] - h;
        let fm = f(&xp);
        xp[i] = x[i];
        let num = (fp - fm) / (2.0 * h);
        let err = (num - analytic[i]).abs() / (num.abs().max(analytic[i].abs()).max(1e-3 * scale));
        worst = worst.max(err);
        assert!(
            err < tol,
            "{name}[{i}]: finite difference {num:.9e} vs analytic {:.9e} (rel err {err:.2e})",
            analytic[i]
        );
    }
    println!("gradcheck {name}: {} points, worst rel err {worst:.2e}", x.len().div_ceil(step));
}

/// Deterministic weights for the scalar loss Σ out·g used by gradchecks.
pub fn probe(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.normal()).collect()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Odd and even shapes used by the op tests: (rows, cols).
pub const ROW_SHAPES: &[(usize, usize)] = &[(1, 1), (3, 7), (5, 64), (17, 80), (33, 129), (64, 1000), (7, 3584)];

/// The `am3` binary: `$AM3_BIN` (binaries carried to another machine), else cargo's.
pub fn am3_bin() -> std::path::PathBuf {
    std::env::var("AM3_BIN").map(std::path::PathBuf::from).unwrap_or_else(|_| env!("CARGO_BIN_EXE_am3").into())
}

/// Prints a measured relative error and fails when it is over `tol` (a number or a [`Tol`]).
pub fn report(tag: &str, what: &str, e: f64, tol: impl Into<f64>) {
    let tol: f64 = tol.into();
    println!("{tag} {what}: rel err {e:.2e} (tol {tol:.0e})");
    assert!(e <= tol, "{tag} {what}: rel err {e:.2e} > {tol:.0e}");
}

// ---------------------------------------------------------------------------------------------
// Model tests: gradients that cancel, image placeholders, KV-cache chunking, random ids.

/// The sibling of a gradient that is exactly 0 in theory, or None. The `k_proj.bias` of a
/// softmax attention whose keys are not rotated (CLIP's, in LLaVA-NeXT's vision tower, under any
/// key layout) gets no gradient: adding b to every key adds q·b to a whole softmax row, which
/// the softmax cancels. Its reference is rounding noise, so it is judged against the norm of the
/// same layer's `q_proj.bias` gradient (the same kind of sum, without the cancellation).
/// Qwen2.5-VL has no such tensor: RoPE rotates its key biases before the dot product.
pub fn cancelling_sibling(name: &str) -> Option<String> {
    name.strip_suffix("self_attn.k_proj.bias").map(|p| format!("{p}self_attn.q_proj.bias"))
}

/// ‖got − want‖ / ‖want‖, or, for a gradient that is 0 in theory (`sibling_scale` = the norm of
/// its sibling's reference, see `cancelling_sibling`), ‖got − want‖ / max(‖want‖, sibling_scale).
pub fn grad_rel_err(got: &[f32], want: &[f32], sibling_scale: Option<f64>) -> f64 {
    match sibling_scale {
        Some(scale) => rel_err_scaled(got, want, scale),
        None => rel_err(got, want),
    }
}

/// The error of gradient `name` in `got` against `want` (two name → tensor maps of the same
/// naming), with the sibling scale taken from `want` for a gradient that cancels. `cancels`:
/// whether the model's `k_proj.bias` gradients are 0 in theory (LLaVA-NeXT: yes; Qwen2.5-VL: no).
pub fn named_grad_err(
    name: &str, got: &[f32], want: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>, cancels: bool,
) -> f64 {
    let scale = if cancels { cancelling_sibling(name).and_then(|s| want.get(&s)).map(|(_, w)| norm2(w)) } else { None };
    grad_rel_err(got, &want[name].1, scale)
}

/// Where each image's placeholder tokens are. Image k takes the next `counts[k]` placeholder
/// tokens in order, so one run of placeholders may hold several images (two images side by side
/// in one turn); each image's own tokens must be contiguous. Panics, naming the numbers, when
/// the placeholders and the counts disagree.
pub fn image_spans(ids: &[i32], image_token: i64, counts: &[usize]) -> Vec<std::ops::Range<usize>> {
    let at: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] as i64 == image_token).collect();
    let want: usize = counts.iter().sum();
    assert_eq!(at.len(), want, "{} placeholder tokens for {} images of {counts:?} tokens", at.len(), counts.len());
    let mut spans = Vec::with_capacity(counts.len());
    let mut off = 0;
    for (k, &n) in counts.iter().enumerate() {
        let span = if n == 0 { 0..0 } else { at[off]..at[off + n - 1] + 1 };
        assert_eq!(span.len(), n, "image {k}: its {n} placeholder tokens are not contiguous ({span:?})");
        spans.push(span);
        off += n;
    }
    spans
}

/// Number of placeholder runs (maximal blocks of consecutive placeholder tokens).
pub fn placeholder_run_count(ids: &[i32], image_token: i64) -> usize {
    (0..ids.len()).filter(|&i| ids[i] as i64 == image_token && (i == 0 || ids[i - 1] as i64 != image_token)).count()
}

/// Chunk boundaries for a KV-cache check of `s` tokens with images at `spans`: a prefill
/// through the first image and two more tokens (moved back to the start of an image it would
/// cut, so two adjacent images are split between chunks exactly at their boundary), a chunk up
/// to `s - 3` (moved forward to the end of an image it would cut), then one token at a time.
/// Without images, the prefill is the first half. Boundaries never cut an image.
pub fn kv_splits(spans: &[std::ops::Range<usize>], s: usize) -> Vec<usize> {
    assert!(s >= 2, "a KV-cache check needs at least 2 tokens");
    let inside = |x: usize| spans.iter().find(|r| r.start < x && x < r.end).cloned();
    let mut a = spans.iter().find(|r| !r.is_empty()).map_or(s / 2, |r| r.end + 2).min(s - 1).max(1);
    if let Some(r) = inside(a) {
        a = if r.start > 0 { r.start } else { r.end };
    }
    let mut b = s.saturating_sub(3).max(a + 1).min(s);
    if let Some(r) = inside(b) {
        b = r.end;
    }
    let mut splits = vec![a];
    if b > a && b < s {
        splits.push(b);
    }
    for &x in &splits {
        assert!(inside(x).is_none(), "split {x} cuts an image ({spans:?})");
    }
    splits
}

/// Images (indices into `spans`) whose placeholder tokens lie in the chunk `a..b`; panics when
/// an image straddles the chunk's edge.
pub fn images_in_chunk(spans: &[std::ops::Range<usize>], a: usize, b: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for (k, r) in spans.iter().enumerate() {
        if r.is_empty() {
            continue;
        }
        if r.start < b && a < r.end {
            assert!(a <= r.start && r.end <= b, "chunk {a}..{b} cuts image {k} at {r:?}");
            out.push(k);
        }
    }
    out
}

/// `n` random token ids below `vocab`, none of them in `reserved` (placeholders, image markers).
pub fn text_ids(rng: &mut Rng, n: usize, vocab: usize, reserved: &[i64]) -> Vec<i32> {
    assert!(vocab > reserved.len(), "vocabulary of {vocab} has no room for text ids");
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let id = rng.below(vocab) as i64;
        if !reserved.contains(&id) {
            out.push(id as i32);
        }
    }
    out
}

/// A fresh, empty directory under the system temp dir, unique to this process and `name`.
pub fn fresh_tmp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("am3-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
    d
}

//! One check harness for the tests and the benches' correctness columns: error norms
//! (`rel_err`, `rel_err64`, `rel_err_floor`, `max_abs`), the per-op tolerance table ([`Tol`]:
//! each entry a value and the one-line reason for it), [`assert_close`], and the one fixture
//! finder ([`fixture_dir`], [`grpo_vectors_path`]) every test locates `../shared/fixtures` with.

use std::path::PathBuf;

/// ‖a − b‖ / ‖b‖ (with a floor of 1e-30 on ‖b‖ so all-zero references compare absolutely);
/// infinite when `a` holds a non-finite value. Panics when the lengths differ.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() {
            return f64::INFINITY;
        }
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    num.sqrt() / den.sqrt().max(1e-30)
}

/// [`rel_err`] in f64 (floor 1e-300 on ‖b‖).
pub fn rel_err64(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    num.sqrt() / den.sqrt().max(1e-300)
}

/// ‖a − b‖ / max(‖b‖, floor): for outputs that cancel to ~0 (a norm's dx when a row has one
/// element, a gradient that is 0 in theory), judged against the size of the terms that
/// cancelled. Infinite when `a` holds a non-finite value (an unwritten NaN).
pub fn rel_err_floor(a: &[f32], b: &[f32], floor: f64) -> f64 {
    let e = rel_err(a, b);
    let nb = norm2(b);
    if !e.is_finite() || nb >= floor {
        return e;
    }
    e * nb.max(1e-30) / floor.max(1e-30)
}

/// max |a − b| in f64.
pub fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max)
}

/// ‖v‖₂ in f64.
pub fn norm2(v: &[f32]) -> f64 {
    v.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt()
}

/// The tolerance table: what each comparison is held to, and why. `value()` is a relative
/// error bound (as [`rel_err`] measures it) unless the reason says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tol {
    /// f64 against f64 math done in another order (closed forms, two CPU paths).
    F64Reference,
    /// f32 op (CPU or CUDA) against the CPU reference of the same inputs.
    F32Reference,
    /// A bf16 op against the CPU reference of the bf16-rounded inputs.
    Bf16Op,
    /// Flash attention in bf16 against the f32 CPU reference.
    AttentionBf16,
    /// The log-sum-exp a bf16 flash-attention forward saves, against the f32 CPU reference.
    AttentionLseBf16,
    /// The fused log-prob kernel in bf16 against the f64 reference.
    LogprobBf16,
    /// The f32 model forward (logits, token log-probs) against the transformers fixtures.
    FixtureLogits,
    /// The vision tower's image embeddings against the transformers fixtures.
    FixtureEmbeds,
    /// The scalar objective (mean NLL) against the fixtures'.
    FixtureObjective,
    /// Parameter gradients against the fixtures' (worst tensor).
    FixtureGrads,
    /// Cached (chunked) decoding against one full forward, f32.
    KvCache,
    /// Packed (varlen) sequences against each sequence alone, f32.
    Packing,
    /// Gradients of a packed batch against the sum of the single-sequence ones, f32.
    PackedGrads,
    /// Recomputed activations against kept ones: logits.
    Recompute,
    /// Recomputed activations against kept ones: gradients (worst tensor).
    RecomputeGrads,
    /// The CPU f32 model against itself by another route (a checkpoint it wrote, another head
    /// layout of the same weights).
    CpuSelf,
    /// The model in bf16 against the fixtures: logits and objective.
    ModelBf16Logits,
    /// The model in bf16 against the fixtures: gradients.
    ModelBf16Grads,
    /// Logits with LoRA adapters applied against the merged weights W + (α/r)·BA, f32.
    LoraMerged,
    /// A CPU op (or f64 reference) against itself by another route: decode over a KV cache
    /// against the causal forward's last rows, `fwd` against the fused `fwd_bwd` (max |Δ logp|),
    /// two f64 references compared in f32.
    CpuOpSelf,
}

impl Tol {
    /// Every entry, for listing the table.
    pub const ALL: [Tol; 20] = [
        Tol::F64Reference,
        Tol::F32Reference,
        Tol::Bf16Op,
        Tol::AttentionBf16,
        Tol::AttentionLseBf16,
        Tol::LogprobBf16,
        Tol::FixtureLogits,
        Tol::FixtureEmbeds,
        Tol::FixtureObjective,
        Tol::FixtureGrads,
        Tol::KvCache,
        Tol::Packing,
        Tol::PackedGrads,
        Tol::Recompute,
        Tol::RecomputeGrads,
        Tol::CpuSelf,
        Tol::ModelBf16Logits,
        Tol::ModelBf16Grads,
        Tol::LoraMerged,
        Tol::CpuOpSelf,
    ];

    /// The bound.
    pub fn value(self) -> f64 {
        match self {
            Tol::F64Reference => 1e-12,
            Tol::F32Reference => 1e-5,
            Tol::Bf16Op => 1e-2,
            Tol::AttentionBf16 => 1e-2,
            Tol::AttentionLseBf16 => 1e-3,
            Tol::LogprobBf16 => 1e-2,
            Tol::FixtureLogits => 1e-4,
            Tol::FixtureEmbeds => 1e-4,
            Tol::FixtureObjective => 1e-5,
            Tol::FixtureGrads => 1e-3,
            Tol::KvCache => 1e-5,
            Tol::Packing => 1e-6,
            Tol::PackedGrads => 1e-5,
            Tol::Recompute => 1e-7,
            Tol::RecomputeGrads => 1e-6,
            Tol::CpuSelf => 1e-6,
            Tol::ModelBf16Logits => 3e-2,
            Tol::ModelBf16Grads => 5e-2,
            Tol::LoraMerged => 1e-5,
            Tol::CpuOpSelf => 1e-6,
        }
    }

    /// Why the bound is what it is, in one line.
    pub fn reason(self) -> &'static str {
        match self {
            Tol::F64Reference => "f64 both sides, only the summation order differs",
            Tol::F32Reference => "f32 accumulation in another order than the reference's",
            Tol::Bf16Op => "bf16 outputs carry an 8-bit mantissa (relative step 2^-8 ≈ 4e-3)",
            Tol::AttentionBf16 => "bf16 P·V products and outputs; the softmax statistics stay f32",
            Tol::AttentionLseBf16 => "lse is computed from f32 scores of the bf16 q and k: only their rounding shows",
            Tol::LogprobBf16 => "bf16 logits tiles through the fused log-softmax; sums stay f32",
            Tol::FixtureLogits => "f32 both sides, PyTorch's op order and fused kernels differ from ours",
            Tol::FixtureEmbeds => "f32 vision tower (conv, attention, merger) in another op order than PyTorch's",
            Tol::FixtureObjective => "a mean over many tokens: the per-token rounding averages out",
            Tol::FixtureGrads => "backward sums over every token amplify the f32 rounding of the forward",
            Tol::KvCache => "the same f32 math, attention reduced over chunks instead of one pass",
            Tol::Packing => "the same ops per token; only the GEMM batch (and so its blocking) differs",
            Tol::PackedGrads => "weight gradients sum over all packed tokens in another order",
            Tol::Recompute => "recomputation repeats the same ops on the same inputs",
            Tol::RecomputeGrads => "the same ops, but the weight gradients sum in another order",
            Tol::CpuSelf => "the same f32 math on the same weights, only the grouping of the work differs",
            Tol::ModelBf16Logits => "bf16 weights and activations through every layer of the model",
            Tol::ModelBf16Grads => "bf16 activations and gradients through the whole backward",
            Tol::LoraMerged => "x·W + (α/r)·x·A·B against x·(W + (α/r)·B·A): f32, other rounding",
            Tol::CpuOpSelf => "the same math on the same inputs, only the grouping of the sums (f32 rounding) differs",
        }
    }
}

impl From<Tol> for f64 {
    fn from(t: Tol) -> f64 {
        t.value()
    }
}

/// Checks ‖got − want‖ / ‖want‖ ≤ `tol`, printing the op, the error and the tolerance (with its
/// reason); panics with the same when it is over. Returns the error.
pub fn assert_close(name: &str, got: &[f32], want: &[f32], tol: Tol) -> f64 {
    assert_err(name, rel_err(got, want), tol)
}

/// [`assert_close`] for an error measured elsewhere (a scalar, a worst tensor, a floored norm).
pub fn assert_err(name: &str, e: f64, tol: Tol) -> f64 {
    let t = tol.value();
    println!("{name}: rel err {e:.2e} (tol {t:.0e}, {tol:?})");
    assert!(e <= t, "{name}: rel err {e:.2e} > {t:.0e} ({tol:?}: {})", tol.reason());
    e
}

/// The root of the shared fixtures: `../shared/fixtures` beside the repository.
pub fn fixtures_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// A model's fixture directory: `$AM3_LLAVA_FIXTURES` / `$AM3_QWEN_FIXTURES` (by `model`) when it
/// holds config.json, `$AM3_FIXTURES` when it is that model's directory, `$AM3_FIXTURES/<model>`
/// (either variable) when it is a fixture-set root, else `../shared/fixtures/<model>`. `model`
/// is "qwen2_5_vl_tiny" or "llava_next_tiny".
pub fn fixture_dir(model: &str) -> PathBuf {
    let specific = if model.starts_with("llava") { "AM3_LLAVA_FIXTURES" } else { "AM3_QWEN_FIXTURES" };
    for var in [specific, "AM3_FIXTURES"] {
        if let Ok(p) = std::env::var(var) {
            let p = PathBuf::from(p);
            if p.join("config.json").is_file() && (var == specific || p.ends_with(model)) {
                return p;
            }
            if p.join(model).join("config.json").is_file() {
                return p.join(model);
            }
        }
    }
    fixtures_root().join(model)
}

/// The GRPO vectors file: `$AM3_GRPO_VECTORS`, else `$AM3_FIXTURES/grpo_vectors.safetensors`
/// when that exists, else the shared fixtures'.
pub fn grpo_vectors_path() -> PathBuf {
    if let Ok(p) = std::env::var("AM3_GRPO_VECTORS") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("AM3_FIXTURES") {
        let f = PathBuf::from(p).join("grpo_vectors.safetensors");
        if f.is_file() {
            return f;
        }
    }
    fixtures_root().join("grpo_vectors.safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_and_floor() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[0.0, 0.0], &[3.0, 4.0]) - 1.0).abs() < 1e-15);
        assert_eq!(rel_err(&[f32::NAN], &[1.0]), f64::INFINITY);
        // ‖b‖ = 5 under a floor of 50: the error is 0.1 of the plain one.
        let plain = rel_err(&[3.5, 4.0], &[3.0, 4.0]);
        assert!((rel_err_floor(&[3.5, 4.0], &[3.0, 4.0], 50.0) - plain / 10.0).abs() < 1e-15);
        assert_eq!(rel_err_floor(&[3.5, 4.0], &[3.0, 4.0], 1.0), plain);
        assert_eq!(max_abs(&[1.0, -2.0], &[1.5, 2.0]), 4.0);
        assert_eq!(rel_err64(&[1.0], &[1.0]), 0.0);
    }

    #[test]
    fn every_tolerance_has_a_reason() {
        for t in Tol::ALL {
            assert!(t.value() > 0.0 && t.value() < 0.1 && !t.reason().is_empty(), "{t:?}");
        }
        assert_eq!(Tol::FixtureLogits.value(), 1e-4);
        assert_eq!(Tol::FixtureGrads.value(), 1e-3);
    }
}

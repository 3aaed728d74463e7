//! Rotary position embedding (RoPE) for all three models, plus the host-side cos/sin tables.
//!
//! Every variant the project needs (Llama/Mistral/Qwen2 1-D, Qwen2.5-VL M-RoPE, the Qwen2.5-VL
//! vision tower's 2-D rotary) rotates, in each head of x [tokens, heads, D], element i with
//! element i + D/2 (rotate_half / NeoX pairing) by an angle θ[token][i], i < D/2, applied to the
//! full head. They differ only in θ, so the kernel takes precomputed cos/sin tables [tokens, D/2]
//! (f32) and the table builders below mirror transformers' f32 arithmetic:
//! inv_freq[i] = 1 / base^(f32(2i)/d), angle = f32(pos)·inv_freq[i], then cos/sin of that f32.
//! Forward: (a, b) → (a·cos − b·sin, b·cos + a·sin); backward is the inverse rotation (−θ).
//! Kernel: kernels/rope.cu.

use super::{check, check_dtype, same_float_dtype};
use crate::cuda::api;
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};
use cudarc::driver::LaunchConfig;

/// `1 / base^(f32(2i) / d)` for i < d/2, in f32 as transformers computes it
/// (`1.0 / (base ** (torch.arange(0, d, 2).float() / d))`). The power is evaluated in f64 and
/// rounded once, i.e. correctly rounded; torch's f32 pow may differ from it by 1 ulp.
pub fn inv_freq(d: usize, base: f32) -> Vec<f32> {
    (0..d / 2)
        .map(|i| {
            let e = (2 * i) as f32 / d as f32;
            let p = (base as f64).powf(e as f64) as f32;
            1.0f32 / p
        })
        .collect()
}

/// cos and sin of the f32 angle, each rounded once from f64 (correctly rounded f32).
fn cos_sin(angle: f32) -> (f32, f32) {
    let a = angle as f64;
    (a.cos() as f32, a.sin() as f32)
}

/// 1-D RoPE tables (Llama, Mistral, Qwen2 text without images): angle[t][i] = pos[t]·inv_freq[i].
/// Returns (cos, sin), each [tokens = pos.len(), head_dim/2].
pub fn table_1d(pos: &[i32], head_dim: usize, theta: f32) -> Result<(Vec<f32>, Vec<f32>)> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        bail!("rope table_1d: head_dim {head_dim} must be even and positive");
    }
    let inv = inv_freq(head_dim, theta);
    let half = head_dim / 2;
    let (mut cos, mut sin) = (Vec::with_capacity(pos.len() * half), Vec::with_capacity(pos.len() * half));
    for &p in pos {
        for &f in &inv {
            let (c, s) = cos_sin(p as f32 * f);
            cos.push(c);
            sin.push(s);
        }
    }
    Ok((cos, sin))
}

/// Qwen2.5-VL text M-RoPE tables. `pos3` is [3, tokens] (rows t, h, w, as `position_ids` from
/// `get_rope_index`); `sections` is `mrope_section` [s0, s1, s2] with s0 + s1 + s2 = head_dim/2.
/// Frequency i takes its position from row t for i < s0, row h for s0 ≤ i < s0+s1, row w
/// otherwise: angle[t][i] = pos3[axis(i)][t]·inv_freq[i]. transformers splits the full
/// cat(angle, angle) by `mrope_section * 2` and picks axis `chunk % 3`, so dim D/2 + i uses the
/// same axis as dim i — exactly what rotating the pair (i, i + D/2) by angle[t][i] does.
/// Returns (cos, sin), each [tokens, head_dim/2].
pub fn table_mrope(
    pos3: &[i32], tokens: usize, head_dim: usize, theta: f32, sections: &[usize],
) -> Result<(Vec<f32>, Vec<f32>)> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        bail!("rope table_mrope: head_dim {head_dim} must be even and positive");
    }
    if pos3.len() != 3 * tokens {
        bail!("rope table_mrope: pos3 has {} entries, expected 3 x {tokens} (rows t, h, w)", pos3.len());
    }
    let half = head_dim / 2;
    if sections.len() != 3 || sections.iter().sum::<usize>() != half {
        bail!("rope table_mrope: mrope_section {sections:?} must have 3 entries summing to head_dim/2 = {half}");
    }
    let axis: Vec<usize> = (0..half)
        .map(|i| {
            if i < sections[0] {
                0
            } else if i < sections[0] + sections[1] {
                1
            } else {
                2
            }
        })
        .collect();
    let inv = inv_freq(head_dim, theta);
    let (mut cos, mut sin) = (Vec::with_capacity(tokens * half), Vec::with_capacity(tokens * half));
    for t in 0..tokens {
        for i in 0..half {
            let (c, s) = cos_sin(pos3[axis[i] * tokens + t] as f32 * inv[i]);
            cos.push(c);
            sin.push(s);
        }
    }
    Ok((cos, sin))
}

/// Qwen2.5-VL vision-tower 2-D rotary (`VisionRotaryEmbedding(head_dim/2)`): inv_v[i] =
/// 1/theta^(2i/(head_dim/2)) for i < head_dim/4, and angle[t] = [hpos[t]·inv_v, wpos[t]·inv_v]
/// (h angles first, then w; head_dim/2 in all). Returns (cos, sin), each [tokens, head_dim/2].
/// The caller permutes rows into window order together with the hidden states (model-spec A4).
pub fn table_vision_2d(hpos: &[i32], wpos: &[i32], head_dim: usize, theta: f32) -> Result<(Vec<f32>, Vec<f32>)> {
    if head_dim == 0 || !head_dim.is_multiple_of(4) {
        bail!("rope table_vision_2d: head_dim {head_dim} must be a positive multiple of 4");
    }
    if hpos.len() != wpos.len() {
        bail!("rope table_vision_2d: hpos has {} entries but wpos has {}", hpos.len(), wpos.len());
    }
    let inv = inv_freq(head_dim / 2, theta); // head_dim/4 frequencies
    let half = head_dim / 2;
    let (mut cos, mut sin) = (Vec::with_capacity(hpos.len() * half), Vec::with_capacity(hpos.len() * half));
    for (&h, &w) in hpos.iter().zip(wpos) {
        for p in [h, w] {
            for &f in &inv {
                let (c, s) = cos_sin(p as f32 * f);
                cos.push(c);
                sin.push(s);
            }
        }
    }
    Ok((cos, sin))
}

/// Uploads a (cos, sin) table pair as f32 buffers on `dev`.
pub fn upload_table(dev: &Device, cos: &[f32], sin: &[f32]) -> Result<(Buf, Buf)> {
    if cos.len() != sin.len() {
        bail!("rope upload_table: cos has {} entries but sin has {}", cos.len(), sin.len());
    }
    Ok((dev.upload(cos, DType::F32)?, dev.upload(sin, DType::F32)?))
}

/// Rotates x [tokens, heads, head_dim] in place by the angles of cos/sin [tokens, head_dim/2] (f32).
pub fn fwd(
    dev: &Device, x: &mut Buf, cos: &Buf, sin: &Buf, tokens: usize, heads: usize, head_dim: usize,
) -> Result<()> {
    apply(dev, "rope_fwd", x, cos, sin, Shape { tokens, heads, head_dim }, false)
}

/// Backward of `fwd`, in place on dx [tokens, heads, head_dim]: the inverse rotation (by −θ).
pub fn bwd(
    dev: &Device, dx: &mut Buf, cos: &Buf, sin: &Buf, tokens: usize, heads: usize, head_dim: usize,
) -> Result<()> {
    apply(dev, "rope_bwd", dx, cos, sin, Shape { tokens, heads, head_dim }, true)
}

/// x [tokens, heads, head_dim].
#[derive(Clone, Copy)]
struct Shape {
    tokens: usize,
    heads: usize,
    head_dim: usize,
}

fn apply(dev: &Device, op: &str, x: &mut Buf, cos: &Buf, sin: &Buf, shape: Shape, inverse: bool) -> Result<()> {
    let Shape { tokens, heads, head_dim } = shape;
    if !head_dim.is_multiple_of(2) {
        bail!("{op}: head_dim {head_dim} must be even");
    }
    let half = head_dim / 2;
    check(x, tokens * heads * head_dim, op, "x")?;
    check(cos, tokens * half, op, "cos")?;
    check(sin, tokens * half, op, "sin")?;
    check_dtype(cos, DType::F32, op, "cos")?;
    check_dtype(sin, DType::F32, op, "sin")?;
    let pairs = tokens * heads * half;
    if pairs == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            cpu::apply(x.host_mut()?, cos.host()?, sin.host()?, tokens, heads, head_dim, inverse);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[x])?;
            if tokens * heads * head_dim > i32::MAX as usize {
                bail!("{op}: {tokens} x {heads} x {head_dim} elements exceed the kernel's i32 shape arguments");
            }
            // Grid-stride kernel: enough blocks for one pass (N pairs per thread on the 16-byte
            // path), capped at 32 blocks per SM.
            let per_thread = if half.is_multiple_of(16 / dt.size()) { 16 / dt.size() } else { 1 };
            let block = 256u32;
            let blocks = pairs.div_ceil(per_thread).div_ceil(block as usize).clamp(1, 32 * g.sm_count as usize) as u32;
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
            let (xp, cp, sp) = (x.ptr(g)?, cos.ptr(g)?, sin.ptr(g)?);
            let (tokens, heads, head_dim) = (tokens as i32, heads as i32, head_dim as i32);
            if inverse {
                api::rope::RopeBwd { dx: xp, cosv: cp, sinv: sp, tokens, heads, head_dim }.launch(g, dt, cfg)
            } else {
                api::rope::RopeFwd { x: xp, cosv: cp, sinv: sp, tokens, heads, head_dim }.launch(g, dt, cfg)
            }
        }
    }
}

pub mod cpu {
    use crate::real::Real;

    /// In-place rotation of each (i, i + D/2) pair; `inverse` rotates by −θ (the backward).
    pub fn apply<R: Real>(
        x: &mut [R], cos: &[R], sin: &[R], tokens: usize, heads: usize, head_dim: usize, inverse: bool,
    ) {
        let half = head_dim / 2;
        for t in 0..tokens {
            let (ct, st) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
            for h in 0..heads {
                let row = &mut x[(t * heads + h) * head_dim..(t * heads + h + 1) * head_dim];
                for i in 0..half {
                    let (c, s) = (ct[i], if inverse { -st[i] } else { st[i] });
                    let (a, b) = (row[i], row[i + half]);
                    row[i] = a * c - b * s;
                    row[i + half] = b * c + a * s;
                }
            }
        }
    }

    pub fn fwd<R: Real>(x: &mut [R], cos: &[R], sin: &[R], tokens: usize, heads: usize, head_dim: usize) {
        apply(x, cos, sin, tokens, heads, head_dim, false)
    }

    pub fn bwd<R: Real>(dx: &mut [R], cos: &[R], sin: &[R], tokens: usize, heads: usize, head_dim: usize) {
        apply(dx, cos, sin, tokens, heads, head_dim, true)
    }
}

//! The Qwen2.5-VL vision tower (`Qwen2_5_VisionTransformerPretrainedModel`, model-spec A4),
//! forward and explicit backward:
//!
//! 1. patch embedding (Conv3d as a GEMM, ops::patch_embed), fused with the gather into window
//!    order: 2×2 merge units are regrouped so each window of `vws`×`vws` merged tokens is
//!    contiguous (`VisionLayout`);
//! 2. `depth` pre-norm blocks (common::decoder with every bias on), 2-D RoPE, non-causal attention
//!    within each window, or within each image frame on `fullatt_block_indexes`;
//! 3. PatchMerger: RMSNorm ln_q, 4 consecutive patch rows concatenated, Linear → GELU(erf) →
//!    Linear, then rows put back from window order into image order.
//!
//! All geometry (window order, cu_seqlens, rotary positions) is computed on the host from the
//! image grids. The vision RMSNorm eps is 1e-6 whatever the config says (model-spec D7).
//! The blocks may carry LoRA adapters (`lora`, one per block, or an empty slice); with the base
//! frozen (`g` None in `backward`) only the adapters get gradients.

use super::config::VisionConfig;
use crate::models::common::decoder::{
    norm_bwd, stack_backward, stack_forward, Block, LayerActs, LayerDims, LayerFlags, LayerParams, NormBwd, RopeKind,
    RopeTable, Slot,
};
use crate::models::common::lora::LayerLora;
use crate::models::common::params::ParamRef;
use crate::ops::act::{self, Gelu};
use crate::ops::attention::Varlen;
use crate::ops::patch_embed::{self, RowIndex};
use crate::ops::{matmul, rmsnorm};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};

const VISION_EPS: f32 = 1e-6;
const VISION_ROPE_THETA: f32 = 10000.0;

/// Sizes of the tower.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionDims {
    pub block: LayerDims,
    pub depth: usize,
    /// Values per patch row of pixel_values (3·2·14·14).
    pub patch_dim: usize,
    pub merge: usize,
    /// Merged tokens per window side (window_size / merge / patch).
    pub vws: usize,
    pub fullatt: Vec<usize>,
    /// Merger output width (= the text hidden size).
    pub out: usize,
}

pub const VISION_FLAGS: LayerFlags = LayerFlags { qkv_bias: true, o_bias: true, mlp_bias: true };

impl VisionDims {
    pub fn new(c: &VisionConfig) -> Result<Self> {
        if c.num_heads == 0 || !c.hidden_size.is_multiple_of(c.num_heads) {
            bail!("vision: hidden_size {} is not a multiple of num_heads {}", c.hidden_size, c.num_heads);
        }
        let vws = c.window_size / c.spatial_merge_size.max(1) / c.patch_size.max(1);
        if vws == 0 {
            bail!(
                "vision: window_size {} is smaller than one merged token ({} px)",
                c.window_size,
                c.spatial_merge_size * c.patch_size
            );
        }
        if let Some(&i) = c.fullatt_block_indexes.iter().find(|&&i| i >= c.depth) {
            bail!("vision: fullatt_block_indexes names block {i}, but depth is {}", c.depth);
        }
        let d = c.hidden_size;
        Ok(VisionDims {
            block: LayerDims {
                d,
                heads: c.num_heads,
                kv_heads: c.num_heads,
                head_dim: d / c.num_heads,
                inter: c.intermediate_size,
                eps: VISION_EPS,
            },
            depth: c.depth,
            patch_dim: c.patch_dim(),
            merge: c.spatial_merge_size,
            vws,
            fullatt: c.fullatt_block_indexes.clone(),
            out: c.out_hidden_size,
        })
    }
    /// Patch rows per merged token (4).
    pub fn unit(&self) -> usize {
        self.merge * self.merge
    }
    /// The merger's hidden width (4·D).
    pub fn merged_dim(&self) -> usize {
        self.block.d * self.unit()
    }
}

/// The tower's parameters (or their f32 gradients).
pub struct VisionParams {
    pub patch: Buf, // [D, patch_dim]
    pub blocks: Vec<LayerParams>,
    pub ln_q: Buf,   // [D]
    pub mlp0_w: Buf, // [4D, 4D]
    pub mlp0_b: Buf, // [4D]
    pub mlp2_w: Buf, // [out, 4D]
    pub mlp2_b: Buf, // [out]
}

/// The checkpoint tensor (or row range of one: q, k, v share `attn.qkv`) behind a block slot.
pub fn block_ref(dims: &VisionDims, i: usize, s: Slot) -> ParamRef {
    let d = dims.block.d;
    let (inter, p) = (dims.block.inter, format!("visual.blocks.{i}."));
    let qkv = |what: &str, k: usize| {
        let full = if what == "weight" { vec![3 * d, d] } else { vec![3 * d] };
        ParamRef::piece(&format!("{p}attn.qkv.{what}"), &full, k * d, d)
    };
    match s {
        Slot::Ln1 => ParamRef::whole(&format!("{p}norm1.weight"), &[d]),
        Slot::Ln2 => ParamRef::whole(&format!("{p}norm2.weight"), &[d]),
        Slot::Wq => qkv("weight", 0),
        Slot::Wk => qkv("weight", 1),
        Slot::Wv => qkv("weight", 2),
        Slot::Bq => qkv("bias", 0),
        Slot::Bk => qkv("bias", 1),
        Slot::Bv => qkv("bias", 2),
        Slot::Wo => ParamRef::whole(&format!("{p}attn.proj.weight"), &[d, d]),
        Slot::Bo => ParamRef::whole(&format!("{p}attn.proj.bias"), &[d]),
        Slot::Wg => ParamRef::whole(&format!("{p}mlp.gate_proj.weight"), &[inter, d]),
        Slot::Bg => ParamRef::whole(&format!("{p}mlp.gate_proj.bias"), &[inter]),
        Slot::Wu => ParamRef::whole(&format!("{p}mlp.up_proj.weight"), &[inter, d]),
        Slot::Bu => ParamRef::whole(&format!("{p}mlp.up_proj.bias"), &[inter]),
        Slot::Wd => ParamRef::whole(&format!("{p}mlp.down_proj.weight"), &[d, inter]),
        Slot::Bd => ParamRef::whole(&format!("{p}mlp.down_proj.bias"), &[d]),
    }
}

/// The non-block tensors, in a fixed order: patch, ln_q, mlp.0 (w, b), mlp.2 (w, b).
fn head_refs(dims: &VisionDims, patch_shape: &[usize]) -> [ParamRef; 6] {
    let (d, m, o) = (dims.block.d, dims.merged_dim(), dims.out);
    [
        ParamRef::whole("visual.patch_embed.proj.weight", patch_shape),
        ParamRef::whole("visual.merger.ln_q.weight", &[d]),
        ParamRef::whole("visual.merger.mlp.0.weight", &[m, m]),
        ParamRef::whole("visual.merger.mlp.0.bias", &[m]),
        ParamRef::whole("visual.merger.mlp.2.weight", &[o, m]),
        ParamRef::whole("visual.merger.mlp.2.bias", &[o]),
    ]
}

impl VisionParams {
    /// Builds every tensor with `make`. `patch_shape` is the checkpoint's 5-D conv shape
    /// [D, C, T, P, P] (its rows are our [D, patch_dim] rows).
    pub fn build(
        dims: &VisionDims, patch_shape: &[usize], make: &mut dyn FnMut(&ParamRef) -> Result<Buf>,
    ) -> Result<Self> {
        let [r_patch, r_lnq, r_w0, r_b0, r_w2, r_b2] = head_refs(dims, patch_shape);
        if patch_shape.first() != Some(&dims.block.d) || patch_shape.iter().skip(1).product::<usize>() != dims.patch_dim
        {
            bail!(
                "vision: patch_embed shape {patch_shape:?} does not match hidden {} × patch_dim {}",
                dims.block.d,
                dims.patch_dim
            );
        }
        let patch = make(&r_patch)?;
        let mut blocks = Vec::with_capacity(dims.depth);
        for i in 0..dims.depth {
            blocks.push(LayerParams::build(&dims.block, VISION_FLAGS, &mut |s, _| make(&block_ref(dims, i, s)))?);
        }
        Ok(VisionParams {
            patch,
            blocks,
            ln_q: make(&r_lnq)?,
            mlp0_w: make(&r_w0)?,
            mlp0_b: make(&r_b0)?,
            mlp2_w: make(&r_w2)?,
            mlp2_b: make(&r_b2)?,
        })
    }

    /// Every tensor with the checkpoint tensor it belongs to.
    pub fn entries(&self, dims: &VisionDims, patch_shape: &[usize]) -> Vec<(ParamRef, &Buf)> {
        let [r_patch, r_lnq, r_w0, r_b0, r_w2, r_b2] = head_refs(dims, patch_shape);
        let mut v = vec![(r_patch, &self.patch)];
        for (i, b) in self.blocks.iter().enumerate() {
            v.extend(b.all().into_iter().map(|(s, buf)| (block_ref(dims, i, s), buf)));
        }
        v.extend([
            (r_lnq, &self.ln_q),
            (r_w0, &self.mlp0_w),
            (r_b0, &self.mlp0_b),
            (r_w2, &self.mlp2_w),
            (r_b2, &self.mlp2_b),
        ]);
        v
    }

    /// As `entries`, mutably.
    pub fn entries_mut(&mut self, dims: &VisionDims, patch_shape: &[usize]) -> Vec<(ParamRef, &mut Buf)> {
        let [r_patch, r_lnq, r_w0, r_b0, r_w2, r_b2] = head_refs(dims, patch_shape);
        let VisionParams { patch, blocks, ln_q, mlp0_w, mlp0_b, mlp2_w, mlp2_b } = self;
        let mut v = vec![(r_patch, patch)];
        for (i, b) in blocks.iter_mut().enumerate() {
            v.extend(b.all_mut().into_iter().map(|(s, buf)| (block_ref(dims, i, s), buf)));
        }
        v.extend([(r_lnq, ln_q), (r_w0, mlp0_w), (r_b0, mlp0_b), (r_w2, mlp2_w), (r_b2, mlp2_b)]);
        v
    }
}

/// Host-side geometry of a batch of images (model-spec A4.2–A4.5).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionLayout {
    pub n_patches: usize,
    pub n_merged: usize,
    /// Window slot j holds merged token `window_index[j]` (image order, all images concatenated).
    pub window_index: Vec<usize>,
    /// Window boundaries in patch rows of the window-ordered sequence.
    pub cu_window: Vec<i32>,
    /// One segment per image frame, in patch rows.
    pub cu_full: Vec<i32>,
    /// Rotary positions in window order: [2, n_patches], the h row then the w row.
    pub pos: Vec<i32>,
}

impl VisionLayout {
    pub fn new(grids: &[[usize; 3]], merge: usize, vws: usize) -> Result<Self> {
        let unit = merge * merge;
        let (mut window_index, mut cu_window, mut cu_full) = (Vec::new(), vec![0i32], vec![0i32]);
        let (mut hpos, mut wpos) = (Vec::new(), Vec::new()); // processor (image) order
        let mut offset = 0usize; // merged tokens of earlier images
        for (i, &[gt, gh, gw]) in grids.iter().enumerate() {
            if gt == 0 || gh == 0 || gw == 0 || gh % merge != 0 || gw % merge != 0 {
                bail!(
                    "vision: image {i} has grid {:?}; h and w must be positive multiples of the merge size {merge}",
                    [gt, gh, gw]
                );
            }
            let (lh, lw) = (gh / merge, gw / merge);
            for t in 0..gt {
                for wy in (0..lh).step_by(vws) {
                    for wx in (0..lw).step_by(vws) {
                        let before = window_index.len();
                        for y in wy..(wy + vws).min(lh) {
                            for x in wx..(wx + vws).min(lw) {
                                window_index.push(offset + t * lh * lw + y * lw + x);
                            }
                        }
                        let last = *cu_window.last().unwrap_or(&0);
                        cu_window.push(last + ((window_index.len() - before) * unit) as i32);
                    }
                }
                let last = *cu_full.last().unwrap_or(&0);
                cu_full.push(last + (gh * gw) as i32);
                for by in 0..lh {
                    for bx in 0..lw {
                        for iy in 0..merge {
                            for ix in 0..merge {
                                hpos.push((by * merge + iy) as i32);
                                wpos.push((bx * merge + ix) as i32);
                            }
                        }
                    }
                }
            }
            offset += gt * lh * lw;
        }
        let n_patches = offset * unit;
        let mut pos = vec![0i32; 2 * n_patches];
        for (j, &m) in window_index.iter().enumerate() {
            for r in 0..unit {
                pos[j * unit + r] = hpos[m * unit + r];
                pos[n_patches + j * unit + r] = wpos[m * unit + r];
            }
        }
        Ok(VisionLayout { n_patches, n_merged: offset, window_index, cu_window, cu_full, pos })
    }

    /// Source patch row of each window-ordered row.
    pub fn patch_perm(&self, unit: usize) -> Vec<usize> {
        self.window_index.iter().flat_map(|&m| (0..unit).map(move |r| m * unit + r)).collect()
    }

    /// Window slot of each image-order merged token (the inverse of `window_index`).
    pub fn unpermute(&self) -> Vec<usize> {
        let mut inv = vec![0usize; self.n_merged];
        for (j, &m) in self.window_index.iter().enumerate() {
            inv[m] = j;
        }
        inv
    }
}

/// What the tower's forward keeps for its backward.
pub struct VisionFwd {
    pub layout: VisionLayout,
    pixels: Buf,          // [N, patch_dim] f32
    patch_perm: RowIndex, // [N] window row ← patch row
    to_window: RowIndex,  // [Nm] window slot ← image-order merged row (= window_index)
    win: Varlen,
    full: Varlen,
    rope: RopeTable,              // [N, hd/2], window order
    hs: Vec<Buf>,                 // depth + 1 residual streams [N, D], window order
    acts: Vec<Option<LayerActs>>, // None: recompute in backward
    rstd_q: Buf,                  // [N] f32
    yq: Buf,                      // [N, D] = [Nm, 4D]
    h1: Buf,                      // [Nm, 4D] before GELU
    g1: Buf,                      // [Nm, 4D] after GELU
}

/// What every tower call passes the same way: sizes, weights and the blocks' adapters (an
/// empty slice: none).
#[derive(Clone, Copy)]
pub struct Tower<'a> {
    pub dims: &'a VisionDims,
    pub p: &'a VisionParams,
    pub lora: &'a [LayerLora],
}

/// Where `backward` accumulates: the base gradients (None: the base is frozen) and the
/// adapters' (None: no trained adapters).
#[derive(Default)]
pub struct VisionGrads<'g> {
    pub base: Option<&'g mut VisionParams>,
    pub lora: Option<&'g mut [LayerLora]>,
}

/// Block i of the tower: window attention, or whole-frame attention on `fullatt` blocks.
fn block<'a>(tw: Tower<'a>, rope: &'a RopeTable, win: &'a Varlen, full: &'a Varlen, i: usize) -> Block<'a> {
    let Tower { dims, p, lora } = tw;
    let segs = if dims.fullatt.contains(&i) { full } else { win };
    Block { dims: &dims.block, w: &p.blocks[i], rope, segs, causal: false, lora: lora.get(i) }
}

/// Image embeddings [Nm, out] in image order (what replaces the `<|image_pad|>` tokens), and the
/// saved state. `pixels` [N, patch_dim] as the processor wrote them; with `recompute` the
/// blocks keep only their inputs and rerun during backward.
pub fn forward(
    dev: &Device, dims: &VisionDims, p: &VisionParams, lora: &[LayerLora], pixels: &[f32], grids: &[[usize; 3]],
    recompute: bool,
) -> Result<(Buf, VisionFwd)> {
    let layout = VisionLayout::new(grids, dims.merge, dims.vws)?;
    let (n, nm, unit, d) = (layout.n_patches, layout.n_merged, dims.unit(), dims.block.d);
    if pixels.len() != n * dims.patch_dim {
        bail!(
            "vision: pixel_values has {} values; the grids {grids:?} need {n} patches × {}",
            pixels.len(),
            dims.patch_dim
        );
    }
    let (bd, dt) = (&dims.block, p.patch.dtype());
    let pixels = dev.upload(pixels, DType::F32)?;
    let patch_perm = RowIndex::new(dev, &layout.patch_perm(unit), n)?;
    let to_window = RowIndex::new(dev, &layout.window_index, nm)?;
    let to_image = RowIndex::new(dev, &layout.unpermute(), nm)?;
    let rope = RopeKind::Vision2d { theta: VISION_ROPE_THETA }.upload(dev, &layout.pos, n, bd.head_dim)?;
    let (win, full) = (Varlen::new(dev, &layout.cu_window)?, Varlen::new(dev, &layout.cu_full)?);
    let mut h0 = dev.zeros(dt, n * d)?;
    patch_embed::fwd(
        dev,
        &mut h0,
        &pixels,
        &p.patch,
        Some(&patch_perm),
        patch_embed::Dims { n, k: dims.patch_dim, d },
    )?;
    let mut f = VisionFwd {
        layout,
        pixels,
        patch_perm,
        to_window,
        win,
        full,
        rope,
        hs: vec![h0],
        acts: Vec::new(),
        rstd_q: dev.zeros_f32(n)?,
        yq: dev.zeros(dt, n * d)?,
        h1: dev.zeros(dt, nm * dims.merged_dim())?,
        g1: dev.zeros(dt, nm * dims.merged_dim())?,
    };
    let (rope, win, full) = (&f.rope, &f.win, &f.full);
    f.acts =
        stack_forward(dev, dims.depth, &|i| block(Tower { dims, p, lora }, rope, win, full, i), &mut f.hs, &|_| {
            recompute
        })?;
    // Merger, in window order; then rows back to image order.
    let md = dims.merged_dim();
    rmsnorm::fwd(
        dev,
        rmsnorm::Fwd { y: &mut f.yq, rstd: &mut f.rstd_q, x: &f.hs[dims.depth], w: &p.ln_q },
        n,
        d,
        VISION_EPS,
    )?;
    matmul::linear_fwd(dev, &mut f.h1, &f.yq, &p.mlp0_w, Some(&p.mlp0_b), matmul::Linear { t: nm, din: md, dout: md })?;
    act::gelu_fwd(dev, &mut f.g1, &f.h1, nm * md, Gelu::Erf)?;
    let mut merged = dev.zeros(dt, nm * dims.out)?;
    matmul::linear_fwd(
        dev,
        &mut merged,
        &f.g1,
        &p.mlp2_w,
        Some(&p.mlp2_b),
        matmul::Linear { t: nm, din: md, dout: dims.out },
    )?;
    let mut embeds = dev.zeros(dt, nm * dims.out)?;
    patch_embed::gather_rows(dev, &mut embeds, &merged, &to_image, dims.out)?;
    Ok((embeds, f))
}

/// Accumulates the tower's parameter gradients into `g.base` (None: the base is frozen) and
/// the adapters' into `g.lora` from d(image embeddings) [Nm, out] (image order).
pub fn backward(dev: &Device, tw: Tower, g: VisionGrads, f: &VisionFwd, d_embeds: &Buf) -> Result<()> {
    let (Tower { dims, p, lora: _ }, VisionGrads { base: mut g, lora: lora_grads }) = (tw, g);
    let (n, nm, d, md, dt) = (f.layout.n_patches, f.layout.n_merged, dims.block.d, dims.merged_dim(), p.patch.dtype());
    let mut dmerged = dev.zeros(dt, nm * dims.out)?;
    patch_embed::gather_rows(dev, &mut dmerged, d_embeds, &f.to_window, dims.out)?;
    let mut dg1 = dev.zeros(dt, nm * md)?;
    match g.as_deref_mut() {
        Some(g) => matmul::linear_bwd(
            dev,
            matmul::LinearGrads { dx: Some(&mut dg1), dw: &mut g.mlp2_w, db: Some(&mut g.mlp2_b) },
            &dmerged,
            &f.g1,
            &p.mlp2_w,
            matmul::Linear { t: nm, din: md, dout: dims.out },
        )?,
        None => matmul::fwd(dev, &mut dg1, &dmerged, &p.mlp2_w, matmul::Mm::new(nm, md, dims.out))?,
    }
    let mut dh1 = dev.zeros(dt, nm * md)?;
    act::gelu_bwd(dev, &mut dh1, &dg1, &f.h1, nm * md, Gelu::Erf)?;
    let mut dyq = dg1; // reuse: [Nm, 4D] = [N, D]
    match g.as_deref_mut() {
        Some(g) => matmul::linear_bwd(
            dev,
            matmul::LinearGrads { dx: Some(&mut dyq), dw: &mut g.mlp0_w, db: Some(&mut g.mlp0_b) },
            &dh1,
            &f.yq,
            &p.mlp0_w,
            matmul::Linear { t: nm, din: md, dout: md },
        )?,
        None => matmul::fwd(dev, &mut dyq, &dh1, &p.mlp0_w, matmul::Mm::new(nm, md, md))?,
    }
    let mut dx = dev.zeros(dt, n * d)?;
    let lnq = NormBwd { dx: &mut dx, dy: &dyq, x: &f.hs[dims.depth], w: &p.ln_q, rstd: &f.rstd_q };
    norm_bwd(dev, g.as_deref_mut().map(|g| &mut g.ln_q), lnq, n, d)?;
    let blocks = g.as_deref_mut().map(|g| &mut g.blocks[..]);
    let dx = stack_backward(dev, &|i| block(tw, &f.rope, &f.win, &f.full, i), &f.hs, &f.acts, blocks, lora_grads, dx)?;
    match g {
        Some(g) => patch_embed::bwd(
            dev,
            &mut g.patch,
            &dx,
            &f.pixels,
            Some(&f.patch_perm),
            patch_embed::Dims { n, k: dims.patch_dim, d },
        ),
        None => Ok(()),
    }
}

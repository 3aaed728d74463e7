//! The CLIP vision tower of LLaVA-NeXT (`CLIPVisionModel`, model-spec B4, B5.1), forward and
//! explicit backward (llm.c style), one tile image (base image or anyres tile) per attention
//! segment:
//!
//! ```text
//! patches = Conv2d(pixels) as a GEMM over flattened P×P patches (ops::patch_embed, no bias)
//! e   = [class_embedding; patches] + position_embedding   per tile, [g²+1, D]
//! hs0 = LayerNorm(e; pre_layrnorm)                        (the checkpoint's spelling)
//! hs[l+1] = block(hs[l]):  m = x + out_proj(MHA(LN1(x)))  (q/k/v/out with bias, no mask)
//!                          y = m + fc2(quick_gelu(fc1(LN2(m))))
//! features = hs[feature_state] without the CLS rows       [tiles·g², D]
//! ```
//! Only the layers up to the selected hidden state run (−2: every layer but the last), so the
//! last layer and `post_layernorm` get no gradient; they stay loaded so a checkpoint can be
//! written back whole, and the gradient set (`ClipParams::build` with `grads`) leaves them out.

use super::config::LlavaNextConfig;
use crate::models::common::params::ParamRef;
use crate::ops::act::{self, Gelu};
use crate::ops::attention::{self, AttnShape, Varlen};
use crate::ops::patch_embed::{self, gather_rows, scatter_rows, RowIndex};
use crate::ops::{elementwise, layernorm, matmul};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};

/// Canonical (llava-hf) prefix of every tower tensor.
const PREFIX: &str = "vision_tower.vision_model.";

/// Sizes of the tower.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipDims {
    pub d: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    /// Encoder layers in the checkpoint.
    pub layers: usize,
    /// Layers that run: the selected hidden state is `hs[feature_state]`, the output of layer
    /// `feature_state − 1` (0: the embeddings after pre_layrnorm).
    pub feature_state: usize,
    pub channels: usize,
    pub patch: usize,
    /// Tile side in pixels.
    pub image_size: usize,
    /// Patches per tile side.
    pub g: usize,
    pub eps: f32,
    pub act: Gelu,
}

impl ClipDims {
    pub fn new(cfg: &LlavaNextConfig) -> Result<Self> {
        let v = &cfg.vision;
        let states = cfg.feature_hidden_states();
        let [feature_state] = states[..] else {
            bail!("LLaVA-NeXT: vision_feature_layer {:?} selects {} hidden states; only a single feature layer is supported", cfg.vision_feature_layer, states.len());
        };
        if v.num_attention_heads == 0
            || !v.hidden_size.is_multiple_of(v.num_attention_heads)
            || v.patch_size == 0
            || !v.image_size.is_multiple_of(v.patch_size)
        {
            bail!(
                "vision_config: hidden {} / heads {}, image {} / patch {} must divide",
                v.hidden_size,
                v.num_attention_heads,
                v.image_size,
                v.patch_size
            );
        }
        Ok(ClipDims {
            d: v.hidden_size,
            heads: v.num_attention_heads,
            head_dim: v.head_dim(),
            inter: v.intermediate_size,
            layers: v.num_hidden_layers,
            feature_state,
            channels: v.num_channels,
            patch: v.patch_size,
            image_size: v.image_size,
            g: v.patches_per_side(),
            eps: v.layer_norm_eps as f32,
            act: Gelu::from_hf(&v.hidden_act)?,
        })
    }
    /// Values per flattened patch (C·P·P, the conv weight's row).
    pub fn patch_dim(&self) -> usize {
        self.channels * self.patch * self.patch
    }
    /// Tokens per tile including CLS (g² + 1).
    pub fn seq(&self) -> usize {
        self.g * self.g + 1
    }
    /// Values per tile of pixel_values (C·S·S).
    pub fn tile_len(&self) -> usize {
        self.channels * self.image_size * self.image_size
    }
}

/// One encoder layer's tensors (or their f32 gradients), in `LAYER_NAMES` order.
pub struct ClipLayer {
    pub ln1_w: Buf, // [D]
    pub ln1_b: Buf,
    pub wq: Buf, // [D, D]
    pub bq: Buf, // [D]
    pub wk: Buf,
    pub bk: Buf,
    pub wv: Buf,
    pub bv: Buf,
    pub wo: Buf,
    pub bo: Buf,
    pub ln2_w: Buf,
    pub ln2_b: Buf,
    pub fc1_w: Buf, // [I, D]
    pub fc1_b: Buf, // [I]
    pub fc2_w: Buf, // [D, I]
    pub fc2_b: Buf, // [D]
}

const LAYER_NAMES: [&str; 16] = [
    "layer_norm1.weight",
    "layer_norm1.bias",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "layer_norm2.weight",
    "layer_norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
];

fn layer_refs(dims: &ClipDims, l: usize) -> Vec<ParamRef> {
    let (d, i) = (dims.d, dims.inter);
    let shapes: [&[usize]; 16] = [
        &[d],
        &[d],
        &[d, d],
        &[d],
        &[d, d],
        &[d],
        &[d, d],
        &[d],
        &[d, d],
        &[d],
        &[d],
        &[d],
        &[i, d],
        &[i],
        &[d, i],
        &[d],
    ];
    LAYER_NAMES
        .iter()
        .zip(shapes)
        .map(|(n, s)| ParamRef::whole(&format!("{PREFIX}encoder.layers.{l}.{n}"), s))
        .collect()
}

impl ClipLayer {
    fn build(refs: &[ParamRef], make: &mut dyn FnMut(&ParamRef) -> Result<Buf>) -> Result<Self> {
        let mut v = refs.iter().map(make).collect::<Result<Vec<_>>>()?.into_iter();
        let mut next = || v.next().ok_or_else(|| anyhow::anyhow!("CLIP layer: tensor list too short"));
        Ok(ClipLayer {
            ln1_w: next()?,
            ln1_b: next()?,
            wq: next()?,
            bq: next()?,
            wk: next()?,
            bk: next()?,
            wv: next()?,
            bv: next()?,
            wo: next()?,
            bo: next()?,
            ln2_w: next()?,
            ln2_b: next()?,
            fc1_w: next()?,
            fc1_b: next()?,
            fc2_w: next()?,
            fc2_b: next()?,
        })
    }
    fn all(&self) -> [&Buf; 16] {
        let p = self;
        [
            &p.ln1_w, &p.ln1_b, &p.wq, &p.bq, &p.wk, &p.bk, &p.wv, &p.bv, &p.wo, &p.bo, &p.ln2_w, &p.ln2_b, &p.fc1_w,
            &p.fc1_b, &p.fc2_w, &p.fc2_b,
        ]
    }
    fn all_mut(&mut self) -> [&mut Buf; 16] {
        let ClipLayer { ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b } = self;
        [ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b]
    }
}

/// The tower's parameters, or their f32 gradients (then only the layers that run, no post-LN).
pub struct ClipParams {
    pub class_emb: Buf, // [D]
    pub patch: Buf,     // [D, C·P·P] (the checkpoint's [D, C, P, P])
    pub pos: Buf,       // [g²+1, D]
    pub pre_w: Buf,     // [D]
    pub pre_b: Buf,     // [D]
    pub layers: Vec<ClipLayer>,
    /// post_layernorm (weight, bias): never used by LLaVA; None in a gradient set.
    pub post: Option<(Buf, Buf)>,
}

/// class, patch, pos, pre_layrnorm (w, b), then post_layernorm (w, b).
fn outer_refs(dims: &ClipDims) -> [ParamRef; 7] {
    let (d, p) = (dims.d, dims.patch);
    let e = format!("{PREFIX}embeddings.");
    [
        ParamRef::whole(&format!("{e}class_embedding"), &[d]),
        ParamRef::whole(&format!("{e}patch_embedding.weight"), &[d, dims.channels, p, p]),
        ParamRef::whole(&format!("{e}position_embedding.weight"), &[dims.seq(), d]),
        ParamRef::whole(&format!("{PREFIX}pre_layrnorm.weight"), &[d]),
        ParamRef::whole(&format!("{PREFIX}pre_layrnorm.bias"), &[d]),
        ParamRef::whole(&format!("{PREFIX}post_layernorm.weight"), &[d]),
        ParamRef::whole(&format!("{PREFIX}post_layernorm.bias"), &[d]),
    ]
}

impl ClipParams {
    /// Every tensor from `make`; with `grads`, only those that get a gradient.
    pub fn build(dims: &ClipDims, grads: bool, make: &mut dyn FnMut(&ParamRef) -> Result<Buf>) -> Result<Self> {
        let [rc, rp, rpos, rw, rb, rpw, rpb] = outer_refs(dims);
        let (class_emb, patch, pos, pre_w, pre_b) = (make(&rc)?, make(&rp)?, make(&rpos)?, make(&rw)?, make(&rb)?);
        let n = if grads { dims.feature_state } else { dims.layers };
        let layers = (0..n).map(|l| ClipLayer::build(&layer_refs(dims, l), make)).collect::<Result<Vec<_>>>()?;
        let post = if grads { None } else { Some((make(&rpw)?, make(&rpb)?)) };
        Ok(ClipParams { class_emb, patch, pos, pre_w, pre_b, layers, post })
    }

    /// Every present tensor with its checkpoint name. A gradient set's list is a prefix of the
    /// parameter set's (layers in order, post_layernorm last).
    pub fn entries(&self, dims: &ClipDims) -> Vec<(ParamRef, &Buf)> {
        let [rc, rp, rpos, rw, rb, rpw, rpb] = outer_refs(dims);
        let mut v =
            vec![(rc, &self.class_emb), (rp, &self.patch), (rpos, &self.pos), (rw, &self.pre_w), (rb, &self.pre_b)];
        for (l, layer) in self.layers.iter().enumerate() {
            v.extend(layer_refs(dims, l).into_iter().zip(layer.all()));
        }
        if let Some((w, b)) = &self.post {
            v.extend([(rpw, w), (rpb, b)]);
        }
        v
    }

    /// As `entries`, mutably.
    pub fn entries_mut(&mut self, dims: &ClipDims) -> Vec<(ParamRef, &mut Buf)> {
        let [rc, rp, rpos, rw, rb, rpw, rpb] = outer_refs(dims);
        let ClipParams { class_emb, patch, pos, pre_w, pre_b, layers, post } = self;
        let mut v = vec![(rc, class_emb), (rp, patch), (rpos, pos), (rw, pre_w), (rb, pre_b)];
        for (l, layer) in layers.iter_mut().enumerate() {
            v.extend(layer_refs(dims, l).into_iter().zip(layer.all_mut()));
        }
        if let Some((w, b)) = post.as_mut() {
            v.extend([(rpw, w), (rpb, b)]);
        }
        v
    }
}

/// What one layer's forward keeps for its backward (the input is kept by the caller).
struct ClipActs {
    mean1: Buf, // [T] f32
    rstd1: Buf, // [T] f32
    y1: Buf,    // [T, D]
    q: Buf,     // [T, D]
    k: Buf,
    v: Buf,
    att: Buf,   // [T, D]
    lse: Buf,   // [H, T] f32
    mid: Buf,   // [T, D]
    mean2: Buf, // [T] f32
    rstd2: Buf,
    y2: Buf, // [T, D]
    h: Buf,  // [T, I] fc1 output
    a: Buf,  // [T, I] quick_gelu(h)
}

impl ClipActs {
    fn new(dev: &Device, dims: &ClipDims, t: usize, dt: DType) -> Result<Self> {
        let (d, i) = (dims.d, dims.inter);
        let a = |n: usize| dev.zeros(dt, n);
        let f = |n: usize| dev.zeros_f32(n);
        Ok(ClipActs {
            mean1: f(t)?,
            rstd1: f(t)?,
            y1: a(t * d)?,
            q: a(t * d)?,
            k: a(t * d)?,
            v: a(t * d)?,
            att: a(t * d)?,
            lse: f(dims.heads * t)?,
            mid: a(t * d)?,
            mean2: f(t)?,
            rstd2: f(t)?,
            y2: a(t * d)?,
            h: a(t * i)?,
            a: a(t * i)?,
        })
    }
}

/// One encoder layer over `segs` (one segment per tile).
struct Layer<'a> {
    dims: &'a ClipDims,
    w: &'a ClipLayer,
    segs: &'a Varlen,
}

impl Layer<'_> {
    fn shape(&self) -> AttnShape {
        AttnShape::new(self.dims.heads, self.dims.heads, self.dims.head_dim, false)
    }

    /// out [T, D] = layer(x [T, D]); fills `a`.
    fn forward(&self, dev: &Device, out: &mut Buf, x: &Buf, a: &mut ClipActs) -> Result<()> {
        let (dm, w, t) = (self.dims, self.w, self.segs.total());
        let (d, i) = (dm.d, dm.inter);
        layernorm::fwd(
            dev,
            layernorm::Fwd { y: &mut a.y1, mean: &mut a.mean1, rstd: &mut a.rstd1, x, w: &w.ln1_w, b: &w.ln1_b },
            t,
            d,
            dm.eps,
        )?;
        matmul::linear_fwd(dev, &mut a.q, &a.y1, &w.wq, Some(&w.bq), matmul::Linear { t, din: d, dout: d })?;
        matmul::linear_fwd(dev, &mut a.k, &a.y1, &w.wk, Some(&w.bk), matmul::Linear { t, din: d, dout: d })?;
        matmul::linear_fwd(dev, &mut a.v, &a.y1, &w.wv, Some(&w.bv), matmul::Linear { t, din: d, dout: d })?;
        let o = attention::FwdOut { out: &mut a.att, lse: &mut a.lse };
        attention::fwd(dev, o, attention::Qkv { q: &a.q, k: &a.k, v: &a.v }, self.segs, &self.shape())?;
        matmul::linear_fwd(dev, &mut a.mid, &a.att, &w.wo, Some(&w.bo), matmul::Linear { t, din: d, dout: d })?;
        elementwise::add_inplace(dev, &mut a.mid, x, t * d)?;
        layernorm::fwd(
            dev,
            layernorm::Fwd {
                y: &mut a.y2,
                mean: &mut a.mean2,
                rstd: &mut a.rstd2,
                x: &a.mid,
                w: &w.ln2_w,
                b: &w.ln2_b,
            },
            t,
            d,
            dm.eps,
        )?;
        matmul::linear_fwd(dev, &mut a.h, &a.y2, &w.fc1_w, Some(&w.fc1_b), matmul::Linear { t, din: d, dout: i })?;
        act::gelu_fwd(dev, &mut a.a, &a.h, t * i, dm.act)?;
        matmul::linear_fwd(dev, out, &a.a, &w.fc2_w, Some(&w.fc2_b), matmul::Linear { t, din: i, dout: d })?;
        elementwise::add_inplace(dev, out, &a.mid, t * d)
    }

    /// dx [T, D] (=) from dout; parameter gradients accumulate into `g`.
    fn backward(&self, dev: &Device, dx: &mut Buf, g: &mut ClipLayer, dout: &Buf, x: &Buf, a: &ClipActs) -> Result<()> {
        let (dm, w, t, dt) = (self.dims, self.w, self.segs.total(), dout.dtype());
        let (d, i) = (dm.d, dm.inter);
        // MLP.
        let mut da = dev.zeros(dt, t * i)?;
        matmul::linear_bwd(
            dev,
            matmul::LinearGrads { dx: Some(&mut da), dw: &mut g.fc2_w, db: Some(&mut g.fc2_b) },
            dout,
            &a.a,
            &w.fc2_w,
            matmul::Linear { t, din: i, dout: d },
        )?;
        let mut dh = dev.zeros(dt, t * i)?;
        act::gelu_bwd(dev, &mut dh, &da, &a.h, t * i, dm.act)?;
        drop(da);
        let mut dy = dev.zeros(dt, t * d)?;
        matmul::linear_bwd(
            dev,
            matmul::LinearGrads { dx: Some(&mut dy), dw: &mut g.fc1_w, db: Some(&mut g.fc1_b) },
            &dh,
            &a.y2,
            &w.fc1_w,
            matmul::Linear { t, din: d, dout: i },
        )?;
        drop(dh);
        let mut dmid = dev.zeros(dt, t * d)?;
        layernorm::bwd(
            dev,
            layernorm::Bwd {
                dx: &mut dmid,
                dw: &mut g.ln2_w,
                db: &mut g.ln2_b,
                dy: &dy,
                x: &a.mid,
                w: &w.ln2_w,
                mean: &a.mean2,
                rstd: &a.rstd2,
            },
            t,
            d,
        )?;
        elementwise::add_inplace(dev, &mut dmid, dout, t * d)?;
        // Attention.
        let mut datt = dev.zeros(dt, t * d)?;
        matmul::linear_bwd(
            dev,
            matmul::LinearGrads { dx: Some(&mut datt), dw: &mut g.wo, db: Some(&mut g.bo) },
            &dmid,
            &a.att,
            &w.wo,
            matmul::Linear { t, din: d, dout: d },
        )?;
        let (mut dq, mut dk, mut dv) = (dev.zeros(dt, t * d)?, dev.zeros(dt, t * d)?, dev.zeros(dt, t * d)?);
        let saved = attention::FwdSaved { q: &a.q, k: &a.k, v: &a.v, out: &a.att, lse: &a.lse };
        let grads = attention::QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv };
        attention::bwd(dev, grads, &datt, saved, self.segs, &self.shape())?;
        let mut tmp = datt; // reuse [T, D]
        matmul::linear_bwd(
            dev,
            matmul::LinearGrads { dx: Some(&mut dy), dw: &mut g.wq, db: Some(&mut g.bq) },
            &dq,
            &a.y1,
            &w.wq,
            matmul::Linear { t, din: d, dout: d },
        )?;
        matmul::linear_bwd(
            dev,
            matmul::LinearGrads { dx: Some(&mut tmp), dw: &mut g.wk, db: Some(&mut g.bk) },
            &dk,
            &a.y1,
            &w.wk,
            matmul::Linear { t, din: d, dout: d },
        )?;
        elementwise::add_inplace(dev, &mut dy, &tmp, t * d)?;
        matmul::linear_bwd(
            dev,
            matmul::LinearGrads { dx: Some(&mut tmp), dw: &mut g.wv, db: Some(&mut g.bv) },
            &dv,
            &a.y1,
            &w.wv,
            matmul::Linear { t, din: d, dout: d },
        )?;
        elementwise::add_inplace(dev, &mut dy, &tmp, t * d)?;
        layernorm::bwd(
            dev,
            layernorm::Bwd {
                dx,
                dw: &mut g.ln1_w,
                db: &mut g.ln1_b,
                dy: &dy,
                x,
                w: &w.ln1_w,
                mean: &a.mean1,
                rstd: &a.rstd1,
            },
            t,
            d,
        )?;
        elementwise::add_inplace(dev, dx, &dmid, t * d)
    }
}

/// pixel_values [tiles, C, S, S] → flattened patches [tiles·g², C·P·P], each row in the conv
/// weight's (c, py, px) order, patches in row-major order within a tile.
pub fn patchify(pixels: &[f32], tiles: usize, dims: &ClipDims) -> Result<Vec<f32>> {
    let (c, p, s, g) = (dims.channels, dims.patch, dims.image_size, dims.g);
    if pixels.len() != tiles * dims.tile_len() {
        bail!("CLIP: pixel_values has {} values, expected {tiles} tiles × {c}×{s}×{s}", pixels.len());
    }
    let k = dims.patch_dim();
    let mut out = vec![0f32; tiles * g * g * k];
    for t in 0..tiles {
        for gy in 0..g {
            for gx in 0..g {
                let row = &mut out[((t * g + gy) * g + gx) * k..][..k];
                for ch in 0..c {
                    for py in 0..p {
                        let src = ((t * c + ch) * s + gy * p + py) * s + gx * p;
                        row[(ch * p + py) * p..][..p].copy_from_slice(&pixels[src..src + p]);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// What the tower's forward keeps for its backward.
pub struct ClipFwd {
    pub tiles: usize,
    patches: Buf,                // [tiles·g², C·P·P] f32
    patch_rows: RowIndex,        // [tiles·g²] rows of the patch tokens in [tiles·(g²+1)]
    cls_rows: RowIndex,          // [tiles] the CLS rows
    segs: Varlen,                // one segment of g²+1 tokens per tile
    emb: Buf,                    // [T, D] input of pre_layrnorm
    pre_mean: Buf,               // [T] f32
    pre_rstd: Buf,               // [T] f32
    hs: Vec<Buf>,                // feature_state + 1 hidden states [T, D]
    acts: Vec<Option<ClipActs>>, // None: recompute in backward
}

impl ClipFwd {
    fn layer<'a>(&'a self, dims: &'a ClipDims, p: &'a ClipParams, l: usize) -> Layer<'a> {
        Layer { dims, w: &p.layers[l], segs: &self.segs }
    }
}

/// Patch features [tiles·g², D] (CLS dropped) of `tiles` tile images `pixels` [tiles, C, S, S],
/// and the saved state; with `recompute` the layers keep only their inputs.
pub fn forward(
    dev: &Device, dims: &ClipDims, p: &ClipParams, pixels: &[f32], tiles: usize, recompute: bool,
) -> Result<(Buf, ClipFwd)> {
    if tiles == 0 {
        bail!("CLIP: no tiles");
    }
    let (d, seq, gg, k, dt) = (dims.d, dims.seq(), dims.g * dims.g, dims.patch_dim(), p.patch.dtype());
    let (n, t) = (tiles * gg, tiles * seq);
    let patches = dev.upload(&patchify(pixels, tiles, dims)?, DType::F32)?;
    let patch_rows =
        RowIndex::new(dev, &(0..tiles).flat_map(|i| (1..seq).map(move |j| i * seq + j)).collect::<Vec<_>>(), t)?;
    let cls_rows = RowIndex::new(dev, &(0..tiles).map(|i| i * seq).collect::<Vec<_>>(), t)?;
    // Embeddings: patch GEMM rows and the class token placed per tile, plus positions.
    let mut emb = dev.zeros(dt, t * d)?;
    let mut pe = dev.zeros(dt, n * d)?;
    patch_embed::fwd(dev, &mut pe, &patches, &p.patch, None, patch_embed::Dims { n, k, d })?;
    scatter_rows(dev, &mut emb, &pe, &patch_rows, d)?;
    let mut cls = dev.zeros(dt, tiles * d)?;
    elementwise::bias_add(dev, &mut cls, &p.class_emb, tiles, d)?;
    scatter_rows(dev, &mut emb, &cls, &cls_rows, d)?;
    elementwise::bias_add(dev, &mut emb, &p.pos, tiles, seq * d)?;
    let mut h0 = dev.zeros(dt, t * d)?;
    let (mut pre_mean, mut pre_rstd) = (dev.zeros_f32(t)?, dev.zeros_f32(t)?);
    layernorm::fwd(
        dev,
        layernorm::Fwd { y: &mut h0, mean: &mut pre_mean, rstd: &mut pre_rstd, x: &emb, w: &p.pre_w, b: &p.pre_b },
        t,
        d,
        dims.eps,
    )?;
    let segs = Varlen::uniform(dev, tiles, seq)?;
    let mut f =
        ClipFwd { tiles, patches, patch_rows, cls_rows, segs, emb, pre_mean, pre_rstd, hs: vec![h0], acts: Vec::new() };
    if p.layers.len() < dims.feature_state {
        bail!("CLIP: {} layers loaded, the feature layer needs {}", p.layers.len(), dims.feature_state);
    }
    for l in 0..dims.feature_state {
        let mut acts = ClipActs::new(dev, dims, t, dt)?;
        let mut out = dev.zeros(dt, t * d)?;
        f.layer(dims, p, l).forward(dev, &mut out, &f.hs[l], &mut acts)?;
        f.hs.push(out);
        f.acts.push(if recompute { None } else { Some(acts) });
    }
    let mut feats = dev.zeros(dt, n * d)?;
    gather_rows(dev, &mut feats, &f.hs[dims.feature_state], &f.patch_rows, d)?;
    Ok((feats, f))
}

/// Accumulates the tower's gradients into `g` (a gradient set: `ClipParams::build` with
/// `grads`) from d features [tiles·g², D].
pub fn backward(
    dev: &Device, dims: &ClipDims, p: &ClipParams, g: &mut ClipParams, f: &ClipFwd, dfeat: &Buf,
) -> Result<()> {
    let (d, seq, gg, k, dt) = (dims.d, dims.seq(), dims.g * dims.g, dims.patch_dim(), p.patch.dtype());
    let (tiles, n, t) = (f.tiles, f.tiles * gg, f.tiles * seq);
    if g.layers.len() < dims.feature_state {
        bail!("CLIP backward: gradient set has {} layers, {} ran", g.layers.len(), dims.feature_state);
    }
    // The CLS rows of the selected state were dropped: their gradient is 0.
    let mut dx = dev.zeros(dt, t * d)?;
    scatter_rows(dev, &mut dx, dfeat, &f.patch_rows, d)?;
    let mut din = dev.zeros(dt, t * d)?;
    for l in (0..dims.feature_state).rev() {
        let layer = f.layer(dims, p, l);
        let recomputed;
        let acts = match &f.acts[l] {
            Some(a) => a,
            None => {
                let mut a = ClipActs::new(dev, dims, t, dt)?;
                let mut scratch = dev.zeros(dt, t * d)?;
                layer.forward(dev, &mut scratch, &f.hs[l], &mut a)?;
                recomputed = a;
                &recomputed
            }
        };
        layer.backward(dev, &mut din, &mut g.layers[l], &dx, &f.hs[l], acts)?;
        std::mem::swap(&mut dx, &mut din);
    }
    let mut demb = din; // reuse [T, D]
    layernorm::bwd(
        dev,
        layernorm::Bwd {
            dx: &mut demb,
            dw: &mut g.pre_w,
            db: &mut g.pre_b,
            dy: &dx,
            x: &f.emb,
            w: &p.pre_w,
            mean: &f.pre_mean,
            rstd: &f.pre_rstd,
        },
        t,
        d,
    )?;
    elementwise::bias_bwd(dev, &mut g.pos, &demb, tiles, seq * d)?;
    let mut dcls = dev.zeros(dt, tiles * d)?;
    gather_rows(dev, &mut dcls, &demb, &f.cls_rows, d)?;
    elementwise::bias_bwd(dev, &mut g.class_emb, &dcls, tiles, d)?;
    let mut dpe = dev.zeros(dt, n * d)?;
    gather_rows(dev, &mut dpe, &demb, &f.patch_rows, d)?;
    patch_embed::bwd(dev, &mut g.patch, &dpe, &f.patches, None, patch_embed::Dims { n, k, d })
}

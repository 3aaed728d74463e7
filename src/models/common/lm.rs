//! The decoder-only language model shared by Qwen2.5-VL's Qwen2 and LLaVA-NeXT's Mistral / Llama
//! (model-spec A5, A7, B7): token embedding, vision rows written over the image-placeholder
//! positions, `n_layers` blocks (common::decoder), final RMSNorm and an lm_head (untied, or tied
//! to the embedding). Forward and explicit backward over packed sequences (`cu_seqlens`), with a
//! per-layer activation-checkpointing switch, plus incremental prefill / decode over per-layer
//! KV caches for rollouts.
//!
//! The head is left to the caller: `final_hidden` [S, D] feeds `ops::logprob` (log p(target)
//! without [S, V] logits, and its fused backward) or `logits` (a plain lm_head GEMM); the caller
//! then passes d final_hidden to `backward`.
//!
//! LoRA: `lora` holds one `LayerLora` per layer (an empty slice: none); with the base frozen
//! (`g` None in `backward`) only the adapters get gradients.

use super::decoder::{
    norm_bwd, stack_backward, stack_backward_stepped, stack_forward, Block, LayerActs, LayerDims, LayerFlags,
    LayerParams, NormBwd, RopeKind, RopeTable, Saved, Slot, StackCtx,
};
use super::lora::LayerLora;
use super::params::ParamRef;
use crate::ops::attention::{KvCache, Varlen};
use crate::ops::patch_embed::{scatter_rows, take_rows, RowIndex};
use crate::ops::{embedding, matmul, rmsnorm};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};

/// Sizes, biases and RoPE of a decoder LM.
#[derive(Clone, Debug, PartialEq)]
pub struct LmDims {
    pub layer: LayerDims,
    pub flags: LayerFlags,
    pub n_layers: usize,
    pub vocab: usize,
    pub rope: RopeKind,
    /// lm_head shares the embedding matrix (no `lm_head.weight` in the checkpoint).
    pub tied: bool,
}

/// Checkpoint names: `{prefix}embed_tokens.weight`, `{prefix}layers.{i}.…`, `{prefix}norm.weight`
/// and the lm_head's full name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LmNames {
    pub prefix: String,
    pub lm_head: String,
}

impl LmNames {
    /// The checkpoint tensor of slot `s` of layer `i`.
    pub fn layer(&self, dims: &LmDims, i: usize, s: Slot) -> ParamRef {
        let (d, q, kv, inter) = (dims.layer.d, dims.layer.q_dim(), dims.layer.kv_dim(), dims.layer.inter);
        let p = format!("{}layers.{i}.", self.prefix);
        let (suffix, shape): (&str, Vec<usize>) = match s {
            Slot::Ln1 => ("input_layernorm.weight", vec![d]),
            Slot::Ln2 => ("post_attention_layernorm.weight", vec![d]),
            Slot::Wq => ("self_attn.q_proj.weight", vec![q, d]),
            Slot::Bq => ("self_attn.q_proj.bias", vec![q]),
            Slot::Wk => ("self_attn.k_proj.weight", vec![kv, d]),
            Slot::Bk => ("self_attn.k_proj.bias", vec![kv]),
            Slot::Wv => ("self_attn.v_proj.weight", vec![kv, d]),
            Slot::Bv => ("self_attn.v_proj.bias", vec![kv]),
            Slot::Wo => ("self_attn.o_proj.weight", vec![d, q]),
            Slot::Bo => ("self_attn.o_proj.bias", vec![d]),
            Slot::Wg => ("mlp.gate_proj.weight", vec![inter, d]),
            Slot::Bg => ("mlp.gate_proj.bias", vec![inter]),
            Slot::Wu => ("mlp.up_proj.weight", vec![inter, d]),
            Slot::Bu => ("mlp.up_proj.bias", vec![inter]),
            Slot::Wd => ("mlp.down_proj.weight", vec![d, inter]),
            Slot::Bd => ("mlp.down_proj.bias", vec![d]),
        };
        ParamRef::whole(&format!("{p}{suffix}"), &shape)
    }
    /// embed, norm, lm_head.
    fn outer(&self, dims: &LmDims) -> [ParamRef; 3] {
        let (v, d) = (dims.vocab, dims.layer.d);
        [
            ParamRef::whole(&format!("{}embed_tokens.weight", self.prefix), &[v, d]),
            ParamRef::whole(&format!("{}norm.weight", self.prefix), &[d]),
            ParamRef::whole(&self.lm_head, &[v, d]),
        ]
    }
}

/// The LM's parameters (or their f32 gradients).
pub struct LmParams {
    pub embed: Buf, // [V, D]
    pub layers: Vec<LayerParams>,
    pub norm: Buf,            // [D]
    pub lm_head: Option<Buf>, // [V, D]; None when tied
}

impl LmParams {
    pub fn build(dims: &LmDims, names: &LmNames, make: &mut dyn FnMut(&ParamRef) -> Result<Buf>) -> Result<Self> {
        let [r_embed, r_norm, r_head] = names.outer(dims);
        let embed = make(&r_embed)?;
        let mut layers = Vec::with_capacity(dims.n_layers);
        for i in 0..dims.n_layers {
            layers.push(LayerParams::build(&dims.layer, dims.flags, &mut |s, _| make(&names.layer(dims, i, s)))?);
        }
        let norm = make(&r_norm)?;
        let lm_head = if dims.tied { None } else { Some(make(&r_head)?) };
        Ok(LmParams { embed, layers, norm, lm_head })
    }

    /// The tensors outside the decoder layers only (embedding, final norm, head; `layers`
    /// empty): the gradient set of the per-layer optimizer step.
    pub fn build_outer(dims: &LmDims, names: &LmNames, make: &mut dyn FnMut(&ParamRef) -> Result<Buf>) -> Result<Self> {
        let [r_embed, r_norm, r_head] = names.outer(dims);
        let embed = make(&r_embed)?;
        let norm = make(&r_norm)?;
        let lm_head = if dims.tied { None } else { Some(make(&r_head)?) };
        Ok(LmParams { embed, layers: Vec::new(), norm, lm_head })
    }

    /// The lm_head matrix [V, D] (the embedding when tied).
    pub fn head(&self) -> &Buf {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
    pub fn head_mut(&mut self) -> &mut Buf {
        self.lm_head.as_mut().unwrap_or(&mut self.embed)
    }

    pub fn entries(&self, dims: &LmDims, names: &LmNames) -> Vec<(ParamRef, &Buf)> {
        let [r_embed, r_norm, r_head] = names.outer(dims);
        let mut v = vec![(r_embed, &self.embed)];
        for (i, l) in self.layers.iter().enumerate() {
            v.extend(l.all().into_iter().map(|(s, b)| (names.layer(dims, i, s), b)));
        }
        v.push((r_norm, &self.norm));
        if let Some(h) = &self.lm_head {
            v.push((r_head, h));
        }
        v
    }

    pub fn entries_mut(&mut self, dims: &LmDims, names: &LmNames) -> Vec<(ParamRef, &mut Buf)> {
        let [r_embed, r_norm, r_head] = names.outer(dims);
        let LmParams { embed, layers, norm, lm_head } = self;
        let mut v = vec![(r_embed, embed)];
        for (i, l) in layers.iter_mut().enumerate() {
            v.extend(l.all_mut().into_iter().map(|(s, b)| (names.layer(dims, i, s), b)));
        }
        v.push((r_norm, norm));
        if let Some(h) = lm_head.as_mut() {
            v.push((r_head, h));
        }
        v
    }
}

/// Rows written over placeholder positions: `rows` [n, D] go to token positions `at`.
pub struct Inject<'a> {
    pub rows: &'a Buf,
    pub at: &'a [usize],
}

/// What every LM call passes the same way: sizes, weights and the layers' adapters (an empty
/// slice: none).
#[derive(Clone, Copy)]
pub struct Lm<'a> {
    pub dims: &'a LmDims,
    pub p: &'a LmParams,
    pub lora: &'a [LayerLora],
}

/// Tokens into the LM: ids, their RoPE positions (layout per `dims.rope`) and the rows written
/// over their placeholder positions.
pub struct Tokens<'a> {
    pub ids: &'a [i32],
    pub pos: &'a [i32],
    pub inject: Option<Inject<'a>>,
}

/// Where `Lm::backward` accumulates: the base gradients (None: the base is frozen and no base
/// gradient is computed) and the adapters' (None: no trained adapters).
#[derive(Default)]
pub struct LmGrads<'g> {
    pub base: Option<&'g mut LmParams>,
    pub lora: Option<&'g mut [LayerLora]>,
}

/// The LM of a full fine-tune with the per-layer optimizer step (`backward_stepped`): weights
/// `p` (updated layer by layer) and `g`, the embedding, final-norm and head gradients
/// (`LmParams::build_outer`).
pub struct Stepped<'a> {
    pub dims: &'a LmDims,
    pub names: &'a LmNames,
    pub p: &'a mut LmParams,
    pub g: &'a mut LmParams,
}

/// What the LM forward keeps for its backward.
pub struct LmFwd {
    ids: Buf, // [S] i32
    ids_host: Vec<i32>,
    seqs: Varlen,
    rope: RopeTable,
    inject: Option<RowIndex>,
    hs: Vec<Buf>,                 // n_layers + 1 residual streams [S, D]
    acts: Vec<Option<LayerActs>>, // None: recompute in backward
    rstd_f: Buf,                  // [S] f32
    xf: Buf,                      // [S, D] after the final norm
}

impl LmFwd {
    /// Tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.ids_host.len()
    }
    /// The final-norm hidden states [S, D] that the lm_head reads.
    pub fn final_hidden(&self) -> &Buf {
        &self.xf
    }
    /// Injected rows replaced their token embeddings: takes their rows [n, D] out of dx [S, D]
    /// (their gradient goes to the vision side only); None without injection.
    fn take_injected(&self, dev: &Device, dx: &mut Buf, dt: DType, d: usize) -> Result<Option<Buf>> {
        match &self.inject {
            Some(at) => {
                let mut rows = dev.zeros(dt, at.len() * d)?;
                take_rows(dev, &mut rows, dx, at, d)?;
                Ok(Some(rows))
            }
            None => Ok(None),
        }
    }
    /// Scales the final hidden states (by 1/T for log-probs at temperature T); the backward
    /// reads the residual streams, not these, so it stays valid.
    pub fn scale_final_hidden(&mut self, dev: &Device, s: f32) -> Result<()> {
        let n = self.xf.len();
        crate::ops::elementwise::scale_inplace(dev, &mut self.xf, s, n)
    }
}

/// Embeds `ids` [S] and writes `inject` rows over their positions (placeholder tokens).
fn embed(
    dev: &Device, dims: &LmDims, p: &LmParams, ids: &Buf, ids_host: &[i32], inject: Option<(&Buf, &RowIndex)>,
) -> Result<Buf> {
    let mut x = dev.zeros(p.embed.dtype(), ids_host.len() * dims.layer.d)?;
    embed_into(dev, dims, p, &mut x, ids, ids_host, inject)?;
    Ok(x)
}

/// `embed` into x [S, D].
pub(super) fn embed_into(
    dev: &Device, dims: &LmDims, p: &LmParams, x: &mut Buf, ids: &Buf, ids_host: &[i32],
    inject: Option<(&Buf, &RowIndex)>,
) -> Result<()> {
    let (s, d) = (ids_host.len(), dims.layer.d);
    embedding::fwd(dev, x, &p.embed, ids, Some(ids_host), embedding::Dims { t: s, c: d, v: dims.vocab })?;
    if let Some((rows, at)) = inject {
        scatter_rows(dev, x, rows, at, d)?;
    }
    Ok(())
}

pub(super) fn inject_index(dev: &Device, inject: &Option<Inject>, s: usize) -> Result<Option<RowIndex>> {
    inject.as_ref().map(|i| RowIndex::new(dev, i.at, s)).transpose()
}

impl Lm<'_> {
    /// Forward over packed sequences: ids [S], RoPE positions `pos` (layout per `dims.rope`),
    /// `cu_seqlens` [nseq + 1]. `recompute[l]` (missing = false) keeps only layer l's input.
    pub fn forward(&self, dev: &Device, x: Tokens, cu_seqlens: &[i32], recompute: &[bool]) -> Result<LmFwd> {
        let (Lm { dims, p, lora }, Tokens { ids, pos, inject }) = (*self, x);
        let (s, d, dt) = (ids.len(), dims.layer.d, p.embed.dtype());
        let seqs = Varlen::new(dev, cu_seqlens)?;
        if seqs.total() != s {
            bail!("LM forward: cu_seqlens covers {} tokens, ids has {s}", seqs.total());
        }
        let rope = dims.rope.upload(dev, pos, s, dims.layer.head_dim)?;
        let inject_idx = inject_index(dev, &inject, s)?;
        let ids_buf = dev.upload_i32(ids)?;
        let x0 =
            embed(dev, dims, p, &ids_buf, ids, inject.as_ref().zip(inject_idx.as_ref()).map(|(i, r)| (i.rows, r)))?;
        let mut f = LmFwd {
            ids: ids_buf,
            ids_host: ids.to_vec(),
            seqs,
            rope,
            inject: inject_idx,
            hs: vec![x0],
            acts: Vec::new(),
            rstd_f: dev.zeros_f32(s)?,
            xf: dev.zeros(dt, s * d)?,
        };
        let (rope, segs) = (&f.rope, &f.seqs);
        let block =
            |l: usize| Block { dims: &dims.layer, w: &p.layers[l], rope, segs, causal: true, lora: lora.get(l) };
        f.acts = stack_forward(dev, dims.n_layers, &block, &mut f.hs, &|l| recompute.get(l).copied().unwrap_or(false))?;
        rmsnorm::fwd(
            dev,
            rmsnorm::Fwd { y: &mut f.xf, rstd: &mut f.rstd_f, x: &f.hs[dims.n_layers], w: &p.norm },
            s,
            d,
            dims.layer.eps,
        )?;
        Ok(f)
    }

    /// `logits` of this LM.
    pub fn logits(&self, dev: &Device, hidden: &Buf, t: usize) -> Result<Buf> {
        logits(dev, self.dims, self.p, hidden, t)
    }

    /// Accumulates every parameter gradient into `g.base` from d final_hidden [S, D]; returns the
    /// gradient of the injected rows [n, D] (None without injection). The lm_head's own gradient
    /// comes from the head op (e.g. `ops::logprob::bwd` into `head_mut()`). With `g.base` None
    /// the base is frozen (no base gradient is computed); `g.lora` takes the adapters' (`lora` as
    /// in the forward).
    pub fn backward(&self, dev: &Device, g: LmGrads, f: &LmFwd, dxf: &Buf) -> Result<Option<Buf>> {
        let (Lm { dims, p, lora }, LmGrads { base: mut g, lora: lora_grads }) = (*self, g);
        let (s, d, dt) = (f.tokens(), dims.layer.d, p.embed.dtype());
        let mut dx = dev.zeros(dt, s * d)?;
        let norm = NormBwd { dx: &mut dx, dy: dxf, x: &f.hs[dims.n_layers], w: &p.norm, rstd: &f.rstd_f };
        norm_bwd(dev, g.as_deref_mut().map(|g| &mut g.norm), norm, s, d)?;
        let block = |l: usize| Block {
            dims: &dims.layer,
            w: &p.layers[l],
            rope: &f.rope,
            segs: &f.seqs,
            causal: true,
            lora: lora.get(l),
        };
        let mut dx =
            stack_backward(dev, &block, &f.hs, &f.acts, g.as_deref_mut().map(|g| &mut g.layers[..]), lora_grads, dx)?;
        let d_inject = f.take_injected(dev, &mut dx, dt, d)?;
        if let Some(g) = g {
            embedding::bwd(
                dev,
                &mut g.embed,
                &dx,
                &f.ids,
                Some(&f.ids_host),
                embedding::Dims { t: s, c: d, v: dims.vocab },
            )?;
        }
        Ok(d_inject)
    }

    /// Runs `n_new` new tokens of each cached sequence (ids [batch·n_new], sequence-major, with
    /// RoPE positions `pos` for them) through the LM, appending their keys and values; returns the
    /// final-norm hidden states [batch·n_new, D]. Used for prefill, appended turns and decoding.
    pub fn extend(&self, dev: &Device, cache: &mut LmCache, x: Tokens, n_new: usize) -> Result<Buf> {
        let (Lm { dims, p, lora }, Tokens { ids, pos, inject }) = (*self, x);
        let (t, d, dt) = (ids.len(), dims.layer.d, p.embed.dtype());
        if n_new == 0 || t != cache.batch * n_new {
            bail!("LM extend: {t} ids for {} sequences of {n_new} new tokens", cache.batch);
        }
        let rope = dims.rope.upload(dev, pos, t, dims.layer.head_dim)?;
        let inject_idx = inject_index(dev, &inject, t)?;
        let ids_buf = dev.upload_i32(ids)?;
        let mut x =
            embed(dev, dims, p, &ids_buf, ids, inject.as_ref().zip(inject_idx.as_ref()).map(|(i, r)| (i.rows, r)))?;
        let no_segs = Varlen::new(dev, &[0, t as i32])?;
        let mut out = dev.zeros(dt, t * d)?;
        for (l, kv) in cache.layers.iter_mut().enumerate() {
            let blk = Block {
                dims: &dims.layer,
                w: &p.layers[l],
                rope: &rope,
                segs: &no_segs,
                causal: true,
                lora: lora.get(l),
            };
            blk.forward_cached(dev, &mut out, &x, kv, n_new)?;
            std::mem::swap(&mut x, &mut out);
        }
        let mut rstd = dev.zeros_f32(t)?;
        rmsnorm::fwd(dev, rmsnorm::Fwd { y: &mut out, rstd: &mut rstd, x: &x, w: &p.norm }, t, d, dims.layer.eps)?;
        Ok(out)
    }
}

/// logits [t, V] = hidden [t, D] · lm_headᵀ (f32 on the CPU, the activation dtype on CUDA).
pub fn logits(dev: &Device, dims: &LmDims, p: &LmParams, hidden: &Buf, t: usize) -> Result<Buf> {
    let mut out = dev.zeros(hidden.dtype(), t * dims.vocab)?;
    matmul::linear_fwd(
        dev,
        &mut out,
        hidden,
        p.head(),
        None,
        matmul::Linear { t, din: dims.layer.d, dout: dims.vocab },
    )?;
    Ok(out)
}

/// What the per-layer step receives: (checkpoint piece, weight, final gradient) of some tensors.
pub type StepFn<'f> = dyn FnMut(Vec<(ParamRef, &mut Buf, &Buf)>) -> Result<()> + 'f;

/// `Lm::backward` of a full fine-tune with the per-layer optimizer step: `s.g` holds the
/// embedding, final-norm and head gradients (`build_outer`), `gl` one layer's gradient (zeroed),
/// reused for every layer; `step` updates each layer as soon as its backward is done. The same
/// ops in the same order as `backward`, so every gradient is bit-identical to the whole-model
/// one. Stepping `s.g` is the caller's (after the vision side). Returns the injected rows'
/// gradient.
pub fn backward_stepped(
    dev: &Device, s: Stepped, gl: &mut LayerParams, f: &LmFwd, dxf: &Buf, step: &mut StepFn,
) -> Result<Option<Buf>> {
    let Stepped { dims, names, p, g } = s;
    if !g.layers.is_empty() {
        bail!("per-layer step: the gradient set holds every layer (zero the gradients in the per-layer layout)");
    }
    let (s, d, dt) = (f.tokens(), dims.layer.d, p.embed.dtype());
    let mut dx = dev.zeros(dt, s * d)?;
    rmsnorm::bwd(
        dev,
        rmsnorm::Bwd { dx: &mut dx, dw: &mut g.norm, dy: dxf, x: &f.hs[dims.n_layers], w: &p.norm, rstd: &f.rstd_f },
        s,
        d,
    )?;
    let ctx = StackCtx { dims: &dims.layer, rope: &f.rope, segs: &f.seqs, causal: true };
    let mut per_layer = |l: usize, w: &mut LayerParams, gr: &LayerParams| {
        let pg = w.all_mut().into_iter().zip(gr.all()).map(|((sl, pw), (_, gb))| (names.layer(dims, l, sl), pw, gb));
        step(pg.collect())
    };
    let saved = Saved { hs: &f.hs, acts: &f.acts };
    let mut dx = stack_backward_stepped(dev, &ctx, saved, &mut p.layers, gl, &mut per_layer, dx)?;
    let d_inject = f.take_injected(dev, &mut dx, dt, d)?;
    embedding::bwd(dev, &mut g.embed, &dx, &f.ids, Some(&f.ids_host), embedding::Dims { t: s, c: d, v: dims.vocab })?;
    Ok(d_inject)
}

/// Per-layer KV caches of `batch` sequences for incremental decoding.
pub struct LmCache {
    pub layers: Vec<KvCache>,
    pub batch: usize,
}

impl LmCache {
    /// Caches in `dt` (the weights' dtype).
    pub fn new(dev: &Device, dims: &LmDims, dt: DType, batch: usize, max_len: usize) -> Result<Self> {
        let l = &dims.layer;
        // k and v per layer; checked before the first one is allocated.
        let per_layer = [batch, max_len, l.kv_heads, l.head_dim, dt.size(), 2]
            .iter()
            .try_fold(1u64, |a, &x| a.checked_mul(x as u64));
        let bytes = per_layer.and_then(|b| b.checked_mul(dims.n_layers as u64)).unwrap_or(u64::MAX);
        crate::models::limits::ensure_fits(dev, bytes, &|| {
            format!("a KV cache of {batch} sequences × {max_len} tokens × {} layers", dims.n_layers)
        })?;
        let layers = (0..dims.n_layers)
            .map(|_| KvCache::with_dtype(dev, dt, batch, max_len, l.kv_heads, l.head_dim))
            .collect::<Result<Vec<_>>>()?;
        Ok(LmCache { layers, batch })
    }
    /// Tokens cached per sequence.
    pub fn lens(&self) -> &[i32] {
        self.layers.first().map_or(&[], |c| c.lens())
    }
    /// Gives sequence `dst` the first `len` cached tokens of `src`, in every layer.
    pub fn copy_prefix(&mut self, dev: &Device, src: usize, dst: usize, len: usize) -> Result<()> {
        self.layers.iter_mut().try_for_each(|c| c.copy_prefix(dev, src, dst, len))
    }
    /// Empties sequence b (its slot is free for another rollout).
    pub fn reset(&mut self, dev: &Device, b: usize) -> Result<()> {
        self.layers.iter_mut().try_for_each(|c| c.truncate(dev, b, 0))
    }
}

/// The injection of `rows` at `at`, with their counts checked.
pub fn inject_checked<'a>(at: &'a [usize], rows: Option<&'a Buf>, d: usize) -> Result<Option<Inject<'a>>> {
    match rows {
        Some(r) if r.len() == at.len() * d => Ok(Some(Inject { rows: r, at })),
        Some(r) => {
            bail!("rollout step: {} image rows of width {d} for {} placeholder tokens", r.len() / d.max(1), at.len())
        }
        None if at.is_empty() => Ok(None),
        None => bail!("rollout step: {} image placeholder tokens but no image embeddings", at.len()),
    }
}

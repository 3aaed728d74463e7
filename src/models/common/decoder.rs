//! The pre-norm transformer block shared by the Qwen2 / Llama / Mistral text decoders and the
//! Qwen2.5-VL vision tower (model-spec A4.6, A7, B7), forward and explicit backward (llm.c style):
//!
//! ```text
//! y1 = RMSNorm(x; ln1)                q = y1·Wqᵀ(+bq)  k = y1·Wkᵀ(+bk)  v = y1·Wvᵀ(+bv)
//! q, k rotated (RoPE table given)     a = attention(q, k, v) over segments (causal or not, GQA)
//! m  = x + a·Woᵀ(+bo)                 y2 = RMSNorm(m; ln2)
//! out = m + (silu(y2·Wgᵀ(+bg)) · (y2·Wuᵀ(+bu)))·Wdᵀ(+bd)
//! ```
//! Flags choose the biases (Qwen2 text: q/k/v only; Qwen vision: all; Llama/Mistral: none); the
//! RoPE kind only changes the cos/sin table (`RopeKind::table`). The forward keeps what the
//! backward needs in `LayerActs`; `stack_forward` / `stack_backward` run a stack of blocks with a
//! per-layer activation-checkpointing switch (keep only the layer input, rerun the forward
//! before its backward). Activations take the weights' dtype. Incremental decoding
//! (`forward_cached`) appends k, v to the layer's `attention::KvCache` and attends over it.
//!
//! A block may carry LoRA adapters (common::lora): each adapted projection adds its low-rank
//! branch (`ops::lora`) to the base product, in the forward and the backward; with the base
//! frozen (`LayerGrads::base` None) the backward skips the base dW GEMMs.

use super::lora::LayerLora;
use crate::ops::attention::{self, AttnShape, KvCache, Varlen};
use crate::ops::lora as lora_op;
use crate::ops::{act, elementwise, matmul, rmsnorm, rope};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};

/// Sizes of one block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerDims {
    pub d: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub eps: f32,
}

impl LayerDims {
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Which linear layers carry a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerFlags {
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
}

/// How positions become RoPE angles (all rotate pairs (i, i + D/2); see ops::rope).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeKind {
    /// Llama / Mistral / Qwen2 text: `pos` is [T].
    Text1d { theta: f32 },
    /// Qwen2.5-VL text: `pos` is [3, T] (t, h, w rows), frequencies split by `sections`.
    MRope { theta: f32, sections: Vec<usize> },
    /// Qwen2.5-VL vision: `pos` is [2, T] (h row, then w row).
    Vision2d { theta: f32 },
}

impl RopeKind {
    /// (cos, sin) host tables [tokens, head_dim/2] for `pos` laid out as the variant says.
    pub fn table(&self, pos: &[i32], tokens: usize, head_dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = match self {
            RopeKind::Text1d { .. } => 1,
            RopeKind::MRope { .. } => 3,
            RopeKind::Vision2d { .. } => 2,
        };
        if pos.len() != rows * tokens {
            bail!("rope positions: {} entries, expected {rows} x {tokens}", pos.len());
        }
        match self {
            RopeKind::Text1d { theta } => rope::table_1d(pos, head_dim, *theta),
            RopeKind::MRope { theta, sections } => rope::table_mrope(pos, tokens, head_dim, *theta, sections),
            RopeKind::Vision2d { theta } => rope::table_vision_2d(&pos[..tokens], &pos[tokens..], head_dim, *theta),
        }
    }

    /// The table uploaded to `dev` (f32).
    pub fn upload(&self, dev: &Device, pos: &[i32], tokens: usize, head_dim: usize) -> Result<RopeTable> {
        let (c, s) = self.table(pos, tokens, head_dim)?;
        let (cos, sin) = rope::upload_table(dev, &c, &s)?;
        Ok(RopeTable { cos, sin })
    }
}

/// cos, sin [tokens, head_dim/2] (f32) on the device.
pub struct RopeTable {
    pub cos: Buf,
    pub sin: Buf,
}

/// A block's parameters, or their f32 gradients (same shapes; absent biases are None).
pub struct LayerParams {
    pub ln1: Buf,        // [D]
    pub wq: Buf,         // [Hq·hd, D]
    pub bq: Option<Buf>, // [Hq·hd]
    pub wk: Buf,         // [Hkv·hd, D]
    pub bk: Option<Buf>, // [Hkv·hd]
    pub wv: Buf,         // [Hkv·hd, D]
    pub bv: Option<Buf>, // [Hkv·hd]
    pub wo: Buf,         // [D, Hq·hd]
    pub bo: Option<Buf>, // [D]
    pub ln2: Buf,        // [D]
    pub wg: Buf,         // [I, D]
    pub bg: Option<Buf>, // [I]
    pub wu: Buf,         // [I, D]
    pub bu: Option<Buf>, // [I]
    pub wd: Buf,         // [D, I]
    pub bd: Option<Buf>, // [D]
}

/// Names the tensors of a block (models map them to checkpoint names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    Ln1,
    Wq,
    Bq,
    Wk,
    Bk,
    Wv,
    Bv,
    Wo,
    Bo,
    Ln2,
    Wg,
    Bg,
    Wu,
    Bu,
    Wd,
    Bd,
}

impl LayerParams {
    /// The slots present under `flags`, with their shapes, in a fixed order.
    pub fn shapes(dims: &LayerDims, flags: LayerFlags) -> Vec<(Slot, Vec<usize>)> {
        let (d, q, kv, i) = (dims.d, dims.q_dim(), dims.kv_dim(), dims.inter);
        let mut v = vec![(Slot::Ln1, vec![d]), (Slot::Wq, vec![q, d])];
        if flags.qkv_bias {
            v.push((Slot::Bq, vec![q]));
        }
        v.push((Slot::Wk, vec![kv, d]));
        if flags.qkv_bias {
            v.push((Slot::Bk, vec![kv]));
        }
        v.push((Slot::Wv, vec![kv, d]));
        if flags.qkv_bias {
            v.push((Slot::Bv, vec![kv]));
        }
        v.push((Slot::Wo, vec![d, q]));
        if flags.o_bias {
            v.push((Slot::Bo, vec![d]));
        }
        v.push((Slot::Ln2, vec![d]));
        for (w, b, shape) in
            [(Slot::Wg, Slot::Bg, vec![i, d]), (Slot::Wu, Slot::Bu, vec![i, d]), (Slot::Wd, Slot::Bd, vec![d, i])]
        {
            let rows = shape[0];
            v.push((w, shape));
            if flags.mlp_bias {
                v.push((b, vec![rows]));
            }
        }
        v
    }

    /// Builds every present slot with `make(slot, shape)`.
    pub fn build(
        dims: &LayerDims, flags: LayerFlags, make: &mut dyn FnMut(Slot, &[usize]) -> Result<Buf>,
    ) -> Result<Self> {
        let mut got: Vec<(Slot, Buf)> = Vec::new();
        for (s, shape) in Self::shapes(dims, flags) {
            got.push((s, make(s, &shape)?));
        }
        let req = |got: &mut Vec<(Slot, Buf)>, s: Slot| {
            take_opt(got, s).ok_or_else(|| anyhow::anyhow!("layer tensor {s:?} missing"))
        };
        Ok(LayerParams {
            ln1: req(&mut got, Slot::Ln1)?,
            wq: req(&mut got, Slot::Wq)?,
            bq: take_opt(&mut got, Slot::Bq),
            wk: req(&mut got, Slot::Wk)?,
            bk: take_opt(&mut got, Slot::Bk),
            wv: req(&mut got, Slot::Wv)?,
            bv: take_opt(&mut got, Slot::Bv),
            wo: req(&mut got, Slot::Wo)?,
            bo: take_opt(&mut got, Slot::Bo),
            ln2: req(&mut got, Slot::Ln2)?,
            wg: req(&mut got, Slot::Wg)?,
            bg: take_opt(&mut got, Slot::Bg),
            wu: req(&mut got, Slot::Wu)?,
            bu: take_opt(&mut got, Slot::Bu),
            wd: req(&mut got, Slot::Wd)?,
            bd: take_opt(&mut got, Slot::Bd),
        })
    }

    /// f32 zeros of every present slot (a gradient accumulator).
    pub fn zeros_f32(dev: &Device, dims: &LayerDims, flags: LayerFlags) -> Result<Self> {
        Self::build(dims, flags, &mut |_, shape| dev.zeros_f32(shape.iter().product()))
    }

    /// Every present tensor, in `shapes` order.
    pub fn all(&self) -> Vec<(Slot, &Buf)> {
        let p = self;
        let v = [
            (Slot::Ln1, Some(&p.ln1)),
            (Slot::Wq, Some(&p.wq)),
            (Slot::Bq, p.bq.as_ref()),
            (Slot::Wk, Some(&p.wk)),
            (Slot::Bk, p.bk.as_ref()),
            (Slot::Wv, Some(&p.wv)),
            (Slot::Bv, p.bv.as_ref()),
            (Slot::Wo, Some(&p.wo)),
            (Slot::Bo, p.bo.as_ref()),
            (Slot::Ln2, Some(&p.ln2)),
            (Slot::Wg, Some(&p.wg)),
            (Slot::Bg, p.bg.as_ref()),
            (Slot::Wu, Some(&p.wu)),
            (Slot::Bu, p.bu.as_ref()),
            (Slot::Wd, Some(&p.wd)),
            (Slot::Bd, p.bd.as_ref()),
        ];
        v.into_iter().filter_map(|(s, b)| b.map(|b| (s, b))).collect()
    }

    /// The weight and bias of projection `s` (one of Wq, Wk, Wv, Wo, Wg, Wu, Wd).
    pub fn linear(&self, s: Slot) -> Result<(&Buf, Option<&Buf>)> {
        let p = self;
        Ok(match s {
            Slot::Wq => (&p.wq, p.bq.as_ref()),
            Slot::Wk => (&p.wk, p.bk.as_ref()),
            Slot::Wv => (&p.wv, p.bv.as_ref()),
            Slot::Wo => (&p.wo, p.bo.as_ref()),
            Slot::Wg => (&p.wg, p.bg.as_ref()),
            Slot::Wu => (&p.wu, p.bu.as_ref()),
            Slot::Wd => (&p.wd, p.bd.as_ref()),
            other => bail!("{other:?} is not a projection"),
        })
    }

    /// As `linear`, mutably (gradients).
    pub fn linear_mut(&mut self, s: Slot) -> Result<(&mut Buf, Option<&mut Buf>)> {
        let p = self;
        Ok(match s {
            Slot::Wq => (&mut p.wq, p.bq.as_mut()),
            Slot::Wk => (&mut p.wk, p.bk.as_mut()),
            Slot::Wv => (&mut p.wv, p.bv.as_mut()),
            Slot::Wo => (&mut p.wo, p.bo.as_mut()),
            Slot::Wg => (&mut p.wg, p.bg.as_mut()),
            Slot::Wu => (&mut p.wu, p.bu.as_mut()),
            Slot::Wd => (&mut p.wd, p.bd.as_mut()),
            other => bail!("{other:?} is not a projection"),
        })
    }

    /// Every present tensor, mutably, in `shapes` order (for the optimizer and zeroing).
    pub fn all_mut(&mut self) -> Vec<(Slot, &mut Buf)> {
        let LayerParams { ln1, wq, bq, wk, bk, wv, bv, wo, bo, ln2, wg, bg, wu, bu, wd, bd } = self;
        let v = [
            (Slot::Ln1, Some(ln1)),
            (Slot::Wq, Some(wq)),
            (Slot::Bq, bq.as_mut()),
            (Slot::Wk, Some(wk)),
            (Slot::Bk, bk.as_mut()),
            (Slot::Wv, Some(wv)),
            (Slot::Bv, bv.as_mut()),
            (Slot::Wo, Some(wo)),
            (Slot::Bo, bo.as_mut()),
            (Slot::Ln2, Some(ln2)),
            (Slot::Wg, Some(wg)),
            (Slot::Bg, bg.as_mut()),
            (Slot::Wu, Some(wu)),
            (Slot::Bu, bu.as_mut()),
            (Slot::Wd, Some(wd)),
            (Slot::Bd, bd.as_mut()),
        ];
        v.into_iter().filter_map(|(s, b)| b.map(|b| (s, b))).collect()
    }
}

fn take_opt(got: &mut Vec<(Slot, Buf)>, s: Slot) -> Option<Buf> {
    got.iter().position(|(x, _)| *x == s).map(|i| got.swap_remove(i).1)
}

/// What a block's forward keeps for its backward (the block input is kept by the caller).
pub struct LayerActs {
    rstd1: Buf, // [T] f32
    y1: Buf,    // [T, D]
    q: Buf,     // [T, Hq·hd] after RoPE
    k: Buf,     // [T, Hkv·hd] after RoPE
    v: Buf,     // [T, Hkv·hd]
    att: Buf,   // [T, Hq·hd]
    lse: Buf,   // [Hq, T] f32
    mid: Buf,   // [T, D] residual after attention
    rstd2: Buf, // [T] f32
    y2: Buf,    // [T, D]
    gate: Buf,  // [T, I]
    up: Buf,    // [T, I]
    h: Buf,     // [T, I] silu(gate)·up
}

impl LayerActs {
    /// Zeroed buffers for `t` tokens; activations in `dt` (the weights' dtype).
    pub fn new(dev: &Device, dims: &LayerDims, t: usize, dt: DType) -> Result<Self> {
        let a = |n: usize| dev.zeros(dt, n);
        Ok(LayerActs {
            rstd1: dev.zeros_f32(t)?,
            y1: a(t * dims.d)?,
            q: a(t * dims.q_dim())?,
            k: a(t * dims.kv_dim())?,
            v: a(t * dims.kv_dim())?,
            att: a(t * dims.q_dim())?,
            lse: dev.zeros_f32(dims.heads * t)?,
            mid: a(t * dims.d)?,
            rstd2: dev.zeros_f32(t)?,
            y2: a(t * dims.d)?,
            gate: a(t * dims.inter)?,
            up: a(t * dims.inter)?,
            h: a(t * dims.inter)?,
        })
    }
}

/// A ragged inference step's block activations for up to `capacity` tokens, allocated once and
/// shared by every layer and step (`resize` moves logical lengths only).
pub struct StepActs {
    acts: LayerActs,
    tmp: Buf, // [T, D] o_proj output
}

impl StepActs {
    pub fn new(dev: &Device, dims: &LayerDims, capacity: usize, dt: DType) -> Result<Self> {
        Ok(StepActs { acts: LayerActs::new(dev, dims, capacity, dt)?, tmp: dev.zeros(dt, capacity * dims.d)? })
    }
    /// Tokens the buffers hold at most.
    pub fn capacity(&self) -> usize {
        self.acts.rstd1.capacity()
    }
    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        let a = &self.acts;
        [&a.rstd1, &a.y1, &a.q, &a.k, &a.v, &a.att, &a.lse, &a.mid, &a.rstd2, &a.y2, &a.gate, &a.up, &a.h, &self.tmp]
            .into_iter()
            .map(|b| b.capacity() * b.dtype().size())
            .sum()
    }
    fn resize(&mut self, dims: &LayerDims, t: usize) -> Result<()> {
        let a = &mut self.acts;
        for (b, n) in [
            (&mut a.rstd1, t),
            (&mut a.y1, t * dims.d),
            (&mut a.q, t * dims.q_dim()),
            (&mut a.k, t * dims.kv_dim()),
            (&mut a.v, t * dims.kv_dim()),
            (&mut a.att, t * dims.q_dim()),
            (&mut a.lse, dims.heads * t),
            (&mut a.mid, t * dims.d),
            (&mut a.rstd2, t),
            (&mut a.y2, t * dims.d),
            (&mut a.gate, t * dims.inter),
            (&mut a.up, t * dims.inter),
            (&mut a.h, t * dims.inter),
            (&mut self.tmp, t * dims.d),
        ] {
            b.set_len(n)?;
        }
        Ok(())
    }
}

/// One block's shapes, weights, RoPE table and attention segments, for the calls below.
pub struct Block<'a> {
    pub dims: &'a LayerDims,
    pub w: &'a LayerParams,
    pub rope: &'a RopeTable,
    /// The packed sequences (text) or windows / images (vision) attention stays within.
    pub segs: &'a Varlen,
    pub causal: bool,
    /// LoRA adapters of this block's projections, if any.
    pub lora: Option<&'a LayerLora>,
}

/// Where a block's backward accumulates: the base weights' gradients (None: the base is frozen
/// and its dW GEMMs are skipped) and the adapters' (None: adapters frozen, or none).
#[derive(Default)]
pub struct LayerGrads<'g> {
    pub base: Option<&'g mut LayerParams>,
    pub lora: Option<&'g mut LayerLora>,
}

impl Block<'_> {
    /// Activations take the weights' dtype (bf16 on CUDA in training; f32 for checks).
    fn dt(&self) -> DType {
        self.w.wq.dtype()
    }

    fn shape(&self) -> AttnShape {
        AttnShape::new(self.dims.heads, self.dims.kv_heads, self.dims.head_dim, self.causal)
    }

    /// out [T, D] = block(x [T, D]); fills `acts`.
    pub fn forward(&self, dev: &Device, out: &mut Buf, x: &Buf, acts: &mut LayerActs) -> Result<()> {
        let t = self.segs.total();
        self.qkv(dev, x, acts, t)?;
        let o = attention::FwdOut { out: &mut acts.att, lse: &mut acts.lse };
        attention::fwd(dev, o, attention::Qkv { q: &acts.q, k: &acts.k, v: &acts.v }, self.segs, &self.shape())?;
        let mut tmp = dev.zeros(self.dt(), t * self.dims.d)?;
        self.finish(dev, out, x, acts, &mut tmp, t)
    }

    /// dx [T, D] (=) from dout [T, D]; parameter gradients accumulate into `g`.
    pub fn backward(
        &self, dev: &Device, dx: &mut Buf, g: &mut LayerGrads, dout: &Buf, x: &Buf, a: &LayerActs,
    ) -> Result<()> {
        let (d, w, t, dt) = (self.dims, self.w, self.segs.total(), self.dt());
        // MLP.
        let mut dh = dev.zeros(dt, t * d.inter)?;
        self.proj_bwd(dev, g, &mut dh, dout, Proj { s: Slot::Wd, x: &a.h, t, din: d.inter, dout: d.d })?;
        let (mut dgate, mut dup) = (dev.zeros(dt, t * d.inter)?, dev.zeros(dt, t * d.inter)?);
        act::swiglu_bwd(dev, &mut dgate, &mut dup, &dh, &a.gate, &a.up, t * d.inter)?;
        drop(dh);
        let (mut dy, mut dy_b) = (dev.zeros(dt, t * d.d)?, dev.zeros(dt, t * d.d)?);
        self.proj_bwd(dev, g, &mut dy, &dgate, Proj { s: Slot::Wg, x: &a.y2, t, din: d.d, dout: d.inter })?;
        self.proj_bwd(dev, g, &mut dy_b, &dup, Proj { s: Slot::Wu, x: &a.y2, t, din: d.d, dout: d.inter })?;
        elementwise::add_inplace(dev, &mut dy, &dy_b, t * d.d)?;
        let mut dmid = dev.zeros(dt, t * d.d)?;
        let ln2 = NormBwd { dx: &mut dmid, dy: &dy, x: &a.mid, w: &w.ln2, rstd: &a.rstd2 };
        norm_bwd(dev, g.base.as_deref_mut().map(|p| &mut p.ln2), ln2, t, d.d)?;
        elementwise::add_inplace(dev, &mut dmid, dout, t * d.d)?;
        // Attention.
        let mut datt = dev.zeros(dt, t * d.q_dim())?;
        self.proj_bwd(dev, g, &mut datt, &dmid, Proj { s: Slot::Wo, x: &a.att, t, din: d.q_dim(), dout: d.d })?;
        let mut dq = dev.zeros(dt, t * d.q_dim())?;
        let (mut dk, mut dv) = (dev.zeros(dt, t * d.kv_dim())?, dev.zeros(dt, t * d.kv_dim())?);
        let saved = attention::FwdSaved { q: &a.q, k: &a.k, v: &a.v, out: &a.att, lse: &a.lse };
        let grads = attention::QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv };
        attention::bwd(dev, grads, &datt, saved, self.segs, &self.shape())?;
        rope::bwd(dev, &mut dq, &self.rope.cos, &self.rope.sin, t, d.heads, d.head_dim)?;
        rope::bwd(dev, &mut dk, &self.rope.cos, &self.rope.sin, t, d.kv_heads, d.head_dim)?;
        self.proj_bwd(dev, g, &mut dy, &dq, Proj { s: Slot::Wq, x: &a.y1, t, din: d.d, dout: d.q_dim() })?;
        self.proj_bwd(dev, g, &mut dy_b, &dk, Proj { s: Slot::Wk, x: &a.y1, t, din: d.d, dout: d.kv_dim() })?;
        elementwise::add_inplace(dev, &mut dy, &dy_b, t * d.d)?;
        self.proj_bwd(dev, g, &mut dy_b, &dv, Proj { s: Slot::Wv, x: &a.y1, t, din: d.d, dout: d.kv_dim() })?;
        elementwise::add_inplace(dev, &mut dy, &dy_b, t * d.d)?;
        let ln1 = NormBwd { dx: &mut *dx, dy: &dy, x, w: &w.ln1, rstd: &a.rstd1 };
        norm_bwd(dev, g.base.as_deref_mut().map(|p| &mut p.ln1), ln1, t, d.d)?;
        elementwise::add_inplace(dev, dx, &dmid, t * d.d)
    }

    /// y [t, dout] = x·Wᵀ (+b) (+ the adapter's branch) for projection `s`.
    fn proj(&self, dev: &Device, y: &mut Buf, pj: Proj) -> Result<()> {
        let Proj { s, x, t, din, dout } = pj;
        let (w, b) = self.w.linear(s)?;
        matmul::linear_fwd(dev, y, x, w, b, matmul::Linear { t, din, dout })?;
        match self.lora.and_then(|l| l.adapter(s)) {
            Some(ad) => lora_op::fwd(dev, y, x, &ad, matmul::Linear { t, din, dout }),
            None => Ok(()),
        }
    }

    /// Backward of `proj`: dx (=) from dy; dW, db (+=) unless the base is frozen; dA, dB (+=)
    /// when the projection is adapted and its adapter trains.
    fn proj_bwd(&self, dev: &Device, g: &mut LayerGrads, dx: &mut Buf, dy: &Buf, pj: Proj) -> Result<()> {
        let Proj { s, x, t, din, dout } = pj;
        let (w, _) = self.w.linear(s)?;
        match g.base.as_deref_mut() {
            Some(gp) => {
                let (dw, db) = gp.linear_mut(s)?;
                matmul::linear_bwd(
                    dev,
                    matmul::LinearGrads { dx: Some(&mut *dx), dw, db },
                    dy,
                    x,
                    w,
                    matmul::Linear { t, din, dout },
                )?;
            }
            None => matmul::fwd(dev, dx, dy, w, matmul::Mm::new(t, din, dout))?,
        }
        let Some(ad) = self.lora.and_then(|l| l.adapter(s)) else { return Ok(()) };
        let (da, db) = match g.lora.as_deref_mut().and_then(|l| l.grads_mut(s)) {
            Some((da, db)) => (Some(da), Some(db)),
            None => (None, None),
        };
        lora_op::bwd(dev, lora_op::Grads { dx: Some(dx), da, db }, dy, x, &ad, matmul::Linear { t, din, dout })
    }

    /// Inference step for `cache.batch` sequences of `n_new` new tokens each: out, x
    /// [batch·n_new, D] (sequence-major); the new keys and values are appended to `cache` and the
    /// queries attend causally to everything cached. `self.rope` covers the new tokens;
    /// `self.segs` is not used.
    pub fn forward_cached(
        &self, dev: &Device, out: &mut Buf, x: &Buf, cache: &mut KvCache, n_new: usize,
    ) -> Result<()> {
        let t = cache.batch * n_new;
        let mut a = LayerActs::new(dev, self.dims, t, self.dt())?; // scratch: no backward follows
        self.qkv(dev, x, &mut a, t)?;
        cache.append(dev, &a.k, &a.v, n_new)?;
        attention::decode(dev, &mut a.att, &a.q, cache, n_new, &self.shape())?;
        let mut tmp = dev.zeros(self.dt(), t * self.dims.d)?;
        self.finish(dev, out, x, &mut a, &mut tmp, t)
    }

    /// Ragged inference step: sequence b of the cache gets cu_new[b+1] − cu_new[b] new tokens
    /// (0: idle). out, x [T_new, D] packed in sequence order; `self.rope` covers the new tokens.
    /// `scratch` holds the step's activations (no backward follows; every layer reuses it).
    pub fn forward_cached_varlen(
        &self, dev: &Device, out: &mut Buf, x: &Buf, cache: &mut KvCache, cu_new: &Varlen, scratch: &mut StepActs,
    ) -> Result<()> {
        let t = cu_new.total();
        scratch.resize(self.dims, t)?;
        let StepActs { acts: a, tmp } = scratch;
        self.qkv(dev, x, a, t)?;
        cache.append_varlen(dev, &a.k, &a.v, cu_new)?;
        attention::decode_varlen(dev, &mut a.att, &a.q, cache, cu_new, &self.shape())?;
        self.finish(dev, out, x, a, tmp, t)
    }

    /// y1 = RMSNorm(x), q/k/v projections, RoPE on q and k.
    fn qkv(&self, dev: &Device, x: &Buf, a: &mut LayerActs, t: usize) -> Result<()> {
        let (d, w) = (self.dims, self.w);
        rmsnorm::fwd(dev, rmsnorm::Fwd { y: &mut a.y1, rstd: &mut a.rstd1, x, w: &w.ln1 }, t, d.d, d.eps)?;
        self.proj(dev, &mut a.q, Proj { s: Slot::Wq, x: &a.y1, t, din: d.d, dout: d.q_dim() })?;
        self.proj(dev, &mut a.k, Proj { s: Slot::Wk, x: &a.y1, t, din: d.d, dout: d.kv_dim() })?;
        self.proj(dev, &mut a.v, Proj { s: Slot::Wv, x: &a.y1, t, din: d.d, dout: d.kv_dim() })?;
        rope::fwd(dev, &mut a.q, &self.rope.cos, &self.rope.sin, t, d.heads, d.head_dim)?;
        rope::fwd(dev, &mut a.k, &self.rope.cos, &self.rope.sin, t, d.kv_heads, d.head_dim)
    }

    /// From the attention output on: mid = x + o_proj(att); out = mid + down(silu(gate(y2)) ·
    /// up(y2)) with y2 = RMSNorm(mid).
    /// `tmp` [T, D] is scratch for the o_proj output.
    fn finish(&self, dev: &Device, out: &mut Buf, x: &Buf, a: &mut LayerActs, tmp: &mut Buf, t: usize) -> Result<()> {
        let (d, w) = (self.dims, self.w);
        self.proj(dev, tmp, Proj { s: Slot::Wo, x: &a.att, t, din: d.q_dim(), dout: d.d })?;
        elementwise::add_into(dev, &mut a.mid, x, tmp, t * d.d)?;
        rmsnorm::fwd(dev, rmsnorm::Fwd { y: &mut a.y2, rstd: &mut a.rstd2, x: &a.mid, w: &w.ln2 }, t, d.d, d.eps)?;
        self.proj(dev, &mut a.gate, Proj { s: Slot::Wg, x: &a.y2, t, din: d.d, dout: d.inter })?;
        self.proj(dev, &mut a.up, Proj { s: Slot::Wu, x: &a.y2, t, din: d.d, dout: d.inter })?;
        act::swiglu_fwd(dev, &mut a.h, &a.gate, &a.up, t * d.inter)?;
        self.proj(dev, out, Proj { s: Slot::Wd, x: &a.h, t, din: d.inter, dout: d.d })?;
        elementwise::add_inplace(dev, out, &a.mid, t * d.d)
    }
}

/// Runs blocks 0..n in order: `hs[0]` is the input and each output is pushed onto `hs` (so
/// hs[l] is block l's input). Returns each block's activations, None where `recompute(l)`:
/// `stack_backward` reruns those blocks from hs[l].
pub fn stack_forward<'a>(
    dev: &Device, n: usize, block: &dyn Fn(usize) -> Block<'a>, hs: &mut Vec<Buf>, recompute: &dyn Fn(usize) -> bool,
) -> Result<Vec<Option<LayerActs>>> {
    let mut acts = Vec::with_capacity(n);
    for l in 0..n {
        let blk = block(l);
        let (t, dt) = (blk.segs.total(), blk.dt());
        let mut a = LayerActs::new(dev, blk.dims, t, dt)?;
        let mut out = dev.zeros(dt, t * blk.dims.d)?;
        blk.forward(dev, &mut out, &hs[l], &mut a)?;
        hs.push(out);
        acts.push(if recompute(l) { None } else { Some(a) });
    }
    Ok(acts)
}

/// Backward through the blocks of `stack_forward`, last to first, from d(output of block n−1);
/// accumulates `grads[l]` (None: the base is frozen) and `lora_grads[l]` (None: no trained
/// adapters) and returns d(hs[0]).
pub fn stack_backward<'a>(
    dev: &Device, block: &dyn Fn(usize) -> Block<'a>, hs: &[Buf], acts: &[Option<LayerActs>],
    mut grads: Option<&mut [LayerParams]>, mut lora_grads: Option<&mut [LayerLora]>, dout: Buf,
) -> Result<Buf> {
    let saved = Saved { hs, acts };
    let mut dx = dout;
    let mut din: Option<Buf> = None;
    for l in (0..acts.len()).rev() {
        let mut g = LayerGrads {
            base: grads.as_deref_mut().and_then(|v| v.get_mut(l)),
            lora: lora_grads.as_deref_mut().and_then(|v| v.get_mut(l)),
        };
        block_backward(dev, &block(l), &saved, l, &mut g, &mut dx, &mut din)?;
    }
    Ok(dx)
}

/// What the forward of a stack kept: the residual streams (hs[l]: block l's input) and each
/// block's activations (None: recompute).
pub struct Saved<'a> {
    pub hs: &'a [Buf],
    pub acts: &'a [Option<LayerActs>],
}

/// What `stack_backward_stepped` builds each block from (full fine-tune: no adapters).
pub struct StackCtx<'a> {
    pub dims: &'a LayerDims,
    pub rope: &'a RopeTable,
    pub segs: &'a Varlen,
    pub causal: bool,
}

/// `stack_backward` for the per-layer optimizer step: one layer's gradient `gl` (zeroed) is
/// reused for every layer; as soon as layer l's backward has filled it, `step(l, weights,
/// gradient)` updates that layer, then `gl` is zeroed for layer l − 1. Layer l's weights are not
/// read again in this backward, so updating them here changes nothing below.
pub fn stack_backward_stepped(
    dev: &Device, ctx: &StackCtx, saved: Saved, layers: &mut [LayerParams], gl: &mut LayerParams,
    step: &mut dyn FnMut(usize, &mut LayerParams, &LayerParams) -> Result<()>, dout: Buf,
) -> Result<Buf> {
    let acts = saved.acts;
    if layers.len() != acts.len() {
        bail!("stepped backward: {} layers of weights but {} of activations", layers.len(), acts.len());
    }
    let mut dx = dout;
    let mut din: Option<Buf> = None;
    for l in (0..acts.len()).rev() {
        {
            let blk =
                Block { dims: ctx.dims, w: &layers[l], rope: ctx.rope, segs: ctx.segs, causal: ctx.causal, lora: None };
            let mut g = LayerGrads { base: Some(&mut *gl), lora: None };
            block_backward(dev, &blk, &saved, l, &mut g, &mut dx, &mut din)?;
        }
        step(l, &mut layers[l], gl)?;
        if l > 0 {
            for (_, b) in gl.all_mut() {
                let n = b.len();
                elementwise::fill(dev, b, 0.0, n)?;
            }
        }
    }
    Ok(dx)
}

/// Block l's backward within a stack: reruns its forward from hs[l] when its activations were
/// not kept, then replaces dx (d of its output) by d hs[l]; `din` holds the buffer to reuse.
fn block_backward(
    dev: &Device, blk: &Block, saved: &Saved, l: usize, g: &mut LayerGrads, dx: &mut Buf, din: &mut Option<Buf>,
) -> Result<()> {
    let (t, dt) = (blk.segs.total(), blk.dt());
    let recomputed;
    let a = match &saved.acts[l] {
        Some(a) => a,
        None => {
            let mut a = LayerActs::new(dev, blk.dims, t, dt)?;
            let mut scratch = dev.zeros(dt, t * blk.dims.d)?;
            blk.forward(dev, &mut scratch, &saved.hs[l], &mut a)?;
            recomputed = a;
            &recomputed
        }
    };
    let mut next = match din.take() {
        Some(b) => b,
        None => dev.zeros(dt, t * blk.dims.d)?,
    };
    blk.backward(dev, &mut next, g, dx, &saved.hs[l], a)?;
    *din = Some(std::mem::replace(dx, next));
    Ok(())
}

/// One projection of a block: slot `s` on x [t, din], out [t, dout].
struct Proj<'a> {
    s: Slot,
    x: &'a Buf,
    t: usize,
    din: usize,
    dout: usize,
}

/// An RMSNorm backward's buffers but dw: dx [t, d] (=) from dy, x, w and the saved rstd.
pub(crate) struct NormBwd<'a> {
    pub dx: &'a mut Buf,
    pub dy: &'a Buf,
    pub x: &'a Buf,
    pub w: &'a Buf,
    pub rstd: &'a Buf,
}

/// RMSNorm backward into `dw` (+=), or into a throw-away buffer when the norm is frozen.
pub(crate) fn norm_bwd(dev: &Device, dw: Option<&mut Buf>, b: NormBwd, t: usize, d: usize) -> Result<()> {
    let NormBwd { dx, dy, x, w, rstd } = b;
    match dw {
        Some(dw) => rmsnorm::bwd(dev, rmsnorm::Bwd { dx, dw, dy, x, w, rstd }, t, d),
        None => rmsnorm::bwd(dev, rmsnorm::Bwd { dx, dw: &mut dev.zeros_f32(d)?, dy, x, w, rstd }, t, d),
    }
}

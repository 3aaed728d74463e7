//! The rollout engine's ragged step through the LM, over preallocated buffers: `StepScratch`
//! holds every device buffer a step needs (ids, offsets, RoPE table, residual streams, one set
//! of block activations shared by all layers, the last rows and their logits), sized for the
//! largest step seen so far. Once it has grown to the step shapes of a call, a decode step
//! allocates nothing (tests/rollout_alloc.rs), so that it can be captured in a CUDA graph.
//!
//! Steps that inject image rows (a prefill) still build their row index per step.

use super::decoder::{Block, RopeTable, StepActs};
use super::lm::{embed_into, inject_index, Lm, LmCache, LmDims, Tokens};
use crate::ops::attention::Varlen;
use crate::ops::patch_embed::{gather_rows, RowIndex};
use crate::ops::{matmul, rmsnorm};
use crate::tensor::{Buf, DType, Device};
use anyhow::{anyhow, bail, Result};

/// A ragged step's input: sequence b of the cache gets ids[cu_new[b]..cu_new[b+1]] (none for an
/// idle slot) at RoPE positions `pos` (the family's layout), and `image_rows` fill the step's
/// image placeholders in order.
#[derive(Clone, Copy)]
pub struct StepInput<'a> {
    pub ids: &'a [i32],
    pub pos: &'a [i32],
    pub cu_new: &'a [i32],
    pub image_rows: Option<&'a Buf>,
}

/// Buffers of the ragged step, grown (to powers of two) when a step needs more than they hold.
#[derive(Default)]
pub struct StepScratch {
    tok: Option<TokenBufs>,
    rows: Option<RowBufs>,
}

/// Per-token buffers; their capacities (tokens: `ids`, sequences: `cu`) and dtype (`x`) say
/// what steps they take.
struct TokenBufs {
    ids: Buf,
    cu: Varlen,
    rope: RopeTable,
    x: Buf,
    out: Buf,
    rstd: Buf,
    acts: StepActs,
}

impl TokenBufs {
    fn takes(&self, dt: DType, t: usize, seqs: usize) -> bool {
        self.x.dtype() == dt && self.ids.capacity() >= t && self.cu.buf.capacity() > seqs
    }
}

/// Per-output-row buffers (one row per sequence with new tokens); capacity: `last`'s.
struct RowBufs {
    last: RowIndex,
    hidden: Buf,
    logits: Buf,
}

fn grown(need: usize) -> usize {
    need.max(1).next_power_of_two()
}

impl StepScratch {
    /// The bytes `bytes()` reports once steps of up to `tokens` new tokens over `seqs`
    /// sequences have run (`elem`: the activations' bytes per element), before allocating.
    pub fn plan_bytes(dims: &LmDims, elem: usize, tokens: usize, seqs: usize) -> usize {
        let (t, n, l) = (grown(tokens), grown(seqs), &dims.layer);
        let tok = 4 * t // ids
            + 4 * (grown(seqs) + 1) // offsets
            + 4 * 2 * t * (l.head_dim / 2) // rope cos, sin
            + elem * 2 * t * l.d // x, out
            + 4 * t // rstd
            // block activations: rstd1, rstd2, lse (f32); y1, mid, y2, tmp, q, att, k, v, gate, up, h
            + 4 * t * (2 + l.heads)
            + elem * t * (4 * l.d + 2 * l.q_dim() + 2 * l.kv_dim() + 3 * l.inter);
        let rows = 4 * n + elem * n * (l.d + dims.vocab);
        tok + rows
    }

    /// Device bytes held (for the memory pre-flight and the bench).
    pub fn bytes(&self) -> usize {
        let b = |x: &Buf| x.capacity() * x.dtype().size();
        let tok = self.tok.as_ref().map_or(0, |t| {
            [&t.ids, &t.cu.buf, &t.rope.cos, &t.rope.sin, &t.x, &t.out, &t.rstd].into_iter().map(b).sum::<usize>()
                + t.acts.bytes()
        });
        let rows = self.rows.as_ref().map_or(0, |r| b(&r.last.dev) + b(&r.hidden) + b(&r.logits));
        tok + rows
    }
}

fn tokens<'a>(
    slot: &'a mut Option<TokenBufs>, dev: &Device, dims: &LmDims, dt: DType, t: usize, seqs: usize,
) -> Result<&'a mut TokenBufs> {
    if !slot.as_ref().is_some_and(|b| b.takes(dt, t, seqs)) {
        let (cap, cap_seqs) = match slot.as_ref().filter(|b| b.x.dtype() == dt) {
            Some(b) => (grown(t).max(b.ids.capacity()), grown(seqs).max(b.cu.buf.capacity() - 1)),
            None => (grown(t), grown(seqs)),
        };
        *slot = None; // free the smaller set first
        let (d, half) = (dims.layer.d, dims.layer.head_dim / 2);
        let mut cu = Varlen::new(dev, &vec![0; cap_seqs + 1])?;
        cu.buf.set_len(1)?;
        return Ok(slot.insert(TokenBufs {
            ids: dev.zeros(DType::I32, cap)?,
            cu,
            rope: RopeTable { cos: dev.zeros_f32(cap * half)?, sin: dev.zeros_f32(cap * half)? },
            x: dev.zeros(dt, cap * d)?,
            out: dev.zeros(dt, cap * d)?,
            rstd: dev.zeros_f32(cap)?,
            acts: StepActs::new(dev, &dims.layer, cap, dt)?,
        }));
    }
    slot.as_mut().ok_or_else(|| anyhow!("step scratch: no token buffers"))
}

fn rows<'a>(
    slot: &'a mut Option<RowBufs>, dev: &Device, dims: &LmDims, dt: DType, r: usize,
) -> Result<&'a mut RowBufs> {
    let same_dt = slot.as_ref().filter(|b| b.logits.dtype() == dt);
    if same_dt.is_none_or(|b| b.last.dev.capacity() < r) {
        let cap = grown(r).max(same_dt.map_or(0, |b| b.last.dev.capacity()));
        *slot = None;
        return Ok(slot.insert(RowBufs {
            last: RowIndex::with_repeats(dev, &vec![0; cap], 1)?,
            hidden: dev.zeros(dt, cap * dims.layer.d)?,
            logits: dev.zeros(dt, cap * dims.vocab)?,
        }));
    }
    slot.as_mut().ok_or_else(|| anyhow!("step scratch: no row buffers"))
}

impl Lm<'_> {
    /// A ragged step over the cached sequences: sequence b gets ids[cu_new[b]..cu_new[b+1]] (none
    /// for an idle slot), with RoPE positions `pos` for the packed new tokens. Prefill of one
    /// sequence and decoding of the others share the step. Returns the logits [active, V] at each
    /// non-empty sequence's last new token, in sequence order (active = sequences with new tokens).
    pub fn step_logits<'s>(
        &self, dev: &Device, cache: &mut LmCache, scratch: &'s mut StepScratch, x: Tokens, cu_new: &[i32],
    ) -> Result<&'s mut Buf> {
        let (Lm { dims, p, lora }, Tokens { ids, pos, inject }) = (*self, x);
        let (t, d, dt) = (ids.len(), dims.layer.d, p.embed.dtype());
        if cu_new.len() != cache.batch + 1 || cu_new.last().copied() != Some(t as i32) {
            bail!(
                "LM step: cu_new has {} entries ending at {:?} for {} sequences and {t} ids",
                cu_new.len(),
                cu_new.last(),
                cache.batch
            );
        }
        if t == 0 {
            bail!("LM step: no new tokens");
        }
        let (cos, sin) = dims.rope.table(pos, t, dims.layer.head_dim)?;
        let inject_idx = inject_index(dev, &inject, t)?;
        let StepScratch { tok, rows: row_slot } = scratch;
        let tb = tokens(tok, dev, dims, dt, t, cache.batch)?;
        tb.cu.refill(dev, cu_new)?;
        tb.rope.cos.write_f32(dev, &cos)?;
        tb.rope.sin.write_f32(dev, &sin)?;
        tb.ids.write_i32(dev, ids)?;
        for b in [&mut tb.x, &mut tb.out] {
            b.set_len(t * d)?;
        }
        let TokenBufs { ids: ids_buf, cu, rope, x, out, rstd, acts } = tb;
        embed_into(dev, dims, p, x, ids_buf, ids, inject.as_ref().zip(inject_idx.as_ref()).map(|(i, r)| (i.rows, r)))?;
        for (l, kv) in cache.layers.iter_mut().enumerate() {
            let blk = Block { dims: &dims.layer, w: &p.layers[l], rope, segs: cu, causal: true, lora: lora.get(l) };
            blk.forward_cached_varlen(dev, out, x, kv, cu, acts)?;
            std::mem::swap(x, out);
        }
        // The final norm writes only the last rows: the head reads nothing else.
        let last: Vec<i32> = cu_new.windows(2).filter(|w| w[1] > w[0]).map(|w| w[1] - 1).collect();
        let n = last.len();
        // Capacity for every sequence of the cache at once: decode steps never grow it.
        let rb = rows(row_slot, dev, dims, dt, cache.batch)?;
        rb.last.host.clear();
        rb.last.host.extend_from_slice(&last);
        rb.last.dev.write_i32(dev, &last)?;
        rb.last.bound = t;
        rb.hidden.set_len(n * d)?;
        gather_rows(dev, &mut rb.hidden, x, &rb.last, d)?;
        // The final norm over the n gathered rows (row-wise: the same as norming all, then gathering).
        out.set_len(n * d)?;
        rstd.set_len(n)?;
        rmsnorm::fwd(dev, rmsnorm::Fwd { y: out, rstd, x: &rb.hidden, w: &p.norm }, n, d, dims.layer.eps)?;
        rb.logits.set_len(n * dims.vocab)?;
        matmul::linear_fwd(
            dev,
            &mut rb.logits,
            out,
            p.head(),
            None,
            matmul::Linear { t: n, din: d, dout: dims.vocab },
        )?;
        Ok(&mut rb.logits)
    }
}

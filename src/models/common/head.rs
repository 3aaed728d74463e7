//! The LM head both families put on the shared decoder: fused log-probs of target ids and their
//! backward (`ops::logprob`, no [S, V] logits), the per-layer-step backward through head and
//! LM, and KV-cached extension with logits of every new token or of each sequence's last one.

use super::decoder::LayerParams;
use super::lm::{self, Lm, LmCache, LmDims, LmFwd, LmParams, StepFn, Stepped, Tokens};
use super::lora::LoraState;
use super::params::GradStore;
use crate::ops::logprob;
use crate::ops::patch_embed::{gather_rows, RowIndex};
use crate::tensor::{Buf, Device};
use anyhow::{bail, Result};

/// The head's backward inputs: `targets` [S] i32 and `lse` [S] f32 of `logprobs`, d objective /
/// d logp [S] f32, and the scale the final hidden states got before the head (1/T: log-probs
/// at temperature T; 1: none), so that d h = s · d(h·s).
pub struct LogpGrad<'a> {
    pub targets: &'a Buf,
    pub lse: &'a Buf,
    pub dlogp: &'a Buf,
    pub hidden_scale: f32,
}

impl<'a> LogpGrad<'a> {
    /// The fields in order: targets, lse, dlogp, hidden_scale.
    pub fn new(targets: &'a Buf, lse: &'a Buf, dlogp: &'a Buf, hidden_scale: f32) -> Self {
        LogpGrad { targets, lse, dlogp, hidden_scale }
    }
}

/// (logp, lse), each [S] f32: log p(targets[t]) at every position of `f` with mask[t] ≠ 0 (0
/// elsewhere), without materialising the logits. `targets` [S] i32, mask [S] f32.
pub fn logprobs(
    dev: &Device, dims: &LmDims, p: &LmParams, f: &LmFwd, targets: &Buf, mask: Option<&Buf>,
) -> Result<(Buf, Buf)> {
    let (s, d, v) = (f.tokens(), dims.layer.d, dims.vocab);
    let (mut logp, mut lse) = (dev.zeros_f32(s)?, dev.zeros_f32(s)?);
    let head_in =
        logprob::Inputs { hidden: f.final_hidden(), lm_head: p.head(), targets, dims: logprob::Dims { t: s, h: d, v } };
    logprob::fwd(dev, logprob::FwdOut { logp: &mut logp, lse: &mut lse, entropy: None }, head_in, mask)?;
    Ok((logp, lse))
}

/// The head's backward: returns d final_hidden [S, D] (times `h.hidden_scale`) and accumulates
/// d lm_head into `dhead` (None: the head is frozen, its dW GEMM is skipped).
pub fn logprobs_bwd(
    dev: &Device, dims: &LmDims, p: &LmParams, f: &LmFwd, dhead: Option<&mut Buf>, h: &LogpGrad,
) -> Result<Buf> {
    let (s, d, v) = (f.tokens(), dims.layer.d, dims.vocab);
    let mut dxf = dev.zeros(p.embed.dtype(), s * d)?;
    let head_in = logprob::Inputs {
        hidden: f.final_hidden(),
        lm_head: p.head(),
        targets: h.targets,
        dims: logprob::Dims { t: s, h: d, v },
    };
    logprob::bwd(dev, logprob::BwdOut { dhidden: &mut dxf, dlm_head: dhead }, head_in, h.dlogp, h.lse)?;
    if h.hidden_scale != 1.0 {
        crate::ops::elementwise::scale_inplace(dev, &mut dxf, h.hidden_scale, s * d)?;
    }
    Ok(dxf)
}

/// Head and LM backward of a full fine-tune with the per-layer optimizer step (`lm::
/// backward_stepped`; one layer's gradient, stored per `store`, reused for every layer).
/// d lm_head goes into `s.g`. Returns the injected rows' gradient.
pub fn backward_stepped(
    dev: &Device, s: Stepped, store: GradStore, f: &LmFwd, h: &LogpGrad, step: &mut StepFn,
) -> Result<Option<Buf>> {
    let (td, names) = (s.dims, s.names);
    let mut gl = LayerParams::build(&td.layer, td.flags, &mut |sl, _| {
        let r = names.layer(td, 0, sl);
        dev.zeros(store.dtype(dev, &r), r.numel())
    })?;
    let dxf = logprobs_bwd(dev, td, s.p, f, Some(s.g.head_mut()), h)?;
    lm::backward_stepped(dev, s, &mut gl, f, &dxf, step)
}

/// Where the head's backward writes d lm_head: the base gradient `text`, or None under LoRA
/// (the head is frozen, so the op skips its dW GEMM and nothing [V, D] is allocated).
pub fn head_grad<'a>(text: Option<&'a mut LmParams>, lora: &Option<LoraState>) -> Result<Option<&'a mut Buf>> {
    if let Some(l) = lora.as_ref() {
        return match l.grads {
            Some(_) => Ok(None),
            None => bail!("gradients not allocated"),
        };
    }
    match text {
        Some(g) => Ok(Some(g.head_mut())),
        None => bail!("gradients not allocated"),
    }
}

impl Lm<'_> {
    /// `extend` by `n_new` tokens of each cached sequence, then logits [batch·n_new, V], or with
    /// `last_only` [batch, V] of each sequence's last new token (sampling).
    pub fn extend_logits(
        &self, dev: &Device, cache: &mut LmCache, x: Tokens, n_new: usize, last_only: bool,
    ) -> Result<Buf> {
        let t = x.ids.len();
        let hidden = self.extend(dev, cache, x, n_new)?;
        if !last_only {
            return self.logits(dev, &hidden, t);
        }
        let d = self.dims.layer.d;
        let last: Vec<usize> = (0..cache.batch).map(|b| b * n_new + n_new - 1).collect();
        let idx = RowIndex::new(dev, &last, t)?;
        let mut rows = dev.zeros(self.p.embed.dtype(), last.len() * d)?;
        gather_rows(dev, &mut rows, &hidden, &idx, d)?;
        self.logits(dev, &rows, last.len())
    }
}

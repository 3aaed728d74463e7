//! CUDA launchers of the grouped log-prob: the plain forward/backward and the fused GRPO pass, at
//! either `LogitPrecision` (see PERF-logprob.md). Pointers are raw device addresses. The large scratch
//! (kept logits, f32 tiles, dhidden partials) comes from the per-process cache in arena.rs and is
//! never zeroed: each part is fully written by a GEMM or kernel before anything reads it. The
//! dhidden GEMMs run split over vocabulary slices (splitk.rs); the stages of a chunk are launched by
//! `stages::Pass`.

use super::arena::{self, Layout};
use super::splitk::{self, Splits};
use super::stages::*;
use super::*;
use crate::cuda::api;

fn opt_ptr(g: &Gpu, b: Option<&Buf>) -> Result<u64> {
    Ok(match b {
        Some(b) => b.ptr(g)?,
        None => 0,
    })
}

fn zero(g: &Gpu, b: &mut Buf) -> Result<()> {
    let r = match b {
        Buf::DevF32(s, _) => g.stream.memset_zeros(s),
        Buf::DevBf16(s, _) => g.stream.memset_zeros(s),
        Buf::DevI32(s, _) => g.stream.memset_zeros(s),
        _ => bail!("logprob: expected a device buffer, got {:?}", b),
    };
    r.map_err(|e| anyhow::anyhow!("logprob: zeroing a buffer: {e}"))
}

/// A GPU call's context: the device, the tuning and `meter`, the bytes of scratch allocated.
pub(super) struct Call<'a> {
    pub g: &'a Gpu,
    pub dev: &'a Device,
    pub tune: &'a Tuning,
    pub meter: usize,
}

impl Call<'_> {
    /// A zeroed device buffer of n elements of `dt`, counted.
    fn scratch(&mut self, dt: DType, n: usize) -> Result<Buf> {
        self.meter += n.max(1) * dt.size();
        self.dev.zeros(dt, n)
    }

    /// Takes the cached scratch for `lay` and counts it.
    fn take(&mut self, lay: &Layout) -> Result<arena::Scratch> {
        self.meter += lay.bytes;
        arena::take(self.dev, lay.bytes, self.tune.cache_scratch)
    }
}

/// The tokens with flags != 0, when some are not: (count, idx [t] i32, pos [t] i32).
pub(super) struct Active {
    pub n: usize,
    pub idx: Buf,
    pub pos: Buf,
}

fn active_tokens(cx: &mut Call, flags: &Buf, t: usize) -> Result<Option<Active>> {
    let idx = cx.scratch(DType::I32, t)?;
    let pos = cx.scratch(DType::I32, t)?;
    let cnt = cx.scratch(DType::I32, 1)?;
    scan_nonzero(cx.g, flags, &idx, &pos, &cnt, t)?;
    let n = cx.dev.to_vec_i32(&cnt)?.first().copied().unwrap_or(0).max(0) as usize;
    Ok(if n == t { None } else { Some(Active { n, idx, pos }) })
}

/// The packed copies of hidden [ta, h] and targets [ta] when tokens were compacted.
fn gather_inputs(cx: &mut Call, a: &Active, hidden: &Buf, targets: &Buf, h: usize) -> Result<(Buf, Buf)> {
    let g = cx.g;
    let dt = hidden.dtype();
    let hp = cx.scratch(dt, a.n * h)?;
    let tp = cx.scratch(DType::I32, a.n)?;
    if a.n > 0 {
        api::logprob::LogprobGatherRows {
            dst: hp.ptr(g)?,
            src: hidden.ptr(g)?,
            idx: a.idx.ptr(g)?,
            n: a.n as i32,
            cols: h as i32,
        }
        .launch(g, dt, cfg_rows(a.n, BLOCK, 0))?;
        api::logprob::LogprobGatherVecI32 { dst: tp.ptr(g)?, src: targets.ptr(g)?, idx: a.idx.ptr(g)?, n: a.n as i32 }
            .launch(g, cfg_1d(a.n, 256))?;
    }
    Ok((hp, tp))
}

/// dst [t] f32 = src [ta] at active tokens, 0 elsewhere.
fn expand(g: &Gpu, dst: &Buf, src: &Buf, a: &Active, t: usize) -> Result<()> {
    api::logprob::LogprobExpandVecF32 { dst: dst.ptr(g)?, src: src.ptr(g)?, pos: a.pos.ptr(g)?, n: t as i32 }
        .launch(g, cfg_1d(t, 256))
}

/// Even split of `total` rows into chunks of at most `max` rows.
fn chunk_rows(total: usize, max: usize) -> usize {
    let max = max.clamp(1, MAX_CHUNK_ROWS);
    if total == 0 {
        return 1;
    }
    total.div_ceil(total.div_ceil(max))
}

/// Token rows per chunk of the fused pass (and of `fwd` at LogitPrecision::Bf16): the kept
/// [rows, v] logits fit in `fused_bytes`.
fn fused_rows(ta: usize, v: usize, dt: DType, tune: &Tuning) -> usize {
    chunk_rows(ta, tune.fused_bytes / (v * dt.size()).max(1))
}

/// The vocabulary slices of a dhidden GEMM with m rows and reduction k: `Tuning::dhidden_splits`,
/// or the cost model of splitk.rs when it is 0. `extra` is the partial traffic per extra slice.
fn dh_splits(g: &Gpu, tune: &Tuning, m: usize, h: usize, k: usize, extra: f64) -> Splits {
    let s = match tune.dhidden_splits {
        0 => splitk::auto_splits(m, h, k, g.sm_count as usize, extra),
        s => s,
    };
    Splits::new(k, s)
}

/// The slices the fused pass uses for a chunk of `tc` rows (bench and tests report them).
pub(super) fn fused_splits(g: &Gpu, tune: &Tuning, ta: usize, h: usize, v: usize, dt: DType) -> (usize, Splits) {
    let tc = fused_rows(ta, v, dt, tune);
    (tc, dh_splits(g, tune, tc, h, v, 8.0 * (tc * h) as f64))
}

/// The fused pass's dhidden GEMM for one chunk of n rows (see `super::dhidden_split_gemm`): U
/// [n, v] at `u`, f32 partials at `part`. Returns the number of partials written.
pub(super) fn dhidden_stage(ps: &Pass, tune: &Tuning, u: u64, part: u64, n: usize) -> Result<usize> {
    let (h, v) = (ps.h, ps.v);
    let splits = dh_splits(ps.g, tune, n, h, v, 8.0 * (n * h) as f64);
    ps.dhidden(part, u, n, Cols { v0: 0, nv: v }, 0.0, splits)?;
    Ok(splits.count)
}

/// The entropy of packed row t0 (0 when there is none).
fn ent_at(en: u64, t0: usize) -> u64 {
    if en == 0 {
        0
    } else {
        at(en, t0, DType::F32)
    }
}

pub(super) fn fwd(cx: &mut Call, out: FwdOut, x: Inputs, mask: Option<&Buf>) -> Result<()> {
    let (g, tune) = (cx.g, cx.tune);
    let FwdOut { logp, lse, entropy } = out;
    let Inputs { hidden, lm_head, targets, dims: Dims { t, h, v } } = x;
    let ps = Pass::new(g, lm_head, h, v)?;
    let act = match mask {
        Some(m) if t > 0 => active_tokens(cx, m, t)?,
        _ => None,
    };
    let ta = act.as_ref().map_or(t, |a| a.n);
    let packed = match &act {
        Some(a) => Some(gather_inputs(cx, a, hidden, targets, h)?),
        None => None,
    };
    let (hid, tgt) = match &packed {
        Some((hp, tp)) => (hp.ptr(g)?, tp.ptr(g)?),
        None => (hidden.ptr(g)?, targets.ptr(g)?),
    };
    let rows = Packed { hid, tgt, idx: 0 };
    // Packed outputs: the outputs themselves unless tokens were compacted.
    let tmp = match &act {
        Some(_) => Some((cx.scratch(DType::F32, ta)?, cx.scratch(DType::F32, ta)?, cx.scratch(DType::F32, ta)?)),
        None => None,
    };
    let (lp, ls, en) = match &tmp {
        Some((a, b, c)) => (a.ptr(g)?, b.ptr(g)?, if entropy.is_some() { c.ptr(g)? } else { 0 }),
        None => (logp.ptr(g)?, lse.ptr(g)?, opt_ptr(g, entropy.as_deref())?),
    };
    if ta > 0 && tune.precision == LogitPrecision::Bf16 {
        fwd_kept(cx, &ps, rows, RowOut { logp: lp, lse: ls, ent: en }, ta)?;
    } else if ta > 0 {
        let tc = chunk_rows(ta, tune.fwd_tokens);
        let vc = tune.fwd_vocab.clamp(1, v);
        let mut lay = Layout::default();
        let o_tile = lay.part(tc * vc * 4);
        let sc = cx.take(&lay)?;
        let tile = sc.at(o_tile);
        let stats = cx.scratch(DType::F32, tc * 4)?;
        let stats = stats.ptr(g)?;
        let fold = Fold { tile, stats, store: 0, moff: 0 };
        for t0 in (0..ta).step_by(tc) {
            let c = rows.chunk(&ps, t0, tc.min(ta - t0));
            ps.fold_rows(&fold, &c, vc)?;
            let out = RowOut { logp: at(lp, t0, DType::F32), lse: at(ls, t0, DType::F32), ent: ent_at(en, t0) };
            ps.finalize(out, stats, c.n)?;
        }
    }
    if let (Some(a), Some((tl, ts, te))) = (&act, &tmp) {
        expand(g, logp, tl, a, t)?;
        expand(g, lse, ts, a, t)?;
        if let Some(e) = entropy.as_deref() {
            expand(g, e, te, a, t)?;
        }
    }
    Ok(())
}

/// `fwd` at `LogitPrecision::Bf16`: per chunk of the fused pass's size, the same logits GEMM into
/// a kept [tc, v] buffer and the same fold kernel as `fwd_bwd_bf16` (fold_u, stopped before it
/// writes u), so logp, lse and the entropy equal the fused pass's bit for bit. `out`: packed
/// outputs [ta] (ent may be 0).
fn fwd_kept(cx: &mut Call, ps: &Pass, rows: Packed, out: RowOut, ta: usize) -> Result<()> {
    let v = ps.v;
    let tc = fused_rows(ta, v, ps.dt, cx.tune);
    let mut lay = Layout::default();
    let o_store = lay.part(tc * v * ps.dt.size());
    let sc = cx.take(&lay)?;
    let store = sc.at(o_store);
    for t0 in (0..ta).step_by(tc) {
        let c = rows.chunk(ps, t0, tc.min(ta - t0));
        let out_t0 =
            RowOut { logp: at(out.logp, t0, DType::F32), lse: at(out.lse, t0, DType::F32), ent: ent_at(out.ent, t0) };
        ps.logits_kept(store, c.hid, c.n)?;
        ps.fold_u(store, out_t0, &c, None)?;
    }
    Ok(())
}

pub(super) fn bwd(cx: &mut Call, out: BwdOut, x: Inputs, dlogp: &Buf, lse: &Buf) -> Result<()> {
    let (g, tune) = (cx.g, cx.tune);
    let BwdOut { dhidden, dlm_head } = out;
    let Inputs { hidden, lm_head, targets, dims: Dims { t, h, v } } = x;
    let ps = Pass::new(g, lm_head, h, v)?;
    if t == 0 {
        return match dlm_head {
            Some(dw) if tune.dw_overwrite => zero(g, dw),
            _ => Ok(()),
        };
    }
    // Only tokens with a non-zero upstream gradient contribute.
    let act = active_tokens(cx, dlogp, t)?;
    let ta = act.as_ref().map_or(t, |a| a.n);
    let packed = match &act {
        Some(a) => {
            zero(g, dhidden)?;
            let (hp, tp) = gather_inputs(cx, a, hidden, targets, h)?;
            let dp = cx.scratch(DType::F32, a.n)?;
            let lp = cx.scratch(DType::F32, a.n)?;
            if a.n > 0 {
                for (dst, src) in [(&dp, dlogp), (&lp, lse)] {
                    api::logprob::LogprobGatherVecF32 {
                        dst: dst.ptr(g)?,
                        src: src.ptr(g)?,
                        idx: a.idx.ptr(g)?,
                        p0: 0,
                        n: a.n as i32,
                        scale: 1.0,
                    }
                    .launch(g, cfg_1d(a.n, 256))?;
                }
            }
            Some((hp, tp, dp, lp))
        }
        None => None,
    };
    if ta == 0 {
        return match dlm_head {
            Some(dw) if tune.dw_overwrite => zero(g, dw),
            _ => Ok(()),
        };
    }
    let (hid, tgt, dlp, lsp) = match &packed {
        Some((hp, tp, dp, lp)) => (hp.ptr(g)?, tp.ptr(g)?, dp.ptr(g)?, lp.ptr(g)?),
        None => (hidden.ptr(g)?, targets.ptr(g)?, dlogp.ptr(g)?, lse.ptr(g)?),
    };
    let idx = match &act {
        Some(a) => a.idx.ptr(g)?,
        None => 0,
    };
    let rows = Packed { hid, tgt, idx };
    let tc = chunk_rows(ta, tune.bwd_tokens);
    let vc = tune.bwd_vocab.clamp(1, v);
    // dhidden per vocabulary tile, split into slices: S f32 accumulators [n, h], each re-read by
    // the next tile's β = 1 (hence the 8·tc·h bytes per extra slice and tile in the cost model).
    let splits = dh_splits(g, tune, tc, h, vc, 8.0 * (tc * h) as f64);
    // Bf16 precision: the tile's logits are rounded to the storage dtype, as `fwd` of that
    // precision rounded them for the saved lse, and turned into dlogits in place (no f32 tile).
    let kept = tune.precision == LogitPrecision::Bf16;
    let mut lay = Layout::default();
    let o_tile = lay.part(if kept { 0 } else { tc * vc * 4 });
    let o_dl = lay.part(tc * vc * ps.dt.size());
    let o_dh = lay.part(splits.count * tc * h * 4);
    let sc = cx.take(&lay)?;
    let (tile, dl, dh) = (sc.at(o_tile), sc.at(o_dl), sc.at(o_dh));
    // A frozen head (None) skips the dW GEMM: the largest of the step at 7B.
    let (dhid, dw) = (dhidden.ptr(g)?, dlm_head.as_deref().map(|b| b.ptr(g)).transpose()?);
    for t0 in (0..ta).step_by(tc) {
        let c = rows.chunk(&ps, t0, tc.min(ta - t0));
        let n = c.n;
        let (ls_t0, dlp_t0) = (at(lsp, t0, DType::F32), at(dlp, t0, DType::F32));
        for v0 in (0..v).step_by(vc) {
            let cols = Cols { v0, nv: vc.min(v - v0) };
            let nv = cols.nv;
            if kept {
                ps.logits_as(dl, c.hid, n, cols, ps.gt)?;
                api::logprob::LogprobDlogitsInplace {
                    buf: dl,
                    lse: ls_t0,
                    dlogp: dlp_t0,
                    targets: c.tgt,
                    n: n as i32,
                    nv: nv as i32,
                    v0: v0 as i32,
                }
                .launch(g, ps.dt, cfg_cols(nv, vec_n(ps.dt), n))?;
            } else {
                ps.logits(tile, c.hid, n, cols)?;
                api::logprob::LogprobDlogits {
                    out: dl,
                    logits: tile,
                    lse: ls_t0,
                    dlogp: dlp_t0,
                    targets: c.tgt,
                    n: n as i32,
                    nv: nv as i32,
                    v0: v0 as i32,
                }
                .launch(g, ps.dt, cfg_cols(nv, vec_n(ps.dt), n))?;
            }
            // dh partials [n, h] (+)= dl [n, nv] · W[v0 .. v0 + nv, :], slice by slice. The first
            // tile (the widest) writes every partial; a shorter last tile may touch fewer.
            ps.dhidden(dh, dl, n, cols, if v0 == 0 { 0.0 } else { 1.0 }, splits)?;
            // dW[v0 .. v0 + nv, :] (+)= dlᵀ [nv, n] · hidden [n, h]
            if let Some(dw) = dw {
                ps.dw(dw, dl, c.hid, n, cols, if tune.dw_overwrite && t0 == 0 { 0.0 } else { 1.0 })?;
            }
        }
        ps.scatter_sum(dhid, dh, splits.count, 0, &c)?;
    }
    Ok(())
}

/// The rows a fused pass works on: all t, or (with a mask) the active ones gathered and packed,
/// with their f32 logp / entropy temporaries and the callback's dlogp; zeroes what the pass then
/// writes only in part (dhidden when rows are skipped, dW when there are no rows at all).
struct FusedRows {
    act: Option<Active>,
    /// The gathered hidden rows and targets that `rows` points into (kept alive).
    packed: Option<(Buf, Buf)>,
    rows: Packed,
    tmp: Option<(Buf, Buf)>,
    dlogp_p: Buf,
    ta: usize,
}

impl FusedRows {
    fn new(cx: &mut Call, x: &Inputs, mask: Option<&Buf>, dhidden: &mut Buf, dlm_head: &mut Buf) -> Result<Self> {
        let (g, t, h) = (cx.g, x.dims.t, x.dims.h);
        let act = match mask {
            Some(m) if t > 0 => active_tokens(cx, m, t)?,
            _ => None,
        };
        let ta = act.as_ref().map_or(t, |a| a.n);
        if act.is_some() {
            zero(g, dhidden)?;
        }
        let packed = match &act {
            Some(a) => Some(gather_inputs(cx, a, x.hidden, x.targets, h)?),
            None => None,
        };
        let (hid, tgt) = match &packed {
            Some((hp, tp)) => (hp.ptr(g)?, tp.ptr(g)?),
            None => (x.hidden.ptr(g)?, x.targets.ptr(g)?),
        };
        let idx = match &act {
            Some(a) => a.idx.ptr(g)?,
            None => 0,
        };
        let tmp = match &act {
            Some(_) => Some((cx.scratch(DType::F32, ta)?, cx.scratch(DType::F32, ta)?)),
            None => None,
        };
        let dlogp_p = cx.scratch(DType::F32, ta)?;
        if ta == 0 && cx.tune.dw_overwrite {
            zero(g, dlm_head)?;
        }
        Ok(FusedRows { act, packed, rows: Packed { hid, tgt, idx }, tmp, dlogp_p, ta })
    }
}

/// Where the pass writes entropies: the packed temporary, the output itself, or nowhere (0).
fn entropy_ptr(g: &Gpu, tmp: &Option<(Buf, Buf)>, entropy: Option<&Buf>) -> Result<u64> {
    match (tmp, entropy) {
        (_, None) => Ok(0),
        (Some((_, e)), Some(_)) => e.ptr(g),
        (None, Some(e)) => e.ptr(g),
    }
}

/// Scatters the packed logp (and entropy) back to their t positions (zeros elsewhere).
fn expand_outputs(
    g: &Gpu, act: &Option<Active>, tmp: &Option<(Buf, Buf)>, logp: &Buf, entropy: Option<&Buf>, t: usize,
) -> Result<()> {
    if let (Some(a), Some((tl, te))) = (act, tmp) {
        expand(g, logp, tl, a, t)?;
        if let Some(e) = entropy {
            expand(g, e, te, a, t)?;
        }
    }
    Ok(())
}

/// `fwd_bwd` at `LogitPrecision::ExactF32`: f32 logit tiles folded into the kept chunk relative
/// to the running max (see the module doc of `logprob`).
pub(super) fn fwd_bwd_exact(
    cx: &mut Call, out: FusedOut, x: Inputs, mask: Option<&Buf>, grad: &mut GradFn,
) -> Result<()> {
    let (g, tune) = (cx.g, cx.tune);
    let FusedOut { logp, entropy, dhidden, dlm_head } = out;
    let (lm_head, Dims { t, h, v }) = (x.lm_head, x.dims);
    let ps = Pass::new(g, lm_head, h, v)?;
    let FusedRows { act, packed: _packed, rows, tmp, mut dlogp_p, ta } =
        FusedRows::new(cx, &x, mask, dhidden, dlm_head)?;
    if ta > 0 {
        let (tc, splits) = fused_splits(g, tune, ta, h, v, ps.dt);
        let vc = tune.fused_vocab.clamp(1, v);
        let nsub = v.div_ceil(vc);
        // Cached, not zeroed: [tc, vc] f32 tile, [tc, v] kept chunk (every row fully written by
        // the fold), S × [tc, h] f32 dhidden partials.
        let mut lay = Layout::default();
        let (o_tile, o_store, o_dh) =
            (lay.part(tc * vc * 4), lay.part(tc * v * ps.dt.size()), lay.part(splits.count * tc * h * 4));
        let sc = cx.take(&lay)?;
        let (tile, store, dh) = (sc.at(o_tile), sc.at(o_store), sc.at(o_dh));
        let moff = cx.scratch(DType::F32, tc * nsub)?;
        let stats = cx.scratch(DType::F32, tc * 4)?;
        let lse = cx.scratch(DType::F32, tc)?;
        let (moff, stats, lse) = (moff.ptr(g)?, stats.ptr(g)?, lse.ptr(g)?);
        let fold = Fold { tile, stats, store, moff };
        let (dhid, dw, dlp) = (dhidden.ptr(g)?, dlm_head.ptr(g)?, dlogp_p.ptr(g)?);
        let logp_p: &Buf = tmp.as_ref().map_or(&*logp, |(l, _)| l);
        let lp = logp_p.ptr(g)?;
        let en = entropy_ptr(g, &tmp, entropy.as_deref())?;
        for t0 in (0..ta).step_by(tc) {
            let c = rows.chunk(&ps, t0, tc.min(ta - t0));
            let n = c.n;
            ps.fold_rows(&fold, &c, vc)?;
            ps.finalize(RowOut { logp: at(lp, t0, DType::F32), lse, ent: ent_at(en, t0) }, stats, n)?;
            grad(GradChunk { p0: t0, n, idx: act.as_ref().map(|a| &a.idx), logp: logp_p, dlogp: &mut dlogp_p })?;
            ps.dlogits_stored(store, moff, lse, at(dlp, t0, DType::F32), &c, vc)?;
            // dh partials [n, h] = dlogits [n, v slice] · W [v slice, h] (split-K over V)
            let all = Cols { v0: 0, nv: v };
            ps.dhidden(dh, store, n, all, 0.0, splits)?;
            // dW [v, h] (+)= dlogitsᵀ [v, n] · hidden [n, h]
            ps.dw(dw, store, c.hid, n, all, if tune.dw_overwrite && t0 == 0 { 0.0 } else { 1.0 })?;
            // dhidden rows = Σ partials
            ps.scatter_sum(dhid, dh, splits.count, 0, &c)?;
        }
    }
    expand_outputs(g, &act, &tmp, logp, entropy.as_deref(), t)
}

/// `fwd_bwd` at `LogitPrecision::Bf16`. Per token chunk of n rows:
/// 1. one GEMM writes logits [n, v] at the storage dtype straight into the kept buffer (row
///    stride v; no f32 tile, no copy, no per-tile launches; not zeroed: the GEMM writes all of
///    rows 0 .. n before anything reads them);
/// 2. `logprob_fold_u` (one 1024-thread block per row): the online fold, lse / logp /
///    entropy, then the row is overwritten with u = onehot − e^(l − lse); the row's first
///    160 KiB stay in shared memory between the two passes;
/// 3. the callback writes g = dlogp for the chunk;
/// 4. hg [n, h] = diag(g)·hidden rows, dh = U·W (f32), dW += Uᵀ·hg, dhidden rows = diag(g)·dh.
///
/// HBM per chunk: the GEMM's write, one read and one write of the buffer.
pub(super) fn fwd_bwd_bf16(
    cx: &mut Call, out: FusedOut, x: Inputs, mask: Option<&Buf>, grad: &mut GradFn,
) -> Result<()> {
    let (g, tune) = (cx.g, cx.tune);
    let FusedOut { logp, entropy, dhidden, dlm_head } = out;
    let (lm_head, Dims { t, h, v }) = (x.lm_head, x.dims);
    let ps = Pass::new(g, lm_head, h, v)?;
    let FusedRows { act, packed: _packed, rows, tmp, mut dlogp_p, ta } =
        FusedRows::new(cx, &x, mask, dhidden, dlm_head)?;
    if ta > 0 {
        let (tc, splits) = fused_splits(g, tune, ta, h, v, ps.dt);
        // Cached, not zeroed: [tc, v] storage dtype (the chunk's logits, then u), [tc, h] g-scaled
        // hidden rows (storage dtype) and S × [tc, h] f32 partials of U·W.
        let mut lay = Layout::default();
        let (o_store, o_hg, o_dh) =
            (lay.part(tc * v * ps.dt.size()), lay.part(tc * h * ps.dt.size()), lay.part(splits.count * tc * h * 4));
        let sc = cx.take(&lay)?;
        let (store, hg, dh) = (sc.at(o_store), sc.at(o_hg), sc.at(o_dh));
        let lse = cx.scratch(DType::F32, tc)?;
        let lse = lse.ptr(g)?;
        let (dhid, dw, dlp) = (dhidden.ptr(g)?, dlm_head.ptr(g)?, dlogp_p.ptr(g)?);
        let logp_p: &Buf = tmp.as_ref().map_or(&*logp, |(l, _)| l);
        let lp = logp_p.ptr(g)?;
        let en = entropy_ptr(g, &tmp, entropy.as_deref())?;
        let cache = ps.fold_u_cache();
        for t0 in (0..ta).step_by(tc) {
            let c = rows.chunk(&ps, t0, tc.min(ta - t0));
            let n = c.n;
            let dlp_t0 = at(dlp, t0, DType::F32);
            // logits [n, v] = hidden rows [n, h] · W [v, h]ᵀ, rounded once to the storage dtype.
            ps.logits_kept(store, c.hid, n)?;
            ps.fold_u(store, RowOut { logp: at(lp, t0, DType::F32), lse, ent: ent_at(en, t0) }, &c, Some(cache))?;
            grad(GradChunk { p0: t0, n, idx: act.as_ref().map(|a| &a.idx), logp: logp_p, dlogp: &mut dlogp_p })?;
            // hg = diag(g) · hidden rows
            api::logprob::LogprobScaleRows { dst: hg, src: c.hid, g: dlp_t0, n: n as i32, cols: h as i32 }.launch(
                g,
                ps.dt,
                cfg_rows(n, BLOCK, 0),
            )?;
            // dh partials [n, h] = U [n, v slice] · W [v slice, h] (split-K over V)
            let all = Cols { v0: 0, nv: v };
            ps.dhidden(dh, store, n, all, 0.0, splits)?;
            // dW [v, h] (+)= Uᵀ [v, n] · hg [n, h]
            ps.dw(dw, store, hg, n, all, if tune.dw_overwrite && t0 == 0 { 0.0 } else { 1.0 })?;
            // dhidden rows = diag(g) · Σ partials
            ps.scatter_sum(dhid, dh, splits.count, dlp_t0, &c)?;
        }
    }
    expand_outputs(g, &act, &tmp, logp, entropy.as_deref(), t)
}

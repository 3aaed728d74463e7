//! CUDA launchers of the grouped log-prob: the plain forward/backward and the fused GRPO pass, at
//! either `LogitPrecision` (see PERF-logprob.md). Pointers are raw device addresses. The large scratch
//! (kept logits, f32 tiles, dhidden partials) comes from the per-process cache in arena.rs and is
//! never zeroed: each part is fully written by a GEMM or kernel before anything reads it. The
//! dhidden GEMMs run split over vocabulary slices (splitk.rs).

use super::arena::{self, Layout};
use super::splitk::{self, SplitGemm, Splits};
use super::*;
use crate::cuda::api;

fn gemm_type(dt: DType) -> GemmType {
    match dt {
        DType::BF16 => GemmType::Bf16,
        _ => GemmType::F32,
    }
}

/// Address of element `i` of a buffer whose elements are `dt`.
fn at(p: u64, i: usize, dt: DType) -> u64 {
    p + (i * dt.size()) as u64
}

fn scratch(dev: &Device, dt: DType, n: usize, meter: &mut usize) -> Result<Buf> {
    *meter += n.max(1) * dt.size();
    dev.zeros(dt, n)
}

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

/// A 2-D grid: `cols` columns covered by blocks of BLOCK threads × `per` columns, one grid row per token.
fn cfg_cols(cols: usize, per: usize, rows: usize) -> LaunchConfig {
    let x = cols.div_ceil(BLOCK as usize * per).max(1) as u32;
    LaunchConfig { grid_dim: (x, rows.max(1) as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Columns per thread of the 16-byte vector paths.
fn vec_n(dt: DType) -> usize {
    16 / dt.size()
}

/// The tokens with flags != 0, when some are not: (count, idx [t] i32, pos [t] i32).
pub(super) struct Active {
    pub n: usize,
    pub idx: Buf,
    pub pos: Buf,
}

fn active_tokens(g: &Gpu, dev: &Device, flags: &Buf, t: usize, meter: &mut usize) -> Result<Option<Active>> {
    let idx = scratch(dev, DType::I32, t, meter)?;
    let pos = scratch(dev, DType::I32, t, meter)?;
    let cnt = scratch(dev, DType::I32, 1, meter)?;
    api::logprob::LogprobScanNonzero {
        idx: idx.ptr(g)?,
        pos: pos.ptr(g)?,
        count: cnt.ptr(g)?,
        flags: flags.ptr(g)?,
        n: t as i32,
    }
    .launch(g, cfg_rows(1, 1024, 0))?;
    let n = dev.to_vec_i32(&cnt)?.first().copied().unwrap_or(0).max(0) as usize;
    Ok(if n == t { None } else { Some(Active { n, idx, pos }) })
}

/// The packed copies of hidden [ta, h] and targets [ta] when tokens were compacted.
fn gather_inputs(
    g: &Gpu, dev: &Device, a: &Active, hidden: &Buf, targets: &Buf, h: usize, meter: &mut usize,
) -> Result<(Buf, Buf)> {
    let dt = hidden.dtype();
    let hp = scratch(dev, dt, a.n * h, meter)?;
    let tp = scratch(dev, DType::I32, a.n, meter)?;
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

/// Shapes and pointers shared by the passes over one token chunk.
struct Pass {
    dt: DType,
    gt: GemmType,
    h: usize,
    v: usize,
    /// lm_head [v, h].
    w: u64,
}

impl Pass {
    /// f32 logits [n, nv] at `out` = hidden rows [n, h] at `hid` · lm_head rows v0 .. v0 + nv, transposed.
    fn logits(&self, g: &Gpu, out: u64, hid: u64, n: usize, v0: usize, nv: usize) -> Result<()> {
        self.logits_as(g, out, hid, n, v0, nv, GemmType::F32)
    }

    /// `logits` with the output type `ct` (the storage type: logits rounded as at LogitPrecision::Bf16).
    #[allow(clippy::too_many_arguments)]
    fn logits_as(&self, g: &Gpu, out: u64, hid: u64, n: usize, v0: usize, nv: usize, ct: GemmType) -> Result<()> {
        g.blas.gemm(&Gemm {
            m: n,
            n: nv,
            k: self.h,
            trans_a: false,
            trans_b: true,
            alpha: 1.0,
            beta: 0.0,
            a: hid,
            b: at(self.w, v0 * self.h, self.dt),
            c: out,
            ab_type: self.gt,
            c_type: ct,
            batch: (1, 0, 0, 0),
        })
    }

    /// Folds every vocab tile of the chunk's rows into `stats` [n, 4]; with `store`, also keeps
    /// the tiles ([n, v] at the storage dtype, values relative to `moff` [n, nsub]).
    #[allow(clippy::too_many_arguments)]
    fn fold_rows(
        &self, g: &Gpu, tile: u64, stats: u64, store: u64, moff: u64, hid: u64, tgt: u64, n: usize, vc: usize,
    ) -> Result<()> {
        let nsub = self.v.div_ceil(vc);
        for j in 0..nsub {
            let v0 = j * vc;
            let nv = vc.min(self.v - v0);
            self.logits(g, tile, hid, n, v0, nv)?;
            api::logprob::LogprobFold {
                stats,
                store,
                moff,
                logits: tile,
                targets: tgt,
                n: n as i32,
                nv: nv as i32,
                v0: v0 as i32,
                v: self.v as i32,
                sub: j as i32,
                nsub: nsub as i32,
                first: (j == 0) as i32,
            }
            .launch(g, self.dt, cfg_rows(n, BLOCK, 0))?;
        }
        Ok(())
    }

    fn finalize(&self, g: &Gpu, logp: u64, lse: u64, ent: u64, stats: u64, n: usize) -> Result<()> {
        api::logprob::LogprobFinalize { logp, lse, ent, stats, n: n as i32 }.launch(g, cfg_1d(n, 256))
    }

    /// dst rows (idx[i], or row0 + i) = gs[i] · Σ_p src[p] [n, h] (f32 partials `pstride`
    /// elements apart; gs null = 1), converted to the storage dtype.
    #[allow(clippy::too_many_arguments)]
    fn scatter_sum(
        &self, g: &Gpu, dst: u64, src: u64, gs: u64, idx: u64, row0: usize, n: usize, nsplit: usize, pstride: usize,
    ) -> Result<()> {
        api::logprob::LogprobScatterSum {
            dst,
            src,
            g: gs,
            idx,
            row0: row0 as i32,
            n: n as i32,
            cols: self.h as i32,
            nsplit: nsplit as i32,
            pstride: pstride as i64,
        }
        .launch(g, self.dt, cfg_rows(n, BLOCK, 0))
    }

    /// logits [n, v] at the storage dtype into `store` (row stride v) = hidden rows [n, h] at
    /// `hid` · Wᵀ, rounded once. The Bf16 fused pass and `fwd` at that precision both call this, so the
    /// same chunk gives the same bits.
    fn logits_kept(&self, g: &Gpu, store: u64, hid: u64, n: usize) -> Result<()> {
        g.blas.gemm(&Gemm {
            m: n,
            n: self.v,
            k: self.h,
            trans_a: false,
            trans_b: true,
            alpha: 1.0,
            beta: 0.0,
            a: hid,
            b: self.w,
            c: store,
            ab_type: self.gt,
            c_type: self.gt,
            batch: (1, 0, 0, 0),
        })
    }

    /// partial[p] [n, h] f32 (β)= U[:, slice p] · W[v0 + slice p, :]; U [n, k] at `u`, row stride `ldu`.
    #[allow(clippy::too_many_arguments)]
    fn dhidden(
        &self, g: &Gpu, part: u64, u: u64, ldu: usize, v0: usize, k: usize, n: usize, beta: f32, splits: Splits,
    ) -> Result<()> {
        let sg = SplitGemm { u, ldu, w: at(self.w, v0 * self.h, self.dt), part, m: n, h: self.h, k, ab: self.gt, beta };
        splitk::gemm(g, &sg, splits)
    }

    /// dW rows v0 .. v0 + nv (f32, β = 0 or 1) = U [n, nv]ᵀ (row stride nv) · x [n, h].
    #[allow(clippy::too_many_arguments)]
    fn dw(&self, g: &Gpu, dw: u64, u: u64, x: u64, n: usize, v0: usize, nv: usize, beta: f32) -> Result<()> {
        g.blas.gemm(&Gemm {
            m: nv,
            n: self.h,
            k: n,
            trans_a: true,
            trans_b: false,
            alpha: 1.0,
            beta,
            a: u,
            b: x,
            c: at(dw, v0 * self.h, DType::F32),
            ab_type: self.gt,
            c_type: GemmType::F32,
            batch: (1, 0, 0, 0),
        })
    }
}

fn pass(g: &Gpu, lm_head: &Buf, h: usize, v: usize) -> Result<Pass> {
    let dt = lm_head.dtype();
    Ok(Pass { dt, gt: gemm_type(dt), h, v, w: lm_head.ptr(g)? })
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

/// The fused pass's dhidden GEMM for one chunk of n rows (see `super::dhidden_split_gemm`).
#[allow(clippy::too_many_arguments)]
pub(super) fn dhidden_stage(
    g: &Gpu, tune: &Tuning, lm_head: &Buf, u: u64, part: u64, n: usize, h: usize, v: usize,
) -> Result<usize> {
    let ps = pass(g, lm_head, h, v)?;
    let splits = dh_splits(g, tune, n, h, v, 8.0 * (n * h) as f64);
    ps.dhidden(g, part, u, v, 0, v, n, 0.0, splits)?;
    Ok(splits.count)
}

/// Takes the cached scratch for `lay` and counts it.
fn take(dev: &Device, tune: &Tuning, lay: &Layout, meter: &mut usize) -> Result<arena::Scratch> {
    *meter += lay.bytes;
    arena::take(dev, lay.bytes, tune.cache_scratch)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn fwd(
    g: &Gpu, dev: &Device, tune: &Tuning, meter: &mut usize, logp: &mut Buf, lse: &mut Buf, entropy: Option<&mut Buf>,
    hidden: &Buf, lm_head: &Buf, targets: &Buf, mask: Option<&Buf>, t: usize, h: usize, v: usize,
) -> Result<()> {
    let ps = pass(g, lm_head, h, v)?;
    let act = match mask {
        Some(m) if t > 0 => active_tokens(g, dev, m, t, meter)?,
        _ => None,
    };
    let ta = act.as_ref().map_or(t, |a| a.n);
    let packed = match &act {
        Some(a) => Some(gather_inputs(g, dev, a, hidden, targets, h, meter)?),
        None => None,
    };
    let (hid, tgt) = match &packed {
        Some((hp, tp)) => (hp.ptr(g)?, tp.ptr(g)?),
        None => (hidden.ptr(g)?, targets.ptr(g)?),
    };
    // Packed outputs: the outputs themselves unless tokens were compacted.
    let tmp = match &act {
        Some(_) => Some((
            scratch(dev, DType::F32, ta, meter)?,
            scratch(dev, DType::F32, ta, meter)?,
            scratch(dev, DType::F32, ta, meter)?,
        )),
        None => None,
    };
    let (lp, ls, en) = match &tmp {
        Some((a, b, c)) => (a.ptr(g)?, b.ptr(g)?, if entropy.is_some() { c.ptr(g)? } else { 0 }),
        None => (logp.ptr(g)?, lse.ptr(g)?, opt_ptr(g, entropy.as_deref())?),
    };
    if ta > 0 && tune.precision == LogitPrecision::Bf16 {
        fwd_kept(g, dev, tune, meter, &ps, hid, tgt, lp, ls, en, ta)?;
    } else if ta > 0 {
        let tc = chunk_rows(ta, tune.fwd_tokens);
        let vc = tune.fwd_vocab.clamp(1, v);
        let mut lay = Layout::default();
        let o_tile = lay.part(tc * vc * 4);
        let sc = take(dev, tune, &lay, meter)?;
        let tile = sc.at(o_tile);
        let stats = scratch(dev, DType::F32, tc * 4, meter)?;
        let stats = stats.ptr(g)?;
        for t0 in (0..ta).step_by(tc) {
            let n = tc.min(ta - t0);
            ps.fold_rows(g, tile, stats, 0, 0, at(hid, t0 * h, ps.dt), at(tgt, t0, DType::I32), n, vc)?;
            let en_t0 = if en == 0 { 0 } else { at(en, t0, DType::F32) };
            ps.finalize(g, at(lp, t0, DType::F32), at(ls, t0, DType::F32), en_t0, stats, n)?;
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
/// writes u), so logp, lse and the entropy equal the fused pass's bit for bit. lp, ls, en: packed
/// outputs [ta] (en may be 0).
#[allow(clippy::too_many_arguments)]
fn fwd_kept(
    g: &Gpu, dev: &Device, tune: &Tuning, meter: &mut usize, ps: &Pass, hid: u64, tgt: u64, lp: u64, ls: u64, en: u64,
    ta: usize,
) -> Result<()> {
    let (h, v) = (ps.h, ps.v);
    let tc = fused_rows(ta, v, ps.dt, tune);
    let mut lay = Layout::default();
    let o_store = lay.part(tc * v * ps.dt.size());
    let sc = take(dev, tune, &lay, meter)?;
    let store = sc.at(o_store);
    for t0 in (0..ta).step_by(tc) {
        let n = tc.min(ta - t0);
        let (hid_t0, tgt_t0) = (at(hid, t0 * h, ps.dt), at(tgt, t0, DType::I32));
        let (lp_t0, ls_t0) = (at(lp, t0, DType::F32), at(ls, t0, DType::F32));
        let en_t0 = if en == 0 { 0 } else { at(en, t0, DType::F32) };
        ps.logits_kept(g, store, hid_t0, n)?;
        let cfg = LaunchConfig { grid_dim: (n_blocks(n), 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        api::logprob::LogprobFoldU {
            buf: store,
            logp: lp_t0,
            lse: ls_t0,
            ent: en_t0,
            targets: tgt_t0,
            n: n as i32,
            v: v as i32,
            cache: 0,
            write_u: 0,
        }
        .launch(g, ps.dt, cfg)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn bwd(
    g: &Gpu, dev: &Device, tune: &Tuning, meter: &mut usize, dhidden: &mut Buf, dlm_head: Option<&mut Buf>,
    dlogp: &Buf, hidden: &Buf, lm_head: &Buf, targets: &Buf, lse: &Buf, t: usize, h: usize, v: usize,
) -> Result<()> {
    let ps = pass(g, lm_head, h, v)?;
    if t == 0 {
        return match dlm_head {
            Some(dw) if tune.dw_overwrite => zero(g, dw),
            _ => Ok(()),
        };
    }
    // Only tokens with a non-zero upstream gradient contribute.
    let act = active_tokens(g, dev, dlogp, t, meter)?;
    let ta = act.as_ref().map_or(t, |a| a.n);
    let packed = match &act {
        Some(a) => {
            zero(g, dhidden)?;
            let (hp, tp) = gather_inputs(g, dev, a, hidden, targets, h, meter)?;
            let dp = scratch(dev, DType::F32, a.n, meter)?;
            let lp = scratch(dev, DType::F32, a.n, meter)?;
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
    let sc = take(dev, tune, &lay, meter)?;
    let (tile, dl, dh) = (sc.at(o_tile), sc.at(o_dl), sc.at(o_dh));
    // A frozen head (None) skips the dW GEMM: the largest of the step at 7B.
    let (dhid, dw) = (dhidden.ptr(g)?, dlm_head.as_deref().map(|b| b.ptr(g)).transpose()?);
    for t0 in (0..ta).step_by(tc) {
        let n = tc.min(ta - t0);
        let hid_t0 = at(hid, t0 * h, ps.dt);
        let (ls_t0, dlp_t0, tgt_t0) = (at(lsp, t0, DType::F32), at(dlp, t0, DType::F32), at(tgt, t0, DType::I32));
        for v0 in (0..v).step_by(vc) {
            let nv = vc.min(v - v0);
            if kept {
                ps.logits_as(g, dl, hid_t0, n, v0, nv, ps.gt)?;
                api::logprob::LogprobDlogitsInplace {
                    buf: dl,
                    lse: ls_t0,
                    dlogp: dlp_t0,
                    targets: tgt_t0,
                    n: n as i32,
                    nv: nv as i32,
                    v0: v0 as i32,
                }
                .launch(g, ps.dt, cfg_cols(nv, vec_n(ps.dt), n))?;
            } else {
                ps.logits(g, tile, hid_t0, n, v0, nv)?;
                api::logprob::LogprobDlogits {
                    out: dl,
                    logits: tile,
                    lse: ls_t0,
                    dlogp: dlp_t0,
                    targets: tgt_t0,
                    n: n as i32,
                    nv: nv as i32,
                    v0: v0 as i32,
                }
                .launch(g, ps.dt, cfg_cols(nv, vec_n(ps.dt), n))?;
            }
            // dh partials [n, h] (+)= dl [n, nv] · W[v0 .. v0 + nv, :], slice by slice. The first
            // tile (the widest) writes every partial; a shorter last tile may touch fewer.
            ps.dhidden(g, dh, dl, nv, v0, nv, n, if v0 == 0 { 0.0 } else { 1.0 }, splits)?;
            // dW[v0 .. v0 + nv, :] (+)= dlᵀ [nv, n] · hidden [n, h]
            if let Some(dw) = dw {
                ps.dw(g, dw, dl, hid_t0, n, v0, nv, if tune.dw_overwrite && t0 == 0 { 0.0 } else { 1.0 })?;
            }
        }
        let idx_t0 = if idx == 0 { 0 } else { at(idx, t0, DType::I32) };
        ps.scatter_sum(g, dhid, dh, 0, idx_t0, t0, n, splits.count, n * h)?;
    }
    Ok(())
}

/// `fwd_bwd` at `LogitPrecision::ExactF32`: f32 logit tiles folded into the kept chunk relative
/// to the running max (see the module doc of `logprob`).
#[allow(clippy::too_many_arguments)]
pub(super) fn fwd_bwd_exact(
    g: &Gpu, dev: &Device, tune: &Tuning, meter: &mut usize, logp: &mut Buf, entropy: Option<&mut Buf>,
    dhidden: &mut Buf, dlm_head: &mut Buf, hidden: &Buf, lm_head: &Buf, targets: &Buf, mask: Option<&Buf>, t: usize,
    h: usize, v: usize, grad: &mut GradFn,
) -> Result<()> {
    let ps = pass(g, lm_head, h, v)?;
    let act = match mask {
        Some(m) if t > 0 => active_tokens(g, dev, m, t, meter)?,
        _ => None,
    };
    let ta = act.as_ref().map_or(t, |a| a.n);
    if act.is_some() {
        zero(g, dhidden)?;
    }
    let packed = match &act {
        Some(a) => Some(gather_inputs(g, dev, a, hidden, targets, h, meter)?),
        None => None,
    };
    let (hid, tgt) = match &packed {
        Some((hp, tp)) => (hp.ptr(g)?, tp.ptr(g)?),
        None => (hidden.ptr(g)?, targets.ptr(g)?),
    };
    let idx = match &act {
        Some(a) => a.idx.ptr(g)?,
        None => 0,
    };
    let tmp = match &act {
        Some(_) => Some((scratch(dev, DType::F32, ta, meter)?, scratch(dev, DType::F32, ta, meter)?)),
        None => None,
    };
    let mut dlogp_p = scratch(dev, DType::F32, ta, meter)?;
    if ta == 0 && tune.dw_overwrite {
        zero(g, dlm_head)?;
    }
    if ta > 0 {
        let (tc, splits) = fused_splits(g, tune, ta, h, v, ps.dt);
        let vc = tune.fused_vocab.clamp(1, v);
        let nsub = v.div_ceil(vc);
        // Cached, not zeroed: [tc, vc] f32 tile, [tc, v] kept chunk (every row fully written by
        // the fold), S × [tc, h] f32 dhidden partials.
        let mut lay = Layout::default();
        let (o_tile, o_store, o_dh) =
            (lay.part(tc * vc * 4), lay.part(tc * v * ps.dt.size()), lay.part(splits.count * tc * h * 4));
        let sc = take(dev, tune, &lay, meter)?;
        let (tile, store, dh) = (sc.at(o_tile), sc.at(o_store), sc.at(o_dh));
        let moff = scratch(dev, DType::F32, tc * nsub, meter)?;
        let stats = scratch(dev, DType::F32, tc * 4, meter)?;
        let lse = scratch(dev, DType::F32, tc, meter)?;
        let (moff, stats, lse) = (moff.ptr(g)?, stats.ptr(g)?, lse.ptr(g)?);
        let (dhid, dw, dlp) = (dhidden.ptr(g)?, dlm_head.ptr(g)?, dlogp_p.ptr(g)?);
        let logp_p: &Buf = match &tmp {
            Some((l, _)) => l,
            None => &*logp,
        };
        let lp = logp_p.ptr(g)?;
        let en = match (&tmp, entropy.as_deref()) {
            (_, None) => 0,
            (Some((_, e)), Some(_)) => e.ptr(g)?,
            (None, Some(e)) => e.ptr(g)?,
        };
        for t0 in (0..ta).step_by(tc) {
            let n = tc.min(ta - t0);
            let hid_t0 = at(hid, t0 * h, ps.dt);
            let tgt_t0 = at(tgt, t0, DType::I32);
            ps.fold_rows(g, tile, stats, store, moff, hid_t0, tgt_t0, n, vc)?;
            let en_t0 = if en == 0 { 0 } else { at(en, t0, DType::F32) };
            ps.finalize(g, at(lp, t0, DType::F32), lse, en_t0, stats, n)?;
            grad(GradChunk { p0: t0, n, idx: act.as_ref().map(|a| &a.idx), logp: logp_p, dlogp: &mut dlogp_p })?;
            api::logprob::LogprobDlogitsStored {
                buf: store,
                moff,
                lse,
                dlogp: at(dlp, t0, DType::F32),
                targets: tgt_t0,
                n: n as i32,
                v: v as i32,
                vc: vc as i32,
                nsub: nsub as i32,
            }
            .launch(g, ps.dt, cfg_cols(v, vec_n(ps.dt), n))?;
            // dh partials [n, h] = dlogits [n, v slice] · W [v slice, h] (split-K over V)
            ps.dhidden(g, dh, store, v, 0, v, n, 0.0, splits)?;
            // dW [v, h] (+)= dlogitsᵀ [v, n] · hidden [n, h]
            ps.dw(g, dw, store, hid_t0, n, 0, v, if tune.dw_overwrite && t0 == 0 { 0.0 } else { 1.0 })?;
            // dhidden rows = Σ partials
            let idx_t0 = if idx == 0 { 0 } else { at(idx, t0, DType::I32) };
            ps.scatter_sum(g, dhid, dh, 0, idx_t0, t0, n, splits.count, n * h)?;
        }
    }
    if let (Some(a), Some((tl, te))) = (&act, &tmp) {
        expand(g, logp, tl, a, t)?;
        if let Some(e) = entropy.as_deref() {
            expand(g, e, te, a, t)?;
        }
    }
    Ok(())
}

/// Bytes of a row cached in shared memory by `logprob_fold_u` (the rest is re-read). Over half an
/// SM's shared memory, so one block runs per SM and the re-read rows stay in L2; under A100's 164 KiB.
const FOLD_U_SMEM: usize = 160 << 10;

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
#[allow(clippy::too_many_arguments)]
pub(super) fn fwd_bwd_bf16(
    g: &Gpu, dev: &Device, tune: &Tuning, meter: &mut usize, logp: &mut Buf, entropy: Option<&mut Buf>,
    dhidden: &mut Buf, dlm_head: &mut Buf, hidden: &Buf, lm_head: &Buf, targets: &Buf, mask: Option<&Buf>, t: usize,
    h: usize, v: usize, grad: &mut GradFn,
) -> Result<()> {
    let ps = pass(g, lm_head, h, v)?;
    let act = match mask {
        Some(m) if t > 0 => active_tokens(g, dev, m, t, meter)?,
        _ => None,
    };
    let ta = act.as_ref().map_or(t, |a| a.n);
    if act.is_some() {
        zero(g, dhidden)?;
    }
    let packed = match &act {
        Some(a) => Some(gather_inputs(g, dev, a, hidden, targets, h, meter)?),
        None => None,
    };
    let (hid, tgt) = match &packed {
        Some((hp, tp)) => (hp.ptr(g)?, tp.ptr(g)?),
        None => (hidden.ptr(g)?, targets.ptr(g)?),
    };
    let idx = match &act {
        Some(a) => a.idx.ptr(g)?,
        None => 0,
    };
    let tmp = match &act {
        Some(_) => Some((scratch(dev, DType::F32, ta, meter)?, scratch(dev, DType::F32, ta, meter)?)),
        None => None,
    };
    let mut dlogp_p = scratch(dev, DType::F32, ta, meter)?;
    if ta == 0 && tune.dw_overwrite {
        zero(g, dlm_head)?;
    }
    if ta > 0 {
        let (tc, splits) = fused_splits(g, tune, ta, h, v, ps.dt);
        // Cached, not zeroed: [tc, v] storage dtype (the chunk's logits, then u), [tc, h] g-scaled
        // hidden rows (storage dtype) and S × [tc, h] f32 partials of U·W.
        let mut lay = Layout::default();
        let (o_store, o_hg, o_dh) =
            (lay.part(tc * v * ps.dt.size()), lay.part(tc * h * ps.dt.size()), lay.part(splits.count * tc * h * 4));
        let sc = take(dev, tune, &lay, meter)?;
        let (store, hg, dh) = (sc.at(o_store), sc.at(o_hg), sc.at(o_dh));
        let lse = scratch(dev, DType::F32, tc, meter)?;
        let lse = lse.ptr(g)?;
        let (dhid, dw, dlp) = (dhidden.ptr(g)?, dlm_head.ptr(g)?, dlogp_p.ptr(g)?);
        let logp_p: &Buf = match &tmp {
            Some((l, _)) => l,
            None => &*logp,
        };
        let lp = logp_p.ptr(g)?;
        let en = match (&tmp, entropy.as_deref()) {
            (_, None) => 0,
            (Some((_, e)), Some(_)) => e.ptr(g)?,
            (None, Some(e)) => e.ptr(g)?,
        };
        // Cached values per row: a multiple of the 16-byte vector, at most the row.
        let vn = vec_n(ps.dt);
        let cache = (FOLD_U_SMEM / ps.dt.size()).min(v) / vn * vn;
        let cache = if cache == 0 { v.min(FOLD_U_SMEM / ps.dt.size()) } else { cache };
        let fold_cfg = LaunchConfig {
            grid_dim: (n_blocks(tc), 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: (cache * ps.dt.size()) as u32,
        };
        for t0 in (0..ta).step_by(tc) {
            let n = tc.min(ta - t0);
            let hid_t0 = at(hid, t0 * h, ps.dt);
            let tgt_t0 = at(tgt, t0, DType::I32);
            let dlp_t0 = at(dlp, t0, DType::F32);
            // logits [n, v] = hidden rows [n, h] · W [v, h]ᵀ, rounded once to the storage dtype.
            ps.logits_kept(g, store, hid_t0, n)?;
            let en_t0 = if en == 0 { 0 } else { at(en, t0, DType::F32) };
            api::logprob::LogprobFoldU {
                buf: store,
                logp: at(lp, t0, DType::F32),
                lse,
                ent: en_t0,
                targets: tgt_t0,
                n: n as i32,
                v: v as i32,
                cache: cache as i32,
                write_u: 1,
            }
            .launch(g, ps.dt, LaunchConfig { grid_dim: (n_blocks(n), 1, 1), ..fold_cfg })?;
            grad(GradChunk { p0: t0, n, idx: act.as_ref().map(|a| &a.idx), logp: logp_p, dlogp: &mut dlogp_p })?;
            // hg = diag(g) · hidden rows
            api::logprob::LogprobScaleRows { dst: hg, src: hid_t0, g: dlp_t0, n: n as i32, cols: h as i32 }.launch(
                g,
                ps.dt,
                cfg_rows(n, BLOCK, 0),
            )?;
            // dh partials [n, h] = U [n, v slice] · W [v slice, h] (split-K over V)
            ps.dhidden(g, dh, store, v, 0, v, n, 0.0, splits)?;
            // dW [v, h] (+)= Uᵀ [v, n] · hg [n, h]
            ps.dw(g, dw, store, hg, n, 0, v, if tune.dw_overwrite && t0 == 0 { 0.0 } else { 1.0 })?;
            // dhidden rows = diag(g) · Σ partials
            let idx_t0 = if idx == 0 { 0 } else { at(idx, t0, DType::I32) };
            ps.scatter_sum(g, dhid, dh, dlp_t0, idx_t0, t0, n, splits.count, n * h)?;
        }
    }
    if let (Some(a), Some((tl, te))) = (&act, &tmp) {
        expand(g, logp, tl, a, t)?;
        if let Some(e) = entropy.as_deref() {
            expand(g, e, te, a, t)?;
        }
    }
    Ok(())
}

fn n_blocks(rows: usize) -> u32 {
    rows.max(1) as u32
}

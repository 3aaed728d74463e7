//! CUDA launchers of the grouped log-prob: the plain forward/backward, the fused GRPO pass and its
//! v2/v3 variants (see PERF-logprob.md). Pointers are raw device addresses.

use super::*;

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

/// Scratch left uninitialised (no memset): for buffers a GEMM fully writes before any read.
fn scratch_uninit(g: &Gpu, dev: &Device, dt: DType, n: usize, meter: &mut usize) -> Result<Buf> {
    *meter += n.max(1) * dt.size();
    // SAFETY: the callers read only elements that the logits GEMM wrote first.
    let r = match dt {
        DType::BF16 => unsafe { g.stream.alloc::<half::bf16>(n.max(1)) }.map(|s| Buf::DevBf16(s, n)),
        DType::F32 => unsafe { g.stream.alloc::<f32>(n.max(1)) }.map(|s| Buf::DevF32(s, n)),
        _ => return dev.zeros(dt, n),
    };
    r.map_err(|e| anyhow::anyhow!("logprob: allocating {:.1} MiB of scratch failed: {e}", (n * dt.size()) as f64 / (1u64 << 20) as f64))
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
    let args = [Arg::Ptr(idx.ptr(g)?), Arg::Ptr(pos.ptr(g)?), Arg::Ptr(cnt.ptr(g)?), Arg::Ptr(flags.ptr(g)?), Arg::I32(t as i32)];
    g.launch(MODULE, "logprob_scan_nonzero", cfg_rows(1, 1024, 0), &args)?;
    let n = dev.to_vec_i32(&cnt)?.first().copied().unwrap_or(0).max(0) as usize;
    Ok(if n == t { None } else { Some(Active { n, idx, pos }) })
}

/// The packed copies of hidden [ta, h] and targets [ta] when tokens were compacted.
fn gather_inputs(g: &Gpu, dev: &Device, a: &Active, hidden: &Buf, targets: &Buf, h: usize, meter: &mut usize) -> Result<(Buf, Buf)> {
    let dt = hidden.dtype();
    let hp = scratch(dev, dt, a.n * h, meter)?;
    let tp = scratch(dev, DType::I32, a.n, meter)?;
    if a.n > 0 {
        let args = [Arg::Ptr(hp.ptr(g)?), Arg::Ptr(hidden.ptr(g)?), Arg::Ptr(a.idx.ptr(g)?), Arg::I32(a.n as i32), Arg::I32(h as i32)];
        g.launch(MODULE, &kname("logprob_gather_rows", dt), cfg_rows(a.n, BLOCK, 0), &args)?;
        let args = [Arg::Ptr(tp.ptr(g)?), Arg::Ptr(targets.ptr(g)?), Arg::Ptr(a.idx.ptr(g)?), Arg::I32(a.n as i32)];
        g.launch(MODULE, "logprob_gather_vec_i32", cfg_1d(a.n, 256), &args)?;
    }
    Ok((hp, tp))
}

/// dst [t] f32 = src [ta] at active tokens, 0 elsewhere.
fn expand(g: &Gpu, dst: &Buf, src: &Buf, a: &Active, t: usize) -> Result<()> {
    let args = [Arg::Ptr(dst.ptr(g)?), Arg::Ptr(src.ptr(g)?), Arg::Ptr(a.pos.ptr(g)?), Arg::I32(t as i32)];
    g.launch(MODULE, "logprob_expand_vec_f32", cfg_1d(t, 256), &args)
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
            c_type: GemmType::F32,
            batch: (1, 0, 0, 0),
        })
    }

    /// Folds every vocab tile of the chunk's rows into `stats` [n, 4]; with `store`, also keeps
    /// the tiles ([n, v] at the storage dtype, values relative to `moff` [n, nsub]).
    #[allow(clippy::too_many_arguments)]
    fn fold_rows(&self, g: &Gpu, tile: u64, stats: u64, store: u64, moff: u64, hid: u64, tgt: u64, n: usize, vc: usize) -> Result<()> {
        let nsub = self.v.div_ceil(vc);
        let name = kname("logprob_fold", self.dt);
        for j in 0..nsub {
            let v0 = j * vc;
            let nv = vc.min(self.v - v0);
            self.logits(g, tile, hid, n, v0, nv)?;
            let args = [
                Arg::Ptr(stats),
                Arg::Ptr(store),
                Arg::Ptr(moff),
                Arg::Ptr(tile),
                Arg::Ptr(tgt),
                Arg::I32(n as i32),
                Arg::I32(nv as i32),
                Arg::I32(v0 as i32),
                Arg::I32(self.v as i32),
                Arg::I32(j as i32),
                Arg::I32(nsub as i32),
                Arg::I32((j == 0) as i32),
            ];
            g.launch(MODULE, &name, cfg_rows(n, BLOCK, 0), &args)?;
        }
        Ok(())
    }

    fn finalize(&self, g: &Gpu, logp: u64, lse: u64, ent: u64, stats: u64, n: usize) -> Result<()> {
        let args = [Arg::Ptr(logp), Arg::Ptr(lse), Arg::Ptr(ent), Arg::Ptr(stats), Arg::I32(n as i32)];
        g.launch(MODULE, "logprob_finalize", cfg_1d(n, 256), &args)
    }

    /// dst rows (idx[i], or row0 + i) = src [n, h] f32, converted to the storage dtype.
    fn scatter(&self, g: &Gpu, dst: u64, src: u64, idx: u64, row0: usize, n: usize) -> Result<()> {
        let args = [Arg::Ptr(dst), Arg::Ptr(src), Arg::Ptr(idx), Arg::I32(row0 as i32), Arg::I32(n as i32), Arg::I32(self.h as i32)];
        g.launch(MODULE, &kname("logprob_scatter_rows", self.dt), cfg_rows(n, BLOCK, 0), &args)
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

#[allow(clippy::too_many_arguments)]
pub(super) fn fwd(g: &Gpu, dev: &Device, tune: &Tuning, meter: &mut usize, logp: &mut Buf, lse: &mut Buf, entropy: Option<&mut Buf>, hidden: &Buf, lm_head: &Buf, targets: &Buf, mask: Option<&Buf>, t: usize, h: usize, v: usize) -> Result<()> {
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
        Some(_) => Some((scratch(dev, DType::F32, ta, meter)?, scratch(dev, DType::F32, ta, meter)?, scratch(dev, DType::F32, ta, meter)?)),
        None => None,
    };
    let (lp, ls, en) = match &tmp {
        Some((a, b, c)) => (a.ptr(g)?, b.ptr(g)?, if entropy.is_some() { c.ptr(g)? } else { 0 }),
        None => (logp.ptr(g)?, lse.ptr(g)?, opt_ptr(g, entropy.as_deref())?),
    };
    if ta > 0 {
        let tc = chunk_rows(ta, tune.fwd_tokens);
        let vc = tune.fwd_vocab.clamp(1, v);
        let tile = scratch(dev, DType::F32, tc * vc, meter)?;
        let stats = scratch(dev, DType::F32, tc * 4, meter)?;
        let (tile, stats) = (tile.ptr(g)?, stats.ptr(g)?);
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

#[allow(clippy::too_many_arguments)]
pub(super) fn bwd(g: &Gpu, dev: &Device, tune: &Tuning, meter: &mut usize, dhidden: &mut Buf, dlm_head: &mut Buf, dlogp: &Buf, hidden: &Buf, lm_head: &Buf, targets: &Buf, lse: &Buf, t: usize, h: usize, v: usize) -> Result<()> {
    let ps = pass(g, lm_head, h, v)?;
    if t == 0 {
        return Ok(());
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
                    let args = [Arg::Ptr(dst.ptr(g)?), Arg::Ptr(src.ptr(g)?), Arg::Ptr(a.idx.ptr(g)?), Arg::I32(0), Arg::I32(a.n as i32), Arg::F32(1.0)];
                    g.launch(MODULE, "logprob_gather_vec_f32", cfg_1d(a.n, 256), &args)?;
                }
            }
            Some((hp, tp, dp, lp))
        }
        None => None,
    };
    if ta == 0 {
        return Ok(());
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
    let tile = scratch(dev, DType::F32, tc * vc, meter)?;
    let dl = scratch(dev, ps.dt, tc * vc, meter)?;
    let dh = scratch(dev, DType::F32, tc * h, meter)?;
    let (tile, dl, dh) = (tile.ptr(g)?, dl.ptr(g)?, dh.ptr(g)?);
    let (dhid, dw) = (dhidden.ptr(g)?, dlm_head.ptr(g)?);
    let name = kname("logprob_dlogits", ps.dt);
    for t0 in (0..ta).step_by(tc) {
        let n = tc.min(ta - t0);
        let hid_t0 = at(hid, t0 * h, ps.dt);
        for v0 in (0..v).step_by(vc) {
            let nv = vc.min(v - v0);
            ps.logits(g, tile, hid_t0, n, v0, nv)?;
            let args = [
                Arg::Ptr(dl),
                Arg::Ptr(tile),
                Arg::Ptr(at(lsp, t0, DType::F32)),
                Arg::Ptr(at(dlp, t0, DType::F32)),
                Arg::Ptr(at(tgt, t0, DType::I32)),
                Arg::I32(n as i32),
                Arg::I32(nv as i32),
                Arg::I32(v0 as i32),
            ];
            g.launch(MODULE, &name, cfg_cols(nv, vec_n(ps.dt), n), &args)?;
            // dh [n, h] (+)= dl [n, nv] · W[v0 .. v0 + nv, :]
            g.blas.gemm(&Gemm {
                m: n,
                n: h,
                k: nv,
                trans_a: false,
                trans_b: false,
                alpha: 1.0,
                beta: if v0 == 0 { 0.0 } else { 1.0 },
                a: dl,
                b: at(ps.w, v0 * h, ps.dt),
                c: dh,
                ab_type: ps.gt,
                c_type: GemmType::F32,
                batch: (1, 0, 0, 0),
            })?;
            // dW[v0 .. v0 + nv, :] += dlᵀ [nv, n] · hidden [n, h]
            g.blas.gemm(&Gemm {
                m: nv,
                n: h,
                k: n,
                trans_a: true,
                trans_b: false,
                alpha: 1.0,
                beta: 1.0,
                a: dl,
                b: hid_t0,
                c: at(dw, v0 * h, DType::F32),
                ab_type: ps.gt,
                c_type: GemmType::F32,
                batch: (1, 0, 0, 0),
            })?;
        }
        let idx_t0 = if idx == 0 { 0 } else { at(idx, t0, DType::I32) };
        ps.scatter(g, dhid, dh, idx_t0, t0, n)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn fwd_bwd(g: &Gpu, dev: &Device, tune: &Tuning, meter: &mut usize, logp: &mut Buf, entropy: Option<&mut Buf>, dhidden: &mut Buf, dlm_head: &mut Buf, hidden: &Buf, lm_head: &Buf, targets: &Buf, mask: Option<&Buf>, t: usize, h: usize, v: usize, grad: &mut GradFn) -> Result<()> {
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
    if ta > 0 {
        let tc = chunk_rows(ta, tune.fused_bytes / (v * ps.dt.size()).max(1));
        let vc = tune.fused_vocab.clamp(1, v);
        let nsub = v.div_ceil(vc);
        let tile = scratch(dev, DType::F32, tc * vc, meter)?;
        let store = scratch(dev, ps.dt, tc * v, meter)?;
        let moff = scratch(dev, DType::F32, tc * nsub, meter)?;
        let stats = scratch(dev, DType::F32, tc * 4, meter)?;
        let lse = scratch(dev, DType::F32, tc, meter)?;
        let dh = scratch(dev, DType::F32, tc * h, meter)?;
        let (tile, store, moff, stats, lse, dh) = (tile.ptr(g)?, store.ptr(g)?, moff.ptr(g)?, stats.ptr(g)?, lse.ptr(g)?, dh.ptr(g)?);
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
        let name = kname("logprob_dlogits_stored", ps.dt);
        for t0 in (0..ta).step_by(tc) {
            let n = tc.min(ta - t0);
            let hid_t0 = at(hid, t0 * h, ps.dt);
            let tgt_t0 = at(tgt, t0, DType::I32);
            ps.fold_rows(g, tile, stats, store, moff, hid_t0, tgt_t0, n, vc)?;
            let en_t0 = if en == 0 { 0 } else { at(en, t0, DType::F32) };
            ps.finalize(g, at(lp, t0, DType::F32), lse, en_t0, stats, n)?;
            grad(GradChunk { p0: t0, n, idx: act.as_ref().map(|a| &a.idx), logp: logp_p, dlogp: &mut dlogp_p })?;
            let args = [
                Arg::Ptr(store),
                Arg::Ptr(moff),
                Arg::Ptr(lse),
                Arg::Ptr(at(dlp, t0, DType::F32)),
                Arg::Ptr(tgt_t0),
                Arg::I32(n as i32),
                Arg::I32(v as i32),
                Arg::I32(vc as i32),
                Arg::I32(nsub as i32),
            ];
            g.launch(MODULE, &name, cfg_cols(v, vec_n(ps.dt), n), &args)?;
            // dh [n, h] = dlogits [n, v] · W [v, h]
            g.blas.gemm(&Gemm {
                m: n,
                n: h,
                k: v,
                trans_a: false,
                trans_b: false,
                alpha: 1.0,
                beta: 0.0,
                a: store,
                b: ps.w,
                c: dh,
                ab_type: ps.gt,
                c_type: GemmType::F32,
                batch: (1, 0, 0, 0),
            })?;
            // dW [v, h] += dlogitsᵀ [v, n] · hidden [n, h]
            g.blas.gemm(&Gemm {
                m: v,
                n: h,
                k: n,
                trans_a: true,
                trans_b: false,
                alpha: 1.0,
                beta: 1.0,
                a: store,
                b: hid_t0,
                c: dw,
                ab_type: ps.gt,
                c_type: GemmType::F32,
                batch: (1, 0, 0, 0),
            })?;
            let idx_t0 = if idx == 0 { 0 } else { at(idx, t0, DType::I32) };
            ps.scatter(g, dhid, dh, idx_t0, t0, n)?;
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

/// Variant 2 of `fwd_bwd` (`Tuning::fused_v2`). Per token chunk of n rows:
/// 1. one GEMM writes logits [n, v] at the storage dtype straight into the kept buffer
///    (row stride v; no f32 tile, no copy, no per-tile launches);
/// 2. `logprob_fold_full` folds each whole row in one read into {m, s, u, target logit};
/// 3. finalize, the callback, then `logprob_dlogits_stored` in place with one zero offset per
///    row (nsub = 1, vc = v): the stored values are the logits themselves;
/// 4. the two backward GEMMs and the scatter, as in `fwd_bwd`.
///
/// The kept buffer is not zeroed: the GEMM writes all of rows 0 .. n before anything reads them.
#[allow(clippy::too_many_arguments)]
pub(super) fn fwd_bwd_v2(g: &Gpu, dev: &Device, tune: &Tuning, meter: &mut usize, logp: &mut Buf, entropy: Option<&mut Buf>, dhidden: &mut Buf, dlm_head: &mut Buf, hidden: &Buf, lm_head: &Buf, targets: &Buf, mask: Option<&Buf>, t: usize, h: usize, v: usize, grad: &mut GradFn) -> Result<()> {
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
    if ta > 0 {
        let tc = chunk_rows(ta, tune.fused_bytes / (v * ps.dt.size()).max(1));
        // [tc, v] storage dtype: the chunk's logits, then its dlogits.
        let store = scratch_uninit(g, dev, ps.dt, tc * v, meter)?;
        // [tc] zeros: the per-row offset `logprob_dlogits_stored` adds back (none here).
        let zoff = scratch(dev, DType::F32, tc, meter)?;
        let stats = scratch(dev, DType::F32, tc * 4, meter)?;
        let lse = scratch(dev, DType::F32, tc, meter)?;
        let dh = scratch(dev, DType::F32, tc * h, meter)?;
        let (store, zoff, stats, lse, dh) = (store.ptr(g)?, zoff.ptr(g)?, stats.ptr(g)?, lse.ptr(g)?, dh.ptr(g)?);
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
        let fold = kname("logprob_fold_full", ps.dt);
        let dlogits = kname("logprob_dlogits_stored", ps.dt);
        for t0 in (0..ta).step_by(tc) {
            let n = tc.min(ta - t0);
            let hid_t0 = at(hid, t0 * h, ps.dt);
            let tgt_t0 = at(tgt, t0, DType::I32);
            // logits [n, v] = hidden rows [n, h] · W [v, h]ᵀ, rounded once to the storage dtype.
            g.blas.gemm(&Gemm {
                m: n,
                n: v,
                k: h,
                trans_a: false,
                trans_b: true,
                alpha: 1.0,
                beta: 0.0,
                a: hid_t0,
                b: ps.w,
                c: store,
                ab_type: ps.gt,
                c_type: ps.gt,
                batch: (1, 0, 0, 0),
            })?;
            let args = [Arg::Ptr(stats), Arg::Ptr(store), Arg::Ptr(tgt_t0), Arg::I32(n as i32), Arg::I32(v as i32)];
            g.launch(MODULE, &fold, cfg_rows(n, BLOCK, 0), &args)?;
            let en_t0 = if en == 0 { 0 } else { at(en, t0, DType::F32) };
            ps.finalize(g, at(lp, t0, DType::F32), lse, en_t0, stats, n)?;
            grad(GradChunk { p0: t0, n, idx: act.as_ref().map(|a| &a.idx), logp: logp_p, dlogp: &mut dlogp_p })?;
            let args = [
                Arg::Ptr(store),
                Arg::Ptr(zoff),
                Arg::Ptr(lse),
                Arg::Ptr(at(dlp, t0, DType::F32)),
                Arg::Ptr(tgt_t0),
                Arg::I32(n as i32),
                Arg::I32(v as i32),
                Arg::I32(v as i32),
                Arg::I32(1),
            ];
            g.launch(MODULE, &dlogits, cfg_cols(v, vec_n(ps.dt), n), &args)?;
            // dh [n, h] = dlogits [n, v] · W [v, h]
            g.blas.gemm(&Gemm {
                m: n,
                n: h,
                k: v,
                trans_a: false,
                trans_b: false,
                alpha: 1.0,
                beta: 0.0,
                a: store,
                b: ps.w,
                c: dh,
                ab_type: ps.gt,
                c_type: GemmType::F32,
                batch: (1, 0, 0, 0),
            })?;
            // dW [v, h] += dlogitsᵀ [v, n] · hidden [n, h]
            g.blas.gemm(&Gemm {
                m: v,
                n: h,
                k: n,
                trans_a: true,
                trans_b: false,
                alpha: 1.0,
                beta: 1.0,
                a: store,
                b: hid_t0,
                c: dw,
                ab_type: ps.gt,
                c_type: GemmType::F32,
                batch: (1, 0, 0, 0),
            })?;
            let idx_t0 = if idx == 0 { 0 } else { at(idx, t0, DType::I32) };
            ps.scatter(g, dhid, dh, idx_t0, t0, n)?;
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

/// Variant 3 of `fwd_bwd` (`Tuning::fused_v3`). Per token chunk of n rows:
/// 1. variant 2's GEMM: logits [n, v] at the storage dtype into the kept buffer;
/// 2. `logprob_fold_u` (one 1024-thread block per row): the online fold, lse / logp /
///    entropy, then the row is overwritten with u = onehot − e^(l − lse); the row's first
///    160 KiB stay in shared memory between the two passes;
/// 3. the callback writes g = dlogp for the chunk;
/// 4. hg [n, h] = diag(g)·hidden rows, dh = U·W (f32), dW += Uᵀ·hg, dhidden rows = diag(g)·dh.
///
/// HBM per chunk: the GEMM's write, one read and one write of the buffer (variant 2: one more read).
#[allow(clippy::too_many_arguments)]
pub(super) fn fwd_bwd_v3(g: &Gpu, dev: &Device, tune: &Tuning, meter: &mut usize, logp: &mut Buf, entropy: Option<&mut Buf>, dhidden: &mut Buf, dlm_head: &mut Buf, hidden: &Buf, lm_head: &Buf, targets: &Buf, mask: Option<&Buf>, t: usize, h: usize, v: usize, grad: &mut GradFn) -> Result<()> {
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
    if ta > 0 {
        let tc = chunk_rows(ta, tune.fused_bytes / (v * ps.dt.size()).max(1));
        // [tc, v] storage dtype: the chunk's logits, then u.
        let store = scratch_uninit(g, dev, ps.dt, tc * v, meter)?;
        let lse = scratch(dev, DType::F32, tc, meter)?;
        // [tc, h]: g-scaled hidden rows (storage dtype) and U·W (f32).
        let hg = scratch(dev, ps.dt, tc * h, meter)?;
        let dh = scratch(dev, DType::F32, tc * h, meter)?;
        let (store, lse, hg, dh) = (store.ptr(g)?, lse.ptr(g)?, hg.ptr(g)?, dh.ptr(g)?);
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
        let fold_cfg = LaunchConfig { grid_dim: (n_blocks(tc), 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: (cache * ps.dt.size()) as u32 };
        let fold = kname("logprob_fold_u", ps.dt);
        let scale = kname("logprob_scale_rows", ps.dt);
        let scatter = kname("logprob_scatter_rows_scaled", ps.dt);
        for t0 in (0..ta).step_by(tc) {
            let n = tc.min(ta - t0);
            let hid_t0 = at(hid, t0 * h, ps.dt);
            let tgt_t0 = at(tgt, t0, DType::I32);
            let dlp_t0 = at(dlp, t0, DType::F32);
            // logits [n, v] = hidden rows [n, h] · W [v, h]ᵀ, rounded once to the storage dtype.
            g.blas.gemm(&Gemm {
                m: n,
                n: v,
                k: h,
                trans_a: false,
                trans_b: true,
                alpha: 1.0,
                beta: 0.0,
                a: hid_t0,
                b: ps.w,
                c: store,
                ab_type: ps.gt,
                c_type: ps.gt,
                batch: (1, 0, 0, 0),
            })?;
            let en_t0 = if en == 0 { 0 } else { at(en, t0, DType::F32) };
            let args = [Arg::Ptr(store), Arg::Ptr(at(lp, t0, DType::F32)), Arg::Ptr(lse), Arg::Ptr(en_t0), Arg::Ptr(tgt_t0), Arg::I32(n as i32), Arg::I32(v as i32), Arg::I32(cache as i32)];
            g.launch(MODULE, &fold, LaunchConfig { grid_dim: (n_blocks(n), 1, 1), ..fold_cfg }, &args)?;
            grad(GradChunk { p0: t0, n, idx: act.as_ref().map(|a| &a.idx), logp: logp_p, dlogp: &mut dlogp_p })?;
            // hg = diag(g) · hidden rows
            g.launch(MODULE, &scale, cfg_rows(n, BLOCK, 0), &[Arg::Ptr(hg), Arg::Ptr(hid_t0), Arg::Ptr(dlp_t0), Arg::I32(n as i32), Arg::I32(h as i32)])?;
            // dh [n, h] = U [n, v] · W [v, h]
            g.blas.gemm(&Gemm {
                m: n,
                n: h,
                k: v,
                trans_a: false,
                trans_b: false,
                alpha: 1.0,
                beta: 0.0,
                a: store,
                b: ps.w,
                c: dh,
                ab_type: ps.gt,
                c_type: GemmType::F32,
                batch: (1, 0, 0, 0),
            })?;
            // dW [v, h] += Uᵀ [v, n] · hg [n, h]
            g.blas.gemm(&Gemm {
                m: v,
                n: h,
                k: n,
                trans_a: true,
                trans_b: false,
                alpha: 1.0,
                beta: 1.0,
                a: store,
                b: hg,
                c: dw,
                ab_type: ps.gt,
                c_type: GemmType::F32,
                batch: (1, 0, 0, 0),
            })?;
            // dhidden rows = diag(g) · dh
            let idx_t0 = if idx == 0 { 0 } else { at(idx, t0, DType::I32) };
            let args = [Arg::Ptr(dhid), Arg::Ptr(dh), Arg::Ptr(dlp_t0), Arg::Ptr(idx_t0), Arg::I32(t0 as i32), Arg::I32(n as i32), Arg::I32(h as i32)];
            g.launch(MODULE, &scatter, cfg_rows(n, BLOCK, 0), &args)?;
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

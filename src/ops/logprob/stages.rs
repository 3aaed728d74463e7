//! The stages of the log-prob passes over one token chunk (kernels/logprob.cu and the cuBLAS
//! GEMMs), with the argument lists of their launches in one place: gpu.rs runs them, the bench
//! (src/bench/logprob.rs) times them one by one. Pointers are raw device addresses.

use super::splitk::{self, SplitGemm, Splits};
use super::BLOCK;
use crate::cuda::api;
use crate::cuda::blas::{Gemm, GemmType};
use crate::cuda::{cfg_1d, cfg_rows, Gpu};
use crate::tensor::{Buf, DType};
use anyhow::Result;
use cudarc::driver::LaunchConfig;

fn gemm_type(dt: DType) -> GemmType {
    match dt {
        DType::BF16 => GemmType::Bf16,
        _ => GemmType::F32,
    }
}

/// Address of element `i` of a buffer whose elements are `dt`.
pub(super) fn at(p: u64, i: usize, dt: DType) -> u64 {
    p + (i * dt.size()) as u64
}

/// A 2-D grid: `cols` columns covered by blocks of BLOCK threads × `per` columns, one grid row per token.
pub(super) fn cfg_cols(cols: usize, per: usize, rows: usize) -> LaunchConfig {
    let x = cols.div_ceil(BLOCK as usize * per).max(1) as u32;
    LaunchConfig { grid_dim: (x, rows.max(1) as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Columns per thread of the 16-byte vector paths.
pub(super) fn vec_n(dt: DType) -> usize {
    16 / dt.size()
}

/// idx [n] / pos [n] / count [1] (i32) of the tokens with flags [n] != 0 (one-block scan).
pub(crate) fn scan_nonzero(g: &Gpu, flags: &Buf, idx: &Buf, pos: &Buf, count: &Buf, n: usize) -> Result<()> {
    api::logprob::LogprobScanNonzero {
        idx: idx.ptr(g)?,
        pos: pos.ptr(g)?,
        count: count.ptr(g)?,
        flags: flags.ptr(g)?,
        n: n as i32,
    }
    .launch(g, cfg_rows(1, 1024, 0))
}

/// Shapes and pointers shared by the passes over one token chunk; its methods launch the stages
/// (the bench times them one by one).
pub(crate) struct Pass<'a> {
    pub(super) g: &'a Gpu,
    pub(super) dt: DType,
    pub(super) gt: GemmType,
    pub(super) h: usize,
    pub(super) v: usize,
    /// lm_head [v, h].
    w: u64,
}

/// Vocabulary columns v0 .. v0 + nv.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cols {
    pub v0: usize,
    pub nv: usize,
}

/// The packed token rows of a pass: hidden [ta, h] at `hid`, targets [ta] at `tgt`, packed →
/// token index [ta] at `idx` (0: packed row p is token p).
#[derive(Clone, Copy, Debug)]
pub(super) struct Packed {
    pub hid: u64,
    pub tgt: u64,
    pub idx: u64,
}

/// One chunk of packed rows t0 .. t0 + n: hidden rows at `hid`, targets at `tgt` and the packed →
/// token index at `idx` (0: packed row t0 + p is token t0 + p), all already offset to row t0.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk {
    pub t0: usize,
    pub n: usize,
    pub hid: u64,
    pub tgt: u64,
    pub idx: u64,
}

impl Packed {
    pub(super) fn chunk(&self, ps: &Pass, t0: usize, n: usize) -> Chunk {
        Chunk {
            t0,
            n,
            hid: at(self.hid, t0 * ps.h, ps.dt),
            tgt: at(self.tgt, t0, DType::I32),
            idx: if self.idx == 0 { 0 } else { at(self.idx, t0, DType::I32) },
        }
    }
}

/// The fold's buffers: the f32 logits tile, stats [n, 4], and (0 when the tiles are not kept)
/// the kept [n, v] logits `store` with their row offsets `moff` [n, nsub].
pub(crate) struct Fold {
    pub tile: u64,
    pub stats: u64,
    pub store: u64,
    pub moff: u64,
}

/// Per-row f32 outputs of a chunk: logp, lse and the entropy (0: none).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowOut {
    pub logp: u64,
    pub lse: u64,
    pub ent: u64,
}

impl<'a> Pass<'a> {
    pub(crate) fn new(g: &'a Gpu, lm_head: &Buf, h: usize, v: usize) -> Result<Self> {
        let dt = lm_head.dtype();
        Ok(Pass { g, dt, gt: gemm_type(dt), h, v, w: lm_head.ptr(g)? })
    }

    /// f32 logits [n, nv] at `out` = hidden rows [n, h] at `hid` · lm_head rows `c`, transposed.
    pub(crate) fn logits(&self, out: u64, hid: u64, n: usize, c: Cols) -> Result<()> {
        self.logits_as(out, hid, n, c, GemmType::F32)
    }

    /// `logits` with the output type `ct` (the storage type: logits rounded as at LogitPrecision::Bf16).
    pub(super) fn logits_as(&self, out: u64, hid: u64, n: usize, c: Cols, ct: GemmType) -> Result<()> {
        self.g.blas.gemm(&Gemm {
            m: n,
            n: c.nv,
            k: self.h,
            trans_a: false,
            trans_b: true,
            alpha: 1.0,
            beta: 0.0,
            a: hid,
            b: at(self.w, c.v0 * self.h, self.dt),
            c: out,
            ab_type: self.gt,
            c_type: ct,
            batch: (1, 0, 0, 0),
        })
    }

    /// Folds every vocab tile of the chunk's rows into `f.stats` [n, 4]; with `f.store`, also keeps
    /// the tiles ([n, v] at the storage dtype, values relative to `f.moff` [n, nsub]).
    pub(super) fn fold_rows(&self, f: &Fold, c: &Chunk, vc: usize) -> Result<()> {
        for j in 0..self.v.div_ceil(vc) {
            let v0 = j * vc;
            self.logits(f.tile, c.hid, c.n, Cols { v0, nv: vc.min(self.v - v0) })?;
            self.fold_tile(f, c, j, vc)?;
        }
        Ok(())
    }

    /// Folds vocab tile j (columns j·vc ..) of the chunk's logits, already in `f.tile`.
    pub(crate) fn fold_tile(&self, f: &Fold, c: &Chunk, j: usize, vc: usize) -> Result<()> {
        let nsub = self.v.div_ceil(vc);
        let v0 = j * vc;
        let nv = vc.min(self.v - v0);
        api::logprob::LogprobFold {
            stats: f.stats,
            store: f.store,
            moff: f.moff,
            logits: f.tile,
            targets: c.tgt,
            n: c.n as i32,
            nv: nv as i32,
            v0: v0 as i32,
            v: self.v as i32,
            sub: j as i32,
            nsub: nsub as i32,
            first: (j == 0) as i32,
        }
        .launch(self.g, self.dt, cfg_rows(c.n, BLOCK, 0))
    }

    pub(super) fn finalize(&self, out: RowOut, stats: u64, n: usize) -> Result<()> {
        let RowOut { logp, lse, ent } = out;
        api::logprob::LogprobFinalize { logp, lse, ent, stats, n: n as i32 }.launch(self.g, cfg_1d(n, 256))
    }

    /// The chunk's dhidden rows (idx[i], or t0 + i) = gs[i] · Σ_p src[p] [n, h] (`nsplit` f32
    /// partials n · h elements apart; gs 0 = 1), converted to the storage dtype.
    pub(crate) fn scatter_sum(&self, dst: u64, src: u64, nsplit: usize, gs: u64, c: &Chunk) -> Result<()> {
        api::logprob::LogprobScatterSum {
            dst,
            src,
            g: gs,
            idx: c.idx,
            row0: c.t0 as i32,
            n: c.n as i32,
            cols: self.h as i32,
            nsplit: nsplit as i32,
            pstride: (c.n * self.h) as i64,
        }
        .launch(self.g, self.dt, cfg_rows(c.n, BLOCK, 0))
    }

    /// logits [n, v] at the storage dtype into `store` (row stride v) = hidden rows [n, h] at
    /// `hid` · Wᵀ, rounded once. The Bf16 fused pass and `fwd` at that precision both call this, so the
    /// same chunk gives the same bits.
    pub(crate) fn logits_kept(&self, store: u64, hid: u64, n: usize) -> Result<()> {
        self.g.blas.gemm(&Gemm {
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

    /// Values per row that `fold_u` caches in shared memory: a multiple of the 16-byte vector, at
    /// most the row and FOLD_U_SMEM.
    pub(crate) fn fold_u_cache(&self) -> usize {
        let vn = vec_n(self.dt);
        let cache = (FOLD_U_SMEM / self.dt.size()).min(self.v) / vn * vn;
        if cache == 0 {
            self.v.min(FOLD_U_SMEM / self.dt.size())
        } else {
            cache
        }
    }

    /// `logprob_fold_u` over the chunk's kept logits [n, v] at `buf` (one 1024-thread block per
    /// row): lse, logp and the entropy into `out`; with `u` = Some(cache), the row is then
    /// overwritten with u = onehot − softmax, its first `cache` values kept in shared memory.
    pub(crate) fn fold_u(&self, buf: u64, out: RowOut, c: &Chunk, u: Option<usize>) -> Result<()> {
        let cache = u.unwrap_or(0);
        let cfg = LaunchConfig {
            grid_dim: (n_blocks(c.n), 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: (cache * self.dt.size()) as u32,
        };
        api::logprob::LogprobFoldU {
            buf,
            logp: out.logp,
            lse: out.lse,
            ent: out.ent,
            targets: c.tgt,
            n: c.n as i32,
            v: self.v as i32,
            cache: cache as i32,
            write_u: u.is_some() as i32,
        }
        .launch(self.g, self.dt, cfg)
    }

    /// The exact pass's dlogits, in place in the kept chunk [n, v] at `store` (relative to `moff`
    /// [n, v / vc]), from the chunk's lse [n] and dlogp [n].
    pub(crate) fn dlogits_stored(
        &self, store: u64, moff: u64, lse: u64, dlogp: u64, c: &Chunk, vc: usize,
    ) -> Result<()> {
        api::logprob::LogprobDlogitsStored {
            buf: store,
            moff,
            lse,
            dlogp,
            targets: c.tgt,
            n: c.n as i32,
            v: self.v as i32,
            vc: vc as i32,
            nsub: self.v.div_ceil(vc) as i32,
        }
        .launch(self.g, self.dt, cfg_cols(self.v, vec_n(self.dt), c.n))
    }

    /// partial[p] [n, h] f32 (β)= U[:, slice p] · W[v0 + slice p, :]; U [n, nv] at `u` (row
    /// stride nv), W rows `c`.
    pub(super) fn dhidden(&self, part: u64, u: u64, n: usize, c: Cols, beta: f32, splits: Splits) -> Result<()> {
        let w = at(self.w, c.v0 * self.h, self.dt);
        let sg = SplitGemm { u, ldu: c.nv, w, part, m: n, h: self.h, k: c.nv, ab: self.gt, beta };
        splitk::gemm(self.g, &sg, splits)
    }

    /// dW rows `c` (f32, β = 0 or 1) = U [n, nv]ᵀ (row stride nv) · x [n, h].
    pub(crate) fn dw(&self, dw: u64, u: u64, x: u64, n: usize, c: Cols, beta: f32) -> Result<()> {
        self.g.blas.gemm(&Gemm {
            m: c.nv,
            n: self.h,
            k: n,
            trans_a: true,
            trans_b: false,
            alpha: 1.0,
            beta,
            a: u,
            b: x,
            c: at(dw, c.v0 * self.h, DType::F32),
            ab_type: self.gt,
            c_type: GemmType::F32,
            batch: (1, 0, 0, 0),
        })
    }
}

/// Bytes of a row cached in shared memory by `logprob_fold_u` (the rest is re-read). Over half an
/// SM's shared memory, so one block runs per SM and the re-read rows stay in L2; under A100's 164 KiB.
pub(super) const FOLD_U_SMEM: usize = 160 << 10;

pub(super) fn n_blocks(rows: usize) -> u32 {
    rows.max(1) as u32
}

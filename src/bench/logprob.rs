//! Bench suite "logprob": the grouped log-prob fused with the lm_head and the fused GRPO loss at
//! the size, T = 8,192 tokens (8 rollouts × 1,024), H = 3,584, V = 152,064, bf16.
//! FLOPs are 2·T·H·V per GEMM (8.93 TFLOP): 1 for the forward, 4 for forward + backward with
//! recompute, 3 for the fused GRPO loss. "extra" is the op's device scratch (everything it
//! allocates; its inputs and its outputs — logp, dhidden, the f32 dlm_head — are not counted).
//! A reference row times the three full-size cuBLAS GEMMs alone (what the PyTorch eager baseline
//! runs, with a [T, V] logits tensor), the practical floor on this machine.
//! The fused loss runs at both `LogitPrecision`s side by side: the exact pass (f32 logit tiles) and
//! the bf16-logit pass (one bf16 logits GEMM per chunk into the kept buffer, then fold and
//! u = onehot − softmax in one kernel, dlogp applied after the GEMMs), each checked against an f64
//! log-prob and against the exact pass; `stage …` rows time each stage of
//! one chunk alone. Those rows keep round 3's settings (one dhidden GEMM, scratch allocated per
//! call); the `… r4` rows use round 4's defaults (split-K dhidden with the automatic slice count,
//! cached scratch; `dW=`: dlm_head written, not accumulated), with S swept 1–4 for the bf16 pass,
//! plus `stage dhidden split S` per slice count and the bf16 forward that matches the fused pass.
//! Baselines on the H200 (from the issue): PyTorch eager log-prob fwd+bwd 52.8 ms / 15.0 GiB
//! extra; full GRPO loss 53.1 ms / 19.6 GiB; Liger fused 531 ms / 4.1 GiB. Floor for the GRPO
//! loss: 45 ms with ≤ 1 GiB extra; goal ≤ 1.15 × 34.8 ms (three GEMMs at 770 TFLOP/s) = 40 ms.

use super::{time_gpu, BenchRow};
use crate::cuda::blas::{Gemm, GemmType};
use crate::cuda::Gpu;
use crate::ops::grpo::{self, Aggregation, GrpoBatch, GrpoHyper};
use crate::ops::logprob::stages::{self, Chunk, Cols, Fold, Pass, RowOut};
use crate::ops::logprob::{self, Dims, FusedOut, FwdOut, Inputs, LogitPrecision, Tuning};
use crate::rng::Rng;
use crate::tensor::{Buf, DType, Device};
use anyhow::Result;

const GIB: f64 = (1u64 << 30) as f64;

/// Pseudo-random bf16-representable values for large tensors: a pool of normals indexed by a
/// multiplicative hash, so the 545 M lm_head values take a second, not a minute.
fn fill(n: usize, scale: f64, seed: u64) -> Vec<f32> {
    const P: usize = 1_048_573; // prime: i · K mod P visits every pool slot
    let mut rng = Rng::new(seed);
    let pool: Vec<f32> = (0..P).map(|_| half::bf16::from_f64(rng.normal() * scale).to_f32()).collect();
    (0..n).map(|i| pool[(i.wrapping_mul(16_411) + i / P) % P]).collect()
}

pub fn run(dev: &Device, quick: bool) -> Result<Vec<BenchRow>> {
    let Device::Cuda(g) = dev else { return Ok(Vec::new()) };
    let it = if quick { (1, 3) } else { (2, 7) };
    let (nroll, len, h, v) = (8usize, 1024usize, 3584usize, 152_064usize);
    let t = nroll * len;
    let bf = DType::BF16;
    let gemm_flops = 2.0 * (t * h * v) as f64;
    let shape = format!("T={t} H={h} V={v} bf16");

    // Inputs: logits of spread ~3 (a peaked but not degenerate softmax).
    let x_host = fill(t * h, 1.0, 1);
    let w_host = fill(v * h, 3.0 / (h as f64).sqrt(), 2);
    let hidden = dev.upload(&x_host, bf)?;
    let lm_head = dev.upload(&w_host, bf)?;
    let mut rng = Rng::new(3);
    let tg_host: Vec<i32> = (0..t).map(|_| rng.below(v) as i32).collect();
    let targets = dev.upload_i32(&tg_host)?;
    let (mut logp, mut lse) = (dev.zeros_f32(t)?, dev.zeros_f32(t)?);
    let mut dhidden = dev.zeros(bf, t * h)?;
    let mut dw = dev.zeros_f32(v * h)?;
    let mut rows = Vec::new();
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let x = Inputs { hidden: &hidden, lm_head: &lm_head, targets: &targets, dims: Dims { t, h, v } };
    let host = Host { x: &x_host, w: &w_host, tg: &tg_host, h, v };

    // 1. Forward only (reference policy, old policy).
    // `tune*` reproduce round 3 (dhidden in one GEMM, scratch allocated per call), so the existing
    // rows stay comparable; `r4*` are the round-4 defaults: split-K dhidden (automatic S) and the
    // cached scratch.
    let tune = Tuning {
        precision: LogitPrecision::ExactF32,
        fused_bytes: 640 << 20,
        dhidden_splits: 1,
        dw_overwrite: false,
        cache_scratch: false,
        ..Tuning::exact()
    };
    let tune_bf = Tuning { precision: LogitPrecision::Bf16, ..tune };
    let r4 = Tuning { dhidden_splits: 0, cache_scratch: true, ..tune };
    let r4bf = Tuning { precision: LogitPrecision::Bf16, ..r4 };
    // "(tc, S)": chunk rows and dhidden slices of a fused tuning at this size.
    let plan = |tn: &Tuning| {
        logprob::fused_plan(dev, tn, t, h, v, bf).map_or("-".to_string(), |(tc, s)| format!("tc={tc} S={s}"))
    };
    let ms = time_gpu(g, it.0, it.1, &mut || {
        logprob::fwd_with(dev, &tune, FwdOut { logp: &mut logp, lse: &mut lse, entropy: None }, x, None)
    })?;
    let err = if quick { None } else { Some(check_logp(dev, &logp, &host, &[0, 1, t - 1])?) };
    rows.push(BenchRow {
        op: "logprob fwd".into(),
        shape: shape.clone(),
        ms,
        bytes: (2 * (t * h + v * h) + 8 * t) as f64,
        flops: gemm_flops,
        rel_err: err,
        note: format!(
            "1 GEMM floor {:.1} ms; extra {:.0} MiB",
            1e3 * gemm_flops / super::BF16_FLOP_PER_S,
            mib(logprob::last_scratch_bytes())
        ),
    });

    // 1b. The forward at bf16 precision (round 4): the old policy's / reference's log-probs
    // computed exactly as the fused bf16 pass computes the policy's, so the ratio is
    // exactly 1 at policy == old. One logits GEMM per 2,048-token chunk + fold_u without the u pass.
    let ms = time_gpu(g, it.0, it.1, &mut || {
        logprob::fwd_with(dev, &r4bf, FwdOut { logp: &mut logp, lse: &mut lse, entropy: None }, x, None)
    })?;
    let err = if quick { None } else { Some(check_logp(dev, &logp, &host, &[0, 1, t - 1])?) };
    rows.push(BenchRow {
        op: "logprob fwd bf16 r4".into(),
        shape: shape.clone(),
        ms,
        bytes: (2 * (t * h + v * h) + 2 * t * v + 8 * t) as f64,
        flops: gemm_flops,
        rel_err: err,
        note: format!(
            "bf16 logits as the fused bf16 pass (bit-identical logp); extra {:.0} MiB (cached: {:.0} MiB held)",
            mib(logprob::last_scratch_bytes()),
            mib(logprob::cached_scratch_bytes())
        ),
    });

    // 2. Forward + backward with recompute (4 GEMMs), from a generic dlogp.
    let dlogp = dev.upload(&rng.normal_vec(t, 1.0 / t as f64), DType::F32)?;
    let mut extra = 0usize;
    let ms = time_gpu(g, it.0, it.1, &mut || {
        logprob::fwd_with(dev, &tune, FwdOut { logp: &mut logp, lse: &mut lse, entropy: None }, x, None)?;
        let a = logprob::last_scratch_bytes();
        let out = logprob::BwdOut { dhidden: &mut dhidden, dlm_head: Some(&mut dw) };
        logprob::bwd_with(dev, &tune, out, x, &dlogp, &lse)?;
        extra = a.max(logprob::last_scratch_bytes());
        Ok(())
    })?;
    rows.push(BenchRow {
        op: "logprob fwd+bwd (recompute)".into(),
        shape: shape.clone(),
        ms,
        bytes: (2 * (2 * t * h + v * h) + 8 * v * h + 12 * t) as f64,
        flops: 4.0 * gemm_flops,
        rel_err: None,
        note: format!("extra {:.0} MiB; PyTorch eager 52.8 ms / 15.0 GiB", mib(extra)),
    });

    // 3. The fused GRPO loss (3 GEMMs): old/ref log-probs near the policy's, per-rollout advantages.
    logprob::fwd(dev, FwdOut { logp: &mut logp, lse: &mut lse, entropy: None }, x, None)?;
    let lp = dev.to_vec(&logp)?;
    let old: Vec<f32> = lp.iter().map(|&x| x + (0.15 * rng.normal()) as f32).collect();
    let rf: Vec<f32> = lp.iter().map(|&x| x + (0.1 * rng.normal()) as f32).collect();
    let adv: Vec<f32> = (0..nroll).map(|_| rng.normal() as f32).collect();
    let (old_b, ref_b, adv_b) =
        (dev.upload(&old, DType::F32)?, dev.upload(&rf, DType::F32)?, dev.upload(&adv, DType::F32)?);
    let hp =
        GrpoHyper { lambda: 1.0, tau: 0.5, beta_help: 0.5, eps_low: 0.2, eps_high: 0.28, beta_kl: 0.04, adv_eps: 1e-4 };
    let ones = dev.upload(&vec![1.0; t], DType::F32)?;
    // Half of every rollout masked (a prompt-like prefix): the compaction skips it.
    let half: Vec<f32> = (0..t).map(|i| if i % len >= len / 2 { 1.0 } else { 0.0 }).collect();
    let half_b = dev.upload(&half, DType::F32)?;
    let floor_ms = 1e3 * 3.0 * gemm_flops / super::BF16_FLOP_PER_S;
    let mut cases: Vec<(String, Tuning, &Buf, f64)> = vec![
        ("grpo fused fwd+bwd".into(), tune, &ones, 1.0),
        ("grpo fused bf16 fwd+bwd".into(), tune_bf, &ones, 1.0),
        ("grpo fused, 50% masked".into(), tune, &half_b, 0.5),
        ("grpo fused bf16, 50% masked".into(), tune_bf, &half_b, 0.5),
    ];
    if !quick {
        for (bytes, vc) in [(320usize << 20, 8192usize), (640 << 20, 4096), (640 << 20, 16_384), (900 << 20, 8192)] {
            let tn = Tuning { fused_bytes: bytes, fused_vocab: vc, ..tune };
            cases.push((format!("grpo fused {}M/{}", bytes >> 20, vc), tn, &ones, 1.0));
        }
        // 3 chunks of 2,731 tokens (792 MiB kept logits): one f32 pass over dW fewer.
        cases.push(("grpo fused bf16 900M".into(), Tuning { fused_bytes: 900 << 20, ..tune_bf }, &ones, 1.0));
    }
    // Round 4: split-K dhidden (automatic S), cached scratch; then also dlm_head written (=).
    let r4_cases = [
        ("grpo fused default", Tuning::default()),
        ("grpo fused r4", r4),
        ("grpo fused bf16 r4", r4bf),
        ("grpo fused bf16 900M r4", Tuning { fused_bytes: 900 << 20, ..r4bf }),
        ("grpo fused bf16 900M r4 dW=", Tuning { fused_bytes: 900 << 20, dw_overwrite: true, ..r4bf }),
    ];
    for (name, tn) in r4_cases {
        cases.push((format!("{name} ({})", plan(&tn)), tn, &ones, 1.0));
    }
    if !quick {
        let more = [
            ("grpo fused 900M r4", Tuning { fused_bytes: 900 << 20, ..r4 }),
            ("grpo fused bf16 r4 dW=", Tuning { dw_overwrite: true, ..r4bf }),
            ("grpo fused r4, 50% masked", r4),
            ("grpo fused bf16 r4, 50% masked", r4bf),
        ];
        for (name, tn) in more {
            let (mask, frac) = if name.contains("masked") { (&half_b, 0.5) } else { (&ones, 1.0) };
            cases.push((format!("{name} ({})", plan(&tn)), tn, mask, frac));
        }
        // The split alone: the bf16 pass at both chunk sizes, cached scratch, S = 1 .. 4 (S=1
        // against the round-3 bf16 rows isolates the cache).
        for bytes in [640usize << 20, 900 << 20] {
            for sp in 1..=4 {
                let tn = Tuning { fused_bytes: bytes, dhidden_splits: sp, ..r4bf };
                cases.push((format!("grpo fused bf16 {}M r4 ({})", bytes >> 20, plan(&tn)), tn, &ones, 1.0));
            }
        }
    }
    for (name, tn, mask, frac) in cases {
        let batch = GrpoBatch { old_logp: &old_b, ref_logp: &ref_b, mask, adv: &adv_b, rows: nroll, l: len };
        let mut stats = Default::default();
        let ms = time_gpu(g, it.0, it.1, &mut || {
            let out = FusedOut { logp: &mut logp, entropy: None, dhidden: &mut dhidden, dlm_head: &mut dw };
            stats = grpo::fused_loss_with(dev, &tn, out, x, &batch, &hp, Aggregation::TokenMean)?;
            Ok(())
        })?;
        let extra = logprob::last_scratch_bytes();
        let checked = name.ends_with("fwd+bwd")
            || name.starts_with("grpo fused default")
            || name.starts_with("grpo fused r4 (")
            || name.starts_with("grpo fused bf16 r4 (")
            || name.starts_with("grpo fused bf16 900M r4 (");
        let err = if quick || frac < 1.0 || !checked { None } else { Some(check_logp(dev, &logp, &host, &[0, 4097])?) };
        rows.push(BenchRow {
            op: name,
            shape: shape.clone(),
            ms,
            bytes: (2 * (2 * t * h + v * h) + 8 * v * h + 20 * t) as f64,
            flops: 3.0 * gemm_flops * frac,
            rel_err: err,
            note: format!(
                "extra {:.0} MiB ({:.2} GiB); {:.2}x 3-GEMM floor {floor_ms:.1} ms; issue floor 45 ms/1 GiB; loss {:.4} clip {:.3} kl {:.2e}",
                mib(extra),
                extra as f64 / GIB,
                ms / (floor_ms * frac),
                stats.loss,
                stats.clip_frac,
                stats.mean_kl
            ),
        });
    }

    // The bf16 pass against the exact one: one call each from a zero dlm_head, outputs compared
    // (the exact pass's logits stay f32 until the fold).
    if !quick {
        let batch = GrpoBatch { old_logp: &old_b, ref_logp: &ref_b, mask: &ones, adv: &adv_b, rows: nroll, l: len };
        let mut outs = Vec::new();
        for tn in [tune, tune_bf, r4, r4bf] {
            let mut dw0 = dev.zeros_f32(v * h)?;
            let out = FusedOut { logp: &mut logp, entropy: None, dhidden: &mut dhidden, dlm_head: &mut dw0 };
            let s = grpo::fused_loss_with(dev, &tn, out, x, &batch, &hp, Aggregation::TokenMean)?;
            outs.push((dev.to_vec(&logp)?, dev.to_vec(&dhidden)?, dev.to_vec(&dw0)?, s.loss));
        }
        // r4 rows: split-K changes only the order of dhidden's f32 sums (logp and dlm_head exact).
        for (i, j, name) in
            [(1usize, 0usize, "grpo bf16 vs exact"), (2, 0, "grpo r4 vs exact"), (3, 1, "grpo bf16 r4 vs bf16")]
        {
            let (a, b) = (&outs[j], &outs[i]);
            let (e_lp, e_dh, e_dw) = (rel(&b.0, &a.0), rel(&b.1, &a.1), rel(&b.2, &a.2));
            let max_lp = a.0.iter().zip(&b.0).map(|(x, y)| (x - y).abs() as f64).fold(0f64, f64::max);
            rows.push(BenchRow {
                op: name.into(),
                shape: shape.clone(),
                ms: 0.0,
                bytes: 0.0,
                flops: 0.0,
                rel_err: Some(e_dh),
                note: format!("rel diff logp {e_lp:.2e} (max abs {max_lp:.2e}), dhidden {e_dh:.2e}, dlm_head {e_dw:.2e}; loss {:.6} vs {:.6}", b.3, a.3),
            });
        }
    }

    // Where the time goes: each stage of one 2,048-token chunk alone (the fused pass runs 4).
    let setup = Setup { dev, g, it, x, shape: &shape };
    if !quick {
        rows.extend(stages(&setup, &mut dw)?);
    }

    // Reference: the three full-size GEMMs alone (cuBLAS, bf16 in, [T, V] bf16 logits).
    rows.push(gemm_reference(&setup, &mut dhidden, &mut dw, gemm_flops)?);
    Ok(rows)
}

/// The bench's problem on the device: iterations (warm-up, timed), the inputs and the rows' shape.
struct Setup<'a> {
    dev: &'a Device,
    g: &'a Gpu,
    it: (usize, usize),
    x: Inputs<'a>,
    shape: &'a str,
}

/// The inputs on the host (bf16-representable f32), for the f64 check.
struct Host<'a> {
    x: &'a [f32],
    w: &'a [f32],
    tg: &'a [i32],
    h: usize,
    v: usize,
}

/// ‖a − b‖ / ‖b‖ in f64 (inf when a has a non-finite value).
fn rel(a: &[f32], b: &[f32]) -> f64 {
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    num.sqrt() / den.sqrt().max(1e-300)
}

/// Times the stages of one token chunk (tc = 2,048, the default) of both fused variants, each
/// alone, with its HBM floor bytes, so PERF-logprob.md can say where the time beyond the three
/// GEMMs goes. The kernels and GEMMs are launched by the op's own stage launchers
/// (`ops::logprob::stages`), so they are the op's calls with the same arguments.
fn stages(s: &Setup, dw: &mut Buf) -> Result<Vec<BenchRow>> {
    let (dev, g, it, shape) = (s.dev, s.g, s.it, s.shape);
    let Dims { t, h, v } = s.x.dims;
    let (hidden, w, targets) = (s.x.hidden, s.x.lm_head, s.x.targets);
    let tc = 2048usize.min(t);
    let vc = 8192usize;
    let nsub = v.div_ceil(vc);
    let (bf, f4) = (DType::BF16, DType::F32);
    let tile = dev.zeros(f4, tc * vc)?;
    let store = dev.zeros(bf, tc * v)?;
    let moff = dev.zeros_f32(tc * nsub)?;
    let zoff = dev.zeros_f32(tc)?;
    let stats = dev.zeros_f32(tc * 4)?;
    let (lp, lse) = (dev.zeros_f32(tc)?, dev.zeros_f32(tc)?);
    let dlogp = dev.upload(&vec![1.0 / t as f32; tc], DType::F32)?;
    let dh = dev.zeros_f32(tc * h)?;
    let (x, wp, tg) = (hidden.ptr(g)?, w.ptr(g)?, targets.ptr(g)?);
    let (tile, store, moff, zoff, stats, lp, lse, dlogp, dh, dwp) = (
        tile.ptr(g)?,
        store.ptr(g)?,
        moff.ptr(g)?,
        zoff.ptr(g)?,
        stats.ptr(g)?,
        lp.ptr(g)?,
        lse.ptr(g)?,
        dlogp.ptr(g)?,
        dh.ptr(g)?,
        dw.ptr(g)?,
    );
    let ps = Pass::new(g, w, h, v)?;
    let chunk = Chunk { t0: 0, n: tc, hid: x, tgt: tg, idx: 0 };
    let fold = Fold { tile, stats, store, moff };
    let tile_gemm = |j: usize| ps.logits(tile, x, tc, Cols { v0: j * vc, nv: vc.min(v - j * vc) });
    let fold_v1 = |j: usize| ps.fold_tile(&fold, &chunk, j, vc);
    let dlogits = |off: u64, vcol: usize| ps.dlogits_stored(store, off, lse, dlogp, &chunk, vcol);
    let logits_bf16 = || ps.logits_kept(store, x, tc);
    let fold_out = RowOut { logp: lp, lse, ent: 0 };
    let chunk_flops = 2.0 * (tc * h * v) as f64;
    let (wb, sb) = ((2 * v * h) as f64, (2 * tc * v) as f64);
    let mut out = Vec::new();
    // Rows built outside `row` (which holds `out`), appended at the end.
    let mut out_rows: Vec<BenchRow> = Vec::new();
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let chunks = t.div_ceil(tc);
    let mut row = |op: &str, ms: f64, bytes: f64, flops: f64, note: &str| {
        let note = if note.starts_with("per call") {
            note.to_string()
        } else {
            format!("x{chunks} chunks = {:.2} ms; {note}", ms * chunks as f64)
        };
        out.push(BenchRow { op: op.into(), shape: shape.into(), ms, bytes, flops, rel_err: None, note });
    };
    // v1 forward: 19 f32 tile GEMMs, each followed by the fold of that tile into the bf16 store.
    let ms = time_gpu(g, it.0, it.1, &mut || (0..nsub).try_for_each(&tile_gemm))?;
    row("stage v1 logits tiles f32", ms, 2.0 * sb + wb, chunk_flops, "19 GEMMs [2048 x 8192] f32 out");
    let ms = time_gpu(g, it.0, it.1, &mut || (0..nsub).try_for_each(&fold_v1))?;
    row("stage v1 fold tiles", ms, 3.0 * sb, 0.0, "19 launches: read f32 tile, write bf16 l - m");
    let ms = time_gpu(g, it.0, it.1, &mut || (0..nsub).try_for_each(|j| tile_gemm(j).and_then(|_| fold_v1(j))))?;
    row("stage v1 logits+fold", ms, 3.0 * sb + wb, chunk_flops, "interleaved as in the op");
    // bf16 forward: one GEMM writing bf16 logits into the store.
    let ms = time_gpu(g, it.0, it.1, &mut || logits_bf16())?;
    row("stage bf16 logits GEMM", ms, sb + wb, chunk_flops, "one GEMM [2048 x V] bf16 out into the store");
    // fold + u in one kernel (each call rewrites the row with u; timing only). 160 KiB of
    // each row cached in shared memory, as in the op.
    logits_bf16()?;
    let cache = ps.fold_u_cache();
    let ms = time_gpu(g, it.0, it.1, &mut || {
        logits_bf16()?;
        ps.fold_u(store, fold_out, &chunk, Some(cache))
    })?;
    row(
        "stage bf16 logits GEMM + fold_u",
        ms,
        3.0 * sb + wb,
        chunk_flops,
        "GEMM, then read each logit once (+ L2 re-read past 160 KiB), write u",
    );
    // Round 4: `fwd` at bf16 precision runs the same kernel with write_u = 0 and no shared memory.
    let ms = time_gpu(g, it.0, it.1, &mut || {
        logits_bf16()?;
        ps.fold_u(store, fold_out, &chunk, None)
    })?;
    row(
        "stage bf16 logits GEMM + fold (fwd)",
        ms,
        sb + sb + wb,
        chunk_flops,
        "fwd at bf16 precision: GEMM, fold_u with write_u = 0 (one read of the chunk)",
    );
    logits_bf16()?;
    ps.fold_u(store, fold_out, &chunk, None)?;
    // Shared backward stages (the store now holds logits; dlogits in place keeps it finite).
    let ms = time_gpu(g, it.0, it.1, &mut || dlogits(zoff, v))?;
    row("stage dlogits in place", ms, 2.0 * sb, 0.0, "read + write the bf16 [2048 x V] chunk");
    // The round-3 dhidden: one plain GEMM (no split), f32 out.
    let dh_gemm = Gemm {
        m: tc,
        n: h,
        k: v,
        trans_a: false,
        trans_b: false,
        alpha: 1.0,
        beta: 0.0,
        a: store,
        b: wp,
        c: dh,
        ab_type: GemmType::Bf16,
        c_type: GemmType::F32,
        batch: (1, 0, 0, 0),
    };
    let ms = time_gpu(g, it.0, it.1, &mut || g.blas.gemm(&dh_gemm))?;
    row("stage dhidden GEMM", ms, sb + wb + (4 * tc * h) as f64, chunk_flops, "m=2048 n=3584 k=V, f32 out");
    // Round 4: the dhidden GEMM split over S vocabulary slices (one strided-batched GEMM into S
    // f32 partials) + the scatter that sums them into bf16 rows, at the 640M chunk (2,048 rows)
    // and the 900M chunk (2,731 rows, 3 chunks per call).
    {
        let tc9 = 2731usize.min(t);
        let store9 = dev.zeros(bf, tc9 * v)?;
        let s9 = store9.ptr(g)?;
        ps.logits_kept(s9, x, tc9)?; // logits: realistic values
        let part = dev.zeros(f4, 4 * tc9 * h)?;
        let dhb = dev.zeros(bf, tc9 * h)?;
        let (part, dhb) = (part.ptr(g)?, dhb.ptr(g)?);
        for (rows, u, per_call) in [(tc, store, t.div_ceil(tc)), (tc9, s9, t.div_ceil(tc9))] {
            for sp in 1..=4usize {
                let mut count = 0;
                let gemm_ms = time_gpu(g, it.0, it.1, &mut || {
                    count = logprob::dhidden_split_gemm(g, w, Dims { t: rows, h, v }, u, part, sp)?;
                    Ok(())
                })?;
                let ms = time_gpu(g, it.0, it.1, &mut || {
                    logprob::dhidden_split_gemm(g, w, Dims { t: rows, h, v }, u, part, sp)?;
                    ps.scatter_sum(dhb, part, count, 0, &Chunk { t0: 0, n: rows, hid: x, tgt: tg, idx: 0 })
                })?;
                let tiles = rows.div_ceil(128) * h.div_ceil(256) * count;
                let op = if rows == tc {
                    format!("stage dhidden split {sp}")
                } else {
                    format!("stage dhidden split {sp} tc={rows}")
                };
                out_rows.push(BenchRow {
                    op,
                    shape: shape.into(),
                    ms,
                    bytes: (2 * rows * v + 2 * v * h + 8 * count * rows * h + 2 * rows * h) as f64,
                    flops: 2.0 * (rows * h * v) as f64,
                    rel_err: None,
                    note: format!(
                        "x{per_call} chunks = {:.2} ms; GEMM alone {gemm_ms:.3} ms ({:.0} TFLOP/s), S={count}: {tiles} tiles of 128x256 = {:.2} waves on {} SMs",
                        ms * per_call as f64,
                        2.0 * (rows * h * v) as f64 / (gemm_ms * 1e-3) / 1e12,
                        tiles as f64 / g.sm_count as f64,
                        g.sm_count
                    ),
                });
            }
        }
    }
    let ms = time_gpu(g, it.0, it.1, &mut || ps.dw(dwp, store, x, tc, Cols { v0: 0, nv: v }, 1.0))?;
    row(
        "stage dW GEMM k=2048",
        ms,
        sb + 8.0 * (v * h) as f64,
        chunk_flops,
        "beta=1: f32 dW [V,H] read + written (4.4 GB)",
    );
    let ms = time_gpu(g, it.0, it.1, &mut || {
        let _scratch = (dev.zeros(bf, tc * v)?, dev.zeros(f4, tc * vc)?, dev.zeros(f4, tc * h)?);
        Ok(())
    })?;
    row(
        "stage scratch alloc+zero",
        ms,
        (2 * tc * v + 4 * tc * vc + 4 * tc * h) as f64,
        0.0,
        "per call, not per chunk: the 687 MiB of v1 scratch, zeroed",
    );
    // Round 4: the cost the scratch cache removes from the bf16 pass, whose kept buffer was allocated
    // uninitialised per call: wall time of a cudaMallocAsync of the bf16 pass's arena (store + hg + 4
    // partials) and its free, each followed by a sync as in the op (the pool trims at a sync).
    let arena = 2 * tc * v + 2 * tc * h + 16 * tc * h;
    let ms = super::time_cpu(1, 5, &mut || {
        // SAFETY: never read; only the allocation is timed.
        let b = unsafe { g.stream.alloc::<u8>(arena) }.map_err(|e| anyhow::anyhow!("bench alloc: {e}"))?;
        g.sync()?;
        drop(b);
        g.sync()
    })?;
    row(
        "stage scratch alloc uninit",
        ms,
        0.0,
        0.0,
        &format!(
            "per call, wall time: {:.0} MiB cudaMallocAsync + free + 2 syncs (what the cache saves per call)",
            mib(arena)
        ),
    );
    let flags = dev.upload(&vec![1.0; t], DType::F32)?;
    let (idx, pos, cnt) = (dev.zeros(DType::I32, t)?, dev.zeros(DType::I32, t)?, dev.zeros(DType::I32, 1)?);
    let ms = time_gpu(g, it.0, it.1, &mut || {
        stages::scan_nonzero(g, &flags, &idx, &pos, &cnt, t)?;
        dev.to_vec_i32(&cnt).map(|_| ())
    })?;
    row(
        "stage active scan + D2H",
        ms,
        (12 * t) as f64,
        0.0,
        "per call, not per chunk: one-block scan and the count's download",
    );
    out.extend(out_rows);
    Ok(out)
}

/// Relative error of logp at the given tokens against an f64 computation on the host.
fn check_logp(dev: &Device, logp: &Buf, host: &Host, toks: &[usize]) -> Result<f64> {
    let Host { x, w, tg, h, v } = *host;
    let got = dev.to_vec(logp)?;
    let (mut num, mut den) = (0f64, 0f64);
    for &i in toks {
        let xi = &x[i * h..(i + 1) * h];
        let logits: Vec<f64> =
            (0..v).map(|j| xi.iter().zip(&w[j * h..(j + 1) * h]).map(|(&a, &b)| a as f64 * b as f64).sum()).collect();
        let m = logits.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
        let want = logits[tg[i] as usize] - lse;
        if !got[i].is_finite() {
            return Ok(f64::INFINITY);
        }
        num += (got[i] as f64 - want).powi(2);
        den += want * want;
    }
    Ok(num.sqrt() / den.sqrt().max(1e-300))
}

/// logits [T, V] = hidden · Wᵀ (bf16 out), dhidden = logits · W, dW += logitsᵀ · hidden (f32).
fn gemm_reference(s: &Setup, dh: &mut Buf, dw: &mut Buf, gemm_flops: f64) -> Result<BenchRow> {
    let (dev, g, it, shape) = (s.dev, s.g, s.it, s.shape);
    let Dims { t, h, v } = s.x.dims;
    let (hidden, w) = (s.x.hidden, s.x.lm_head);
    let logits = dev.zeros(DType::BF16, t * v)?;
    let (x, wp, l, dhp, dwp) = (hidden.ptr(g)?, w.ptr(g)?, logits.ptr(g)?, dh.ptr(g)?, dw.ptr(g)?);
    let gm = |m, n, k, ta, tb, a, b, c, beta, c_type| Gemm {
        m,
        n,
        k,
        trans_a: ta,
        trans_b: tb,
        alpha: 1.0,
        beta,
        a,
        b,
        c,
        ab_type: GemmType::Bf16,
        c_type,
        batch: (1, 0, 0, 0),
    };
    let calls = [
        gm(t, v, h, false, true, x, wp, l, 0.0, GemmType::Bf16),
        gm(t, h, v, false, false, l, wp, dhp, 0.0, GemmType::Bf16),
        gm(v, h, t, true, false, l, x, dwp, 1.0, GemmType::F32),
    ];
    let ms = time_gpu(g, it.0, it.1, &mut || calls.iter().try_for_each(|c| g.blas.gemm(c)))?;
    let each: Vec<String> = calls
        .iter()
        .map(|c| time_gpu(g, 1, 3, &mut || g.blas.gemm(c)).map(|m| format!("{m:.1}")))
        .collect::<Result<_>>()?;
    Ok(BenchRow {
        op: "cuBLAS 3 GEMMs (reference)".into(),
        shape: shape.into(),
        ms,
        bytes: 0.0,
        flops: 3.0 * gemm_flops,
        rel_err: None,
        note: format!(
            "logits/dhidden/dW {} ms; holds [T,V] logits: {:.2} GiB",
            each.join("/"),
            (2 * t * v) as f64 / GIB
        ),
    })
}

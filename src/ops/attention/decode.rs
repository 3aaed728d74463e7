//! Decode attention for rollouts: `KvCache` (one per layer) keeps every sequence's keys and
//! values on the device across turns; `decode` lets the newest n_new tokens of each sequence
//! (one while sampling, a few for an appended user turn) attend causally to its cache.
//!
//! CUDA: bf16 with d ∈ {64, 80, 128} runs split-K on tensor cores (kernels/attention_decode.cu):
//! each block takes one (sequence, kv head, 64-row query tile) and one chunk of the cache, so a
//! long cache spreads over the GPU; a combine kernel merges the chunks' (max, sum, unnormalised
//! output). Otherwise one warp per query row (kernels/attention_simple.cu).
//! With n_new · group ≤ 16 (`AttnDecodeKernel::Rows16`, see `plan_decode`): the 16-row kernel of
//! the same file (the four warps split each key tile, three-stage ring, one wave of chunks) and
//! partial buffers kept in the cache across calls (no per-call allocation).

use super::{aligned16, check_tc, cpu, plan_decode, AttnDecodeKernel, AttnShape, Varlen, TILE};
use crate::cuda::api;
use crate::cuda::{cfg_1d, cfg_rows};
use crate::ops::{check, check_dtype, same_float_dtype};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};
use cudarc::driver::LaunchConfig;
use std::sync::Mutex;

/// One layer's KV cache: k, v [batch, max_len, hkv, d]; sequence b holds lens[b] tokens.
pub struct KvCache {
    pub k: Buf, // [batch, max_len, hkv, d]
    pub v: Buf, // [batch, max_len, hkv, d]
    pub batch: usize,
    pub max_len: usize,
    pub hkv: usize,
    pub d: usize,
    lens: Vec<i32>, // [batch], the host copy
    lens_buf: Buf,  // [batch] i32, the device copy the kernels read
    /// The split-K decode partials of Rows64 and Rows16 (o [n, rows, d], (max, sum) [n, rows, 2]
    /// f32), grown on demand and reused: every element a call reads is written by that call's
    /// first kernel.
    partials: Mutex<Option<(Buf, Buf)>>,
}

impl KvCache {
    /// The split-K decode partials, o [nsplit, rows, d] (`no` f32) and (max, sum) [nsplit, rows, 2]
    /// in log2 units (`nml`), kept across calls and grown when a step needs more. Not zeroed:
    /// every block of the split launch writes the partials of all its real rows (empty chunks
    /// write m = -inf, which the combine skips), and the combine reads no others.
    fn partials_for(
        &self, dev: &Device, no: usize, nml: usize,
    ) -> Result<std::sync::MutexGuard<'_, Option<(Buf, Buf)>>> {
        let mut guard =
            self.partials.lock().map_err(|_| anyhow::anyhow!("attention_decode: partial-buffer lock poisoned"))?;
        if !matches!(&*guard, Some((po, pml)) if po.len() >= no && pml.len() >= nml) {
            *guard = None; // free the smaller pair first
            *guard = Some((dev.zeros_f32(no)?, dev.zeros_f32(nml)?));
        }
        Ok(guard)
    }

    /// An empty cache in the device's activation dtype.
    pub fn new(dev: &Device, batch: usize, max_len: usize, hkv: usize, d: usize) -> Result<Self> {
        Self::with_dtype(dev, dev.act_dtype(), batch, max_len, hkv, d)
    }

    pub fn with_dtype(dev: &Device, dtype: DType, batch: usize, max_len: usize, hkv: usize, d: usize) -> Result<Self> {
        if batch == 0 || max_len == 0 || hkv == 0 || d == 0 {
            bail!("KvCache: batch, max_len, hkv and d must be positive (got {batch}, {max_len}, {hkv}, {d})");
        }
        if batch * max_len * hkv * d >= i32::MAX as usize || max_len >= i32::MAX as usize {
            bail!("KvCache: {batch}×{max_len}×{hkv}×{d} elements exceed what the kernels index");
        }
        let n = batch * max_len * hkv * d;
        Ok(Self {
            k: dev.zeros(dtype, n)?,
            v: dev.zeros(dtype, n)?,
            batch,
            max_len,
            hkv,
            d,
            lens: vec![0; batch],
            lens_buf: dev.zeros(DType::I32, batch)?,
            partials: Mutex::new(None),
        })
    }

    /// Tokens held per sequence.
    pub fn lens(&self) -> &[i32] {
        &self.lens
    }

    /// Appends n_new rows per sequence: k_new, v_new [batch, n_new, hkv, d].
    pub fn append(&mut self, dev: &Device, k_new: &Buf, v_new: &Buf, n_new: usize) -> Result<()> {
        let cu: Vec<i32> = (0..=self.batch).map(|b| (b * n_new) as i32).collect();
        self.append_rows(dev, k_new, v_new, &cu, None, n_new)
    }

    /// Appends packed rows k_new, v_new [T, hkv, d]: sequence b gets rows seqs[b]..seqs[b+1]
    /// (a prefill of prompts of different lengths). seqs must have `batch` sequences.
    pub fn append_varlen(&mut self, dev: &Device, k_new: &Buf, v_new: &Buf, seqs: &Varlen) -> Result<()> {
        if seqs.nseq() != self.batch {
            bail!("KvCache::append_varlen: {} sequences for a cache of batch {}", seqs.nseq(), self.batch);
        }
        self.append_rows(dev, k_new, v_new, &seqs.host, Some(&seqs.buf), 0)
    }

    /// Empties every sequence (the buffers keep their contents; lengths go to 0).
    pub fn clear(&mut self, dev: &Device) -> Result<()> {
        self.lens.fill(0);
        self.upload_lens(dev)
    }

    /// Shortens sequence b to `len` tokens (drops the rest, e.g. a rejected turn).
    pub fn truncate(&mut self, dev: &Device, b: usize, len: usize) -> Result<()> {
        if b >= self.batch || len > self.lens[b] as usize {
            bail!("KvCache::truncate: sequence {b} (batch {}) to {len} tokens: out of range", self.batch);
        }
        self.lens[b] = len as i32;
        self.upload_lens(dev)
    }

    /// Copies the first `len` cached tokens of sequence `src` over sequence `dst` (which then
    /// holds exactly those): the N rollouts of a dialogue share its prefilled first prompt.
    pub fn copy_prefix(&mut self, dev: &Device, src: usize, dst: usize, len: usize) -> Result<()> {
        if src >= self.batch || dst >= self.batch || len > self.lens[src] as usize {
            bail!("KvCache::copy_prefix: {len} tokens of sequence {src} to {dst} (batch {}, source holds {}): out of range", self.batch, self.lens.get(src).copied().unwrap_or(0));
        }
        if src != dst {
            let row = self.hkv * self.d;
            let (a, b, n) = (src * self.max_len * row, dst * self.max_len * row, len * row);
            copy_within(dev, &mut self.k, a, b, n)?;
            copy_within(dev, &mut self.v, a, b, n)?;
        }
        self.lens[dst] = len as i32;
        self.upload_lens(dev)
    }

    /// `uniform_n` > 0: sequence b owns rows b·n..(b+1)·n (the kernel needs no offsets);
    /// else `cu_buf` holds the offsets on the device.
    fn append_rows(
        &mut self, dev: &Device, k_new: &Buf, v_new: &Buf, cu: &[i32], cu_buf: Option<&Buf>, uniform_n: usize,
    ) -> Result<()> {
        let op = "kv_append";
        let row = self.hkv * self.d;
        let total = *cu.last().unwrap_or(&0) as usize;
        check(k_new, total * row, op, "k_new")?;
        check(v_new, total * row, op, "v_new")?;
        for (b, w) in cu.windows(2).enumerate() {
            let n = (w[1] - w[0]) as usize;
            if self.lens[b] as usize + n > self.max_len {
                bail!("{op}: sequence {b} holds {} tokens; {n} more exceed max_len {}", self.lens[b], self.max_len);
            }
        }
        match dev {
            Device::Cpu => {
                let (k, v) = (self.k.host_mut()?, self.v.host_mut()?);
                let cache = cpu::HostCache { k, v, lens: &self.lens, max_len: self.max_len };
                cpu::kv_append(cache, k_new.host()?, v_new.host()?, cu, row);
            }
            Device::Cuda(g) => {
                let dt = same_float_dtype(op, &[&self.k, &self.v, k_new, v_new])?;
                if total > 0 {
                    let cu_ptr = match cu_buf {
                        Some(b) => b.ptr(g)?,
                        None => self.lens_buf.ptr(g)?, // unused when uniform_n > 0
                    };
                    api::attention_simple::AttentionKvAppend {
                        kc: self.k.ptr(g)?,
                        vc: self.v.ptr(g)?,
                        lens: self.lens_buf.ptr(g)?,
                        knew: k_new.ptr(g)?,
                        vnew: v_new.ptr(g)?,
                        cu: cu_ptr,
                        nseq: self.batch as i32,
                        uniform_n: uniform_n as i32,
                        max_len: self.max_len as i32,
                        row: row as i32,
                    }
                    .launch(g, dt, cfg_rows(total, 128, 0))?;
                }
            }
        }
        for (b, w) in cu.windows(2).enumerate() {
            self.lens[b] += w[1] - w[0];
        }
        self.upload_lens(dev)
    }

    /// The host view of a CPU cache (the CPU reference's arguments).
    fn host(&self) -> Result<cpu::HostCache<'_, &[f32]>> {
        Ok(cpu::HostCache { k: self.k.host()?, v: self.v.host()?, lens: &self.lens, max_len: self.max_len })
    }

    /// Copies the host lengths to the device copy (stream-ordered after earlier kernels).
    fn upload_lens(&mut self, dev: &Device) -> Result<()> {
        match (&mut self.lens_buf, dev) {
            (Buf::HostI32(v), _) => v.copy_from_slice(&self.lens),
            (Buf::DevI32(s, _), Device::Cuda(g)) => g.stream.memcpy_htod(&self.lens, s)?,
            (b, _) => bail!("KvCache: lengths buffer {b:?} does not match device {}", dev.name()),
        }
        Ok(())
    }
}

/// The cache's kv heads and head dim are the shape's; the kernels hold a head of ≤ 256.
fn check_cache_shape(op: &str, s: &AttnShape, cache: &KvCache) -> Result<()> {
    if s.hkv != cache.hkv || s.d != cache.d {
        bail!("{op}: shape has hkv {} d {}, the cache hkv {} d {}", s.hkv, s.d, cache.hkv, cache.d);
    }
    if s.d > 256 {
        bail!("{op}: head dim {} > 256 is not supported", s.d);
    }
    Ok(())
}

/// Copies n elements of `buf` from offset a to offset b (non-overlapping ranges), on its device.
fn copy_within(dev: &Device, buf: &mut Buf, a: usize, b: usize, n: usize) -> Result<()> {
    if a.max(b) + n > buf.len() || (a < b + n && b < a + n) {
        bail!("KvCache copy: ranges {a}+{n} and {b}+{n} overlap or exceed {} elements", buf.len());
    }
    match (buf, dev) {
        (Buf::HostF32(v), _) => v.copy_within(a..a + n, b),
        (Buf::DevBf16(s, _), Device::Cuda(g)) => dtod(g, s, a, b, n)?,
        (Buf::DevF32(s, _), Device::Cuda(g)) => dtod(g, s, a, b, n)?,
        (other, _) => bail!("KvCache copy: buffer {other:?} does not match device {}", dev.name()),
    }
    Ok(())
}

fn dtod<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    g: &crate::cuda::Gpu, s: &mut cudarc::driver::CudaSlice<T>, a: usize, b: usize, n: usize,
) -> Result<()> {
    // Stage through a scratch slice: two views of one allocation cannot be borrowed at once.
    let mut tmp = g.stream.alloc_zeros::<T>(n)?;
    g.stream.memcpy_dtod(&s.slice(a..a + n), &mut tmp)?;
    g.stream.memcpy_dtod(&tmp, &mut s.slice_mut(b..b + n))?;
    Ok(())
}

/// Ragged decode step: out/q [T_new, hq, d] packed by `cu_new` ([batch + 1] offsets; sequence b
/// has cu_new[b+1] − cu_new[b] new tokens, 0 for an idle slot), already appended to `cache`.
/// New token i of sequence b sits at position lens[b] − n_b + i. Uniform steps (every sequence
/// the same n_new ≥ 1) take `decode`'s tensor-core kernels.
pub fn decode_varlen(
    dev: &Device, out: &mut Buf, q: &Buf, cache: &KvCache, cu_new: &Varlen, s: &AttnShape,
) -> Result<()> {
    let op = "attention_decode_varlen";
    s.validate(op)?;
    if cu_new.nseq() != cache.batch {
        bail!("{op}: {} sequences in cu_new for a cache of batch {}", cu_new.nseq(), cache.batch);
    }
    let n0 = cu_new.host[1] - cu_new.host[0];
    if n0 > 0 && cu_new.host.windows(2).all(|w| w[1] - w[0] == n0) {
        return decode(dev, out, q, cache, n0 as usize, s);
    }
    check_cache_shape(op, s, cache)?;
    let total = cu_new.total();
    let rows = total * s.hq;
    check(q, rows * s.d, op, "q")?;
    check(out, rows * s.d, op, "out")?;
    if rows * s.d >= i32::MAX as usize {
        bail!("{op}: {rows} query rows × {} exceed the 2^31 elements the kernels index", s.d);
    }
    for (b, w) in cu_new.host.windows(2).enumerate() {
        if cache.lens[b] < w[1] - w[0] {
            bail!(
                "{op}: sequence {b} holds {} tokens, fewer than its {} new ones (append them first)",
                cache.lens[b],
                w[1] - w[0]
            );
        }
    }
    if total == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            cpu::decode_varlen(out.host_mut()?, q.host()?, cache.host()?, &cu_new.host, s);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[out, q, &cache.k, &cache.v])?;
            api::attention_simple::AttentionSimpleDecodeVarlen {
                out: out.ptr(g)?,
                q: q.ptr(g)?,
                kc: cache.k.ptr(g)?,
                vc: cache.v.ptr(g)?,
                lens: cache.lens_buf.ptr(g)?,
                cu: cu_new.buf.ptr(g)?,
                b: cache.batch as i32,
                hq: s.hq as i32,
                hkv: s.hkv as i32,
                d: s.d as i32,
                max_len: cache.max_len as i32,
                scale: s.scale,
                causal: s.causal as i32,
            }
            .launch(g, dt, cfg_1d(rows * 32, 128))
        }
    }
}

/// out [batch, n_new, hq, d] (=): the last n_new tokens of each cached sequence (queries
/// q [batch, n_new, hq, d], already appended to `cache`) attend to the cache; causal: new token
/// i sits at position lens[b] − n_new + i and sees positions 0..=that.
pub fn decode(dev: &Device, out: &mut Buf, q: &Buf, cache: &KvCache, n_new: usize, s: &AttnShape) -> Result<()> {
    let kernel = match dev {
        Device::Cpu => AttnDecodeKernel::Simple,
        Device::Cuda(g) => {
            let aligned = aligned16(g, &[out, q, &cache.k, &cache.v])?;
            plan_decode(q.dtype(), s.d, n_new, s.hq / s.hkv.max(1), aligned)
        }
    };
    decode_with(dev, out, q, cache, n_new, s, kernel)
}

/// `decode` with an explicit kernel (the bench and tests run each); an error when a tensor-core
/// kernel cannot take the call (dtype, head dim, alignment, > 16 rows for Rows16). On the CPU the
/// kernel is ignored.
pub fn decode_with(
    dev: &Device, out: &mut Buf, q: &Buf, cache: &KvCache, n_new: usize, s: &AttnShape, kernel: AttnDecodeKernel,
) -> Result<()> {
    let op = "attention_decode";
    s.validate(op)?;
    check_cache_shape(op, s, cache)?;
    if n_new == 0 {
        bail!("{op}: n_new must be at least 1");
    }
    let (b, hq, d) = (cache.batch, s.hq, s.d);
    let rows = b * n_new * hq; // query rows
    check(q, rows * d, op, "q")?;
    check(out, rows * d, op, "out")?;
    if rows * d >= i32::MAX as usize {
        bail!("{op}: {rows} query rows × {d} exceed the 2^31 elements the kernels index");
    }
    for (i, &l) in cache.lens.iter().enumerate() {
        if (l as usize) < n_new {
            bail!("{op}: sequence {i} holds {l} tokens, fewer than the {n_new} new ones (append them first)");
        }
    }
    match dev {
        Device::Cpu => {
            cpu::decode(out.host_mut()?, q.host()?, cache.host()?, n_new, s);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[out, q, &cache.k, &cache.v])?;
            check_dtype(&cache.lens_buf, DType::I32, op, "lens")?;
            let grp = hq / s.hkv;
            if kernel == AttnDecodeKernel::Simple {
                return api::attention_simple::AttentionSimpleDecode {
                    out: out.ptr(g)?,
                    q: q.ptr(g)?,
                    kc: cache.k.ptr(g)?,
                    vc: cache.v.ptr(g)?,
                    lens: cache.lens_buf.ptr(g)?,
                    b: b as i32,
                    n_new: n_new as i32,
                    hq: hq as i32,
                    hkv: s.hkv as i32,
                    d: d as i32,
                    max_len: cache.max_len as i32,
                    scale: s.scale,
                    causal: s.causal as i32,
                }
                .launch(g, dt, cfg_1d(rows * 32, 128));
            }
            check_tc(op, kernel, dt, d, aligned16(g, &[out, q, &cache.k, &cache.v])?)?;
            if kernel == AttnDecodeKernel::Rows16 {
                if n_new * grp > 16 {
                    bail!("{op}: kernel Rows16 takes at most 16 query rows per kv head, got {n_new} × {grp}");
                }
                return decode_v2(g, dev, out, q, cache, n_new, s);
            }
            // Split the longest cache so that the grid covers the GPU about three times.
            let mtiles = (n_new * grp).div_ceil(TILE);
            let base = b * s.hkv * mtiles;
            let longest = cache.lens.iter().copied().max().unwrap_or(1).max(1) as usize;
            let want = (3 * g.sm_count as usize).div_ceil(base).clamp(1, longest.div_ceil(TILE));
            let chunk = longest.div_ceil(want).div_ceil(TILE) * TILE;
            let nsplit = longest.div_ceil(chunk);
            if s.hkv * mtiles > 65535 || b > 65535 {
                bail!("{op}: grid of {} kv-head tiles × {b} sequences exceeds the launch limits", s.hkv * mtiles);
            }
            let cfg = LaunchConfig {
                grid_dim: (nsplit as u32, (s.hkv * mtiles) as u32, b as u32),
                block_dim: (128, 1, 1),
                // Q tile plus two stages of K and V tiles, rows padded by 8.
                shared_mem_bytes: (5 * TILE * (d + 8) * 2) as u32,
            };
            let guard = cache.partials_for(dev, nsplit * rows * d, nsplit * rows * 2)?;
            let Some((part_o, part_ml)) = guard.as_ref() else { bail!("{op}: partial buffers missing") };
            Split { q, cache, part_o, part_ml, n_new, chunk, nsplit }.launch(g, AttnDecodeKernel::Rows64, out, s, cfg)
        }
    }
}

/// Rows16 decode for n_new · group ≤ 16 query rows per (sequence, kv head): grid (chunks, hkv, batch)
/// sized to one wave of two blocks per SM, partials cached in `cache`, then the combine kernel.
fn decode_v2(
    g: &crate::cuda::Gpu, dev: &Device, out: &mut Buf, q: &Buf, cache: &KvCache, n_new: usize, s: &AttnShape,
) -> Result<()> {
    let op = "attention_decode";
    let (b, d) = (cache.batch, s.d);
    let rows = b * n_new * s.hq; // query rows, as in `decode_with`
    let base = b * s.hkv;
    let longest = cache.lens.iter().copied().max().unwrap_or(1).max(1) as usize;
    // Two resident blocks per SM (smem-bound): as many chunks as fill one wave.
    let slots = 2 * g.sm_count as usize;
    let want = (slots / base).clamp(1, longest.div_ceil(TILE));
    let chunk = longest.div_ceil(want).div_ceil(TILE) * TILE;
    let nsplit = longest.div_ceil(chunk);
    if s.hkv > 65535 || b > 65535 {
        bail!("{op}: grid of {} kv heads × {b} sequences exceeds the launch limits", s.hkv);
    }
    let guard = cache.partials_for(dev, nsplit * rows * d, nsplit * rows * 2)?;
    let Some((part_o, part_ml)) = guard.as_ref() else { bail!("{op}: partial buffers missing") };
    let cfg = LaunchConfig {
        grid_dim: (nsplit as u32, s.hkv as u32, b as u32),
        block_dim: (128, 1, 1),
        // a 16-row Q tile plus three stages of K and V tiles, rows padded by 8
        shared_mem_bytes: ((16 + 6 * TILE) * (d + 8) * 2) as u32,
    };
    Split { q, cache, part_o, part_ml, n_new, chunk, nsplit }.launch(g, AttnDecodeKernel::Rows16, out, s, cfg)
}

/// A split-KV decode launch: the partial kernel over `nsplit` chunks of `chunk` cached tokens,
/// then the combine into `out`. Rows64 and Rows16 take the same arguments.
struct Split<'a> {
    q: &'a Buf,
    cache: &'a KvCache,
    part_o: &'a Buf,
    part_ml: &'a Buf,
    n_new: usize,
    chunk: usize,
    nsplit: usize,
}

impl Split<'_> {
    fn launch(
        self, g: &crate::cuda::Gpu, kernel: AttnDecodeKernel, out: &mut Buf, s: &AttnShape, cfg: LaunchConfig,
    ) -> Result<()> {
        let Split { q, cache, part_o, part_ml, n_new, chunk, nsplit } = self;
        let rows = cache.batch * n_new * s.hq;
        let a = api::attention_decode::AttentionDecodeBf16 {
            part_o: part_o.ptr(g)?,
            part_ml: part_ml.ptr(g)?,
            q: q.ptr(g)?,
            kc: cache.k.ptr(g)?,
            vc: cache.v.ptr(g)?,
            lens: cache.lens_buf.ptr(g)?,
            n_new: n_new as i32,
            hq: s.hq as i32,
            hkv: s.hkv as i32,
            max_len: cache.max_len as i32,
            chunk: chunk as i32,
            nsplit: nsplit as i32,
            sl2: s.scale * std::f32::consts::LOG2_E,
            causal: s.causal as i32,
        };
        if kernel == AttnDecodeKernel::Rows16 {
            api::attention_decode::AttentionDecode16Bf16::from(a).launch(g, s.d as u32, cfg)?;
        } else {
            a.launch(g, s.d as u32, cfg)?;
        }
        api::attention_decode::AttentionDecodeCombineBf16 {
            out: out.ptr(g)?,
            part_o: part_o.ptr(g)?,
            part_ml: part_ml.ptr(g)?,
            rows: rows as i32,
            nsplit: nsplit as i32,
            d: s.d as i32,
        }
        .launch(g, cfg_rows(rows, 128, 0))
    }
}

//! Token sampling for the rollout engine, over the full vocabulary, on the device: no logits
//! download, rows × 8 bytes back. Kernel: kernels/sample.cu (one 1024-thread block per row).
//!
//! Semantics (the `cpu` module defines them), per row with x_j = logit_j × (1/T) (one f32
//! multiply by the f32 reciprocal; -0 read as +0):
//! - greedy: argmax_j x_j, lowest index on ties; the kept set is the ties of the max.
//! - top-k (k = 0 off, k ≥ V keeps all): keep x_j ≥ the k-th largest x (boundary ties kept).
//! - top-p (1 = off), on the top-k survivors S: with fixed-point masses
//!   q_j = round(exp(x_j − max) · 2^40) (u64, exact sums) and Z_S = Σ_S q_j, sort S by x
//!   descending, take the smallest m with (Σ_{i≤m} q_(i)) as f64 ≥ top_p × Z_S as f64, keep
//!   every survivor with x ≥ x_(m) (ties kept). The threshold τ of a row is the x value the kept
//!   set starts at (kept = x ≥ τ; −inf keeps all, the max for greedy rows).
//! - the token is argmax over kept j of x_j + g_j, lowest index on ties (Gumbel-max: exact softmax
//!   sampling over the kept set), g_j = −ln(−ln u_j), u_j from a splitmix64 hash of (stream key,
//!   j). It depends only on the row's logits, params and key, never on the batch.
//! - logp = log_softmax(x)[token] over the full vocabulary at T (untruncated, as GRPO needs),
//!   from the exact fixed-point sum (masses below 2^-41 of the max's count as 0: ≤ V·2^-41
//!   relative, 7e-8 at V = 152,064).
//!
//! exp, ln, the hash and every f32 operation that decides a threshold or a token are written the
//! same way here and in the kernel (explicit fused multiply-adds, no contraction), so the GPU's
//! thresholds and tokens are bit-identical to the CPU's; only logp's final f64 log may differ in
//! the last bits. This is why the reference is f32-only rather than generic over `Real`.
//!
//! NaN or +inf logits are an error on the CPU naming the row and token; on the GPU (which never
//! inspects the logits on the host) a NaN reads as −inf and +inf as f32::MAX, and a row with no
//! finite logit is reported as an error naming the row. Overflowing x (tiny T) clamps to ±f32::MAX.
//!
//! Cost on the GPU: one pass for the max, one for the masses, one for the Gumbel argmax (pruned:
//! a token whose x + 17 is below the thread's best cannot win), plus up to 32 counting passes for
//! top-k and up to 32 mass passes for top-p, each only when that filter is on.

use crate::cuda::api;
use crate::cuda::{cfg_rows, dptr};
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Context, Result};
use cudarc::driver::CudaSlice;

/// The kernel's block width (SAMPLE_THREADS in kernels/sample.cu).
const THREADS: u32 = 1024;
/// Smallest temperature: 1/T must stay finite in f32.
pub const MIN_TEMPERATURE: f32 = 1e-30;
/// Largest vocabulary: V · 2^40 must fit the u64 mass sums.
pub const MAX_VOCAB: usize = 1 << 23;

/// Per-row sampling parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// T > 0 (≥ MIN_TEMPERATURE, finite); also the temperature of `logp` for greedy rows.
    pub temperature: f32,
    /// 0 = off; ≥ V keeps all.
    pub top_k: usize,
    /// In (0, 1]; 1 = off.
    pub top_p: f32,
    /// Argmax (lowest index on ties); `top_k`/`top_p` are then ignored.
    pub greedy: bool,
}

impl SampleParams {
    /// Argmax decoding; logp at T = 1.
    pub fn greedy() -> Self {
        SampleParams { temperature: 1.0, top_k: 0, top_p: 1.0, greedy: true }
    }

    /// Sampling at temperature `t` with top-k (0 = off) and top-p (1 = off), validated.
    pub fn new(t: f32, top_k: usize, top_p: f32) -> Result<Self> {
        let p = SampleParams { temperature: t, top_k, top_p, greedy: false };
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t >= MIN_TEMPERATURE) {
            bail!("SampleParams: temperature must be finite and at least {MIN_TEMPERATURE:e} (allowed range [{MIN_TEMPERATURE:e}, inf)), got {t}");
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            bail!("SampleParams: top_p must be in (0, 1] (1 = off), got {p}");
        }
        Ok(())
    }

    /// 1/T as the kernel and the reference multiply by it.
    pub fn inv_temperature(&self) -> f32 {
        1.0 / self.temperature
    }
}

/// One sampled token and its untruncated log-probability at the row's temperature.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    pub token: i32,
    pub logp: f32,
}

/// A well-mixed 64-bit key per (seed, dialogue, rollout, step): each rollout's reproducible
/// stream. A bijection in each argument with the others fixed, so distinct inputs never share a
/// key by construction of one coordinate.
pub fn stream_key(seed: u64, dialogue: u64, rollout: u64, step: u64) -> u64 {
    let mut h = cpu::mix64(seed ^ 0x243F_6A88_85A3_08D3);
    for (salt, v) in
        [(0x1319_8A2E_0370_7344u64, dialogue), (0xA409_3822_299F_31D0, rollout), (0x082E_FA98_EC4E_6C89, step)]
    {
        h = cpu::mix64(h.wrapping_add(0x9E37_79B9_7F4A_7C15) ^ cpu::mix64(v ^ salt));
    }
    h
}

/// Device buffers for up to `max_rows` rows, allocated once so that `sample` allocates nothing
/// on the device.
struct DevBufs {
    /// 4 u32 per row: inv_t bits, top_k, top_p bits, flags (bit 0 greedy).
    params: CudaSlice<u32>,
    keys: CudaSlice<u64>,
    /// 2 u32 per row: token, logp bits.
    out: CudaSlice<u32>,
    thr: CudaSlice<f32>,
}

pub struct Sampler {
    max_rows: usize,
    vocab: usize,
    bufs: Option<DevBufs>,
    /// Rows of the last call (what `thresholds` returns).
    last_rows: usize,
    /// The CPU path's thresholds of the last call.
    host_thr: Vec<f32>,
}

impl Sampler {
    pub fn new(dev: &Device, max_rows: usize, vocab: usize) -> Result<Sampler> {
        if vocab == 0 || vocab > MAX_VOCAB {
            bail!("Sampler: vocab must be in [1, {MAX_VOCAB}], got {vocab}");
        }
        if max_rows > i32::MAX as usize / 4 {
            bail!("Sampler: max_rows {max_rows} is too large");
        }
        let bufs = match dev {
            Device::Cpu => None,
            Device::Cuda(g) => Some(DevBufs {
                params: g.alloc::<u32>(4 * max_rows)?,
                keys: g.alloc::<u64>(max_rows)?,
                out: g.alloc::<u32>(2 * max_rows)?,
                thr: g.alloc::<f32>(max_rows)?,
            }),
        };
        Ok(Sampler { max_rows, vocab, bufs, last_rows: 0, host_thr: Vec::new() })
    }

    pub fn max_rows(&self) -> usize {
        self.max_rows
    }
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Samples one token per row of `logits` (its first rows × vocab elements, row-major; bf16 or
    /// f32 on the GPU) with each row's params and stream key. On the GPU: two small uploads into
    /// the preallocated buffers, one launch, a rows × 8 byte download.
    pub fn sample(
        &mut self, dev: &Device, logits: &Buf, rows: usize, params: &[SampleParams], keys: &[u64],
    ) -> Result<Vec<Sampled>> {
        let op = "sample";
        let v = self.vocab;
        if rows > self.max_rows {
            bail!("{op}: {rows} rows exceed the sampler's max_rows {}", self.max_rows);
        }
        if params.len() != rows || keys.len() != rows {
            bail!("{op}: {rows} rows but {} params and {} keys", params.len(), keys.len());
        }
        if logits.len() < rows * v {
            bail!("{op}: logits has {} elements, need at least rows × vocab = {rows} × {v}", logits.len());
        }
        for (r, p) in params.iter().enumerate() {
            p.validate().with_context(|| format!("{op}: row {r}"))?;
        }
        self.last_rows = rows;
        match (dev, self.bufs.as_mut()) {
            (Device::Cpu, None) => {
                let l = logits.host()?;
                self.host_thr.clear();
                let mut out = Vec::with_capacity(rows);
                for r in 0..rows {
                    let (s, thr) = cpu::sample(&l[r * v..(r + 1) * v], &params[r], keys[r])
                        .with_context(|| format!("{op}: row {r}"))?;
                    out.push(s);
                    self.host_thr.push(thr);
                }
                Ok(out)
            }
            (Device::Cuda(g), Some(b)) => {
                let dt = logits.dtype();
                if dt == DType::I32 {
                    bail!("{op}: logits must be bf16 or f32, got i32");
                }
                if rows == 0 {
                    return Ok(Vec::new());
                }
                let mut hp = Vec::with_capacity(4 * rows);
                for p in params {
                    hp.extend_from_slice(&[
                        p.inv_temperature().to_bits(),
                        p.top_k.min(u32::MAX as usize) as u32,
                        p.top_p.to_bits(),
                        p.greedy as u32,
                    ]);
                }
                g.stream.memcpy_htod(&hp, &mut b.params).context("sample: uploading params")?;
                g.stream.memcpy_htod(keys, &mut b.keys).context("sample: uploading keys")?;
                let s = &g.stream;
                api::sample::Sample {
                    out: dptr(&b.out, s),
                    thr: dptr(&b.thr, s),
                    logits: logits.ptr(g)?,
                    params: dptr(&b.params, s),
                    keys: dptr(&b.keys, s),
                    rows: rows as i32,
                    v: v as i32,
                }
                .launch(g, dt, cfg_rows(rows, THREADS, 0))?;
                let mut h = vec![0u32; 2 * rows];
                g.stream.memcpy_dtoh(&b.out.slice(0..2 * rows), &mut h).context("sample: downloading tokens")?;
                g.sync()?;
                let mut out = Vec::with_capacity(rows);
                for r in 0..rows {
                    let logp = f32::from_bits(h[2 * r + 1]);
                    if logp.is_nan() {
                        bail!("{op}: row {r} has no finite logit (every logit is -inf or NaN)");
                    }
                    out.push(Sampled { token: h[2 * r] as i32, logp });
                }
                Ok(out)
            }
            _ => bail!("{op}: the sampler was created for another device than {}", dev.name()),
        }
    }

    /// The kept-set threshold (kept = x ≥ τ, x = logit / T; −inf keeps all) of each row of the
    /// last `sample` call.
    pub fn thresholds(&self, dev: &Device) -> Result<Vec<f32>> {
        match (dev, self.bufs.as_ref()) {
            (Device::Cpu, None) => Ok(self.host_thr.clone()),
            (Device::Cuda(g), Some(b)) => {
                let mut h = vec![0f32; self.last_rows];
                if self.last_rows > 0 {
                    g.stream
                        .memcpy_dtoh(&b.thr.slice(0..self.last_rows), &mut h)
                        .context("sample: downloading thresholds")?;
                    g.sync()?;
                }
                Ok(h)
            }
            _ => bail!("sample thresholds: the sampler was created for another device than {}", dev.name()),
        }
    }
}

/// The reference: plain sorts and sums, with the kernel's exact arithmetic.
pub mod cpu {
    use super::{SampleParams, Sampled, MAX_VOCAB};
    use anyhow::{bail, Result};

    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    /// 40 ln 2, the 2^40 fixed-point scale of the masses in log space (same literal as the kernel).
    const LN_SCALE: f64 = 27.725887222397812;

    /// splitmix64's finaliser.
    pub fn mix64(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// exp(d) for d ≤ 0, 0 below −32: range reduction by ln 2 and a degree-7 Taylor polynomial
    /// (≤ 1e-7 relative), in the kernel's exact operation order.
    pub fn exp_neg(d: f32) -> f32 {
        if d.is_nan() || d < -32.0 {
            return 0.0;
        }
        let n = (d * f32::from_bits(0x3fb8_aa3b)).round_ties_even();
        let r = (-n).mul_add(f32::from_bits(0x3f31_7200), d);
        let r = (-n).mul_add(f32::from_bits(0x35bf_be8e), r);
        let mut p = f32::from_bits(0x3950_0d01);
        for c in [0x3ab6_0b61u32, 0x3c08_8889, 0x3d2a_aaab, 0x3e2a_aaab] {
            p = p.mul_add(r, f32::from_bits(c));
        }
        p = p.mul_add(r, 0.5);
        p = p.mul_add(r, 1.0);
        p = p.mul_add(r, 1.0);
        p * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }

    /// ln(x) for a positive normal x: mantissa in [√½, √2], then 2·atanh((m−1)/(m+1)) to s⁹.
    pub fn ln_pos(x: f32) -> f32 {
        let b = x.to_bits();
        let mut e = ((b >> 23) & 0xff) as i32 - 127;
        let mut m = f32::from_bits((b & 0x007f_ffff) | 0x3f80_0000);
        if m > f32::from_bits(0x3fb5_04f3) {
            m *= 0.5;
            e += 1;
        }
        let s = (m - 1.0) / (m + 1.0);
        let s2 = s * s;
        let mut p = f32::from_bits(0x3de3_8e39);
        for c in [0x3e12_4925u32, 0x3e4c_cccd, 0x3eaa_aaab] {
            p = p.mul_add(s2, f32::from_bits(c));
        }
        p = p.mul_add(s2, 1.0);
        let t = s * p;
        let lnm = t + t;
        let ef = e as f32;
        ef.mul_add(f32::from_bits(0x3f31_7200), ef.mul_add(f32::from_bits(0x35bf_be8e), lnm))
    }

    /// Fixed-point mass round(exp(x − m) · 2^40), ties to even.
    pub fn mass_q(x: f32, m: f32) -> u64 {
        (exp_neg(x - m) * 1_099_511_627_776.0).round_ties_even() as u64
    }

    /// Order-preserving u32 key of a non-NaN f32 without −0 (the kernel's bisection domain).
    pub fn fkey(x: f32) -> u32 {
        let b = x.to_bits();
        if b & 0x8000_0000 != 0 {
            !b
        } else {
            b | 0x8000_0000
        }
    }

    /// u_j in (0, 1) on a 2^-23 grid, from the row's stream key.
    pub fn uniform(key: u64, j: usize) -> f32 {
        uniform_seeded(mix64(key), j)
    }

    fn uniform_seeded(rowseed: u64, j: usize) -> f32 {
        let h = mix64(rowseed ^ (j as u64 + 1).wrapping_mul(GAMMA));
        ((h >> 41) as u32 as f32 + 0.5) * f32::from_bits(0x3400_0000)
    }

    /// g_j = −ln(−ln u_j); in [−2.81, 16.64].
    pub fn gumbel(key: u64, j: usize) -> f32 {
        gumbel_seeded(mix64(key), j)
    }

    fn gumbel_seeded(rowseed: u64, j: usize) -> f32 {
        -ln_pos(-ln_pos(uniform_seeded(rowseed, j)))
    }

    /// x = l × inv_t for a finite or −inf logit: overflow clamps to ±f32::MAX, −0 becomes +0.
    pub fn scaled(l: f32, inv_t: f32) -> f32 {
        let mut x = l * inv_t;
        if x.is_infinite() && l.is_finite() {
            x = f32::MAX.copysign(x);
        }
        x + 0.0
    }

    /// The row at the row's temperature; NaN and +inf logits are errors.
    pub fn row_x(row: &[f32], p: &SampleParams) -> Result<Vec<f32>> {
        if row.is_empty() || row.len() > MAX_VOCAB {
            bail!("row of {} tokens is outside [1, {MAX_VOCAB}]", row.len());
        }
        if let Some((j, l)) = row.iter().enumerate().find(|(_, l)| l.is_nan() || **l == f32::INFINITY) {
            bail!("logit {l} at token {j} (NaN and +inf logits are errors)");
        }
        let inv = p.inv_temperature();
        let x: Vec<f32> = row.iter().map(|&l| scaled(l, inv)).collect();
        if x.iter().all(|&v| v == f32::NEG_INFINITY) {
            bail!("no finite logit (every logit is -inf)");
        }
        Ok(x)
    }

    fn max_of(x: &[f32]) -> f32 {
        x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    /// The threshold τ on x (kept = x ≥ τ) for a row already scaled by `row_x`.
    pub fn threshold_scaled(x: &[f32], p: &SampleParams) -> f32 {
        let m = max_of(x);
        if p.greedy {
            return m;
        }
        let tk = if p.top_k == 0 || p.top_k >= x.len() {
            f32::NEG_INFINITY
        } else {
            let mut s = x.to_vec();
            s.sort_by(|a, b| b.total_cmp(a));
            s[p.top_k - 1]
        };
        if p.top_p >= 1.0 {
            return tk;
        }
        let mut surv: Vec<f32> = x.iter().copied().filter(|&v| v >= tk).collect();
        surv.sort_by(|a, b| b.total_cmp(a));
        let q: Vec<u64> = surv.iter().map(|&v| mass_q(v, m)).collect();
        let zs: u64 = q.iter().sum();
        let target = p.top_p as f64 * zs as f64;
        let mut cum = 0u64;
        for (i, &qi) in q.iter().enumerate() {
            cum += qi;
            if cum as f64 >= target {
                return surv[i];
            }
        }
        unreachable!("top_p <= 1 makes the whole survivor mass reach the target")
    }

    /// The threshold τ of a row of logits (kept = logit/T ≥ τ).
    pub fn threshold(row: &[f32], p: &SampleParams) -> Result<f32> {
        Ok(threshold_scaled(&row_x(row, p)?, p))
    }

    /// The indices sampling may return for this row (for greedy rows: the ties of the max).
    pub fn kept_set(row: &[f32], p: &SampleParams) -> Result<Vec<usize>> {
        let x = row_x(row, p)?;
        let t = threshold_scaled(&x, p);
        Ok((0..x.len()).filter(|&j| x[j] >= t).collect())
    }

    /// The token, its full-vocab logp at T, and the row's threshold.
    pub fn sample(row: &[f32], p: &SampleParams, key: u64) -> Result<(Sampled, f32)> {
        p.validate()?;
        let x = row_x(row, p)?;
        let m = max_of(&x);
        let t = threshold_scaled(&x, p);
        let tok = if p.greedy {
            x.iter()
                .position(|&v| v == m)
                .ok_or_else(|| anyhow::anyhow!("sample: a row of {} logits has no maximum", x.len()))?
        } else {
            let seed = mix64(key);
            let (mut best, mut bj) = (f32::NEG_INFINITY, usize::MAX);
            for (j, &v) in x.iter().enumerate() {
                if v >= t {
                    let s = v + gumbel_seeded(seed, j);
                    if s > best || bj == usize::MAX {
                        (best, bj) = (s, j);
                    }
                }
            }
            bj
        };
        let zf: u64 = x.iter().map(|&v| mass_q(v, m)).sum();
        let logp = ((x[tok] as f64 - m as f64) - ((zf as f64).ln() - LN_SCALE)) as f32;
        Ok((Sampled { token: tok as i32, logp }, t))
    }
}

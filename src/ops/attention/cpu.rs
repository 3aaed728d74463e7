//! CPU reference for attention: plain softmax(q·kᵀ·scale)·v per query row and its backward,
//! generic over `Real` so f64 drives the finite-difference checks. No tiling, no online softmax:
//! this is the formula the CUDA kernels are checked against.
//!
//! Layouts: q/out [T, hq, d], k/v [T, hkv, d] packed by `cu` (cumulative sequence offsets,
//! `cu[0] = 0`, `cu[nseq] = T`), lse [hq, T] natural log. Query head h reads kv head h / (hq/hkv).

use super::{AttnShape, FwdOut, FwdSaved, Qkv, QkvGrads};
use crate::real::Real;

/// A KV cache on the host: k, v [B, max_len, hkv, d] (`K` = `&[R]`, or `&mut [R]` to append);
/// sequence b holds lens[b] tokens.
pub struct HostCache<'a, K> {
    pub k: K,
    pub v: K,
    pub lens: &'a [i32],
    pub max_len: usize,
}

/// Allowed keys (sequence positions 0..n) for query position `i` of a sequence of `len` tokens.
fn n_keys(causal: bool, i: usize, len: usize) -> usize {
    if causal {
        i + 1
    } else {
        len
    }
}

fn dot<R: Real>(a: &[R], b: &[R]) -> R {
    a.iter().zip(b).fold(R::ZERO, |s, (&x, &y)| s + x * y)
}

/// Softmax weights p[j] = exp(scale·q·k_j − lse) over keys k(j) for j < n; returns lse.
fn probs<R: Real>(p: &mut Vec<R>, q: &[R], n: usize, scale: R, key: &dyn Fn(usize) -> usize, k: &[R], d: usize) -> R {
    p.clear();
    let mut m = R::from_f64(f64::NEG_INFINITY);
    for j in 0..n {
        let o = key(j);
        let s = dot(q, &k[o..o + d]) * scale;
        m = m.max(s);
        p.push(s);
    }
    let mut l = R::ZERO;
    for x in p.iter_mut() {
        *x = (*x - m).exp();
        l += *x;
    }
    for x in p.iter_mut() {
        *x /= l;
    }
    m + l.ln()
}

/// out [T, hq, d], lse [hq, T] = attention(q [T, hq, d], k, v [T, hkv, d]) over the sequences of `cu`.
pub fn fwd<R: Real>(o: FwdOut<[R]>, x: Qkv<[R]>, cu: &[i32], s: &AttnShape) {
    let (FwdOut { out, lse }, Qkv { q, k, v }) = (o, x);
    let (hq, hkv, d) = (s.hq, s.hkv, s.d);
    let t_all = *cu.last().unwrap_or(&0) as usize;
    let grp = hq / hkv;
    let scale = R::from_f64(s.scale as f64);
    let mut p = Vec::new();
    for w in cu.windows(2) {
        let (start, len) = (w[0] as usize, (w[1] - w[0]) as usize);
        for h in 0..hq {
            let hk = h / grp;
            let key = |j: usize| ((start + j) * hkv + hk) * d;
            for i in 0..len {
                let qo = ((start + i) * hq + h) * d;
                let n = n_keys(s.causal, i, len);
                lse[h * t_all + start + i] = probs(&mut p, &q[qo..qo + d], n, scale, &key, k, d);
                let o = &mut out[qo..qo + d];
                o.fill(R::ZERO);
                for (j, &pj) in p.iter().enumerate() {
                    let vo = key(j);
                    for (x, &vv) in o.iter_mut().zip(&v[vo..vo + d]) {
                        *x += pj * vv;
                    }
                }
            }
        }
    }
}

/// dq [T, hq, d], dk, dv [T, hkv, d] (all =) from dout and the forward's out and lse.
/// With p = softmax row, dp_j = dout·v_j, D = dout·out: ds_j = p_j (dp_j − D),
/// dq = scale Σ ds_j k_j, dk_j += scale ds_j q, dv_j += p_j dout.
pub fn bwd<R: Real>(grads: QkvGrads<[R]>, dout: &[R], x: FwdSaved<[R]>, cu: &[i32], s: &AttnShape) {
    let (QkvGrads { dq, dk, dv }, FwdSaved { q, k, v, out, lse }) = (grads, x);
    let (hq, hkv, d) = (s.hq, s.hkv, s.d);
    let t_all = *cu.last().unwrap_or(&0) as usize;
    let grp = hq / hkv;
    let scale = R::from_f64(s.scale as f64);
    dq.fill(R::ZERO);
    dk.fill(R::ZERO);
    dv.fill(R::ZERO);
    for w in cu.windows(2) {
        let (start, len) = (w[0] as usize, (w[1] - w[0]) as usize);
        for h in 0..hq {
            let hk = h / grp;
            let key = |j: usize| ((start + j) * hkv + hk) * d;
            for i in 0..len {
                let qo = ((start + i) * hq + h) * d;
                let (qi, doi) = (&q[qo..qo + d], &dout[qo..qo + d]);
                let dd = dot(doi, &out[qo..qo + d]);
                let l = lse[h * t_all + start + i];
                for j in 0..n_keys(s.causal, i, len) {
                    let ko = key(j);
                    let p = (dot(qi, &k[ko..ko + d]) * scale - l).exp();
                    let ds = p * (dot(doi, &v[ko..ko + d]) - dd) * scale;
                    for c in 0..d {
                        dq[qo + c] += ds * k[ko + c];
                        dk[ko + c] += ds * qi[c];
                        dv[ko + c] += p * doi[c];
                    }
                }
            }
        }
    }
}

/// Decode: out [B, n_new, hq, d] for queries q [B, n_new, hq, d] against a cache k/v
/// [B, max_len, hkv, d] holding lens[b] tokens, the last n_new of which are the new tokens.
/// New token i sits at position lens[b] − n_new + i and (causal) attends to positions 0..=that.
pub fn decode<R: Real>(out: &mut [R], q: &[R], cache: HostCache<&[R]>, n_new: usize, s: &AttnShape) {
    let cu: Vec<i32> = (0..=cache.lens.len()).map(|b| (b * n_new) as i32).collect();
    decode_varlen(out, q, cache, &cu, s)
}

/// Ragged decode: out/q [T_new, hq, d] packed by `cu` (sequence b has cu[b+1] − cu[b] new
/// tokens, possibly none) against a cache holding lens[b] tokens, the new ones last. Same
/// arithmetic, in the same order, as `fwd`.
pub fn decode_varlen<R: Real>(out: &mut [R], q: &[R], cache: HostCache<&[R]>, cu: &[i32], s: &AttnShape) {
    let HostCache { k: kc, v: vc, lens, max_len } = cache;
    let (hq, hkv, d) = (s.hq, s.hkv, s.d);
    let grp = hq / hkv;
    let scale = R::from_f64(s.scale as f64);
    let mut p = Vec::new();
    for (b, w) in cu.windows(2).enumerate() {
        let (start, n_new, len) = (w[0] as usize, (w[1] - w[0]) as usize, lens[b] as usize);
        for i in 0..n_new {
            let n = if s.causal { len - n_new + i + 1 } else { len };
            for h in 0..hq {
                let hk = h / grp;
                let key = |j: usize| ((b * max_len + j) * hkv + hk) * d;
                let qo = ((start + i) * hq + h) * d;
                probs(&mut p, &q[qo..qo + d], n, scale, &key, kc, d);
                let o = &mut out[qo..qo + d];
                o.fill(R::ZERO);
                for (j, &pj) in p.iter().enumerate() {
                    let vo = key(j);
                    for (x, &vv) in o.iter_mut().zip(&vc[vo..vo + d]) {
                        *x += pj * vv;
                    }
                }
            }
        }
    }
}

/// Appends packed rows k_new/v_new [T_new, hkv, d] (sequence b owns rows cu[b]..cu[b+1]) to the
/// cache k/v [B, max_len, hkv, d] at positions lens[b].. (lens is not changed here).
pub fn kv_append<R: Real>(cache: HostCache<&mut [R]>, k_new: &[R], v_new: &[R], cu: &[i32], row: usize) {
    let HostCache { k: kc, v: vc, lens, max_len } = cache;
    for (b, w) in cu.windows(2).enumerate() {
        for t in w[0] as usize..w[1] as usize {
            let pos = lens[b] as usize + t - w[0] as usize;
            let dst = (b * max_len + pos) * row;
            kc[dst..dst + row].copy_from_slice(&k_new[t * row..(t + 1) * row]);
            vc[dst..dst + row].copy_from_slice(&v_new[t * row..(t + 1) * row]);
        }
    }
}

//! The per-process cache of the op's large device scratch: the kept logits chunk [tc, V], the f32
//! logits tile, the dhidden partials and the scaled hidden rows (0.6–0.9 GiB in all). Allocating
//! them per call cost a cudaMallocAsync of that size (the default memory pool returns freed memory
//! at every synchronisation, and the op synchronises once to read the active-token count) plus,
//! for the current pass, a memset. Kept here, repeated calls (one per GRPO step, one per old /
//! reference forward) reuse them.
//!
//! One buffer, grown (never shrunk) to the largest request, carved by the caller into 256-byte
//! aligned parts. Contents are undefined: every part is written by a GEMM or a kernel before it is
//! read (see gpu.rs). Safe for the same reason as `Gpu::scratch_f32`: all work is in order on one
//! stream, and the op enqueues every kernel that touches the buffer before it drops its handle.
//! While another call holds the cached buffer (another thread mid-op, or a callback that calls the
//! op again), a fresh one is returned instead. `release_scratch` hands the memory back.

use crate::cuda::{dptr, Gpu};
use crate::tensor::Device;
use anyhow::{anyhow, Result};
use cudarc::driver::CudaSlice;
use std::sync::{Arc, Mutex, Weak};

struct Cached {
    gpu: Weak<Gpu>,
    buf: Arc<CudaSlice<u8>>,
}

static CACHE: Mutex<Option<Cached>> = Mutex::new(None);

/// A block of device scratch held for the duration of one op call.
pub(super) struct Scratch {
    _buf: Arc<CudaSlice<u8>>,
    base: u64,
}

impl Scratch {
    /// The address `off` bytes into the block.
    pub fn at(&self, off: usize) -> u64 {
        self.base + off as u64
    }
}

/// Byte offsets of the parts of one block, each 256-byte aligned.
#[derive(Default)]
pub(super) struct Layout {
    pub bytes: usize,
}

impl Layout {
    /// Reserves `bytes` (at least 1) and returns their offset.
    pub fn part(&mut self, bytes: usize) -> usize {
        let off = self.bytes;
        self.bytes = (off + bytes.max(1)).next_multiple_of(256);
        off
    }
}

fn alloc(g: &Gpu, bytes: usize) -> Result<CudaSlice<u8>> {
    // SAFETY: uninitialised device memory; see the module doc for why no part is read unwritten.
    unsafe { g.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| {
        let (free, total) = g.mem_info();
        anyhow!(
            "logprob: allocating {:.1} MiB of scratch failed ({e}); {:.2} of {:.2} GiB free",
            bytes as f64 / (1u64 << 20) as f64,
            free as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        )
    })
}

/// `bytes` of scratch on `dev`'s GPU: the cached block when `cache` is set (grown if needed),
/// else a fresh allocation freed when the `Scratch` drops.
pub(super) fn take(dev: &Device, bytes: usize, cache: bool) -> Result<Scratch> {
    let Some(arc) = dev.gpu() else { return Err(anyhow!("logprob: device scratch requested on the CPU")) };
    let g: &Gpu = arc;
    let fresh = |g: &Gpu| -> Result<Scratch> {
        let b = Arc::new(alloc(g, bytes)?);
        let base = dptr(&b, &g.stream);
        Ok(Scratch { _buf: b, base })
    };
    if !cache {
        return fresh(g);
    }
    let mut slot = CACHE.lock().map_err(|_| anyhow!("logprob scratch cache poisoned"))?;
    if let Some(c) = slot.as_ref() {
        let same_gpu = c.gpu.upgrade().is_some_and(|x| Arc::ptr_eq(&x, arc));
        if Arc::strong_count(&c.buf) > 1 {
            // In use by another call: do not touch it.
            drop(slot);
            return fresh(g);
        }
        if same_gpu && c.buf.len() >= bytes {
            let buf = c.buf.clone();
            let base = dptr(&buf, &g.stream);
            return Ok(Scratch { _buf: buf, base });
        }
    }
    // Free the old block (stream-ordered after the work that used it) before allocating anew.
    *slot = None;
    let buf = Arc::new(alloc(g, bytes)?);
    let base = dptr(&buf, &g.stream);
    *slot = Some(Cached { gpu: Arc::downgrade(arc), buf: buf.clone() });
    Ok(Scratch { _buf: buf, base })
}

/// Frees the cached scratch (if no call holds it), e.g. before a phase that needs the memory.
pub fn release_scratch() {
    if let Ok(mut slot) = CACHE.lock() {
        if let Some(c) = slot.as_ref().filter(|c| Arc::strong_count(&c.buf) == 1) {
            // The free is stream-ordered and needs the block's context on this thread.
            if c.buf.context().bind_to_thread().is_ok() {
                *slot = None;
            }
        }
    }
}

/// Bytes of device memory the cache holds now.
pub fn cached_scratch_bytes() -> usize {
    CACHE.lock().ok().and_then(|s| s.as_ref().map(|c| c.buf.len())).unwrap_or(0)
}

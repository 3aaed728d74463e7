//! Token embedding: out [T, C] = table [V, C] rows picked by ids [T] (i32), and its backward, a
//! scatter-add into the f32 table gradient (atomics on the GPU, so repeated ids sum in no fixed
//! order). Kernel: kernels/embedding.cu.
//!
//! Ids outside [0, V) are an error naming the position and the id, checked on the host before
//! any launch. `ids_host` is that check's input on CUDA: pass `Some(ids)` with the same values as
//! the `ids` buffer (callers have them, they come from the tokenizer) to avoid a device→host copy
//! and a stream sync; `None` downloads `ids` to check it. On the CPU `ids` is host memory and is
//! checked directly (a `Some` must then still have length T). The kernels additionally never
//! read or write outside the table for a bad id (NaN output row, dropped gradient row), so a stale
//! `ids_host` cannot corrupt memory.

use super::{check, check_dtype, same_float_dtype};
use crate::cuda::api;
use crate::tensor::{Buf, DType, Device};
use anyhow::{bail, Result};
use cudarc::driver::LaunchConfig;

/// Checks every id is in [0, v); the error names the op, the first bad position and its id.
pub fn validate_ids(op: &str, ids: &[i32], v: usize) -> Result<()> {
    if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id < 0 || id as i64 >= v as i64) {
        bail!("{op}: token id {id} at position {pos} is outside the vocabulary [0, {v})");
    }
    Ok(())
}

/// The sizes of an embedding: t tokens (ids), c columns per row, v rows of the table (the vocabulary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub t: usize,
    pub c: usize,
    pub v: usize,
}

/// out [t, c] (=) = table [v, c] rows at ids [t] (i32).
pub fn fwd(dev: &Device, out: &mut Buf, table: &Buf, ids: &Buf, ids_host: Option<&[i32]>, dims: Dims) -> Result<()> {
    let Dims { t, c, v } = dims;
    let op = "embedding_fwd";
    check(out, t * c, op, "out")?;
    check(table, v * c, op, "table")?;
    check_ids(dev, op, ids, ids_host, t, v)?;
    if t == 0 || c == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            cpu::fwd(out.host_mut()?, table.host()?, ids.host_i32()?, t, c);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[out, table])?;
            api::embedding::EmbeddingFwd {
                out: out.ptr(g)?,
                table: table.ptr(g)?,
                ids: ids.ptr(g)?,
                tokens: t as i32,
                cols: c as i32,
                vocab: v as i32,
            }
            .launch(g, dt, launch_cfg(t, c, dt, g.sm_count))
        }
    }
}

/// dtable [v, c] (f32, +=) gets dout [t, c] rows added at ids [t].
pub fn bwd(dev: &Device, dtable: &mut Buf, dout: &Buf, ids: &Buf, ids_host: Option<&[i32]>, dims: Dims) -> Result<()> {
    let Dims { t, c, v } = dims;
    let op = "embedding_bwd";
    check(dtable, v * c, op, "dtable")?;
    check_dtype(dtable, DType::F32, op, "dtable")?;
    check(dout, t * c, op, "dout")?;
    check_ids(dev, op, ids, ids_host, t, v)?;
    if t == 0 || c == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            cpu::bwd(dtable.host_mut()?, dout.host()?, ids.host_i32()?, t, c);
            Ok(())
        }
        Device::Cuda(g) => {
            let dt = same_float_dtype(op, &[dout])?;
            api::embedding::EmbeddingBwd {
                dtable: dtable.ptr(g)?,
                dout: dout.ptr(g)?,
                ids: ids.ptr(g)?,
                tokens: t as i32,
                cols: c as i32,
                vocab: v as i32,
            }
            .launch(g, dt, launch_cfg(t, c, dt, g.sm_count))
        }
    }
}

/// Length, dtype and range checks of the ids (see the module doc for `ids_host`).
fn check_ids(dev: &Device, op: &str, ids: &Buf, ids_host: Option<&[i32]>, t: usize, v: usize) -> Result<()> {
    check(ids, t, op, "ids")?;
    check_dtype(ids, DType::I32, op, "ids")?;
    if let Some(h) = ids_host {
        if h.len() != t {
            bail!("{op}: ids_host has {} elements, expected {t}", h.len());
        }
    }
    if v > i32::MAX as usize {
        bail!("{op}: vocabulary of {v} rows exceeds i32 ids");
    }
    match (dev, ids_host) {
        (Device::Cpu, _) => validate_ids(op, ids.host_i32()?, v),
        (Device::Cuda(_), Some(h)) => validate_ids(op, h, v),
        (Device::Cuda(_), None) => validate_ids(op, &dev.to_vec_i32(ids)?, v),
    }
}

/// Grid-stride over tokens, one block per row at a time; threads cover a row in 16-byte lanes.
fn launch_cfg(t: usize, c: usize, dt: DType, sm_count: u32) -> LaunchConfig {
    let lanes = c.div_ceil(16 / dt.size());
    let block = lanes.next_power_of_two().clamp(32, 256) as u32;
    let blocks = t.clamp(1, 64 * sm_count as usize) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

pub mod cpu {
    use crate::real::Real;

    /// Ids must already be validated (in [0, V)).
    pub fn fwd<R: Real>(out: &mut [R], table: &[R], ids: &[i32], t: usize, c: usize) {
        for (r, &id) in ids.iter().enumerate().take(t) {
            let id = id as usize;
            out[r * c..(r + 1) * c].copy_from_slice(&table[id * c..(id + 1) * c]);
        }
    }

    pub fn bwd<R: Real>(dtable: &mut [R], dout: &[R], ids: &[i32], t: usize, c: usize) {
        for (r, &id) in ids.iter().enumerate().take(t) {
            let id = id as usize;
            for k in 0..c {
                dtable[id * c + k] += dout[r * c + k];
            }
        }
    }
}

//! RoPE positions of a rollout's new tokens, per family: Qwen2.5-VL's M-RoPE cursor (images
//! take 2-D grid positions; see `qwen2_5_vl::positions`) or plain 1-D positions that continue
//! the cache (LLaVA-NeXT). `StepPositions` packs the step's sequences into the decoder's layout.

use crate::models::qwen2_5_vl::positions::MropeState;
use crate::stages::model::{Net, VlModel};
use anyhow::Result;

#[derive(Clone, Debug)]
pub enum PosTracker {
    Mrope(MropeState),
    Linear { len: usize },
}

impl PosTracker {
    pub fn new(model: &VlModel) -> PosTracker {
        match &model.net {
            Net::Qwen(m) => PosTracker::Mrope(MropeState::new(&m.cfg)),
            Net::Llava(_) => PosTracker::Linear { len: 0 },
        }
    }

    /// Rows of the decoder's RoPE input: 3 (t, h, w) or 1.
    pub fn rows(&self) -> usize {
        match self {
            PosTracker::Mrope(_) => 3,
            PosTracker::Linear { .. } => 1,
        }
    }

    /// Positions of `ids` appended after everything so far, [rows, n]; `grids` are the Qwen grids
    /// of the images whose placeholders `ids` hold.
    pub fn append(&mut self, ids: &[i32], grids: &[[usize; 3]]) -> Result<Vec<i32>> {
        match self {
            PosTracker::Mrope(m) => m.append(ids, grids),
            PosTracker::Linear { len } => {
                let out = (0..ids.len()).map(|j| (*len + j) as i32).collect();
                *len += ids.len();
                Ok(out)
            }
        }
    }
}

/// Positions of a packed ragged step, [rows, T] with each sequence's block at its offset.
pub struct StepPositions {
    rows: usize,
    parts: Vec<Vec<i32>>,
}

impl StepPositions {
    pub fn new(rows: usize) -> Self {
        StepPositions { rows, parts: Vec::new() }
    }
    /// The next sequence's [rows, n] positions.
    pub fn push(&mut self, p: Vec<i32>) {
        self.parts.push(p);
    }
    pub fn finish(self) -> Vec<i32> {
        let total: usize = self.parts.iter().map(|p| p.len() / self.rows).sum();
        let mut out = vec![0i32; self.rows * total];
        let mut off = 0;
        for p in &self.parts {
            let n = p.len() / self.rows;
            for r in 0..self.rows {
                out[r * total + off..r * total + off + n].copy_from_slice(&p[r * n..(r + 1) * n]);
            }
            off += n;
        }
        out
    }
}

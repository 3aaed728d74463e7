//! M-RoPE position ids (transformers' `get_rope_index`, model-spec A6): three rows (t, h, w).
//! Text tokens advance all three rows by 1. The tokens of one image take the running position
//! plus their (0, y, x) place on the merged grid (grid_h/merge × grid_w/merge), and text resumes
//! at the image's largest id + 1, i.e. start + max(h/merge, w/merge). `MropeState` carries the
//! cursor across appended chunks, so a cached dialogue can grow turn by turn (GRPO rollouts).

use super::config::QwenVlConfig;
use anyhow::{bail, Result};

/// An image whose placeholder run has started but not finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OpenImage {
    /// Index of the image in the whole dialogue (for messages).
    index: usize,
    grid: [usize; 3],
    /// Placeholder tokens already placed.
    done: usize,
    /// Position of the image's first token.
    base: i64,
}

/// The running M-RoPE cursor of one sequence.
#[derive(Clone, Debug)]
pub struct MropeState {
    image_token_id: i64,
    video_token_id: i64,
    merge: usize,
    /// Position the next text token gets (= max position so far + 1).
    next: i64,
    /// Tokens placed so far.
    len: usize,
    /// Images fully or partly placed so far.
    images: usize,
    open: Option<OpenImage>,
}

impl MropeState {
    pub fn new(cfg: &QwenVlConfig) -> MropeState {
        Self::with_ids(cfg.image_token_id, cfg.video_token_id, cfg.vision.spatial_merge_size)
    }

    /// A state for explicit token ids and merge size.
    pub fn with_ids(image_token_id: u32, video_token_id: u32, merge: usize) -> MropeState {
        MropeState {
            image_token_id: image_token_id as i64,
            video_token_id: video_token_id as i64,
            merge: merge.max(1),
            next: 0,
            len: 0,
            images: 0,
            open: None,
        }
    }

    /// Tokens placed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The position the next text token gets.
    pub fn next_position(&self) -> i32 {
        self.next as i32
    }

    /// transformers' `rope_delta`: decoding token k (0-based cache position) sits at k + delta.
    pub fn delta(&self) -> i32 {
        (self.next - self.len as i64) as i32
    }

    /// Is an image's placeholder run unfinished (the last chunk ended inside it)?
    pub fn inside_image(&self) -> bool {
        self.open.is_some()
    }

    /// Places `ids` after everything appended so far and returns their positions `[3, n]`
    /// (rows t, h, w). Each new image run takes the next grid of `image_grids` (`[t, h, w]`
    /// in patches); all of them must be used, though the last run may continue into the next
    /// chunk.
    pub fn append(&mut self, ids: &[i32], image_grids: &[[usize; 3]]) -> Result<Vec<i32>> {
        let n = ids.len();
        let mut pos = vec![0i32; 3 * n]; // [3, n]
        let mut next_grid = 0usize;
        let m = self.merge;
        for (i, &id) in ids.iter().enumerate() {
            let id = id as i64;
            if id == self.video_token_id {
                bail!("M-RoPE: token {} is a video placeholder; videos are not supported", self.len + i);
            }
            let (t, h, w);
            if id == self.image_token_id {
                let mut img = match self.open.take() {
                    Some(img) => img,
                    None => {
                        let Some(&grid) = image_grids.get(next_grid) else {
                            bail!(
                                "M-RoPE: image placeholder run at token {} has no grid (only {} grids given for this chunk)",
                                self.len + i,
                                image_grids.len()
                            );
                        };
                        if grid[1] % m != 0 || grid[2] % m != 0 || grid.contains(&0) {
                            bail!(
                                "M-RoPE: image {} has grid {grid:?}, not a positive multiple of the merge size {m}",
                                self.images
                            );
                        }
                        next_grid += 1;
                        self.images += 1;
                        OpenImage { index: self.images - 1, grid, done: 0, base: self.next }
                    }
                };
                let (lh, lw) = (img.grid[1] / m, img.grid[2] / m);
                let k = img.done;
                let (y, x) = ((k / lw) % lh, k % lw);
                // Still images: the temporal id stays at the start for every frame.
                (t, h, w) = (img.base, img.base + y as i64, img.base + x as i64);
                img.done += 1;
                if img.done == img.grid[0] * lh * lw {
                    self.next = img.base + lh.max(lw) as i64;
                } else {
                    self.open = Some(img);
                }
            } else {
                if let Some(img) = self.open {
                    bail!(
                        "M-RoPE: image {} (grid {:?}) has {} placeholder tokens but needs {} (run ends at token {})",
                        img.index,
                        img.grid,
                        img.done,
                        img.grid[0] * img.grid[1] * img.grid[2] / (m * m),
                        self.len + i
                    );
                }
                (t, h, w) = (self.next, self.next, self.next);
                self.next += 1;
            }
            if h > i32::MAX as i64 || w > i32::MAX as i64 {
                bail!("M-RoPE: positions overflow i32");
            }
            pos[i] = t as i32;
            pos[n + i] = h as i32;
            pos[2 * n + i] = w as i32;
        }
        self.len += n;
        if next_grid != image_grids.len() {
            bail!("M-RoPE: {} image grids were given but the tokens hold {} image runs", image_grids.len(), next_grid);
        }
        Ok(pos)
    }
}

/// Position ids `[3, S]` for a whole sequence and the rope delta for decoding after it
/// (next token at cache position S gets S + delta on all three rows).
pub fn mrope_positions(input_ids: &[i32], image_grids: &[[usize; 3]], cfg: &QwenVlConfig) -> Result<(Vec<i32>, i32)> {
    let mut st = MropeState::new(cfg);
    let pos = st.append(input_ids, image_grids)?;
    if let Some(img) = st.open {
        bail!(
            "M-RoPE: the sequence ends inside image {} (grid {:?}): {} of {} placeholder tokens",
            img.index,
            img.grid,
            img.done,
            img.grid[0] * img.grid[1] * img.grid[2] / (st.merge * st.merge)
        );
    }
    Ok((pos, st.delta()))
}

//! A finished rollout as a training example: its full token sequence with next-token targets,
//! weight 1 on the tokens the policy generated (user turns, images and template glue masked),
//! its positions and images. The trainer's forward over it reproduces what the engine computed.

use super::images::ImageBank;
use super::Rollout;
use crate::data::dataset::Kind;
use crate::models::qwen2_5_vl::positions::mrope_positions;
use crate::stages::examples::Example;
use crate::stages::model::{Net, VlModel};
use anyhow::Result;

impl Rollout {
    pub fn example(&self, model: &VlModel, bank: &mut ImageBank, id: &str) -> Result<Example> {
        let n = self.seq.len();
        let gen = self.generated_mask();
        let vocab = model.tdims().vocab as i32;
        let mut targets = vec![0i32; n];
        let mut weights = vec![0f32; n];
        for t in 0..n.saturating_sub(1) {
            let id = self.seq[t + 1];
            // A placeholder id may lie past the vocabulary (LLaVA); it is never a target.
            if (0..vocab).contains(&id) {
                targets[t] = id;
                weights[t] = gen[t + 1] as f32;
            }
        }
        let (pixels, grids, image_sizes) = bank.inputs(&self.images)?;
        let pos3 = match &model.net {
            Net::Qwen(m) => mrope_positions(&self.seq, &grids, &m.cfg)?.0,
            Net::Llava(_) => Vec::new(),
        };
        Ok(Example {
            id: id.to_string(),
            kind: Kind::General,
            ids: self.seq.clone(),
            targets,
            weights,
            pos3,
            pixels,
            grids,
            image_sizes,
        })
    }
}

//! "rollout": the rollout engine's decode step on a 7B-shaped Qwen2.5-VL (random weights): one
//! ragged step (every slot one new token) through the KV caches, the lm_head of the last rows
//! and the device sampler, at batch 1, 8, 32, 64 and 128 with 512 tokens cached per slot. The
//! floor of a step is reading the bf16 weights once plus every slot's cached keys and values
//! (at 4.2 TB/s); transformers `generate` on the same card: 14.7 tokens/s at batch 1, 445 at
//! batch 32.

use super::train7b::random_7b;
use super::{time_gpu, BenchRow};
use crate::ops::sample::{stream_key, SampleParams, Sampler};
use crate::rng::Rng;
use crate::stages::model::VlModel;
use crate::tensor::Device;
use anyhow::Result;

pub fn run(dev: &Device, quick: bool) -> Result<Vec<BenchRow>> {
    let Device::Cuda(g) = dev else { return Ok(Vec::new()) };
    let model: VlModel = random_7b(dev)?.into();
    let t = model.tdims().clone();
    let weight_bytes: usize = model.param_entries().iter().filter(|(r, _)| !r.name.starts_with("visual.")).map(|(r, _)| r.numel() * 2).sum();
    let ctx = 512usize;
    let mut rows = Vec::new();
    let batches: &[usize] = if quick { &[1, 32] } else { &[1, 8, 32, 64, 128] };
    for &b in batches {
        let mut cache = model.new_cache(dev, b, ctx + 64)?;
        let mut rng = Rng::new(b as u64);
        let ids: Vec<i32> = (0..b * ctx).map(|_| rng.below(150_000) as i32).collect();
        let pos: Vec<i32> = (0..3).flat_map(|_| (0..b).flat_map(|_| 0..ctx as i32)).collect();
        let cu: Vec<i32> = (0..=b).map(|i| (i * ctx) as i32).collect();
        model.step_ragged(dev, &mut cache, &ids, &pos, &cu, None)?;
        let mut sampler = Sampler::new(dev, b, t.vocab)?;
        let params = vec![SampleParams::new(1.0, 0, 1.0)?; b];
        let mut step = 0u64;
        let mut tok: Vec<i32> = vec![1; b];
        let cu1: Vec<i32> = (0..=b as i32).collect();
        let mut one = || -> Result<()> {
            let p = ctx as i32 + step as i32;
            let pos1: Vec<i32> = (0..3 * b).map(|_| p).collect();
            let logits = model.step_ragged(dev, &mut cache, &tok, &pos1, &cu1, None)?;
            let keys: Vec<u64> = (0..b).map(|i| stream_key(0, 0, i as u64, step)).collect();
            let drawn = sampler.sample(dev, &logits, b, &params, &keys)?;
            tok = drawn.iter().map(|d| d.token).collect();
            step += 1;
            Ok(())
        };
        let ms = time_gpu(g, 2, if quick { 8 } else { 32 }, &mut one)?;
        let kv = 2 * t.n_layers * b * (ctx + 16) * t.layer.kv_heads * t.layer.head_dim * 2;
        let bytes = (weight_bytes + kv) as f64;
        rows.push(BenchRow {
            op: "rollout decode step".into(),
            shape: format!("batch {b}, {ctx} cached"),
            ms,
            bytes,
            note: format!("{:.0} tok/s (transformers generate: 14.7 at batch 1, 445 at 32); floor {:.2} ms", b as f64 / (ms * 1e-3), bytes / 4.2e12 * 1e3),
            ..Default::default()
        });
    }
    Ok(rows)
}

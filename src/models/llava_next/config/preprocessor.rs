//! `preprocessor_config.json` of `LlavaNextImageProcessor`.

use super::*;

/// `preprocessor_config.json` of `LlavaNextImageProcessor`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaPreprocessorConfig {
    /// `size.shortest_edge`: the side of the base image and of each tile (336).
    pub shortest_edge: usize,
    /// `crop_size` (height, width); must equal the tile size (anything else would crop tiles).
    pub crop_size: (usize, usize),
    pub image_grid_pinpoints: Vec<(usize, usize)>,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    pub do_rescale: bool,
    pub do_normalize: bool,
    /// PIL resample code; only 3 (bicubic) is supported.
    pub resample: u32,
}

impl Default for LlavaPreprocessorConfig {
    /// The published 7B settings.
    fn default() -> Self {
        LlavaPreprocessorConfig {
            shortest_edge: 336,
            crop_size: (336, 336),
            image_grid_pinpoints: DEFAULT_PINPOINTS.to_vec(),
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            rescale_factor: 1.0 / 255.0,
            do_rescale: true,
            do_normalize: true,
            resample: 3,
        }
    }
}

impl LlavaPreprocessorConfig {
    /// The tile side in pixels.
    pub fn tile_size(&self) -> usize {
        self.shortest_edge
    }

    /// Reads `dir/preprocessor_config.json`; without the file, the settings that fit `model`
    /// (its tile size and pinpoints, CLIP normalisation).
    pub fn load(dir: impl AsRef<Path>, model: &LlavaNextConfig) -> Result<LlavaPreprocessorConfig> {
        let path = dir.as_ref().join("preprocessor_config.json");
        if !path.exists() {
            return Ok(Self::for_model(model));
        }
        let v = read_json(&path)?;
        let cfg = Self::from_json(&v, &path)?;
        cfg.check_against(model).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// Defaults matched to a model config.
    pub fn for_model(model: &LlavaNextConfig) -> LlavaPreprocessorConfig {
        let s = model.vision.image_size;
        LlavaPreprocessorConfig {
            shortest_edge: s,
            crop_size: (s, s),
            image_grid_pinpoints: model.image_grid_pinpoints.clone(),
            ..Self::default()
        }
    }

    pub fn from_json(v: &Value, file: &Path) -> Result<LlavaPreprocessorConfig> {
        let f = Fields::new(root_object(v, file)?, "", file);
        if let Some(kind) = f.opt_str("image_processor_type")? {
            if !kind.starts_with("LlavaNextImageProcessor") {
                return Err(f.err("image_processor_type", format!("expected LlavaNextImageProcessor, got {kind:?}")));
            }
        }
        let d = Self::default();
        let shortest_edge = match f.object("size")? {
            None => d.shortest_edge,
            Some(m) => {
                let s = Fields::new(m, "size", file);
                match (s.opt_usize("shortest_edge")?, s.opt_usize("height")?, s.opt_usize("width")?) {
                    (Some(e), _, _) if e > 0 => s.within("shortest_edge", e, MAX_IMAGE_SIDE)?,
                    (None, Some(h), Some(w)) if h == w && h > 0 => s.within("height", h, MAX_IMAGE_SIDE)?,
                    _ => {
                        return Err(
                            s.err("shortest_edge", "expected a positive shortest_edge (or equal height and width)")
                        )
                    }
                }
            }
        };
        let crop_size = match f.get("crop_size") {
            None => (shortest_edge, shortest_edge),
            Some(Value::Object(m)) => {
                let c = Fields::new(m, "crop_size", file);
                (c.pos_usize("height", shortest_edge)?, c.pos_usize("width", shortest_edge)?)
            }
            Some(_) => (f.pos_usize("crop_size", shortest_edge)?, f.pos_usize("crop_size", shortest_edge)?),
        };
        if crop_size != (shortest_edge, shortest_edge) {
            return Err(f.err(
                "crop_size",
                format!("{crop_size:?} differs from the tile size {shortest_edge} (size.shortest_edge); cropped tiles are not supported"),
            ));
        }
        let image_grid_pinpoints = match f.get("image_grid_pinpoints") {
            None => d.image_grid_pinpoints,
            Some(v) => parse_pinpoints(f, v)?,
        };
        let triple = |key: &str, default: [f32; 3], positive: bool| -> Result<[f32; 3]> {
            match f.opt_f64_list(key)? {
                None => Ok(default),
                Some(l) if l.len() == 3 && (!positive || l.iter().all(|&x| x > 0.0)) => {
                    Ok([l[0] as f32, l[1] as f32, l[2] as f32])
                }
                Some(l) => {
                    Err(f.err(key, format!("expected 3 {}numbers, got {l:?}", if positive { "positive " } else { "" })))
                }
            }
        };
        let resample = f.opt_usize("resample")?.unwrap_or(3) as u32;
        if resample != 3 {
            return Err(f.err("resample", format!("{resample} is not supported (only 3, bicubic)")));
        }
        if f.opt_bool("do_convert_rgb")? == Some(false) {
            return Err(f.err("do_convert_rgb", "false is not supported (images are always converted to RGB)"));
        }
        Ok(LlavaPreprocessorConfig {
            shortest_edge,
            crop_size,
            image_grid_pinpoints,
            image_mean: triple("image_mean", d.image_mean, false)?,
            image_std: triple("image_std", d.image_std, true)?,
            rescale_factor: f.pos_f64("rescale_factor", d.rescale_factor)?,
            do_rescale: f.opt_bool("do_rescale")?.unwrap_or(true),
            do_normalize: f.opt_bool("do_normalize")?.unwrap_or(true),
            resample,
        })
    }

    /// Checks that these settings produce what `model` consumes: tiles of its image_size and
    /// the same pinpoints (the token count the processor writes must equal the model's).
    pub fn check_against(&self, model: &LlavaNextConfig) -> Result<()> {
        if self.shortest_edge != model.vision.image_size {
            bail!(
                "size.shortest_edge {} does not match the model's vision_config.image_size {}",
                self.shortest_edge,
                model.vision.image_size
            );
        }
        if self.image_grid_pinpoints != model.image_grid_pinpoints {
            bail!(
                "image_grid_pinpoints {:?} differ from the model config's {:?}",
                self.image_grid_pinpoints,
                model.image_grid_pinpoints
            );
        }
        Ok(())
    }
}

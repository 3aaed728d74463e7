//! `am3 export`: the embedded tiny default written out as a complete Hugging Face checkpoint
//! (weights, config.json, tokenizer and processor files), so transformers, PEFT and vLLM can
//! load the model the demo trains from. Also the transformers-side files every checkpoint of
//! the tiny default carries (`tokenizer_config.json` with the ChatML template, eos `<|im_end|>`
//! and pad; `chat_template.jinja`; `processor_config.json`), and the base a LoRA adapter of the
//! tiny default names (exported next to the run, since it exists nowhere else).

use super::lora::base_model_ref;
use super::sft::{load_model, save_side_files, Loaded};
use crate::checkpoint::safetensors_io::SaveDtype;
use crate::models::tiny;
use crate::tensor::Device;
use crate::train::atomic;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

#[derive(clap::Args, Clone, Debug)]
pub struct ExportArgs {
    /// Output directory: a new or empty one (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Init seed, as `am3 sft --seed` (default 0): the model that run starts from.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// f32 (the weights a CPU run trains, exactly) | bf16 (those a CUDA run trains).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// The directory, under a run's `--out`, where the tiny default's adapters find their base.
pub const TINY_BASE_DIR: &str = "base-model";

/// Qwen2.5-VL's ChatML template, as `models::qwen2_5_vl::chat::render_chat` renders it: a default
/// system message, `<|im_start|>{role}\n{content}<|im_end|>\n`, an image as
/// `<|vision_start|><|image_pad|><|vision_end|>` (with `Picture k: ` under `add_vision_id`), and
/// `<|im_start|>assistant\n` as the generation prompt.
pub const CHAT_TEMPLATE: &str = concat!(
    "{%- set image_count = namespace(value=0) -%}\n",
    "{%- for message in messages -%}\n",
    "{%- if loop.first and message['role'] != 'system' -%}\n",
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}\n",
    "{%- endif -%}\n",
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n",
    "{%- if message['content'] is string -%}\n",
    "{{- message['content'] -}}\n",
    "{%- else -%}\n",
    "{%- for part in message['content'] -%}\n",
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}\n",
    "{%- set image_count.value = image_count.value + 1 -%}\n",
    "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value|string + ': ' -}}{%- endif -%}\n",
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\n",
    "{%- elif 'text' in part -%}\n",
    "{{- part['text'] -}}\n",
    "{%- endif -%}\n",
    "{%- endfor -%}\n",
    "{%- endif -%}\n",
    "{{- '<|im_end|>\\n' -}}\n",
    "{%- endfor -%}\n",
    "{%- if add_generation_prompt -%}\n",
    "{{- '<|im_start|>assistant\\n' -}}\n",
    "{%- endif -%}\n",
);

fn save_dtype(s: &str) -> Result<SaveDtype> {
    match s {
        "f32" | "float32" => Ok(SaveDtype::F32),
        "bf16" | "bfloat16" => Ok(SaveDtype::BF16),
        other => bail!("--dtype: expected f32 or bf16, got `{other}`"),
    }
}

/// `am3 export`: writes the tiny default (seed `a.seed`) to `a.out` (new or empty).
pub fn run(a: &ExportArgs) -> Result<PathBuf> {
    let dtype = save_dtype(&a.dtype)?;
    // The directory is replaced as a whole: never one that holds something.
    if a.out.exists() && (!a.out.is_dir() || std::fs::read_dir(&a.out)?.next().is_some()) {
        bail!("--out {}: exists and is not an empty directory (choose a new one)", a.out.display());
    }
    // The tiny model is built on the CPU: its f32 weights are the init exactly.
    let dev = Device::Cpu;
    let l = load_model(&dev, None, a.seed)?;
    write_checkpoint(&dev, &l, &a.out, dtype)?;
    Ok(a.out.clone())
}

/// A complete HF directory of `l`'s weights (without any LoRA adapters) and its side files,
/// written atomically.
pub fn write_checkpoint(dev: &Device, l: &Loaded, dir: &Path, dtype: SaveDtype) -> Result<()> {
    atomic::write_dir(dir, |tmp| {
        l.model.save(dev, tmp, dtype)?;
        save_side_files(l, tmp)
    })
    .with_context(|| format!("writing {}", dir.display()))
}

/// What a LoRA adapter of this run records as `base_model_name_or_path`: for a model directory
/// its hub id or absolute path (`lora::base_model_ref`); for the tiny default the absolute path
/// of `out/base-model`, where its base weights (frozen under LoRA, so still the init) are
/// written, in the dtype the run's checkpoints use.
pub fn adapter_base(dev: &Device, l: &Loaded, out: &Path, model_dir: Option<&Path>) -> Result<String> {
    if let Some(d) = model_dir {
        return base_model_ref(d);
    }
    let dir = out.join(TINY_BASE_DIR);
    write_checkpoint(dev, l, &dir, if dev.is_cuda() { SaveDtype::BF16 } else { SaveDtype::F32 })?;
    base_model_ref(&dir)
}

/// The tiny default's `tokenizer_config.json`: the tokenizer is tokenizer.json as is
/// (`PreTrainedTokenizerFast`, which transformers 4 and 5 both load), eos = the model's
/// `<|im_end|>`, pad `<|endoftext|>`, no bos, and the ChatML template.
pub fn tokenizer_config(tok: &Tokenizer) -> Result<Value> {
    let cfg = tiny::config(tok)?;
    let name = |id: u32| tok.id_to_token(id).ok_or_else(|| anyhow!("the tokenizer has no id {id}"));
    Ok(json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "processor_class": "Qwen2_5_VLProcessor",
        "bos_token": null,
        "eos_token": name(cfg.eos_token_id)?,
        "pad_token": name(cfg.bos_token_id)?,
        "unk_token": null,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "errors": "replace",
        "model_max_length": cfg.text.max_position_embeddings,
        "split_special_tokens": false,
    }))
}

/// `processor_config.json` as transformers 5 writes it for a `Qwen2_5_VLProcessor`: the image
/// processor's settings (preprocessor_config.json), and the video processor's with the same
/// patching (the model never sees videos; transformers expects the entry).
pub fn processor_config() -> Result<Value> {
    let image: Value = serde_json::from_str(tiny::PREPROCESSOR_JSON).context("embedded preprocessor_config.json")?;
    let video = json!({
        "video_processor_type": "Qwen2VLVideoProcessor",
        "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true, "do_sample_frames": false,
        "image_mean": image["image_mean"], "image_std": image["image_std"], "resample": image["resample"],
        "rescale_factor": image["rescale_factor"], "patch_size": image["patch_size"],
        "temporal_patch_size": image["temporal_patch_size"], "merge_size": image["merge_size"],
        "max_frames": 768, "min_frames": 4, "max_video_tokens": 128000, "return_metadata": false,
        "size": {"longest_edge": 602112, "shortest_edge": 100352},
    });
    Ok(json!({"processor_class": "Qwen2_5_VLProcessor", "image_processor": image, "video_processor": video}))
}

/// Writes the tiny default's `tokenizer_config.json`, `chat_template.jinja` and
/// `processor_config.json` into `dir`.
pub fn write_tiny_hf_files(tok: &Tokenizer, dir: &Path) -> Result<()> {
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).with_context(|| format!("writing {}", dir.join(name).display()))
    };
    write("tokenizer_config.json", &serde_json::to_string_pretty(&tokenizer_config(tok)?)?)?;
    write("chat_template.jinja", CHAT_TEMPLATE)?;
    write("processor_config.json", &serde_json::to_string_pretty(&processor_config()?)?)
}

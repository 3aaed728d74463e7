//! Absurd sizes fail early with an error naming the field, the value and the limit (issue #17),
//! and missing required config fields are errors naming them (issue #19, item 9):
//! - `am3 forward` with `num_hidden_layers` = 1e9, a vision `depth` = 1e9, or weights larger
//!   than the machine's memory: exit status 1 with the message, never an abort (134);
//! - `am3 sft` with a huge `max_pixels`, a 1 MB user or assistant turn (reported at load time
//!   as `file:line: N tokens, limit M`, left out with `--skip-bad`), `--lora-rank` above the
//!   model's width;
//! - every config size capped, on both families; allocations (host buffers, KV caches,
//!   training state) that cannot fit are errors;
//! - checkpoint tensors the config does not use give one warning line;
//! - the tiny default's checkpoints carry a ChatML template that renders what training uses.
mod common;

use am3safety::checkpoint::safetensors_io::SaveDtype;
use am3safety::models::limits;
use am3safety::models::llava_next::config::LlavaNextConfig;
use am3safety::models::llava_next::model::LlavaNext;
use am3safety::models::qwen2_5_vl::chat::{render_chat, ChatMessage, ChatOptions, Part};
use am3safety::models::qwen2_5_vl::config::{QwenPreprocessorConfig, QwenVlConfig};
use am3safety::models::tiny;
use am3safety::stages::sft;
use am3safety::tensor::{DType, Device};
use common::{am3_bin, fixture_dir, fresh_tmp_dir};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn write(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn am3(args: &[&str]) -> (Output, String, Duration) {
    let t = Instant::now();
    let out = Command::new(am3_bin()).args(args).env("AM3_FORCE_CPU", "1").output().expect("running am3");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out, stderr, t.elapsed())
}

/// The run failed with a message (exit status 1), not an abort; `needles` are in its stderr.
fn assert_clean_error(what: &str, out: &Output, stderr: &str, needles: &[&str]) {
    println!("{what}: status {:?}\n{stderr}", out.status.code());
    assert_eq!(out.status.code(), Some(1), "{what}: expected a clean error (exit 1), got {:?}:\n{stderr}", out.status);
    for n in needles {
        assert!(stderr.contains(n), "{what}: stderr lacks {n:?}:\n{stderr}");
    }
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

/// The Qwen fixture's weights with an edited config.json.
fn qwen_variant(name: &str, edit: &dyn Fn(&mut Value)) -> PathBuf {
    let src = fixture_dir("qwen2_5_vl_tiny");
    let dir = fresh_tmp_dir(name);
    for f in ["model.safetensors", "preprocessor_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg = read(&src.join("config.json"));
    edit(&mut cfg);
    write(&dir.join("config.json"), &cfg);
    dir
}

fn forward(dir: &Path, tag: &str) -> (Output, String, Duration) {
    let inputs = fixture_dir("qwen2_5_vl_tiny").join("inputs.safetensors");
    let out = fresh_tmp_dir(tag).join("out.safetensors");
    am3(&[
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ])
}

#[test]
fn forward_with_absurd_text_layers_is_an_error() {
    let dir = qwen_variant("layers", &|c| c["num_hidden_layers"] = json!(1e9));
    let (out, err, _) = forward(&dir, "layers-out");
    let cfg = dir.join("config.json");
    assert_clean_error(
        "num_hidden_layers 1e9",
        &out,
        &err,
        &[cfg.to_str().unwrap(), "`num_hidden_layers`", "1000000000", "limit of 1024"],
    );
}

#[test]
fn forward_with_absurd_vision_depth_is_an_error() {
    let dir = qwen_variant("depth", &|c| c["vision_config"]["depth"] = json!(1_000_000_000u64));
    let (out, err, _) = forward(&dir, "depth-out");
    assert_clean_error(
        "vision depth 1e9",
        &out,
        &err,
        &["config.json", "`vision_config.depth`", "1000000000", "limit of 1024"],
    );
}

#[test]
fn forward_with_weights_beyond_memory_is_an_error() {
    // Every size within its cap, but 1.1 T parameters: the weights cannot fit in this machine.
    let dir = qwen_variant("huge", &|c| {
        c["vocab_size"] = json!(1 << 23);
        c["hidden_size"] = json!(65536);
        c["num_attention_heads"] = json!(512);
        c["num_key_value_heads"] = json!(8);
        c["rope_scaling"]["mrope_section"] = json!([16, 24, 24]);
        c["vision_config"]["out_hidden_size"] = json!(65536);
    });
    let (out, err, took) = forward(&dir, "huge-out");
    assert_clean_error(
        "1.1 T parameters",
        &out,
        &err,
        &["not enough memory for the weights of", "B parameters", "GiB needed", "available on cpu"],
    );
    assert!(took < Duration::from_secs(30), "the check took {took:?}");
}

#[test]
fn unused_checkpoint_tensors_give_one_warning() {
    // A 1-layer config over the fixture's 2-layer checkpoint: layer 1 goes unused.
    let dir = qwen_variant("unused", &|c| c["num_hidden_layers"] = json!(1));
    let (out, err, _) = forward(&dir, "unused-out");
    println!("{err}");
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("not used by config.json")).collect();
    assert_eq!(lines.len(), 1, "one warning line expected:\n{err}");
    assert!(
        lines[0].contains("12 checkpoint tensors")
            && lines[0].contains("model.layers.1.")
            && lines[0].contains("(7 more)"),
        "{}",
        lines[0]
    );
    // The fixture itself uses every tensor: no warning.
    let (out, err, _) = forward(&fixture_dir("qwen2_5_vl_tiny"), "used-out");
    assert!(out.status.success() && !err.contains("not used by config.json"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Config caps and required fields.

fn qwen_fixture_config() -> Value {
    read(&fixture_dir("qwen2_5_vl_tiny").join("config.json"))
}

fn llava_fixture_config() -> Value {
    read(&fixture_dir("llava_next_tiny").join("config.json"))
}

/// (what, edit of the config, field the error names, limit it states).
type Case = (&'static str, Box<dyn Fn(&mut Value)>, &'static str, &'static str);

#[test]
fn qwen_config_sizes_are_capped() {
    let file = Path::new("/ckpt/config.json");
    let cases: Vec<Case> = vec![
        ("hidden", Box::new(|v| v["hidden_size"] = json!(1u64 << 20)), "hidden_size", "limit of 65536"),
        ("inter", Box::new(|v| v["intermediate_size"] = json!(1u64 << 30)), "intermediate_size", "limit of 262144"),
        ("vocab", Box::new(|v| v["vocab_size"] = json!(1u64 << 40)), "vocab_size", "limit of 8388608"),
        ("heads", Box::new(|v| v["num_attention_heads"] = json!(u64::MAX)), "num_attention_heads", "limit of 65536"),
        (
            "positions",
            Box::new(|v| v["max_position_embeddings"] = json!(1e12)),
            "max_position_embeddings",
            "limit of 16777216",
        ),
        (
            "vision width",
            Box::new(|v| v["vision_config"]["hidden_size"] = json!(1u64 << 32)),
            "vision_config.hidden_size",
            "limit of 65536",
        ),
        (
            "vision inter",
            Box::new(|v| v["vision_config"]["intermediate_size"] = json!(1u64 << 32)),
            "vision_config.intermediate_size",
            "limit of 262144",
        ),
        (
            "patch",
            Box::new(|v| v["vision_config"]["patch_size"] = json!(1u64 << 20)),
            "vision_config.patch_size",
            "limit of 1024",
        ),
        (
            "merge",
            Box::new(|v| v["vision_config"]["spatial_merge_size"] = json!(100000)),
            "vision_config.spatial_merge_size",
            "limit of 64",
        ),
    ];
    for (what, edit, field, limit) in cases {
        let mut v = qwen_fixture_config();
        edit(&mut v);
        let msg = err_text(QwenVlConfig::from_json(&v, file));
        println!("{what}: {msg}");
        assert!(
            msg.contains(&format!("`{field}`")) && msg.contains(limit) && msg.contains("/ckpt/config.json"),
            "{what}: {msg}"
        );
    }
}

#[test]
fn qwen_required_fields_are_errors_naming_them() {
    let file = Path::new("/ckpt/config.json");
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "vision_config",
    ] {
        let mut v = qwen_fixture_config();
        v.as_object_mut().unwrap().remove(key);
        let msg = err_text(QwenVlConfig::from_json(&v, file));
        println!("no {key}: {msg}");
        assert!(msg.contains(&format!("`{key}`: missing")), "no {key}: {msg}");
    }
    for key in ["depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size"] {
        let mut v = qwen_fixture_config();
        v["vision_config"].as_object_mut().unwrap().remove(key);
        let msg = err_text(QwenVlConfig::from_json(&v, file));
        assert!(msg.contains(&format!("`vision_config.{key}`: missing")), "no vision {key}: {msg}");
    }
    // Fields with a transformers class default still take it (eps, theta, window, ids).
    let mut v = qwen_fixture_config();
    for key in ["rms_norm_eps", "max_position_embeddings", "image_token_id", "bos_token_id"] {
        v.as_object_mut().unwrap().remove(key);
    }
    v["vocab_size"] = json!(152064);
    let c = QwenVlConfig::from_json(&v, file).unwrap();
    assert_eq!(
        (c.text.rms_norm_eps, c.text.max_position_embeddings, c.image_token_id, c.bos_token_id),
        (1e-5, 32768, 151655, 151643)
    );
}

#[test]
fn llava_config_sizes_are_capped_and_sub_configs_required() {
    let file = Path::new("/ckpt/config.json");
    let cases: Vec<Case> = vec![
        (
            "layers",
            Box::new(|v| v["text_config"]["num_hidden_layers"] = json!(1e9)),
            "text_config.num_hidden_layers",
            "limit of 1024",
        ),
        (
            "vocab",
            Box::new(|v| v["text_config"]["vocab_size"] = json!(1u64 << 33)),
            "text_config.vocab_size",
            "limit of 8388608",
        ),
        (
            "head_dim",
            Box::new(|v| v["text_config"]["head_dim"] = json!(1u64 << 20)),
            "text_config.head_dim",
            "limit of 65536",
        ),
        (
            "clip layers",
            Box::new(|v| v["vision_config"]["num_hidden_layers"] = json!(100000)),
            "vision_config.num_hidden_layers",
            "limit of 1024",
        ),
        (
            "tile",
            Box::new(|v| v["vision_config"]["image_size"] = json!(1u64 << 40)),
            "vision_config.image_size",
            "limit of 65536",
        ),
        (
            "tile patches",
            Box::new(|v| v["vision_config"]["image_size"] = json!(14 * 1000)),
            "vision_config.image_size",
            "limit of 262144",
        ),
        (
            "pinpoints",
            Box::new(|v| v["image_grid_pinpoints"] = json!([[56 * 200, 56 * 200]])),
            "image_grid_pinpoints",
            "limit of 262144",
        ),
    ];
    for (what, edit, field, limit) in cases {
        let mut v = llava_fixture_config();
        edit(&mut v);
        let msg = err_text(LlavaNextConfig::from_json(&v, file));
        println!("{what}: {msg}");
        assert!(
            msg.contains(&format!("`{field}`")) && msg.contains(limit) && msg.contains("/ckpt/config.json"),
            "{what}: {msg}"
        );
    }
    for key in ["text_config", "vision_config"] {
        let mut v = llava_fixture_config();
        v.as_object_mut().unwrap().remove(key);
        let msg = err_text(LlavaNextConfig::from_json(&v, file));
        println!("no {key}: {msg}");
        assert!(msg.contains(&format!("`{key}`: missing")), "no {key}: {msg}");
    }
    // Inside text_config the Mistral class defaults stay (the published llava-hf files omit them).
    let mut v = llava_fixture_config();
    for key in ["hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim"] {
        v["text_config"].as_object_mut().unwrap().remove(key);
    }
    let c = LlavaNextConfig::from_json(&v, file).unwrap();
    assert_eq!(
        (c.text.hidden_size, c.text.num_hidden_layers, c.text.num_attention_heads, c.text.head_dim),
        (4096, 32, 32, 128)
    );
}

#[test]
fn qwen_preprocessor_pixels_are_capped() {
    let file = Path::new("/ckpt/preprocessor_config.json");
    let base = read(&fixture_dir("qwen2_5_vl_tiny").join("preprocessor_config.json"));
    let mut v = base.clone();
    v["max_pixels"] = json!(1e13);
    let msg = err_text(QwenPreprocessorConfig::from_json(&v, file));
    assert!(
        msg.contains("`max_pixels`") && msg.contains("10000000000000") && msg.contains("limit of 51380224"),
        "{msg}"
    );
    let mut v = base.clone();
    v["size"]["longest_edge"] = json!(1u64 << 40);
    let msg = err_text(QwenPreprocessorConfig::from_json(&v, file));
    assert!(msg.contains("`size.longest_edge`") && msg.contains("limit of"), "{msg}");
    // The published 7B limit (16384 merged tokens) is well inside.
    let mut v = base;
    v["max_pixels"] = json!(12845056);
    QwenPreprocessorConfig::from_json(&v, file).unwrap();
}

#[test]
fn num_params_matches_the_models() {
    let tok = tiny::tokenizer().unwrap();
    let cfg = tiny::config(&tok).unwrap();
    let m = tiny::build(&Device::Cpu, cfg.clone(), 1).unwrap();
    let n: usize = m.param_entries().iter().map(|(r, _)| r.numel()).sum();
    assert_eq!(cfg.num_params(), n as u64, "tiny Qwen2.5-VL");
    let dir = fixture_dir("qwen2_5_vl_tiny");
    assert_eq!(
        QwenVlConfig::load(&dir).unwrap().num_params(),
        am3safety::models::qwen2_5_vl::model::QwenVl::load(&Device::Cpu, &dir)
            .unwrap()
            .param_entries()
            .iter()
            .map(|(r, _)| r.numel() as u64)
            .sum::<u64>()
    );
    let dir = fixture_dir("llava_next_tiny");
    let lcfg = LlavaNextConfig::load(&dir).unwrap();
    let l = LlavaNext::load(&Device::Cpu, &dir).unwrap();
    assert_eq!(
        lcfg.num_params(),
        l.param_entries().iter().map(|(r, _)| r.numel() as u64).sum::<u64>(),
        "LLaVA-NeXT fixture"
    );
}

// ---------------------------------------------------------------------------------------------
// Allocation and memory.

#[test]
fn impossible_allocations_are_errors() {
    let dev = Device::Cpu;
    for (n, what) in [(usize::MAX / 2, "overflow"), (1usize << 40, "4 TiB")] {
        let msg = err_text(dev.zeros(DType::F32, n));
        println!("{what}: {msg}");
        assert!(msg.contains("host allocation"), "{what}: {msg}");
    }
    assert_eq!(dev.zeros(DType::I32, 5).unwrap().len(), 5);
    assert_eq!(dev.to_vec(&dev.upload(&[1.0, 2.0], DType::F32).unwrap()).unwrap(), vec![1.0, 2.0]);
    // A KV cache of absurd length fails before any layer's cache is allocated.
    let tok = tiny::tokenizer().unwrap();
    let m = tiny::build(&dev, tiny::config(&tok).unwrap(), 1).unwrap();
    let msg = err_text(m.new_session(&dev, 1 << 16, 1 << 24).map(|_| ()));
    println!("kv cache: {msg}");
    assert!(msg.contains("not enough memory for a KV cache of 65536 sequences × 16777216 tokens"), "{msg}");
    // Training state beyond memory, with the numbers.
    let msg = err_text(limits::ensure_training_fits(&dev, 1 << 40, 0, 1024, 2, 96, 256));
    println!("training: {msg}");
    assert!(
        msg.contains("not enough memory for training") && msg.contains("AdamW state") && msg.contains("GiB"),
        "{msg}"
    );
    limits::ensure_training_fits(&dev, 1 << 20, 0, 1024, 2, 96, 256).unwrap();
}

// ---------------------------------------------------------------------------------------------
// am3 sft.

/// The tiny default saved as a model directory (weights, config, tokenizer, preprocessor).
fn tiny_model_dir(name: &str, preprocessor: &Value) -> PathBuf {
    let dev = Device::Cpu;
    let tok = tiny::tokenizer().unwrap();
    let model = tiny::build(&dev, tiny::config(&tok).unwrap(), 3).unwrap();
    let dir = fresh_tmp_dir(name);
    sft::save_model(&dev, &model, &dir, SaveDtype::F32).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny::TOKENIZER_JSON).unwrap();
    write(&dir.join("preprocessor_config.json"), preprocessor);
    dir
}

#[test]
fn sft_with_huge_max_pixels_is_an_error() {
    let mut pp: Value = serde_json::from_str(tiny::PREPROCESSOR_JSON).unwrap();
    pp["max_pixels"] = json!(1e13);
    let dir = tiny_model_dir("pixels", &pp);
    let out = fresh_tmp_dir("pixels-run");
    let (o, err, _) = am3(&[
        "sft",
        "--model",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "1",
        "--device",
        "cpu",
    ]);
    assert_clean_error(
        "max_pixels 1e13",
        &o,
        &err,
        &["preprocessor_config.json", "`max_pixels`", "10000000000000", "limit of 51380224"],
    );
}

#[test]
fn sft_with_lora_rank_above_the_width_is_an_error() {
    let out = fresh_tmp_dir("rank-run");
    let (o, err, took) =
        am3(&["sft", "--out", out.to_str().unwrap(), "--steps", "1", "--device", "cpu", "--lora-rank", "4096"]);
    assert_clean_error("--lora-rank 4096", &o, &err, &["--lora-rank 4096", "limit of 48", "k_proj.weight", "[48, 96]"]);
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

/// Two short samples and two with 1 MB turns (user, then assistant), text only.
fn megabyte_data(dir: &Path) -> PathBuf {
    let small = |id: &str| json!({"id": id, "kind": "general", "messages": [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "A circle."}]});
    let big_user = json!({"id": "big-user", "kind": "general", "messages": [{"role": "user", "content": "hello ".repeat((1 << 20) / 6)}, {"role": "assistant", "content": "ok."}]});
    let big_reply = json!({"id": "big-reply", "kind": "general", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x".repeat(1 << 20)}]});
    let path = dir.join("mb.jsonl");
    let lines: Vec<String> = [small("s1"), big_user, small("s2"), big_reply].iter().map(|v| v.to_string()).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn sft_with_megabyte_turns_fails_at_load_or_skips_them() {
    let dir = fresh_tmp_dir("mb");
    let data = megabyte_data(&dir);
    let d = data.to_str().unwrap();
    let run = |tag: &str, extra: &[&str]| {
        let out = dir.join(tag);
        let mut args = vec!["sft", "--data", d, "--out", out.to_str().unwrap(), "--steps", "1", "--device", "cpu"];
        args.extend_from_slice(extra);
        let r = am3(&args);
        assert!(r.2 < Duration::from_secs(60), "{tag}: took {:?}", r.2);
        (r, out)
    };
    let ((o, err, _), _) = run("plain", &[]);
    assert_clean_error(
        "1 MB turns",
        &o,
        &err,
        &[
            &format!("{d}:2: 524311 tokens, limit 1024"),
            &format!("{d}:4: 1048599 tokens, limit 1024"),
            "--batch-tokens",
        ],
    );
    // With a micro-batch large enough, the model's positions are the limit.
    let ((o, err, _), _) = run("wide", &["--batch-tokens", "2000000"]);
    assert_clean_error(
        "1 MB turns, wide batches",
        &o,
        &err,
        &[&format!("{d}:2: 524311 tokens, limit 4096"), "max_position_embeddings"],
    );
    // --skip-bad leaves them out (each reported) and trains on the rest.
    let ((o, err, _), out) = run("skip", &["--skip-bad", "true"]);
    println!("{err}");
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("skipped {d}:2: 524311 tokens, limit 1024"))
            && err.contains(&format!("skipped {d}:4: 1048599 tokens")),
        "{err}"
    );
    check_tiny_chat_template(&out.join("checkpoint-000001"));
}

/// A tiny-default checkpoint carries tokenizer_config.json with `<|im_end|>` as eos and a
/// chat template; where python3 has jinja2, the template renders (as transformers does, with
/// trim_blocks and lstrip_blocks) exactly what `render_chat` trains on.
fn check_tiny_chat_template(ck: &Path) {
    let tc = read(&ck.join("tokenizer_config.json"));
    assert_eq!(tc["eos_token"], json!("<|im_end|>"), "{tc}");
    let template = tc["chat_template"].as_str().expect("tokenizer_config.json has a chat_template").to_string();
    let msgs = [
        ChatMessage::user(vec![Part::Image(0), Part::Text("What shapes are in this image?".into())]),
        ChatMessage::assistant("A red circle."),
        ChatMessage::user(vec![Part::Text("And ".into()), Part::Image(1), Part::Text("this one?".into())]),
    ];
    let opts = ChatOptions { add_generation_prompt: true, ..Default::default() };
    let want = render_chat(&msgs, &opts).unwrap().text;
    let hf = json!([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shapes are in this image?"}]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image"}, {"type": "text", "text": "this one?"}]},
    ]);
    let script = "import json,sys\nfrom jinja2.sandbox import ImmutableSandboxedEnvironment as E\nd=json.load(sys.stdin)\n\
                  t=E(trim_blocks=True,lstrip_blocks=True).from_string(d['t'])\nsys.stdout.write(t.render(messages=d['m'],add_generation_prompt=True))";
    let child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        println!("chat template: rendering skipped (no python3)");
        return;
    };
    use std::io::Write;
    child.stdin.take().unwrap().write_all(json!({"t": template, "m": hf}).to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        println!(
            "chat template: rendering skipped ({})",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        );
        return;
    }
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        want,
        "the checkpoint's chat template renders differently from training"
    );
    println!("chat template renders as training does:\n{want}");
}

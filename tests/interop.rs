//! Hugging Face interop without Python (tools/interop-check.py runs transformers and PEFT
//! themselves): PEFT adapter names in transformers' module paths for both families; adapters
//! load back (`VlModel::load_model_or_adapter`, `am3 forward --model ADAPTER_DIR`) with the
//! logits of the model that saved them; where an adapter's base is (absolute path, hub id, HF
//! cache); saved configs keep the source's fields and record the saved dtype; `am3 export` and
//! every tiny-default checkpoint carry tokenizer_config.json (ChatML, eos `<|im_end|>`, pad),
//! chat_template.jinja and processor_config.json.
mod common;
#[path = "support/tiny_llava.rs"]
mod tiny_llava;

use am3safety::checkpoint::safetensors_io::{read_tensor_file, SaveDtype};
use am3safety::models::common::lora::{LoraConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use am3safety::models::common::params::ParamRef;
use am3safety::models::common::train_state::TrainState;
use am3safety::models::llava_next::config::LlavaNextConfig;
use am3safety::models::qwen2_5_vl::config::QwenVlConfig;
use am3safety::models::qwen2_5_vl::model::Recompute;
use am3safety::models::tiny;
use am3safety::stages::examples::{pack, Packed};
use am3safety::stages::export::{self, ExportArgs, CHAT_TEMPLATE, TINY_BASE_DIR};
use am3safety::stages::lora::{base_model_ref, hf_module_name, resolve_base_in};
use am3safety::stages::model::{Family, VlModel};
use am3safety::stages::sft::{self, load_examples, SftArgs};
use am3safety::tensor::{Buf, DType, Device, DevicePref};
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("am3-interop-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn json_of(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// Sets every adapter B to seeded random values (a fresh B is 0, which would hide a bad load).
fn randomize_b(dev: &Device, pg: Vec<(ParamRef, &mut Buf, &Buf)>) {
    let mut rng = Rng::new(77);
    for (r, p, _) in pg {
        if r.name.ends_with(".lora_B.weight") {
            *p = dev.upload(&rng.normal_vec(r.numel(), 0.05), DType::F32).unwrap();
        }
    }
}

/// `n` demo dialogues with images, packed.
fn demo_batch_of(n: usize) -> Packed {
    let tok = tiny::tokenizer().unwrap();
    let cfg = tiny::config(&tok).unwrap();
    let ex = load_examples(&sft::demo_data(), &tok, &cfg, &tiny::preprocessor().unwrap()).unwrap();
    let refs: Vec<_> = ex.iter().filter(|e| !e.grids.is_empty()).take(n).collect();
    pack(&refs)
}

fn demo_batch() -> Packed {
    demo_batch_of(2)
}

fn logits(dev: &Device, m: &VlModel, p: &Packed) -> Vec<f32> {
    dev.to_vec(&m.logits(dev, &m.forward(dev, p, &Recompute::default()).unwrap()).unwrap()).unwrap()
}

/// The tiny Qwen with random weights and random adapters on text and vision projections.
fn qwen_with_adapters(dev: &Device) -> VlModel {
    let tok = tiny::tokenizer().unwrap();
    let mut m = tiny::build(dev, tiny::config(&tok).unwrap(), 3).unwrap();
    let targets = ["q_proj", "v_proj", "down_proj", "visual.qkv", "visual.proj", "visual.gate_proj"];
    m.enable_lora(dev, &LoraConfig::new(4, 8.0, &targets, 1).unwrap()).unwrap();
    m.zero_grads(dev).unwrap();
    randomize_b(dev, m.params_and_grads());
    VlModel::from(m)
}

/// Keys of an adapter file, and its `target_modules`, are transformers' module paths.
#[test]
fn adapter_names_are_transformers_module_paths() {
    assert_eq!(
        hf_module_name(Family::Qwen, "model.layers.3.mlp.up_proj.weight"),
        "model.language_model.layers.3.mlp.up_proj.weight"
    );
    assert_eq!(
        hf_module_name(Family::Qwen, "visual.blocks.0.attn.qkv.weight"),
        "model.visual.blocks.0.attn.qkv.weight"
    );
    assert_eq!(hf_module_name(Family::Qwen, "lm_head.weight"), "lm_head.weight");
    assert_eq!(
        hf_module_name(Family::Llava, "language_model.model.layers.1.self_attn.o_proj.weight"),
        "model.language_model.layers.1.self_attn.o_proj.weight"
    );
    assert_eq!(hf_module_name(Family::Llava, "language_model.lm_head.weight"), "lm_head.weight");
    assert_eq!(
        hf_module_name(Family::Llava, "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    );

    let dev = Device::Cpu;
    let vl = qwen_with_adapters(&dev);
    let dir = tmp("names-qwen");
    vl.save_lora_adapter(&dev, &dir, "/abs/base", SaveDtype::F32).unwrap();
    let t = read_tensor_file(dir.join(ADAPTER_WEIGHTS)).unwrap();
    for k in t.keys() {
        assert!(
            k.starts_with("base_model.model.model.language_model.layers.")
                || k.starts_with("base_model.model.model.visual.blocks."),
            "{k}"
        );
    }
    assert!(t.contains_key("base_model.model.model.visual.blocks.1.attn.qkv.lora_B.weight"));
    let c = json_of(&dir.join(ADAPTER_CONFIG));
    assert_eq!(c["base_model_name_or_path"], "/abs/base");
    let re = c["target_modules"].as_str().unwrap();
    for m in [
        r"model\.language_model\.layers\.\d+\.self_attn\.q_proj",
        r"model\.language_model\.layers\.\d+\.mlp\.down_proj",
        r"model\.visual\.blocks\.\d+\.attn\.qkv",
        r"model\.visual\.blocks\.\d+\.mlp\.gate_proj",
    ] {
        assert!(re.contains(m), "{m} missing from target_modules {re}");
    }

    // LLaVA-NeXT: the decoder under model.language_model.
    let tok = tiny_llava::llava_tokenizer();
    let mut l = tiny_llava::tiny_model(tiny_llava::tiny_config(&tok, "mistral"), 4);
    l.enable_lora(&dev, &LoraConfig::new(2, 4.0, &["k_proj", "up_proj"], 1).unwrap()).unwrap();
    let vl = VlModel::from(l);
    let dir2 = tmp("names-llava");
    vl.save_lora_adapter(&dev, &dir2, "/abs/base", SaveDtype::F32).unwrap();
    let t = read_tensor_file(dir2.join(ADAPTER_WEIGHTS)).unwrap();
    assert_eq!(t.len(), 2 * 2 * 2);
    assert!(
        t.contains_key("base_model.model.model.language_model.layers.1.self_attn.k_proj.lora_A.weight"),
        "{:?}",
        t.keys()
    );
    let c = json_of(&dir2.join(ADAPTER_CONFIG));
    assert_eq!(
        c["target_modules"],
        r"(?:model\.language_model\.layers\.\d+\.mlp\.up_proj|model\.language_model\.layers\.\d+\.self_attn\.k_proj)"
    );
    for d in [dir, dir2] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// An adapter directory loads onto its base (the path it names) with the logits of the model
/// that saved it, for both families; so does a PEFT-style file keyed by canonical names.
#[test]
fn adapter_dirs_load_back_with_the_same_logits() {
    let dev = Device::Cpu;
    let p = demo_batch();
    let vl = qwen_with_adapters(&dev);
    let want = logits(&dev, &vl, &p);
    let root = tmp("load-qwen");
    let (base, adapter) = (root.join("base"), root.join("adapter"));
    vl.save(&dev, &base, SaveDtype::F32).unwrap();
    vl.save_lora_adapter(&dev, &adapter, &base_model_ref(&base).unwrap(), SaveDtype::F32).unwrap();
    let back = VlModel::load_model_or_adapter(&dev, &adapter).unwrap();
    assert!(back.lora().is_some());
    let got = logits(&dev, &back, &p);
    assert!(got == want, "Qwen adapter reloaded: max diff {:.2e}", max_abs(&got, &want));

    // Keys in the canonical spelling (e.g. an adapter written before transformers' paths were
    // used) load too.
    let t = read_tensor_file(adapter.join(ADAPTER_WEIGHTS)).unwrap();
    let old = root.join("old-names");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::copy(adapter.join(ADAPTER_CONFIG), old.join(ADAPTER_CONFIG)).unwrap();
    let views: Vec<(String, Vec<usize>, Vec<f32>)> = t
        .iter()
        .map(|(k, (s, v))| {
            (
                k.replace("base_model.model.model.language_model.", "base_model.model.model.")
                    .replace("base_model.model.model.visual.", "base_model.model.visual."),
                s.clone(),
                v.iter().map(|&x| x as f32).collect(),
            )
        })
        .collect();
    let out: Vec<(String, Vec<usize>, am3safety::stages::forward::OutData)> =
        views.into_iter().map(|(k, s, v)| (k, s, am3safety::stages::forward::OutData::F32(v))).collect();
    am3safety::stages::forward::write_tensors(&old.join(ADAPTER_WEIGHTS), &out).unwrap();
    let got = logits(&dev, &VlModel::load_model_or_adapter(&dev, &old).unwrap(), &p);
    assert!(got == want, "canonical-name adapter: max diff {:.2e}", max_abs(&got, &want));

    // A key that matches no module, or a missing layer, is an error naming it.
    let mut extra = out;
    extra.push((
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight".into(),
        vec![4, 96],
        am3safety::stages::forward::OutData::F32(vec![0.0; 4 * 96]),
    ));
    am3safety::stages::forward::write_tensors(&old.join(ADAPTER_WEIGHTS), &extra).unwrap();
    let e = VlModel::load_model_or_adapter(&dev, &old).err().unwrap().to_string();
    assert!(e.contains("layers.9"), "{e}");
    extra.truncate(extra.len() - 2);
    am3safety::stages::forward::write_tensors(&old.join(ADAPTER_WEIGHTS), &extra).unwrap();
    let e = format!("{:#}", VlModel::load_model_or_adapter(&dev, &old).err().unwrap());
    assert!(e.contains("no `base_model.model."), "{e}");
    // Settings this project cannot apply are refused.
    let mut c = json_of(&adapter.join(ADAPTER_CONFIG));
    c["use_dora"] = json!(true);
    std::fs::write(old.join(ADAPTER_CONFIG), c.to_string()).unwrap();
    let e = format!("{:#}", VlModel::load_model_or_adapter(&dev, &old).err().unwrap());
    assert!(e.contains("use_dora"), "{e}");

    // LLaVA-NeXT, base saved in transformers' in-memory spelling.
    let lroot = tmp("load-llava");
    let lbase = lroot.join("base");
    std::fs::create_dir_all(&lbase).unwrap();
    tiny_llava::write_tiny_dir(&lbase, "mistral", 9);
    let mut l = VlModel::load(&dev, &lbase).unwrap();
    l.enable_lora(
        &dev,
        &LoraConfig::new(4, 8.0, &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 2)
            .unwrap(),
    )
    .unwrap();
    l.zero_grads(&dev).unwrap();
    randomize_b(&dev, l.params_and_grads());
    let ids: Vec<i32> = (0..24).map(|i| i * 7 % 400).collect();
    let lp = Packed { ids: ids.clone(), cu_seqlens: vec![0, ids.len() as i32], ..Default::default() };
    let want = logits(&dev, &l, &lp);
    let ladapter = lroot.join("adapter");
    l.save_lora_adapter(&dev, &ladapter, &base_model_ref(&lbase).unwrap(), SaveDtype::F32).unwrap();
    let got = logits(&dev, &VlModel::load_model_or_adapter(&dev, &ladapter).unwrap(), &lp);
    assert!(got == want, "LLaVA adapter reloaded: max diff {:.2e}", max_abs(&got, &want));
    for d in [root, lroot] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The recorded base: an absolute path; the hub id for a hub download (HF cache layout, or a
/// config naming one); and back to a directory, also through the HF cache.
#[test]
fn adapter_base_is_absolute_or_a_hub_id() {
    let root = tmp("base-ref");
    let local = root.join("models/mine");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("config.json"), "{}").unwrap();
    let cwd = std::env::current_dir().unwrap();
    let rel = pathdiff(&local, &cwd);
    let got = base_model_ref(&rel).unwrap();
    assert!(Path::new(&got).is_absolute() && Path::new(&got) == std::fs::canonicalize(&local).unwrap(), "{got}");

    let snap = root.join("hub/models--Qwen--Qwen2.5-VL-7B-Instruct/snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(snap.join("config.json"), "{}").unwrap();
    std::fs::create_dir_all(root.join("hub/models--Qwen--Qwen2.5-VL-7B-Instruct/refs")).unwrap();
    std::fs::write(root.join("hub/models--Qwen--Qwen2.5-VL-7B-Instruct/refs/main"), "abc123").unwrap();
    assert_eq!(base_model_ref(&snap).unwrap(), "Qwen/Qwen2.5-VL-7B-Instruct");
    let named = root.join("named");
    std::fs::create_dir_all(&named).unwrap();
    std::fs::write(named.join("config.json"), r#"{"_name_or_path": "llava-hf/llava-v1.6-mistral-7b-hf"}"#).unwrap();
    assert_eq!(base_model_ref(&named).unwrap(), "llava-hf/llava-v1.6-mistral-7b-hf");

    let adapter = root.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    let caches = [root.join("hub")];
    assert_eq!(resolve_base_in("Qwen/Qwen2.5-VL-7B-Instruct", &adapter, &caches).unwrap(), snap);
    assert_eq!(resolve_base_in(got.as_str(), &adapter, &caches).unwrap(), PathBuf::from(&got));
    assert_eq!(resolve_base_in("../models/mine", &adapter, &caches).unwrap(), adapter.join("../models/mine"));
    let e = resolve_base_in("nobody/nothing", &adapter, &caches).unwrap_err().to_string();
    assert!(e.contains("nobody/nothing") && e.contains(ADAPTER_CONFIG), "{e}");
    let _ = std::fs::remove_dir_all(root);
}

/// A relative path from `base` to `p` (both absolute).
fn pathdiff(p: &Path, base: &Path) -> PathBuf {
    let (p, base) = (std::fs::canonicalize(p).unwrap(), std::fs::canonicalize(base).unwrap());
    let common = p.components().zip(base.components()).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in base.components().skip(common) {
        out.push("..");
    }
    for c in p.components().skip(common) {
        out.push(c);
    }
    out
}

/// Every field of the source but the dtype survives a save, in the source's layout; a changed
/// field is written where the source keeps it; the dtype is what the tensors are.
#[test]
fn saved_configs_keep_the_source_fields() {
    fn same_but_dtype(src: &Value, saved: &Value, dtype: &str, path: &str) {
        let (Value::Object(s), Value::Object(o)) = (src, saved) else {
            assert_eq!(src, saved, "{path}");
            return;
        };
        for (k, v) in s {
            let p = format!("{path}.{k}");
            if k == "_name_or_path" && path.is_empty() {
                continue;
            }
            let got = o.get(k).unwrap_or_else(|| panic!("{p} dropped"));
            if k == "torch_dtype" || k == "dtype" {
                assert_eq!(got, dtype, "{p}");
            } else {
                same_but_dtype(v, got, dtype, &p);
            }
        }
    }
    let root = tmp("configs");
    // Qwen fixture (flat, transformers 5.23's file), LLaVA fixture (dtype, sliding_window 4096).
    let qsrc = json_of(&fixture_dir("qwen2_5_vl_tiny").join("config.json"));
    let q = QwenVlConfig::load(fixture_dir("qwen2_5_vl_tiny")).unwrap();
    std::fs::create_dir_all(root.join("q")).unwrap();
    q.save_as(root.join("q"), "bfloat16").unwrap();
    let qs = json_of(&root.join("q/config.json"));
    same_but_dtype(&qsrc, &qs, "bfloat16", "");
    for (k, v) in
        [("max_window_layers", json!(80)), ("sliding_window", Value::Null), ("transformers_version", json!("5.23.0"))]
    {
        assert_eq!(qs[k], v, "{k}");
    }
    assert_eq!(qs["vision_config"]["model_type"], "qwen2_5_vl_vision");
    assert_eq!(
        QwenVlConfig::load(root.join("q")).unwrap(),
        QwenVlConfig { torch_dtype: "bfloat16".into(), ..q.clone() }
    );

    let lsrc = json_of(&fixture_dir("llava_next_tiny").join("config.json"));
    let l = LlavaNextConfig::load(fixture_dir("llava_next_tiny")).unwrap();
    std::fs::create_dir_all(root.join("l")).unwrap();
    l.save_as(root.join("l"), "float32").unwrap();
    let ls = json_of(&root.join("l/config.json"));
    same_but_dtype(&lsrc, &ls, "float32", "");
    assert_eq!(ls["text_config"]["sliding_window"], 4096);
    assert!(ls.get("torch_dtype").is_none(), "the source says `dtype`; no second key");
    assert_eq!(LlavaNextConfig::load(root.join("l")).unwrap(), l);

    // Nested Qwen source: stays nested; a changed field is written into text_config.
    let mut nested = qsrc.clone();
    let m = nested.as_object_mut().unwrap();
    let mut text = serde_json::Map::new();
    for k in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "vocab_size",
        "max_position_embeddings",
        "rope_theta",
        "rope_scaling",
        "hidden_act",
        "max_window_layers",
        "sliding_window",
        "use_sliding_window",
    ] {
        text.insert(k.into(), m.remove(k).unwrap());
    }
    m.insert("text_config".into(), Value::Object(text));
    let mut n = QwenVlConfig::from_json(&nested, Path::new("nested.json")).unwrap();
    assert_eq!(n, q);
    n.text.rms_norm_eps = 1e-5;
    std::fs::create_dir_all(root.join("n")).unwrap();
    n.save(root.join("n")).unwrap();
    let ns = json_of(&root.join("n/config.json"));
    assert_eq!(ns["text_config"]["rms_norm_eps"], 1e-5);
    assert_eq!(ns["text_config"]["max_window_layers"], 80);
    assert!(ns.get("rms_norm_eps").is_none() && ns.get("hidden_size").is_none(), "nested layout kept: {ns}");
    assert_eq!(ns["torch_dtype"], "float32");
    assert_eq!(QwenVlConfig::load(root.join("n")).unwrap(), n);
    let _ = std::fs::remove_dir_all(root);
}

fn check_tiny_hf_files(dir: &Path) {
    let cfg = json_of(&dir.join("config.json"));
    let tc = json_of(&dir.join("tokenizer_config.json"));
    let tok = am3safety::models::qwen2_5_vl::chat::load_tokenizer(dir).unwrap().unwrap();
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(
        tok.token_to_id("<|im_end|>").unwrap() as u64,
        cfg["eos_token_id"].as_u64().unwrap(),
        "tokenizer eos = model eos"
    );
    assert_eq!(json_of(&dir.join("generation_config.json"))["eos_token_id"], cfg["eos_token_id"]);
    assert_eq!(tc["pad_token"], "<|endoftext|>");
    assert_eq!(tc["chat_template"], CHAT_TEMPLATE);
    assert_eq!(std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap(), CHAT_TEMPLATE);
    let pc = json_of(&dir.join("processor_config.json"));
    assert_eq!(pc["processor_class"], "Qwen2_5_VLProcessor");
    assert_eq!(pc["image_processor"], json_of(&dir.join("preprocessor_config.json")));
    for k in ["max_window_layers", "transformers_version", "initializer_range"] {
        assert!(cfg.get(k).is_some(), "config.json lost {k}");
    }
    assert_eq!(cfg["vision_config"]["model_type"], "qwen2_5_vl_vision");
}

/// `am3 export` writes the tiny default (the init `am3 sft --seed N` starts from) as a full HF
/// directory with the tokenizer and processor files.
#[test]
fn export_writes_the_tiny_default() {
    let root = tmp("export");
    let out = root.join("tiny");
    let o = std::process::Command::new(am3_bin())
        .args(["export", "--out", out.to_str().unwrap(), "--seed", "5"])
        .output()
        .unwrap();
    assert!(o.status.success(), "am3 export: {}", String::from_utf8_lossy(&o.stderr));
    check_tiny_hf_files(&out);
    assert_eq!(json_of(&out.join("config.json"))["torch_dtype"], "float32");
    let dev = Device::Cpu;
    let back = VlModel::load(&dev, &out).unwrap();
    let l = sft::load_model(&dev, None, 5).unwrap();
    let p = demo_batch();
    assert!(logits(&dev, &back, &p) == logits(&dev, &l.model, &p), "the export is not the seed-5 init");
    // bf16 says so in config.json; a bad dtype is refused.
    export::run(&ExportArgs { out: root.join("bf16"), seed: 0, dtype: "bf16".into() }).unwrap();
    assert_eq!(json_of(&root.join("bf16/config.json"))["torch_dtype"], "bfloat16");
    assert!(export::run(&ExportArgs { out: root.join("x"), seed: 0, dtype: "f16".into() }).is_err());
    // Never over a directory that holds something.
    let e = export::run(&ExportArgs { out: out.clone(), seed: 0, dtype: "f32".into() }).unwrap_err().to_string();
    assert!(e.contains("not an empty directory"), "{e}");
    assert!(out.join("model.safetensors").is_file());
    let _ = std::fs::remove_dir_all(root);
}

/// `am3 sft` of the tiny default with `--lora-save adapter`: the adapter names the exported base
/// (absolute, under --out), every checkpoint carries the tokenizer/processor files, and
/// `am3 forward --model ADAPTER_DIR` gives the logits of the same adapter merged.
#[test]
fn tiny_adapter_checkpoint_forward_and_base() {
    let root = tmp("tiny-adapter");
    let out = root.join("run");
    let args = SftArgs {
        out: Some(out.clone()),
        steps: Some(2),
        save_every: Some(2),
        device: Some(DevicePref::Cpu),
        lr: Some(5e-2),
        lora_rank: Some(4),
        lora_targets: Some("q_proj,v_proj,visual.qkv".into()),
        lora_save: Some("adapter".into()),
        ..Default::default()
    };
    let ck = sft::run(args).unwrap();
    check_tiny_hf_files(&ck.parent().unwrap().join(TINY_BASE_DIR));
    assert!(ck.join("tokenizer_config.json").is_file() && ck.join("chat_template.jinja").is_file());
    let c = json_of(&ck.join(ADAPTER_CONFIG));
    let base = std::fs::canonicalize(out.join(TINY_BASE_DIR)).unwrap();
    assert_eq!(c["base_model_name_or_path"], base.to_str().unwrap());

    let dev = Device::Cpu;
    let m = VlModel::load_model_or_adapter(&dev, &ck).unwrap();
    let merged = root.join("merged");
    std::fs::create_dir_all(&merged).unwrap();
    m.save_merged(&dev, &merged, SaveDtype::F32).unwrap();
    // An inputs file (as the fixtures lay them out) from one demo dialogue with images.
    let p = demo_batch_of(1);
    let ids: Vec<i64> = p.ids.iter().map(|&x| x as i64).collect();
    let rows: usize = p.grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    let inputs = root.join("inputs.safetensors");
    write_inputs(&inputs, &ids, &p.pixels, rows, p.pixels.len() / rows, &p.grids);
    let run_fwd = |model: &Path, name: &str| -> Vec<f32> {
        let o = root.join(name);
        let r = std::process::Command::new(am3_bin())
            .args([
                "forward",
                "--device",
                "cpu",
                "--model",
                model.to_str().unwrap(),
                "--inputs",
                inputs.to_str().unwrap(),
                "--out",
                o.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(r.status.success(), "am3 forward --model {}: {}", model.display(), String::from_utf8_lossy(&r.stderr));
        read_tensor_file(&o).unwrap()["logits"].1.iter().map(|&x| x as f32).collect()
    };
    let (a, b, base_l) =
        (run_fwd(&ck, "a.safetensors"), run_fwd(&merged, "m.safetensors"), run_fwd(&base, "b.safetensors"));
    let e = rel_err(&a, &b);
    report("am3 forward adapter dir vs merged", "logits", e, Tol::LoraMerged);
    assert!(rel_err(&b, &base_l) > 1e-3, "the adapter should change the logits");
    let _ = std::fs::remove_dir_all(root);
}

fn write_inputs(path: &Path, ids: &[i64], pixels: &[f32], rows: usize, patch: usize, grids: &[[usize; 3]]) {
    use safetensors::tensor::{Dtype, TensorView};
    let g: Vec<i64> = grids.iter().flat_map(|g| g.iter().map(|&x| x as i64)).collect();
    let (ib, pb, gb) = (
        bytemuck::cast_slice::<i64, u8>(ids).to_vec(),
        bytemuck::cast_slice::<f32, u8>(pixels).to_vec(),
        bytemuck::cast_slice::<i64, u8>(&g).to_vec(),
    );
    let views = vec![
        ("input_ids".to_string(), TensorView::new(Dtype::I64, vec![1, ids.len()], &ib).unwrap()),
        ("pixel_values".to_string(), TensorView::new(Dtype::F32, vec![rows, patch], &pb).unwrap()),
        ("image_grid_thw".to_string(), TensorView::new(Dtype::I64, vec![grids.len(), 3], &gb).unwrap()),
    ];
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

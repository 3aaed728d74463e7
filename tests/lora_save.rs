//! LoRA training and saving: SFT steps lower the loss and keep the base, a merged save reloads
//! with the same logits, adapter files have PEFT's names and config, and `am3 sft` with adapters
//! (save, resume, merged).
mod common;
use am3safety::checkpoint::safetensors_io::{read_tensor_file, SaveDtype};
use am3safety::models::common::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEFAULT_TARGETS};
use am3safety::models::common::params::assemble;
use am3safety::models::common::train_state::TrainState;
use am3safety::models::qwen2_5_vl::model::{QwenVl, Recompute};
use am3safety::models::tiny;
use am3safety::ops::adamw::AdamW;
use am3safety::stages::model::VlModel;
use am3safety::stages::sft::{self, latest_checkpoint, nll_micro_batch, SftArgs};
use am3safety::tensor::{DType, Device, DevicePref};
use am3safety::train::metrics::read_metrics;
use am3safety::train::optim::Optimizer;
use common::*;
use std::path::{Path, PathBuf};

#[path = "support/lora_model.rs"]
mod lora_support;
use lora_support::*;

#[test]
fn lora_sft_steps_lower_the_loss_and_keep_the_base() {
    let dev = Device::Cpu;
    let mut m = tiny::build(&dev, tiny_cfg(), 3).unwrap();
    m.enable_lora(&dev, &lora_cfg(8, 16.0, &DEFAULT_TARGETS)).unwrap();
    let snapshot = |m: &VlModel| m.param_entries().iter().map(|(_, b)| dev.to_vec(b).unwrap()).collect::<Vec<_>>();
    let n_lora = m.lora().unwrap().num_params();
    let mut vl = VlModel::from(m);
    let base = snapshot(&vl);
    let p = demo_batch(3);
    let rc = Recompute::default();
    let (nll0, n) = nll_micro_batch(&dev, &mut vl, &p, &rc, false).unwrap();
    let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 };
    let mut opt = Optimizer::new(&dev, hp, &vl.trainable_entries(), &|_| true).unwrap();
    assert_eq!(opt.num_params(), n_lora, "the optimizer holds exactly the adapters");
    let mut losses = Vec::new();
    for _ in 0..8 {
        vl.zero_grads(&dev).unwrap();
        let (nll, k) = nll_micro_batch(&dev, &mut vl, &p, &rc, true).unwrap();
        losses.push(nll / k);
        let pg = vl.params_and_grads();
        assert!(pg.iter().all(|(r, _, _)| r.name.contains(".lora_")), "a base tensor is being trained");
        opt.step(&dev, pg, 1e-2, 1.0 / k, 1.0).unwrap();
    }
    let (nll1, _) = nll_micro_batch(&dev, &mut vl, &p, &rc, false).unwrap();
    let (l0, l1) = (nll0 / n, nll1 / n);
    println!("lora sft: loss {l0:.4} -> {l1:.4} over 8 steps ({losses:?}); {n_lora} adapter values trained");
    assert!(l1 < 0.8 * l0, "the loss did not fall enough: {l0:.4} -> {l1:.4}");
    let after = snapshot(&vl);
    for (i, (a, b)) in base.iter().zip(&after).enumerate() {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "base tensor {i} changed");
    }
}

#[test]
fn lora_merged_save_reloads_with_the_same_logits() {
    let dev = Device::Cpu;
    let p = demo_batch(2);
    let mut m = qwen(&dev, DType::F32);
    m.enable_lora(&dev, &lora_cfg(4, 8.0, QWEN_ALL)).unwrap();
    m.zero_grads(&dev).unwrap();
    randomize_b(&dev, m.params_and_grads(), DType::F32);
    let vl = VlModel::from(m);
    let rc = Recompute::default();
    let want = dev.to_vec(&vl.logits(&dev, &vl.forward(&dev, &p, &rc).unwrap()).unwrap()).unwrap();
    let dir = tmp("merged");
    vl.save_merged(&dev, &dir, SaveDtype::F32).unwrap();
    let back = QwenVl::load(&dev, &dir).unwrap();
    assert!(back.lora().is_none());
    let got = dev.to_vec(&back.logits(&dev, &back.forward(&dev, &p.batch(), &rc).unwrap()).unwrap()).unwrap();
    let e = rel_err(&got, &want);
    println!("merged save reloaded: logits rel err {e:.2e} vs the LoRA model");
    assert_err("merged checkpoint logits", e, Tol::LoraMerged);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lora_adapter_files_have_peft_names_and_config() {
    let dev = Device::Cpu;
    let mut m = qwen(&dev, DType::F32);
    let (nl, vd, d) = (m.tdims.n_layers, m.vdims.block.d, m.tdims.layer.d);
    let (q, kv, depth) = (m.tdims.layer.q_dim(), m.tdims.layer.kv_dim(), m.vdims.depth);
    m.enable_lora(&dev, &lora_cfg(4, 8.0, &["q_proj", "v_proj", "visual.qkv"])).unwrap();
    m.zero_grads(&dev).unwrap();
    randomize_b(&dev, m.params_and_grads(), DType::F32);
    let vals = assemble(&dev, m.lora().unwrap().entries()).unwrap();
    let vl = VlModel::from(m);
    let dir = tmp("adapter");
    vl.save_lora_adapter(&dev, &dir, "Qwen/Qwen2.5-VL-7B-Instruct", SaveDtype::F32).unwrap();
    let t = read_tensor_file(dir.join(ADAPTER_WEIGHTS)).unwrap();
    let mut want: Vec<(String, Vec<usize>)> = Vec::new();
    for i in 0..nl {
        for (m, out) in [("q_proj", q), ("v_proj", kv)] {
            want.push((
                format!("base_model.model.model.language_model.layers.{i}.self_attn.{m}.lora_A.weight"),
                vec![4, d],
            ));
            want.push((
                format!("base_model.model.model.language_model.layers.{i}.self_attn.{m}.lora_B.weight"),
                vec![out, 4],
            ));
        }
    }
    for i in 0..depth {
        want.push((format!("base_model.model.model.visual.blocks.{i}.attn.qkv.lora_A.weight"), vec![4, vd]));
        want.push((format!("base_model.model.model.visual.blocks.{i}.attn.qkv.lora_B.weight"), vec![3 * vd, 4]));
    }
    assert_eq!(t.len(), want.len(), "keys: {:?}", t.keys().collect::<Vec<_>>());
    for (name, shape) in &want {
        let (s, v) = t.get(name).unwrap_or_else(|| panic!("{name} missing from {ADAPTER_WEIGHTS}"));
        assert_eq!(s, shape, "{name}");
        let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        // In memory the module path is the canonical checkpoint name.
        let internal =
            name.replace("model.model.language_model.", "model.model.").replace("model.model.visual.", "model.visual.");
        assert_eq!(v32, vals[&internal].1, "{name}: saved values differ");
    }
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    println!("adapter_config.json: {c}");
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "CAUSAL_LM");
    assert_eq!(c["r"], 4);
    assert_eq!(c["lora_alpha"].as_f64(), Some(8.0));
    assert_eq!(c["base_model_name_or_path"], "Qwen/Qwen2.5-VL-7B-Instruct");
    // transformers' module paths (Qwen2_5_VLForConditionalGeneration), which PEFT full-matches.
    assert_eq!(
        c["target_modules"],
        r"(?:model\.language_model\.layers\.\d+\.self_attn\.q_proj|model\.language_model\.layers\.\d+\.self_attn\.v_proj|model\.visual\.blocks\.\d+\.attn\.qkv)"
    );
    let hidden: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "staging files left behind: {hidden:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn sft_args(out: &Path, steps: u64, save_every: u64) -> SftArgs {
    SftArgs {
        out: Some(out.to_path_buf()),
        steps: Some(steps),
        save_every: Some(save_every),
        device: Some(DevicePref::Cpu),
        lora_rank: Some(4),
        lora_targets: Some("q_proj, k_proj,v_proj,o_proj".into()),
        lr: Some(1e-2),
        ..Default::default()
    }
}

#[test]
fn lora_sft_cli_adapter_resume_and_merged() {
    // Bad flag combinations are errors.
    let bad = SftArgs { lora_targets: Some("q_proj".into()), ..Default::default() };
    assert!(bad.resolve().is_err(), "--lora-targets without --lora-rank");
    let bad = SftArgs { lora_rank: Some(4), lora_targets: Some("qproj".into()), ..Default::default() };
    assert!(bad.resolve().unwrap_err().to_string().contains("qproj"));
    let bad = SftArgs { lora_rank: Some(4), lora_save: Some("both".into()), ..Default::default() };
    assert!(bad.resolve().is_err());
    let (_, plan) = SftArgs { lora_rank: Some(8), ..Default::default() }.resolve().unwrap();
    assert_eq!((plan.lora_alpha, plan.lora_targets.len(), plan.lora_save.as_str()), (16.0, 7, "merged"));

    // Adapter checkpoints, and a bit-for-bit resume.
    let a = tmp("cli-a");
    let adapter = |o: &Path| SftArgs { lora_save: Some("adapter".into()), ..sft_args(o, 4, 2) };
    let ck_a = sft::run(adapter(&a)).unwrap();
    for f in [ADAPTER_WEIGHTS, ADAPTER_CONFIG, "tokenizer.json", "trainer_state.json"] {
        assert!(ck_a.join(f).is_file(), "adapter checkpoint lacks {f}");
    }
    assert!(!ck_a.join("model.safetensors").exists(), "an adapter checkpoint has no full weights");
    // The tiny default exists nowhere else: its base is exported beside the run, by absolute path.
    let ac: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck_a.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    let base = std::fs::canonicalize(a.join("base-model")).unwrap();
    assert_eq!(ac["base_model_name_or_path"], base.to_str().unwrap());
    assert!(base.join("model.safetensors").is_file() && base.join("tokenizer_config.json").is_file());
    let t = read_tensor_file(ck_a.join(ADAPTER_WEIGHTS)).unwrap();
    assert_eq!(t.len(), 2 * 4 * 2, "2 layers × 4 modules × (A, B)");
    let b_norm: f64 = t
        .iter()
        .filter(|(n, _)| n.ends_with("lora_B.weight"))
        .map(|(_, (_, v))| v.iter().map(|x| x * x).sum::<f64>())
        .sum();
    assert!(b_norm > 0.0, "training left every B at zero");
    let m = read_metrics(a.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = m.iter().filter_map(|v| v.get("loss").and_then(|x| x.as_f64())).collect();
    println!("lora sft (adapter) losses: {losses:?}");
    assert_eq!(losses.len(), 4);
    let b = tmp("cli-b");
    sft::run(SftArgs { stop_after: Some(3), ..adapter(&b) }).unwrap();
    assert!(latest_checkpoint(&b).unwrap().unwrap().ends_with("checkpoint-000002"));
    let ck_b = sft::run(SftArgs { resume: true, ..adapter(&b) }).unwrap();
    let bytes = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(bytes(ck_a.join(ADAPTER_WEIGHTS)) == bytes(ck_b.join(ADAPTER_WEIGHTS)), "adapters differ after resume");

    // Merged checkpoints load as plain Qwen2.5-VL models.
    let c = tmp("cli-c");
    let ck_c = sft::run(sft_args(&c, 2, 2)).unwrap();
    assert!(!ck_c.join(ADAPTER_WEIGHTS).exists());
    let back = QwenVl::load(&Device::Cpu, &ck_c).unwrap();
    assert!(back.lora().is_none());
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

//! `am3 bench` workload suites on the CPU: every suite on the tiny shape (figures positive and
//! finite, the plan within 10 % of the buffers the run allocated), `--compare`, the 7B plans
//! without allocating, the synthetic 7B inputs, a LLaVA-NeXT checkpoint, and the kernel suites'
//! skip line.

#[path = "support/tiny_llava.rs"]
mod tiny_llava;

use am3safety::bench::plan::{Plan, PlanInput};
use am3safety::bench::shape::Subject;
use am3safety::bench::synth::{self, TempDir};
use am3safety::data::dataset::{load_jsonl_with, LoadOptions, Purpose};
use am3safety::grpo::memory::{MemoryInput, MemoryPlan};
use am3safety::models::common::params::GradStore;
use am3safety::rollout::engine::cache_plan;
use am3safety::rollout::DialogueSpec;
use am3safety::stages::sft::{load_model, Loaded};
use am3safety::tensor::Device;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const SUITES: [&str; 5] = ["train", "vision", "prefill", "rollout", "grpo"];

fn am3(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_am3")).args(args).env("AM3_FORCE_CPU", "1").output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "am3 {args:?} failed\nstdout:\n{so}\nstderr:\n{se}");
    (so, se)
}

fn read(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Every figure positive and finite, every suite present, nothing failed.
fn check_report(v: &Value, shape: &str) {
    assert_eq!(v["shape"], shape);
    assert_eq!(v["card"], "cpu");
    assert_eq!(v["driver"], "none");
    assert!(!v["commit"].as_str().unwrap().is_empty());
    assert_eq!(v["failures"].as_array().unwrap().len(), 0, "failures: {}", v["failures"]);
    let figs = v["figures"].as_array().unwrap();
    for f in figs {
        for k in ["value", "min", "max"] {
            let x = f[k].as_f64().unwrap_or(f64::NAN);
            assert!(x.is_finite() && x > 0.0, "{}/{}: {k} = {x}", f["suite"], f["name"]);
        }
        assert!(
            f["min"].as_f64().unwrap() <= f["value"].as_f64().unwrap()
                && f["value"].as_f64().unwrap() <= f["max"].as_f64().unwrap(),
            "{f}"
        );
    }
    for s in SUITES {
        assert!(figs.iter().any(|f| f["suite"] == s), "suite {s} has no figures");
    }
    // The GRPO step is broken into every phase.
    for p in ["rollout", "judge", "old log-probs", "reference log-probs", "update"] {
        for q in ["s", "tok/s", "peak memory"] {
            let name = format!("{p}: {q}");
            assert!(figs.iter().any(|f| f["suite"] == "grpo" && f["name"] == name.as_str()), "grpo has no {name}");
        }
    }
    assert!(figs.iter().any(|f| f["suite"] == "grpo" && f["name"] == "idle: s"));
    // No baselines on shapes they were not measured on.
    assert!(figs.iter().all(|f| f.get("baseline").is_none_or(Value::is_null)));
}

#[test]
fn tiny_runs_every_suite_and_compares() {
    let tmp = TempDir::new("bench-test").unwrap();
    let f = tmp.0.join("tiny.json");
    let t = Instant::now();
    let (out, _) = am3(&["bench", "--shape", "tiny", "--json", f.to_str().unwrap()]);
    eprintln!("am3 bench --shape tiny: {:.1} s", t.elapsed().as_secs_f64());
    assert!(out.contains("memory plan of tiny"), "{out}");
    let v = read(&f);
    check_report(&v, "tiny");

    // The plan within 10 % of the bytes of the buffers the run allocated.
    let pc = &v["plan_check"];
    let lines = pc["buffers"].as_array().unwrap();
    let names: Vec<&str> = lines.iter().map(|l| l["name"].as_str().unwrap()).collect();
    for want in ["weights", "f32 master + AdamW moments", "gradients (f32)", "KV cache (decode suite, largest batch)"] {
        assert!(names.contains(&want), "plan check lacks {want}: {names:?}");
    }
    for l in lines {
        let (p, m) = (l["plan_bytes"].as_f64().unwrap(), l["measured_bytes"].as_f64().unwrap());
        assert!(m > 0.0 && (m / p - 1.0).abs() <= 0.10, "{}: plan {p} B, allocated {m} B", l["name"]);
    }
    let ratio = pc["ratio"].as_f64().unwrap();
    assert!((ratio - 1.0).abs() <= 0.10, "total ratio {ratio}");
    assert_eq!(pc["peaks"].as_array().unwrap().len(), 2);

    // --compare F F: every shared figure at 1.00.
    let (cmp, _) = am3(&["bench", "--compare", f.to_str().unwrap(), f.to_str().unwrap()]);
    let n = v["figures"].as_array().unwrap().len();
    let rows: Vec<&str> = cmp.lines().filter(|l| l.contains(" [") && !l.starts_with("only in")).collect();
    assert_eq!(rows.len(), n, "{cmp}");
    for r in rows {
        assert!(r.trim_end().ends_with(" 1.00"), "{r}");
    }
    assert!(!cmp.contains("only in"), "{cmp}");
}

#[test]
fn seven_b_plans_without_allocating() {
    let tmp = TempDir::new("bench-plan").unwrap();
    for (shape, lo, hi) in [("qwen2.5-vl-7b", 8.2e9, 8.4e9), ("llava-next-7b", 7.4e9, 7.7e9)] {
        let f = tmp.0.join(format!("{shape}.json"));
        let t = Instant::now();
        let (out, _) = am3(&["bench", "--plan", "--shape", shape, "--json", f.to_str().unwrap()]);
        assert!(t.elapsed().as_secs_f64() < 10.0, "the plan took {:?}", t.elapsed());
        assert!(out.contains("weights (") && out.contains("KV cache (") && out.contains("free here"), "{out}");
        let v = read(&f);
        let p = &v["plan"];
        let params = p["params"].as_f64().unwrap();
        assert!(params > lo && params < hi, "{shape}: {params} parameters");
        let g = &p["cuda_bf16"];
        let gib = |k: &str| g[k].as_f64().unwrap() / (1u64 << 30) as f64;
        if shape == "qwen2.5-vl-7b" {
            // 8.29 B parameters in bf16; the 7B plan uses the GPU's sizes.
            assert!((15.4..=16.6).contains(&gib("weights")), "weights {} GiB", gib("weights"));
            assert_eq!(p["seq"], 4096);
        }
        let trainable = p["trainable"].as_f64().unwrap();
        assert_eq!(g["master_f32"].as_f64().unwrap(), 4.0 * trainable);
        assert_eq!(g["adamw"].as_f64().unwrap(), 8.0 * trainable);
        assert_eq!(g["grads_f32"].as_f64().unwrap(), 4.0 * trainable);
        assert!(gib("grads_bf16_linear") < gib("grads_f32") && gib("grads_bf16_linear") > 0.5 * gib("grads_f32"));
        assert_eq!(g["reference"], g["weights"]);
        assert!(
            gib("activations_recompute") < gib("activations_kept")
                && gib("kv_cache") > 0.0
                && gib("logprob_scratch") > 0.0
        );
        // f32 on the CPU: twice the bytes.
        assert_eq!(p["cpu_f32"]["weights"].as_f64().unwrap(), 2.0 * g["weights"].as_f64().unwrap());
    }
}

#[test]
fn plan_agrees_with_grpo_memory_plan() {
    let dev = Device::Cpu;
    let l = load_model(&dev, None, 0).unwrap();
    let subject = Subject::new(Some("tiny"), None).unwrap();
    let sk = subject.skeleton().unwrap();
    let (seq, slots, len) = (300, 8, 222);
    let plan = Plan::new(&sk, PlanInput { seq, kv_slots: slots, kv_len: len });
    let n: usize = l.model.param_entries().iter().map(|(r, _)| r.numel()).sum();
    assert_eq!(plan.params, n);
    for rc in [false, true] {
        let kv = am3safety::rollout::engine::kv_bytes(&dev, &l.model, slots, len);
        let input = MemoryInput {
            trainable: n,
            reference: true,
            kv_cache: kv,
            batch_tokens: seq,
            recompute: rc,
            store: GradStore::F32,
        };
        let mp = MemoryPlan::new(&dev, &l.model, input);
        let c = &plan.cpu;
        assert_eq!(mp.weights, c.weights);
        assert_eq!(mp.optimizer, c.master + c.adamw);
        assert_eq!(mp.grads, c.grads_f32);
        assert_eq!(mp.reference, c.reference);
        assert_eq!(mp.kv_cache, c.kv_cache);
        assert_eq!(mp.activations, if rc { c.act_recompute } else { c.act_keep });
        assert_eq!(mp.logprob_scratch, c.logprob_scratch);
    }
}

#[test]
fn synthetic_7b_inputs_fit_the_templates() {
    // The 7B shapes ship no tokenizer: the synthetic one must satisfy both chat templates, the
    // SFT encoder (S = 4096 with images) and the rollout engine's prompt planning.
    let tmp = TempDir::new("bench-synth").unwrap();
    for (shape, images) in [("qwen2.5-vl-7b", 2usize), ("llava-next-7b", 1)] {
        let subject = Subject::new(Some(shape), None).unwrap();
        let model = subject.skeleton().unwrap();
        let tok = subject.tokenizer(&model).unwrap();
        let pp = subject.processor(&model).unwrap();
        let l = Loaded { model, tok, pp, src_dir: None };
        let ex = synth::example_of(&l, &tmp.0, 4096, &vec![(448, 448); images]).unwrap();
        assert_eq!(ex.len(), 4096);
        assert!(ex.n_targets() > 1000, "{shape}: {} targets", ex.n_targets());
        let data = synth::write_prompts(&tmp.0, 4, 3, 448).unwrap();
        let specs: Vec<DialogueSpec> =
            load_jsonl_with(&data, LoadOptions { skip_bad: false, purpose: Purpose::Prompts })
                .unwrap()
                .samples
                .iter()
                .map(DialogueSpec::from_sample)
                .collect();
        let (max_len, kv) = cache_plan(&Device::Cpu, &l.model, &l.tok, &l.pp, &specs, 64, 128).unwrap();
        assert!(max_len > 3 * 128 && kv > 0, "{shape}: {max_len} tokens per slot");
    }
    // LLaVA-NeXT's anyres makes two 448² images longer than 4096 tokens: a clear error.
    let subject = Subject::new(Some("llava-next-7b"), None).unwrap();
    let model = subject.skeleton().unwrap();
    let (tok, pp) = (subject.tokenizer(&model).unwrap(), subject.processor(&model).unwrap());
    let l = Loaded { model, tok, pp, src_dir: None };
    let e = synth::example_of(&l, &tmp.0, 4096, &[(448, 448), (448, 448)]).unwrap_err();
    assert!(format!("{e:#}").contains("cannot hold the images"), "{e:#}");
}

#[test]
fn llava_checkpoint_runs_every_suite() {
    let tmp = TempDir::new("bench-llava").unwrap();
    let dir = tmp.0.join("llava");
    std::fs::create_dir_all(&dir).unwrap();
    tiny_llava::write_tiny_dir(&dir, "mistral", 3);
    let f = tmp.0.join("llava.json");
    let t = Instant::now();
    am3(&["bench", "--model", dir.to_str().unwrap(), "--quick", "--json", f.to_str().unwrap()]);
    eprintln!("am3 bench --model (tiny LLaVA-NeXT): {:.1} s", t.elapsed().as_secs_f64());
    let v = read(&f);
    check_report(&v, dir.to_str().unwrap());
    // LLaVA's gradients and AdamW state leave out the CLIP layers past the feature layer.
    let ratio = v["plan_check"]["ratio"].as_f64().unwrap();
    assert!((ratio - 1.0).abs() <= 0.10, "{}", v["plan_check"]);
}

#[test]
fn kernel_suites_skip_without_a_gpu() {
    let (out, _) = am3(&["bench", "norms"]);
    assert!(out.contains("bench: skipped: no CUDA device"), "{out}");
    let o = Command::new(env!("CARGO_BIN_EXE_am3")).args(["bench", "--shape", "nope"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("tiny, qwen2.5-vl-7b, llava-next-7b"));
}

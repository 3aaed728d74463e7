//! `am3 demo` (the README's main job) on the CPU with fixed seeds: SFT, eval, GRPO with the
//! rules judge, eval again. GRPO lowers the attack success rate, does not raise the
//! over-refusal rate, and both tables are written.
use am3safety::stages::demo::{run, DemoArgs};
use am3safety::tensor::DevicePref;

#[test]
fn demo_grpo_lowers_asr_without_raising_over_refusal() {
    let out = std::env::temp_dir().join(format!("am3-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let t = std::time::Instant::now();
    let r =
        run(&DemoArgs { out: out.clone(), sft_steps: 100, grpo_steps: 30, device: DevicePref::Cpu, seed: 0 }).unwrap();
    let (b, a) = (&r.before, &r.after);
    let (asr0, asr1) = (b.asr.value.unwrap(), a.asr.value.unwrap());
    let (or0, or1) = (b.over_refusal.value.unwrap(), a.over_refusal.value.unwrap());
    println!(
        "demo in {:.0} s: ASR {:.1}% -> {:.1}%, over-refusal {:.1}% -> {:.1}%",
        t.elapsed().as_secs_f64(),
        100.0 * asr0,
        100.0 * asr1,
        100.0 * or0,
        100.0 * or1
    );
    assert!(asr1 < asr0, "ASR did not fall: {asr0} -> {asr1}");
    assert!(or1 <= or0, "over-refusal rose: {or0} -> {or1}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("demo.json")).unwrap()).unwrap();
    assert!(summary["before"]["asr"].is_object() && summary["after"]["asr"].is_object());
    assert!(out.join("grpo/metrics.jsonl").is_file() && out.join("sft/metrics.jsonl").is_file());
    std::fs::remove_dir_all(&out).ok();
}

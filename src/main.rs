//! `am3`: the command-line entry point. Subcommands:
//!   info    — which backend would run, the GPU and the embedded kernel modules
//!   bench   — kernel benchmarks (GB/s and TFLOP/s against the H200 ceilings)
//!   forward — logits, log-probs, objective and gradients of a model on an inputs file (Qwen2.5-VL, LLaVA-NeXT)
//!   generate — multi-turn generation with the rollout engine (a JSONL file or one prompt)
//!   eval    — answer, judge and measure a model's safety on dialogues (optionally against a baseline)
//!   data    — dataset tools (convert SafeMT to JSONL)
//!   sft     — cold-start refusal SFT
//!   demo    — the whole pipeline on the tiny default (sft → eval → grpo → eval; the main job)

use am3safety::cuda::kernels::{BUILD_ARCH, BUILT_WITH_NVCC, KERNEL_MODULES};
use am3safety::tensor::{Device, DevicePref};
use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "am3",
    version,
    about = "AM3Safety trainer for vision-language models (CUDA kernels, CPU reference backend)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show the backend that would run, the GPU, and the embedded kernels.
    Info {
        #[arg(long, value_enum, default_value = "auto")]
        device: DevicePref,
        /// Also list every kernel family: its launch struct, instances and parameters.
        #[arg(long)]
        kernels: bool,
    },
    /// Kernel benchmarks on the GPU; with --shape or --model the workload suites (train, vision,
    /// prefill, rollout, grpo) on any device; --plan prints the memory plan; --compare A B.
    Bench(am3safety::bench::cli::BenchArgs),
    /// One forward (and with --grads a backward) on an inputs file: logits, token log-probs,
    /// the masked objective, M-RoPE position ids (Qwen2.5-VL) and every parameter gradient.
    Forward(am3safety::stages::forward::ForwardArgs),
    /// Regenerate every assistant turn of a JSONL file's dialogues (or answer one --prompt) with
    /// the rollout engine; one JSON line per rollout.
    Generate(am3safety::stages::generate::GenerateArgs),
    /// Multi-turn GRPO with turn-aware safety/helpfulness rewards (AM3Safety stage 2). With no
    /// arguments: from the demo SFT checkpoint on the bundled prompts with the rules judge.
    Grpo(Box<am3safety::stages::grpo::GrpoArgs>),
    /// Answer a file's dialogues, judge the answers and report ASR, over-refusal, mean safety and
    /// helpfulness (per turn, per category; against --baseline: win rates).
    Eval(am3safety::stages::eval::EvalArgs),
    /// Dataset tools: `am3 data convert --format safemt --input F --out F.jsonl`.
    Data(am3safety::stages::data_cmd::DataArgs),
    /// The whole pipeline on the embedded tiny model and the bundled demo data: SFT, eval, GRPO
    /// with the rules judge, eval again, and a before/after table (the main job).
    Demo(am3safety::stages::demo::DemoArgs),
    /// Cold-start refusal SFT. With no arguments: the embedded tiny model on the bundled demo data.
    Sft(Box<am3safety::stages::sft::SftArgs>),
    /// Write the embedded tiny default as a complete Hugging Face checkpoint (weights, config,
    /// tokenizer with chat template, processor files).
    Export(am3safety::stages::export::ExportArgs),
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The row-op plans (rmsnorm/layernorm backward and forward, bias gradient) at one 7B model's
/// widths, for `am3 info`: bf16, 4096 rows, 16-byte aligned buffers.
fn row_plan_lines(model: &str) -> Vec<(String, String)> {
    use am3safety::ops::{elementwise, layernorm, rmsnorm};
    let (bf, rows) = (am3safety::tensor::DType::BF16, 4096);
    let rms = |what: &str, cols: usize| {
        (format!("rmsnorm bwd, {what} {cols} cols"), format!("{:?}", rmsnorm::plan_bwd(bf, rows, cols, true)))
    };
    let bias = |what: &str, cols: usize| {
        (format!("bias bwd, {what} {cols} cols"), format!("{:?}", elementwise::plan_bias_bwd(bf, cols, true)))
    };
    match model {
        // Qwen2.5-VL-7B: LM hidden 3584 (q/k/v biases 3584 and 512), vision tower RMSNorm at 1280,
        // its qkv bias 3840 and MLP biases 3420 / 1280.
        "Qwen2.5-VL-7B" => vec![
            rms("LM", 3584),
            rms("vision", 1280),
            bias("LM q", 3584),
            bias("LM k/v", 512),
            bias("vision qkv", 3840),
            bias("vision MLP up", 3420),
            bias("vision MLP down", 1280),
        ],
        // LLaVA-NeXT-7B: LM hidden 4096 (no biases), the CLIP tower's LayerNorm at 1024 with its
        // biases 1024 and MLP 4096, the projector's 4096.
        _ => vec![
            rms("LM", 4096),
            ("layernorm fwd, CLIP 1024 cols".to_string(), format!("{:?}", layernorm::plan_fwd(bf, rows, 1024, true))),
            ("layernorm bwd, CLIP 1024 cols".to_string(), format!("{:?}", layernorm::plan_bwd(bf, rows, 1024, true))),
            bias("CLIP q/k/v/out", 1024),
            bias("CLIP MLP up, projector", 4096),
        ],
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Export(args) => {
            println!("exported: {}", am3safety::stages::export::run(&args)?.display());
            Ok(())
        }
        Cmd::Info { device, kernels } => {
            let dev = Device::pick(device)?;
            println!("backend: {}", dev.name());
            if let Some(g) = dev.gpu() {
                let (free, total) = g.mem_info();
                println!(
                    "gpu: {} ({} SMs), {:.1} of {:.1} GiB free",
                    g.name,
                    g.sm_count,
                    free as f64 / 1073741824.0,
                    total as f64 / 1073741824.0
                );
            }
            let how = if BUILT_WITH_NVCC {
                format!("nvcc fatbins (sm_{BUILD_ARCH} + PTX)")
            } else {
                "sources for NVRTC".to_string()
            };
            println!("kernels: {} modules embedded as {how}", KERNEL_MODULES.len());
            for m in KERNEL_MODULES {
                let n = am3safety::cuda::api::KERNELS.iter().filter(|k| k.module.name() == m.name).count();
                println!("  {} ({n} kernels)", m.name);
            }
            if kernels {
                println!("kernel families (src/cuda/api.rs, generated from kernels/*.cu):");
                for line in am3safety::cuda::api::family_lines() {
                    println!("  {line}");
                }
            }
            // The kernel each op's plan takes at the 7B shapes (bf16, 16-byte aligned buffers).
            println!("kernel plans (bf16, 4096-token training sequences):");
            let models =
                [("Qwen2.5-VL-7B", (28, 4, 128), (16, 80), 64), ("LLaVA-NeXT-7B", (32, 8, 128), (16, 64), 577)];
            for (model, lm, vision, vis_len) in models {
                println!("  {model}");
                for (what, kernel) in am3safety::ops::attention::plan_lines(lm, 4096, vision, vis_len) {
                    println!("    attention {what}: {kernel}");
                }
                for (what, kernel) in row_plan_lines(model) {
                    println!("    {what}: {kernel}");
                }
            }
            let precision = am3safety::ops::logprob::Tuning::default().precision;
            println!("  log-prob / GRPO loss: {precision:?} logits");
            Ok(())
        }
        Cmd::Bench(args) => am3safety::bench::cli::run(&args),
        Cmd::Forward(args) => am3safety::stages::forward::run(&args),
        Cmd::Generate(args) => am3safety::stages::generate::run(&args),
        Cmd::Grpo(args) => {
            let ck = am3safety::stages::grpo::run(*args)?;
            println!("checkpoint: {}", ck.display());
            Ok(())
        }
        Cmd::Eval(args) => am3safety::stages::eval::run(&args).map(|_| ()),
        Cmd::Data(args) => am3safety::stages::data_cmd::run(&args),
        Cmd::Demo(args) => am3safety::stages::demo::run(&args).map(|_| ()),
        Cmd::Sft(args) => {
            let ck = am3safety::stages::sft::run(*args)?;
            println!("checkpoint: {}", ck.display());
            Ok(())
        }
    }
}

//! Kernel benchmarks (harness = false): every suite in `am3safety::bench::SUITES`, on the GPU.
//! Prints one table: median ms, GB/s and TFLOP/s against the H200 ceilings, error vs the CPU.
//! Arguments: `--quick` (smaller sizes), and suite names to run only those.

use am3safety::bench::{format_table, run_suites};
use am3safety::tensor::Device;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--") || a == "--quick").collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only: Vec<String> = args.into_iter().filter(|a| a != "--quick").collect();
    let Some(dev) = Device::cuda_if_present() else {
        println!("kernels bench: skipped: no CUDA device");
        return Ok(());
    };
    println!("device: {}", dev.name());
    let rows = run_suites(&dev, quick, &only)?;
    print!("{}", format_table(&rows));
    Ok(())
}

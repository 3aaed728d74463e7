//! Every embedded kernel module compiles with NVRTC, the path a build without nvcc takes at
//! start-up. Needs libnvrtc (tools/install-cuda-compiler.sh installs it; .ci/run puts it on
//! LD_LIBRARY_PATH), not a GPU.
use am3safety::cuda::kernels::{compile_nvrtc, nvrtc_present, KERNEL_MODULES};

#[test]
fn every_module_compiles_with_nvrtc() {
    if !nvrtc_present() {
        println!("every_module_compiles_with_nvrtc: skipped: libnvrtc not found");
        return;
    }
    let mut failed = Vec::new();
    for m in KERNEL_MODULES {
        let t = std::time::Instant::now();
        match compile_nvrtc(m, "sm_90") {
            Ok(_) => println!("nvrtc {}: ok in {:.0} ms", m.name, t.elapsed().as_secs_f64() * 1e3),
            Err(e) => {
                println!("nvrtc {}: {e:#}", m.name);
                failed.push(m.name);
            }
        }
    }
    assert!(failed.is_empty(), "NVRTC failed on {failed:?}");
}

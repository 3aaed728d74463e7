//! The build-time generator of the typed kernel API (kernels/api_gen.rs) on small sources: macro
//! instantiation as the kernel files use it, family names, parameter kinds and errors.
#[path = "../kernels/api_gen.rs"]
#[allow(dead_code)]
mod api_gen;

use api_gen::{parse_module, render, Kind};

const SRC: &str = r#"
#define AM3_BOTH_DTYPES(MACRO) MACRO(bf16, bf16) MACRO(float, f32)
// a comment with __global__ in it
#define ENTRY(T, S)                                                          \
    extern "C" __global__ void scale_##S(T* y, const T* __restrict__ x, long n, float s) { body(y, x, n, s); }
AM3_BOTH_DTYPES(ENTRY)
#define VPT_ENTRY(T, S, VPT, MINB)                                           \
    extern "C" __global__ void __launch_bounds__(256, MINB) norm_vec16_vpt##VPT##_##S(T* dx, int rows) {}
#define ALL_VPT(T, S) VPT_ENTRY(T, S, 1, 3) VPT_ENTRY(T, S, 4, 1)
AM3_BOTH_DTYPES(ALL_VPT)
#define HEAD(D) extern "C" __global__ void attn_bf16_d##D(const bf16* q, int T_, u64 seed) { f<D>(q); }
HEAD(64)
HEAD(128)
/* block comment: extern "C" __global__ void hidden(int x) */
extern "C" __global__ void reduce(float* out, const float* part, int n) { g(out, part, n); }
"#;

#[test]
fn expands_the_instantiating_macros() {
    let m = parse_module("toy", SRC).unwrap();
    let names: Vec<&str> = m.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "reduce",
            "scale_bf16",
            "scale_f32",
            "norm_vec16_vpt1_bf16",
            "norm_vec16_vpt4_bf16",
            "norm_vec16_vpt1_f32",
            "norm_vec16_vpt4_f32",
            "attn_bf16_d64",
            "attn_bf16_d128"
        ]
    );
    let bases: Vec<&str> = m.families.iter().map(|f| f.base.as_str()).collect();
    assert_eq!(bases, ["reduce", "scale", "norm_vec16", "attn_bf16"]);
    let norm = &m.families[2];
    assert_eq!(norm.selectors, ["VPT", "S"]);
    let k = m.kernels.iter().find(|k| k.name == "norm_vec16_vpt4_f32").unwrap();
    assert_eq!(k.values, ["4", "f32"]);
    let scale = m.kernels.iter().find(|k| k.name == "scale_f32").unwrap();
    let kinds: Vec<Kind> = scale.params.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, [Kind::Ptr, Kind::Ptr, Kind::I64, Kind::F32]);
    let attn = m.kernels.iter().find(|k| k.name == "attn_bf16_d64").unwrap();
    let fields: Vec<&str> = attn.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(fields, ["q", "t", "seed"], "snake-case field names, trailing '_' dropped");
    assert_eq!(attn.params[2].kind, Kind::U64);
}

#[test]
fn renders_one_struct_and_launcher_per_family() {
    let m = parse_module("toy", SRC).unwrap();
    let code = render(&[m]).unwrap();
    assert!(code.contains("pub struct NormVec16 {"));
    assert!(code.contains("pub fn launch(self, gpu: &Gpu, vpt: u32, dt: DType, cfg: LaunchConfig)"));
    assert!(code.contains("(4, DType::F32) => "));
    assert!(code.contains("pub fn launch(self, gpu: &Gpu, d: u32, cfg: LaunchConfig)"));
    assert!(code.contains("pub fn launch(self, gpu: &Gpu, cfg: LaunchConfig)"), "no selector for a plain kernel");
    assert_eq!(code.matches("KernelInfo {").count(), 9);
}

#[test]
fn families_with_the_same_parameters_convert() {
    let src = r#"
extern "C" __global__ void q64(float* out, int n) {}
extern "C" __global__ void q128(float* out, int n) {}
extern "C" __global__ void other(float* dst, int n) {}
"#;
    let code = render(&[parse_module("toy", src).unwrap()]).unwrap();
    assert!(code.contains("impl From<Q64> for Q128"), "{code}");
    assert!(code.contains("impl From<Q128> for Q64"));
    assert!(!code.contains("for Other"), "different parameter names: no conversion");
}

#[test]
fn rejects_what_the_launcher_cannot_pass() {
    let e = parse_module("toy", r#"extern "C" __global__ void k(double x) {}"#).unwrap_err();
    assert!(e.contains("k: parameter x has type \"double\""), "{e}");
    let e = parse_module("toy", "int main() {}").unwrap_err();
    assert!(e.contains("no extern"), "{e}");
    let dup = r#"
#define E(S) extern "C" __global__ void k_##S(int n) {}
E(a)
E(a)
"#;
    assert!(parse_module("toy", dup).unwrap_err().contains("declared twice"));
    let diff = r#"
#define E(T, S) extern "C" __global__ void k_##S(T n) {}
E(int, a)
E(float, b)
"#;
    assert!(parse_module("toy", diff).unwrap_err().contains("differ"));
}

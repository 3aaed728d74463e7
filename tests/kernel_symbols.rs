//! The generated kernel table (`cuda::api::KERNELS`, from the kernels' declarations) against the
//! PTX and the launchers, with no GPU: every module is compiled to PTX with NVRTC (skipped, with
//! a printed line, when libnvrtc is absent), and its `.entry` list must be exactly the table's
//! kernels of that module, parameter for parameter. The launchers are typed (one argument struct
//! per family), so a launch with a wrong count or kind does not compile; a source scan checks
//! that every family is launched somewhere in src/, so no kernel is dead code.
use am3safety::cuda::api::{Kind, Module, KERNELS};
use am3safety::cuda::kernels::{compile_nvrtc, nvrtc_present, KERNEL_MODULES};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A PTX parameter: 64-bit (pointers and 64-bit integers), 32-bit integer, or f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ptx {
    B64,
    B32,
    F32,
}

fn ptx_kind(k: Kind) -> Ptx {
    match k {
        Kind::Ptr | Kind::I64 | Kind::U64 => Ptx::B64,
        Kind::I32 | Kind::U32 => Ptx::B32,
        Kind::F32 => Ptx::F32,
    }
}

/// `.entry NAME(.param .u64 a, .param .u32 b, ...)` of a PTX text.
fn entries(ptx: &str) -> BTreeMap<String, Vec<Ptx>> {
    let mut out = BTreeMap::new();
    let mut rest = ptx;
    while let Some(i) = rest.find(".entry ") {
        rest = &rest[i + 7..];
        let open = rest.find('(').expect("'(' after .entry");
        let close = rest.find(')').expect("')' after .entry");
        let name = rest[..open].trim().to_string();
        let params = rest[open + 1..close]
            .split(".param")
            .skip(1)
            .map(|p| match p.split_whitespace().next().unwrap_or("") {
                ".u64" | ".s64" | ".b64" => Ptx::B64,
                ".u32" | ".s32" | ".b32" => Ptx::B32,
                ".f32" => Ptx::F32,
                other => panic!("{name}: parameter type {other} is not one the launcher can pass"),
            })
            .collect();
        out.insert(name, params);
        rest = &rest[close..];
    }
    out
}

#[test]
fn generated_table_matches_the_ptx() {
    let mods: BTreeSet<&str> = Module::ALL.iter().map(|m| m.name()).collect();
    let files: BTreeSet<&str> = KERNEL_MODULES.iter().map(|m| m.name).collect();
    assert_eq!(mods, files, "the Module enum and the embedded modules differ");
    if !nvrtc_present() {
        println!("generated_table_matches_the_ptx: skipped: libnvrtc not found");
        return;
    }
    let mut errors = Vec::new();
    for m in KERNEL_MODULES {
        let ptx = compile_nvrtc(m, "sm_90").unwrap_or_else(|e| panic!("{e:#}")).to_src();
        let found = entries(&ptx);
        let table: BTreeMap<&str, Vec<Ptx>> = KERNELS
            .iter()
            .filter(|k| k.module.name() == m.name)
            .map(|k| (k.name, k.params.iter().map(|p| ptx_kind(p.1)).collect()))
            .collect();
        for (name, params) in &found {
            match table.get(name.as_str()) {
                None => errors.push(format!("{}::{name} is in the PTX but not in the generated table", m.name)),
                Some(t) if t != params => {
                    errors.push(format!("{}::{name}: PTX takes {params:?}, the table says {t:?}", m.name))
                }
                Some(_) => {}
            }
        }
        for name in table.keys().filter(|n| !found.contains_key(**n)) {
            errors.push(format!("{}::{name} is in the generated table but not in the PTX", m.name));
        }
    }
    assert!(errors.is_empty(), "{} errors:\n{}", errors.len(), errors.join("\n"));
    println!("generated_table_matches_the_ptx: {} modules, {} kernels", KERNEL_MODULES.len(), KERNELS.len());
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every kernel family's argument struct is built somewhere in src/, as a literal or converted
/// from a family with the same parameters (the only ways to launch it).
#[test]
fn every_kernel_family_is_launched() {
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    let text: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    let families: BTreeSet<(&str, &str)> = KERNELS.iter().map(|k| (k.module.name(), k.family)).collect();
    let dead: Vec<String> = families
        .iter()
        .filter(|(_, f)| !text.contains(&format!("{f} {{")) && !text.contains(&format!("{f}::from(")))
        .map(|(m, f)| format!("{m}::{f}"))
        .collect();
    assert!(dead.is_empty(), "kernel families that src/ never launches: {dead:?}");
    println!("every_kernel_family_is_launched: {} families", families.len());
}

/// Kernel names are unique per module, and every instance of a family has its parameters.
#[test]
fn table_is_consistent() {
    let mut seen = BTreeSet::new();
    for k in KERNELS {
        assert!(seen.insert((k.module.name(), k.name)), "{}::{} twice", k.module.name(), k.name);
        let first = KERNELS.iter().find(|x| x.module == k.module && x.family == k.family).unwrap();
        assert_eq!(first.params, k.params, "{} and {} differ in parameters", first.name, k.name);
    }
}

/// `a_{x,y}_d{1,2}` → a_x_d1, a_x_d2, a_y_d1, a_y_d2.
fn expand(pat: &str) -> Vec<String> {
    let Some(open) = pat.find('{') else { return vec![pat.to_string()] };
    let close = open + pat[open..].find('}').expect("unclosed '{'");
    let rest = expand(&pat[close + 1..]);
    pat[open + 1..close]
        .split(',')
        .flat_map(|alt| rest.iter().map(move |r| format!("{}{alt}{r}", &pat[..open])))
        .collect()
}

/// kernels/README.md has one row per kernel family: its symbols (with `{a,b}` groups) and its
/// .cu file are exactly the generated table's, so the table cannot go stale.
#[test]
fn readme_table_lists_every_kernel() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/README.md")).unwrap();
    let mut listed = BTreeSet::new();
    for row in text.lines().filter(|l| l.starts_with("| `")) {
        let cols: Vec<&str> = row.split(" | ").collect();
        let module = cols[1].trim().trim_end_matches(".cu");
        for sym in cols[0].trim_start_matches("| ").split(", ") {
            for name in expand(sym.trim_matches('`')) {
                assert!(listed.insert((module.to_string(), name.clone())), "kernels/README.md lists {name} twice");
            }
        }
    }
    let table: BTreeSet<(String, String)> =
        KERNELS.iter().map(|k| (k.module.name().to_string(), k.name.to_string())).collect();
    let stale: Vec<_> = listed.difference(&table).collect();
    let missing: Vec<_> = table.difference(&listed).collect();
    assert!(
        stale.is_empty() && missing.is_empty(),
        "README rows with no kernel: {stale:?}; kernels with no row: {missing:?}"
    );
}

/// `am3 info --kernels` prints one line per family, each naming its launch struct.
#[test]
fn info_lists_one_line_per_family() {
    let lines = am3safety::cuda::api::family_lines();
    let families: BTreeSet<(&str, &str)> = KERNELS.iter().map(|k| (k.module.name(), k.family)).collect();
    assert_eq!(lines.len(), families.len());
    for (m, f) in &families {
        assert_eq!(lines.iter().filter(|l| l.starts_with(&format!("{m}::{f} ["))).count(), 1, "{m}::{f}");
    }
}

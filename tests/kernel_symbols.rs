//! The kernel signature table (src/cuda/sigs.rs) against the kernels and the launch sites, with
//! no GPU: every module is compiled to PTX with NVRTC (skipped, with a printed line, when libnvrtc
//! is absent), and every `.entry` with its `.param` list must be exactly one table entry; the
//! launch path checks each launch's `Arg` list against the same table. A source scan of src/
//! then checks that every launch names a module that exists and, where the kernel name is
//! written out (a literal, `kname("..", dt)` or a `format!` pattern), a kernel in the table, and
//! where the argument list is written out too, the parameter kinds of its table entry.
use am3safety::cuda::kernels::{compile_nvrtc, nvrtc_present, KERNEL_MODULES};
use am3safety::cuda::sigs::{find, Param, KERNELS};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `.entry NAME(.param .u64 a, .param .u32 b, ...)` of a PTX text.
fn entries(ptx: &str) -> BTreeMap<String, Vec<Param>> {
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
            .map(|p| {
                let ty = p.split_whitespace().next().unwrap_or("");
                match ty {
                    ".u64" | ".s64" | ".b64" => Param::U64,
                    ".u32" | ".s32" | ".b32" => Param::I32,
                    ".f32" => Param::F32,
                    other => panic!("{name}: parameter type {other} is not one the launcher can pass"),
                }
            })
            .collect();
        out.insert(name, params);
        rest = &rest[close..];
    }
    out
}

#[test]
fn signatures_match_the_ptx() {
    if !nvrtc_present() {
        println!("signatures_match_the_ptx: skipped: libnvrtc not found");
        return;
    }
    let mut errors = Vec::new();
    for m in KERNEL_MODULES {
        let ptx = compile_nvrtc(m, "sm_90").unwrap_or_else(|e| panic!("{e:#}")).to_src();
        let found = entries(&ptx);
        assert!(!found.is_empty(), "module {} has no .entry", m.name);
        for (name, params) in &found {
            match find(m.name, name) {
                None => errors.push(format!("{}::{name} {params:?} is not in src/cuda/sigs.rs", m.name)),
                Some(k) if k.params != params.as_slice() => {
                    errors.push(format!("{}::{name}: PTX takes {params:?}, the table says {:?}", m.name, k.params))
                }
                Some(_) => {}
            }
        }
        for k in KERNELS.iter().filter(|k| k.module == m.name) {
            for n in k.names() {
                if !found.contains_key(&n) {
                    errors.push(format!("table entry {}::{n} has no kernel in the module", m.name));
                }
            }
        }
    }
    let modules: BTreeSet<&str> = KERNEL_MODULES.iter().map(|m| m.name).collect();
    for k in KERNELS {
        if !modules.contains(k.module) {
            errors.push(format!("table entry {}::{}: no module {}", k.module, k.name, k.module));
        }
    }
    assert!(errors.is_empty(), "{} signature errors:\n{}", errors.len(), errors.join("\n"));
    println!("signatures_match_the_ptx: {} modules, {} table entries", KERNEL_MODULES.len(), KERNELS.len());
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

/// The string literal at the start of `s` (after `"`), up to the closing quote.
fn literal(s: &str) -> Option<&str> {
    let s = s.strip_prefix('"')?;
    Some(&s[..s.find('"')?])
}

/// Does a table kernel name match a `format!` pattern (each `{..}` standing for any text)?
fn matches_format(fmt: &str, name: &str) -> bool {
    let parts: Vec<&str> = fmt.split('{').map(|p| p.split_once('}').map_or(p, |(_, r)| r)).collect();
    let mut rest = name;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(p) else { return false };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else {
            let Some(j) = rest.find(p) else { return false };
            rest = &rest[j + p.len()..];
        }
    }
    rest.is_empty()
}

#[test]
fn every_launch_site_names_a_known_kernel() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let modules: BTreeSet<&str> = KERNEL_MODULES.iter().map(|m| m.name).collect();
    let names: Vec<(String, String)> =
        KERNELS.iter().flat_map(|k| k.names().into_iter().map(|n| (k.module.to_string(), n))).collect();
    let (mut checked, mut by_variable, mut errors) = (0, Vec::new(), Vec::new());
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let rel = f.strip_prefix(root).unwrap().display().to_string();
        for (i, _) in text.match_indices(".launch(") {
            let call: String = text[i + 8..].chars().take(400).collect();
            let call = call.trim_start();
            let Some(module) = literal(call) else { continue }; // `launch(module, ..)` passed through
            if !modules.contains(module) {
                errors.push(format!("{rel}: launch of module {module:?}, which does not exist"));
                continue;
            }
            let after = call[module.len() + 2..].trim_start().trim_start_matches(',').trim_start();
            let after = after.trim_start_matches('&');
            let ok = if let Some(lit) = literal(after) {
                Some(names.iter().any(|(m, n)| m == module && n == lit))
            } else if let Some(r) = after.strip_prefix("kname(") {
                // `kname("stem", dt)`, or `kname(op, dt)` with the nearest `let op = "stem";` above.
                let stem = literal(r.trim_start()).or_else(|| {
                    r.trim_start().strip_prefix("op,")?;
                    let j = text[..i].rfind("let op = \"")?;
                    literal(&text[j + 9..])
                });
                stem.map(|stem| {
                    ["bf16", "f32"]
                        .iter()
                        .all(|dt| names.iter().any(|(m, n)| m == module && *n == format!("{stem}_{dt}")))
                })
            } else if let Some(r) = after.strip_prefix("format!(") {
                literal(r.trim_start()).map(|fmt| names.iter().any(|(m, n)| m == module && matches_format(fmt, n)))
            } else {
                None
            };
            let line = text[..i].lines().count();
            match ok {
                Some(true) => checked += 1,
                Some(false) => errors.push(format!(
                    "{rel}:{line}: {module}::{} is not in the table",
                    &after[..after.find(',').unwrap_or(after.len()).min(60)]
                )),
                None => by_variable.push(format!("{rel}:{line}")),
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    println!("every_launch_site_names_a_known_kernel: {checked} launch sites checked by name; {} name their kernel through a variable (checked at launch time only): {}", by_variable.len(), by_variable.join(", "));
    assert!(checked > 30, "the scan found only {checked} launch sites");
}

/// The text of a call's argument list after its opening parenthesis, split at top-level commas.
fn call_args(s: &str) -> Option<Vec<&str>> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    let mut in_str = false;
    for (j, c) in s.char_indices() {
        match c {
            '"' => in_str = !in_str,
            _ if in_str => {}
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' if depth == 0 => {
                out.push(s[start..j].trim());
                return Some(out);
            }
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..j].trim());
                start = j + 1;
            }
            _ => {}
        }
    }
    None
}

/// The kinds of an `[Arg::Ptr(..), Arg::I32(..), ..]` list (the text after its `[`); None when
/// an element is not an `Arg::` constructor (a list built some other way).
fn arg_kinds(list: &str) -> Option<Vec<Param>> {
    let elems = call_args(list)?;
    elems
        .iter()
        .filter(|e| !e.is_empty())
        .map(|e| {
            let e = e.trim_start_matches("crate::cuda::");
            // `i64_arg` / `i32_arg` (ops::elementwise) build an Arg::I64 / Arg::I32.
            Some(match e.split('(').next()? {
                "Arg::Ptr" | "Arg::I64" | "i64_arg" => Param::U64,
                "Arg::I32" | "i32_arg" => Param::I32,
                "Arg::F32" => Param::F32,
                _ => return None,
            })
        })
        .collect()
}

/// Every launch whose kernel name and argument list are written out (`&[Arg::..]` inline, or the
/// nearest `let args = [..]` above) passes the parameter kinds of its table entry, so that no
/// launch trips the launch-time check on the GPU.
#[test]
fn every_launch_site_passes_the_table_arguments() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let (mut checked, mut unchecked, mut errors) = (0, Vec::new(), Vec::new());
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let rel = f.strip_prefix(root).unwrap().display().to_string();
        for (i, _) in text.match_indices(".launch(") {
            let line = text[..i].lines().count();
            let Some(args) = call_args(&text[i + 8..]) else { continue };
            let (Some(module), Some(name_expr), Some(list)) = (literal(args[0]), args.get(1), args.get(3)) else {
                continue; // `launch(module, ..)` passed through a wrapper
            };
            let name_expr = name_expr.trim_start_matches('&');
            // The kernel names the expression may stand for.
            let names: Vec<String> = if let Some(lit) = literal(name_expr) {
                vec![lit.to_string()]
            } else if let Some(r) = name_expr.strip_prefix("kname(") {
                let stem = literal(r.trim_start()).or_else(|| {
                    r.trim_start().strip_prefix("op,")?;
                    let j = text[..i].rfind("let op = \"")?;
                    literal(&text[j + 9..])
                });
                stem.map(|s| ["bf16", "f32"].iter().map(|dt| format!("{s}_{dt}")).collect()).unwrap_or_default()
            } else if let Some(r) = name_expr.strip_prefix("format!(") {
                literal(r.trim_start())
                    .map(|fmt| {
                        KERNELS
                            .iter()
                            .filter(|k| k.module == module)
                            .flat_map(|k| k.names())
                            .filter(|n| matches_format(fmt, n))
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            let list = list.trim_start_matches('&');
            let kinds = if let Some(inner) = list.strip_prefix('[') {
                arg_kinds(inner)
            } else if list.chars().all(|c| c.is_alphanumeric() || c == '_') {
                // The nearest binding of the name; a list built by pushes or extends is skipped.
                let before = &text[..i];
                let at = [format!("let {list} ="), format!("let mut {list} =")]
                    .iter()
                    .filter_map(|p| before.rfind(p.as_str()).map(|j| (j, j + p.len())))
                    .max();
                at.and_then(|(j, end)| {
                    let mutable = before[j..].starts_with("let mut");
                    let rest = before[end..].trim_start();
                    rest.strip_prefix('[').filter(|_| !mutable).and_then(arg_kinds)
                })
            } else {
                None
            };
            let (Some(kinds), false) = (kinds, names.is_empty()) else {
                unchecked.push(format!("{rel}:{line}"));
                continue;
            };
            for n in &names {
                match find(module, n) {
                    Some(k) if k.params == kinds.as_slice() => {}
                    Some(k) => errors.push(format!(
                        "{rel}:{line}: {module}::{n} gets {} arguments {kinds:?}; the table says {:?}",
                        kinds.len(),
                        k.params
                    )),
                    None => errors.push(format!("{rel}:{line}: {module}::{n} is not in the table")),
                }
            }
            checked += 1;
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    println!(
        "every_launch_site_passes_the_table_arguments: {checked} launch sites' argument lists checked; {} left to the launch-time check: {}",
        unchecked.len(),
        unchecked.join(", ")
    );
    assert!(checked > 35, "the scan checked only {checked} argument lists");
}

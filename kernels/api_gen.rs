//! Build-time generator of the typed kernel API: reads every `extern "C" __global__` declaration
//! of a kernel module (after a small expansion of the function-like macros that instantiate
//! them), and writes one argument struct per kernel family, whose `launch` method picks the
//! instance from the family's name parameters (dtype, head dim, ...) and passes the fields in the
//! kernel's order. A kernel's signature is so stated once, in its .cu file.
//! build.rs uses it; tests/kernel_api_gen.rs tests it on small sources.

use std::collections::BTreeMap;

/// A parameter as the launcher passes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ptr,
    I32,
    U32,
    I64,
    U64,
    F32,
}

impl Kind {
    fn rust(self) -> &'static str {
        match self {
            Kind::Ptr | Kind::U64 => "u64",
            Kind::I32 => "i32",
            Kind::U32 => "u32",
            Kind::I64 => "i64",
            Kind::F32 => "f32",
        }
    }
    fn variant(self) -> &'static str {
        match self {
            Kind::Ptr => "Ptr",
            Kind::I32 => "I32",
            Kind::U32 => "U32",
            Kind::I64 => "I64",
            Kind::U64 => "U64",
            Kind::F32 => "F32",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub kind: Kind,
}

/// One kernel symbol.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub name: String,
    pub params: Vec<Param>,
    pub family: usize,
    /// The values of the family's selectors for this instance.
    pub values: Vec<String>,
}

/// The instances of one declaration: a macro body's `extern "C"` declaration, or a plain one.
#[derive(Clone, Debug)]
pub struct Family {
    /// The declared name, e.g. `swiglu_fwd_##S`.
    pub template: String,
    /// The name without its parameters, e.g. `swiglu_fwd`; names the struct.
    pub base: String,
    /// The macro parameters that the name holds, in order.
    pub selectors: Vec<String>,
}

#[derive(Debug, Default)]
pub struct ModuleApi {
    pub name: String,
    pub families: Vec<Family>,
    pub kernels: Vec<Kernel>,
}

struct Macro {
    params: Vec<String>,
    body: String,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}
fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Removes `//` and `/* */` comments, keeping string literals and newlines.
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            let start = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
            out.extend_from_slice(&b[start..i]);
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                if b[i] == b'\n' {
                    out.push(b'\n');
                }
                i += 1;
            }
            i = (i + 2).min(b.len());
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The text between the `(` at `open` and its matching `)`, and the index after the `)`.
fn balanced(s: &str, open: usize) -> Result<(&str, usize), String> {
    let b = s.as_bytes();
    let mut depth = 0;
    for (i, &c) in b.iter().enumerate().skip(open) {
        match c {
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Ok((&s[open + 1..i], i + 1));
                }
            }
            _ => {}
        }
    }
    Err(format!("unbalanced '(' in {:?}", &s[open..s.len().min(open + 60)]))
}

/// Splits at the commas outside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut cur) = (0, String::new());
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() || !out.is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// Replaces every identifier of `params` in `text` by its argument, then pastes `##`.
fn substitute(text: &str, params: &[String], args: &[String]) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if is_ident_start(b[i]) && (i == 0 || !is_ident(b[i - 1])) {
            let s = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let id = &text[s..i];
            match params.iter().position(|p| p == id) {
                Some(k) => out.push_str(&args[k]),
                None => out.push_str(id),
            }
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    paste(&out)
}

fn paste(s: &str) -> String {
    let mut out = s.to_string();
    while let Some(i) = out.find("##") {
        let left = out[..i].trim_end().to_string();
        let right = out[i + 2..].trim_start().to_string();
        out = left + &right;
    }
    out
}

/// One `extern "C" __global__ void NAME(PARAMS)` found in `text`: (name, params text).
fn declarations(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(k) = text[from..].find("__global__") {
        let mut i = from + k + "__global__".len();
        let rest = text[i..].trim_start();
        i = text.len() - rest.len();
        let Some(r) = text[i..].strip_prefix("void") else {
            return Err(format!("a __global__ that is not `void` near {:?}", &text[i..text.len().min(i + 40)]));
        };
        i = text.len() - r.len();
        let r = text[i..].trim_start();
        i = text.len() - r.len();
        if text[i..].starts_with("__launch_bounds__") {
            let open = i + text[i..].find('(').ok_or("__launch_bounds__ without '('")?;
            i = balanced(text, open)?.1;
        }
        let open = i + text[i..].find('(').ok_or("a kernel name without '('")?;
        let name: String = text[i..open].split_whitespace().collect();
        let (params, end) = balanced(text, open)?;
        out.push((name, params.to_string()));
        from = end;
    }
    Ok(out)
}

fn parse_param(kernel: &str, p: &str) -> Result<Param, String> {
    let spaced = p.replace('*', " * ");
    let toks: Vec<&str> = spaced
        .split_whitespace()
        .filter(|t| !matches!(*t, "const" | "__restrict__" | "volatile" | "restrict"))
        .collect();
    let (Some(&name), Some(&ty)) = (toks.last(), toks.first()) else {
        return Err(format!("{kernel}: cannot read the parameter {p:?}"));
    };
    let kind = if toks.contains(&"*") {
        Kind::Ptr
    } else {
        match toks[..toks.len() - 1].join(" ").as_str() {
            "int" => Kind::I32,
            "u32" | "unsigned" | "unsigned int" => Kind::U32,
            "long" | "long long" | "i64" => Kind::I64,
            "u64" | "unsigned long long" => Kind::U64,
            "float" => Kind::F32,
            other => {
                return Err(format!(
                    "{kernel}: parameter {name} has type {other:?}, which the launcher cannot pass ({ty})"
                ))
            }
        }
    };
    Ok(Param { name: field_name(name), kind })
}

/// A parameter name as a Rust field: snake case, no trailing `_`, raw when a keyword.
fn field_name(n: &str) -> String {
    let mut s = n.to_ascii_lowercase();
    while s.ends_with('_') && s.len() > 1 {
        s.pop();
    }
    match s.as_str() {
        "type" | "ref" | "mod" | "in" | "loop" | "match" | "move" | "use" | "fn" | "impl" | "self" | "box" => {
            format!("r#{s}")
        }
        _ => s,
    }
}

/// The family name of a template: `swiglu_fwd_##S` → `swiglu_fwd`, `x_bf16_d##D` → `x_bf16`,
/// `ln_fwd_vec16_vpt##VPT##_##S` → `ln_fwd_vec16` (a lower-case tag glued to a parameter goes
/// with it).
fn base_name(template: &str, params: &[String]) -> (String, Vec<String>) {
    let mut pieces: Vec<String> = Vec::new();
    let mut selectors = Vec::new();
    for part in template.split("##") {
        if params.iter().any(|p| p == part) {
            selectors.push(part.to_string());
            if let Some(last) = pieces.last_mut() {
                let tag = last.len() - last.trim_end_matches(|c: char| c.is_ascii_lowercase()).len();
                if tag < last.len() && last[..last.len() - tag].ends_with('_') {
                    last.truncate(last.len() - tag);
                }
            }
        } else {
            pieces.push(part.to_string());
        }
    }
    let mut base = pieces.concat();
    while base.contains("__") {
        base = base.replace("__", "_");
    }
    (base.trim_matches('_').to_string(), selectors)
}

/// Parses one module's (header-inlined) source.
pub fn parse_module(name: &str, src: &str) -> Result<ModuleApi, String> {
    let text = strip_comments(src).replace("\\\r\n", " ").replace("\\\n", " ");
    let mut macros: BTreeMap<String, Macro> = BTreeMap::new();
    let mut top = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(d) = t.strip_prefix("#define") {
            let d = d.trim_start();
            let n = d.bytes().take_while(|&c| is_ident(c)).count();
            if d[n..].starts_with('(') {
                let (ps, end) = balanced(d, n)?;
                let params = split_top(ps);
                macros.insert(d[..n].to_string(), Macro { params, body: d[end..].to_string() });
            }
        } else if !t.starts_with('#') {
            top.push_str(line);
            top.push('\n');
        }
    }
    let mut api = ModuleApi { name: name.to_string(), ..Default::default() };
    let mut fams: BTreeMap<String, usize> = BTreeMap::new();
    for (kname, params) in declarations(&top)? {
        add(&mut api, &mut fams, &kname, &kname, &[], &[], &params)?;
    }
    expand(&mut api, &mut fams, &macros, &top, 0)?;
    if api.kernels.is_empty() {
        return Err(format!("module {name}: no extern \"C\" __global__ kernel found"));
    }
    Ok(api)
}

fn add(
    api: &mut ModuleApi, fams: &mut BTreeMap<String, usize>, key: &str, template: &str, mparams: &[String],
    margs: &[String], params_text: &str,
) -> Result<(), String> {
    let kname = substitute(template, mparams, margs);
    let params_text = substitute(params_text, mparams, margs);
    let params = split_top(&params_text)
        .iter()
        .filter(|p| !p.is_empty() && p.as_str() != "void")
        .map(|p| parse_param(&kname, p))
        .collect::<Result<Vec<_>, _>>()?;
    let (base, selectors) = base_name(template, mparams);
    let family = match fams.get(key) {
        Some(&f) => f,
        None => {
            if api.families.iter().any(|f| f.base == base) {
                return Err(format!("module {}: two kernel families named {base}", api.name));
            }
            api.families.push(Family { template: template.to_string(), base, selectors: selectors.clone() });
            fams.insert(key.to_string(), api.families.len() - 1);
            api.families.len() - 1
        }
    };
    if api.kernels.iter().any(|k| k.name == kname) {
        return Err(format!("module {}: kernel {kname} declared twice", api.name));
    }
    if let Some(first) = api.kernels.iter().find(|k| k.family == family) {
        if first.params != params {
            return Err(format!("{kname}: its parameters differ from those of {}", first.name));
        }
    }
    let values =
        selectors.iter().map(|s| margs[mparams.iter().position(|p| p == s).unwrap()].clone()).collect::<Vec<_>>();
    api.kernels.push(Kernel { name: kname, params, family, values });
    Ok(())
}

/// Expands the invocations of function-like macros in `text`, recording the kernels that each
/// expanded body declares.
fn expand(
    api: &mut ModuleApi, fams: &mut BTreeMap<String, usize>, macros: &BTreeMap<String, Macro>, text: &str, depth: usize,
) -> Result<(), String> {
    if depth > 16 {
        return Err(format!("module {}: macro expansion nested too deep", api.name));
    }
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if !(is_ident_start(b[i]) && (i == 0 || !is_ident(b[i - 1]))) {
            i += 1;
            continue;
        }
        let s = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        let Some(m) = macros.get(&text[s..i]).filter(|m| m.params.last().is_none_or(|p| p != "...")) else {
            continue;
        };
        let after = text[i..].trim_start();
        if !after.starts_with('(') {
            continue;
        }
        let open = text.len() - after.len();
        let (args, end) = balanced(text, open)?;
        let args = split_top(args);
        if args.len() != m.params.len() {
            return Err(format!("macro {} takes {} arguments, given {}", &text[s..i], m.params.len(), args.len()));
        }
        for (template, params) in declarations(&m.body)? {
            let key = format!("{}::{template}", &text[s..i]);
            add(api, fams, &key, &template, &m.params, &args, &params)?;
        }
        let body = substitute(&m.body, &m.params, &args);
        expand(api, fams, macros, &body, depth + 1)?;
        i = end;
    }
    Ok(())
}

/// `ln_fwd_vpt##VPT##_##S` → `ln_fwd_vpt{VPT}_{S}`.
fn shown(template: &str, selectors: &[String]) -> String {
    template
        .split("##")
        .map(|p| if selectors.iter().any(|s| s == p) { format!("{{{p}}}") } else { p.to_string() })
        .collect()
}

fn camel(s: &str) -> String {
    s.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect()
}

/// A selector as a Rust parameter: the dtype suffix `S` is a `DType`, numbers are `u32`.
fn selector_arg(fam: &Family, kernels: &[&Kernel], k: usize) -> (String, bool) {
    let dtype = kernels.iter().all(|x| matches!(x.values[k].as_str(), "bf16" | "f32" | "i32"));
    let name = if dtype { "dt".to_string() } else { field_name(&fam.selectors[k]) };
    (name, dtype)
}

fn dtype_pattern(v: &str) -> &'static str {
    match v {
        "bf16" => "DType::BF16",
        "f32" => "DType::F32",
        _ => "DType::I32",
    }
}

/// The generated Rust source for all modules.
pub fn render(modules: &[ModuleApi]) -> Result<String, String> {
    let mut o = String::from("// Generated by build.rs (kernels/api_gen.rs) from kernels/*.cu. Do not edit.\n\n");
    o.push_str("/// The kernel modules, one per kernels/*.cu.\n");
    o.push_str("#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]\npub enum Module {\n");
    for m in modules {
        o.push_str(&format!("    {},\n", camel(&m.name)));
    }
    o.push_str("}\n\nimpl Module {\n    pub const ALL: &'static [Module] = &[");
    o.push_str(&modules.iter().map(|m| format!("Module::{}", camel(&m.name))).collect::<Vec<_>>().join(", "));
    o.push_str(
        "];\n    /// The file stem in kernels/.\n    pub fn name(self) -> &'static str {\n        match self {\n",
    );
    for m in modules {
        o.push_str(&format!("            Module::{} => {:?},\n", camel(&m.name), m.name));
    }
    o.push_str("        }\n    }\n}\n\n/// Every kernel symbol, indexed by the ids that the launchers below use.\n");
    o.push_str("pub static KERNELS: &[KernelInfo] = &[\n");
    let mut ids: Vec<Vec<usize>> = Vec::new();
    let mut next = 0;
    for m in modules {
        let mut v = Vec::new();
        for k in &m.kernels {
            let ps: Vec<String> = k
                .params
                .iter()
                .map(|p| format!("({:?}, Kind::{})", p.name.trim_start_matches("r#"), p.kind.variant()))
                .collect();
            let fam = &m.families[k.family];
            o.push_str(&format!(
                "    KernelInfo {{ module: Module::{}, name: {:?}, family: {:?}, params: &[{}] }},\n",
                camel(&m.name),
                k.name,
                camel(&fam.base),
                ps.join(", ")
            ));
            v.push(next);
            next += 1;
        }
        ids.push(v);
    }
    o.push_str("];\n");
    for (mi, m) in modules.iter().enumerate() {
        o.push_str(&format!("\n/// kernels/{}.cu\npub mod {} {{\n    use super::*;\n", m.name, m.name));
        for (fi, fam) in m.families.iter().enumerate() {
            let inst: Vec<(usize, &Kernel)> =
                m.kernels.iter().enumerate().filter(|(_, k)| k.family == fi).map(|(i, k)| (ids[mi][i], k)).collect();
            let ks: Vec<&Kernel> = inst.iter().map(|(_, k)| *k).collect();
            let names: Vec<&str> = ks.iter().map(|k| k.name.as_str()).collect();
            let sname = camel(&fam.base);
            o.push_str(&format!(
                "\n    /// The arguments of `{}` ({}).\n",
                shown(&fam.template, &fam.selectors),
                names.join(", ")
            ));
            o.push_str(&format!("    #[derive(Clone, Copy, Debug)]\n    pub struct {sname} {{\n"));
            for p in &ks[0].params {
                o.push_str(&format!("        pub {}: {},\n", p.name, p.kind.rust()));
            }
            o.push_str("    }\n\n");
            o.push_str(&format!("    impl {sname} {{\n"));
            let sels: Vec<(String, bool)> = (0..fam.selectors.len()).map(|k| selector_arg(fam, &ks, k)).collect();
            let sel_params: String =
                sels.iter().map(|(n, dt)| format!(", {n}: {}", if *dt { "DType" } else { "u32" })).collect();
            o.push_str(&format!(
                "        /// Launches the instance that the arguments name.\n        pub fn launch(self, gpu: &Gpu{sel_params}, cfg: LaunchConfig) -> Result<()> {{\n"
            ));
            if sels.is_empty() {
                o.push_str(&format!("            let id = {};\n", inst[0].0));
            } else {
                let scrut: Vec<String> = sels.iter().map(|(n, _)| n.clone()).collect();
                let scrut = if scrut.len() == 1 { scrut[0].clone() } else { format!("({})", scrut.join(", ")) };
                o.push_str(&format!("            let id = match {scrut} {{\n"));
                for (id, k) in &inst {
                    let pats: Vec<String> = k
                        .values
                        .iter()
                        .zip(&sels)
                        .map(|(v, (_, dt))| if *dt { dtype_pattern(v).to_string() } else { v.clone() })
                        .collect();
                    let pat = if pats.len() == 1 { pats[0].clone() } else { format!("({})", pats.join(", ")) };
                    o.push_str(&format!("                {pat} => {id},\n"));
                }
                let given: Vec<String> = sels.iter().map(|(n, _)| format!("{n}={{{n}:?}}")).collect();
                o.push_str(&format!(
                    "                _ => return Err(no_instance({:?}, &format!({:?}))),\n            }};\n",
                    shown(&fam.template, &fam.selectors),
                    given.join(" ")
                ));
            }
            let args: Vec<String> =
                ks[0].params.iter().map(|p| format!("Arg::{}(self.{})", p.kind.variant(), p.name)).collect();
            o.push_str(&format!(
                "            gpu.launch_kernel(id, cfg, &[{}])\n        }}\n    }}\n",
                args.join(", ")
            ));
            // Families of one module with the same parameters convert into each other, so a
            // launcher that picks between them builds the arguments once.
            for (gi, other) in m.families.iter().enumerate().take(fi) {
                if m.kernels.iter().find(|k| k.family == gi).is_none_or(|k| k.params != ks[0].params) {
                    continue;
                }
                let oname = camel(&other.base);
                let list = ks[0].params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ");
                for (a, b) in [(&oname, &sname), (&sname, &oname)] {
                    o.push_str(&format!(
                        "\n    impl From<{a}> for {b} {{\n        fn from(x: {a}) -> {b} {{\n            let {a} {{ {list} }} = x;\n            {b} {{ {list} }}\n        }}\n    }}\n"
                    ));
                }
            }
        }
        o.push_str("}\n");
    }
    Ok(o)
}

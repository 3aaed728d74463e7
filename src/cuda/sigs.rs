//! Every kernel's parameter list, stated once: the launch path checks the `Arg` list it is given
//! against it (`Gpu::launch`), and tests/kernel_symbols.rs checks it against the PTX of every
//! module (NVRTC, no GPU), so a deleted or renamed symbol, or a wrong argument count or kind, is
//! a CPU test failure instead of a launch failure or a silent misread on the GPU.
//!
//! A name may hold `{a,b,..}` groups, each standing for one of its alternatives
//! (`rmsnorm_fwd_{bf16,f32}` is two kernels with the same parameters).

use super::Arg;

/// A parameter as PTX sees it: a 64-bit value (a device pointer, or an `i64`/`long` count), a
/// 32-bit integer, or an f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    U64,
    I32,
    F32,
}

use Param::{F32, I32, U64};

impl Param {
    /// The kind of a launch argument.
    pub fn of(a: &Arg) -> Param {
        match a {
            Arg::Ptr(_) | Arg::I64(_) => U64,
            Arg::I32(_) => I32,
            Arg::F32(_) => F32,
        }
    }
}

/// One kernel (or one family of kernels with the same parameters) of one module.
#[derive(Debug)]
pub struct KernelSig {
    pub module: &'static str,
    pub name: &'static str,
    pub params: &'static [Param],
}

const fn sig(module: &'static str, name: &'static str, params: &'static [Param]) -> KernelSig {
    KernelSig { module, name, params }
}

impl KernelSig {
    /// The kernel names this entry stands for (its `{a,b}` groups expanded).
    pub fn names(&self) -> Vec<String> {
        expand(self.name)
    }
}

fn expand(pat: &str) -> Vec<String> {
    let Some(open) = pat.find('{') else { return vec![pat.to_string()] };
    let close = open + pat[open..].find('}').expect("unclosed '{' in a kernel name pattern");
    let rest = expand(&pat[close + 1..]);
    let mut out = Vec::new();
    for alt in pat[open + 1..close].split(',') {
        for r in &rest {
            out.push(format!("{}{alt}{r}", &pat[..open]));
        }
    }
    out
}

/// Does `name` match the pattern `pat` (without allocating: launches call this once per kernel)?
fn matches(pat: &str, name: &str) -> bool {
    let Some(open) = pat.find('{') else { return pat == name };
    let Some(tail) = name.strip_prefix(&pat[..open]) else { return false };
    let close = open + pat[open..].find('}').unwrap_or(pat.len() - open - 1);
    pat[open + 1..close].split(',').any(|alt| tail.strip_prefix(alt).is_some_and(|t| matches(&pat[close + 1..], t)))
}

/// The signature of `module::name`, if the table has it.
pub fn find(module: &str, name: &str) -> Option<&'static KernelSig> {
    KERNELS.iter().find(|k| k.module == module && matches(k.name, name))
}

/// Checks a launch's arguments against the table: an error naming the kernel when it is not in
/// the table or the count or a kind differs.
pub fn check(module: &str, name: &str, args: &[Arg]) -> Result<(), String> {
    let Some(k) = find(module, name) else {
        return Err(format!("kernel {module}::{name} has no signature in src/cuda/sigs.rs"));
    };
    check_params(k, name, args)
}

/// As `check`, with the entry already found.
pub fn check_params(k: &KernelSig, name: &str, args: &[Arg]) -> Result<(), String> {
    let got: Vec<Param> = args.iter().map(Param::of).collect();
    if got != k.params {
        return Err(format!("launch of {}::{name} passes {got:?}; the kernel takes {:?}", k.module, k.params));
    }
    Ok(())
}

/// The table: one entry per kernel family of every module in kernels/*.cu.
pub static KERNELS: &[KernelSig] = &[
    sig("act", "swiglu_fwd_{bf16,f32}", &[U64, U64, U64, U64]),
    sig("act", "swiglu_bwd_{bf16,f32}", &[U64, U64, U64, U64, U64, U64]),
    sig("act", "gelu_bwd_{bf16,f32}", &[U64, U64, U64, U64, I32]),
    sig("act", "gelu_fwd_{bf16,f32}", &[U64, U64, U64, I32]),
    sig("adamw", "adamw_step_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, F32, F32, F32, F32, F32, F32, F32]),
    sig("adamw", "adamw_step_g16_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, F32, F32, F32, F32, F32, F32, F32]),
    sig("adamw", "sum_squares_{bf16,f32}", &[U64, U64, U64]),
    sig(
        "attention_bwd",
        "attention_bwd_qhead_bf16_d{64,80,128}",
        &[U64, U64, U64, U64, U64, U64, U64, U64, U64, U64, I32, I32, I32, F32, F32, I32],
    ),
    sig("attention_bwd", "attention_bwd_finish_bf16", &[U64, U64, U64, U64, U64, U64, I32, I32, I32, I32, I32]),
    sig("attention_bwd", "attention_bwd_rowdot_bf16", &[U64, U64, U64, I32, I32, I32]),
    sig("attention_bwd", "attention_bwd_dq_round_bf16", &[U64, U64, U64]),
    sig(
        "attention_bwd",
        "attention_bwd_kvhead_bf16_d{64,80,128}",
        &[U64, U64, U64, U64, U64, U64, U64, U64, U64, U64, I32, I32, I32, F32, F32, I32],
    ),
    sig(
        "attention_decode",
        "attention_decode_bf16_d{64,80,128}",
        &[U64, U64, U64, U64, U64, U64, I32, I32, I32, I32, I32, I32, F32, I32],
    ),
    sig("attention_decode", "attention_decode_combine_bf16", &[U64, U64, U64, I32, I32, I32]),
    sig(
        "attention_decode",
        "attention_decode16_bf16_d{64,80,128}",
        &[U64, U64, U64, U64, U64, U64, I32, I32, I32, I32, I32, I32, F32, I32],
    ),
    sig(
        "attention_fwd",
        "attention_fwd_q64_bf16_d{64,80,128}",
        &[U64, U64, U64, U64, U64, U64, I32, I32, I32, F32, I32],
    ),
    sig(
        "attention_fwd",
        "attention_fwd_q128_bf16_d{64,80,128}",
        &[U64, U64, U64, U64, U64, U64, I32, I32, I32, F32, I32],
    ),
    sig(
        "attention_simple",
        "attention_simple_fwd_{bf16,f32}",
        &[U64, U64, U64, U64, U64, U64, I32, I32, I32, I32, I32, F32, I32],
    ),
    sig("attention_simple", "attention_bwd_dot_{bf16,f32}", &[U64, U64, U64, I32, I32, I32]),
    sig(
        "attention_simple",
        "attention_simple_bwd_dq_{bf16,f32}",
        &[U64, U64, U64, U64, U64, U64, U64, U64, I32, I32, I32, I32, I32, F32, I32],
    ),
    sig(
        "attention_simple",
        "attention_simple_bwd_dkv_{bf16,f32}",
        &[U64, U64, U64, U64, U64, U64, U64, U64, U64, I32, I32, I32, I32, I32, F32, I32],
    ),
    sig(
        "attention_simple",
        "attention_simple_decode_{bf16,f32}",
        &[U64, U64, U64, U64, U64, I32, I32, I32, I32, I32, I32, F32, I32],
    ),
    sig(
        "attention_simple",
        "attention_simple_decode_varlen_{bf16,f32}",
        &[U64, U64, U64, U64, U64, U64, I32, I32, I32, I32, I32, F32, I32],
    ),
    sig("attention_simple", "attention_kv_append_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, I32, I32, I32, I32]),
    sig("elementwise", "bias_bwd_reduce", &[U64, U64, I32, I32]),
    sig("elementwise", "bias_add_{bf16,f32}", &[U64, U64, U64, I32]),
    sig("elementwise", "bias_bwd_{bf16,f32}", &[U64, U64, I32, I32, I32]),
    sig("elementwise", "add_inplace_{bf16,f32}", &[U64, U64, U64]),
    sig("elementwise", "add_into_{bf16,f32}", &[U64, U64, U64, U64]),
    sig("elementwise", "scale_inplace_{bf16,f32}", &[U64, F32, U64]),
    sig("elementwise", "fill_{bf16,f32}", &[U64, F32, U64]),
    sig("elementwise", "cast_f32_bf16", &[U64, U64, U64]),
    sig("elementwise", "bias_bwd_v2_{bf16,f32}", &[U64, U64, I32, I32, I32]),
    sig("elementwise", "cast_bf16_f32", &[U64, U64, U64]),
    sig("elementwise", "fill_f32_cs", &[U64, F32, U64]),
    sig("embedding", "embedding_fwd_{bf16,f32}", &[U64, U64, U64, I32, I32, I32]),
    sig("embedding", "embedding_bwd_{bf16,f32}", &[U64, U64, U64, I32, I32, I32]),
    sig("grpo", "grpo_rewards_f32", &[U64, U64, U64, U64, U64, U64, U64, U64, I32, I32, I32, F32, F32, F32, F32]),
    sig("grpo", "grpo_weights_f32", &[U64, U64, U64, I32, I32, I32]),
    sig(
        "grpo",
        "grpo_loss_f32",
        &[U64, U64, U64, U64, U64, U64, U64, U64, U64, U64, U64, I32, I32, I32, F32, F32, F32],
    ),
    sig("grpo", "grpo_stats_f32", &[U64, U64, U64, U64, U64, I32]),
    sig("init", "init_normal_{bf16,f32}", &[U64, U64, U64, F32, F32]),
    sig("layernorm", "layernorm_param_reduce", &[U64, U64, U64, I32, I32]),
    sig("layernorm", "layernorm_fwd_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, I32, I32, F32]),
    sig("layernorm", "layernorm_bwd_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, U64, I32, I32, I32, I32]),
    sig("layernorm", "layernorm_fwd_v2x1_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, I32, I32, F32]),
    sig("layernorm", "layernorm_bwd_v2x1_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, U64, I32, I32]),
    sig("layernorm", "layernorm_fwd_v2x2_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, I32, I32, F32]),
    sig("layernorm", "layernorm_bwd_v2x2_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, U64, I32, I32]),
    sig("layernorm", "layernorm_fwd_v2x4_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, I32, I32, F32]),
    sig("layernorm", "layernorm_bwd_v2x4_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, U64, I32, I32]),
    sig("logprob", "logprob_finalize", &[U64, U64, U64, U64, I32]),
    sig("logprob", "logprob_fold_{bf16,f32}", &[U64, U64, U64, U64, U64, I32, I32, I32, I32, I32, I32, I32]),
    sig("logprob", "logprob_dlogits_stored_{bf16,f32}", &[U64, U64, U64, U64, U64, I32, I32, I32, I32]),
    sig("logprob", "logprob_dlogits_{bf16,f32}", &[U64, U64, U64, U64, U64, I32, I32, I32]),
    sig("logprob", "logprob_dlogits_inplace_{bf16,f32}", &[U64, U64, U64, U64, I32, I32, I32]),
    sig("logprob", "logprob_gather_rows_{bf16,f32}", &[U64, U64, U64, I32, I32]),
    sig("logprob", "logprob_scatter_sum_{bf16,f32}", &[U64, U64, U64, U64, I32, I32, I32, I32, U64]),
    sig("logprob", "logprob_scan_nonzero", &[U64, U64, U64, U64, I32]),
    sig("logprob", "logprob_gather_vec_f32", &[U64, U64, U64, I32, I32, F32]),
    sig("logprob", "logprob_gather_vec_i32", &[U64, U64, U64, I32]),
    sig("logprob", "logprob_expand_vec_f32", &[U64, U64, U64, I32]),
    sig("logprob", "logprob_fold_u_{bf16,f32}", &[U64, U64, U64, U64, U64, I32, I32, I32, I32]),
    sig("logprob", "logprob_scale_rows_{bf16,f32}", &[U64, U64, U64, I32, I32]),
    sig("patch_embed", "patch_embed_gather_{bf16,f32}", &[U64, U64, U64, I32, I32, I32]),
    sig("patch_embed", "rows_gather_{bf16,f32}", &[U64, U64, U64, I32, I32, I32, I32]),
    sig("patch_embed", "rows_scatter_{bf16,f32}", &[U64, U64, U64, I32, I32, I32]),
    sig("rmsnorm", "rmsnorm_dw_reduce", &[U64, U64, I32, I32, I32]),
    sig("rmsnorm", "rmsnorm_fwd_{bf16,f32}", &[U64, U64, U64, U64, I32, I32, F32]),
    sig("rmsnorm", "rmsnorm_bwd_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, I32, I32, I32]),
    sig("rmsnorm", "param_colsum_reduce", &[U64, U64, U64, I32, I32, I32]),
    sig("rmsnorm", "rmsnorm_bwd_v2x1_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, I32, I32]),
    sig("rmsnorm", "rmsnorm_bwd_v2x2_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, I32, I32]),
    sig("rmsnorm", "rmsnorm_bwd_v2x4_{bf16,f32}", &[U64, U64, U64, U64, U64, U64, I32, I32]),
    sig("rope", "rope_fwd_{bf16,f32}", &[U64, U64, U64, I32, I32, I32]),
    sig("rope", "rope_bwd_{bf16,f32}", &[U64, U64, U64, I32, I32, I32]),
    sig("sample", "sample_{bf16,f32}", &[U64, U64, U64, U64, U64, I32, I32]),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_expand_and_match() {
        assert_eq!(expand("a_{bf16,f32}_d{64,80}"), ["a_bf16_d64", "a_bf16_d80", "a_f32_d64", "a_f32_d80"]);
        assert!(matches("a_{bf16,f32}_d{64,80}", "a_f32_d80"));
        assert!(!matches("a_{bf16,f32}_d{64,80}", "a_f32_d8"));
        assert!(!matches("a_{bf16,f32}", "a_bf16x"));
        assert!(matches("plain", "plain"));
        for k in KERNELS {
            for n in k.names() {
                assert!(std::ptr::eq(find(k.module, &n).unwrap(), k), "{}::{n} matches an earlier entry", k.module);
            }
        }
    }

    #[test]
    fn check_reports_count_and_kind() {
        let k = find("elementwise", "add_inplace_bf16").unwrap();
        assert!(check_params(k, "add_inplace_bf16", &[Arg::Ptr(0), Arg::Ptr(0), Arg::I64(1)]).is_ok());
        assert!(check_params(k, "add_inplace_bf16", &[Arg::Ptr(0), Arg::Ptr(0)]).is_err());
        assert!(check_params(k, "add_inplace_bf16", &[Arg::Ptr(0), Arg::Ptr(0), Arg::I32(1)]).is_err());
        assert!(check("elementwise", "no_such_kernel", &[]).is_err());
    }
}

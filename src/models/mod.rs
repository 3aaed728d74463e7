//! The model families, one folder each, plus `Fields`: typed reads of Hugging Face JSON config
//! objects whose errors name the file and the full field path (`text_config.hidden_size`).

pub mod common;
pub mod limits;
pub mod llava_next;
pub mod qwen2_5_vl;
pub mod tiny; // defines: the embedded default model (tiny Qwen2.5-VL config + demo tokenizer)

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// Reads a JSON file into a value, naming the file on failure.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// One JSON object of a config file, with the path of keys that led to it (for messages).
#[derive(Clone, Copy)]
pub struct Fields<'a> {
    pub obj: &'a Map<String, Value>,
    pub prefix: &'a str,
    pub file: &'a Path,
}

impl<'a> Fields<'a> {
    pub fn new(obj: &'a Map<String, Value>, prefix: &'a str, file: &'a Path) -> Self {
        Fields { obj, prefix, file }
    }

    /// `prefix.key`, for messages.
    pub fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// An error naming the file and the field.
    pub fn err(&self, key: &str, what: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: field `{}`: {what}", self.file.display(), self.path(key))
    }

    /// The value of `key`, treating JSON null as absent.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// A nested object, if present (an error if present but not an object).
    pub fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.err(key, format!("expected an object, got {v}"))),
        }
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                // 3.0 is accepted as 3, as Python would.
                None => match v.as_f64() {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => Ok(Some(f as usize)),
                    _ => Err(self.err(key, format!("expected a non-negative integer, got {v}"))),
                },
            },
        }
    }

    /// A positive integer, or `default` when absent.
    pub fn pos_usize(&self, key: &str, default: usize) -> Result<usize> {
        let n = self.opt_usize(key)?.unwrap_or(default);
        if n == 0 {
            return Err(self.err(key, "must be positive, got 0"));
        }
        Ok(n)
    }

    /// A required size: a positive integer at most `limit`. Missing, 0 or too large is an error
    /// naming the field (no silent default: the weights' shapes follow from it).
    pub fn size(&self, key: &str, limit: usize) -> Result<usize> {
        match self.opt_usize(key)? {
            None => Err(self.err(key, "missing (required: the weights' shapes follow from it)")),
            Some(n) => self.within(key, n, limit),
        }
    }

    /// A size that takes `default` (a transformers class default) when absent; otherwise as
    /// [`Fields::size`].
    pub fn size_or(&self, key: &str, default: usize, limit: usize) -> Result<usize> {
        let n = self.pos_usize(key, default)?;
        self.within(key, n, limit)
    }

    /// `n` (the value of `key`) if at most `limit`, else an error naming the field, value and limit.
    pub fn within(&self, key: &str, n: usize, limit: usize) -> Result<usize> {
        if n == 0 {
            return Err(self.err(key, "must be positive, got 0"));
        }
        if n > limit {
            return Err(self.err(key, format!("{n} is above the limit of {limit}")));
        }
        Ok(n)
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(f) if f.is_finite() => Ok(Some(f)),
                _ => Err(self.err(key, format!("expected a number, got {v}"))),
            },
        }
    }

    /// A finite number > 0, or `default` when absent.
    pub fn pos_f64(&self, key: &str, default: f64) -> Result<f64> {
        let f = self.opt_f64(key)?.unwrap_or(default);
        if f <= 0.0 {
            return Err(self.err(key, format!("must be positive, got {f}")));
        }
        Ok(f)
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, format!("expected a string, got {v}"))),
        }
    }

    pub fn opt_usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => {
                let mut out = Vec::with_capacity(a.len());
                for x in a {
                    match x.as_u64() {
                        Some(n) => out.push(n as usize),
                        None => {
                            return Err(self.err(
                                key,
                                format!("expected a list of non-negative integers, got {}", Value::Array(a.clone())),
                            ))
                        }
                    }
                }
                Ok(Some(out))
            }
            Some(v) => Err(self.err(key, format!("expected a list of integers, got {v}"))),
        }
    }

    pub fn opt_f64_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => {
                let mut out = Vec::with_capacity(a.len());
                for x in a {
                    match x.as_f64() {
                        Some(f) if f.is_finite() => out.push(f),
                        _ => {
                            return Err(
                                self.err(key, format!("expected a list of numbers, got {}", Value::Array(a.clone())))
                            )
                        }
                    }
                }
                Ok(Some(out))
            }
            Some(v) => Err(self.err(key, format!("expected a list of numbers, got {v}"))),
        }
    }

    /// A token id: an integer, or a list whose first entry is taken (some configs list several
    /// eos ids).
    pub fn opt_token_id(&self, key: &str) -> Result<Option<u32>> {
        let v = match self.get(key) {
            None => return Ok(None),
            Some(Value::Array(a)) => match a.first() {
                Some(x) => x,
                None => return Ok(None),
            },
            Some(v) => v,
        };
        match v.as_u64() {
            Some(n) if n <= u32::MAX as u64 => Ok(Some(n as u32)),
            _ => Err(self.err(key, format!("expected a token id, got {v}"))),
        }
    }
}

/// A config file's root object, or an error naming the file.
pub fn root_object<'a>(v: &'a Value, file: &Path) -> Result<&'a Map<String, Value>> {
    match v {
        Value::Object(m) => Ok(m),
        _ => bail!("{}: expected a JSON object at the top level", file.display()),
    }
}

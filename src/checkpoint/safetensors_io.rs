//! The safetensors file format, read and written by hand: header parsing with validation that
//! names the tensor and the file, dtype decoding (bf16/f16/f32 to f32; every numeric dtype to f64
//! for test fixtures), and atomic, streaming, sharded saving in the Hugging Face layout
//! (`model.safetensors`, or `model-0000K-of-0000N.safetensors` + `model.safetensors.index.json`).
//!
//! File layout: u64 little-endian header length n, n bytes of JSON
//! `{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {str: str}}`,
//! then the data section; offsets are relative to the start of the data section.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Headers larger than this are treated as corrupt (real ones are a few MB at most).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// The element types of the safetensors format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StDtype {
    Bool,
    U8,
    I8,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl StDtype {
    pub fn parse(s: &str) -> Option<StDtype> {
        Some(match s {
            "BOOL" => StDtype::Bool,
            "U8" => StDtype::U8,
            "I8" => StDtype::I8,
            "I16" => StDtype::I16,
            "U16" => StDtype::U16,
            "F16" => StDtype::F16,
            "BF16" => StDtype::BF16,
            "I32" => StDtype::I32,
            "U32" => StDtype::U32,
            "F32" => StDtype::F32,
            "I64" => StDtype::I64,
            "U64" => StDtype::U64,
            "F64" => StDtype::F64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            StDtype::Bool => "BOOL",
            StDtype::U8 => "U8",
            StDtype::I8 => "I8",
            StDtype::I16 => "I16",
            StDtype::U16 => "U16",
            StDtype::F16 => "F16",
            StDtype::BF16 => "BF16",
            StDtype::I32 => "I32",
            StDtype::U32 => "U32",
            StDtype::F32 => "F32",
            StDtype::I64 => "I64",
            StDtype::U64 => "U64",
            StDtype::F64 => "F64",
        }
    }

    pub fn size(self) -> usize {
        match self {
            StDtype::Bool | StDtype::U8 | StDtype::I8 => 1,
            StDtype::I16 | StDtype::U16 | StDtype::F16 | StDtype::BF16 => 2,
            StDtype::I32 | StDtype::U32 | StDtype::F32 => 4,
            StDtype::I64 | StDtype::U64 | StDtype::F64 => 8,
        }
    }
}

/// One tensor of a parsed header. `start..end` are absolute byte offsets in the file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed and validated header: the tensors (in offset order) and the `__metadata__` strings.
pub struct Header {
    pub tensors: Vec<TensorEntry>,
    pub metadata: HashMap<String, String>,
}

/// Parses and validates the header of the safetensors file whose full contents are `bytes`.
/// Every offset is checked against the file size, so later slicing cannot go out of bounds.
pub fn parse_header(bytes: &[u8], file: &Path) -> Result<Header> {
    let f = file.display();
    if bytes.len() < 8 {
        bail!("{f}: truncated or not a safetensors file ({} bytes; the header length alone takes 8)", bytes.len());
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(len8);
    if n > MAX_HEADER_BYTES || n > (bytes.len() - 8) as u64 {
        bail!(
            "{f}: header length {n} does not fit in the file's {} bytes (truncated or not a safetensors file)",
            bytes.len()
        );
    }
    let n = n as usize;
    let data_start = 8 + n;
    let data_len = bytes.len() - data_start;
    let json: Value = serde_json::from_slice(&bytes[8..data_start])
        .with_context(|| format!("{f}: the header is not valid JSON (corrupt file?)"))?;
    let Value::Object(obj) = json else { bail!("{f}: the header is not a JSON object (corrupt file?)") };

    let mut tensors = Vec::with_capacity(obj.len());
    let mut metadata = HashMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            if let Value::Object(m) = v {
                for (k, val) in m {
                    let s = match val {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    metadata.insert(k, s);
                }
            }
            continue;
        }
        let bad = |what: &str| anyhow::anyhow!("{f}: tensor `{name}`: {what} in the header (corrupt file?)");
        let dt_str = v.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("missing or non-string dtype"))?;
        let dtype = StDtype::parse(dt_str).ok_or_else(|| bad(&format!("unknown dtype {dt_str:?}")))?;
        let shape_v = v.get("shape").and_then(Value::as_array).ok_or_else(|| bad("missing shape"))?;
        let mut shape = Vec::with_capacity(shape_v.len());
        for d in shape_v {
            let d = d.as_u64().ok_or_else(|| bad("non-integer shape entry"))?;
            shape.push(usize::try_from(d).map_err(|_| bad("shape entry too large"))?);
        }
        let offs = v.get("data_offsets").and_then(Value::as_array).ok_or_else(|| bad("missing data_offsets"))?;
        if offs.len() != 2 {
            return Err(bad("data_offsets is not [start, end]"));
        }
        let s = offs[0].as_u64().ok_or_else(|| bad("non-integer data_offsets"))? as usize;
        let e = offs[1].as_u64().ok_or_else(|| bad("non-integer data_offsets"))? as usize;
        let nbytes =
            shape.iter().try_fold(dtype.size(), |acc, &d| acc.checked_mul(d)).ok_or_else(|| bad("shape overflows"))?;
        if e < s || e - s != nbytes {
            return Err(bad(&format!(
                "shape {shape:?} of {dt_str} needs {nbytes} bytes but data_offsets [{s}, {e}] span {}",
                e.saturating_sub(s)
            )));
        }
        if e > data_len {
            bail!("{f}: tensor `{name}` ends at data byte {e} but the file's data section has only {data_len} bytes (truncated file?)");
        }
        tensors.push(TensorEntry { name, dtype, shape, start: data_start + s, end: data_start + e });
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    for w in tensors.windows(2) {
        if w[1].start < w[0].end {
            bail!("{f}: tensors `{}` and `{}` overlap in the data section (corrupt file?)", w[0].name, w[1].name);
        }
    }
    Ok(Header { tensors, metadata })
}

/// Decodes a bf16, f16 or f32 tensor to f32. Other dtypes are an error naming the tensor and file.
pub fn decode_f32(dtype: StDtype, raw: &[u8], name: &str, file: &Path) -> Result<Vec<f32>> {
    Ok(match dtype {
        StDtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        StDtype::BF16 => {
            raw.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
        }
        StDtype::F16 => {
            raw.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        other => bail!(
            "{}: tensor `{name}` has dtype {}, but model weights must be BF16, F16 or F32",
            file.display(),
            other.name()
        ),
    })
}

/// Decodes a tensor of any numeric dtype to f64 (exact for every dtype but 64-bit integers
/// beyond 2^53, which fixtures never hold).
pub fn decode_f64(dtype: StDtype, raw: &[u8]) -> Vec<f64> {
    let c2 = |c: &[u8]| [c[0], c[1]];
    let c4 = |c: &[u8]| [c[0], c[1], c[2], c[3]];
    let c8 = |c: &[u8]| [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
    match dtype {
        StDtype::Bool | StDtype::U8 => raw.iter().map(|&b| b as f64).collect(),
        StDtype::I8 => raw.iter().map(|&b| b as i8 as f64).collect(),
        StDtype::I16 => raw.chunks_exact(2).map(|c| i16::from_le_bytes(c2(c)) as f64).collect(),
        StDtype::U16 => raw.chunks_exact(2).map(|c| u16::from_le_bytes(c2(c)) as f64).collect(),
        StDtype::F16 => raw.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes(c2(c))).to_f64()).collect(),
        StDtype::BF16 => {
            raw.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes(c2(c)) as u32) << 16) as f64).collect()
        }
        StDtype::I32 => raw.chunks_exact(4).map(|c| i32::from_le_bytes(c4(c)) as f64).collect(),
        StDtype::U32 => raw.chunks_exact(4).map(|c| u32::from_le_bytes(c4(c)) as f64).collect(),
        StDtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c4(c)) as f64).collect(),
        StDtype::I64 => raw.chunks_exact(8).map(|c| i64::from_le_bytes(c8(c)) as f64).collect(),
        StDtype::U64 => raw.chunks_exact(8).map(|c| u64::from_le_bytes(c8(c)) as f64).collect(),
        StDtype::F64 => raw.chunks_exact(8).map(|c| f64::from_le_bytes(c8(c))).collect(),
    }
}

/// Tensors by name: (shape, values as f64), as [`read_tensor_file`] returns them.
pub type TensorMap = HashMap<String, (Vec<usize>, Vec<f64>)>;

/// A whole safetensors file (any dtype) as name → (shape, values as f64). For test fixtures.
pub fn read_tensor_file(path: impl AsRef<Path>) -> Result<TensorMap> {
    Ok(read_tensor_file_with_metadata(path)?.0)
}

/// As [`read_tensor_file`], plus the header's `__metadata__` strings (hyper-parameters of fixtures).
pub fn read_tensor_file_with_metadata(path: impl AsRef<Path>) -> Result<(TensorMap, HashMap<String, String>)> {
    let path = path.as_ref();
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let header = parse_header(&bytes, path)?;
    let mut out = HashMap::with_capacity(header.tensors.len());
    for t in header.tensors {
        let vals = decode_f64(t.dtype, &bytes[t.start..t.end]);
        out.insert(t.name, (t.shape, vals));
    }
    Ok((out, header.metadata))
}

/// The dtype weights are stored in when saving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    BF16,
}

impl SaveDtype {
    pub fn st(self) -> StDtype {
        match self {
            SaveDtype::F32 => StDtype::F32,
            SaveDtype::BF16 => StDtype::BF16,
        }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| {
        w.write_all(bytes)?;
        Ok(())
    })
}

/// Atomic write through a writer: readers see either the old file or the complete new one.
pub fn write_atomic_with(path: &Path, body: impl FnOnce(&mut BufWriter<fs::File>) -> Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let fname = path.file_name().with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp-{}", fname.to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        body(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // Persist the rename itself (best effort: not every filesystem allows syncing a directory).
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Bytes one tensor of `shape` takes in `dtype`.
fn tensor_bytes(shape: &[usize], dtype: SaveDtype) -> usize {
    shape.iter().product::<usize>() * dtype.st().size()
}

/// Writes one safetensors file with `specs` in order; `fetch(i)` yields tensor i's values (f32).
fn write_file(
    path: &Path, specs: &[(String, Vec<usize>)], idx: &[usize], dtype: SaveDtype,
    fetch: &mut dyn FnMut(usize) -> Result<Vec<f32>>,
) -> Result<()> {
    let mut header = Map::new();
    let mut meta = Map::new();
    meta.insert("format".into(), Value::String("pt".into()));
    header.insert("__metadata__".into(), Value::Object(meta));
    let mut off = 0usize;
    for &i in idx {
        let (name, shape) = &specs[i];
        let nb = tensor_bytes(shape, dtype);
        let mut e = Map::new();
        e.insert("dtype".into(), Value::String(dtype.st().name().into()));
        e.insert("shape".into(), Value::Array(shape.iter().map(|&d| Value::from(d as u64)).collect()));
        e.insert("data_offsets".into(), Value::Array(vec![Value::from(off as u64), Value::from((off + nb) as u64)]));
        header.insert(name.clone(), Value::Object(e));
        off += nb;
    }
    let mut hjson = serde_json::to_vec(&Value::Object(header))?;
    // Pad to a multiple of 8 so the data section stays aligned, as the reference writer does.
    while hjson.len() % 8 != 0 {
        hjson.push(b' ');
    }
    write_atomic_with(path, |w| {
        w.write_all(&(hjson.len() as u64).to_le_bytes())?;
        w.write_all(&hjson)?;
        let mut buf: Vec<u8> = Vec::new();
        for &i in idx {
            let (name, shape) = &specs[i];
            let vals = fetch(i)?;
            let numel: usize = shape.iter().product();
            if vals.len() != numel {
                bail!(
                    "saving {}: tensor `{name}` has {} values, its shape {shape:?} needs {numel}",
                    path.display(),
                    vals.len()
                );
            }
            // Converted in slices so a multi-GB tensor never needs a second full-size copy.
            for chunk in vals.chunks(1 << 20) {
                buf.clear();
                match dtype {
                    SaveDtype::F32 => chunk.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
                    SaveDtype::BF16 => chunk
                        .iter()
                        .for_each(|v| buf.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes())),
                }
                w.write_all(&buf).with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Ok(())
    })
}

/// Name of shard k (1-based) of n.
pub fn shard_name(k: usize, n: usize) -> String {
    format!("model-{k:05}-of-{n:05}.safetensors")
}

/// Is `name` a shard file name (`model-NNNNN-of-NNNNN.safetensors`)?
fn is_shard_name(name: &str) -> bool {
    let Some(mid) = name.strip_prefix("model-").and_then(|s| s.strip_suffix(".safetensors")) else { return false };
    let mut parts = mid.split("-of-");
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None)
        if !a.is_empty() && !b.is_empty() && a.bytes().all(|c| c.is_ascii_digit()) && b.bytes().all(|c| c.is_ascii_digit()))
}

/// Saves named f32 tensors `(name, shape, values)` as a Hugging Face checkpoint in `dir`
/// (created if needed), stored as `dtype`, in shards of at most `max_shard_bytes` (a tensor
/// larger than that gets a shard of its own). One shard is written as `model.safetensors`.
pub fn save_sharded(
    dir: impl AsRef<Path>, tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: SaveDtype, max_shard_bytes: usize,
) -> Result<()> {
    let specs: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
    save_sharded_with(dir, &specs, dtype, max_shard_bytes, |i| Ok(tensors[i].2.clone()))
}

/// Streaming form of [`save_sharded`]: `specs` lists (name, shape) in order and `fetch(i)`
/// produces tensor i's values when its turn comes, so only one tensor is in host memory at a
/// time (e.g. downloaded from the GPU). Every file is written atomically; the index comes last,
/// then files of a previous save in the other layout, or surplus shards, are removed.
pub fn save_sharded_with(
    dir: impl AsRef<Path>, specs: &[(String, Vec<usize>)], dtype: SaveDtype, max_shard_bytes: usize,
    mut fetch: impl FnMut(usize) -> Result<Vec<f32>>,
) -> Result<()> {
    let dir = dir.as_ref();
    if max_shard_bytes == 0 {
        bail!("save_sharded: max_shard_bytes must be positive");
    }
    let mut seen = HashSet::new();
    for (name, _) in specs {
        if !seen.insert(name.as_str()) {
            bail!("save_sharded: tensor `{name}` appears twice");
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    // Greedy shard plan in the given order.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0usize;
    for (i, (_, shape)) in specs.iter().enumerate() {
        let nb = tensor_bytes(shape, dtype);
        let last = shards.len() - 1;
        if !shards[last].is_empty() && cur + nb > max_shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        let last = shards.len() - 1;
        shards[last].push(i);
        cur += nb;
    }
    let n = shards.len();
    let names: Vec<String> =
        if n == 1 { vec![SINGLE_FILE.to_string()] } else { (1..=n).map(|k| shard_name(k, n)).collect() };
    for (idx, fname) in shards.iter().zip(&names) {
        write_file(&dir.join(fname), specs, idx, dtype, &mut fetch)?;
    }

    if n > 1 {
        let mut wm = Map::new();
        for (idx, fname) in shards.iter().zip(&names) {
            for &i in idx {
                wm.insert(specs[i].0.clone(), Value::String(fname.clone()));
            }
        }
        let total: usize = specs.iter().map(|(_, s)| tensor_bytes(s, dtype)).sum();
        let mut meta = Map::new();
        meta.insert("total_size".into(), Value::from(total as u64));
        let mut root = Map::new();
        root.insert("metadata".into(), Value::Object(meta));
        root.insert("weight_map".into(), Value::Object(wm));
        let text = serde_json::to_string_pretty(&Value::Object(root))?;
        write_atomic(&dir.join(INDEX_FILE), text.as_bytes())?;
    }

    // Remove what a previous save in the other layout (or with more shards) left behind.
    let keep: HashSet<&str> = names.iter().map(String::as_str).collect();
    let mut stale: Vec<PathBuf> = Vec::new();
    if n == 1 {
        stale.push(dir.join(INDEX_FILE));
    } else {
        stale.push(dir.join(SINGLE_FILE));
    }
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?.flatten() {
        let fname = entry.file_name().to_string_lossy().into_owned();
        if is_shard_name(&fname) && !keep.contains(fname.as_str()) {
            stale.push(entry.path());
        }
    }
    for p in stale {
        if p.exists() {
            fs::remove_file(&p).with_context(|| format!("removing stale {}", p.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names() {
        assert_eq!(shard_name(2, 12), "model-00002-of-00012.safetensors");
        assert!(is_shard_name("model-00002-of-00012.safetensors"));
        assert!(!is_shard_name("model.safetensors"));
        assert!(!is_shard_name("model-a-of-00012.safetensors"));
    }
}

//! `Checkpoint`: a memory-mapped Hugging Face model directory (`model.safetensors`, or shards
//! listed in `model.safetensors.index.json`), model-agnostic, shared by every model. Headers are
//! validated when the directory is opened, so a truncated or corrupt file fails early with the
//! file and tensor named; reading a tensor checks its shape and converts bf16/f16/f32 to f32.
//! Saving (atomic, sharded) and fixture reading live in `safetensors_io`.

pub mod safetensors_io;

pub use safetensors_io::{
    read_tensor_file, read_tensor_file_with_metadata, save_sharded, save_sharded_with, write_atomic, SaveDtype,
    StDtype, INDEX_FILE, SINGLE_FILE,
};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors_io::{decode_f32, parse_header, TensorEntry};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

/// An opened checkpoint. Tensors stay in the page cache; nothing is copied until read.
pub struct Checkpoint {
    dir: PathBuf,
    /// Each file and its mapping.
    files: Vec<(PathBuf, Mmap)>,
    /// name → (index into `files`, entry); ordered so `names()` is deterministic.
    tensors: BTreeMap<String, (usize, TensorEntry)>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checkpoint({}, {} files, {} tensors)", self.dir.display(), self.files.len(), self.tensors.len())
    }
}

/// Maps a file read-only and validates its header.
fn map_file(path: &Path) -> Result<(Mmap, Vec<TensorEntry>)> {
    let file = fs::File::open(path).with_context(|| format!("opening checkpoint file {}", path.display()))?;
    let len = file.metadata().with_context(|| format!("reading {}", path.display()))?.len();
    if len < 8 {
        bail!("{}: truncated or not a safetensors file ({len} bytes)", path.display());
    }
    // SAFETY: the mapping is read-only; checkpoint files are not modified while a run reads them
    // (saves go to a temporary file and are renamed over, which leaves this mapping intact).
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("memory-mapping {}", path.display()))?;
    let header = parse_header(&map, path)?;
    Ok((map, header.tensors))
}

impl Checkpoint {
    /// Opens a model directory (or a single `.safetensors` file). A directory with
    /// `model.safetensors` uses it (as transformers does); otherwise it needs the shard index.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        if path.is_file() {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Self::from_files(dir, vec![path.to_path_buf()], None);
        }
        if !path.is_dir() {
            bail!("checkpoint {}: no such directory or file", path.display());
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            return Self::from_files(path.to_path_buf(), vec![single], None);
        }
        let index = path.join(INDEX_FILE);
        if !index.is_file() {
            bail!("checkpoint {}: neither {SINGLE_FILE} nor {INDEX_FILE} is present", path.display());
        }
        let text = fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
        let wm = json
            .get("weight_map")
            .and_then(|v| v.as_object())
            .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
        let mut weight_map = HashMap::with_capacity(wm.len());
        let mut files: Vec<PathBuf> = Vec::new();
        for (name, f) in wm {
            let f = f
                .as_str()
                .with_context(|| format!("{}: weight_map entry `{name}` is not a file name", index.display()))?;
            if f.contains('/') || f.contains('\\') || f == ".." {
                bail!("{}: weight_map entry `{name}` points outside the directory ({f:?})", index.display());
            }
            let p = path.join(f);
            if !files.contains(&p) {
                files.push(p.clone());
            }
            weight_map.insert(name.clone(), p);
        }
        files.sort();
        Self::from_files(path.to_path_buf(), files, Some((index, weight_map)))
    }

    fn from_files(
        dir: PathBuf, paths: Vec<PathBuf>, index: Option<(PathBuf, HashMap<String, PathBuf>)>,
    ) -> Result<Checkpoint> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors: BTreeMap<String, (usize, TensorEntry)> = BTreeMap::new();
        for (fi, p) in paths.into_iter().enumerate() {
            if !p.is_file() {
                match &index {
                    Some((ix, _)) => bail!("{}: lists shard {} which does not exist", ix.display(), p.display()),
                    None => bail!("checkpoint file {} does not exist", p.display()),
                }
            }
            let (map, entries) = map_file(&p)?;
            for e in entries {
                if let Some((other, _)) = tensors.get(&e.name) {
                    bail!(
                        "tensor `{}` is stored twice: in {} and in {}",
                        e.name,
                        files_path(&files, *other, &p).display(),
                        p.display()
                    );
                }
                tensors.insert(e.name.clone(), (fi, e));
            }
            files.push((p, map));
        }
        if let Some((ix, wm)) = &index {
            for (name, p) in wm {
                match tensors.get(name) {
                    Some((fi, _)) if &files[*fi].0 == p => {}
                    Some((fi, _)) => {
                        bail!(
                            "{}: says tensor `{name}` is in {}, but it is in {}",
                            ix.display(),
                            p.display(),
                            files[*fi].0.display()
                        )
                    }
                    None => bail!(
                        "{}: lists tensor `{name}` in {}, but that file does not contain it",
                        ix.display(),
                        p.display()
                    ),
                }
            }
        }
        Ok(Checkpoint { dir, files, tensors })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    /// The first of `candidates` present (for checkpoints that name a tensor in several ways).
    pub fn first_present<'a>(&self, candidates: &[&'a str]) -> Option<&'a str> {
        candidates.iter().copied().find(|c| self.has(c))
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(_, e)| e.shape.as_slice())
    }

    pub fn dtype(&self, name: &str) -> Option<StDtype> {
        self.tensors.get(name).map(|(_, e)| e.dtype)
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors.get(name).map(|(fi, _)| self.files[*fi].0.as_path())
    }

    fn entry(&self, name: &str) -> Result<(&Path, &TensorEntry, &[u8])> {
        let Some((fi, e)) = self.tensors.get(name) else {
            let files: Vec<String> = self
                .files
                .iter()
                .map(|(p, _)| {
                    p.file_name().map_or_else(|| p.display().to_string(), |f| f.to_string_lossy().into_owned())
                })
                .collect();
            bail!(
                "checkpoint {}: tensor `{name}` not found (searched {} tensors in {})",
                self.dir.display(),
                self.tensors.len(),
                files.join(", ")
            );
        };
        let (path, map) = &self.files[*fi];
        // In bounds: parse_header checked every offset against the file size.
        Ok((path, e, &map[e.start..e.end]))
    }

    /// Checks `name`'s shape against `expected`.
    pub fn check_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        let (path, e, _) = self.entry(name)?;
        if e.shape != expected {
            bail!("{}: tensor `{name}` has shape {:?}, expected {expected:?}", path.display(), e.shape);
        }
        Ok(())
    }

    /// The raw little-endian bytes of a tensor, with its dtype and shape.
    pub fn raw(&self, name: &str) -> Result<(StDtype, &[usize], &[u8])> {
        let (_, e, bytes) = self.entry(name)?;
        Ok((e.dtype, &e.shape, bytes))
    }

    /// Tensor `name` as f32, after checking that its shape is `expected_shape`
    /// (bf16 and f16 are widened exactly).
    pub fn get_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        self.check_shape(name, expected_shape)?;
        let (path, e, bytes) = self.entry(name)?;
        decode_f32(e.dtype, bytes, name, path)
    }

    /// Tensor `name` as f32 with whatever shape it has.
    pub fn get_f32_any(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (path, e, bytes) = self.entry(name)?;
        Ok((e.shape.clone(), decode_f32(e.dtype, bytes, name, path)?))
    }

    /// Tensor `name` as bf16 (round-to-nearest-even from f32/f16; bf16 is copied as is),
    /// for uploading weights to the GPU without an f32 detour.
    pub fn get_bf16(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<half::bf16>> {
        self.check_shape(name, expected_shape)?;
        let (path, e, bytes) = self.entry(name)?;
        if e.dtype == StDtype::BF16 {
            return Ok(bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect());
        }
        Ok(decode_f32(e.dtype, bytes, name, path)?.into_iter().map(half::bf16::from_f32).collect())
    }
}

fn files_path<'a>(files: &'a [(PathBuf, Mmap)], i: usize, fallback: &'a Path) -> &'a Path {
    files.get(i).map_or(fallback, |(p, _)| p.as_path())
}

//! Input fingerprints: a fast 128-bit content [`Hasher`], file hashes (whole, or sampled for big
//! files) and [`Identity`] (a data file and its images, or a model directory).

use super::*;

/// A fast 128-bit content hash (four 64-bit multiply-rotate lanes over 32-byte blocks, then a
/// splitmix-style finish). It detects accidental changes, not deliberate collisions.
#[derive(Clone, Debug)]
pub struct Hasher {
    lanes: [u64; 4],
    buf: [u8; 32],
    buf_len: usize,
    total: u64,
}

pub(super) const K1: u64 = 0x9E37_79B1_85EB_CA87;
pub(super) const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;

#[inline]
pub(super) fn lane_round(acc: u64, w: u64) -> u64 {
    acc.wrapping_add(w.wrapping_mul(K2)).rotate_left(31).wrapping_mul(K1)
}

#[inline]
pub(super) fn fmix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher { lanes: [K1.wrapping_add(K2), K2, 0, K1.wrapping_neg()], buf: [0; 32], buf_len: 0, total: 0 }
    }
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }

    fn block(&mut self, b: &[u8]) {
        for (k, w) in b.chunks_exact(8).enumerate() {
            self.lanes[k] = lane_round(self.lanes[k], u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.buf_len > 0 {
            let take = (32 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < 32 {
                return;
            }
            let b = self.buf;
            self.block(&b);
            self.buf_len = 0;
        }
        let mut blocks = data.chunks_exact(32);
        for b in &mut blocks {
            self.block(b);
        }
        let rest = blocks.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    /// A length-prefixed field, so ("ab","c") and ("a","bc") hash differently.
    pub fn field(&mut self, data: &[u8]) {
        self.update(&(data.len() as u64).to_le_bytes());
        self.update(data);
    }

    /// 32 hex digits.
    pub fn hex(&self) -> String {
        let mut l = self.lanes;
        let mut tail = [0u8; 32];
        tail[..self.buf_len].copy_from_slice(&self.buf[..self.buf_len]);
        for (k, w) in tail.chunks_exact(8).enumerate() {
            l[k] = lane_round(
                l[k],
                u64::from_le_bytes(w.try_into().expect("8 bytes")) ^ (self.buf_len as u64).wrapping_mul(K1),
            );
        }
        let t = self.total.wrapping_mul(K2);
        let a = fmix(l[0].rotate_left(1) ^ l[1].rotate_left(7) ^ l[2].rotate_left(12) ^ l[3].rotate_left(18) ^ t);
        let b = fmix(
            l[0].wrapping_add(l[2].rotate_left(29)) ^ l[1].wrapping_mul(K1) ^ l[3].wrapping_add(t).rotate_left(41) ^ a,
        );
        format!("{a:016x}{b:016x}")
    }
}

/// The hash of a file's whole content, and its size.
pub fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok((h.total, h.hex()))
}

/// Bytes `[start, end)` of `f`, whole.
pub(super) fn hash_range(h: &mut Hasher, f: &mut File, start: u64, end: u64) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    f.seek(SeekFrom::Start(start))?;
    let mut rest = end.saturating_sub(start);
    while rest > 0 {
        let n = f.read(&mut buf[..rest.min(1 << 20) as usize])?;
        if n == 0 {
            bail!("the file ended before its size");
        }
        h.update(&buf[..n]);
        rest -= n as u64;
    }
    Ok(())
}

/// Bytes `[start, end)` of `f` sampled as `blocks` (≥ 2) evenly spaced 4 KiB reads (whole
/// when that is no less).
pub(super) fn hash_sampled(h: &mut Hasher, f: &mut File, start: u64, end: u64, blocks: u64) -> Result<()> {
    const B: u64 = 4096;
    let len = end.saturating_sub(start);
    if len <= B * blocks {
        return hash_range(h, f, start, end);
    }
    let mut buf = vec![0u8; B as usize];
    for k in 0..blocks {
        let at = start + (len - B) * k / (blocks - 1);
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut buf)?;
        h.update(&buf);
    }
    Ok(())
}

/// What an input was when a run started: its resolved path and a content hash, with the hash
/// of each part (the files of a model directory; a data file and its images) to say which
/// part changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub path: String,
    pub hash: String,
    #[serde(default)]
    pub parts: BTreeMap<String, String>,
}

/// Non-safetensors files up to this size are hashed whole; larger ones are sampled.
pub(super) const WHOLE_FILE_LIMIT: u64 = 64 << 20;
/// 4 KiB blocks sampled from a large file's data.
pub(super) const SAMPLED_BLOCKS: u64 = 64;

impl Identity {
    fn from_parts(path: String, parts: BTreeMap<String, String>) -> Identity {
        let mut h = Hasher::new();
        for (k, v) in &parts {
            h.field(k.as_bytes());
            h.field(v.as_bytes());
        }
        Identity { path, hash: h.hex(), parts }
    }

    /// Something without a path (e.g. a built-in model), from its defining bytes.
    pub fn of_bytes(label: &str, parts: &[(&str, &[u8])]) -> Identity {
        let mut map = BTreeMap::new();
        for (name, bytes) in parts {
            let mut h = Hasher::new();
            h.update(bytes);
            map.insert(name.to_string(), h.hex());
        }
        Self::from_parts(label.to_string(), map)
    }

    /// A file, hashed whole.
    pub fn of_file(path: &Path) -> Result<Identity> {
        let (_, h) = hash_file(path)?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok(Self::from_parts(resolve(path).display().to_string(), BTreeMap::from([(name, h)])))
    }

    /// A dataset: the file hashed whole, plus every image it uses (whole; training reads them
    /// all anyway), in order, as one part.
    pub fn of_data(path: &Path, images: &[PathBuf]) -> Result<Identity> {
        let (_, h) = hash_file(path)?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let mut parts = BTreeMap::from([(name, h)]);
        if !images.is_empty() {
            let base = resolve(path.parent().unwrap_or(Path::new(".")));
            let mut hi = Hasher::new();
            for im in images {
                let r = resolve(im);
                let shown = r.strip_prefix(&base).unwrap_or(&r);
                hi.field(shown.to_string_lossy().as_bytes());
                hi.field(hash_file(im)?.1.as_bytes());
            }
            parts.insert(format!("images ({} files)", images.len()), hi.hex());
        }
        Ok(Self::from_parts(resolve(path).display().to_string(), parts))
    }

    /// A model directory, without reading all its weights (15 GB at every resume would be too
    /// slow): each top-level file's name and size; for `*.safetensors` the whole header (names,
    /// dtypes, shapes, offsets) plus 64 evenly spaced 4 KiB blocks of the data; other files
    /// whole up to 64 MiB, else sampled likewise. A change confined to unsampled weight bytes
    /// of the same shapes goes unseen.
    pub fn of_model_dir(dir: &Path) -> Result<Identity> {
        let mut names = Vec::new();
        for e in fs::read_dir(dir).with_context(|| format!("listing the model directory {}", dir.display()))? {
            let e = e?;
            let n = e.file_name().to_string_lossy().into_owned();
            // Hidden entries are temporary files or tool state, not the model.
            if !n.starts_with('.') && e.path().is_file() {
                names.push(n);
            }
        }
        names.sort();
        let mut parts = BTreeMap::new();
        for n in names {
            let p = dir.join(&n);
            let mut f = File::open(&p).with_context(|| format!("reading {}", p.display()))?;
            let size = f.metadata()?.len();
            let mut h = Hasher::new();
            h.field(&size.to_le_bytes());
            let mut data_start = 0;
            if n.ends_with(".safetensors") && size >= 8 {
                let mut len8 = [0u8; 8];
                f.read_exact(&mut len8)?;
                let hl = u64::from_le_bytes(len8);
                if hl <= size - 8 {
                    let mut header = vec![0u8; hl as usize];
                    f.read_exact(&mut header)?;
                    h.field(&header);
                    data_start = 8 + hl;
                }
            }
            if data_start == 0 && size <= WHOLE_FILE_LIMIT {
                hash_range(&mut h, &mut f, 0, size).with_context(|| format!("reading {}", p.display()))?;
            } else {
                hash_sampled(&mut h, &mut f, data_start, size, SAMPLED_BLOCKS)
                    .with_context(|| format!("reading {}", p.display()))?;
            }
            parts.insert(n, h.hex());
        }
        Ok(Self::from_parts(resolve(dir).display().to_string(), parts))
    }

    /// Checks that `now` is the input the run (`self`, as saved in `run`) started with; the
    /// error names `flag` and what differs.
    pub fn require_same(&self, now: &Identity, flag: &str, run: &Path) -> Result<()> {
        if self.path != now.path {
            bail!(
                "--resume: {flag} is {} but the run in {} was started with {flag} {}; pass the same {flag}, or start a new --out",
                now.path,
                run.display(),
                self.path
            );
        }
        if self.hash != now.hash {
            let mut changed: Vec<&str> = Vec::new();
            for k in self.parts.keys().chain(now.parts.keys()) {
                if self.parts.get(k) != now.parts.get(k) && !changed.contains(&k.as_str()) {
                    changed.push(k);
                }
            }
            bail!(
                "--resume: {flag} {} changed since the run in {} started (content hash {} now, {} then; differs in: {})",
                now.path,
                run.display(),
                now.hash,
                self.hash,
                if changed.is_empty() { "?".to_string() } else { changed.join(", ") }
            );
        }
        Ok(())
    }
}

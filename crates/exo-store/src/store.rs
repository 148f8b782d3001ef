//! The store on disk: one folder per model, named by its manifest's hash.
//!
//! ```text
//! $EXO_HOME/store/<hash>/manifest.json   the manifest, exactly the bytes its hash is taken over
//!                       /<name>.gguf     the sparse copy, full length, verified chunks in place
//!                       /held            one byte per chunk: 1 once its bytes reached the disk
//!                       /source.json     instead of the copy: the user's own file (an import)
//!                       /used            its modification time: when the model was last used
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::chunks::ChunkSet;
use crate::disk;
use crate::error::{Error, Result};
use crate::manifest::{CHUNK_BYTES, Manifest, answers_to, hash_hex, kept_in_folder};

/// The model store under one folder.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    limit: Option<u64>,
    chunk_bytes: u64,
}

/// An imported file: the user's own, described by the entry's manifest while it is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Source {
    path: PathBuf,
    bytes: u64,
    modified_ns: u128,
}

impl Source {
    /// A file, or a folder as the files the store keeps of it (their lengths added, the
    /// latest modification).
    fn of(path: &Path) -> Result<Source> {
        let stamp = |meta: &std::fs::Metadata| {
            meta.modified()
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos())
        };
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let (mut bytes, mut modified_ns) = (meta.len(), stamp(&meta));
        if meta.is_dir() {
            (bytes, modified_ns) = (0, 0);
            for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
                let entry = entry.map_err(|e| Error::io(path, e))?;
                let kept = entry.file_name().to_str().is_some_and(kept_in_folder);
                let meta = entry.metadata().map_err(|e| Error::io(&entry.path(), e))?;
                if kept && meta.is_file() {
                    bytes += meta.len();
                    modified_ns = modified_ns.max(stamp(&meta));
                }
            }
        }
        Ok(Source {
            path: path.to_owned(),
            bytes,
            modified_ns,
        })
    }
}

/// What `exo-node models ls` shows of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    /// The manifest's hash.
    pub hash: String,
    /// The model file's name.
    pub name: String,
    /// The file's length.
    pub bytes: u64,
    /// Bytes of the chunks held.
    pub held_bytes: u64,
    /// Chunks held.
    pub held_chunks: u64,
    /// Chunks in all.
    pub chunks: u32,
    /// The user's file, when the entry is an import.
    pub imported: Option<PathBuf>,
    /// When the model was last used.
    pub last_used: Option<SystemTime>,
}

/// One model in the store, open.
#[derive(Debug)]
pub struct Entry {
    hash: String,
    manifest: Manifest,
    manifest_bytes: Vec<u8>,
    dir: PathBuf,
    data: PathBuf,
    imported: bool,
    /// The model's files, open, in the manifest's order.
    files: Vec<(PathBuf, File)>,
    held: Mutex<Vec<bool>>,
    dirty: AtomicBool,
}

/// The default limit of a store at `root`: three quarters of the disk space free now, plus what
/// the store already holds (so a full store does not shrink its own limit). `None` where the OS
/// does not say.
pub fn default_limit(root: &Path) -> Option<u64> {
    let probe = std::iter::successors(Some(root), |p| p.parent()).find(|p| p.exists())?;
    let free = disk::free_bytes(probe)?;
    let held = Store {
        root: root.to_owned(),
        limit: None,
        chunk_bytes: CHUNK_BYTES,
    }
    .list()
    .map(|entries| {
        entries
            .iter()
            .filter(|e| e.imported.is_none())
            .map(|e| e.held_bytes)
            .sum::<u64>()
    })
    .unwrap_or(0);
    Some(free / 4 * 3 + held)
}

impl Store {
    /// The store at `root` (`$EXO_HOME/store`), created if missing, keeping at most `limit`
    /// bytes of fetched chunks (imports do not count: they are the user's files).
    pub fn open(root: &Path, limit: Option<u64>) -> Result<Store> {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        Ok(Store {
            root: root.to_owned(),
            limit,
            chunk_bytes: CHUNK_BYTES,
        })
    }

    /// Imports describe files in chunks of at most `bytes` ([`CHUNK_BYTES`] by default; tests
    /// use small ones to have many chunks in a tiny model).
    pub fn with_chunk_bytes(mut self, bytes: u64) -> Store {
        self.chunk_bytes = bytes.clamp(1, 64 << 20);
        self
    }

    /// The folder it lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The limit on fetched bytes, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Describes the user's model at `path` (a GGUF file, or a Hugging Face folder) so that
    /// peers can fetch its chunks:
    /// the manifest is computed once and kept while the file's size and modification time stay
    /// the same. The file is read where it is, never copied or changed.
    pub fn import(&self, path: &Path, progress: impl FnMut(u64, u64)) -> Result<Entry> {
        let path = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
        let source = Source::of(&path)?;
        for dir in self.dirs()? {
            let Ok(text) = std::fs::read(dir.join("source.json")) else {
                continue;
            };
            let same_chunks = |e: &Entry| e.manifest.chunk_bytes == self.chunk_bytes;
            if serde_json::from_slice::<Source>(&text).ok().as_ref() == Some(&source)
                && let Some(entry) = self.open_dir(&dir).ok().filter(same_chunks)
            {
                entry.touch();
                return Ok(entry);
            }
        }
        let manifest = Manifest::of_model_chunked(&path, self.chunk_bytes, progress)?;
        let bytes = manifest.to_bytes();
        let hash = hash_hex(&bytes);
        let dir = self.root.join(&hash);
        // A copy fetched earlier is superseded by the user's own file.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        disk::replace(&dir.join("manifest.json"), &bytes)?;
        let record = serde_json::to_vec(&source).unwrap_or_default();
        disk::replace(&dir.join("source.json"), &record)?;
        let entry = self.open_dir(&dir)?;
        entry.touch();
        Ok(entry)
    }

    /// Keeps a model whose manifest came from a peer, asked for by `hash`: the bytes must hash
    /// to it. An entry that exists already is opened as it is (a fetch resumes), else a sparse
    /// file of the model's length is made, holding nothing yet.
    pub fn create(&self, manifest_bytes: &[u8], hash: &str) -> Result<Entry> {
        let manifest = Manifest::from_bytes(manifest_bytes, hash)?;
        let dir = self.root.join(hash);
        if dir.join("manifest.json").exists()
            && let Ok(entry) = self.open_dir(&dir)
        {
            entry.touch();
            return Ok(entry);
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let data = dir.join(&manifest.name);
        if manifest.folder {
            std::fs::create_dir_all(&data).map_err(|e| Error::io(&data, e))?;
        }
        for span in &manifest.files {
            let path = file_path(&data, &manifest, &span.name);
            let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            // Sparse where the file system allows: only chunks written take disk space.
            file.set_len(span.bytes).map_err(|e| Error::io(&path, e))?;
        }
        disk::replace(&dir.join("held"), &vec![0u8; manifest.chunks.len()])?;
        // The manifest last: a folder without one is an unfinished creation, made again.
        disk::replace(&dir.join("manifest.json"), manifest_bytes)?;
        let entry = self.open_dir(&dir)?;
        entry.touch();
        Ok(entry)
    }

    /// The model named `name` (its file name, the file name without `.gguf`, or its manifest
    /// hash), preferring the entry that holds the most.
    pub fn find(&self, name: &str) -> Result<Option<Entry>> {
        let mut best: Option<(u64, Entry)> = None;
        for dir in self.dirs()? {
            let Ok(entry) = self.open_dir(&dir) else {
                continue;
            };
            if entry.hash != name && !entry.manifest.answers_to(name) {
                continue;
            }
            let held = entry.held().len();
            if best.as_ref().is_none_or(|(b, _)| held > *b) {
                best = Some((held, entry));
            }
        }
        Ok(best.map(|(_, e)| {
            e.touch();
            e
        }))
    }

    /// Every model in the store, least recently used first.
    pub fn list(&self) -> Result<Vec<EntryInfo>> {
        let mut infos: Vec<EntryInfo> = self
            .dirs()?
            .iter()
            .filter_map(|dir| self.open_dir(dir).ok())
            .map(|e| e.info())
            .collect();
        infos.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.hash.cmp(&b.hash)));
        Ok(infos)
    }

    /// Removes the models named `name` (as [`Store::find`] matches them). An import's record
    /// goes, never the user's file. Returns what was removed.
    pub fn remove(&self, name: &str) -> Result<Vec<EntryInfo>> {
        let mut removed = Vec::new();
        for info in self.list()? {
            if info.hash == name || answers_to(&info.name, name) {
                let dir = self.root.join(&info.hash);
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                removed.push(info);
            }
        }
        Ok(removed)
    }

    /// Makes room for `needed` more bytes of the model `keep`: while the fetched bytes held
    /// plus `needed` exceed the limit, the least recently used other model (never an import)
    /// is removed. Refused when even an empty store would not fit it.
    pub fn make_room(&self, keep: &str, needed: u64) -> Result<()> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let entries = self.list()?;
        let fetched = |e: &EntryInfo| e.imported.is_none();
        let mut used: u64 = entries
            .iter()
            .filter(|e| fetched(e))
            .map(|e| e.held_bytes)
            .sum();
        for victim in entries.iter().filter(|e| fetched(e) && e.hash != keep) {
            if used.saturating_add(needed) <= limit {
                break;
            }
            let dir = self.root.join(&victim.hash);
            tracing::info!(
                model = %victim.name,
                hash = %victim.hash,
                mib = victim.held_bytes >> 20,
                "model store: evicting the least recently used model to stay within its limit"
            );
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            used = used.saturating_sub(victim.held_bytes);
        }
        if used.saturating_add(needed) > limit {
            let model = entries
                .iter()
                .find(|e| e.hash == keep)
                .map_or_else(|| keep.to_owned(), |e| e.name.clone());
            return Err(Error::Full {
                model,
                limit_mib: limit >> 20,
                needed_mib: needed.div_ceil(1 << 20),
            });
        }
        Ok(())
    }

    fn dirs(&self) -> Result<Vec<PathBuf>> {
        let read = std::fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))?;
        Ok(read
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("manifest.json").is_file())
            .collect())
    }

    fn open_dir(&self, dir: &Path) -> Result<Entry> {
        let hash = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let manifest_path = dir.join("manifest.json");
        let manifest_bytes =
            std::fs::read(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
        let manifest = Manifest::from_bytes(&manifest_bytes, &hash)?;
        let count = manifest.chunks.len();
        let source: Option<Source> = std::fs::read(dir.join("source.json"))
            .ok()
            .and_then(|text| serde_json::from_slice(&text).ok());
        let (data, imported, held) = match source {
            Some(source) => {
                // An import stands only while the user's file is the one described.
                if Source::of(&source.path).ok().as_ref() != Some(&source) {
                    return Err(Error::Unsupported {
                        path: source.path.clone(),
                        reason: "the model changed since the store described it".to_owned(),
                    });
                }
                (source.path, true, vec![true; count])
            }
            None => {
                let data = dir.join(&manifest.name);
                let recorded = std::fs::read(dir.join("held")).unwrap_or_default();
                // A record of another length is no record: everything is fetched again.
                let held = if recorded.len() == count {
                    recorded.iter().map(|&b| b == 1).collect()
                } else {
                    vec![false; count]
                };
                (data, false, held)
            }
        };
        let files = manifest
            .files
            .iter()
            .map(|span| {
                let path = file_path(&data, &manifest, &span.name);
                File::options()
                    .read(true)
                    .write(!imported)
                    .open(&path)
                    .map(|f| (path.clone(), f))
                    .map_err(|e| Error::io(&path, e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Entry {
            hash,
            manifest,
            manifest_bytes,
            dir: dir.to_owned(),
            data,
            imported,
            files,
            held: Mutex::new(held),
            dirty: AtomicBool::new(false),
        })
    }
}

/// Where file `name` of a model is, the model being at `data` (a file, or a folder).
fn file_path(data: &Path, manifest: &Manifest, name: &str) -> PathBuf {
    if manifest.folder {
        data.join(name)
    } else {
        data.to_owned()
    }
}

impl Entry {
    /// The manifest's hash: the model's name across the cluster.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest's bytes, as its hash is taken over them (what a peer is sent).
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// The checkpoint to open (a GGUF file or a folder): the sparse copy, or the user's own
    /// for an import.
    pub fn path(&self) -> &Path {
        &self.data
    }

    /// Whether the entry is the user's own file.
    pub fn is_imported(&self) -> bool {
        self.imported
    }

    /// The chunks held.
    pub fn held(&self) -> ChunkSet {
        self.held
            .lock()
            .map(|h| ChunkSet::from_flags(&h))
            .unwrap_or_default()
    }

    /// Whether every chunk is held.
    pub fn is_complete(&self) -> bool {
        self.held
            .lock()
            .map(|h| h.iter().all(|&b| b))
            .unwrap_or(false)
    }

    /// The chunks of `wanted` not held.
    pub fn missing(&self, wanted: &ChunkSet) -> ChunkSet {
        let Ok(held) = self.held.lock() else {
            return wanted.clone();
        };
        let flags: Vec<bool> = (0..held.len())
            .map(|i| wanted.contains(i as u32) && !held[i])
            .collect();
        ChunkSet::from_flags(&flags)
    }

    /// Writes chunk `index` after checking its length and hash; a chunk that does not match is
    /// refused and nothing is written. The chunk counts as held at once for this process, and
    /// on disk after the next [`Entry::persist`].
    pub fn write_chunk(&self, index: u32, bytes: &[u8]) -> Result<()> {
        let bad = |reason: String| Error::BadChunk {
            model: self.hash.clone(),
            index,
            reason,
        };
        let chunk = self
            .manifest
            .chunks
            .get(index as usize)
            .ok_or_else(|| bad("no such chunk".to_owned()))?;
        if bytes.len() as u64 != chunk.len {
            return Err(bad(format!(
                "{} bytes, expected {}",
                bytes.len(),
                chunk.len
            )));
        }
        let actual = hash_hex(bytes);
        if actual != chunk.hash {
            return Err(bad(format!("hash {actual}, expected {}", chunk.hash)));
        }
        if self.imported {
            return Ok(());
        }
        let (file, path, at) = self.locate(index, chunk.offset)?;
        disk::write_at(file, path, bytes, at)?;
        if let Ok(mut held) = self.held.lock() {
            held[index as usize] = true;
        }
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes the chunks written so far durable: the data reaches the disk first, then the
    /// record of held chunks is replaced. A process killed at any moment keeps exactly the
    /// chunks recorded, each on disk.
    pub fn persist(&self) -> Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let record: Vec<u8> = match self.held.lock() {
            Ok(held) => held.iter().map(|&b| u8::from(b)).collect(),
            Err(_) => return Ok(()),
        };
        for (path, file) in &self.files {
            file.sync_data().map_err(|e| Error::io(path, e))?;
        }
        disk::replace(&self.dir.join("held"), &record)
    }

    /// Gives back the disk space of the chunks of `chunks` held (a node that serves other layers
    /// now), where the OS can free part of a file (Linux); they are then no longer held, and
    /// the record says so. Returns the bytes freed (0 for an import, or elsewhere).
    pub fn release(&self, chunks: &ChunkSet) -> Result<u64> {
        if self.imported {
            return Ok(0);
        }
        let mut freed = 0u64;
        for index in chunks.iter() {
            let held = self
                .held
                .lock()
                .map(|h| h.get(index as usize).copied().unwrap_or(false))
                .unwrap_or(false);
            let Some(chunk) = self.manifest.chunks.get(index as usize).filter(|_| held) else {
                continue;
            };
            let (file, path, at) = self.locate(index, chunk.offset)?;
            if !disk::punch_hole(file, path, at, chunk.len)? {
                break;
            }
            if let Ok(mut held) = self.held.lock() {
                held[index as usize] = false;
            }
            self.dirty.store(true, Ordering::Release);
            freed += chunk.len;
        }
        self.persist()?;
        Ok(freed)
    }

    /// Reads chunk `index`, which must be held.
    pub fn read_chunk(&self, index: u32) -> Result<Vec<u8>> {
        let held = self
            .held
            .lock()
            .map(|h| h.get(index as usize).copied().unwrap_or(false))
            .unwrap_or(false);
        let chunk = self.manifest.chunks.get(index as usize).filter(|_| held);
        let Some(chunk) = chunk else {
            return Err(Error::NotHeld {
                model: self.hash.clone(),
                index,
            });
        };
        let mut buffer = vec![0u8; chunk.len as usize];
        let (file, path, at) = self.locate(index, chunk.offset)?;
        disk::read_at(file, path, &mut buffer, at)?;
        Ok(buffer)
    }

    /// The open file holding the model's byte `offset` (chunk `index`'s), its path, and the
    /// offset in it.
    fn locate(&self, index: u32, offset: u64) -> Result<(&File, &Path, u64)> {
        let (i, at) = self
            .manifest
            .file_of(offset)
            .ok_or_else(|| Error::BadChunk {
                model: self.hash.clone(),
                index,
                reason: "in no file of the model".to_owned(),
            })?;
        let (path, file) = &self.files[i];
        Ok((file, path, at))
    }

    /// What `exo-node models ls` shows.
    pub fn info(&self) -> EntryInfo {
        let held = self.held();
        EntryInfo {
            hash: self.hash.clone(),
            name: self.manifest.name.clone(),
            bytes: self.manifest.bytes,
            held_bytes: self.manifest.bytes_of(&held),
            held_chunks: held.len(),
            chunks: self.manifest.chunk_count(),
            imported: self.imported.then(|| self.data.clone()),
            last_used: std::fs::metadata(self.dir.join("used"))
                .and_then(|m| m.modified())
                .ok(),
        }
    }

    /// Marks the model used now (for least-recently-used eviction).
    pub fn touch(&self) {
        let used = self.dir.join("used");
        let touched = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&used)
            .and_then(|f| f.set_modified(SystemTime::now()));
        if let Err(e) = touched {
            tracing::debug!(error = %e, path = %used.display(), "cannot mark the model used");
        }
    }
}

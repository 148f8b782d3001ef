//! Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped, and a shard is only opened when a
//! tensor in it is asked for.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensors};

use crate::error::{Error, Result};
use crate::quant::DType;

/// One mapped safetensors file with its parsed header.
#[derive(Debug)]
struct MappedFile {
    file: File,
    map: Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// The safetensors files of one checkpoint folder.
#[derive(Debug)]
pub(crate) struct SafetensorsSet {
    /// Tensor name to file name (relative to the folder).
    index: HashMap<String, String>,
    folder: PathBuf,
    open: Mutex<HashMap<String, Arc<MappedFile>>>,
}

/// A tensor's bytes and layout, borrowed from a mapped file.
pub(crate) struct RawTensor {
    pub(crate) file: PathBuf,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    map: Arc<MappedFile>,
    range: std::ops::Range<usize>,
}

impl RawTensor {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map.map[self.range.clone()]
    }

    /// Length of the tensor's data in bytes.
    pub(crate) fn range_len(&self) -> usize {
        self.range.len()
    }

    /// A copy of the bytes read with `pread`, keeping the file's pages out of resident memory.
    pub(crate) fn read(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.range.len()];
        crate::gguf::read_at(&self.map.file, &mut out, self.range.start as u64)
            .map_err(|e| Error::io(&self.file, e))?;
        Ok(out)
    }
}

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

impl SafetensorsSet {
    /// Finds the checkpoint's files in `folder`; reads the index but maps nothing yet.
    pub(crate) fn open(folder: &Path) -> Result<Self> {
        let index_path = folder.join(INDEX);
        let mut index = HashMap::new();
        let mut open = HashMap::new();
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let bad = |message: String| Error::Safetensors {
                path: index_path.clone(),
                message,
            };
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("no `weight_map` object".into()))?;
            for (name, file) in map {
                let file = file
                    .as_str()
                    .filter(|f| !f.contains('/') && !f.contains('\\') && !f.starts_with('.'))
                    .ok_or_else(|| {
                        bad(format!(
                            "weight_map entry `{name}` is not a plain file name"
                        ))
                    })?;
                index.insert(name.clone(), file.to_string());
            }
        } else {
            let path = folder.join(SINGLE);
            let mapped = map_file(&path)?;
            for name in mapped.metadata.tensors().keys() {
                index.insert(name.clone(), SINGLE.to_string());
            }
            open.insert(SINGLE.to_string(), Arc::new(mapped));
        }
        Ok(SafetensorsSet {
            index,
            folder: folder.to_path_buf(),
            open: Mutex::new(open),
        })
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensor's bytes, mapping its shard on first use. `Ok(None)` if no file has it.
    pub(crate) fn get(&self, name: &str) -> Result<Option<RawTensor>> {
        let Some(file_name) = self.index.get(name) else {
            return Ok(None);
        };
        let path = self.folder.join(file_name);
        let mapped = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            match open.get(file_name) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(map_file(&path)?);
                    open.insert(file_name.clone(), m.clone());
                    m
                }
            }
        };
        let info = mapped
            .metadata
            .info(name)
            .ok_or_else(|| Error::MissingTensor {
                path: path.clone(),
                name: name.to_string(),
            })?;
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(Error::UnsupportedDtype {
                    path,
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let (s, e) = info.data_offsets;
        let range = mapped.data_start + s..mapped.data_start + e;
        Ok(Some(RawTensor {
            file: path,
            dtype,
            shape: info.shape.clone(),
            map: mapped.clone(),
            range,
        }))
    }
}

fn map_file(path: &Path) -> Result<MappedFile> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map of a checkpoint; see `GgufFile::open`.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&map).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            message: format!("{e:?} (the file is truncated or not a safetensors file)"),
        })?;
    Ok(MappedFile {
        file,
        data_start: 8 + header_len,
        map,
        metadata,
    })
}

/// A tensor to write with [`write_safetensors`]: name, shape (rows first) and `f32` values.
pub(crate) struct F32Tensor {
    pub(crate) shape: Vec<usize>,
    pub(crate) bytes: Vec<u8>,
    pub(crate) dtype: safetensors::Dtype,
}

impl safetensors::View for &F32Tensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes tensors to one safetensors file.
pub(crate) fn write_safetensors(path: &Path, tensors: &[(String, F32Tensor)]) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(meta),
        path,
    )
    .map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: format!("writing: {e:?}"),
    })
}

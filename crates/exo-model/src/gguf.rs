//! GGUF (v2 and v3) files: metadata, the tensor index, and memory-mapped tensor data.
//!
//! The parser checks every length and offset against the file before using it, so a corrupt or
//! truncated file gives an [`Error::Gguf`] naming the problem instead of a panic.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::quant::DType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// The fewest bytes one metadata entry takes: key length, value type and a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// The fewest bytes one tensor index entry takes: name length, dimension count, one dimension,
/// element type and offset.
const MIN_TENSOR_ENTRY_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
/// The most metadata values (array items included) a file may hold. Each one becomes a
/// [`Value`] of 32 bytes in memory, so a one-byte item costs 32 times its size on disk: without a
/// bound, a 100 MB file of `u8` arrays would take 3 GB. The largest vocabularies of the families
/// we read (Gemma's 262,144 tokens with scores and types, Llama 3's 128,256 tokens with 280,147
/// merges) stay under a million values; four million leaves room and caps the cost at 128 MiB.
const MAX_METADATA_VALUES: u64 = 1 << 22;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The tensor's GGUF name.
    pub name: String,
    /// Shape, rows first (the reverse of GGUF's innermost-first `ne`).
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Length of the data in bytes.
    pub len: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open, memory-mapped GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: File,
    map: Mmap,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl GgufFile {
    /// Opens and indexes `path`. Tensor data is mapped, not read.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a checkpoint modified while mapped is the user's error
        // and can only yield wrong numbers, which every reader of mapped model files accepts.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), file, map, true)
    }

    /// Opens `path` for its tensor index only: every check [`GgufFile::open`] makes, but of the
    /// metadata only `general.alignment` is kept (a tokenizer's hundred thousand strings are
    /// not built), for tools that need only where the tensors are.
    pub fn open_index(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: as in `open`.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), file, map, false)
    }

    fn parse(path: PathBuf, file: File, map: Mmap, all_metadata: bool) -> Result<Self> {
        let mut r = Reader {
            bytes: &map,
            pos: 0,
        };
        let fail = |message: String| Error::Gguf {
            path: path.clone(),
            message,
        };
        let magic = r.take(4).map_err(&fail)?;
        if magic != MAGIC {
            return Err(fail(format!("bad magic {magic:02x?}, expected \"GGUF\"")));
        }
        let version = r.u32().map_err(&fail)?;
        if !(2..=3).contains(&version) {
            return Err(fail(format!(
                "version {version} is not supported (2 and 3 are)"
            )));
        }
        let n_tensors = r.u64().map_err(&fail)?;
        let n_kv = r.u64().map_err(&fail)?;
        // Bound both counts by what the rest of the file could hold before anything is sized
        // by them.
        let left = (map.len() - r.pos) as u64;
        let need = n_kv
            .checked_mul(MIN_KV_BYTES)
            .zip(n_tensors.checked_mul(MIN_TENSOR_ENTRY_BYTES))
            .and_then(|(a, b)| a.checked_add(b));
        if need.is_none_or(|need| need > left) {
            return Err(fail(format!(
                "the header declares {n_kv} metadata entries and {n_tensors} tensors, which \
                 cannot fit in the {left} bytes left: the file is truncated or corrupt"
            )));
        }
        // A first pass walks the metadata without building values, so that a corrupt length
        // (an array retyped to one-byte items with a count as large as the file) is found by
        // the tensor index that follows it, before any value is allocated.
        let metadata_start = r.pos;
        let mut values = 0u64;
        for i in 0..n_kv {
            let (key, ty) = r.entry_head(i).map_err(&fail)?;
            r.skip_value(ty, 0, &mut values)
                .map_err(|e| fail(format!("metadata `{key}`: {e}")))?;
        }
        if values > MAX_METADATA_VALUES {
            return Err(fail(format!(
                "the metadata holds {values} values, more than the {MAX_METADATA_VALUES} any \
                 model needs"
            )));
        }
        let mut raw = Vec::new();
        for i in 0..n_tensors {
            let name = r
                .string()
                .map_err(|e| fail(format!("tensor entry {i}: {e}")))?;
            let ctx = |e: String| fail(format!("tensor `{name}`: {e}"));
            let n_dims = r.u32().map_err(ctx)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(ctx(format!("{n_dims} dimensions (1 to 4 are valid)")));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(r.u64().map_err(ctx)?);
            }
            let code = r.u32().map_err(ctx)?;
            let offset = r.u64().map_err(ctx)?;
            raw.push((name, ne, code, offset));
        }
        let index_end = r.pos;
        r.pos = metadata_start;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let (key, ty) = r.entry_head(i).map_err(&fail)?;
            if !all_metadata && key != "general.alignment" {
                let mut skipped = 0u64;
                r.skip_value(ty, 0, &mut skipped)
                    .map_err(|e| fail(format!("metadata `{key}`: {e}")))?;
                continue;
            }
            let value = r
                .value(ty, 0)
                .map_err(|e| fail(format!("metadata `{key}`: {e}")))?;
            // With two values for one key, readers disagree on which one counts (llama.cpp
            // takes the first, a map the last): refuse rather than guess.
            if metadata.contains_key(&key) {
                return Err(fail(format!("metadata key `{key}` appears twice")));
            }
            metadata.insert(key, value);
        }
        r.pos = index_end;
        let alignment = match metadata.get("general.alignment").and_then(Value::as_u64) {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            Some(a) => return Err(fail(format!("general.alignment {a} is not a power of two"))),
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = map.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::with_capacity(raw.len());
        for (name, ne, code, offset) in raw {
            let Some(dtype) = DType::from_ggml(code) else {
                return Err(Error::UnsupportedDtype {
                    path,
                    name,
                    dtype: format!("ggml type {code}"),
                });
            };
            let elems = ne
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .and_then(|e| usize::try_from(e).ok())
                .ok_or_else(|| fail(format!("tensor `{name}`: shape {ne:?} overflows")))?;
            let len = dtype.bytes_for(elems).ok_or_else(|| {
                fail(format!(
                    "tensor `{name}`: {elems} elements are not whole {} blocks",
                    dtype.name()
                ))
            })?;
            if !offset.is_multiple_of(alignment) {
                return Err(fail(format!(
                    "tensor `{name}`: data offset {offset} is not a multiple of the alignment \
                     {alignment}"
                )));
            }
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(len as u64).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    fail(format!(
                        "tensor `{name}` ({len} bytes at data offset {offset}) runs past the end \
                         of the file ({file_len} bytes): the file is truncated"
                    ))
                })?;
            let shape = ne.iter().rev().map(|&d| d as usize).collect();
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(fail(format!("tensor `{name}` appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                shape,
                dtype,
                offset: start as usize,
                len,
            });
        }
        Ok(GgufFile {
            path,
            file,
            map,
            version,
            metadata,
            tensors,
            by_name,
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The tensor index, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor's index entry.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw (possibly quantized) bytes of a tensor, borrowed from the map.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        // Offsets were checked against the file length in `parse`.
        &self.map[info.offset..info.offset + info.len]
    }

    /// A copy of a tensor's raw bytes, read with `pread` rather than through the map, so the
    /// file's pages do not add to this process's resident memory while weights are loaded.
    pub fn read_tensor(&self, info: &TensorInfo) -> Result<Vec<u8>> {
        let mut out = vec![0u8; info.len];
        read_at(&self.file, &mut out, info.offset as u64).map_err(|e| Error::io(&self.path, e))?;
        Ok(out)
    }

    /// `len` bytes of a tensor's data from byte `start` of it (one expert of a stacked
    /// tensor), read like [`GgufFile::read_tensor`].
    pub fn read_tensor_part(&self, info: &TensorInfo, start: usize, len: usize) -> Result<Vec<u8>> {
        if start.checked_add(len).is_none_or(|end| end > info.len) {
            return Err(Error::Gguf {
                path: self.path.clone(),
                message: format!(
                    "tensor `{}`: bytes {start}..{} are outside its {} bytes",
                    info.name,
                    start.saturating_add(len),
                    info.len
                ),
            });
        }
        let mut out = vec![0u8; len];
        read_at(&self.file, &mut out, (info.offset + start) as u64)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(out)
    }
}

#[cfg(unix)]
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "needs {n} bytes at offset {} but the file ends at {}: the file is truncated",
                self.pos,
                self.bytes.len()
            )),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// The key and value type of metadata entry `i`.
    fn entry_head(&mut self, i: u64) -> Result<(String, u32), String> {
        let key = self
            .string()
            .map_err(|e| format!("metadata entry {i}: {e}"))?;
        let ty = self.u32().map_err(|e| format!("metadata `{key}`: {e}"))?;
        Ok((key, ty))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        let bytes = self.take_u64(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("string at {} is not utf-8", self.pos))
    }

    /// `take` for a length read from the file, which may not fit a `usize`.
    fn take_u64(&mut self, n: u64) -> Result<&'a [u8], String> {
        match usize::try_from(n) {
            Ok(n) => self.take(n),
            Err(_) => Err(format!(
                "length {n} at offset {} is beyond the end of the file ({} bytes)",
                self.pos,
                self.bytes.len()
            )),
        }
    }

    /// An array's item type and count, checked against the bytes left: every item takes at
    /// least [`min_value_bytes`], so a larger count is corrupt and is refused before anything
    /// is sized by it.
    fn array_header(&mut self) -> Result<(u32, u64), String> {
        let item_ty = self.u32()?;
        let count = self.u64()?;
        let min =
            min_value_bytes(item_ty).ok_or_else(|| format!("unknown value type {item_ty}"))?;
        let left = (self.bytes.len() - self.pos) as u64;
        if count.checked_mul(min).is_none_or(|need| need > left) {
            return Err(format!(
                "array of {count} items of type {item_ty} ({min} bytes or more each) cannot fit \
                 in the {left} bytes left: the file is truncated or corrupt"
            ));
        }
        Ok((item_ty, count))
    }

    /// Steps over a value without building it, checking every length on the way; `values`
    /// counts the values (array items included) that parsing it would build.
    fn skip_value(&mut self, ty: u32, depth: usize, values: &mut u64) -> Result<(), String> {
        *values += 1;
        match ty {
            8 => {
                let len = self.u64()?;
                self.take_u64(len)?;
            }
            9 => {
                if depth > 2 {
                    return Err("arrays nested too deeply".into());
                }
                let (item_ty, count) = self.array_header()?;
                match fixed_value_bytes(item_ty) {
                    // Checked by `array_header`: `count * size` fits in the bytes left.
                    Some(size) => {
                        self.take_u64(count * size)?;
                        *values += count;
                    }
                    None => {
                        for _ in 0..count {
                            self.skip_value(item_ty, depth + 1, values)?;
                        }
                    }
                }
            }
            other => {
                let size = fixed_value_bytes(other)
                    .ok_or_else(|| format!("unknown value type {other}"))?;
                self.take_u64(size)?;
            }
        }
        Ok(())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err("arrays nested too deeply".into());
                }
                let (item_ty, count) = self.array_header()?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }
}

/// The size of a value of type `ty` when it is the same for every value (numbers and bools).
fn fixed_value_bytes(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// The fewest bytes a value of type `ty` takes: a string its length, an array its item type and
/// count.
fn min_value_bytes(ty: u32) -> Option<u64> {
    match ty {
        8 => Some(8),
        9 => Some(4 + 8),
        other => fixed_value_bytes(other),
    }
}

/// A tensor to be written by [`write`]: name, shape (rows first), type and encoded bytes.
#[derive(Clone, Debug)]
pub struct TensorToWrite {
    /// GGUF name.
    pub name: String,
    /// Shape, rows first.
    pub shape: Vec<usize>,
    /// Element type of `data`.
    pub dtype: DType,
    /// Encoded data (`dtype.bytes_for(elems)` bytes).
    pub data: Vec<u8>,
}

/// Writes a GGUF v3 file. Used by tests that make small models and by tools.
pub fn write(path: &Path, metadata: &[(String, Value)], tensors: &[TensorToWrite]) -> Result<()> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        put_value(&mut out, value, true);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut out, &t.name);
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&t.dtype.ggml_code().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.data.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    }
    for t in tensors {
        out.resize(
            (out.len() as u64).div_ceil(DEFAULT_ALIGNMENT) as usize * 32,
            0,
        );
        out.extend_from_slice(&t.data);
    }
    let mut file = File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(&out).map_err(|e| Error::io(path, e))
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, value: &Value, with_type: bool) {
    if with_type {
        out.extend_from_slice(&value_type(value).to_le_bytes());
    }
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.push(*v as u8),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            let item_ty = items.first().map(value_type).unwrap_or(4);
            out.extend_from_slice(&item_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Result<PathBuf> {
        let path = dir.join("t.gguf");
        let data: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        write(
            &path,
            &[
                ("general.architecture".into(), Value::String("llama".into())),
                ("llama.block_count".into(), Value::U32(2)),
                (
                    "tokenizer.ggml.tokens".into(),
                    Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
                ),
            ],
            &[TensorToWrite {
                name: "w".into(),
                shape: vec![2, 4],
                dtype: DType::F32,
                data,
            }],
        )?;
        Ok(path)
    }

    #[test]
    fn writes_and_reads_back() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let file = GgufFile::open(&sample(dir.path())?)?;
        assert_eq!(file.version(), 3);
        assert_eq!(
            file.get("llama.block_count").and_then(Value::as_u64),
            Some(2)
        );
        let info = file
            .tensor("w")
            .cloned()
            .ok_or(Error::Template("no w".into()))?;
        assert_eq!(info.shape, vec![2, 4]);
        assert_eq!(file.tensor_bytes(&info).len(), 32);
        Ok(())
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let path = sample(dir.path())?;
        let full = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let cut = dir.path().join("cut.gguf");
        for len in 0..full.len() {
            std::fs::write(&cut, &full[..len]).map_err(|e| Error::io(&cut, e))?;
            let err = GgufFile::open(&cut).err().map(|e| e.to_string());
            let err = err.unwrap_or_else(|| format!("length {len} was accepted"));
            assert!(err.contains("cut.gguf"), "{err}");
        }
        Ok(())
    }
}

//! Checkpoint files made by the tests themselves: partial reads, format equivalence, and clear
//! errors for corrupt, truncated or mismatched files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use exo_model::gguf::{TensorToWrite, Value};
use exo_model::testing::{
    rewrite_gguf, tiny_config, write_gguf, write_gguf_typed, write_hf_folder,
};
use exo_model::{Checkpoint, DType, LayerPart, ShardSpec, TensorId};

fn err_text<T: std::fmt::Debug>(r: exo_model::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn loading_a_shard_reads_only_its_tensors_from_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let config = tiny_config(6);
    write_gguf(&path, &config, 7).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    assert!(
        checkpoint.read_stats().tensors.is_empty(),
        "opening reads no tensor"
    );

    let spec = ShardSpec {
        layers: 2..4,
        embedding: false,
        head: false,
    };
    let weights = checkpoint.load_shard(&spec).unwrap();
    assert_eq!(weights.layers.len(), 2);
    let stats = checkpoint.read_stats();
    assert_eq!(stats.tensors.len(), 2 * 9);
    assert!(
        stats
            .tensors
            .iter()
            .all(|t| t.starts_with("blk.2.") || t.starts_with("blk.3.")),
        "{:?}",
        stats.tensors
    );
    let expected_bytes: u64 = (2..4)
        .flat_map(|layer| {
            LayerPart::ALL
                .into_iter()
                .filter(|&p| checkpoint.config().has_part(p))
                .map(move |part| TensorId::Layer { layer, part })
        })
        .map(|id| checkpoint.stored_bytes(id).unwrap())
        .sum();
    assert_eq!(stats.bytes, expected_bytes);
    let file_len = std::fs::metadata(&path).unwrap().len();
    assert!(
        stats.bytes * 2 < file_len,
        "read {} of {file_len} bytes",
        stats.bytes
    );
}

#[test]
fn the_last_stage_of_a_tied_model_reads_the_embedding_as_its_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tiny_config(4), 1).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let spec = ShardSpec {
        layers: 3..4,
        embedding: false,
        head: true,
    };
    checkpoint.load_shard(&spec).unwrap();
    let read = checkpoint.read_stats().tensors;
    assert!(read.contains(&"token_embd.weight".to_string()));
    assert!(read.contains(&"output_norm.weight".to_string()));
    assert!(
        !read
            .iter()
            .any(|t| t.starts_with("blk.0.") || t.starts_with("blk.2."))
    );
}

#[test]
fn sharded_safetensors_read_only_the_needed_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("tiny");
    write_hf_folder(&folder, &tiny_config(4), 3, 3).unwrap();
    assert!(folder.join("model.safetensors.index.json").exists());
    let checkpoint = Checkpoint::open(&folder).unwrap();
    let spec = ShardSpec {
        layers: 0..1,
        embedding: true,
        head: false,
    };
    let weights = checkpoint.load_shard(&spec).unwrap();
    assert!(weights.embedding.is_some());
    let read = checkpoint.read_stats().tensors;
    assert_eq!(read.len(), 1 + 9);
    assert!(
        read.iter()
            .all(|t| t == "model.embed_tokens.weight" || t.starts_with("model.layers.0."))
    );
}

#[test]
fn gguf_and_safetensors_of_the_same_model_give_the_same_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(2);
    write_gguf(&dir.path().join("m.gguf"), &config, 11).unwrap();
    write_hf_folder(&dir.path().join("m"), &config, 11, 1).unwrap();
    let gguf = Checkpoint::open(&dir.path().join("m.gguf")).unwrap();
    let hf = Checkpoint::open(&dir.path().join("m")).unwrap();
    assert_eq!(gguf.config().num_kv_heads, hf.config().num_kv_heads);
    for part in [LayerPart::Q, LayerPart::K, LayerPart::V, LayerPart::Down] {
        let id = TensorId::Layer { layer: 1, part };
        assert_eq!(gguf.tensor(id).unwrap(), hf.tensor(id).unwrap(), "{part:?}");
    }
}

fn truncate(src: &Path, dst: &Path, len: usize) {
    let bytes = std::fs::read(src).unwrap();
    std::fs::write(dst, &bytes[..len]).unwrap();
}

#[test]
fn truncated_and_corrupt_gguf_files_name_the_file_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &tiny_config(2), 5).unwrap();
    let len = std::fs::metadata(&good).unwrap().len() as usize;
    let bad = dir.path().join("bad.gguf");

    truncate(&good, &bad, len - 100);
    let e = err_text(Checkpoint::open(&bad));
    assert!(e.contains("bad.gguf") && e.contains("truncated"), "{e}");

    truncate(&good, &bad, 40);
    let e = err_text(Checkpoint::open(&bad));
    assert!(e.contains("bad.gguf") && e.contains("truncated"), "{e}");

    let mut bytes = std::fs::read(&good).unwrap();
    bytes[0..4].copy_from_slice(b"GGML");
    std::fs::write(&bad, &bytes).unwrap();
    let e = err_text(Checkpoint::open(&bad));
    assert!(e.contains("bad.gguf") && e.contains("magic"), "{e}");

    // An absurd metadata count must not allocate or panic.
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&bad, &bytes).unwrap();
    let e = err_text(Checkpoint::open(&bad));
    assert!(e.contains("bad.gguf"), "{e}");

    std::fs::write(&bad, b"").unwrap();
    assert!(err_text(Checkpoint::open(&bad)).contains("bad.gguf"));
    assert!(err_text(Checkpoint::open(&dir.path().join("missing.gguf"))).contains("missing.gguf"));
}

#[test]
fn truncated_and_corrupt_safetensors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("m");
    write_hf_folder(&folder, &tiny_config(2), 5, 1).unwrap();
    let weights = folder.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len() as usize;
    let copy = dir.path().join("copy.safetensors");
    std::fs::copy(&weights, &copy).unwrap();

    truncate(&copy, &weights, len - 64);
    let e = err_text(Checkpoint::open(&folder));
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );

    std::fs::write(&weights, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let e = err_text(Checkpoint::open(&folder));
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::remove_file(&weights).unwrap();
    let e = err_text(Checkpoint::open(&folder));
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn a_config_with_missing_fields_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("m");
    write_hf_folder(&folder, &tiny_config(2), 5, 1).unwrap();
    let path = folder.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(&path, config.to_string()).unwrap();
    let e = err_text(Checkpoint::open(&folder));
    assert!(
        e.contains("config.json") && e.contains("num_hidden_layers"),
        "{e}"
    );

    std::fs::write(&path, "{ not json").unwrap();
    assert!(err_text(Checkpoint::open(&folder)).contains("config.json"));
}

#[test]
fn a_config_that_disagrees_with_the_weights_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("m");
    write_hf_folder(&folder, &tiny_config(2), 5, 1).unwrap();
    let path = folder.join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 48");
    std::fs::write(&path, text).unwrap();
    let checkpoint = Checkpoint::open(&folder).unwrap();
    let e = err_text(checkpoint.load_shard(&ShardSpec::whole(2)));
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("[48, 32]") && e.contains("[64, 32]"),
        "{e}"
    );
}

#[test]
fn a_tokenizer_that_does_not_match_the_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut big = tiny_config(1);
    big.vocab_size = 160;
    let gguf = dir.path().join("big.gguf");
    write_gguf(&gguf, &big, 1).unwrap();
    let tokenizer = Checkpoint::open(&gguf).unwrap().tokenizer().unwrap();

    let folder = dir.path().join("m");
    write_hf_folder(&folder, &tiny_config(1), 5, 1).unwrap();
    std::fs::write(folder.join("tokenizer.json"), tokenizer.to_json().unwrap()).unwrap();
    let e = err_text(Checkpoint::open(&folder).unwrap().tokenizer());
    assert!(
        e.contains("tokenizer.json") && e.contains("does not belong"),
        "{e}"
    );

    std::fs::write(folder.join("tokenizer.json"), "{\"broken\": true}").unwrap();
    let e = err_text(Checkpoint::open(&folder).unwrap().tokenizer());
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn a_layer_range_beyond_the_model_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tiny_config(2), 1).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let spec = ShardSpec {
        layers: 1..5,
        embedding: false,
        head: false,
    };
    let e = err_text(checkpoint.load_shard(&spec));
    assert!(e.contains("1..5") && e.contains("2 layers"), "{e}");
}

fn set_metadata(metadata: &mut [(String, Value)], key: &str, value: Value) {
    let entry = metadata.iter_mut().find(|(k, _)| k == key).unwrap();
    entry.1 = value;
}

fn tensor_data<'a>(tensors: &'a mut [TensorToWrite], name: &str) -> &'a mut Vec<u8> {
    &mut tensors.iter_mut().find(|t| t.name == name).unwrap().data
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

thread_local! {
    /// The largest single allocation this thread has asked for, so that a test can show that a
    /// corrupt count was refused before anything was sized by it (tests run on threads of their
    /// own, so one test's allocations do not show in another's).
    static LARGEST_ALLOCATION: Cell<usize> = const { Cell::new(0) };
}

fn note_allocation(size: usize) {
    // `try_with`: the allocator also serves a thread's last moments, after its locals are gone.
    let _ = LARGEST_ALLOCATION.try_with(|largest| largest.set(largest.get().max(size)));
}

struct Tracking;

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, which is the system allocator's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        // SAFETY: as for `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

#[test]
fn a_block_count_beyond_the_layers_present_names_both_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &tiny_config(2), 5).unwrap();
    let bad = dir.path().join("bad.gguf");
    rewrite_gguf(&good, &bad, |metadata, _| {
        set_metadata(metadata, "llama.block_count", Value::U32(u32::MAX));
    })
    .unwrap();
    let e = err_text(Checkpoint::open(&bad));
    assert!(
        e.contains("bad.gguf")
            && e.contains("`llama.block_count` is 4294967295")
            && e.contains("tensors for 2 layers")
            && e.contains("blk.2.attn_norm.weight"),
        "{e}"
    );

    // One layer more than the file holds is refused the same way.
    rewrite_gguf(&good, &bad, |metadata, _| {
        set_metadata(metadata, "llama.block_count", Value::U32(3));
    })
    .unwrap();
    let e = err_text(Checkpoint::open(&bad));
    assert!(e.contains("is 3") && e.contains("2 layers"), "{e}");
}

#[test]
fn an_absurd_context_length_is_refused_and_a_long_one_capped() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &tiny_config(1), 5).unwrap();
    let bad = dir.path().join("bad.gguf");
    rewrite_gguf(&good, &bad, |metadata, _| {
        set_metadata(metadata, "llama.context_length", Value::U32(u32::MAX));
    })
    .unwrap();
    let e = err_text(Checkpoint::open(&bad));
    assert!(
        e.contains("bad.gguf")
            && e.contains("`llama.context_length` is 4294967295")
            && e.contains("16777216"),
        "{e}"
    );

    // Plausible but longer than the runtime prepares for: opened, with the context capped.
    let long = dir.path().join("long.gguf");
    rewrite_gguf(&good, &long, |metadata, _| {
        set_metadata(metadata, "llama.context_length", Value::U32(1 << 23));
    })
    .unwrap();
    let checkpoint = Checkpoint::open(&long).unwrap();
    assert_eq!(checkpoint.config().max_position_embeddings, 1 << 20);
}

#[test]
fn a_token_array_retyped_to_bytes_with_a_huge_count_allocates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &tiny_config(1), 5).unwrap();
    // 16 MiB of trailing bytes give a one-byte-item count room to pass a plain bytes-left check:
    // the old parser then built 16 million 32-byte values (512 MiB) before failing.
    let mut bytes = std::fs::read(&good).unwrap();
    bytes.resize(bytes.len() + (16 << 20), 0);
    let key = b"tokenizer.ggml.tokens";
    // key, value type (array), item type (string), count
    let item_type = find(&bytes, key) + key.len() + 4;
    assert_eq!(bytes[item_type..item_type + 4], 8u32.to_le_bytes());
    bytes[item_type..item_type + 4].copy_from_slice(&0u32.to_le_bytes());
    let count = item_type + 4;
    let bad = dir.path().join("bad.gguf");

    // A count the rest of the file cannot hold is refused by name.
    bytes[count..count + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&bad, &bytes).unwrap();
    let e = err_text(Checkpoint::open(&bad));
    assert!(
        e.contains("bad.gguf")
            && e.contains("metadata `tokenizer.ggml.tokens`")
            && e.contains(&format!("array of {} items", u64::MAX / 2)),
        "{e}"
    );

    // A count that fits the bytes left swallows the tensor index, which is found missing
    // before any value is built.
    let left = (bytes.len() - count - 8) as u64;
    bytes[count..count + 8].copy_from_slice(&left.to_le_bytes());
    std::fs::write(&bad, &bytes).unwrap();
    drop(bytes);
    LARGEST_ALLOCATION.with(|largest| largest.set(0));
    let e = err_text(Checkpoint::open(&bad));
    assert!(e.contains("bad.gguf") && e.contains("truncated"), "{e}");
    let largest = LARGEST_ALLOCATION.with(Cell::get);
    assert!(largest < 1 << 20, "an allocation of {largest} bytes");
}

#[test]
fn metadata_with_more_values_than_any_model_needs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &tiny_config(1), 5).unwrap();
    let small = dir.path().join("small.gguf");
    rewrite_gguf(&good, &small, |metadata, _| {
        metadata.push((
            "general.padding".into(),
            Value::Array(vec![Value::U8(0); 32]),
        ));
    })
    .unwrap();
    // Grown in place to 5 Mi one-byte items (more than the 4 Mi values allowed, and well
    // formed): the tensor index and data move by a multiple of the alignment, so they stay valid.
    let mut bytes = std::fs::read(&small).unwrap();
    let key = b"general.padding";
    let count = find(&bytes, key) + key.len() + 4 + 4;
    assert_eq!(bytes[count..count + 8], 32u64.to_le_bytes());
    let extra = (5 << 20) - 32;
    bytes[count..count + 8].copy_from_slice(&(5u64 << 20).to_le_bytes());
    bytes.splice(count + 8..count + 8, std::iter::repeat_n(0u8, extra));
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    drop(bytes);
    LARGEST_ALLOCATION.with(|largest| largest.set(0));
    let e = err_text(Checkpoint::open(&bad));
    assert!(
        e.contains("bad.gguf") && e.contains("values, more than the 4194304"),
        "{e}"
    );
    let largest = LARGEST_ALLOCATION.with(Cell::get);
    assert!(largest < 1 << 20, "an allocation of {largest} bytes");
}

#[test]
fn a_duplicate_metadata_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &tiny_config(1), 5).unwrap();
    let bad = dir.path().join("bad.gguf");
    rewrite_gguf(&good, &bad, |metadata, _| {
        metadata.push(("llama.embedding_length".into(), Value::U32(64)));
    })
    .unwrap();
    let e = err_text(Checkpoint::open(&bad));
    assert!(
        e.contains("bad.gguf") && e.contains("`llama.embedding_length` appears twice"),
        "{e}"
    );
}

#[test]
fn an_unaligned_tensor_offset_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &tiny_config(1), 5).unwrap();
    let mut bytes = std::fs::read(&good).unwrap();
    // The index entry: name, dimension count, dimensions, element type, offset.
    let name = b"token_embd.weight";
    let offset = find(&bytes, name) + name.len() + 4 + 2 * 8 + 4;
    assert_eq!(bytes[offset..offset + 8], 0u64.to_le_bytes());
    bytes[offset..offset + 8].copy_from_slice(&4u64.to_le_bytes());
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let e = err_text(Checkpoint::open(&bad));
    assert!(
        e.contains("bad.gguf")
            && e.contains("tensor `token_embd.weight`")
            && e.contains("offset 4 is not a multiple of the alignment 32"),
        "{e}"
    );
}

#[test]
fn a_nan_scale_in_a_quantized_tensor_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf_typed(&good, &tiny_config(2), 5, &|_| DType::Q8_0).unwrap();
    let bad = dir.path().join("bad.gguf");
    rewrite_gguf(&good, &bad, |_, tensors| {
        let data = tensor_data(tensors, "blk.1.ffn_down.weight");
        // Block 3's f16 scale (Q8_0 blocks are 34 bytes, the scale first) becomes a NaN.
        data[3 * 34..3 * 34 + 2].copy_from_slice(&0x7e00u16.to_le_bytes());
    })
    .unwrap();
    let checkpoint = Checkpoint::open(&bad).unwrap();
    checkpoint.load_shard(&ShardSpec::whole(1)).unwrap();
    let e = err_text(checkpoint.load_shard(&ShardSpec::whole(2)));
    assert!(
        e.contains("bad.gguf")
            && e.contains("tensor `blk.1.ffn_down.weight`")
            && e.contains("NaN or infinite scale of block 3"),
        "{e}"
    );
    // The stored path (quantized weights kept) is refused the same way.
    let id = TensorId::Layer {
        layer: 1,
        part: LayerPart::Down,
    };
    let e = err_text(checkpoint.stored_tensor(id));
    assert!(e.contains("scale of block 3"), "{e}");
}

#[test]
fn a_nan_in_a_norm_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &tiny_config(2), 5).unwrap();
    let bad = dir.path().join("bad.gguf");
    rewrite_gguf(&good, &bad, |_, tensors| {
        let data = tensor_data(tensors, "blk.0.attn_norm.weight");
        data[5 * 4..6 * 4].copy_from_slice(&f32::NAN.to_le_bytes());
    })
    .unwrap();
    let checkpoint = Checkpoint::open(&bad).unwrap();
    let e = err_text(checkpoint.load_shard(&ShardSpec::whole(2)));
    assert!(
        e.contains("bad.gguf")
            && e.contains("tensor `blk.0.attn_norm.weight`")
            && e.contains("NaN or infinite value of element 5"),
        "{e}"
    );
}

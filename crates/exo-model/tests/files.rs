//! Checkpoint files made by the tests themselves: partial reads, format equivalence, and clear
//! errors for corrupt, truncated or mismatched files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use exo_model::testing::{tiny_config, write_gguf, write_hf_folder};
use exo_model::{Checkpoint, LayerPart, ShardSpec, TensorId};

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
                .filter(|p| !p.is_bias())
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

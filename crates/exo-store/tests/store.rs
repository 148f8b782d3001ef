//! The store on real (tiny) GGUF files: manifests, verified chunks, partial copies that the
//! checkpoint reader loads a shard from, resuming after a process ends, eviction.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use exo_model::{Checkpoint, ShardSpec};
use exo_store::{ChunkSet, Entry, Error, Manifest, ShardParts, Store};

fn model(dir: &Path, layers: usize, tied: bool) -> PathBuf {
    let path = dir.join("tiny.gguf");
    let mut config = exo_model::testing::tiny_config(layers);
    config.tie_word_embeddings = tied;
    exo_model::testing::write_gguf(&path, &config, 7).unwrap();
    path
}

/// The model at `path` imported into a store under `dir` (in chunks of `chunk` bytes): a peer
/// that has it.
fn imported(dir: &Path, path: &Path, chunk: u64) -> Entry {
    Store::open(&dir.join("a"), None)
        .unwrap()
        .with_chunk_bytes(chunk)
        .import(path, |_, _| {})
        .unwrap()
}

/// A store at `root` and an empty entry in it for `source`'s model: a node that lacks it.
fn lacking(root: &Path, source: &Entry) -> (Store, Entry) {
    let store = Store::open(root, None).unwrap();
    let entry = store
        .create(source.manifest_bytes(), source.hash())
        .unwrap();
    (store, entry)
}

fn copy(from: &exo_store::Entry, to: &exo_store::Entry, set: &ChunkSet) {
    for i in set.iter() {
        to.write_chunk(i, &from.read_chunk(i).unwrap()).unwrap();
    }
}

#[test]
fn a_manifest_covers_the_header_and_every_tensor_and_its_hash_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = model(dir.path(), 3, true);
    let manifest = Manifest::of_model_chunked(&path, 256, |_, _| {}).unwrap();
    let gguf = exo_model::gguf::GgufFile::open(&path).unwrap();
    assert_eq!(manifest.tensors.len(), gguf.tensors().len());
    assert!(!manifest.header().is_empty());
    for t in &manifest.tensors {
        let info = gguf.tensor(&t.name).unwrap();
        assert_eq!((t.offset, t.bytes), (info.offset as u64, info.len as u64));
    }
    assert!(manifest.chunks.iter().all(|c| c.len <= 256));
    let bytes = manifest.to_bytes();
    let hash = manifest.hash();
    assert_eq!(Manifest::from_bytes(&bytes, &hash).unwrap(), manifest);
    // One changed byte: another hash, refused.
    let mut forged = bytes.clone();
    let at = forged.len() / 2;
    forged[at] ^= 1;
    assert!(matches!(
        Manifest::from_bytes(&forged, &hash),
        Err(Error::ManifestHash { .. })
    ));
    // A manifest that hashes right but lies about its chunks is refused too.
    let mut lying = manifest.clone();
    lying.chunks[0].offset = lying.bytes;
    let lying_bytes = lying.to_bytes();
    let lying_hash = exo_store::hash_hex(&lying_bytes);
    assert!(matches!(
        Manifest::from_bytes(&lying_bytes, &lying_hash),
        Err(Error::BadManifest { .. })
    ));
}

#[test]
fn a_partial_copy_loads_its_shard_reading_only_the_chunks_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let path = model(dir.path(), 4, false);
    let source = imported(dir.path(), &path, 512);
    assert!(source.is_imported() && source.is_complete());
    let (_store, entry) = lacking(&dir.path().join("b"), &source);
    assert!(entry.held().is_empty());
    let parts = ShardParts {
        layers: 2..4,
        embedding: false,
        head: true,
    };
    let wanted = entry.manifest().chunks_for_shard(&parts);
    assert!(wanted.len() < u64::from(entry.manifest().chunk_count()));
    copy(&source, &entry, &wanted);
    assert_eq!(entry.missing(&wanted), ChunkSet::new());
    entry.persist().unwrap();

    let spec = ShardSpec {
        layers: 2..4,
        embedding: false,
        head: true,
    };
    let partial = Checkpoint::open(entry.path()).unwrap();
    let whole = Checkpoint::open(&path).unwrap();
    let (a, b) = (
        partial.load_shard(&spec).unwrap(),
        whole.load_shard(&spec).unwrap(),
    );
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    // Every tensor the shard read lies in the chunks fetched.
    let manifest = entry.manifest();
    for name in partial.read_stats().tensors {
        let t = manifest.tensors.iter().find(|t| t.name == name).unwrap();
        assert!(
            (t.first..t.first + t.count).all(|i| wanted.contains(i)),
            "{name} was read but not fetched"
        );
    }
}

#[test]
fn the_first_and_last_stage_of_a_tied_model_both_take_the_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let path = model(dir.path(), 2, true);
    let manifest = Manifest::of_model_chunked(&path, 1 << 20, |_, _| {}).unwrap();
    let embedding = manifest
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .unwrap()
        .first;
    let shard = |layers, embedding, head| {
        manifest.chunks_for_shard(&ShardParts {
            layers,
            embedding,
            head,
        })
    };
    assert!(shard(0..1, true, false).contains(embedding));
    assert!(shard(1..2, false, true).contains(embedding));
    assert!(!shard(1..2, false, false).contains(embedding));
    let layer1 = manifest
        .tensors
        .iter()
        .find(|t| t.name.starts_with("blk.1."))
        .unwrap()
        .first;
    assert!(!shard(0..1, true, false).contains(layer1));
    assert!(shard(0..2, true, true).covers(manifest.chunk_count()));
}

#[test]
fn a_corrupt_chunk_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = model(dir.path(), 2, true);
    let source = imported(dir.path(), &path, 512);
    let (store, entry) = lacking(&dir.path().join("b"), &source);
    let mut bytes = source.read_chunk(3).unwrap();
    bytes[0] ^= 0x40;
    assert!(matches!(
        entry.write_chunk(3, &bytes),
        Err(Error::BadChunk { index: 3, .. })
    ));
    assert!(matches!(
        entry.write_chunk(3, &bytes[1..]),
        Err(Error::BadChunk { .. })
    ));
    assert!(entry.held().is_empty());
    assert!(matches!(entry.read_chunk(3), Err(Error::NotHeld { .. })));
    // A manifest asked for by another hash is refused before anything is made.
    assert!(matches!(
        store.create(source.manifest_bytes(), &"0".repeat(64)),
        Err(Error::ManifestHash { .. })
    ));
}

#[test]
fn a_fetch_resumes_with_exactly_the_chunks_that_reached_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = model(dir.path(), 3, true);
    let source = imported(dir.path(), &path, 512);
    let root = dir.path().join("b");
    let count = source.manifest().chunk_count();
    let (first, rest): (Vec<u32>, Vec<u32>) = (0..count).partition(|i| i % 3 != 0);
    {
        let entry = Store::open(&root, None)
            .unwrap()
            .create(source.manifest_bytes(), source.hash())
            .unwrap();
        for &i in &first {
            entry
                .write_chunk(i, &source.read_chunk(i).unwrap())
                .unwrap();
        }
        entry.persist().unwrap();
        // Written but never persisted: as if the process was killed here.
        entry
            .write_chunk(rest[0], &source.read_chunk(rest[0]).unwrap())
            .unwrap();
    }
    let store = Store::open(&root, None).unwrap();
    let entry = store.find("tiny").unwrap().unwrap();
    let missing = entry.missing(&ChunkSet::all(count));
    assert_eq!(missing.iter().collect::<Vec<_>>(), rest);
    copy(&source, &entry, &missing);
    entry.persist().unwrap();
    assert!(entry.is_complete());
    // Put together, the copy is the file byte for byte (GGUF pads with zeros, and the holes
    // between tensors read as zeros).
    assert_eq!(
        std::fs::read(entry.path()).unwrap(),
        std::fs::read(&path).unwrap()
    );
}

#[test]
fn the_limit_evicts_the_least_recently_used_model_and_never_an_import() {
    let dir = tempfile::tempdir().unwrap();
    let mut sources = Vec::new();
    for seed in 0..3u64 {
        let sub = dir.path().join(format!("m{seed}"));
        std::fs::create_dir_all(&sub).unwrap();
        let path = sub.join(format!("model{seed}.gguf"));
        exo_model::testing::write_gguf(&path, &exo_model::testing::tiny_config(2), seed).unwrap();
        sources.push(
            Store::open(&dir.path().join("imports"), None)
                .unwrap()
                .import(&path, |_, _| {})
                .unwrap(),
        );
    }
    let size = sources[0].manifest().bytes;
    let root = dir.path().join("store");
    let unlimited = Store::open(&root, None).unwrap();
    for source in &sources[..2] {
        let entry = unlimited
            .create(source.manifest_bytes(), source.hash())
            .unwrap();
        copy(
            source,
            &entry,
            &ChunkSet::all(entry.manifest().chunk_count()),
        );
        entry.persist().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Room for two models: the third evicts the first, the least recently used.
    let store = Store::open(&root, Some(size * 2 + size / 2)).unwrap();
    let third = store
        .create(sources[2].manifest_bytes(), sources[2].hash())
        .unwrap();
    store.make_room(third.hash(), size).unwrap();
    let left: Vec<String> = store.list().unwrap().into_iter().map(|e| e.name).collect();
    assert!(!left.contains(&"model0.gguf".to_owned()), "{left:?}");
    assert!(left.contains(&"model1.gguf".to_owned()), "{left:?}");
    // More than the limit allows at all: refused, naming the flag.
    let err = store.make_room(third.hash(), size * 3).unwrap_err();
    assert!(err.to_string().contains("--store-limit"), "{err}");
    // Imports never count and are never evicted; removing one keeps the user's file.
    let imports = Store::open(&dir.path().join("imports"), Some(1)).unwrap();
    imports.make_room("x", 0).unwrap();
    assert_eq!(imports.list().unwrap().len(), 3);
    let removed = imports.remove("model0").unwrap();
    assert_eq!(removed.len(), 1);
    assert!(dir.path().join("m0/model0.gguf").exists());
}

#[test]
fn a_hugging_face_folder_is_kept_file_by_file_and_a_partial_copy_loads_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("tiny-hf");
    let config = exo_model::testing::tiny_config(4);
    exo_model::testing::write_hf_folder(&folder, &config, 9, 2).unwrap();
    // Files the checkpoint reader does not open stay out of the manifest.
    std::fs::write(folder.join("README.md"), "a model card").unwrap();
    let source = imported(dir.path(), &folder, 512);
    let manifest = source.manifest();
    assert!(manifest.folder);
    let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"
        ]
    );
    let (_store, entry) = lacking(&dir.path().join("b"), &source);
    assert!(entry.path().ends_with("tiny-hf") && entry.path().is_dir());
    // The header alone opens as a checkpoint: configuration, index, safetensors headers.
    copy(&source, &entry, &manifest.header());
    assert!(Checkpoint::open(entry.path()).is_ok());
    let spec = ShardSpec {
        layers: 1..3,
        embedding: false,
        head: false,
    };
    let wanted = manifest.chunks_for_shard(&ShardParts {
        layers: 1..3,
        embedding: false,
        head: false,
    });
    copy(&source, &entry, &wanted);
    entry.persist().unwrap();
    assert!(wanted.len() < u64::from(manifest.chunk_count()));
    let partial = Checkpoint::open(entry.path()).unwrap();
    let whole = Checkpoint::open(&folder).unwrap();
    assert_eq!(
        format!("{:?}", partial.load_shard(&spec).unwrap()),
        format!("{:?}", whole.load_shard(&spec).unwrap())
    );
    for name in partial.read_stats().tensors {
        let t = manifest.tensors.iter().find(|t| t.name == name).unwrap();
        assert!(
            (t.first..t.first + t.count).all(|i| wanted.contains(i)),
            "{name} was read but not fetched"
        );
    }
    // The whole copy is the folder's kept files, byte for byte.
    copy(&source, &entry, &ChunkSet::all(manifest.chunk_count()));
    for f in &manifest.files {
        assert_eq!(
            std::fs::read(entry.path().join(&f.name)).unwrap(),
            std::fs::read(folder.join(&f.name)).unwrap(),
            "{}",
            f.name
        );
    }
    assert!(!entry.path().join("README.md").exists());
}

#[test]
fn chunks_given_back_free_their_disk_and_are_no_longer_held() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.gguf");
    let mut config = exo_model::testing::tiny_config(4);
    (config.hidden_size, config.intermediate_size) = (128, 512);
    exo_model::testing::write_gguf(&path, &config, 3).unwrap();
    let source = imported(dir.path(), &path, 64 << 10);
    let (store, entry) = lacking(&dir.path().join("b"), &source);
    let all = ChunkSet::all(entry.manifest().chunk_count());
    copy(&source, &entry, &all);
    entry.persist().unwrap();
    let first_layers = entry.manifest().chunks_for_shard(&ShardParts {
        layers: 0..2,
        embedding: true,
        head: false,
    });
    let others = all.difference(&first_layers);
    #[cfg(target_os = "linux")]
    let blocks =
        || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(entry.path()).unwrap());
    #[cfg(target_os = "linux")]
    let before = blocks();
    let freed = entry.release(&others).unwrap();
    if cfg!(target_os = "linux") {
        assert_eq!(freed, entry.manifest().bytes_of(&others));
        assert_eq!(entry.held(), first_layers);
        #[cfg(target_os = "linux")]
        assert!(
            blocks() * 512 <= before * 512 - freed / 2,
            "the disk space was not freed"
        );
        // The record on disk says so, and what is left still loads its shard.
        let reopened = store.find("big").unwrap().unwrap();
        assert_eq!(reopened.held(), first_layers);
        let spec = ShardSpec {
            layers: 0..2,
            embedding: true,
            head: false,
        };
        let partial = Checkpoint::open(reopened.path()).unwrap();
        let whole = Checkpoint::open(&path).unwrap();
        assert_eq!(
            format!("{:?}", partial.load_shard(&spec).unwrap()),
            format!("{:?}", whole.load_shard(&spec).unwrap())
        );
    } else {
        assert_eq!(freed, 0);
    }
}

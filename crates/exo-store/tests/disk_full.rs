//! A disk that fills up during a fetch: the write is refused with an error that says so, and
//! the store stays consistent (every chunk it records as held is on disk and verifies).
//!
//! Needs root (a 256 KiB tmpfs is mounted on a temporary folder, and unmounted after); prints
//! SKIP elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use exo_store::{Error, Store};

/// A tmpfs of `size` mounted on `at` for as long as this lives.
struct Mounted(PathBuf);

impl Mounted {
    fn tmpfs(at: &Path, size: &str) -> Option<Mounted> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .ok()?;
        out.status.success().then(|| Mounted(at.to_owned()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

#[test]
fn a_full_disk_is_named_and_the_store_stays_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let Some(_mounted) = Mounted::tmpfs(&small, "256k") else {
        eprintln!("SKIP: cannot mount a tmpfs here (needs root)");
        return;
    };
    // A model of about 1.3 MB, in 16 KiB chunks.
    let path = dir.path().join("big.gguf");
    let mut config = exo_model::testing::tiny_config(4);
    (config.hidden_size, config.intermediate_size) = (128, 512);
    exo_model::testing::write_gguf(&path, &config, 3).unwrap();
    let source = Store::open(&dir.path().join("a"), None)
        .unwrap()
        .with_chunk_bytes(16 << 10)
        .import(&path, |_, _| {})
        .unwrap();
    let store = Store::open(&small.join("store"), None).unwrap();
    let entry = store
        .create(source.manifest_bytes(), source.hash())
        .unwrap();
    let mut full = None;
    for i in 0..entry.manifest().chunk_count() {
        match entry.write_chunk(i, &source.read_chunk(i).unwrap()) {
            Ok(()) => {
                if i % 4 == 0 {
                    // Persisting may itself find the disk full: the old record then stands.
                    let _ = entry.persist();
                }
            }
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let full = full.expect("256 KiB cannot hold a 1.3 MB model");
    assert!(matches!(full, Error::DiskFull { .. }), "{full}");
    assert!(full.to_string().contains("no space left"), "{full}");
    let _ = entry.persist();
    drop(entry);
    // Opened again, every chunk recorded as held is on disk, byte for byte.
    let again = store.find("big").unwrap().unwrap();
    let held = again.held();
    assert!(!held.is_empty());
    assert!(held.len() < u64::from(again.manifest().chunk_count()));
    for i in held.iter() {
        assert_eq!(
            again.read_chunk(i).unwrap(),
            source.read_chunk(i).unwrap(),
            "chunk {i}"
        );
    }
    // And a copy of those chunks verifies: nothing unverified was recorded.
    let check = Store::open(&dir.path().join("c"), None)
        .unwrap()
        .create(source.manifest_bytes(), source.hash())
        .unwrap();
    for i in held.iter() {
        check.write_chunk(i, &again.read_chunk(i).unwrap()).unwrap();
    }
    assert_eq!(check.held(), held);
}

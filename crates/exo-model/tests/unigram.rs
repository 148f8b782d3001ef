//! SentencePiece's Unigram tokenizer from GGUF metadata (`tokenizer.ggml.model` `t5`) gives
//! llama.cpp's ids: a small vocabulary written by `exo_model::testing::write_unigram_gguf`,
//! with and without `remove_extra_whitespaces`, against `llama-tokenize`'s output on the same
//! files (`tests/fixtures/unigram-llama.cpp.json`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exo_model::Tokenizer;
use exo_model::gguf::GgufFile;
use exo_model::testing::{UNIGRAM_SAMPLES, write_unigram_gguf};

#[test]
fn unigram_ids_equal_llama_cpps_and_decode_back() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/unigram-llama.cpp.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for merge in [false, true] {
        let path = dir.path().join(format!("unigram-{merge}.gguf"));
        write_unigram_gguf(&path, merge).unwrap();
        let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        let theirs = &fixture["ids"][format!("remove_extra_whitespaces_{merge}")];
        for (i, text) in UNIGRAM_SAMPLES.iter().enumerate() {
            let want: Vec<u32> = serde_json::from_value(theirs[i].clone()).unwrap();
            let ids = tokenizer.encode(text).unwrap();
            assert_eq!(ids, want, "merge {merge}: {text:?}");
            // Text every character of which the vocabulary covers decodes back as it was
            // (with runs of spaces kept where they are not merged).
            let covered = !text.contains(['z', 'Q', '\u{fc}', '\u{1f642}']);
            if covered && !merge {
                assert_eq!(tokenizer.decode(&ids).unwrap(), *text);
            }
        }
    }
}

#[test]
fn an_unsupported_tokenizer_model_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.gguf");
    write_unigram_gguf(&path, false).unwrap();
    let edited = dir.path().join("rwkv.gguf");
    exo_model::testing::rewrite_gguf(&path, &edited, |meta, _| {
        for (k, v) in meta.iter_mut() {
            if k == "tokenizer.ggml.model" {
                *v = exo_model::gguf::Value::String("rwkv".into());
            }
        }
    })
    .unwrap();
    let err = Tokenizer::from_gguf(&GgufFile::open(&edited).unwrap())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("`rwkv`") && err.contains("`t5`"), "{err}");
}

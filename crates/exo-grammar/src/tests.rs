#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use proptest::prelude::*;
use serde_json::json;

/// A vocabulary like a real one in miniature: every byte, some multi-byte pieces of JSON and
/// words, and two control tokens that end a generation.
fn vocabulary() -> (Vec<Vec<u8>>, Vec<u32>) {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for piece in [
        "{\"",
        "\": ",
        "\", \"",
        "\"}",
        "true",
        "false",
        "null",
        "name",
        "age",
        " the",
        "ing",
        "12",
        "\n",
        "  ",
        "<tool_call>",
        "</tool_call>",
    ] {
        tokens.push(piece.as_bytes().to_vec());
    }
    let end = tokens.len() as u32;
    tokens.push(b"\xFF<|im_end|>".to_vec());
    tokens.push(b"\xFF<|endoftext|>".to_vec());
    (tokens, vec![end, end + 1])
}

fn grammars() -> Grammars {
    let (tokens, eos) = vocabulary();
    Grammars::new(&tokens, &eos).unwrap()
}

/// Samples `guide`'s output with random logits (a seeded stand-in for a model that knows
/// nothing), at most `limit` tokens; returns the text and whether it ended with EOS.
fn run(grammars: &Grammars, guide: &mut Guide, seed: u64, limit: usize) -> (String, bool) {
    let (tokens, eos) = vocabulary();
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as f32 / (1u64 << 31) as f32
    };
    let _ = grammars;
    let mut out = Vec::new();
    for _ in 0..limit {
        // Random logits, with the model's own wish to stop: EOS ranks high once allowed.
        let mut logits: Vec<f32> = (0..tokens.len() + 3).map(|_| next() * 4.0).collect();
        for &e in &eos {
            logits[e as usize] = 3.5;
        }
        guide.restrict(&mut logits).unwrap();
        let token = argmax(&logits);
        if eos.contains(&token) {
            guide.accept(token).unwrap();
            return (String::from_utf8_lossy(&out).into_owned(), true);
        }
        guide.accept(token).unwrap();
        out.extend_from_slice(&tokens[token as usize]);
    }
    (String::from_utf8_lossy(&out).into_owned(), false)
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn any_json_object_comes_out_whole() {
    let g = grammars();
    for seed in 0..5 {
        let mut guide = g.guide(&OutputConstraint::json_object()).unwrap();
        let (text, ended) = run(&g, &mut guide, seed, 400);
        if ended {
            match serde_json::from_str::<Value>(&text) {
                Ok(value) => assert!(value.is_object(), "{text}"),
                // JSON sets no bound on exponents (`1E32678`); serde_json's f64 does.
                Err(e) if e.to_string().contains("number out of range") => {}
                Err(e) => panic!("seed {seed}: {e}: {text:?}"),
            }
        }
    }
}

#[test]
fn a_schema_that_is_not_json_or_not_a_schema_is_refused_with_the_reason() {
    let g = grammars();
    let e = g
        .guide(&OutputConstraint::JsonSchema("{not json".into()))
        .unwrap_err();
    assert!(e.to_string().contains("not JSON"), "{e}");
    let e = g
        .guide(&OutputConstraint::JsonSchema("[1, 2]".into()))
        .unwrap_err();
    assert!(e.to_string().contains("an array"), "{e}");
    // A type the engine does not know.
    let e = g
        .guide(&OutputConstraint::JsonSchema(
            json!({"type": "colour"}).to_string(),
        ))
        .unwrap_err();
    assert!(e.to_string().contains("colour"), "{e}");
    let e = g
        .guide(&OutputConstraint::Lark("start: (".into()))
        .unwrap_err();
    assert!(!e.to_string().is_empty());
}

#[test]
fn a_vocabulary_without_an_end_token_is_refused() {
    let (tokens, _) = vocabulary();
    let e = Grammars::new(&tokens, &[]).unwrap_err();
    assert!(e.to_string().contains("end-of-sequence"), "{e}");
    assert!(Grammars::new(&tokens, &[100_000]).is_err());
}

#[test]
fn a_finished_grammar_leaves_only_the_end_tokens() {
    let g = grammars();
    let mut guide = g
        .guide(&OutputConstraint::JsonSchema(
            json!({"enum": ["yes"]}).to_string(),
        ))
        .unwrap();
    let (tokens, eos) = vocabulary();
    for b in b"\"yes\"" {
        guide.accept(u32::from(*b)).unwrap();
    }
    assert!(guide.is_finished());
    let mut logits = vec![1.0; tokens.len() + 2];
    guide.restrict(&mut logits).unwrap();
    let allowed: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i] > f32::NEG_INFINITY)
        .collect();
    assert_eq!(allowed, eos.iter().map(|&e| e as usize).collect::<Vec<_>>());
    // A token the grammar did not allow is an error, not silently followed.
    let mut guide = g.guide(&OutputConstraint::json_object()).unwrap();
    assert!(guide.accept(u32::from(b'x')).is_err());
}

#[test]
fn a_tool_call_grammar_writes_the_tags_around_the_call() {
    let g = grammars();
    let grammar = format!(
        "start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {}",
        json!({
            "type": "object",
            "properties": {
                "name": {"const": "get_weather"},
                "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"], "additionalProperties": false},
            },
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    );
    let mut guide = g.guide(&OutputConstraint::Lark(grammar)).unwrap();
    let (text, ended) = run(&g, &mut guide, 3, 300);
    assert!(ended, "{text}");
    let inner = text
        .strip_prefix("<tool_call>\n")
        .and_then(|t| t.strip_suffix("\n</tool_call>"))
        .unwrap_or_else(|| panic!("{text:?}"));
    let call: Value = serde_json::from_str(inner).unwrap();
    assert_eq!(call["name"], "get_weather");
    assert!(call["arguments"]["city"].is_string(), "{call}");
}

#[test]
fn replaying_tokens_puts_the_guide_where_sampling_left_it() {
    let g = grammars();
    let schema = OutputConstraint::JsonSchema(json!({"type": "boolean"}).to_string());
    let mut a = g.guide(&schema).unwrap();
    let mut b = g.guide(&schema).unwrap();
    let tr = vocabulary()
        .0
        .iter()
        .position(|t| t == b"tr")
        .map(|i| i as u32);
    assert!(tr.is_none());
    b.replay(&[u32::from(b't'), u32::from(b'r')]).unwrap();
    a.accept(u32::from(b't')).unwrap();
    a.accept(u32::from(b'r')).unwrap();
    let (mut la, mut lb) = (vec![0.0; 300], vec![0.0; 300]);
    a.restrict(&mut la).unwrap();
    b.restrict(&mut lb).unwrap();
    assert_eq!(la, lb);
    assert!(la[usize::from(b'u')] == 0.0 && la[usize::from(b'a')] == f32::NEG_INFINITY);
}

/// A random schema from the kinds clients send (objects of strings, integers, numbers,
/// booleans, enums and arrays, nested once), and a validator for exactly those kinds.
fn schema() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        (1usize..8).prop_map(|n| json!({"type": "string", "maxLength": n})),
        (-50i64..50).prop_map(|lo| json!({"type": "integer", "minimum": lo, "maximum": lo + 100})),
        Just(json!({"type": "boolean"})),
        Just(json!({"type": "number", "minimum": 0, "maximum": 10})),
        prop::collection::vec("[a-z]{1,5}", 1..4)
            .prop_map(|v| json!({"type": "string", "enum": v})),
    ];
    let field = leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            (inner.clone(), 0usize..3)
                .prop_map(|(items, max)| json!({"type": "array", "items": items, "maxItems": max})),
            prop::collection::btree_map("[a-z]{1,6}", inner, 1..4).prop_map(object),
        ]
    });
    prop::collection::btree_map("[a-z]{1,6}", field, 1..5).prop_map(object)
}

fn object(fields: std::collections::BTreeMap<String, Value>) -> Value {
    let required: Vec<&String> = fields.keys().collect();
    json!({"type": "object", "properties": fields, "required": required, "additionalProperties": false})
}

fn valid(value: &Value, schema: &Value) -> bool {
    if let Some(options) = schema["enum"].as_array() {
        return options.contains(value);
    }
    match schema["type"].as_str() {
        Some("string") => value.as_str().is_some_and(|s| {
            s.chars().count() as u64 <= schema["maxLength"].as_u64().unwrap_or(u64::MAX)
        }),
        // JSON's `-0` is the integer 0 (serde_json reads it as a float).
        Some("integer") => value.as_f64().is_some_and(|n| {
            n.fract() == 0.0
                && n >= schema["minimum"].as_f64().unwrap_or(f64::MIN)
                && n <= schema["maximum"].as_f64().unwrap_or(f64::MAX)
        }),
        Some("number") => value.as_f64().is_some_and(|n| (0.0..=10.0).contains(&n)),
        Some("boolean") => value.is_boolean(),
        Some("array") => value.as_array().is_some_and(|items| {
            items.len() as u64 <= schema["maxItems"].as_u64().unwrap_or(u64::MAX)
                && items.iter().all(|i| valid(i, &schema["items"]))
        }),
        Some("object") => value.as_object().is_some_and(|o| {
            let props = schema["properties"].as_object();
            props.is_some_and(|p| {
                o.len() == p.len() && p.iter().all(|(k, s)| o.get(k).is_some_and(|v| valid(v, s)))
            })
        }),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20, ..ProptestConfig::default() })]

    /// Whatever the logits, what a guide lets through parses and validates against its schema.
    #[test]
    fn constrained_output_parses_and_validates(schema in schema(), seed in any::<u64>()) {
        let g = grammars();
        let mut guide = g.guide(&OutputConstraint::JsonSchema(schema.to_string())).unwrap();
        let (text, ended) = run(&g, &mut guide, seed, 3000);
        prop_assert!(ended, "no end within 3000 tokens: {}", text);
        let value: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert!(valid(&value, &schema), "{} does not validate against {}", text, schema);
    }
}

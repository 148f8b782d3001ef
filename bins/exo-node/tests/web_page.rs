//! The web page in a real browser: headless Chromium, driven over WebDriver by chromedriver,
//! against real `exo-node serve` processes on the default model. The page loads with no
//! console errors; a question gets a streamed answer with its figures, and the stop button
//! stops one; the cluster view shows why a lone node waits, then a second node joining and
//! the layers each holds, without a reload; with `--api-key` the page asks for the key.
//!
//! Needs Chromium and chromedriver (Debian: `apt-get install chromium chromium-driver`, or
//! `EXO_CHROMIUM` and `EXO_CHROMEDRIVER`). Without them it prints SKIPPED and how to install
//! them, so the README's test command passes on a machine with only Rust and Python; with
//! `EXO_BROWSER_TESTS=require` (as `.ci/run` sets) it fails instead. Runs the real default model: run with `--release`. With `EXO_SCREENSHOTS=docs` it
//! also writes `docs/web-chat.png` and `docs/web-cluster.png` (a folder relative to the
//! workspace root, or an absolute one) and prints the page's weight and time to interactive.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "common/webdriver.rs"]
mod webdriver;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use common::{NodeProc, spawn_node};
use webdriver::Browser;

const KEY_A: &str = "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3";
const KEY_B: &str = "d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4";
const LONG: Duration = Duration::from_secs(120);

/// The page's address on `node`.
fn page(node: &NodeProc) -> String {
    format!("{}/", node.api.trim_end_matches("/v1"))
}

/// Where screenshots go, when they are asked for.
fn screenshots() -> Option<PathBuf> {
    let dir = std::env::var_os("EXO_SCREENSHOTS")?;
    let dir = PathBuf::from(dir);
    let dir = if dir.is_absolute() {
        dir
    } else {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(dir)
    };
    std::fs::create_dir_all(&dir).unwrap();
    Some(dir)
}

/// Waits until the page has its models and its first view of the cluster.
fn wait_interactive(browser: &mut Browser) {
    browser.wait_for(
        "the page ready (models and a cluster view)",
        "return document.body.dataset.ready === 'true'",
        LONG,
    );
}

/// Asks `question` in the chat and waits for the answer to end; returns the answer's
/// `[state, text, chunks, figures]`.
fn ask(browser: &mut Browser, question: &str) -> Vec<Value> {
    let before = browser.run("return document.querySelectorAll('li.turn').length", &[]);
    browser.type_into("#prompt", question);
    browser.click("#send");
    let want = before.as_u64().unwrap() + 2;
    browser.wait_for(
        "the answer to end",
        &format!(
            "const turns = document.querySelectorAll('li.turn');
             const last = turns[turns.length - 1];
             return turns.length === {want} && last.dataset.state !== 'streaming'"
        ),
        LONG,
    );
    let answer = browser.run(
        "const a = [...document.querySelectorAll('li.turn.assistant')].pop();
         return [a.dataset.state, a.querySelector('.text').textContent,
                 Number(a.dataset.chunks),
                 [...a.querySelectorAll('.figures, .error')].map(e => e.textContent).join(' | ')]",
        &[],
    );
    answer.as_array().unwrap().clone()
}

/// The text of each device in the cluster view, by its state.
fn devices(browser: &Browser) -> Vec<(String, String)> {
    let list = browser.run(
        "return [...document.querySelectorAll('#nodes li.node')]
            .map(n => [n.dataset.state, n.innerText])",
        &[],
    );
    list.as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_owned(),
                pair[1].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn the_page_chats_and_follows_the_cluster_live() {
    if !webdriver::browser_present("the_page_chats_and_follows_the_cluster_live") {
        return;
    }
    // Alone, 120 MiB is too little for the model with its context: the cluster waits.
    let first = spawn_node("120MiB", KEY_A, &[], &[]);
    let mut browser = Browser::start();
    browser.goto(&page(&first));
    wait_interactive(&mut browser);
    browser.wait_for(
        "the reason the cluster waits",
        "const b = document.getElementById('banner').textContent;
         return b.includes('short by') && b",
        LONG,
    );
    let alone = devices(&browser);
    assert_eq!(alone.len(), 1, "{alone:?}");
    assert_eq!(alone[0].0, "waiting", "{alone:?}");
    assert!(alone[0].1.contains("this node"), "{alone:?}");
    assert!(
        browser.console_errors().is_empty(),
        "{:#?}",
        browser.console_messages()
    );

    // A second node joins: the open page shows it, and the plan that splits the layers
    // between the two, without a reload (the marker set now survives).
    browser.run("window.exoMarker = 42", &[]);
    let second = spawn_node("120MiB", KEY_A, &[], std::slice::from_ref(&first));
    browser.wait_for(
        "two devices ready on a two-stage ring",
        "return document.querySelectorAll('#nodes li.node[data-state=\"ready\"]').length === 2
            && document.querySelectorAll('#ring path.ring-stage').length === 2
            && document.getElementById('banner').dataset.tone === 'good'",
        LONG,
    );
    assert_eq!(browser.run("return window.exoMarker", &[]), 42);
    let pair = devices(&browser);
    let stages: Vec<&String> = pair.iter().map(|(_, text)| text).collect();
    assert!(
        stages.iter().any(|t| t.contains("stage 1: layers 0–")),
        "{stages:#?}"
    );
    assert!(
        stages
            .iter()
            .any(|t| t.contains("stage 2: layers ") && t.contains("–29")),
        "{stages:#?}"
    );
    let ring = browser.run("return document.getElementById('ring').textContent", &[]);
    assert!(ring.as_str().unwrap().contains("30 layers"), "{ring}");
    let links = browser.run(
        "return document.querySelectorAll('#links tbody tr').length",
        &[],
    );
    assert_eq!(links, 1);

    // A question, answered greedily, streams in several pieces with its figures.
    browser.type_into("#temperature", "0");
    browser.type_into("#max-tokens", "48");
    let answer = ask(&mut browser, "What is the capital of France?");
    assert_eq!(answer[0], "done", "{answer:?}");
    assert!(answer[1].as_str().unwrap().contains("Paris"), "{answer:?}");
    assert!(
        answer[2].as_u64().unwrap() > 1,
        "one piece is not a stream: {answer:?}"
    );
    let figures = answer[3].as_str().unwrap();
    assert!(
        figures.contains("tokens/s") && figures.contains("first token"),
        "{answer:?}"
    );
    // The stages report what the answer cost them.
    browser.wait_for(
        "the stages' step time and rate",
        "return [...document.querySelectorAll('#nodes .stage')]
            .filter(s => s.textContent.includes('step ') && s.textContent.includes('tokens/s'))
            .length === 2",
        LONG,
    );
    // A second turn carries the first in its history.
    let follow_up = ask(&mut browser, "And of Germany?");
    assert_eq!(follow_up[0], "done", "{follow_up:?}");
    let turns = browser.run("return document.querySelectorAll('li.turn').length", &[]);
    assert_eq!(turns, 4);

    let shots = screenshots();
    if let Some(dir) = &shots {
        browser.screenshot("#chat", &dir.join("web-chat.png"));
        let figures = browser.run(
            "const nav = performance.getEntriesByType('navigation')[0];
             const files = [nav, ...performance.getEntriesByType('resource')
                .filter(r => new URL(r.name).pathname.startsWith('/ui/'))];
             const mark = performance.getEntriesByName('exo-interactive')[0];
             return {files: files.length,
                     bytes: files.reduce((n, r) => n + r.decodedBodySize, 0),
                     transferred: files.reduce((n, r) => n + r.transferSize, 0),
                     dom_content_loaded_ms: nav.domContentLoadedEventEnd,
                     load_ms: nav.loadEventEnd,
                     interactive_ms: mark ? mark.startTime : null}",
            &[],
        );
        eprintln!("page figures (loopback, first load): {figures}");
    }

    // Stop: a long answer ends where the user stopped it, and the chat goes on.
    browser.type_into("#max-tokens", "400");
    browser.type_into("#prompt", "Write a long story about a lighthouse keeper.");
    browser.click("#send");
    browser.wait_for(
        "the story to start",
        "const a = [...document.querySelectorAll('li.turn.assistant')].pop();
         return a.dataset.state === 'streaming' && Number(a.dataset.chunks) > 2",
        LONG,
    );
    if let Some(dir) = &shots {
        // The cluster while it works: both stages decoding the story at one rate (just after
        // the prompt, one stage's last second may hold the prompt and the other's not).
        browser.wait_for(
            "both stages decoding the story",
            "const rates = [...document.querySelectorAll('#nodes .stage')]
                 .filter(s => s.textContent.includes('1 request'))
                 .map(s => Number((/([0-9.]+) tokens\\/s/.exec(s.textContent) ?? [0, 0])[1]));
             return rates.length === 2 && Math.min(...rates) > 0
                 && Math.max(...rates) < 1.3 * Math.min(...rates)",
            LONG,
        );
        // Tall enough for the whole cluster panel.
        browser.resize(1400, 1500);
        browser.screenshot("#cluster", &dir.join("web-cluster.png"));
    }
    browser.click("#stop");
    browser.wait_for(
        "the story stopped",
        "const a = [...document.querySelectorAll('li.turn.assistant')].pop();
         return a.dataset.state === 'stopped'
             && !document.getElementById('send').hidden
             && a.querySelector('.figures').textContent.includes('stopped')",
        LONG,
    );

    let errors = browser.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    drop(second);
}

#[test]
fn the_page_asks_for_the_api_key_when_one_is_set() {
    if !webdriver::browser_present("the_page_asks_for_the_api_key_when_one_is_set") {
        return;
    }
    let node = spawn_node("4GiB", KEY_B, &["--api-key", "sk-page-test"], &[]);
    let mut browser = Browser::start();
    browser.goto(&page(&node));
    browser.wait_for(
        "the key dialog",
        "return document.getElementById('key-dialog').open",
        LONG,
    );
    // The page knew before asking anything of /v1.
    let asked = browser.run(
        "return performance.getEntriesByType('resource')
            .filter(r => new URL(r.name).pathname.startsWith('/v1')).length",
        &[],
    );
    assert_eq!(asked, 0);

    browser.type_into("#key-input", "sk-wrong");
    browser.click("#key-form button[type=submit]");
    browser.wait_for(
        "the wrong key refused",
        "const e = document.getElementById('key-error');
         return !e.hidden && e.textContent.includes('401')
             && document.getElementById('key-dialog').open",
        LONG,
    );

    browser.type_into("#key-input", "sk-page-test");
    browser.click("#key-form button[type=submit]");
    wait_interactive(&mut browser);
    browser.wait_for(
        "the node ready with every layer",
        "return [...document.querySelectorAll('#nodes li.node[data-state=\"ready\"] .stage')]
            .some(s => s.textContent.includes('layers 0–29'))",
        LONG,
    );
    assert_eq!(
        browser.run("return document.getElementById('key-dialog').open", &[]),
        false
    );
    // The chat sends the key too.
    browser.type_into("#max-tokens", "8");
    let answer = ask(&mut browser, "Hello!");
    assert_eq!(answer[0], "done", "{answer:?}");
    // The key is never written into the page.
    let html = browser.run("return document.documentElement.outerHTML", &[]);
    assert!(!html.as_str().unwrap().contains("sk-page-test"));

    // The only errors are the browser reporting the wrong key's refusal.
    let errors: Vec<String> = browser
        .console_errors()
        .into_iter()
        .filter(|e| !e.contains("the server responded with a status of 401"))
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
}

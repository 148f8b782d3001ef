//! `cargo xtask modules`: finds cycles among the modules of each library crate.
//!
//! A module depends on another when its code names a path into it (`crate::a::b::Item`,
//! `super::Item`, or an item the crate root re-exports from it). Comments (doc links), test
//! modules at the bottom of a file (`#[cfg(test)]`) and a module's own children are left out. Modules that
//! depend on each other, directly or around a longer loop, are reported as one cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Checks every crate under `crates/`; fails listing each cycle found.
pub(crate) fn check(root: &Path) -> Result<()> {
    let mut failures = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.join("src/lib.rs").exists())
        .collect();
    dirs.sort();
    for dir in dirs {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let graph = graph(&dir.join("src")).with_context(|| format!("reading {name}"))?;
        let cycles = cycles(&graph);
        if cycles.is_empty() {
            println!("{name}: {} modules, no cycles", graph.len());
        } else {
            for cycle in cycles {
                let edges: Vec<String> = cycle
                    .iter()
                    .flat_map(|from| {
                        graph[from]
                            .iter()
                            .filter(|to| cycle.contains(to))
                            .map(move |to| format!("{from} -> {to}"))
                    })
                    .collect();
                failures.push(format!(
                    "{name}: {} ({})",
                    cycle.join(", "),
                    edges.join("; ")
                ));
            }
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    bail!("module cycles:\n  {}", failures.join("\n  "))
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Module paths (`stage::worker`; the root is `crate`) and the source of each.
fn modules(src: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(src)?.with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
                parts.pop();
            }
            let module = if parts.is_empty() {
                "crate".to_owned()
            } else {
                parts.join("::")
            };
            let text = std::fs::read_to_string(&path)?;
            let code = code_of(&text);
            out.insert(module, code);
        }
    }
    Ok(out)
}

/// The code of a source file that counts for dependencies: without its unit tests (a
/// `#[cfg(test)]` module named `tests` at the bottom; a test-only item elsewhere does not end
/// the code) and without comments (doc links included).
fn code_of(text: &str) -> String {
    let text = [
        "\n#[cfg(test)]\nmod tests",
        "\n#[cfg(test)]\npub(crate) mod tests",
    ]
    .iter()
    .filter_map(|marker| text.find(marker))
    .min()
    .map_or(text, |at| &text[..at]);
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Items the crate root re-exports, and the module each comes from (`pub use a::b::{X, Y}`).
fn reexports(root: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for statement in root.split(';') {
        let s = statement.trim();
        let Some(rest) = s.strip_prefix("pub use ") else {
            continue;
        };
        let rest: String = rest.split_whitespace().collect();
        let (module, items) = match rest.split_once("::{") {
            Some((m, items)) => (m.to_owned(), items.trim_end_matches('}').to_owned()),
            None => match rest.rsplit_once("::") {
                Some((m, item)) => (m.to_owned(), item.to_owned()),
                None => continue,
            },
        };
        let module = module.trim_start_matches("crate::").to_owned();
        for item in items.split(',') {
            let item = item.split("as").last().unwrap_or(item).trim();
            if !item.is_empty() {
                out.insert(item.to_owned(), module.clone());
            }
        }
    }
    out
}

fn graph(src: &Path) -> Result<Graph> {
    let modules = modules(src)?;
    let exports = modules
        .get("crate")
        .map(|r| reexports(r))
        .unwrap_or_default();
    let mut graph: Graph = modules
        .keys()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for (module, code) in &modules {
        if module == "crate" {
            continue;
        }
        let parent = module
            .rsplit_once("::")
            .map_or("crate", |(p, _)| p)
            .to_owned();
        for path in paths(code) {
            let absolute = if let Some(rest) = path.strip_prefix("crate::") {
                rest.to_owned()
            } else if let Some(rest) = path.strip_prefix("super::") {
                if parent == "crate" {
                    rest.to_owned()
                } else {
                    format!("{parent}::{rest}")
                }
            } else {
                continue;
            };
            // The longest module the path names; an item of the root resolves to the module
            // that defines it.
            let segments: Vec<&str> = absolute.split("::").collect();
            let target = (1..=segments.len())
                .rev()
                .map(|n| segments[..n].join("::"))
                .find(|m| modules.contains_key(m))
                .or_else(|| exports.get(segments[0]).cloned());
            let Some(target) = target else { continue };
            let own_child = target.starts_with(&format!("{module}::"));
            if target != *module && !own_child && modules.contains_key(&target) {
                graph.entry(module.clone()).or_default().insert(target);
            }
        }
    }
    Ok(graph)
}

/// Every `crate::...` and `super::...` path in `code`, braces expanded one level
/// (`crate::a::{b, c::D}` gives `crate::a::b` and `crate::a::c::D`).
fn paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(at) = rest.find(start) {
            let before = rest[..at].chars().last();
            let tail = &rest[at..];
            rest = &rest[at + start.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            let head = tail[..end].trim_end_matches(':').to_owned();
            if tail[end..].starts_with('{') {
                let inner = tail[end + 1..].split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let item: String = item.split_whitespace().collect();
                    let item = item.split("as").next().unwrap_or("").to_owned();
                    if !item.is_empty() && item != "self" {
                        out.push(format!("{head}::{item}"));
                    }
                }
            }
            out.push(head);
        }
    }
    out
}

/// Strongly connected components of more than one module (Tarjan), each sorted.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_tests_module_and_comments_are_left_out() {
        let text = "use crate::a::X;\n#[cfg(test)]\nfn helper() {}\nuse crate::b::Y;\n\
                    // crate::c::Z\n#[cfg(test)]\nmod tests {\n    use crate::d::W;\n}\n";
        let code = code_of(text);
        assert!(
            code.contains("crate::a::X") && code.contains("crate::b::Y"),
            "{code}"
        );
        assert!(
            !code.contains("crate::c") && !code.contains("crate::d"),
            "{code}"
        );
    }

    #[test]
    fn paths_are_found_with_braces_expanded() {
        let code = "use crate::a::{b, c::D};\nlet x = super::e::F; // not xcrate::g\n";
        let mut p = paths(code);
        p.sort();
        assert_eq!(
            p,
            ["crate::a", "crate::a::b", "crate::a::c::D", "super::e::F"]
        );
    }

    #[test]
    fn loops_of_any_length_are_cycles() {
        let mut g = Graph::new();
        let edge = |g: &mut Graph, a: &str, b: &str| {
            g.entry(a.into()).or_default().insert(b.into());
            g.entry(b.into()).or_default();
        };
        edge(&mut g, "a", "b");
        edge(&mut g, "b", "c");
        edge(&mut g, "c", "a");
        edge(&mut g, "d", "a");
        assert_eq!(
            cycles(&g),
            vec![vec!["a".to_owned(), "b".into(), "c".into()]]
        );
    }
}

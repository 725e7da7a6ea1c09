//! Every arrow points down: no module of either crate (the gateway's
//! `src/`, the core's `core/src/`) reaches back to itself through the paths
//! its code names (`crate::…`, `super::…`). Doc comments and test modules
//! may point anywhere.
#![forbid(unsafe_code)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`proxy::http`) → its source file's text, without comments
/// and without its `#[cfg(test)] mod tests`.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            let code: String = code
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(parts.join("::"), code);
        }
    }
    out
}

/// The longest module named by `path` (`a::b::Item` → `a::b` if it exists).
fn resolve<'m>(mods: &'m BTreeMap<String, String>, path: &str) -> Option<&'m str> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find_map(|m| mods.get_key_value(&m).map(|(k, _)| k.as_str()))
}

/// The path segments after each `prefix` in `code`, braces expanded one
/// level (`crate::a::{b, c::D}` gives `a::b` and `a::c::D`).
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let path = rest[..end].trim_end_matches(':').to_string();
        if rest[end..].starts_with('{') {
            let group = &rest[end + 1..rest[end..].find('}').map_or(end + 1, |j| end + j)];
            for item in group.split(',') {
                let item = item.split_whitespace().next().unwrap_or("");
                out.push(format!("{}::{item}", rest[..end].trim_end_matches(':')));
            }
        }
        out.push(path);
    }
    out
}

fn edges(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges = BTreeMap::new();
    for (name, code) in mods {
        let parent = name.rsplit_once("::").map_or("", |(p, _)| p);
        let mut deps = BTreeSet::new();
        let named = paths_after(code, "crate::").into_iter().chain(
            paths_after(code, "super::")
                .into_iter()
                .map(|p| format!("{parent}::{p}")),
        );
        for path in named {
            if let Some(target) = resolve(mods, &path)
                && target != name
                && !name.starts_with(&format!("{target}::"))
            {
                deps.insert(target.to_string());
            }
        }
        edges.insert(name.clone(), deps);
    }
    edges
}

/// A cycle through `start`, if there is one.
fn cycle_from(start: &str, edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in edges.get(&at).into_iter().flatten() {
            if next == start {
                let mut path = path.clone();
                path.push(start.to_string());
                return Some(path);
            }
            if seen.insert(next.clone()) {
                let mut path = path.clone();
                path.push(next.clone());
                stack.push((next.clone(), path));
            }
        }
    }
    None
}

/// Each import cycle among the modules of the crate whose sources are in
/// `dir`, as `a -> b -> a`.
fn cycles(dir: &str, expect: &str) -> Vec<String> {
    let mods = modules(&support::repo(dir));
    assert!(mods.contains_key(expect), "{dir}: {:?}", mods.keys());
    let edges = edges(&mods);
    mods.keys()
        .filter_map(|m| cycle_from(m, &edges))
        .map(|c| format!("{dir}: {}", c.join(" -> ")))
        .collect()
}

#[test]
fn no_module_depends_on_itself_through_others() {
    let mut found = cycles("src", "proxy::http");
    found.extend(cycles("core/src", "detect::tls"));
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn the_check_sees_a_cycle_and_a_braced_import() {
    let mods: BTreeMap<String, String> = [
        ("a", "use crate::b::{Thing, c::Other};"),
        ("b", "fn f() { crate::a::g() }"),
        ("b::c", ""),
        ("d", "use super::a;"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let edges = edges(&mods);
    assert_eq!(
        edges["a"],
        BTreeSet::from(["b".to_string(), "b::c".to_string()])
    );
    assert!(cycle_from("a", &edges).is_some());
    assert!(cycle_from("b::c", &edges).is_none());
}

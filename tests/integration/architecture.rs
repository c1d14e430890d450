//! The module layout ARCHITECTURE.md promises: no import circles between the library's
//! top-level modules (a module's `crate::...` paths, outside its tests, never lead back to it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its non-test code names through `crate::`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                if !path.ends_with("bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).expect("under src");
            let first = relative.components().next().expect("a component").as_os_str().to_string_lossy();
            let module = first.trim_end_matches(".rs").to_string();
            if module == "main" || module == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read module");
            // Code after the first test module is test-only.
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(&text);
            let used = graph.entry(module.clone()).or_default();
            for (at, _) in code.match_indices("crate::") {
                let rest = &code[at + "crate::".len()..];
                let mut names: Vec<&str> = Vec::new();
                if let Some(group) = rest.strip_prefix('{') {
                    let inside = &group[..group.find('}').unwrap_or(group.len())];
                    names.extend(inside.split(',').map(|p| p.trim().split("::").next().unwrap_or("")));
                } else {
                    let end =
                        rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                    names.push(&rest[..end]);
                }
                for name in names {
                    // Lower-case names are modules; items re-exported at the root (Error, Config)
                    // are the crate's, not a module's.
                    if name.starts_with(|c: char| c.is_ascii_lowercase()) && name != module {
                        used.insert(name.to_string());
                    }
                }
            }
        }
    }
    // Lower-case names that are functions at the root (`crate::log_start`), not modules.
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for used in graph.values_mut() {
        used.retain(|name| modules.contains(name));
    }
    graph
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = imports();
    assert!(graph.len() > 15, "too few modules found: {graph:?}");
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if next == to {
                    return true;
                }
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        false
    };
    let mut circles = Vec::new();
    for (module, used) in &graph {
        for other in used {
            if reaches(other, module) {
                circles.push(format!("{module} -> {other} -> ... -> {module}"));
            }
        }
    }
    assert!(circles.is_empty(), "import circles: {circles:#?}\ngraph: {graph:#?}");
    for (module, used) in &graph {
        println!("{module:12} -> {}", used.iter().cloned().collect::<Vec<_>>().join(", "));
    }
}

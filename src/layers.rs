//! The module layers, and the test that keeps every arrow pointing down.
//!
//! A module may use the modules of the layers below its own, never one above
//! it or beside it. The README's architecture table is this list, explained.
//! The test reads every `crate::…` path in the code of `src/` (and
//! `regcache::…` in `main.rs`), comments left out, so that a new upward
//! arrow fails `cargo test` with the file and line that made it.

/// From the top: each entry is one layer, its modules side by side.
pub const LAYERS: &[&[&str]] = &[
    &["main"],
    &["cli"],
    &["proxy"],
    &["admin", "prefetch"],
    &["app"],
    &["serve"],
    &["access"],
    &["upstream", "peer"],
    &["cache", "shared"],
    &["tls"],
    &["policy"],
    &["config"],
    &["http"],
    &["registry"],
    &["metrics"],
];

/// The layer index of a top-level module (0 is the top).
pub fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level modules a line of code names: `crate::serve::…` and
/// `crate::{serve, cache}` (with `prefix` = `crate`).
fn named_modules<'a>(line: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut found = Vec::new();
    let needle = format!("{prefix}::");
    let mut rest = line;
    while let Some(at) = rest.find(&needle) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + needle.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name = item.trim().split("::").next().unwrap_or("").trim();
                if !name.is_empty() {
                    found.push(name);
                }
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            found.push(&rest[..end]);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The top-level module a file belongs to; None for lib.rs.
    fn module_of(src: &Path, file: &Path) -> Option<String> {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel.components().next()?.as_os_str().to_str()?;
        let name = first.strip_suffix(".rs").unwrap_or(first);
        (name != "lib" && name != "layers").then(|| name.to_string())
    }

    #[test]
    fn every_module_is_in_a_layer() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files {
            if let Some(module) = module_of(&src, &file) {
                assert!(
                    layer_of(&module).is_some(),
                    "{module} ({}) is in no layer of src/layers.rs: add it where it belongs",
                    file.display()
                );
            }
        }
    }

    #[test]
    fn arrows_point_down_only() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut upward = Vec::new();
        for file in &files {
            let Some(module) = module_of(&src, file) else {
                continue;
            };
            let prefix = if module == "main" {
                "regcache"
            } else {
                "crate"
            };
            let own = layer_of(&module).unwrap_or(0);
            let text = std::fs::read_to_string(file).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                for used in named_modules(code, prefix) {
                    if used == module || used == "layers" {
                        continue;
                    }
                    match layer_of(used) {
                        Some(layer) if layer > own => {}
                        _ => upward.push(format!(
                            "{}:{}: {module} uses {used}",
                            file.strip_prefix(&src).unwrap().display(),
                            n + 1
                        )),
                    }
                }
            }
        }
        assert!(
            upward.is_empty(),
            "arrows that point up or sideways (see src/layers.rs):\n{}",
            upward.join("\n")
        );
    }

    #[test]
    fn paths_are_read_as_written() {
        let table: [(&str, &[&str]); 6] = [
            ("use crate::serve::state::State;", &["serve"]),
            ("use crate::{cache, http::body};", &["cache", "http"]),
            (
                "let x = crate::app::default(crate::config::X);",
                &["app", "config"],
            ),
            ("use regcache::serve;", &[]),
            ("notcrate::serve::x", &[]),
            ("use http::header;", &[]),
        ];
        for (line, want) in table {
            assert_eq!(named_modules(line, "crate"), want, "{line}");
        }
        assert_eq!(
            named_modules("use regcache::app::App;", "regcache"),
            ["app"]
        );
    }
}

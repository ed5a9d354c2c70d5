//! Fuzzes `registry::route::parse` with arbitrary request paths.
//!
//! Besides "never panics", it checks the property the cache relies on: a path
//! that parses as a manifest or blob route names a repository made only of
//! safe characters, and its parts print back to the path they came from.

#![no_main]

use libfuzzer_sys::fuzz_target;
use regcache::registry::route::{parse, Route};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let (name, tail) = match parse(path) {
        Ok(Route::Manifest { name, reference }) => (name, format!("/manifests/{reference}")),
        Ok(Route::Blob { name, digest }) => (name, format!("/blobs/{digest}")),
        _ => return,
    };
    let name = name.as_str();
    assert!(name.len() <= 255);
    assert!(name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)));
    assert!(!name
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == ".."));
    let rebuilt = format!("/v2/{name}{tail}");
    let without_query = path.split(['?', '#']).next().unwrap_or_default();
    assert_eq!(rebuilt, without_query);
});

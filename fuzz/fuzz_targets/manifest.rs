//! Fuzzes the manifest readers in `registry::manifest` and
//! `registry::media` with arbitrary bodies and `Accept` values: none of them
//! may panic.

#![no_main]

use http::header::{HeaderMap, HeaderValue, ACCEPT};
use libfuzzer_sys::fuzz_target;
use regcache::registry::manifest::children;
use regcache::registry::media::{accepts, is_index, manifest_media_type};

fuzz_target!(|data: &[u8]| {
    for child in children(data) {
        assert!(child.digest.to_string().starts_with("sha"));
    }
    let media_type = manifest_media_type(None, data);
    let _ = is_index(&media_type);
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n').take(8) {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            headers.append(ACCEPT, value);
        }
    }
    let _ = accepts(&headers, &media_type);
});

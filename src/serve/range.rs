//! `Range` requests on cached content (RFC 9110 §14): one byte range is
//! answered with 206, an unsatisfiable one with 416; several ranges or a
//! malformed header are ignored and the whole content is sent (as allowed).

use http::HeaderMap;

/// What to send of a `size`-byte content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// All of it, 200.
    Whole,
    /// Bytes `start..end` (end exclusive), 206.
    Part {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// 416 Range Not Satisfiable.
    Unsatisfiable,
}

/// Decides the span for the request's `Range` header.
pub fn span(headers: &HeaderMap, size: u64) -> Span {
    let Some(value) = headers
        .get(http::header::RANGE)
        .and_then(|v| v.to_str().ok())
    else {
        return Span::Whole;
    };
    let parsed = match http_range_header::parse_range_header(value) {
        Ok(parsed) => parsed,
        Err(_) => return Span::Whole,
    };
    match parsed.validate(size) {
        Ok(ranges) if ranges.len() == 1 => {
            let r = &ranges[0];
            Span::Part {
                start: *r.start(),
                end: r.end() + 1,
            }
        }
        Ok(_) => Span::Whole,
        Err(_) => Span::Unsatisfiable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(range: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::RANGE, range.parse().unwrap());
        h
    }

    #[test]
    fn range_table() {
        assert_eq!(span(&HeaderMap::new(), 10), Span::Whole);
        assert_eq!(
            span(&with("bytes=0-3"), 10),
            Span::Part { start: 0, end: 4 }
        );
        assert_eq!(
            span(&with("bytes=5-"), 10),
            Span::Part { start: 5, end: 10 }
        );
        assert_eq!(
            span(&with("bytes=-3"), 10),
            Span::Part { start: 7, end: 10 }
        );
        assert_eq!(
            span(&with("bytes=8-20"), 10),
            Span::Part { start: 8, end: 10 }
        );
        assert_eq!(span(&with("bytes=10-"), 10), Span::Unsatisfiable);
        assert_eq!(span(&with("bytes=0-1,3-4"), 10), Span::Whole);
        assert_eq!(span(&with("pages=1-2"), 10), Span::Whole);
    }
}

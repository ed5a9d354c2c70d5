//! The OCI distribution error vocabulary.
//!
//! A registry reports failure with an HTTP status and a JSON body of the form
//! `{"errors":[{"code":"NAME_INVALID","message":"…","detail":…}]}`. Clients
//! show the `message` to the person at the terminal, so regcache answers in
//! the same shape whenever it refuses a request itself (for instance a
//! malformed digest, which it rejects without asking the upstream).

use http::StatusCode;
use thiserror::Error;

/// The error codes of the OCI distribution specification that regcache uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The repository name is not a valid OCI repository name.
    NameInvalid,
    /// A digest is malformed, uses an unsupported algorithm, or did not match
    /// the content.
    DigestInvalid,
    /// A tag is malformed.
    TagInvalid,
    /// A manifest reference or body is invalid.
    ManifestInvalid,
    /// The manifest is not known to the registry.
    ManifestUnknown,
    /// The blob is not known to the registry.
    BlobUnknown,
    /// The repository is not known to the registry.
    NameUnknown,
    /// Authentication is required.
    Unauthorized,
    /// The credential is not allowed to do this.
    Denied,
    /// The operation is not supported.
    Unsupported,
    /// The client is being rate limited.
    TooManyRequests,
}

impl ErrorCode {
    /// The wire spelling of the code, e.g. `"NAME_INVALID"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::TagInvalid => "TAG_INVALID",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
        }
    }

    /// The HTTP status a registry (distribution) pairs with this code.
    pub fn status(&self) -> StatusCode {
        match self {
            ErrorCode::NameInvalid
            | ErrorCode::DigestInvalid
            | ErrorCode::TagInvalid
            | ErrorCode::ManifestInvalid => StatusCode::BAD_REQUEST,
            ErrorCode::ManifestUnknown | ErrorCode::BlobUnknown | ErrorCode::NameUnknown => {
                StatusCode::NOT_FOUND
            }
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request regcache refuses on its own, with the code to report and a
/// message for the person at the terminal.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct RouteError {
    /// The distribution error code.
    pub code: ErrorCode,
    /// What is wrong, in words.
    pub message: String,
}

impl RouteError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The JSON error body for this error (see [`error_body`]).
    pub fn body(&self) -> String {
        error_body(self.code, &self.message)
    }
}

/// The distribution error body for one error:
/// `{"errors":[{"code":"NAME_INVALID","message":"…","detail":null}]}`.
pub fn error_body(code: ErrorCode, message: &str) -> String {
    serde_json::json!({
        "errors": [{ "code": code.as_str(), "message": message, "detail": null }]
    })
    .to_string()
}

/// `s` quoted for an error message, cut short if it is long, so that a
/// hostile multi-kilobyte path is not echoed back in full.
pub(crate) fn quoted(s: &str) -> String {
    const MAX_CHARS: usize = 80;
    match s.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_spelled_as_the_spec_spells_them() {
        assert_eq!(ErrorCode::NameInvalid.as_str(), "NAME_INVALID");
        assert_eq!(ErrorCode::TooManyRequests.as_str(), "TOOMANYREQUESTS");
        assert_eq!(ErrorCode::DigestInvalid.to_string(), "DIGEST_INVALID");
        assert_eq!(ErrorCode::BlobUnknown.status(), StatusCode::NOT_FOUND);
        assert_eq!(ErrorCode::TagInvalid.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn body_is_json_with_the_message_escaped() {
        let body = error_body(ErrorCode::NameInvalid, "bad \"name\"\n</script>");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let e = &v["errors"][0];
        assert_eq!(e["code"], "NAME_INVALID");
        assert_eq!(e["message"], "bad \"name\"\n</script>");
        assert!(e["detail"].is_null());
        assert_eq!(v["errors"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn route_error_displays_its_message() {
        let e = RouteError::new(ErrorCode::TagInvalid, "tag is too long");
        assert_eq!(e.to_string(), "tag is too long");
        assert!(e.body().contains("TAG_INVALID"));
    }

    #[test]
    fn quoted_cuts_long_input_on_a_char_boundary() {
        assert_eq!(quoted("ab"), "\"ab\"");
        let long = "é".repeat(500);
        let q = quoted(&long);
        assert!(q.ends_with('…'));
        assert!(q.chars().count() < 90);
    }
}

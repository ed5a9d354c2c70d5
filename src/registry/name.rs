//! Repository names, validated against the OCI distribution grammar.
//!
//! A name is one or more path components separated by `/`; each component
//! matches `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, and the whole name is at most
//! 255 bytes. So `library/alpine` and `my-org/team.x/app__v2` are names, while
//! `..`, `a//b`, `a%2fb`, `Alpine` and `a..b` are not.
//!
//! regcache keys cache links by repository name, so a name that got through
//! here can never climb out of a directory or alias another name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::{quoted, ErrorCode, RouteError};

/// The longest repository name the distribution specification allows.
pub const MAX_NAME_LEN: usize = 255;

/// A valid OCI repository name such as `library/alpine`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoName(String);

impl RepoName {
    /// Validates `s` as a repository name.
    ///
    /// The error has code `NAME_INVALID` and says which rule `s` breaks.
    pub fn parse(s: &str) -> Result<Self, RouteError> {
        let invalid = |why: String| {
            RouteError::new(
                ErrorCode::NameInvalid,
                format!("invalid repository name {}: {why}", quoted(s)),
            )
        };
        if s.is_empty() {
            return Err(invalid("the name is empty".into()));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(invalid(format!(
                "the name is {} bytes long; at most {MAX_NAME_LEN} are allowed",
                s.len()
            )));
        }
        for component in s.split('/') {
            check_component(component).map_err(invalid)?;
        }
        Ok(RepoName(s.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks one `/`-separated component; the error says what is wrong with it.
fn check_component(component: &str) -> Result<(), String> {
    if component.is_empty() {
        return Err(
            "it has an empty path component (\"//\", or a leading or trailing \"/\")".into(),
        );
    }
    let bytes = component.as_bytes();
    let is_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if is_alnum(b) {
            i += 1;
            continue;
        }
        if !matches!(b, b'.' | b'_' | b'-') {
            let what = if b.is_ascii_uppercase() {
                "upper-case letters are not allowed".to_string()
            } else if b == b'%' {
                "percent-encoded characters are not allowed".to_string()
            } else {
                let c = component[i..].chars().next().unwrap_or('?');
                format!("the character {c:?} is not allowed")
            };
            return Err(format!(
                "{what} (a name uses a-z, 0-9 and the separators '.', '_', '__', '-')"
            ));
        }
        // A run of separator characters, between two alphanumeric runs.
        let start = i;
        while i < bytes.len() && matches!(bytes[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let run = &component[start..i];
        if start == 0 || i == bytes.len() {
            return Err(format!(
                "the component {} must begin and end with a letter or digit",
                quoted(component)
            ));
        }
        let allowed = run == "." || run == "_" || run == "__" || run.bytes().all(|b| b == b'-');
        if !allowed {
            return Err(format!(
                "the component {} has the separator {run:?}; allowed are '.', '_', '__' or dashes",
                quoted(component)
            ));
        }
    }
    Ok(())
}

impl FromStr for RepoName {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, RouteError> {
        RepoName::parse(s)
    }
}

impl TryFrom<String> for RepoName {
    type Error = RouteError;

    fn try_from(s: String) -> Result<Self, RouteError> {
        RepoName::parse(&s)
    }
}

impl From<RepoName> for String {
    fn from(name: RepoName) -> String {
        name.0
    }
}

impl AsRef<str> for RepoName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spec_names() {
        for good in [
            "a",
            "alpine",
            "library/alpine",
            "my-org/team.x/app__v2",
            "a/b/c/d/e/f",
            "0",
            "a-b",
            "a---b",
            "a.b.c",
            "a_b",
            "a__b",
            "a-b.c_d__e",
            "bitnami/postgresql-repmgr",
            "kube-state-metrics/kube-state-metrics",
        ] {
            let name = RepoName::parse(good).unwrap();
            assert_eq!(name.as_str(), good);
            assert_eq!(name.to_string(), good);
        }
        assert!(RepoName::parse(&"a".repeat(255)).is_ok());
        let nested = ["abc"; 63].join("/");
        assert_eq!(nested.len(), 251);
        assert!(RepoName::parse(&nested).is_ok());
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "/",
            "/a",
            "a/",
            "a//b",
            "..",
            ".",
            "a/../b",
            "a/./b",
            "../etc",
            "a%2fb",
            "a%2Fb",
            "a%2e%2e",
            "Alpine",
            "library/Alpine",
            "a..b",
            "a.-b",
            "a___b",
            "a_.b",
            "-a",
            "a-",
            "_a",
            "a.",
            "a b",
            "a\\b",
            "a:b",
            "a\0b",
            "älpine",
            "a@sha256",
        ] {
            let err = RepoName::parse(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::NameInvalid, "{bad:?}");
        }
        let err = RepoName::parse(&"a".repeat(256)).unwrap_err();
        assert!(err.message.contains("256 bytes"), "{}", err.message);
    }

    #[test]
    fn messages_name_the_problem() {
        let msg = |s: &str| RepoName::parse(s).unwrap_err().message;
        assert!(msg("Alpine").contains("upper-case"));
        assert!(msg("a%2fb").contains("percent-encoded"));
        assert!(msg("a//b").contains("empty path component"));
        assert!(msg("a..b").contains("separator \"..\""));
    }

    #[test]
    fn round_trips_through_serde() {
        let name = RepoName::parse("library/alpine").unwrap();
        let json = serde_json::to_string(&name).unwrap();
        assert_eq!(json, "\"library/alpine\"");
        assert_eq!(serde_json::from_str::<RepoName>(&json).unwrap(), name);
        assert!(serde_json::from_str::<RepoName>("\"../x\"").is_err());
    }
}

//! Registry authentication challenges (`WWW-Authenticate`), as the
//! distribution token spec uses them.
//!
//! A registry that wants credentials answers 401 with either
//! `Basic realm="…"` or `Bearer realm="https://auth…/token",service="…",
//! scope="repository:NAME:pull"`; the client then gets a token from the
//! realm. regcache parses these to run the flow itself when it checks whether
//! a repository is public.

/// One parsed challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm="…"`: send user and password directly.
    Basic,
    /// `Bearer …`: get a token from `realm`.
    Bearer(BearerChallenge),
}

/// The parameters of a Bearer challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerChallenge {
    /// The token endpoint URL.
    pub realm: String,
    /// The `service` parameter to pass on, if any.
    pub service: Option<String>,
    /// The `scope` the registry asked for, if any.
    pub scope: Option<String>,
}

/// The scope that grants pulling `repo`.
pub fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

/// Parses a `WWW-Authenticate` value into its first usable challenge.
///
/// Parameters are `key=value` or `key="quoted, value"` separated by commas;
/// unknown schemes and parameters are ignored. Never panics.
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = match value.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r),
        None => (value, ""),
    };
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.clone())
    };
    let realm = get("realm").filter(|r| r.starts_with("https://") || r.starts_with("http://"))?;
    Some(Challenge::Bearer(BearerChallenge {
        realm,
        service: get("service"),
        scope: get("scope"),
    }))
}

/// `a=b, c="d, e"` → [(a, b), (c, "d, e")].
fn parse_params(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(escaped) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
            value = value.trim().to_string();
        }
        out.push((key.trim().to_string(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer(BearerChallenge {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            }))
        );
    }

    #[test]
    fn quoted_commas_unquoted_values_and_basic() {
        let c = parse_challenge(r#"bearer realm=https://a.test/t, scope="repository:x:pull,push""#);
        let Some(Challenge::Bearer(b)) = c else {
            panic!("{c:?}")
        };
        assert_eq!(b.realm, "https://a.test/t");
        assert_eq!(b.scope.as_deref(), Some("repository:x:pull,push"));
        assert_eq!(b.service, None);
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry""#),
            Some(Challenge::Basic)
        );
    }

    #[test]
    fn garbage_is_none_not_a_panic() {
        for v in [
            "",
            "Bearer",
            "Bearer realm=ftp://x",
            "Negotiate abc",
            "Bearer =,,\"",
            "Bearer realm=\"unterminated",
        ] {
            assert!(
                !matches!(parse_challenge(v), Some(Challenge::Bearer(ref b)) if b.realm.is_empty()),
                "{v}"
            );
        }
        assert_eq!(parse_challenge("Bearer realm=ftp://x"), None);
    }
}

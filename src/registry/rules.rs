//! Operators' image rules: which repositories may pass, which are never
//! stored, and per-repository freshness and retention.
//!
//! A rule matches a repository by a glob over `registry/repository`:
//! `*` stands for any run of characters within one `/`-separated component,
//! `**` (a whole component) for any number of components, so
//! `docker.io/library/*` is Docker Hub's official images and
//! `ghcr.io/acme/**` everything under `acme`. The first rule that matches
//! decides ([`Rules::decide`]); a repository no rule matches is allowed and
//! cached with the global settings.
//!
//! Patterns are written the way image references are: a first component
//! that holds a `.` or a `:` or is `localhost` names the registry, any other
//! name is on Docker Hub (`library/*` is `docker.io/library/*`, `nginx` is
//! `docker.io/library/nginx`); Docker Hub's aliases (`index.docker.io`) and
//! port 443 are written as regcache keys them ([`canonical_registry`]). A
//! first component with a glob in it (`*.corp.example/**`, `**`) matches
//! registry names as they are. An insecure (plain-http) registry is matched
//! as `host:port` (port 80 dropped), like an HTTPS one on that port.
//!
//! A rule is about a repository, never a tag: a pull by digest meets the
//! same rule as a pull by tag, and so does every way a request comes in.
//! Nothing here does I/O.

use std::fmt;
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use super::hosts::canonical_registry;
use super::reference::{docker_hub_repository, names_registry};

/// What a matching rule does with requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Serve the repository (the default).
    #[default]
    Allow,
    /// Refuse every request for the repository with 403 `DENIED`.
    Deny,
}

/// One rule as an operator writes it, before its pattern is compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    /// The `registry/repository` glob, as written.
    pub pattern: String,
    /// Allow or deny.
    pub action: Action,
    /// Whether content is stored; `false` passes requests through untouched.
    pub cache: bool,
    /// Overrides `tag_ttl` for the repositories it matches.
    pub tag_ttl: Option<Duration>,
    /// Overrides `max_unused` for the repositories it matches.
    pub max_unused: Option<Duration>,
}

/// A rule of the configuration, numbered from 1 in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its place in the list, from 1: how messages and metrics name it.
    pub number: usize,
    /// The pattern as the operator wrote it.
    pub written: String,
    /// The pattern as matched (registry canonical, Docker Hub expanded).
    pub pattern: String,
    /// What it says.
    pub spec: RuleSpec,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {} (match = {:?})", self.number, self.written)
    }
}

/// The compiled rule list.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
    set: GlobSet,
}

/// A pattern that cannot be a rule; the message says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {number} (match = {pattern:?}): {why}")]
pub struct RuleError {
    /// The rule's number, from 1.
    pub number: usize,
    /// The pattern as written.
    pub pattern: String,
    /// What is wrong.
    pub why: String,
}

/// What the rules say about one repository: the outcome of [`Rules::decide`],
/// worked out once per request and carried with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The number of the rule that matched, if one did.
    pub rule: Option<usize>,
    /// Allow or deny.
    pub action: Action,
    /// Whether the repository's content is stored.
    pub cache: bool,
    /// The rule's `tag_ttl`, if it sets one.
    pub tag_ttl: Option<Duration>,
    /// The rule's `max_unused`, if it sets one.
    pub max_unused: Option<Duration>,
}

impl Decision {
    /// The decision when no rule matches: allowed, cached, global settings.
    pub const DEFAULT: Decision = Decision {
        rule: None,
        action: Action::Allow,
        cache: true,
        tag_ttl: None,
        max_unused: None,
    };

    /// Whether requests are refused.
    pub fn is_denied(&self) -> bool {
        self.action == Action::Deny
    }
}

impl Default for Decision {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Rules {
    /// Compiles `specs`, in order; the first pattern that is not a valid
    /// `registry/repository` glob is the error.
    pub fn new(specs: Vec<RuleSpec>) -> Result<Self, RuleError> {
        let mut set = GlobSetBuilder::new();
        let mut rules = Vec::with_capacity(specs.len());
        for (i, spec) in specs.into_iter().enumerate() {
            let number = i + 1;
            let error = |why: String| RuleError {
                number,
                pattern: spec.pattern.clone(),
                why,
            };
            let pattern = normalize_pattern(&spec.pattern).map_err(error)?;
            let glob = GlobBuilder::new(&pattern)
                .literal_separator(true)
                .backslash_escape(false)
                .build()
                .map_err(|e| error(e.kind().to_string()))?;
            set.add(glob);
            rules.push(Rule {
                number,
                written: spec.pattern.clone(),
                pattern,
                spec,
            });
        }
        let set = set.build().map_err(|e| RuleError {
            number: 0,
            pattern: String::new(),
            why: e.to_string(),
        })?;
        Ok(Self { rules, set })
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule numbered `number` (from 1).
    pub fn rule(&self, number: usize) -> Option<&Rule> {
        number.checked_sub(1).and_then(|i| self.rules.get(i))
    }

    /// What the first matching rule says about `repo` of the registry keyed
    /// `registry` (as [`crate::registry::hosts::canonical_registry`] or, for
    /// an insecure registry, `http://host:port`).
    pub fn decide(&self, registry: &str, repo: &str) -> Decision {
        if self.rules.is_empty() {
            return Decision::DEFAULT;
        }
        let subject = format!("{}/{repo}", match_host(registry));
        let Some(first) = self.set.matches(subject.as_str()).into_iter().min() else {
            return Decision::DEFAULT;
        };
        let rule = &self.rules[first];
        Decision {
            rule: Some(rule.number),
            action: rule.spec.action,
            cache: rule.spec.cache,
            tag_ttl: rule.spec.tag_ttl,
            max_unused: rule.spec.max_unused,
        }
    }

    /// The message a denied client reads: the repository and the rule.
    pub fn denial_message(&self, decision: &Decision, registry: &str, repo: &str) -> String {
        let rule = decision
            .rule
            .and_then(|n| self.rule(n))
            .map_or_else(|| "a rule".to_string(), ToString::to_string);
        format!(
            "{}/{repo} is denied by regcache: {rule} of its configuration",
            match_host(registry)
        )
    }
}

impl Rules {
    /// What `regcache rules test` prints for `repo` of `registry`: the rule
    /// that matches (if one does) and what it does.
    pub fn explain(&self, registry: &str, repo: &str) -> String {
        let decision = self.decide(registry, repo);
        let subject = format!("{}/{repo}", match_host(registry));
        let which = decision
            .rule
            .and_then(|n| self.rule(n))
            .map_or_else(|| "no rule matches".to_string(), ToString::to_string);
        if decision.is_denied() {
            return format!("{subject}: {which}: deny (every request for it gets 403 DENIED)");
        }
        let mut does = vec!["allow".to_string()];
        does.push(if decision.cache {
            "cached".to_string()
        } else {
            "never stored (passed through)".to_string()
        });
        if let Some(ttl) = decision.tag_ttl {
            does.push(format!("tag_ttl = {} s", ttl.as_secs()));
        }
        if let Some(unused) = decision.max_unused {
            does.push(format!("max_unused = {} s", unused.as_secs()));
        }
        if decision.cache && (decision.tag_ttl.is_none() || decision.max_unused.is_none()) {
            does.push("otherwise the global settings".to_string());
        }
        format!("{subject}: {which}: {}", does.join(", "))
    }
}

/// The registry part of the matched subject: the canonical name, or
/// `host:port` for an insecure registry (`http://lab.test:80` is `lab.test`).
fn match_host(registry: &str) -> &str {
    match registry.strip_prefix("http://") {
        Some(hostport) => hostport.strip_suffix(":80").unwrap_or(hostport),
        None => registry,
    }
}

/// The pattern as matched: the registry written as regcache keys it, Docker
/// Hub names expanded (see the module documentation).
fn normalize_pattern(written: &str) -> Result<String, String> {
    let written = written.trim();
    if written.is_empty() {
        return Err("the pattern is empty".into());
    }
    if written.contains('@') {
        return Err(
            "a rule matches a repository, not a digest: leave out @sha256:… (a pull by digest \
             meets the rule of its repository)"
                .into(),
        );
    }
    if written.chars().any(|c| c.is_whitespace() || c == '\\') {
        return Err("spaces and backslashes cannot appear in a repository name".into());
    }
    if written == "**" {
        return Ok(written.to_string());
    }
    let (first, rest) = match written.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (written, None),
    };
    if first.contains(['*', '?', '[', '{']) {
        return Ok(written.to_string());
    }
    if rest.is_none() && first.contains(':') {
        return Err("a rule matches a repository, not a tag: leave out :TAG".into());
    }
    if names_registry(first) {
        let registry = canonical_registry(first);
        let Some(rest) = rest.filter(|r| !r.is_empty()) else {
            return Err(format!(
                "name a repository after the registry: {first}/** for all of it"
            ));
        };
        if rest
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains(':'))
            && !rest.contains('*')
        {
            return Err("a rule matches a repository, not a tag: leave out :TAG".into());
        }
        let rest = if registry == "docker.io" && !rest.contains('*') {
            docker_hub_repository(rest)
        } else {
            rest.to_string()
        };
        return Ok(format!("{registry}/{rest}"));
    }
    if written.contains(':') {
        return Err("a rule matches a repository, not a tag: leave out :TAG".into());
    }
    let repo = if written.contains('*') {
        written.to_string()
    } else {
        docker_hub_repository(written)
    };
    Ok(format!("docker.io/{repo}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pattern: &str, action: Action) -> RuleSpec {
        RuleSpec {
            pattern: pattern.into(),
            action,
            cache: true,
            tag_ttl: None,
            max_unused: None,
        }
    }

    fn rules(patterns: &[(&str, Action)]) -> Rules {
        Rules::new(patterns.iter().map(|(p, a)| spec(p, *a)).collect()).unwrap()
    }

    #[test]
    fn patterns_are_written_as_image_references() {
        let table = [
            ("docker.io/library/*", "docker.io/library/*"),
            ("index.docker.io/library/*", "docker.io/library/*"),
            ("registry-1.docker.io/acme/**", "docker.io/acme/**"),
            ("docker.io/nginx", "docker.io/library/nginx"),
            ("nginx", "docker.io/library/nginx"),
            ("library/*", "docker.io/library/*"),
            ("acme/*", "docker.io/acme/*"),
            ("GHCR.io/acme/**", "ghcr.io/acme/**"),
            ("ghcr.io:443/acme/x", "ghcr.io/acme/x"),
            ("lab.test:5000/**", "lab.test:5000/**"),
            ("localhost/x", "localhost/x"),
            ("*.corp.example/**", "*.corp.example/**"),
            ("**", "**"),
        ];
        for (written, want) in table {
            assert_eq!(normalize_pattern(written).as_deref(), Ok(want), "{written}");
        }
    }

    #[test]
    fn patterns_that_cannot_be_rules_say_why() {
        for (bad, says) in [
            ("", "empty"),
            ("ghcr.io", "name a repository"),
            ("ghcr.io/", "name a repository"),
            ("docker.io/library/nginx@sha256:abc", "not a digest"),
            ("nginx:1.25", "not a tag"),
            ("ghcr.io/acme/tool:v1", "not a tag"),
            ("ghcr.io/a b", "spaces"),
            ("ghcr.io/[", "unclosed"),
        ] {
            let err = Rules::new(vec![spec(bad, Action::Deny)]).unwrap_err();
            assert_eq!(err.number, 1);
            assert!(err.to_string().contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let rules = rules(&[
            ("docker.io/library/*", Action::Allow),
            ("ghcr.io/acme/**", Action::Allow),
            ("quay.io/evil/*", Action::Deny),
            ("**", Action::Deny),
        ]);
        let table = [
            // registry key, repository, rule, denied?
            ("docker.io", "library/alpine", Some(1), false),
            ("docker.io", "library/a/b", Some(4), true),
            ("docker.io", "acme/tool", Some(4), true),
            ("ghcr.io", "acme/tool", Some(2), false),
            ("ghcr.io", "acme/team/deep/tool", Some(2), false),
            ("ghcr.io", "acmecorp/tool", Some(4), true),
            ("ghcr.io:8443", "acme/tool", Some(4), true),
            ("quay.io", "evil/x", Some(3), true),
            ("http://lab.test:80", "x", Some(4), true),
        ];
        for (registry, repo, rule, denied) in table {
            let d = rules.decide(registry, repo);
            assert_eq!((d.rule, d.is_denied()), (rule, denied), "{registry}/{repo}");
        }
    }

    #[test]
    fn no_rule_means_allowed_and_cached() {
        let rules = rules(&[("ghcr.io/acme/*", Action::Deny)]);
        assert_eq!(
            rules.decide("docker.io", "library/alpine"),
            Decision::DEFAULT
        );
        assert_eq!(
            Rules::default().decide("ghcr.io", "acme/x"),
            Decision::DEFAULT
        );
    }

    #[test]
    fn ports_and_insecure_registries_match_as_host_and_port() {
        let rules = rules(&[
            ("lab.test:5000/**", Action::Deny),
            ("lab.test/**", Action::Deny),
            ("*.corp.example/**", Action::Deny),
        ]);
        let table = [
            ("lab.test:5000", "x", Some(1)),
            ("http://lab.test:5000", "x", Some(1)),
            ("http://lab.test:80", "x", Some(2)),
            ("lab.test", "x/y", Some(2)),
            ("lab.test:5001", "x", None),
            ("reg.corp.example", "team/app", Some(3)),
            ("reg.corp.example:5000", "team/app", None),
        ];
        for (registry, repo, rule) in table {
            assert_eq!(rules.decide(registry, repo).rule, rule, "{registry}/{repo}");
        }
    }

    #[test]
    fn a_rule_carries_its_settings() {
        let rules = Rules::new(vec![RuleSpec {
            pattern: "docker.io/library/*".into(),
            action: Action::Allow,
            cache: false,
            tag_ttl: Some(Duration::from_secs(3600)),
            max_unused: Some(Duration::from_secs(86_400)),
        }])
        .unwrap();
        let d = rules.decide("docker.io", "library/alpine");
        assert_eq!(
            d,
            Decision {
                rule: Some(1),
                action: Action::Allow,
                cache: false,
                tag_ttl: Some(Duration::from_secs(3600)),
                max_unused: Some(Duration::from_secs(86_400)),
            }
        );
    }

    #[test]
    fn explain_says_which_rule_and_what_it_does() {
        let rules = Rules::new(vec![
            RuleSpec {
                tag_ttl: Some(Duration::from_secs(3600)),
                ..spec("docker.io/library/*", Action::Allow)
            },
            RuleSpec {
                cache: false,
                ..spec("ghcr.io/acme/**", Action::Allow)
            },
            spec("quay.io/**", Action::Deny),
        ])
        .unwrap();
        let table = [
            ("docker.io", "library/alpine", "docker.io/library/alpine: rule 1 (match = \"docker.io/library/*\"): allow, cached, tag_ttl = 3600 s, otherwise the global settings"),
            ("ghcr.io", "acme/tool", "ghcr.io/acme/tool: rule 2 (match = \"ghcr.io/acme/**\"): allow, never stored (passed through)"),
            ("quay.io", "x/y", "quay.io/x/y: rule 3 (match = \"quay.io/**\"): deny (every request for it gets 403 DENIED)"),
            ("gcr.io", "x", "gcr.io/x: no rule matches: allow, cached, otherwise the global settings"),
        ];
        for (registry, repo, want) in table {
            assert_eq!(rules.explain(registry, repo), want);
        }
    }

    #[test]
    fn the_denial_names_the_repository_and_the_rule() {
        let rules = rules(&[("**", Action::Deny)]);
        let d = rules.decide("docker.io", "library/alpine");
        assert_eq!(
            rules.denial_message(&d, "docker.io", "library/alpine"),
            "docker.io/library/alpine is denied by regcache: rule 1 (match = \"**\") of its configuration"
        );
    }
}

//! Whether a cached digest may be served through a repository: the sharing
//! verdict for *links*, as a pure decision.
//!
//! A link (registry, repository, digest) says the registry served or
//! confirmed that digest for that repository. Links are earned only by what
//! a registry does, never by what a manifest says:
//!
//! - the manifest itself, fetched through the repository (verified bytes);
//! - a blob the registry sent for the repository (a fill), linked once its
//!   bytes matched the digest;
//! - a `HEAD` of the blob (or manifest by digest) in the repository with the
//!   client's own credential answered 200, **but only within a registry that
//!   already holds a link for the digest** (see below);
//! - bundle import (an operator's action).
//!
//! Digests named inside a manifest (`config`, `layers`, `blobs`, `manifests`,
//! `subject`) and referrers are pointers, never links: registries accept
//! manifests naming digests they do not hold (`subject` may point nowhere,
//! distribution 2.8 does not check `blobs`).
//!
//! **Why a HEAD counts only within a registry that has the digest.** A `HEAD`
//! answered 200 proves nothing about bytes: a hostile registry answers 200
//! to anything. Within a registry that already served the digest (verified
//! bytes, or a chain of confirmations that started with verified bytes), a
//! 200 for another repository is that registry's own statement about its
//! repositories, which is what it would enforce itself. A registry with no
//! link for the digest must prove possession the only way that cannot be
//! faked: it is asked with a `GET`, and the bytes served come from that
//! registry and are verified against the digest.
//!
//! Content already public through some repository (anywhere) is served from
//! the cache with no upstream contact: anyone could fetch it anonymously, so
//! serving it leaks nothing. "Public" is a finding younger than `public_ttl`
//! (offline: the last finding): a repository made private since stops
//! opening its digests elsewhere once that finding is older. The usual
//! check that the client may read the requested repository still applies
//! in every case.

/// What the cache knows about a digest asked through one repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkFacts {
    /// The digest is linked to the requested (registry, repository).
    pub linked_here: bool,
    /// The digest is linked to some repository found public within
    /// `public_ttl` (the openness the cache index keeps; offline, the last
    /// finding however old), in any registry.
    pub public_somewhere: bool,
    /// The digest is linked to some repository of the requested registry.
    pub linked_in_registry: bool,
}

impl LinkFacts {
    /// The facts of a digest linked to `places` (registry, repository),
    /// asked through `repo` on `registry`; `public(r, p)` says whether the
    /// repository counts as public now (found public recently enough).
    /// Openness learnt over plain http (an insecure registry, keyed
    /// `http://…`) is anyone-on-the-path's word: it counts for that registry
    /// only, never for another.
    pub fn of<'a>(
        registry: &str,
        repo: &str,
        places: impl IntoIterator<Item = (&'a str, &'a str)>,
        public: impl Fn(&str, &str) -> bool,
    ) -> Self {
        let mut facts = LinkFacts::default();
        for (r, p) in places {
            let same_registry = r == registry;
            facts.linked_here |= same_registry && p == repo;
            facts.linked_in_registry |= same_registry;
            let trusted = same_registry || !is_plain_http(r);
            facts.public_somewhere |= trusted && public(r, p);
        }
        facts
    }
}

/// Whether a registry key names a plain-http (insecure) registry.
fn is_plain_http(registry: &str) -> bool {
    registry.starts_with("http://")
}

/// What to do with a cached digest asked through a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkVerdict {
    /// Serve from the cache (after the client's access check for the
    /// requested repository), no upstream contact for the link.
    Serve,
    /// Ask the registry with a `HEAD` in the requested repository with the
    /// client's own credential: 200 links and serves; anything else is the
    /// registry's answer, with no bytes.
    Confirm,
    /// Ask the registry with a `GET`, as if the digest were not cached: the
    /// bytes served come from that registry and are verified.
    Fetch,
}

/// The verdict for a cached digest asked through a repository (see the
/// module documentation for the rule and why).
pub fn verdict(facts: LinkFacts) -> LinkVerdict {
    if facts.linked_here || facts.public_somewhere {
        LinkVerdict::Serve
    } else if facts.linked_in_registry {
        LinkVerdict::Confirm
    } else {
        LinkVerdict::Fetch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_table() {
        use LinkVerdict::*;
        // (linked here, public somewhere, linked in this registry) → verdict
        let table = [
            ((true, false, true), Serve, "fetched or confirmed here"),
            ((true, true, true), Serve, "linked here and public"),
            (
                (false, true, false),
                Serve,
                "public elsewhere, even another registry",
            ),
            (
                (false, true, true),
                Serve,
                "public through another repository",
            ),
            (
                (false, false, true),
                Confirm,
                "guarded, this registry has it",
            ),
            ((false, false, false), Fetch, "only another registry has it"),
            (
                (true, false, false),
                Serve,
                "linked here (registry link implied)",
            ),
        ];
        for ((linked_here, public_somewhere, linked_in_registry), want, why) in table {
            let facts = LinkFacts {
                linked_here,
                public_somewhere,
                linked_in_registry,
            };
            assert_eq!(verdict(facts), want, "{why}: {facts:?}");
        }
    }

    #[test]
    fn nothing_known_means_fetch() {
        assert_eq!(verdict(LinkFacts::default()), LinkVerdict::Fetch);
    }

    #[test]
    fn facts_of_places_table() {
        let public = |r: &str, p: &str| {
            matches!(
                (r, p),
                ("docker.io", "library/a") | ("http://lab:5000", "x/y")
            )
        };
        /// (places, asked registry, asked repo) -> (linked_here,
        /// public_somewhere, linked_in_registry), and why.
        type Case<'a> = (
            &'a [(&'a str, &'a str)],
            &'a str,
            &'a str,
            (bool, bool, bool),
            &'a str,
        );
        let table: [Case; 6] = [
            (
                &[],
                "docker.io",
                "library/a",
                (false, false, false),
                "no places",
            ),
            (
                &[("docker.io", "library/a")],
                "docker.io",
                "library/a",
                (true, true, true),
                "here and public",
            ),
            (
                &[("docker.io", "library/a")],
                "ghcr.io",
                "o/b",
                (false, true, false),
                "public in another registry counts",
            ),
            (
                &[("docker.io", "priv/b")],
                "docker.io",
                "o/c",
                (false, false, true),
                "guarded in this registry",
            ),
            (
                &[("http://lab:5000", "x/y")],
                "docker.io",
                "o/c",
                (false, false, false),
                "plain-http openness never counts elsewhere",
            ),
            (
                &[("http://lab:5000", "x/y")],
                "http://lab:5000",
                "x/z",
                (false, true, true),
                "plain-http openness counts for its own registry",
            ),
        ];
        for (places, registry, repo, (here, public_somewhere, in_registry), why) in table {
            let facts = LinkFacts::of(registry, repo, places.iter().copied(), public);
            assert_eq!(
                facts,
                LinkFacts {
                    linked_here: here,
                    public_somewhere,
                    linked_in_registry: in_registry,
                },
                "{why}"
            );
        }
    }
}

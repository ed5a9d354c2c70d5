//! Retention beyond the size cap: content not read for `max_unused` is
//! removed, even while the cache is below `cache_size`.
//!
//! An entry's limit comes from the repositories it is linked to: each
//! repository has its rule's `max_unused` or else the global one
//! ([`limit_of`]). Content shared by several repositories stays as long as
//! the most patient of them wants it, and a repository with no limit keeps
//! it forever; content linked nowhere uses the global limit. Entries being
//! read are never removed, and a tag whose manifest is no longer cached is
//! dropped. The decisions here are pure; [`super::Cache::remove_unused`]
//! applies them.

use std::time::Duration;

/// What one pass of [`super::Cache::remove_unused`] removed (and, summed
/// over the cache's life, what `cache stats` shows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    /// Content entries.
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Tags whose manifest was gone.
    pub tags: u64,
}

impl Removed {
    /// Whether nothing was removed.
    pub fn is_empty(&self) -> bool {
        *self == Removed::default()
    }
}

/// The index counters that keep [`Removed`] across restarts.
pub const COUNTERS: [&str; 3] = ["unused_entries", "unused_bytes", "unused_tags"];

/// How long an entry linked to `places` (registry, repository) may go
/// unread: the largest of their limits, `limit_for` (the rules) or else
/// `global`; `None` (kept) if any of them has none. An entry linked
/// nowhere has the global limit.
pub fn limit_of<'a>(
    places: impl IntoIterator<Item = (&'a str, &'a str)>,
    limit_for: &dyn Fn(&str, &str) -> Option<Duration>,
    global: Option<Duration>,
) -> Option<Duration> {
    let mut longest: Option<Duration> = None;
    for (registry, repo) in places {
        let limit = limit_for(registry, repo).or(global)?;
        longest = Some(longest.map_or(limit, |l| l.max(limit)));
    }
    longest.or(global)
}

/// Whether an entry last used at `last_used` (Unix seconds) has gone unread
/// for longer than `limit` at `now`.
pub fn is_unused(last_used: u64, now: u64, limit: Duration) -> bool {
    now.saturating_sub(last_used) > limit.as_secs()
}

/// How often the background pass runs for the shortest limit `shortest`:
/// a tenth of it, between 1 s and 1 h, so an entry outlives its limit by
/// at most that much.
pub fn period(shortest: Duration) -> Duration {
    (shortest / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn an_entry_stays_as_long_as_its_most_patient_repository_wants() {
        let rules = |_: &str, repo: &str| match repo {
            "library/alpine" => Some(7 * DAY),
            "acme/tool" => Some(90 * DAY),
            _ => None,
        };
        let global = Some(30 * DAY);
        type Row<'a> = (&'a [(&'a str, &'a str)], Option<Duration>, Option<Duration>);
        let table: [Row; 6] = [
            (&[], global, global),
            (&[("docker.io", "library/alpine")], global, Some(7 * DAY)),
            (&[("docker.io", "other/x")], global, global),
            (
                &[("docker.io", "library/alpine"), ("docker.io", "acme/tool")],
                global,
                Some(90 * DAY),
            ),
            (
                &[("docker.io", "library/alpine"), ("docker.io", "other/x")],
                None,
                None,
            ),
            (&[("docker.io", "library/alpine")], None, Some(7 * DAY)),
        ];
        for (places, global, want) in table {
            assert_eq!(
                limit_of(places.iter().copied(), &rules, global),
                want,
                "{places:?} with global {global:?}"
            );
        }
    }

    #[test]
    fn unused_means_longer_than_the_limit() {
        let limit = Duration::from_secs(60);
        assert!(!is_unused(1000, 1060, limit));
        assert!(is_unused(1000, 1061, limit));
        assert!(!is_unused(2000, 1000, limit), "a clock step back keeps it");
    }

    #[test]
    fn the_pass_runs_a_tenth_of_the_shortest_limit_between_a_second_and_an_hour() {
        assert_eq!(period(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(period(Duration::from_secs(600)), Duration::from_secs(60));
        assert_eq!(period(30 * DAY), Duration::from_secs(3600));
    }
}

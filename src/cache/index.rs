//! The persistent metadata of the cache, in one redb database (`index.redb`).
//!
//! Three tables: content entries (digest → size, last access, media type),
//! links (which repository may see which digest) and tags (which digest a tag
//! named, and when that was learnt). redb commits are atomic and crash-safe,
//! so after `kill -9` the index is exactly some committed state. Content
//! files are renamed into place *before* their entry is committed, and
//! entries are removed *before* their file, so the index never names a
//! partial file; a file the index does not name is an orphan, swept later.
//!
//! A `meta` table holds the schema version. Version 1 (no `meta` table)
//! linked every digest a manifest named to the manifest's repository, and
//! its openness and tag records could have been learnt over plain http:
//! such records cannot be told apart from earned ones, so opening a version
//! 1 index drops the links, openness and tags tables (logged); content stays,
//! links and tags are earned again on the next pull, openness on the next
//! request.
//!
//! Every function here does blocking I/O: call it from `spawn_blocking`.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

/// digest → (size, last access in Unix seconds, media type or "").
const CONTENT: TableDefinition<&str, (u64, u64, &str)> = TableDefinition::new("content");
/// "registry/repository@digest" → ().
const LINKS: TableDefinition<&str, ()> = TableDefinition::new("links");
/// "registry/repository:tag" → (digest, fetched at in Unix milliseconds).
const TAGS: TableDefinition<&str, (&str, u64)> = TableDefinition::new("tags");
/// "registry/repository" → (public?, learnt at in Unix milliseconds).
const OPENNESS: TableDefinition<&str, (bool, u64)> = TableDefinition::new("openness");
/// Counter name → value.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// "schema" → the index's schema version.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The schema version this regcache writes: links are only those a registry
/// served or confirmed (see [`crate::registry::link`]).
pub const SCHEMA_VERSION: u64 = 2;

/// An index problem.
pub type IndexError = redb::Error;

/// One content entry as stored (and as the admin API lists it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContentRow {
    /// `sha256:…`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Last access, Unix seconds.
    #[serde(rename = "last_used")]
    pub last_access: u64,
    /// Media type of a manifest, empty for blobs.
    pub media_type: String,
}

/// One tag as stored (and as the admin API lists it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TagRow {
    /// `registry/repository:tag`.
    #[serde(rename = "image")]
    pub key: String,
    /// The digest the tag named.
    pub digest: String,
    /// When that was learnt from upstream, Unix milliseconds.
    pub fetched_at_ms: u64,
}

/// Everything the index holds, as loaded at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Content entries.
    pub content: Vec<ContentRow>,
    /// Link keys.
    pub links: Vec<String>,
    /// Tags.
    pub tags: Vec<TagRow>,
    /// Counters (hits, misses).
    pub counters: Vec<(String, u64)>,
    /// Whether repositories were found public, and when.
    pub openness: Vec<(String, bool, u64)>,
}

impl Snapshot {
    /// The value of a counter (0 if never counted).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }
}

/// A change to apply in one transaction.
#[derive(Debug, Clone)]
pub enum Change {
    /// Insert or replace a content entry.
    PutContent(ContentRow),
    /// Remove a content entry.
    RemoveContent(String),
    /// Update only the last access time of an entry, if it still exists.
    Touch(String, u64),
    /// Insert a link key.
    PutLink(String),
    /// Remove a link key.
    RemoveLink(String),
    /// Insert or replace a tag.
    PutTag(TagRow),
    /// Remove a tag.
    RemoveTag(String),
    /// Add to a counter.
    Count(&'static str, u64),
    /// Record whether a repository is public, and when that was learnt.
    PutOpenness(String, bool, u64),
    /// Remove everything: content, links, tags, counters, openness.
    Clear,
}

/// The open database.
pub struct Index {
    db: Database,
}

impl Index {
    /// Opens (or creates) the database at `path`.
    ///
    /// An index of an older schema is migrated first (see the module
    /// documentation), with an info log line.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        {
            let existed = txn.list_tables()?.next().is_some();
            let mut meta = txn.open_table(META)?;
            let version = meta.get("schema")?.map(|v| v.value());
            if version.unwrap_or(1) < SCHEMA_VERSION {
                if existed {
                    let links = txn.open_table(LINKS)?.len()?;
                    let openness = txn.open_table(OPENNESS)?.len()?;
                    let tags = txn.open_table(TAGS)?.len()?;
                    txn.delete_table(LINKS)?;
                    txn.delete_table(OPENNESS)?;
                    txn.delete_table(TAGS)?;
                    tracing::info!(
                        from = version.unwrap_or(1),
                        to = SCHEMA_VERSION,
                        dropped_links = links,
                        dropped_openness = openness,
                        dropped_tags = tags,
                        "cache index migrated: links named by manifests, and openness and tags that plain http could have taught, cannot be told apart from earned ones, so they were dropped; they are learnt again on the next pulls"
                    );
                }
                meta.insert("schema", SCHEMA_VERSION)?;
            }
        }
        {
            txn.open_table(CONTENT)?;
            txn.open_table(LINKS)?;
            txn.open_table(TAGS)?;
            txn.open_table(COUNTERS)?;
            txn.open_table(OPENNESS)?;
        }
        txn.commit()?;
        Ok(Self { db })
    }

    /// Reads every table.
    pub fn load(&self) -> Result<Snapshot, IndexError> {
        let txn = self.db.begin_read()?;
        let mut snap = Snapshot::default();
        for row in txn.open_table(CONTENT)?.iter()? {
            let (k, v) = row?;
            let (size, last_access, media_type) = v.value();
            snap.content.push(ContentRow {
                digest: k.value().to_string(),
                size,
                last_access,
                media_type: media_type.to_string(),
            });
        }
        for row in txn.open_table(LINKS)?.iter()? {
            let (k, _) = row?;
            snap.links.push(k.value().to_string());
        }
        for row in txn.open_table(TAGS)?.iter()? {
            let (k, v) = row?;
            let (digest, fetched_at_ms) = v.value();
            snap.tags.push(TagRow {
                key: k.value().to_string(),
                digest: digest.to_string(),
                fetched_at_ms,
            });
        }
        for row in txn.open_table(COUNTERS)?.iter()? {
            let (k, v) = row?;
            snap.counters.push((k.value().to_string(), v.value()));
        }
        for row in txn.open_table(OPENNESS)?.iter()? {
            let (k, v) = row?;
            let (public, at) = v.value();
            snap.openness.push((k.value().to_string(), public, at));
        }
        Ok(snap)
    }

    /// Applies `changes` atomically, durable when this returns.
    pub fn apply(&self, changes: &[Change]) -> Result<(), IndexError> {
        if changes.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut content = txn.open_table(CONTENT)?;
            let mut links = txn.open_table(LINKS)?;
            let mut tags = txn.open_table(TAGS)?;
            let mut counters = txn.open_table(COUNTERS)?;
            let mut openness = txn.open_table(OPENNESS)?;
            for change in changes {
                match change {
                    Change::PutContent(r) => {
                        content.insert(
                            r.digest.as_str(),
                            (r.size, r.last_access, r.media_type.as_str()),
                        )?;
                    }
                    Change::RemoveContent(d) => {
                        content.remove(d.as_str())?;
                    }
                    Change::Touch(d, at) => {
                        let current = content.get(d.as_str())?.map(|v| {
                            let (size, _, media) = v.value();
                            (size, media.to_string())
                        });
                        if let Some((size, media)) = current {
                            content.insert(d.as_str(), (size, *at, media.as_str()))?;
                        }
                    }
                    Change::PutLink(k) => {
                        links.insert(k.as_str(), ())?;
                    }
                    Change::RemoveLink(k) => {
                        links.remove(k.as_str())?;
                    }
                    Change::PutTag(t) => {
                        tags.insert(t.key.as_str(), (t.digest.as_str(), t.fetched_at_ms))?;
                    }
                    Change::RemoveTag(k) => {
                        tags.remove(k.as_str())?;
                    }
                    Change::PutOpenness(key, public, at) => {
                        openness.insert(key.as_str(), (*public, *at))?;
                    }
                    Change::Clear => {
                        content.retain(|_, _| false)?;
                        links.retain(|_, _| false)?;
                        tags.retain(|_, _| false)?;
                        counters.retain(|_, _| false)?;
                        openness.retain(|_, _| false)?;
                    }
                    Change::Count(name, n) => {
                        let now = counters.get(*name)?.map(|v| v.value()).unwrap_or(0);
                        counters.insert(*name, now.saturating_add(*n))?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        {
            let index = Index::open(&path).unwrap();
            index
                .apply(&[
                    Change::PutContent(ContentRow {
                        digest: "sha256:aa".into(),
                        size: 3,
                        last_access: 10,
                        media_type: String::new(),
                    }),
                    Change::PutLink("docker.io/library/x@sha256:aa".into()),
                    Change::PutTag(TagRow {
                        key: "docker.io/library/x:1".into(),
                        digest: "sha256:aa".into(),
                        fetched_at_ms: 5,
                    }),
                    Change::Touch("sha256:aa".into(), 20),
                    Change::Touch("sha256:gone".into(), 20),
                    Change::Count("hits", 2),
                    Change::Count("hits", 3),
                ])
                .unwrap();
        }
        let snap = Index::open(&path).unwrap().load().unwrap();
        assert_eq!(snap.content.len(), 1);
        assert_eq!(snap.content[0].last_access, 20);
        assert_eq!(
            snap.links,
            vec!["docker.io/library/x@sha256:aa".to_string()]
        );
        assert_eq!(snap.tags[0].fetched_at_ms, 5);
        assert_eq!(snap.counters, vec![("hits".to_string(), 5)]);
    }

    /// A version 1 index (no `meta` table), as regcache wrote it before
    /// links had to be earned: content and counters stay; links, openness
    /// and tags go; the next open keeps what was written since.
    #[test]
    fn a_version_1_index_loses_its_links_openness_and_tags_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                txn.open_table(CONTENT)
                    .unwrap()
                    .insert("sha256:aa", (3, 10, ""))
                    .unwrap();
                let mut links = txn.open_table(LINKS).unwrap();
                links.insert("docker.io/library/x@sha256:aa", ()).unwrap();
                links.insert("docker.io/evil/pub@sha256:aa", ()).unwrap();
                txn.open_table(TAGS)
                    .unwrap()
                    .insert("docker.io/library/x:1", ("sha256:aa", 5))
                    .unwrap();
                txn.open_table(OPENNESS)
                    .unwrap()
                    .insert("docker.io/team/secret", (true, 7))
                    .unwrap();
                txn.open_table(COUNTERS).unwrap().insert("hits", 4).unwrap();
            }
            txn.commit().unwrap();
        }
        let snap = {
            let index = Index::open(&path).unwrap();
            let snap = index.load().unwrap();
            index
                .apply(&[
                    Change::PutLink("docker.io/library/x@sha256:aa".into()),
                    Change::PutOpenness("docker.io/library/x".into(), true, 9),
                ])
                .unwrap();
            snap
        };
        assert!(snap.links.is_empty(), "old links dropped: {:?}", snap.links);
        assert!(snap.openness.is_empty(), "old openness dropped");
        assert_eq!(snap.content.len(), 1, "content kept");
        assert!(
            snap.tags.is_empty(),
            "old tags dropped (plain http could poison them)"
        );
        assert_eq!(snap.counter("hits"), 4, "counters kept");
        // Migrated once: what was earned since survives the next open.
        let again = Index::open(&path).unwrap().load().unwrap();
        assert_eq!(
            again.links,
            vec!["docker.io/library/x@sha256:aa".to_string()]
        );
        assert_eq!(again.openness.len(), 1);
    }
}

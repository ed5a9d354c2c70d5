//! `regcache shared gc --unused-for DURATION`: the bound of the shared
//! tier, with no database but the bucket itself.
//!
//! An object's last use is the later of its own LastModified (its upload)
//! and that of its use marker `PREFIX/used/sha256/<hex>`, which nodes
//! rewrite at most once a day per digest ([`super::SharedStore::touch`]).
//! One run:
//!
//! 1. lists the markers into memory (a map of digest to time: the only
//!    state that grows with the bucket, some 100 bytes per marker);
//! 2. lists the leases: one whose recorded expiry passed more than
//!    [`STALE_LEASE`] ago (its node crashed) is deleted, every other one
//!    keeps its digest's object;
//! 3. streams the listing of `PREFIX/blobs/sha256/`: an object unused for
//!    longer than DURATION, with no lease, is deleted, then its marker (a
//!    marker written since the listing, read again just before, keeps it);
//! 4. deletes the markers left whose object is gone, once they are older
//!    than DURATION too.
//!
//! A node reading an object the run deletes fails over to the registry,
//! as for any object missing from the tier.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use object_store::path::Path as StorePath;
use object_store::{ObjectMeta, ObjectStoreExt as _};

use super::{timed, LeaseBody, SharedStore, LEASE_TTL};

/// How long after its recorded expiry a lease object is deleted: its
/// node crashed (a live node deletes its own).
pub const STALE_LEASE: Duration = Duration::from_secs(3600);

/// What one run does.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Objects whose last use is older than this are deleted.
    pub unused_for: Duration,
    /// List what would be deleted; delete nothing.
    pub dry_run: bool,
}

/// Objects and their bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// How many objects.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.objects += 1;
        self.bytes += bytes;
    }
}

/// What one run kept and deleted (or, in a dry run, would delete).
#[derive(Debug, Default)]
pub struct GcReport {
    /// The store, as `s3://BUCKET/PREFIX`.
    pub store: String,
    /// Whether nothing was deleted.
    pub dry_run: bool,
    /// Objects used recently enough.
    pub kept: Tally,
    /// Objects kept although unused: a node holds a lease on them.
    pub leased: Tally,
    /// Objects deleted.
    pub deleted: Tally,
    /// Use markers deleted (with their object, or left alone).
    pub markers_deleted: u64,
    /// Lease objects of crashed nodes deleted.
    pub leases_deleted: u64,
    /// Deletes the store refused or did not answer.
    pub failed: u64,
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        writeln!(f, "store:    {}", self.store)?;
        writeln!(
            f,
            "kept:     {} objects, {} bytes",
            self.kept.objects + self.leased.objects,
            self.kept.bytes + self.leased.bytes
        )?;
        if self.leased.objects > 0 {
            writeln!(
                f,
                "          ({} unused but leased by a node)",
                self.leased.objects
            )?;
        }
        writeln!(
            f,
            "{verb}: {} objects, {} bytes; {} use markers; {} stale leases",
            self.deleted.objects, self.deleted.bytes, self.markers_deleted, self.leases_deleted
        )?;
        if self.failed > 0 {
            writeln!(f, "failed:   {} deletes", self.failed)?;
        }
        Ok(())
    }
}

/// The store could not be listed.
#[derive(Debug, thiserror::Error)]
#[error("shared_store {store}: cannot list {what}: {source}")]
pub struct GcError {
    /// The store, as `s3://BUCKET/PREFIX`.
    store: String,
    /// What was being listed.
    what: String,
    /// What object_store said.
    source: object_store::Error,
}

/// What happens to one object.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Verdict {
    /// Used within the duration.
    Keep,
    /// Unused for longer, but a node holds its lease (it is being fetched).
    Leased,
    /// Unused for longer than the duration.
    Delete,
}

/// The verdict on an object uploaded at `uploaded`, last marked used at
/// `marked` (if ever), at `now`.
pub fn verdict(
    uploaded: SystemTime,
    marked: Option<SystemTime>,
    now: SystemTime,
    unused_for: Duration,
    leased: bool,
) -> Verdict {
    let last_use = marked.map_or(uploaded, |m| m.max(uploaded));
    // A clock ahead of this one: used just now.
    let unused = now.duration_since(last_use).unwrap_or_default();
    match (unused > unused_for, leased) {
        (false, _) => Verdict::Keep,
        (true, true) => Verdict::Leased,
        (true, false) => Verdict::Delete,
    }
}

/// Whether a lease recorded to expire at `expires` (None: unreadable; then
/// [`LEASE_TTL`] after it was written, at `written`) is stale at `now`.
pub fn lease_stale(expires: Option<SystemTime>, written: SystemTime, now: SystemTime) -> bool {
    let expires = expires.unwrap_or(written + LEASE_TTL);
    now.duration_since(expires)
        .is_ok_and(|late| late > STALE_LEASE)
}

/// The hex name of an object listed under `dir` (`PREFIX/blobs/sha256/`).
fn hex_of<'a>(meta: &'a ObjectMeta, dir: &str) -> Option<&'a str> {
    meta.location.as_ref().strip_prefix(dir)
}

impl SharedStore {
    /// The listing of everything under `dir` (a prefix ending in `/`).
    fn list_under(
        &self,
        dir: &str,
    ) -> futures_util::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
        let prefix = StorePath::from(dir.trim_end_matches('/'));
        self.store.list(Some(&prefix))
    }

    fn list_error(&self, what: &str, source: object_store::Error) -> GcError {
        GcError {
            store: self.name.clone(),
            what: what.to_string(),
            source,
        }
    }

    /// Deletes `key` unless this is a dry run; counts a failure.
    async fn gc_delete(&self, key: &StorePath, dry_run: bool, report: &mut GcReport) -> bool {
        if dry_run {
            return true;
        }
        match timed(self.store.delete(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => true,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "cannot delete");
                report.failed += 1;
                false
            }
        }
    }

    /// One garbage collection of the tier (see the [module](self)).
    /// `deleted` is told each object deleted (or that would be): its key
    /// and size. Fails when a listing fails (the store is unreachable).
    pub async fn gc(
        &self,
        options: &GcOptions,
        mut deleted: impl FnMut(&str, u64),
    ) -> Result<GcReport, GcError> {
        let now = SystemTime::now();
        let mut report = GcReport {
            store: self.name.clone(),
            dry_run: options.dry_run,
            ..GcReport::default()
        };
        let used_dir = format!("{}used/sha256/", self.prefix);
        let lease_dir = format!("{}leases/", self.prefix);
        let blob_dir = format!("{}blobs/sha256/", self.prefix);

        // The markers: the one map this run holds.
        let mut markers: HashMap<String, SystemTime> = HashMap::new();
        let mut listing = self.list_under(&used_dir);
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.list_error(&used_dir, e))?;
            if let Some(hex) = hex_of(&meta, &used_dir) {
                markers.insert(hex.to_string(), meta.last_modified.into());
            }
        }

        // The leases: stale ones go, the others protect their digest.
        let mut leased: HashSet<String> = HashSet::new();
        let lease_digests = format!("{lease_dir}sha256/");
        let mut listing = self.list_under(&lease_dir);
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.list_error(&lease_dir, e))?;
            let written: SystemTime = meta.last_modified.into();
            let Some(hex) = hex_of(&meta, &lease_digests) else {
                // A start-up probe a crashed node left behind.
                if lease_stale(None, written, now)
                    && self
                        .gc_delete(&meta.location, options.dry_run, &mut report)
                        .await
                {
                    report.leases_deleted += 1;
                }
                continue;
            };
            let expires = match timed(self.store.get(&meta.location)).await {
                Ok(got) => timed(got.bytes()).await.ok().and_then(|bytes| {
                    serde_json::from_slice::<LeaseBody>(&bytes)
                        .ok()
                        .map(|lease| {
                            SystemTime::UNIX_EPOCH + Duration::from_millis(lease.expires_unix_ms)
                        })
                }),
                // Released meanwhile.
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(self.list_error(&lease_dir, e)),
            };
            if lease_stale(expires, written, now) {
                if self
                    .gc_delete(&meta.location, options.dry_run, &mut report)
                    .await
                {
                    report.leases_deleted += 1;
                }
            } else {
                leased.insert(hex.to_string());
            }
        }

        // The objects, as the listing streams.
        let mut listing = self.list_under(&blob_dir);
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.list_error(&blob_dir, e))?;
            let Some(hex) = hex_of(&meta, &blob_dir) else {
                continue;
            };
            let marked = markers.remove(hex);
            let uploaded = meta.last_modified.into();
            let mut decided = verdict(
                uploaded,
                marked,
                now,
                options.unused_for,
                leased.contains(hex),
            );
            let marker = StorePath::from(format!("{used_dir}{hex}"));
            if decided == Verdict::Delete && marked.is_some() {
                // Touched since the listing: used.
                if let Ok(fresh) = timed(self.store.head(&marker)).await {
                    let fresh = Some(fresh.last_modified.into());
                    decided = verdict(uploaded, fresh, now, options.unused_for, false);
                }
            }
            match decided {
                Verdict::Keep => report.kept.add(meta.size),
                Verdict::Leased => report.leased.add(meta.size),
                Verdict::Delete => {
                    if self
                        .gc_delete(&meta.location, options.dry_run, &mut report)
                        .await
                    {
                        deleted(meta.location.as_ref(), meta.size);
                        report.deleted.add(meta.size);
                        if marked.is_some()
                            && self.gc_delete(&marker, options.dry_run, &mut report).await
                        {
                            report.markers_deleted += 1;
                        }
                    }
                }
            }
        }

        // Markers of objects no longer there.
        for (hex, marked) in markers {
            let unused = now.duration_since(marked).unwrap_or_default();
            let marker = StorePath::from(format!("{used_dir}{hex}"));
            if unused > options.unused_for
                && self.gc_delete(&marker, options.dry_run, &mut report).await
            {
                report.markers_deleted += 1;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::digest::Digest;
    use bytes::Bytes;
    use object_store::memory::InMemory;
    use object_store::PutPayload;
    use std::sync::Arc;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_last_use_is_the_later_of_the_upload_and_the_marker() {
        let now = SystemTime::UNIX_EPOCH + 100 * DAY;
        let ago = |days: u32| now - days * DAY;
        let month = 30 * DAY;
        assert_eq!(verdict(ago(1), None, now, month, false), Verdict::Keep);
        assert_eq!(verdict(ago(40), None, now, month, false), Verdict::Delete);
        assert_eq!(verdict(ago(40), None, now, month, true), Verdict::Leased);
        assert_eq!(
            verdict(ago(40), Some(ago(2)), now, month, false),
            Verdict::Keep
        );
        assert_eq!(
            verdict(ago(40), Some(ago(31)), now, month, false),
            Verdict::Delete
        );
        // A marker older than a re-upload does not age the object.
        assert_eq!(
            verdict(ago(1), Some(ago(50)), now, month, false),
            Verdict::Keep
        );
        // A timestamp ahead of this clock is a use just now.
        assert_eq!(
            verdict(now + DAY, None, now, Duration::ZERO, false),
            Verdict::Keep
        );
    }

    #[test]
    fn a_lease_is_stale_an_hour_after_it_expired() {
        let now = SystemTime::UNIX_EPOCH + 100 * DAY;
        let hour = Duration::from_secs(3600);
        let minute = Duration::from_secs(60);
        assert!(!lease_stale(Some(now + minute), now, now));
        assert!(!lease_stale(Some(now - 59 * minute), now, now));
        assert!(lease_stale(Some(now - hour - minute), now, now));
        // Unreadable: from when it was written.
        assert!(!lease_stale(None, now - 30 * minute, now));
        assert!(lease_stale(None, now - 2 * hour, now));
    }

    #[tokio::test]
    async fn a_run_deletes_the_unused_keeps_the_leased_and_clears_stale_leases() {
        let store = Arc::new(InMemory::new());
        let shared = SharedStore::with_store(store.clone(), "s3://test/p", "p");
        let (old, leased) = (Digest::of(b"old"), Digest::of(b"leased"));
        for d in [&old, &leased] {
            store
                .put(&shared.key(d), PutPayload::from_static(b"bytes"))
                .await
                .unwrap();
        }
        store
            .put(&shared.marker_key(&old), PutPayload::new())
            .await
            .unwrap();
        let orphan = Digest::of(b"gone");
        store
            .put(&shared.marker_key(&orphan), PutPayload::new())
            .await
            .unwrap();
        let lease = |ms: u64| {
            PutPayload::from(Bytes::from(
                serde_json::to_vec(&LeaseBody {
                    node: "n:1".into(),
                    peer: None,
                    expires_unix_ms: ms,
                })
                .unwrap(),
            ))
        };
        let now_ms = super::super::now_unix_ms();
        store
            .put(&shared.lease_key(&leased), lease(now_ms + 60_000))
            .await
            .unwrap();
        let crashed = Digest::of(b"crashed");
        store
            .put(&shared.lease_key(&crashed), lease(now_ms - 2 * 3_600_000))
            .await
            .unwrap();

        // Nothing is older than an hour.
        let keep_all = GcOptions {
            unused_for: Duration::from_secs(3600),
            dry_run: false,
        };
        let report = shared.gc(&keep_all, |_, _| {}).await.unwrap();
        assert_eq!(
            report.kept,
            Tally {
                objects: 2,
                bytes: 10
            }
        );
        assert_eq!(report.deleted.objects, 0);
        assert_eq!(report.markers_deleted, 0);
        assert_eq!(report.leases_deleted, 1, "the crashed node's lease");
        assert!(store.head(&shared.lease_key(&crashed)).await.is_err());

        // Everything is older than nothing: a dry run deletes nothing.
        let all = GcOptions {
            unused_for: Duration::ZERO,
            dry_run: true,
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut listed = Vec::new();
        let report = shared
            .gc(&all, |key, _| listed.push(key.to_string()))
            .await
            .unwrap();
        assert_eq!(listed, [shared.key(&old).to_string()]);
        assert_eq!(
            report.deleted,
            Tally {
                objects: 1,
                bytes: 5
            }
        );
        assert_eq!(report.leased.objects, 1);
        assert!(store.head(&shared.key(&old)).await.is_ok());

        let report = shared
            .gc(
                &GcOptions {
                    dry_run: false,
                    ..all
                },
                |_, _| {},
            )
            .await
            .unwrap();
        assert_eq!(report.deleted.objects, 1);
        assert_eq!(report.markers_deleted, 2, "its own and the orphan");
        assert!(store.head(&shared.key(&old)).await.is_err());
        assert!(store.head(&shared.marker_key(&old)).await.is_err());
        assert!(store.head(&shared.marker_key(&orphan)).await.is_err());
        assert!(store.head(&shared.key(&leased)).await.is_ok());
        assert!(report.to_string().contains("deleted: 1 objects, 5 bytes"));
    }
}

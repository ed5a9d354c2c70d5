//! The text of `regcache cache stats|ls|verify`, `export` and `import`:
//! the [`fmt::Display`] of what those commands return, with sizes written
//! for people ([`human`]).

use std::fmt;

use crate::admin::api::LiveStats;
use crate::cache::bundle::export::ExportSummary;
use crate::cache::bundle::import::ImportSummary;
use crate::cache::offline::{CacheStats, Listing, VerifyReport};

/// A size for people, in binary units: `17 B`, `1.5 KiB`, `5.0 MiB`.
pub fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// `s` when `n` is not 1, for plurals.
fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

impl fmt::Display for CacheStats {
    /// One aligned `name: value` line each.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ratio = match self.hit_percent() {
            Some(percent) => format!("{percent:.1}%"),
            None => "unknown".to_string(),
        };
        write!(
            f,
            "entries:    {}\nbytes:      {} ({})\ntags:       {}\nlinks:      {}\nhits:       {}\nmisses:     {}\nhit ratio:  {ratio}\n\
             unused:     {} entries ({}) and {} tags removed (max_unused)\n",
            self.entries,
            self.bytes,
            human(self.bytes),
            self.tags,
            self.links,
            self.hits,
            self.misses,
            self.unused_entries,
            human(self.unused_bytes),
            self.unused_tags,
        )
    }
}

impl fmt::Display for LiveStats {
    /// What [`CacheStats`] shows, then the running regcache's numbers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}capacity:   {} ({})\nfilling:    {} downloads, {}\nuptime:     {}s\nversion:    {}\n",
            self.cache,
            self.capacity_bytes,
            human(self.capacity_bytes),
            self.fills_in_progress,
            human(self.filling_bytes),
            self.uptime_seconds,
            self.version,
        )?;
        if let Some(t) = &self.shared {
            let state = if t.reachable {
                "reachable"
            } else {
                "UNREACHABLE"
            };
            writeln!(
                f,
                "shared:     {} ({state}), {} read, {} uploaded, {} from peers since start; {} leases held",
                t.store, t.reads, t.uploads, t.from_peers, t.leases_held
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Listing<'_> {
    /// `key<TAB>digest` per tag, then `digest<TAB>size<TAB>media type` per
    /// entry (`blob` for content that is no manifest).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.tags {
            writeln!(f, "{}\t{}", t.key, t.digest)?;
        }
        for r in &self.content {
            let kind = if r.media_type.is_empty() {
                "blob"
            } else {
                r.media_type.as_str()
            };
            writeln!(f, "{}\t{}\t{}", r.digest, human(r.size), kind)?;
        }
        Ok(())
    }
}

impl fmt::Display for VerifyReport {
    /// A line per damaged entry, then the count.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (digest, why) in &self.damaged {
            writeln!(f, "damaged\t{digest}\t{why}; removed")?;
        }
        writeln!(
            f,
            "checked {} entries ({}): {} damaged{}",
            self.checked,
            human(self.bytes),
            self.damaged.len(),
            if self.damaged.is_empty() {
                ""
            } else {
                ", removed (the next pull fetches them again)"
            }
        )
    }
}

impl fmt::Display for ExportSummary {
    /// `image<TAB>digest` per image, then one line of totals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (image, digest) in &self.images {
            writeln!(f, "{image}\t{digest}")?;
        }
        write!(
            f,
            "exported {} image{} ({} manifests, {} blobs, {}) to {}",
            self.images.len(),
            plural(self.images.len()),
            self.manifests,
            self.blobs,
            human(self.bytes),
            self.output.display()
        )?;
        match self.missing.len() {
            0 => {}
            1 => write!(f, "; 1 item not in the cache was left out")?,
            n => write!(f, "; {n} items not in the cache were left out")?,
        }
        match self.private_left_out.len() {
            0 => {}
            n => write!(
                f,
                "; {n} private image{} left out (--include-private exports {})",
                plural(n),
                if n == 1 { "it" } else { "them" }
            )?,
        }
        if !self.private_included.is_empty() {
            write!(
                f,
                "; {} private image{} included",
                self.private_included.len(),
                plural(self.private_included.len())
            )?;
        }
        writeln!(f)
    }
}

impl fmt::Display for ImportSummary {
    /// `image<TAB>digest` per image, then one line of totals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (image, digest) in &self.images {
            writeln!(f, "{image}\t{digest}")?;
        }
        write!(
            f,
            "imported {} image{} ({} manifests, {} blobs, {} new; {} already cached) from {}",
            self.images.len(),
            plural(self.images.len()),
            self.manifests,
            self.blobs,
            human(self.bytes),
            self.already,
            self.bundle.display()
        )?;
        match self.missing.len() {
            0 => {}
            1 => write!(f, "; 1 item was not in the bundle")?,
            n => write!(f, "; {n} items were not in the bundle")?,
        }
        match self.not_linked.len() {
            0 => {}
            1 => write!(
                f,
                "; 1 digest not linked to the image naming it (a pull links it)"
            )?,
            n => write!(
                f,
                "; {n} digests not linked to the images naming them (a pull links them)"
            )?,
        }
        writeln!(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::index::{ContentRow, Snapshot, TagRow};
    use crate::cache::offline::{list, stats};
    use crate::registry::digest::Digest;
    use crate::registry::reference::ImageRef;

    #[test]
    fn human_sizes() {
        for (bytes, shown) in [
            (0, "0 B"),
            (17, "17 B"),
            (1000, "1000 B"),
            (1536, "1.5 KiB"),
            (5 << 20, "5.0 MiB"),
            (123_456_789, "117.7 MiB"),
            (3 << 30, "3.0 GiB"),
        ] {
            assert_eq!(human(bytes), shown, "{bytes}");
        }
    }

    fn snapshot() -> Snapshot {
        let content = |digest: &str, size, last_access, media_type: &str| ContentRow {
            digest: digest.into(),
            size,
            last_access,
            media_type: media_type.into(),
        };
        let tag = |key: &str, digest: &str| TagRow {
            key: key.into(),
            digest: digest.into(),
            fetched_at_ms: 0,
        };
        Snapshot {
            content: vec![
                content("sha256:aa", 1536, 1, ""),
                content(
                    "sha256:bb",
                    5 << 20,
                    9,
                    "application/vnd.oci.image.manifest.v1+json",
                ),
                content("sha256:cc", 17, 5, ""),
            ],
            links: vec!["a".into(), "b".into()],
            tags: vec![
                tag("ghcr.io/z:1", "sha256:bb"),
                tag("docker.io/library/a:1", "sha256:cc"),
            ],
            counters: vec![("hits".into(), 2), ("misses".into(), 1)],
            openness: vec![],
        }
    }

    #[test]
    fn cache_stats_ls_and_verify_text() {
        let snap = snapshot();
        assert_eq!(
            stats(&snap).to_string(),
            "entries:    3\nbytes:      5244433 (5.0 MiB)\ntags:       2\nlinks:      2\n\
             hits:       2\nmisses:     1\nhit ratio:  66.7%\n\
             unused:     0 entries (0 B) and 0 tags removed (max_unused)\n"
        );
        assert_eq!(
            stats(&Snapshot::default()).to_string(),
            "entries:    0\nbytes:      0 (0 B)\ntags:       0\nlinks:      0\n\
             hits:       0\nmisses:     0\nhit ratio:  unknown\n\
             unused:     0 entries (0 B) and 0 tags removed (max_unused)\n"
        );
        assert_eq!(
            list(&snap).to_string(),
            "docker.io/library/a:1\tsha256:cc\nghcr.io/z:1\tsha256:bb\n\
             sha256:bb\t5.0 MiB\tapplication/vnd.oci.image.manifest.v1+json\n\
             sha256:cc\t17 B\tblob\nsha256:aa\t1.5 KiB\tblob\n"
        );
        let clean = VerifyReport {
            checked: 3,
            bytes: 3 << 30,
            damaged: vec![],
        };
        assert_eq!(
            clean.to_string(),
            "checked 3 entries (3.0 GiB): 0 damaged\n"
        );
        let damaged = VerifyReport {
            checked: 3,
            bytes: 1000,
            damaged: vec![("sha256:aa".into(), "gone".into())],
        };
        assert_eq!(
            damaged.to_string(),
            "damaged\tsha256:aa\tgone; removed\n\
             checked 3 entries (1000 B): 1 damaged, removed (the next pull fetches them again)\n"
        );
    }

    #[test]
    fn export_and_import_summaries() {
        let image = |s: &str| ImageRef::parse(s).unwrap();
        let d = Digest::of(b"x");
        let one = format!("docker.io/library/a:0\t{d}\n");
        let two = format!("{one}docker.io/library/a:1\t{d}\n");
        // (images, missing, private images / digests not linked), export, import.
        let cases = [
            (
                1,
                0,
                0,
                format!("{one}exported 1 image (4 manifests, 6 blobs, 117.7 MiB) to /tmp/b.tar\n"),
                format!("{one}imported 1 image (4 manifests, 6 blobs, 999 B new; 3 already cached) from /tmp/b.tar\n"),
            ),
            (
                2,
                1,
                1,
                format!("{two}exported 2 images (4 manifests, 6 blobs, 117.7 MiB) to /tmp/b.tar; 1 item not in the cache was left out; 1 private image left out (--include-private exports it); 1 private image included\n"),
                format!("{two}imported 2 images (4 manifests, 6 blobs, 999 B new; 3 already cached) from /tmp/b.tar; 1 item was not in the bundle; 1 digest not linked to the image naming it (a pull links it)\n"),
            ),
            (
                2,
                3,
                2,
                format!("{two}exported 2 images (4 manifests, 6 blobs, 117.7 MiB) to /tmp/b.tar; 3 items not in the cache were left out; 2 private images left out (--include-private exports them); 2 private images included\n"),
                format!("{two}imported 2 images (4 manifests, 6 blobs, 999 B new; 3 already cached) from /tmp/b.tar; 3 items were not in the bundle; 2 digests not linked to the images naming them (a pull links them)\n"),
            ),
        ];
        for (n, missing, private, exported, imported) in cases {
            let images: Vec<_> = (0..n)
                .map(|k| (image(&format!("a:{k}")), d.clone()))
                .collect();
            let export = ExportSummary {
                images: images.clone(),
                manifests: 4,
                blobs: 6,
                bytes: 123_456_789,
                missing: vec![d.clone(); missing],
                private_left_out: vec![image("p:1"); private],
                private_included: vec![image("q:1"); private],
                output: "/tmp/b.tar".into(),
            };
            assert_eq!(export.to_string(), exported);
            let import = ImportSummary {
                images,
                manifests: 4,
                blobs: 6,
                bytes: 999,
                already: 3,
                missing: vec![d.clone(); missing],
                not_linked: vec![(image("q:1"), d.clone()); private],
                bundle: "/tmp/b.tar".into(),
            };
            assert_eq!(import.to_string(), imported);
        }
    }
}

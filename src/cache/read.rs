//! Streaming content to clients: from a cached file, or from a download that
//! is still growing.
//!
//! Reads are positioned, in pooled chunks ([`super::chunks`]), so any number
//! of readers share one file without sharing an offset. While a
//! download is under way with a known length, its last byte is held back until
//! the digest has matched (and the last byte of a range being read): a client
//! can never complete a response whose bytes turn out wrong. If the download fails, the body ends with an error and
//! hyper aborts the response.
//!
//! Bytes at rest get the same promise ([`verifying`]): a complete file read
//! is hashed chunk by chunk as it passes (no second read, nothing buffered),
//! and its last chunk is held back until the digest matched. On a mismatch
//! the body ends with an error instead of that chunk and the entry is
//! dropped, so the next request fetches the blob again. A range is checked
//! before its first byte goes out ([`intact_for_range`]): the whole file is
//! hashed on the blocking pool, and a damaged entry is dropped so that the
//! request is answered as a miss. [`must_verify`] decides when a read is
//! checked (`verify_reads`).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::watch;

use super::chunks;
use super::fill::{Fill, Phase, Progress};
use super::{Cache, CacheError, Cached};
use crate::config::VerifyReads;
use crate::http::body::{Body, BoxError};
use crate::registry::digest::DigestHasher;

/// Whether a read of a cached entry must be checked against its digest:
/// under `always` every time, under `first` until the entry matched once in
/// this run, under `never` not at all. A read of the whole file is hashed as
/// it streams ([`verifying`]); a range is served only after the whole file
/// was hashed ([`intact_for_range`]).
pub fn must_verify(mode: VerifyReads, verified_this_run: bool) -> bool {
    match mode {
        VerifyReads::Always => true,
        VerifyReads::First => !verified_this_run,
        VerifyReads::Never => false,
    }
}

/// Before a range of a cached file is served: whether its bytes may go out.
/// When `mode` asks for a check ([`must_verify`]), the whole of `file` is
/// hashed on the blocking pool (streamed, never held in memory). On a match
/// the entry counts as verified for this run; otherwise (other bytes, another
/// length, a read error) the entry is dropped from `cache` and the answer is
/// false: serve nothing from it, fetch it again. Under `first` concurrent
/// ranges of one entry share one check; under `always` each range hashes.
pub async fn intact_for_range(
    cache: &Arc<Cache>,
    cached: &Cached,
    file: &Arc<std::fs::File>,
    mode: VerifyReads,
) -> bool {
    if !must_verify(mode, cached.is_verified()) {
        return true;
    }
    let check = || check_whole(cache, cached, file);
    match mode {
        VerifyReads::First => *cached.range_check().get_or_init(check).await,
        _ => check().await,
    }
}

/// Hashes all of `file`; marks the entry verified, or drops it.
async fn check_whole(cache: &Arc<Cache>, cached: &Cached, file: &Arc<std::fs::File>) -> bool {
    let (file, digest, path, size) = (
        file.clone(),
        cached.digest.clone(),
        cached.path.clone(),
        cached.size,
    );
    let why = tokio::task::spawn_blocking(move || {
        // Opened for this request, and its body reads at positions: reading
        // it through moves nobody else's offset.
        super::offline::check_content(&*file, &path, &digest, size)
    })
    .await
    .unwrap_or_else(|e| Some(format!("the check did not run: {e}")));
    let Some(why) = why else {
        cached.mark_verified();
        return true;
    };
    crate::metrics::get().verify_failed();
    tracing::warn!(
        digest = %cached.digest,
        reason = why,
        "cached file does not match its digest (changed on disk): range not served, entry dropped, fetched again"
    );
    if let Err(e) = cache.drop_damaged(cached).await {
        tracing::warn!(digest = %cached.digest, error = %e, "cannot drop a damaged cache entry");
    }
    false
}

/// A download failed while a client was reading it.
#[derive(Debug, thiserror::Error)]
#[error("download of {digest} failed: {reason}")]
pub struct FillFailed {
    digest: String,
    reason: String,
}

struct Reader {
    file: Arc<std::fs::File>,
    pos: u64,
    end: u64,
    growing: Option<(Arc<Fill>, watch::Receiver<Progress>)>,
    _lease: Option<Arc<()>>,
    check: Option<Check>,
}

/// The digest check of a complete cached file being served.
struct Check {
    hasher: DigestHasher,
    cached: Cached,
    cache: Arc<Cache>,
}

impl Check {
    /// Feeds one chunk; at the end of the file, compares. A mismatch drops
    /// the entry and becomes the body's error.
    fn feed(&mut self, bytes: &[u8], last: bool) -> Result<(), BoxError> {
        self.hasher.update(bytes);
        if !last {
            return Ok(());
        }
        let hasher = std::mem::replace(
            &mut self.hasher,
            DigestHasher::new(self.cached.digest.algorithm()),
        );
        let actual = hasher.finish();
        if actual == self.cached.digest {
            self.cached.mark_verified();
            return Ok(());
        }
        Err(self.damaged(format!("its bytes hash to {actual}")))
    }

    /// Logs the damage, drops the entry in the background, and returns the
    /// error that ends the body.
    fn damaged(&self, why: String) -> BoxError {
        let digest = self.cached.digest.to_string();
        crate::metrics::get().verify_failed();
        tracing::warn!(
            digest,
            reason = why,
            "cached file does not match its digest (changed on disk): response ended with an error, entry dropped; the next request fetches it again"
        );
        let (cache, cached) = (self.cache.clone(), self.cached.clone());
        tokio::spawn(async move {
            if let Err(e) = cache.drop_damaged(&cached).await {
                tracing::warn!(digest = %cached.digest, error = %e, "cannot drop a damaged cache entry");
            }
        });
        Box::new(CacheError::Mismatch {
            expected: digest,
            actual: why,
        })
    }
}

/// A body with bytes `start..end` of a complete file.
pub fn complete(file: Arc<std::fs::File>, start: u64, end: u64, lease: Arc<()>) -> Body {
    body(Reader {
        file,
        pos: start,
        end,
        growing: None,
        _lease: Some(lease),
        check: None,
    })
}

/// A body with all of a complete cached file, hashed as it passes: the last
/// chunk is sent only once the digest matched (then the entry counts as
/// verified for this run); otherwise the body ends with an error and the
/// entry is dropped from `cache`.
pub fn verifying(cache: Arc<Cache>, cached: &Cached, file: Arc<std::fs::File>) -> Body {
    body(Reader {
        file,
        pos: 0,
        end: cached.size,
        growing: None,
        _lease: Some(cached.lease.clone()),
        check: Some(Check {
            hasher: DigestHasher::new(cached.digest.algorithm()),
            cached: cached.clone(),
            cache,
        }),
    })
}

/// A body with bytes `start..end` of a download in progress (`end` may be
/// `u64::MAX` when the length is unknown: the body ends with the download).
pub fn growing(fill: Arc<Fill>, file: Arc<std::fs::File>, start: u64, end: u64) -> Body {
    let rx = fill.watch();
    body(Reader {
        file,
        pos: start,
        end,
        growing: Some((fill, rx)),
        _lease: None,
        check: None,
    })
}

fn body(reader: Reader) -> Body {
    let frames = stream::unfold(reader, |mut r| async move {
        match next_chunk(&mut r).await {
            Ok(Some(bytes)) => Some((Ok(Frame::data(bytes)), r)),
            Ok(None) => None,
            Err(e) => {
                // End the stream after the error.
                r.pos = r.end;
                r.growing = None;
                Some((Err(e), r))
            }
        }
    });
    StreamBody::new(frames).boxed()
}

/// What a reader of a download in progress may do next, decided from one
/// look at its progress (two looks could see the download finish in
/// between and end a body before its last bytes).
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Read on, up to this offset.
    ReadTo(u64),
    /// Every byte this body covers was read, and they matched.
    End,
    /// Nothing more may go yet: wait for the next change.
    Wait,
    /// The download failed or was abandoned (the reason).
    Fail(String),
}

/// The step of a reader at `pos` of a body ending at `end` (`u64::MAX`
/// when the length is unknown), given the download's `p`.
fn step(p: &Progress, pos: u64, end: u64) -> Step {
    // Every byte matched: all of it may go, whether or not the commit that
    // follows succeeds (the open file stays readable).
    let matched = || {
        let limit = end.min(p.written);
        if pos < limit {
            Step::ReadTo(limit)
        } else {
            Step::End
        }
    };
    match &p.phase {
        _ if p.verified => matched(),
        Phase::Done => matched(),
        Phase::Failed(reason) => Step::Fail(reason.to_string()),
        Phase::Abandoned => Step::Fail("abandoned".into()),
        Phase::Connecting | Phase::Streaming => {
            // Hold back the final byte of a known length, and of the range
            // being read, until the whole download is verified.
            let limit = match p.total {
                Some(total) => p.written.min(total.saturating_sub(1)),
                None => p.written,
            };
            let limit = end.saturating_sub(1).min(limit);
            if pos < limit {
                Step::ReadTo(limit)
            } else {
                Step::Wait
            }
        }
    }
}

async fn next_chunk(r: &mut Reader) -> Result<Option<Bytes>, BoxError> {
    loop {
        if r.pos >= r.end {
            return Ok(None);
        }
        let limit = match &mut r.growing {
            None => r.end,
            Some((fill, rx)) => {
                // Marks this version seen: a change after it wakes `changed`.
                let next = step(&rx.borrow_and_update(), r.pos, r.end);
                match next {
                    Step::ReadTo(limit) => limit,
                    Step::End => return Ok(None),
                    Step::Wait => {
                        if rx.changed().await.is_err() {
                            return Err(Box::new(FillFailed {
                                digest: fill.digest.to_string(),
                                reason: "download ended".into(),
                            }));
                        }
                        continue;
                    }
                    Step::Fail(reason) => {
                        return Err(Box::new(FillFailed {
                            digest: fill.digest.to_string(),
                            reason,
                        }))
                    }
                }
            }
        };
        let len = usize::try_from(limit - r.pos).unwrap_or(usize::MAX);
        let bytes = chunks::read(&r.file, r.pos, len).await?;
        if bytes.is_empty() {
            if let Some(check) = &r.check {
                return Err(check.damaged(format!("the file ends at byte {}", r.pos)));
            }
            return Err("cached file is shorter than its entry".into());
        }
        r.pos += bytes.len() as u64;
        if let Some(check) = &mut r.check {
            check.feed(&bytes, r.pos >= r.end)?;
        }
        return Ok(Some(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::digest::Digest;
    use VerifyReads::{Always, First, Never};

    #[test]
    fn a_reader_steps_from_one_look_at_the_download() {
        use super::Step::{End, Fail, ReadTo, Wait};
        let at = |phase: Phase, written, total, verified| Progress {
            phase,
            written,
            total,
            verified,
            failure: None,
        };
        let streaming = |written, total| at(Phase::Streaming, written, total, false);
        let matched = |written, total| at(Phase::Streaming, written, total, true);
        let failed = Phase::Failed(Arc::from("upstream_error"));
        let unknown = u64::MAX;
        // (progress, pos, end) -> step
        let table = [
            // Nothing written yet, or only up to the reader: wait.
            (streaming(0, Some(10)), 0, 10, Wait),
            (streaming(6, Some(10)), 6, 10, Wait),
            (streaming(6, Some(10)), 2, 10, ReadTo(6)),
            // All written but not yet matched: the last byte waits.
            (streaming(10, Some(10)), 0, 10, ReadTo(9)),
            (streaming(10, Some(10)), 9, 10, Wait),
            // Matched: the rest goes, then the body ends.
            (matched(10, Some(10)), 9, 10, ReadTo(10)),
            (matched(10, Some(10)), 0, 10, ReadTo(10)),
            (matched(10, Some(10)), 10, 10, End),
            (at(Phase::Done, 10, Some(10), true), 0, 10, ReadTo(10)),
            // A range holds back its own last byte, then ends at its end.
            (streaming(10, Some(10)), 0, 4, ReadTo(3)),
            (streaming(10, Some(10)), 3, 4, Wait),
            (matched(10, Some(10)), 3, 4, ReadTo(4)),
            // Unknown length: what is written goes; the end, once matched.
            (streaming(7, None), 0, unknown, ReadTo(7)),
            (streaming(7, None), 7, unknown, Wait),
            (matched(7, None), 7, unknown, End),
            // Failures end the body with an error, unless the bytes had
            // matched (a failed commit: the open file is still right).
            (
                at(failed.clone(), 4, Some(10), false),
                0,
                10,
                Fail("upstream_error".into()),
            ),
            (at(failed, 10, Some(10), true), 5, 10, ReadTo(10)),
            (
                at(Phase::Abandoned, 0, None, false),
                0,
                unknown,
                Fail("abandoned".into()),
            ),
            (at(Phase::Connecting, 0, None, false), 0, unknown, Wait),
        ];
        for (progress, pos, end, want) in table {
            assert_eq!(
                step(&progress, pos, end),
                want,
                "{progress:?} pos={pos} end={end}"
            );
        }
    }

    #[test]
    fn which_reads_are_verified() {
        // (mode, verified this run) -> checked before or as it is served
        let table = [
            (First, false, true),
            (First, true, false),
            (Always, true, true),
            (Always, false, true),
            (Never, false, false),
            (Never, true, false),
        ];
        for (mode, verified, want) in table {
            assert_eq!(
                must_verify(mode, verified),
                want,
                "{mode:?} verified={verified}"
            );
        }
    }

    /// Flips one byte of a file in place, as a disk fault would.
    fn flip(path: &std::path::Path, at: usize) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at] ^= 1;
        std::fs::write(path, bytes).unwrap();
    }

    fn open(cached: &Cached) -> Arc<std::fs::File> {
        Arc::new(std::fs::File::open(&cached.path).unwrap())
    }

    #[tokio::test]
    async fn a_range_check_hashes_the_whole_file_and_drops_a_damaged_entry() {
        let dir = tempfile::tempdir().unwrap();
        // Larger than one read of the check, so that it takes several.
        let blob =
            |seed: u8| -> Vec<u8> { (0..1_500_000u32).map(|i| (i % 251) as u8 ^ seed).collect() };
        let (good, bad, short) = (
            Digest::of(&blob(1)),
            Digest::of(&blob(2)),
            Digest::of(&blob(3)),
        );
        {
            let cache = Cache::open(dir.path(), 16 << 20).unwrap();
            for seed in 1..=3 {
                let bytes = Bytes::from(blob(seed));
                cache
                    .store_bytes(&Digest::of(&bytes), bytes, "")
                    .await
                    .unwrap();
            }
        }
        // Reopened: as after a restart, nothing is verified in this run.
        let cache = Cache::open(dir.path(), 16 << 20).unwrap();
        let good_c = cache.get(&good).unwrap();
        let bad_c = cache.get(&bad).unwrap();
        let short_c = cache.get(&short).unwrap();
        assert!(!good_c.is_verified());
        // Damage far from the ranges a client would ask first.
        flip(&bad_c.path, 1_499_999);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&short_c.path)
            .unwrap();
        f.set_len(1_000_000).unwrap();

        // never: trusted, not hashed.
        assert!(intact_for_range(&cache, &bad_c, &open(&bad_c), Never).await);
        assert!(bad_c.range_check().get().is_none(), "not checked");
        assert!(cache.contains(&bad));

        // first: the intact file is hashed once, then counts as verified.
        assert!(intact_for_range(&cache, &good_c, &open(&good_c), First).await);
        assert!(cache.get(&good).unwrap().is_verified());
        assert!(cache.contains(&good) && good_c.path.exists());
        // always: hashed again, still intact.
        assert!(intact_for_range(&cache, &good_c, &open(&good_c), Always).await);

        // first, two ranges at once: they share one check, both are refused,
        // and the entry is dropped.
        let (file_a, file_b) = (open(&bad_c), open(&bad_c));
        let (a, b) = tokio::join!(
            intact_for_range(&cache, &bad_c, &file_a, First),
            intact_for_range(&cache, &bad_c, &file_b, First),
        );
        assert!(!a && !b, "a damaged file's range is never served");
        assert_eq!(bad_c.range_check().get(), Some(&false));
        assert!(!cache.contains(&bad), "the damaged entry is dropped");
        assert!(!bad_c.path.exists(), "and its file");

        // always: a file cut short is refused and dropped too.
        assert!(!intact_for_range(&cache, &short_c, &open(&short_c), Always).await);
        assert!(!cache.contains(&short));
        assert!(cache.contains(&good), "the intact entry stays");
    }
}

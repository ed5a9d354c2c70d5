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
//! dropped, so the next request fetches the blob again. [`must_verify`]
//! decides when a read is checked (`verify_reads`).

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

/// Whether a read of a cached entry is hashed on its way out: only a read of
/// the whole file can be checked (a range is served as is; the client checks
/// the whole blob), under `always` every time, under `first` until the entry
/// matched once in this run, under `never` not at all.
pub fn must_verify(mode: VerifyReads, verified_this_run: bool, whole_file: bool) -> bool {
    whole_file
        && match mode {
            VerifyReads::Always => true,
            VerifyReads::First => !verified_this_run,
            VerifyReads::Never => false,
        }
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

/// How far the reader may read now, or the failure.
fn readable(r: &mut Reader) -> Result<Option<u64>, BoxError> {
    let Some((fill, rx)) = &mut r.growing else {
        return Ok(Some(r.end));
    };
    let p = rx.borrow_and_update();
    match &p.phase {
        Phase::Done => Ok(Some(r.end.min(p.written))),
        Phase::Failed(reason) => Err(Box::new(FillFailed {
            digest: fill.digest.to_string(),
            reason: reason.to_string(),
        })),
        Phase::Abandoned => Err(Box::new(FillFailed {
            digest: fill.digest.to_string(),
            reason: "abandoned".into(),
        })),
        Phase::Connecting | Phase::Streaming => {
            // Hold back the final byte of a known length, and of the range
            // being read, until the whole download is verified.
            let limit = match p.total {
                Some(total) => p.written.min(total.saturating_sub(1)),
                None => p.written,
            };
            Ok(Some(r.end.saturating_sub(1).min(limit)))
        }
    }
}

async fn next_chunk(r: &mut Reader) -> Result<Option<Bytes>, BoxError> {
    loop {
        if r.pos >= r.end {
            return Ok(None);
        }
        let limit = readable(r)?.unwrap_or(r.pos);
        if r.pos < limit {
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
        // Nothing new to read yet.
        match &mut r.growing {
            Some((fill, rx)) => {
                if rx.borrow().phase == Phase::Done {
                    // Done and everything read (unknown length): finished.
                    return Ok(None);
                }
                if rx.changed().await.is_err() {
                    return Err(Box::new(FillFailed {
                        digest: fill.digest.to_string(),
                        reason: "download ended".into(),
                    }));
                }
            }
            None => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VerifyReads::{Always, First, Never};

    #[test]
    fn which_reads_are_verified() {
        // (mode, verified this run, whole file) -> hashed on the way out
        let table = [
            (First, false, true, true),
            (First, true, true, false),
            (First, false, false, false),
            (Always, true, true, true),
            (Always, false, true, true),
            (Always, false, false, false),
            (Never, false, true, false),
            (Never, true, true, false),
        ];
        for (mode, verified, whole, want) in table {
            assert_eq!(
                must_verify(mode, verified, whole),
                want,
                "{mode:?} verified={verified} whole={whole}"
            );
        }
    }
}

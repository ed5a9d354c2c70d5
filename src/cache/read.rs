//! Streaming content to clients: from a cached file, or from a download that
//! is still growing.
//!
//! Reads are positioned, in pooled chunks ([`super::chunks`]), so any number
//! of readers share one file without sharing an offset. While a
//! download is under way with a known length, its last byte is held back until
//! the digest has matched (and the last byte of a range being read): a client
//! can never complete a response whose bytes turn out wrong. If the download fails, the body ends with an error and
//! hyper aborts the response.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::watch;

use super::chunks;
use super::fill::{Fill, Phase, Progress};
use crate::body::{Body, BoxError};

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
}

/// A body with bytes `start..end` of a complete file.
pub fn complete(file: Arc<std::fs::File>, start: u64, end: u64, lease: Arc<()>) -> Body {
    body(Reader {
        file,
        pos: start,
        end,
        growing: None,
        _lease: Some(lease),
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
                return Err("cached file is shorter than its entry".into());
            }
            r.pos += bytes.len() as u64;
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

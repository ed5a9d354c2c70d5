//! Bodies of known bytes: [`pattern`], a fixed pseudo-random buffer whose
//! length is a prime, so byte `i` of any generated body is
//! `pattern()[i % PATTERN_LEN]`; [`PatternBody`] produces such a body without
//! allocating and [`PatternCheck`] verifies one with `memcmp`, which keeps
//! gigabyte transfers cheap even in a debug build. [`blob_bytes`] gives the
//! registry tests their distinct blobs from the same generator.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::http::{read_chunks, BoxError, ReqBody};

/// Length of [`pattern`]; a prime, so chunk boundaries never line up with it.
pub const PATTERN_LEN: usize = 1_000_003;

/// A fixed pseudo-random buffer ([`blob_bytes`] of seed 0), built once per
/// test process.
pub fn pattern() -> &'static Bytes {
    static P: OnceLock<Bytes> = OnceLock::new();
    P.get_or_init(|| blob_bytes(0, PATTERN_LEN))
}

/// `len` pseudo-random bytes (xorshift64), different for every `seed`.
pub fn blob_bytes(seed: u64, len: usize) -> Bytes {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// A body of `len` bytes of [`pattern`], produced chunk by chunk as the
/// connection asks for it (zero-copy slices of the shared pattern).
pub struct PatternBody {
    offset: u64,
    end: u64,
    chunk: usize,
    exact: bool,
    delay: Option<Duration>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl PatternBody {
    /// A body with a known length (sent with Content-Length).
    pub fn new(len: u64) -> Self {
        PatternBody {
            offset: 0,
            end: len,
            chunk: 64 * 1024,
            exact: true,
            delay: None,
            sleep: None,
        }
    }
    /// Do not announce the length (HTTP/1.1 sends it chunked).
    pub fn without_length(mut self) -> Self {
        self.exact = false;
        self
    }
    /// Send chunks of `size` bytes (default 64 KiB).
    pub fn chunk(mut self, size: usize) -> Self {
        self.chunk = size.max(1);
        self
    }
    /// Wait this long before each chunk.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
    /// As a request body.
    pub fn boxed(self) -> ReqBody {
        BodyExt::boxed(self)
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.offset >= this.end {
            return Poll::Ready(None);
        }
        if let Some(d) = this.delay {
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.sleep = None;
        }
        let start = (this.offset % PATTERN_LEN as u64) as usize;
        let n = (this.chunk as u64)
            .min((PATTERN_LEN - start) as u64)
            .min(this.end - this.offset) as usize;
        this.offset += n as u64;
        Poll::Ready(Some(Ok(Frame::data(pattern().slice(start..start + n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.end - self.offset)
        } else {
            SizeHint::default()
        }
    }
}

/// Verifies that a byte stream is [`pattern`] from offset 0, chunk by chunk.
#[derive(Debug, Default)]
pub struct PatternCheck {
    /// Bytes checked so far.
    pub len: u64,
    /// Offset of the first byte that differed, if any.
    pub first_mismatch: Option<u64>,
}

impl PatternCheck {
    /// Checks the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) {
        let p = pattern();
        while !data.is_empty() {
            let start = (self.len % PATTERN_LEN as u64) as usize;
            let n = data.len().min(PATTERN_LEN - start);
            if self.first_mismatch.is_none() && data[..n] != p[start..start + n] {
                let i = (0..n).find(|&i| data[i] != p[start + i]).unwrap_or(0);
                self.first_mismatch = Some(self.len + i as u64);
            }
            self.len += n as u64;
            data = &data[n..];
        }
    }
    /// Whether every byte so far was the pattern's.
    pub fn ok(&self) -> bool {
        self.first_mismatch.is_none()
    }
}

/// Read a body to its end, checking it against the pattern.
pub async fn check_pattern_body(body: Incoming) -> Result<PatternCheck, String> {
    let mut check = PatternCheck::default();
    let read = read_chunks(body, |d| check.feed(d)).await;
    read.map_err(|e| format!("body error after {} bytes: {e}", check.len))?;
    Ok(check)
}

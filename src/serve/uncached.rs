//! A blob streamed to its client without being cached: when the cache has
//! no room for it (see [`crate::cache::Cache::admit`]), or when it is
//! passed through from upstream (another registry's download of the digest
//! is running, or the leaders keep failing). It is verified all the same: the bytes are hashed as they pass and the last byte (the last
//! frame when no length was announced) is held back until digest and length
//! matched, as fills do, so a wrong blob never arrives complete. Memory is
//! bounded by one frame.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::http::body::{self, Body, BoxError};
use crate::registry::digest::{Digest, DigestHasher};

/// `upstream` (a blob's 200 body) as a body that fails rather than end when
/// the bytes do not hash to `digest` or differ from the announced `total`.
pub fn verified<B>(upstream: B, digest: Digest, total: Option<u64>) -> Body
where
    B: HttpBody<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    body::stream(Verified {
        inner: upstream,
        hasher: Some(DigestHasher::new(digest.algorithm())),
        digest,
        total,
        received: 0,
        held: None,
    })
}

struct Verified<B> {
    inner: B,
    hasher: Option<DigestHasher>,
    digest: Digest,
    total: Option<u64>,
    received: u64,
    /// The last frame seen, released when the next one (or a verified end)
    /// arrives.
    held: Option<Bytes>,
}

impl<B> Verified<B> {
    /// At the end: the held frame if everything matched, else the error.
    fn finish(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        let hasher = self.hasher.take()?;
        let actual = hasher.finish();
        if self.total.is_some_and(|t| t != self.received) || actual != self.digest {
            tracing::warn!(
                digest = %self.digest,
                %actual,
                received = self.received,
                "uncached blob does not match its digest or length; response ended with an error"
            );
            return Some(Err(format!(
                "upstream blob does not match {} ({} bytes hash to {actual})",
                self.digest, self.received
            )
            .into()));
        }
        self.held.take().map(|b| Ok(Frame::data(b)))
    }
}

impl<B> HttpBody for Verified<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.hasher.is_none() {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(mut data) = frame.into_data() else {
                        continue; // trailers: not part of the blob
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if let Some(h) = this.hasher.as_mut() {
                        h.update(&data);
                    }
                    this.received += data.len() as u64;
                    let Some(total) = this.total else {
                        if let Some(prev) = this.held.replace(data) {
                            return Poll::Ready(Some(Ok(Frame::data(prev))));
                        }
                        continue;
                    };
                    if this.received > total {
                        this.hasher = None;
                        return Poll::Ready(Some(Err(format!(
                            "upstream sent more than the announced {total} bytes of {}",
                            this.digest
                        )
                        .into())));
                    }
                    if this.received == total {
                        this.held = Some(data.split_off(data.len() - 1));
                        if data.is_empty() {
                            continue;
                        }
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.hasher = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => return Poll::Ready(this.finish()),
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.total {
            Some(t) => SizeHint::with_exact(t),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn chunks(
        parts: &[&'static [u8]],
    ) -> http_body_util::StreamBody<
        impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Unpin,
    > {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn passes_matching_bytes_and_fails_wrong_ones_before_the_end() {
        let digest = Digest::of(b"hello world");
        let ok = verified(chunks(&[b"hello ", b"world"]), digest.clone(), Some(11));
        assert_eq!(ok.collect().await.unwrap().to_bytes(), "hello world");

        let mut wrong = verified(chunks(&[b"hello ", b"WORLD"]), digest.clone(), Some(11));
        let mut got = Vec::new();
        let failed = loop {
            match wrong.frame().await {
                Some(Ok(f)) => got.extend_from_slice(&f.into_data().unwrap()),
                Some(Err(_)) => break true,
                None => break false,
            }
        };
        assert!(failed, "a wrong blob ends with an error");
        assert_eq!(got, b"hello WORL", "all but the last byte, withheld");
        // Without an announced length, the last frame is withheld.
        let mut unsized_wrong = verified(chunks(&[b"hello ", b"WORLD"]), digest.clone(), None);
        let first = unsized_wrong.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "hello ");
        assert!(unsized_wrong.frame().await.unwrap().is_err());
        let unsized_ok = verified(chunks(&[b"hello ", b"world"]), digest.clone(), None);
        assert_eq!(
            unsized_ok.collect().await.unwrap().to_bytes(),
            "hello world"
        );

        let short = verified(chunks(&[b"hello world"]), digest, Some(12));
        assert!(
            short.collect().await.is_err(),
            "length differs from the announced one"
        );
    }
}

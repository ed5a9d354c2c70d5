//! How an export or import tells whoever runs it how far it got, and what
//! it had to leave out.
//!
//! The store draws nothing itself: it calls a [`Progress`] the caller
//! chooses (the command line's byte bars, or [`NoProgress`]).

use std::io::{self, Read};

/// Receives the progress of a bundle operation: one task at a time (an
/// image being exported, a bundle being read), each counted in bytes.
pub trait Progress: Send + Sync {
    /// A task named `label` begins, of `total` bytes (0 while not known);
    /// a task still open ends.
    fn begin(&self, label: &str, total: u64);
    /// The open task turned out to be `total` bytes.
    fn set_total(&self, total: u64);
    /// `bytes` more of the open task are done.
    fn advance(&self, bytes: u64);
    /// The open task is done.
    fn end(&self);
    /// Something the person running the operation should know (what was
    /// left out, and why), in a sentence without a trailing period.
    fn warn(&self, message: &str);
}

/// A [`Progress`] that shows and says nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _label: &str, _total: u64) {}
    fn set_total(&self, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn end(&self) {}
    fn warn(&self, _message: &str) {}
}

/// A reader that reports every byte read through it as progress.
pub(crate) struct ProgressReader<'a, R> {
    inner: R,
    progress: &'a dyn Progress,
}

impl<'a, R: Read> ProgressReader<'a, R> {
    /// Reads `inner`, advancing `progress` by what is read.
    pub(crate) fn new(inner: R, progress: &'a dyn Progress) -> Self {
        Self { inner, progress }
    }
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Counted(Mutex<u64>);

    impl Progress for Counted {
        fn begin(&self, _label: &str, _total: u64) {}
        fn set_total(&self, _total: u64) {}
        fn advance(&self, bytes: u64) {
            *self.0.lock().unwrap() += bytes;
        }
        fn end(&self) {}
        fn warn(&self, _message: &str) {}
    }

    #[test]
    fn a_progress_reader_counts_what_passes() {
        let counted = Counted::default();
        let mut out = Vec::new();
        ProgressReader::new(&b"hello, world"[..], &counted)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"hello, world");
        assert_eq!(*counted.0.lock().unwrap(), 12);
        let mut out = Vec::new();
        ProgressReader::new(&b"quiet"[..], &NoProgress)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"quiet");
    }
}

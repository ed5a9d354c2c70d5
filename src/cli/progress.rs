//! Byte progress bars on stderr for `regcache export` and `import`, and one
//! spinner per image for `regcache prefetch`.
//!
//! indicatif draws nothing when stderr is not a terminal (or `TERM=dumb`),
//! so logs and tests see only the warnings, one
//! `regcache: warning: <message>` line each.

use std::sync::{Mutex, MutexGuard, PoisonError};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::cache::bundle::Progress;

/// A [`Progress`] drawn as one byte bar per task on stderr, with warnings
/// printed above the bar without tearing it.
#[derive(Debug)]
pub struct ByteBars {
    /// Whether a finished task's bar stays on the screen.
    keep_finished: bool,
    /// The bar of the open task.
    current: Mutex<Option<ProgressBar>>,
}

impl ByteBars {
    /// Bars that stay on the screen when their task is done (one line per
    /// image an export wrote).
    pub fn keeping_finished() -> Self {
        Self::new(true)
    }

    /// Bars that vanish when their task is done (import's reading of the
    /// bundle, followed by its summary).
    pub fn clearing_finished() -> Self {
        Self::new(false)
    }

    fn new(keep_finished: bool) -> Self {
        Self {
            keep_finished,
            current: Mutex::new(None),
        }
    }

    fn current(&self) -> MutexGuard<'_, Option<ProgressBar>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn finish(&self, bar: &ProgressBar) {
        if self.keep_finished {
            bar.finish();
        } else {
            bar.finish_and_clear();
        }
    }
}

impl Progress for ByteBars {
    fn begin(&self, label: &str, total: u64) {
        let old = self.current().replace(byte_bar(total, label.to_string()));
        if let Some(old) = old {
            self.finish(&old);
        }
    }

    fn set_total(&self, total: u64) {
        if let Some(bar) = self.current().as_ref() {
            bar.set_length(total);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = self.current().as_ref() {
            bar.inc(bytes);
        }
    }

    fn end(&self) {
        let bar = self.current().take();
        if let Some(bar) = bar {
            self.finish(&bar);
        }
    }

    fn warn(&self, message: &str) {
        let line = || eprintln!("regcache: warning: {message}");
        match self.current().as_ref() {
            Some(bar) => bar.suspend(line),
            None => line(),
        }
    }
}

/// A byte progress bar on stderr: label, bar, bytes of total, rate, ETA.
fn byte_bar(total: u64, message: String) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(total)
        .with_style(style)
        .with_message(message)
}

/// One spinner line per image on stderr for `regcache prefetch`: its name,
/// the bytes fetched and their rate, then how it ended.
pub struct ImageSpinners {
    bars: MultiProgress,
    style: ProgressStyle,
}

impl Default for ImageSpinners {
    fn default() -> Self {
        let style = ProgressStyle::with_template(
            "{prefix:30!} {bytes:>10} {binary_bytes_per_sec:>12} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
        Self {
            bars: MultiProgress::new(),
            style,
        }
    }
}

impl ImageSpinners {
    /// A new spinner for `image`; `inc` it with bytes, then finish or
    /// abandon it with a message.
    pub fn add(&self, image: &str) -> ProgressBar {
        let bar = self
            .bars
            .add(ProgressBar::new_spinner().with_style(self.style.clone()));
        bar.set_prefix(image.to_string());
        bar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_follow_their_tasks() {
        for bars in [ByteBars::keeping_finished(), ByteBars::clearing_finished()] {
            // Nothing open: nothing to move, and a warning is just printed.
            bars.advance(5);
            bars.set_total(9);
            bars.warn("before any task");
            bars.end();
            bars.begin("first", 0);
            bars.set_total(10);
            bars.advance(4);
            {
                let current = bars.current();
                let bar = current.as_ref().unwrap();
                assert_eq!((bar.position(), bar.length()), (4, Some(10)));
                assert_eq!(bar.message(), "first");
            }
            bars.warn("during a task");
            // A new task ends the open one.
            bars.begin("second", 3);
            assert_eq!(bars.current().as_ref().unwrap().message(), "second");
            bars.end();
            assert!(bars.current().is_none());
        }
    }
}

//! Progress and cancellation as seen from a byte loop running without the GIL.
//!
//! The loop counts bytes in an atomic; the thread that released the GIL polls it and calls
//! back into Python at most once per interval, so a 200 GB transfer makes a few thousand
//! callbacks, not millions. Each poll also checks the cancel flag and pending signals, so
//! Ctrl-C works during a long native call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::error::{CoreError, CoreResult};

pub const DEFAULT_INTERVAL_MS: u64 = 100;

pub struct Progress {
    callback: Option<Py<PyAny>>,
    cancel: Option<Arc<AtomicBool>>,
    total: u64,
    interval: Duration,
    last_poll: Instant,
    last_reported: Option<u64>,
    /// False for passes that run outside Python (Rust tests): never attach.
    attach: bool,
}

impl Progress {
    pub fn new(callback: Option<Py<PyAny>>, cancel: Option<Arc<AtomicBool>>, total: u64) -> Self {
        Progress {
            callback,
            cancel,
            total,
            interval: Duration::from_millis(DEFAULT_INTERVAL_MS),
            last_poll: Instant::now(),
            last_reported: None,
            attach: true,
        }
    }

    #[cfg(test)]
    /// A reporter that never calls Python (for Rust tests and internal passes).
    pub fn silent(total: u64) -> Self {
        Progress { attach: false, ..Progress::new(None, None, total) }
    }

    #[cfg(test)]
    pub fn with_cancel(self, cancel: Arc<AtomicBool>) -> Self {
        Progress { cancel: Some(cancel), ..self }
    }

    pub fn set_total(&mut self, total: u64) {
        self.total = total;
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// Returns the shared cancel flag, if any, so worker threads can poll it directly.
    pub fn cancel_flag(&self) -> Option<Arc<AtomicBool>> {
        self.cancel.clone()
    }

    /// Cheap check made per chunk: errors out when cancelled; every `interval` it also
    /// re-enters Python to deliver progress and pending signals.
    pub fn poll(&mut self, done: u64) -> CoreResult<()> {
        if self.is_cancelled() {
            return Err(CoreError::Cancelled);
        }
        if self.last_poll.elapsed() < self.interval {
            return Ok(());
        }
        self.last_poll = Instant::now();
        self.report(done)
    }

    /// The last call: always delivers (total, total) once.
    pub fn finish(&mut self) -> CoreResult<()> {
        if self.is_cancelled() {
            return Err(CoreError::Cancelled);
        }
        let total = self.total;
        self.report(total)
    }

    fn report(&mut self, done: u64) -> CoreResult<()> {
        let done = done.min(self.total);
        // Monotonic: a value is delivered only if it is larger than the last one.
        let deliver = self.last_reported.is_none_or(|last| done > last);
        let total = self.total;
        let callback = if deliver { self.callback.as_ref() } else { None };
        if !self.attach {
            if deliver {
                self.last_reported = Some(done);
            }
            return Ok(());
        }
        Python::attach(|py| -> PyResult<()> {
            py.check_signals()?;
            if let Some(cb) = callback {
                cb.call1(py, (done, total))?;
            }
            Ok(())
        })?;
        if deliver {
            self.last_reported = Some(done);
        }
        Ok(())
    }
}

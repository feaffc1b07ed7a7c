//! vmstore._native: the byte-moving core of vmstore.
//!
//! Python speaks the storage protocols; this crate does every loop that touches file
//! bytes, with the GIL released: reading chunks (reader), writing them atomically and
//! sparsely (writer), hashing (hash), the overlapped local copy (copy), the one pass over an
//! upload's source (source), the store's bandwidth limit (ratelimit). Errors map onto
//! the classes of `vmstore.errors` in one place (error).

#![deny(unsafe_code)]

mod aligned;
mod buffer;
mod cancel;
mod codec;
mod copy;
mod crc64;
mod error;
mod fsinfo;
mod hash;
mod image;
mod progress;
mod ratelimit;
mod reader;
mod source;
mod writer;
// The only modules allowed `unsafe`: system calls, and memory shared with Python.
/// Contracts of the parsers, for the cargo-fuzz targets in fuzz/ (and `cargo test`).
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod pybuffer;
mod sys;

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::cancel::CancelToken;
use crate::error::IoContext;
use crate::progress::Progress;
use crate::ratelimit::{Pacing, RateLimiter, Side};
use crate::writer::ChunkWriter;

fn progress_for(progress: Option<Py<PyAny>>, cancel: Option<&Bound<'_, CancelToken>>) -> Progress {
    Progress::new(progress, cancel.map(|c| c.get().flag()), 0)
}

/// Outcome of `copy_file`.
#[pyclass(module = "vmstore._native", frozen, get_all)]
pub struct CopyResult {
    sha256: String,
    size: u64,
    bytes_copied: u64,
    resumed_from: u64,
    holes_skipped: u64,
}

#[pymethods]
impl CopyResult {
    fn __repr__(&self) -> String {
        format!(
            "CopyResult(sha256='{}', size={}, bytes_copied={}, resumed_from={}, holes_skipped={})",
            self.sha256, self.size, self.bytes_copied, self.resumed_from, self.holes_skipped
        )
    }
}

#[pyfunction]
#[pyo3(signature = (source_path, writer, *, chunk_size = 32 << 20, resume = false, progress = None, cancel = None, limiter = None, limit_writes = false))]
#[allow(clippy::too_many_arguments)]
fn copy_file(
    py: Python<'_>,
    source_path: PathBuf,
    writer: &Bound<'_, ChunkWriter>,
    chunk_size: usize,
    resume: bool,
    progress: Option<Py<PyAny>>,
    cancel: Option<&Bound<'_, CancelToken>>,
    limiter: Option<&Bound<'_, RateLimiter>>,
    limit_writes: bool,
) -> PyResult<CopyResult> {
    let mut reporter = progress_for(progress, cancel);
    let sink = writer.get().core();
    let side = if limit_writes { Side::Destination } else { Side::Source };
    let pacing = limiter.map(|l| Pacing { bucket: l.get().bucket(), side });
    let stats = py.detach(|| copy::copy_file(&source_path, Some(sink), chunk_size, resume, &mut reporter, pacing))?;
    Ok(CopyResult {
        sha256: stats.sha256,
        size: stats.size,
        bytes_copied: stats.bytes_copied,
        resumed_from: stats.resumed_from,
        holes_skipped: stats.holes_skipped,
    })
}

#[pyfunction]
#[pyo3(signature = (path, *, progress = None, cancel = None))]
fn sha256_file(
    py: Python<'_>,
    path: PathBuf,
    progress: Option<Py<PyAny>>,
    cancel: Option<&Bound<'_, CancelToken>>,
) -> PyResult<String> {
    let mut reporter = progress_for(progress, cancel);
    let stats = py.detach(|| copy::copy_file(&path, None, 8 << 20, false, &mut reporter, None))?;
    Ok(stats.sha256)
}

#[pyfunction]
fn is_network_filesystem(py: Python<'_>, path: PathBuf) -> PyResult<(bool, String)> {
    let result = py.detach(|| fsinfo::filesystem_type(&path).context(|| format!("statfs {}", path.display())));
    Ok(result?)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<CancelToken>()?;
    m.add_class::<hash::PySha256>()?;
    m.add_class::<ChunkWriter>()?;
    m.add_class::<CopyResult>()?;
    m.add_class::<source::UploadSource>()?;
    m.add_class::<source::SourcePart>()?;
    m.add_class::<source::PartBuffer>()?;
    m.add_class::<pybuffer::ChunkBuffers>()?;
    m.add_class::<pybuffer::ChunkBuffer>()?;
    m.add_class::<ratelimit::RateLimiter>()?;
    m.add_function(wrap_pyfunction!(copy_file, m)?)?;
    m.add_function(wrap_pyfunction!(sha256_file, m)?)?;
    m.add_function(wrap_pyfunction!(is_network_filesystem, m)?)?;
    m.add_function(wrap_pyfunction!(error::errno_classes, m)?)?;
    codec::register(m)?;
    m.add_function(wrap_pyfunction!(image::inspect_image_path, m)?)?;
    m.add_function(wrap_pyfunction!(image::inspect_image_bytes, m)?)?;
    m.add("DEFAULT_PROGRESS_INTERVAL_MS", progress::DEFAULT_INTERVAL_MS)?;
    Ok(())
}

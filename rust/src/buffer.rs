//! Borrowing the bytes of a Python bytes-like object for a loop that runs without the GIL.

use pyo3::prelude::*;

use crate::pybuffer;

/// Below this size releasing the GIL costs more than it saves.
const DETACH_THRESHOLD: usize = 64 << 10;

/// Run `f` over the object's bytes (bytes, bytearray, memoryview, any contiguous buffer),
/// with the GIL released for large buffers.
pub fn with_bytes<R: Send>(py: Python<'_>, obj: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R + Send) -> PyResult<R> {
    pybuffer::borrow(py, obj, DETACH_THRESHOLD, f)
}

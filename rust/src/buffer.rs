//! Borrowing the bytes of a Python bytes-like object for a loop that runs without the GIL.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// Below this size releasing the GIL costs more than it saves.
const DETACH_THRESHOLD: usize = 64 << 10;

/// Run `f` over the object's bytes (bytes, bytearray, memoryview, any contiguous buffer),
/// with the GIL released for large buffers.
pub fn with_bytes<R: Send>(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    f: impl FnOnce(&[u8]) -> R + Send,
) -> PyResult<R> {
    if let Ok(bytes) = obj.downcast::<PyBytes>() {
        let slice = bytes.as_bytes();
        return Ok(if slice.len() < DETACH_THRESHOLD { f(slice) } else { py.detach(|| f(slice)) });
    }
    let buffer = PyBuffer::<u8>::get(obj)?;
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err("expected a contiguous bytes-like object"));
    }
    let (address, len) = (buffer.buf_ptr() as usize, buffer.len_bytes());
    let run = move || {
        // SAFETY: `buffer` keeps the exporter's memory alive and its size fixed until it is
        // released below, after `f` returns.
        let slice = unsafe { std::slice::from_raw_parts(address as *const u8, len) };
        f(slice)
    };
    let result = if len < DETACH_THRESHOLD { run() } else { py.detach(run) };
    drop(buffer);
    Ok(result)
}

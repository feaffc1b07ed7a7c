//! The Python buffer protocol: memory shared with Python without a copy. With `sys` (system
//! calls) this is one of the two modules allowed `unsafe`; lib.rs denies it everywhere else.
//!
//! It is a module of its own because its unsafety is of another kind than a system call's:
//! it is about *who keeps memory alive and unchanged while no GIL is held*, which only a
//! Python object's reference or an active buffer export can promise. Three things need it:
//! - `borrow`: reading a caller's bytes-like object with the GIL released;
//! - `SharedBytes`: holding such bytes past the call (the writer's early chunks), by reference;
//! - `PartBuffer`: exporting native memory to Python (`memoryview(part)`), which PyO3 can
//!   only express as an `unsafe fn __getbuffer__`.
//!
//! A copy would make each of them safe code, and cost a full extra pass over every byte
//! moved; these few lines are what the no-copy paths rest on.

#![allow(unsafe_code)]

use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyMemoryView};

use crate::aligned::AlignedBuf;
use crate::source::BufferPool;

/// Run `f` over the bytes of `obj` (a `bytes`, or any C-contiguous buffer), with the GIL
/// released when there are at least `detach_from` of them.
pub fn borrow<R: Send>(
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    detach_from: usize,
    f: impl FnOnce(&[u8]) -> R + Send,
) -> PyResult<R> {
    if let Ok(bytes) = obj.downcast::<PyBytes>() {
        // An immutable bytes: a plain borrow, safe as it is.
        let slice = bytes.as_bytes();
        return Ok(if slice.len() < detach_from { f(slice) } else { py.detach(|| f(slice)) });
    }
    let buffer = PyBuffer::<u8>::get(obj)?;
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err("expected a contiguous bytes-like object"));
    }
    let (address, len) = (buffer.buf_ptr() as usize, buffer.len_bytes());
    let run = move || {
        // SAFETY: `buffer`, an active export, keeps the exporter's memory alive and its size
        // fixed (a bytearray cannot be resized while exported) until it is released below,
        // after `f` returns; address and len are that export's.
        let slice = unsafe { std::slice::from_raw_parts(address as *const u8, len) };
        f(slice)
    };
    let result = if len < detach_from { run() } else { py.detach(run) };
    drop(buffer);
    Ok(result)
}

/// Bytes of a Python object that stay readable, without the GIL, for as long as this lives:
/// an immutable `bytes`, or a memoryview of a buffer its caller gave up (the memoryview's
/// export pins the memory and its size). Cheap to clone: it is shared behind an `Arc`.
#[derive(Clone)]
pub struct SharedBytes(Arc<Pinned>);

struct Pinned {
    /// The `bytes` or memoryview; never handed out mutable.
    object: Py<PyAny>,
    address: usize,
    len: usize,
}

impl SharedBytes {
    pub fn of_bytes(bytes: &Bound<'_, PyBytes>) -> Self {
        let slice = bytes.as_bytes();
        let (address, len) = (slice.as_ptr() as usize, slice.len());
        SharedBytes(Arc::new(Pinned { object: bytes.clone().into_any().unbind(), address, len }))
    }

    /// The bytes of `obj`, a bytes-like object whose owner promises not to change it again
    /// (`owned=True`): held through a memoryview, so it is never resized or freed meanwhile.
    pub fn of_given_up(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(bytes) = obj.downcast::<PyBytes>() {
            return Ok(Self::of_bytes(bytes));
        }
        let view = PyMemoryView::from(obj)?.into_any();
        let buffer = PyBuffer::<u8>::get(&view)?;
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err("expected a contiguous bytes-like object"));
        }
        let (address, len) = (buffer.buf_ptr() as usize, buffer.len_bytes());
        // The memoryview's own export (of `obj`) outlives this second one, released here.
        drop(buffer);
        Ok(SharedBytes(Arc::new(Pinned { object: view.unbind(), address, len })))
    }

    pub fn bytes(&self) -> &[u8] {
        let pinned = &*self.0;
        // SAFETY: address/len were taken from `object`, which this reference keeps alive: a
        // `bytes` is immutable and never resized; a memoryview keeps its export of the given-up
        // buffer, so that memory is neither freed nor resized while `object` lives.
        unsafe { std::slice::from_raw_parts(pinned.address as *const u8, pinned.len) }
    }

    /// The Python object holding exactly these bytes (to pass on without a copy).
    pub fn object(&self) -> &Py<PyAny> {
        &self.0.object
    }
}

/// A part's bytes in native memory, readable from Python through the buffer protocol
/// (``memoryview(buffer)``) without a copy. Immutable once made; its allocation goes back
/// to the pool it came from when Python lets go of it.
#[pyclass(module = "vmstore._native", frozen)]
pub struct PartBuffer {
    data: Option<AlignedBuf>,
    pool: Arc<BufferPool>,
}

impl PartBuffer {
    pub fn new(data: AlignedBuf, pool: Arc<BufferPool>) -> Self {
        PartBuffer { data: Some(data), pool }
    }

    pub fn bytes(&self) -> &[u8] {
        self.data.as_ref().map(AlignedBuf::bytes).unwrap_or(&[])
    }
}

impl Drop for PartBuffer {
    fn drop(&mut self) {
        if let Some(buf) = self.data.take() {
            self.pool.give_back(buf);
        }
    }
}

#[pymethods]
impl PartBuffer {
    fn __len__(&self) -> usize {
        self.bytes().len()
    }

    /// # Safety
    /// Called by CPython with a valid `view`; the exported memory is owned by `slf`, which
    /// the view keeps alive (PyBuffer_FillInfo takes a reference), and is never mutated
    /// (the class is frozen and the buffer read-only).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("PartBuffer is read-only"));
        }
        let bytes = slf.get().bytes();
        let (ptr, len) = (bytes.as_ptr() as *mut std::os::raw::c_void, bytes.len() as ffi::Py_ssize_t);
        // SAFETY: see the method's safety note; readonly = 1.
        let rc = unsafe { ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr, len, 1, flags) };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    /// # Safety
    /// Nothing to release: the view's reference to `self` is dropped by CPython.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __repr__(&self) -> String {
        format!("PartBuffer({} bytes)", self.bytes().len())
    }
}

/// The buffers of one download's ranged reads: each chunk's body is read off the socket
/// straight into one (``readinto``), handed to the writer by reference, and its allocation
/// comes back here when the writer has hashed and dropped it. So a download reuses a few
/// chunk-sized allocations instead of asking malloc for a fresh 16 MiB per chunk, which
/// costs page faults on every chunk and, with glibc's dynamic mmap threshold, leaves freed
/// chunks in its arenas (RSS far above the bytes in flight).
#[pyclass(module = "vmstore._native", frozen)]
pub struct ChunkBuffers {
    pool: Arc<BufferPool>,
}

#[pymethods]
impl ChunkBuffers {
    #[new]
    fn new() -> Self {
        ChunkBuffers { pool: Arc::new(BufferPool::default()) }
    }

    /// A writable buffer of exactly ``n`` bytes, contents unspecified (the read overwrites
    /// them).
    fn take(&self, n: usize) -> ChunkBuffer {
        let mut data = self.pool.take(n);
        let address = data.bytes_mut().as_mut_ptr() as usize;
        ChunkBuffer { data: Some(data), address, len: n, pool: Arc::clone(&self.pool) }
    }
}

/// One chunk's memory, exported writable to Python (``memoryview(buffer)``, ``readinto``).
/// Its filler gives it up once filled (the writer's ``owned=True``); from then on only
/// read, by the writer, through the export it keeps.
#[pyclass(module = "vmstore._native", frozen)]
pub struct ChunkBuffer {
    /// Owns the allocation; never touched again until dropped (the memory is reached only
    /// through `address`, taken from a mutable borrow of it at creation).
    data: Option<AlignedBuf>,
    address: usize,
    len: usize,
    pool: Arc<BufferPool>,
}

impl Drop for ChunkBuffer {
    fn drop(&mut self) {
        if let Some(buf) = self.data.take() {
            self.pool.give_back(buf);
        }
    }
}

#[pymethods]
impl ChunkBuffer {
    fn __len__(&self) -> usize {
        self.len
    }

    /// # Safety
    /// Called by CPython with a valid `view`. The memory (`address`, `len`) belongs to the
    /// allocation `slf` owns and keeps alive for as long as the view (PyBuffer_FillInfo takes
    /// a reference to `slf`); its size never changes. Writes come only from Python through
    /// such views, as with a bytearray: the filler writes before it gives the buffer up,
    /// readers read after.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        let (ptr, len) = (this.address as *mut std::os::raw::c_void, this.len as ffi::Py_ssize_t);
        // SAFETY: see the method's safety note; readonly = 0.
        let rc = unsafe { ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr, len, 0, flags) };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    /// # Safety
    /// Nothing to release: the view's reference to `self` is dropped by CPython.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __repr__(&self) -> String {
        format!("ChunkBuffer({} bytes)", self.len)
    }
}

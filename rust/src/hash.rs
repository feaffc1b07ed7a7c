//! SHA-256: the streaming hasher exposed to Python and the span hashing of a file's extents
//! (holes fed as zeros without a read) that the local copy's resume check uses.
//!
//! sha2 picks the CPU's SHA extensions at run time where present (SHA-NI on x86_64,
//! the ARMv8 crypto extensions on aarch64), so one core hashes at well over 1 GB/s.

use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use pyo3::prelude::*;
use sha2::{Digest, Sha256 as Sha256State};

use crate::buffer::with_bytes;
use crate::error::{CoreResult, IoContext};
use crate::reader::read_full_at;

/// Zeros fed to the hasher for holes, which are never read from disk.
static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];

pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

pub fn hex_digest(state: &Sha256State) -> String {
    to_hex(&state.clone().finalize())
}

pub fn update_zeros(state: &mut Sha256State, mut len: u64) {
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        state.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// Streaming SHA-256 for Python; `update` releases the GIL.
#[pyclass(module = "vmstore._native", name = "Sha256", frozen)]
pub struct PySha256 {
    state: Mutex<(Sha256State, u64)>,
}

#[pymethods]
impl PySha256 {
    #[new]
    fn new() -> Self {
        PySha256 { state: Mutex::new((Sha256State::new(), 0)) }
    }

    fn update(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        with_bytes(py, data, |bytes| {
            let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
            guard.0.update(bytes);
            guard.1 += bytes.len() as u64;
        })
    }

    fn hexdigest(&self) -> String {
        let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        hex_digest(&guard.0)
    }

    #[getter]
    fn bytes_hashed(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

/// Feed bytes [start, end) of `file` (at `path`, named in errors) to `state`: data extents
/// read through `buf`, holes fed as zeros without a read. `tick(n, read)` after every slice
/// (`read`: the slice was read from the file, not a hole); it returns false to stop early (then the result is `Ok(false)`).
pub fn hash_span(
    file: &File,
    path: &Path,
    extents: &[(u64, u64)],
    (start, end): (u64, u64),
    buf: &mut [u8],
    state: &mut Sha256State,
    mut tick: impl FnMut(u64, bool) -> bool,
) -> CoreResult<bool> {
    let mut pos = start;
    // First extent that ends after `start`: extents are sorted and disjoint.
    let first = extents.partition_point(|&(offset, len)| offset + len <= start);
    let data = extents[first..].iter().map(|&(o, l)| (o.max(start), (o + l).min(end)));
    for (offset, stop_at) in data.take_while(|&(o, _)| o < end).chain(std::iter::once((end, end))) {
        if offset > pos {
            update_zeros(state, offset - pos);
            if !tick(offset - pos, false) {
                return Ok(false);
            }
            pos = offset;
        }
        while pos < stop_at {
            let want = ((stop_at - pos) as usize).min(buf.len());
            let got = read_full_at(file, &mut buf[..want], pos).context(|| format!("reading {}", path.display()))?;
            // A file that shrank under us hashes as zeros: the digests then differ from the
            // bytes sent, which the upload's per-part re-check reports as a changed source.
            buf[got..want].fill(0);
            state.update(&buf[..want]);
            pos += want as u64;
            if !tick(want as u64, true) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_of_empty_input() {
        assert_eq!(hex_digest(&Sha256State::new()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn zeros_hash_like_real_zeros() {
        let mut a = Sha256State::new();
        update_zeros(&mut a, 200_000);
        let b = Sha256State::digest(vec![0u8; 200_000]);
        assert_eq!(hex_digest(&a), to_hex(&b));
    }
}

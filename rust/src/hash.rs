//! SHA-256: the streaming hasher exposed to Python, whole-file hashing, and the one-pass
//! whole-file + per-part digests an S3 multipart upload needs.
//!
//! sha2 picks the CPU's SHA extensions at run time where present (SHA-NI on x86_64,
//! the ARMv8 crypto extensions on aarch64), so one core hashes at well over 1 GB/s.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use pyo3::prelude::*;
use sha2::{Digest, Sha256 as Sha256State};

use crate::buffer::with_bytes;
use crate::error::{CoreError, CoreResult, IoContext};
use crate::progress::Progress;
use crate::reader::{read_full_at, SourceFile};

/// Zeros fed to the hasher for holes, which are never read from disk.
static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];

/// Slice size of the whole-file pass: small enough to poll cancel often.
const SLICE: usize = 8 << 20;

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

pub struct PartDigests {
    pub whole: String,
    pub parts: Vec<String>,
}

/// Feed bytes [start, end) of `file` (at `path`, named in errors) to `state`: data extents
/// read through `buf`, holes fed as zeros without a read. `tick(n)` after every slice; it
/// returns false to stop early (then the result is `Ok(false)`).
pub fn hash_span(
    file: &File,
    path: &Path,
    extents: &[(u64, u64)],
    (start, end): (u64, u64),
    buf: &mut [u8],
    state: &mut Sha256State,
    mut tick: impl FnMut(u64) -> bool,
) -> CoreResult<bool> {
    let mut pos = start;
    // First extent that ends after `start`: extents are sorted and disjoint.
    let first = extents.partition_point(|&(offset, len)| offset + len <= start);
    let data = extents[first..].iter().map(|&(o, l)| (o.max(start), (o + l).min(end)));
    for (offset, stop_at) in data.take_while(|&(o, _)| o < end).chain(std::iter::once((end, end))) {
        if offset > pos {
            update_zeros(state, offset - pos);
            if !tick(offset - pos) {
                return Ok(false);
            }
            pos = offset;
        }
        while pos < stop_at {
            let want = ((stop_at - pos) as usize).min(buf.len());
            let got =
                read_full_at(file, &mut buf[..want], pos).context(|| format!("reading {}", path.display()))?;
            // A file that shrank under us hashes as zeros: the digests then differ from the
            // bytes sent, which the upload's per-part re-check reports as a changed source.
            buf[got..want].fill(0);
            state.update(&buf[..want]);
            pos += want as u64;
            if !tick(want as u64) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Whole-file digest on one thread, part digests on `threads` workers.
///
/// Each thread preads through its own `SLICE` buffer rather than mapping the file: a
/// mapping's touched pages count in the process's RSS, which would then grow to the size
/// of the disk image (what a pod's memory limit and its monitoring see), while the buffers
/// keep it at (threads + 1) x 8 MiB. The second reader finds the pages in the page cache.
pub fn hash_parts(
    path: &Path,
    part_size: u64,
    threads: usize,
    progress: &mut Progress,
) -> CoreResult<PartDigests> {
    if part_size == 0 {
        return Err(CoreError::InvalidArgument("part_size must be positive".into()));
    }
    let source = SourceFile::open(path)?;
    let size = source.size;
    if size == 0 {
        let empty = hex_digest(&Sha256State::new());
        progress.finish()?;
        return Ok(PartDigests { whole: empty.clone(), parts: vec![empty] });
    }
    let extents = source.extents()?;
    let n_parts = size.div_ceil(part_size) as usize;
    let parts: Vec<Mutex<Option<String>>> = (0..n_parts).map(|_| Mutex::new(None)).collect();
    let next_part = AtomicUsize::new(0);
    let whole_done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<CoreError>> = Mutex::new(None);
    let cancel = progress.cancel_flag();
    let cancelled = || stop.load(Ordering::Relaxed) || cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
    let fail = |err: CoreError| {
        stop.store(true, Ordering::Relaxed);
        failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(err);
    };

    let whole = std::thread::scope(|scope| -> CoreResult<Option<String>> {
        let whole_handle = scope.spawn(|| {
            let mut state = Sha256State::new();
            let mut buf = vec![0u8; SLICE];
            let tick = |n: u64| {
                whole_done.fetch_add(n, Ordering::Relaxed);
                !cancelled()
            };
            match hash_span(&source.file, &source.path, &extents, (0, size), &mut buf, &mut state, tick) {
                Ok(true) => Some(hex_digest(&state)),
                Ok(false) => None,
                Err(err) => {
                    fail(err);
                    None
                }
            }
        });
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let mut buf = vec![0u8; SLICE];
                loop {
                    let index = next_part.fetch_add(1, Ordering::Relaxed);
                    if index >= n_parts || cancelled() {
                        return;
                    }
                    let start = index as u64 * part_size;
                    let span = (start, (start + part_size).min(size));
                    let mut state = Sha256State::new();
                    match hash_span(&source.file, &source.path, &extents, span, &mut buf, &mut state, |_| !cancelled()) {
                        Ok(true) => {
                            *parts[index].lock().unwrap_or_else(|p| p.into_inner()) = Some(hex_digest(&state));
                        }
                        Ok(false) => return,
                        Err(err) => return fail(err),
                    }
                }
            });
        }
        // This thread reports progress (the whole-file pass) until it finishes.
        while !whole_handle.is_finished() {
            if let Err(err) = progress.poll(whole_done.load(Ordering::Relaxed)) {
                fail(err);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(whole_handle.join().ok().flatten())
    })?;
    // The scope has joined the part workers too: every slot is filled unless one stopped.
    if let Some(err) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(err);
    }
    let whole = whole.ok_or(CoreError::Cancelled)?;
    let parts = parts
        .into_iter()
        .map(|slot| slot.into_inner().unwrap_or_else(|p| p.into_inner()).ok_or(CoreError::Cancelled))
        .collect::<CoreResult<Vec<_>>>()?;
    progress.finish()?;
    Ok(PartDigests { whole, parts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn hex_of_empty_input() {
        assert_eq!(
            hex_digest(&Sha256State::new()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn zeros_hash_like_real_zeros() {
        let mut a = Sha256State::new();
        update_zeros(&mut a, 200_000);
        let b = Sha256State::digest(vec![0u8; 200_000]);
        assert_eq!(hex_digest(&a), to_hex(&b));
    }

    #[test]
    fn parts_and_whole_match_direct_digests() {
        let mut file = tempfile::NamedTempFile::new().expect("temp");
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 % 251) as u8).collect();
        file.write_all(&data).expect("write");
        let digests = hash_parts(file.path(), 300_000, 2, &mut Progress::silent(data.len() as u64))
            .expect("hash");
        assert_eq!(digests.whole, to_hex(&Sha256State::digest(&data)));
        assert_eq!(digests.parts.len(), 4);
        for (i, part) in data.chunks(300_000).enumerate() {
            assert_eq!(digests.parts[i], to_hex(&Sha256State::digest(part)));
        }
    }

    #[test]
    fn holes_hash_as_zeros_across_part_and_slice_boundaries() {
        // 20 MiB file, data at 3 MiB (5 MiB long) and at 17 MiB (1 MiB), holes elsewhere;
        // 7 MiB parts straddle both the extents and the 8 MiB read slices.
        let file = tempfile::NamedTempFile::new().expect("temp");
        let size = 20u64 << 20;
        file.as_file().set_len(size).expect("truncate");
        let mut expected = vec![0u8; size as usize];
        for (offset, len, seed) in [(3u64 << 20, 5usize << 20, 3u32), (17 << 20, 1 << 20, 9)] {
            let bytes: Vec<u8> = (0..len as u32).map(|i| (i.wrapping_mul(seed) % 253) as u8).collect();
            std::os::unix::fs::FileExt::write_all_at(file.as_file(), &bytes, offset).expect("write");
            expected[offset as usize..offset as usize + len].copy_from_slice(&bytes);
        }
        let part = 7u64 << 20;
        let digests = hash_parts(file.path(), part, 2, &mut Progress::silent(size)).expect("hash");
        assert_eq!(digests.whole, to_hex(&Sha256State::digest(&expected)));
        let direct: Vec<String> =
            expected.chunks(part as usize).map(|c| to_hex(&Sha256State::digest(c))).collect();
        assert_eq!(digests.parts, direct);
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = hash_parts(Path::new("/nonexistent/vmstore-x"), 1024, 1, &mut Progress::silent(0));
        assert!(matches!(err, Err(CoreError::Io { .. })));
    }

    #[test]
    fn empty_file_has_one_empty_part() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        let digests = hash_parts(file.path(), 1024, 2, &mut Progress::silent(0)).expect("hash");
        assert_eq!(digests.parts, vec![digests.whole.clone()]);
    }
}

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

use memmap2::Mmap;
use pyo3::prelude::*;
use sha2::{Digest, Sha256 as Sha256State};

use crate::buffer::with_bytes;
use crate::error::{CoreError, CoreResult, IoContext};
use crate::progress::Progress;

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

fn map_file(path: &Path) -> CoreResult<(File, Option<Mmap>, u64)> {
    let file = File::open(path).context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().context(|| format!("reading size of {}", path.display()))?.len();
    if size == 0 {
        return Ok((file, None, 0));
    }
    // SAFETY: the map is read-only; a concurrent writer could change the bytes under us,
    // which only changes the digests (they then disagree with the upload's re-check).
    let map = unsafe { Mmap::map(&file) }.context(|| format!("mapping {}", path.display()))?;
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok((file, Some(map), size))
}

pub struct PartDigests {
    pub whole: String,
    pub parts: Vec<String>,
}

/// Whole-file digest on one thread, part digests on `threads` workers, same mapped pages.
pub fn hash_parts(
    path: &Path,
    part_size: u64,
    threads: usize,
    progress: &mut Progress,
) -> CoreResult<PartDigests> {
    if part_size == 0 {
        return Err(CoreError::InvalidArgument("part_size must be positive".into()));
    }
    let (_file, map, size) = map_file(path)?;
    let Some(map) = map else {
        let empty = hex_digest(&Sha256State::new());
        progress.finish()?;
        return Ok(PartDigests { whole: empty.clone(), parts: vec![empty] });
    };
    let data: &[u8] = &map;
    let n_parts = size.div_ceil(part_size) as usize;
    let parts: Vec<Mutex<Option<String>>> = (0..n_parts).map(|_| Mutex::new(None)).collect();
    let next_part = AtomicUsize::new(0);
    let whole_done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let cancel = progress.cancel_flag();
    let cancelled = || stop.load(Ordering::Relaxed) || cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));

    let whole = std::thread::scope(|scope| -> CoreResult<String> {
        let whole_handle = scope.spawn(|| {
            let mut state = Sha256State::new();
            for slice in data.chunks(SLICE) {
                if cancelled() {
                    return None;
                }
                state.update(slice);
                whole_done.fetch_add(slice.len() as u64, Ordering::Relaxed);
            }
            Some(hex_digest(&state))
        });
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let index = next_part.fetch_add(1, Ordering::Relaxed);
                if index >= n_parts || cancelled() {
                    return;
                }
                let start = index * part_size as usize;
                let end = (start + part_size as usize).min(data.len());
                let digest = to_hex(&Sha256State::digest(&data[start..end]));
                *parts[index].lock().unwrap_or_else(|p| p.into_inner()) = Some(digest);
            });
        }
        // This thread reports progress (the whole-file pass) until the workers finish.
        let outcome = loop {
            if whole_handle.is_finished() {
                break Ok(());
            }
            if let Err(err) = progress.poll(whole_done.load(Ordering::Relaxed)) {
                stop.store(true, Ordering::Relaxed);
                break Err(err);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let whole = whole_handle.join().ok().flatten();
        outcome?;
        whole.ok_or(CoreError::Cancelled)
    })?;

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
    fn empty_file_has_one_empty_part() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        let digests = hash_parts(file.path(), 1024, 2, &mut Progress::silent(0)).expect("hash");
        assert_eq!(digests.parts, vec![digests.whole.clone()]);
    }
}

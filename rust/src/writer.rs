//! ChunkWriter: where a temp file becomes the final file.
//!
//! Chunks are written at their offsets into a temp file beside the destination, so a
//! reader of the final name only ever sees the old object or the complete new one:
//! `commit` = fsync the file, rename it over the final name, fsync the directory (without
//! the last step a crash can forget the rename). All-zero chunks are not written, which
//! keeps a sparse disk image sparse.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::prelude::*;
use sha2::{Digest, Sha256};

use crate::buffer::with_bytes;
use crate::error::{CoreError, CoreResult, IoContext};
use crate::hash::hex_digest;
use crate::reader::read_full_at;

const HASH_BLOCK: usize = 4 << 20;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn is_all_zero(data: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128; align_to only splits the slice.
    let (prefix, words, suffix) = unsafe { data.align_to::<u128>() };
    prefix.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && suffix.iter().all(|&b| b == 0)
}

/// The filesystem's allocation unit on ext4/xfs: the finest hole a skipped block can leave.
const ZERO_BLOCK: u64 = 4096;

/// (start, end) index ranges of `data` (which lands at file offset `offset`) that hold a
/// non-zero byte, in whole `ZERO_BLOCK`s aligned to the file, adjacent blocks merged. For
/// dense data each block's first word is non-zero, so the scan costs next to nothing and
/// yields one run: one pwrite, as before.
fn nonzero_runs(data: &[u8], offset: u64) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut start = 0usize;
    while start < data.len() {
        let to_boundary = (ZERO_BLOCK - (offset + start as u64) % ZERO_BLOCK) as usize;
        let end = (start + to_boundary).min(data.len());
        if !is_all_zero(&data[start..end]) {
            match runs.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => runs.push((start, end)),
            }
        }
        start = end;
    }
    runs
}

/// Open (creating if needed) and exclusively lock the temp file. The inode check guards
/// against a writer that renamed this temp into place between our open and our lock:
/// we would otherwise lock, and then truncate, the committed file.
fn open_locked(temp_path: &Path) -> CoreResult<File> {
    for _ in 0..5 {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(temp_path)
            .context(|| format!("creating {}", temp_path.display()))?;
        // SAFETY: flock on a valid fd.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(CoreError::Locked(temp_path.display().to_string()));
            }
            return Err(CoreError::io(format!("locking {}", temp_path.display()), err));
        }
        let ours = file.metadata().context(|| format!("inspecting {}", temp_path.display()))?;
        match std::fs::metadata(temp_path) {
            Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => return Ok(file),
            _ => continue, // renamed away under us: open the new name again
        }
    }
    Err(CoreError::Locked(temp_path.display().to_string()))
}

/// Hashes the file in order from the contiguous prefix that writers have completed.
struct OrderedHasher {
    shared: Arc<HashShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct HashShared {
    state: Mutex<HashState>,
    changed: Condvar,
}

#[derive(Default)]
struct HashState {
    /// Completed ranges not yet contiguous with the frontier: start -> end.
    pending: BTreeMap<u64, u64>,
    /// End of the contiguous completed prefix.
    ready: u64,
    /// Bytes hashed so far (a prefix of `ready`).
    frontier: u64,
    /// Digest of [0, frontier) as of the last batch.
    digest: Option<String>,
    stop: bool,
    error: Option<String>,
}

impl OrderedHasher {
    fn start(file: Arc<File>, path: PathBuf) -> Self {
        // The digest of the empty prefix, so a zero-length object needs no write at all.
        let state = HashState { digest: Some(hex_digest(&Sha256::new())), ..HashState::default() };
        let shared = Arc::new(HashShared { state: Mutex::new(state), changed: Condvar::new() });
        let worker = Arc::clone(&shared);
        let thread = std::thread::spawn(move || worker.run(&file, &path));
        OrderedHasher { shared, thread: Mutex::new(Some(thread)) }
    }

    fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut state = lock(&self.shared.state);
        let end = offset + len;
        let entry = state.pending.entry(offset).or_insert(end);
        *entry = (*entry).max(end);
        // Absorb every pending range that now touches the contiguous prefix.
        loop {
            let ready = state.ready;
            let Some((&start, &stop)) = state.pending.iter().next() else { break };
            if start > ready {
                break;
            }
            state.pending.remove(&start);
            state.ready = ready.max(stop);
        }
        self.shared.changed.notify_all();
    }

    fn digest_at(&self, size: u64) -> CoreResult<String> {
        let mut state = lock(&self.shared.state);
        loop {
            if let Some(err) = &state.error {
                return Err(CoreError::InvalidArgument(format!("hashing failed: {err}")));
            }
            if state.frontier == size {
                if let Some(digest) = &state.digest {
                    return Ok(digest.clone());
                }
            }
            if state.frontier > size || (state.stop && state.frontier < size) {
                return Err(CoreError::InvalidArgument(format!(
                    "cannot hash [0, {size}): {} bytes are hashed and {} contiguous bytes written",
                    state.frontier, state.ready
                )));
            }
            if state.ready < size && state.pending.is_empty() && state.frontier == state.ready {
                return Err(CoreError::InvalidArgument(format!(
                    "cannot hash [0, {size}): only [0, {}) has been written",
                    state.ready
                )));
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, Duration::from_millis(200))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn stop(&self) {
        lock(&self.shared.state).stop = true;
        self.shared.changed.notify_all();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

impl HashShared {
    fn run(&self, file: &File, path: &Path) {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; HASH_BLOCK];
        loop {
            let (from, to) = {
                let mut state = lock(&self.state);
                loop {
                    if state.ready > state.frontier {
                        break (state.frontier, state.ready);
                    }
                    if state.stop {
                        return;
                    }
                    state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
            };
            let mut pos = from;
            while pos < to {
                let want = ((to - pos) as usize).min(HASH_BLOCK);
                match read_full_at(file, &mut buf[..want], pos) {
                    Ok(n) => {
                        // Past end of file means a skipped zero chunk not yet covered by
                        // set_len: those bytes are zeros.
                        buf[n..want].fill(0);
                        hasher.update(&buf[..want]);
                        pos += want as u64;
                    }
                    Err(err) => {
                        let mut state = lock(&self.state);
                        state.error = Some(format!("reading back {}: {err}", path.display()));
                        state.stop = true;
                        self.changed.notify_all();
                        return;
                    }
                }
            }
            let digest = hex_digest(&hasher);
            let mut state = lock(&self.state);
            state.frontier = to;
            state.digest = Some(digest);
            self.changed.notify_all();
        }
    }
}

pub struct WriterCore {
    final_path: PathBuf,
    temp_path: PathBuf,
    file: Mutex<Option<Arc<File>>>,
    existing_length: u64,
    /// Zero chunks at or past this offset may be skipped: the file holds only zeros there.
    zero_skip_from: AtomicU64,
    bytes_written: AtomicU64,
    hasher: Option<OrderedHasher>,
    committed: Mutex<bool>,
}

impl WriterCore {
    pub fn open(final_path: &Path, temp_path: &Path, resume: bool, hash: bool) -> CoreResult<Self> {
        if temp_path == final_path {
            return Err(CoreError::InvalidArgument("temp_path must differ from final_path".into()));
        }
        let file = open_locked(temp_path)?;
        if !resume {
            file.set_len(0).context(|| format!("truncating {}", temp_path.display()))?;
        }
        let existing_length = file.metadata().context(|| format!("inspecting {}", temp_path.display()))?.len();
        let file = Arc::new(file);
        let hasher = hash.then(|| OrderedHasher::start(Arc::clone(&file), temp_path.to_path_buf()));
        Ok(WriterCore {
            final_path: final_path.to_path_buf(),
            temp_path: temp_path.to_path_buf(),
            file: Mutex::new(Some(file)),
            existing_length,
            zero_skip_from: AtomicU64::new(existing_length),
            bytes_written: AtomicU64::new(0),
            hasher,
            committed: Mutex::new(false),
        })
    }

    pub fn temp_path(&self) -> &Path {
        &self.temp_path
    }

    pub fn existing_length(&self) -> u64 {
        self.existing_length
    }

    fn file(&self) -> CoreResult<Arc<File>> {
        lock(&self.file)
            .clone()
            .ok_or_else(|| CoreError::InvalidArgument(format!("writer for {} is closed", self.final_path.display())))
    }

    /// Write `data` at `offset`; returns how many of its bytes were stored. Where the file
    /// is known to hold zeros (past `zero_skip_from`), all-zero blocks are left as holes,
    /// so a sparse image stays sparse even when its data does not start on a chunk
    /// boundary: only the non-zero runs are written.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> CoreResult<u64> {
        let file = self.file()?;
        let write = |start: usize, end: usize| {
            let at = offset + start as u64;
            file.write_all_at(&data[start..end], at)
                .context(|| format!("writing {} at offset {at}", self.temp_path.display()))
        };
        let zeros_from = self.zero_skip_from.load(Ordering::Acquire);
        // Below zeros_from the file may hold stale bytes: everything there is written.
        let dense = (zeros_from.saturating_sub(offset) as usize).min(data.len());
        let mut stored = dense as u64;
        if dense > 0 {
            write(0, dense)?;
        }
        for (start, end) in nonzero_runs(&data[dense..], offset + dense as u64) {
            write(dense + start, dense + end)?;
            stored += (end - start) as u64;
        }
        self.bytes_written.fetch_add(data.len() as u64, Ordering::Relaxed);
        if let Some(hasher) = &self.hasher {
            hasher.mark(offset, data.len() as u64);
        }
        Ok(stored)
    }

    pub fn mark_done(&self, offset: u64, len: u64) {
        if let Some(hasher) = &self.hasher {
            hasher.mark(offset, len);
        }
    }

    pub fn set_len(&self, size: u64) -> CoreResult<()> {
        let file = self.file()?;
        file.set_len(size).context(|| format!("resizing {}", self.temp_path.display()))?;
        self.zero_skip_from.fetch_min(size, Ordering::AcqRel);
        Ok(())
    }

    pub fn len(&self) -> CoreResult<u64> {
        let file = self.file()?;
        Ok(file.metadata().context(|| format!("inspecting {}", self.temp_path.display()))?.len())
    }

    /// Start writeback of a range now (so the final fsync has little left to do).
    pub fn start_writeback(&self, offset: u64, len: u64) {
        self.sync_range(offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }

    /// Wait until a range is on disk; bounds the dirty pages a long copy accumulates.
    pub fn wait_writeback(&self, offset: u64, len: u64) {
        self.sync_range(
            offset,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        );
    }

    fn sync_range(&self, offset: u64, len: u64, flags: libc::c_uint) {
        if let Ok(file) = self.file() {
            // SAFETY: advisory syscall on a valid fd; errors (e.g. on NFS) are harmless
            // because commit() fsyncs the whole file anyway.
            unsafe {
                libc::sync_file_range(file.as_raw_fd(), offset as libc::off64_t, len as libc::off64_t, flags);
            }
        }
    }

    pub fn hexdigest(&self, size: u64) -> CoreResult<String> {
        match &self.hasher {
            Some(hasher) => hasher.digest_at(size),
            None => Err(CoreError::InvalidArgument("ChunkWriter was opened without hash=True".into())),
        }
    }

    pub fn commit(&self) -> CoreResult<()> {
        let file = lock(&self.file)
            .take()
            .ok_or_else(|| CoreError::InvalidArgument(format!("writer for {} is closed", self.final_path.display())))?;
        if let Some(hasher) = &self.hasher {
            hasher.stop();
        }
        let result = (|| {
            file.sync_all().context(|| format!("flushing {} to disk", self.temp_path.display()))?;
            std::fs::rename(&self.temp_path, &self.final_path).context(|| {
                format!("renaming {} to {}", self.temp_path.display(), self.final_path.display())
            })?;
            sync_parent_dir(&self.final_path)
        })();
        drop(file);
        match result {
            Ok(()) => {
                *lock(&self.committed) = true;
                Ok(())
            }
            Err(err) => {
                let _ = std::fs::remove_file(&self.temp_path);
                Err(err)
            }
        }
    }

    pub fn abort(&self, keep: bool) -> CoreResult<()> {
        let file = lock(&self.file).take();
        if let Some(hasher) = &self.hasher {
            hasher.stop();
        }
        if file.is_none() {
            return Ok(()); // already committed or aborted
        }
        if let (true, Some(file)) = (keep, &file) {
            // A kept partial is only useful if its bytes survive a crash.
            let _ = file.sync_data();
        }
        drop(file);
        if !keep {
            match std::fs::remove_file(&self.temp_path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(CoreError::io(format!("removing {}", self.temp_path.display()), err)),
            }
        }
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.file).is_none()
    }
}

impl Drop for WriterCore {
    fn drop(&mut self) {
        // Never leave an unfinished temp behind by accident; keeping it is an explicit choice.
        let _ = self.abort(false);
    }
}

pub fn sync_parent_dir(path: &Path) -> CoreResult<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = File::open(parent).context(|| format!("opening directory {}", parent.display()))?;
    match dir.sync_all() {
        Ok(()) => Ok(()),
        // Some filesystems cannot fsync a directory; the rename is then as durable as it gets.
        Err(err) if matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::EBADF)) => Ok(()),
        Err(err) => Err(CoreError::io(format!("syncing directory {}", parent.display()), err)),
    }
}

#[pyclass(module = "vmstore._native", frozen)]
pub struct ChunkWriter {
    core: WriterCore,
    final_path: String,
    temp_path: String,
}

impl ChunkWriter {
    pub fn core(&self) -> &WriterCore {
        &self.core
    }
}

#[pymethods]
impl ChunkWriter {
    #[new]
    #[pyo3(signature = (final_path, temp_path, *, resume = false, hash = false))]
    fn new(py: Python<'_>, final_path: PathBuf, temp_path: PathBuf, resume: bool, hash: bool) -> PyResult<Self> {
        let core = py.detach(|| WriterCore::open(&final_path, &temp_path, resume, hash))?;
        Ok(ChunkWriter {
            core,
            final_path: final_path.to_string_lossy().into_owned(),
            temp_path: temp_path.to_string_lossy().into_owned(),
        })
    }

    #[getter]
    fn final_path(&self) -> &str {
        &self.final_path
    }

    #[getter]
    fn temp_path(&self) -> &str {
        &self.temp_path
    }

    #[getter]
    fn existing_length(&self) -> u64 {
        self.core.existing_length()
    }

    #[getter]
    fn bytes_written(&self) -> u64 {
        self.core.bytes_written.load(Ordering::Relaxed)
    }

    #[getter]
    fn closed(&self) -> bool {
        self.core.is_closed()
    }

    fn write_at(&self, py: Python<'_>, offset: u64, data: &Bound<'_, PyAny>) -> PyResult<()> {
        with_bytes(py, data, |bytes| {
            let stored = self.core.write_at(offset, bytes)?;
            if stored > 0 {
                // Start writeback now, so the disk works while the network does and the
                // fsync in commit() has little left to flush.
                self.core.start_writeback(offset, bytes.len() as u64);
            }
            Ok::<(), CoreError>(())
        })??;
        Ok(())
    }

    fn mark_done(&self, offset: u64, length: u64) {
        self.core.mark_done(offset, length);
    }

    fn set_len(&self, py: Python<'_>, size: u64) -> PyResult<()> {
        Ok(py.detach(|| self.core.set_len(size))?)
    }

    fn hexdigest(&self, py: Python<'_>, size: u64) -> PyResult<String> {
        Ok(py.detach(|| self.core.hexdigest(size))?)
    }

    fn commit(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.core.commit())?)
    }

    #[pyo3(signature = (keep = false))]
    fn abort(&self, py: Python<'_>, keep: bool) -> PyResult<()> {
        Ok(py.detach(|| self.core.abort(keep))?)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(&self, py: Python<'_>, _t: Py<PyAny>, _v: Py<PyAny>, _tb: Py<PyAny>) -> PyResult<()> {
        if self.core.is_closed() {
            return Ok(());
        }
        self.abort(py, false)
    }

    fn __repr__(&self) -> String {
        format!("ChunkWriter(final_path={:?}, temp_path={:?})", self.final_path, self.temp_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn paths(dir: &Path) -> (PathBuf, PathBuf) {
        (dir.join("disk.img"), dir.join("disk.img.vmstore-partial"))
    }

    #[test]
    fn commit_renames_into_place_and_keeps_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let writer = WriterCore::open(&final_path, &temp_path, false, true).expect("open");
        let zeros = vec![0u8; 1 << 20];
        let data = vec![0xabu8; 1 << 20];
        assert_eq!(writer.write_at(1 << 20, &zeros).expect("write zeros"), 0);
        assert!(writer.write_at(2 << 20, &data).expect("write data") > 0);
        assert!(writer.write_at(0, &data).expect("write data") > 0);
        writer.set_len(4 << 20).expect("len");
        assert!(writer.write_at(3 << 20, &zeros).is_ok());
        let mut expected = Sha256::new();
        expected.update(&data);
        expected.update(&zeros);
        expected.update(&data);
        expected.update(&zeros);
        assert_eq!(writer.hexdigest(4 << 20).expect("digest"), hex_digest(&expected));
        assert!(!final_path.exists());
        writer.commit().expect("commit");
        assert!(!temp_path.exists());
        let meta = std::fs::metadata(&final_path).expect("final");
        assert_eq!(meta.len(), 4 << 20);
        assert!(meta.blocks() * 512 <= (2 << 20) + 65536, "blocks {}", meta.blocks());
    }

    #[test]
    fn nonzero_runs_follow_file_blocks_and_merge() {
        let mut data = vec![0u8; 5 * 4096];
        data[10] = 1; // block 0
        data[4096 + 5] = 1; // block 1, merged with block 0
        data[4 * 4096 + 1] = 1; // block 4
        assert_eq!(nonzero_runs(&data, 0), vec![(0, 2 * 4096), (4 * 4096, 5 * 4096)]);
        // The first 4096 bytes landing at file offset 100: blocks are [0, 3996) and
        // [3996, 4096); only the first holds a non-zero byte.
        assert_eq!(nonzero_runs(&data[..4096], 100), vec![(0, 3996)]);
        assert!(nonzero_runs(&[0u8; 10_000], 7).is_empty());
        let dense = vec![7u8; 1 << 20];
        assert_eq!(nonzero_runs(&dense, 123), vec![(0, 1 << 20)]);
    }

    #[test]
    fn a_chunk_that_is_partly_hole_stores_only_its_data() {
        // 8 MiB chunk: 1 MiB of data at 3 MiB, zeros around it (an extent that does not
        // start on a chunk boundary, as in a real image).
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let writer = WriterCore::open(&final_path, &temp_path, false, true).expect("open");
        let mut chunk = vec![0u8; 8 << 20];
        chunk[3 << 20..4 << 20].fill(0x5a);
        writer.set_len(8 << 20).expect("len");
        assert_eq!(writer.write_at(0, &chunk).expect("write"), 1 << 20);
        assert_eq!(writer.hexdigest(8 << 20).expect("digest"), crate::hash::to_hex(&Sha256::digest(&chunk)));
        writer.commit().expect("commit");
        assert_eq!(std::fs::read(&final_path).expect("read"), chunk);
        let blocks = std::fs::metadata(&final_path).expect("final").blocks() * 512;
        assert!(blocks <= (1 << 20) + 65536, "allocated {blocks} bytes for 1 MiB of data");
    }

    #[test]
    fn abort_removes_temp_and_leaves_destination() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        std::fs::write(&final_path, b"old").expect("old");
        let writer = WriterCore::open(&final_path, &temp_path, false, false).expect("open");
        writer.write_at(0, b"new content").expect("write");
        writer.abort(false).expect("abort");
        assert!(!temp_path.exists());
        assert_eq!(std::fs::read(&final_path).expect("read"), b"old");
    }

    #[test]
    fn second_writer_on_same_temp_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let _first = WriterCore::open(&final_path, &temp_path, false, false).expect("open");
        match WriterCore::open(&final_path, &temp_path, false, false) {
            Err(CoreError::Locked(_)) => {}
            other => panic!("expected Locked, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn resume_keeps_prefix_and_rewrites_zero_chunks_inside_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        std::fs::write(&temp_path, vec![9u8; 1000]).expect("partial");
        let writer = WriterCore::open(&final_path, &temp_path, true, false).expect("open");
        assert_eq!(writer.existing_length(), 1000);
        // Zeros inside the old content must be written, or stale bytes would survive.
        assert_eq!(writer.write_at(0, &[0u8; 100]).expect("write"), 100);
        writer.commit().expect("commit");
        let bytes = std::fs::read(&final_path).expect("read");
        assert!(bytes[..100].iter().all(|&b| b == 0));
        assert!(bytes[100..].iter().all(|&b| b == 9));
    }

    #[test]
    fn out_of_order_chunks_hash_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let writer = WriterCore::open(&final_path, &temp_path, false, true).expect("open");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        for chunk in [2usize, 0, 1] {
            let range = chunk * 100_000..(chunk + 1) * 100_000;
            writer.write_at(range.start as u64, &data[range]).expect("write");
        }
        let expected = crate::hash::to_hex(&Sha256::digest(&data));
        assert_eq!(writer.hexdigest(300_000).expect("digest"), expected);
    }

    #[test]
    fn digest_of_unwritten_range_fails_instead_of_hanging() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let writer = WriterCore::open(&final_path, &temp_path, false, true).expect("open");
        writer.write_at(0, &[1u8; 10]).expect("write");
        assert!(writer.hexdigest(20).is_err());
    }

    #[test]
    fn empty_object_digest_needs_no_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let writer = WriterCore::open(&final_path, &temp_path, false, true).expect("open");
        assert_eq!(
            writer.hexdigest(0).expect("digest"),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[0u8; 1000]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_all_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_all_zero(&v));
        assert!(is_all_zero(&[]));
    }
}

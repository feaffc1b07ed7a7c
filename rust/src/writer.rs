//! ChunkWriter: where a temp file becomes the final file, and where chunks are hashed in order.
//!
//! Chunks are written at their offsets into a temp file beside the destination, so a
//! reader of the final name only ever sees the old object or the complete new one:
//! `commit` = fsync the file, rename it over the final name, fsync the directory (without
//! the last step a crash can forget the rename). All-zero chunks are not written, which
//! keeps a sparse disk image sparse.
//!
//! With hashing on, the whole-object SHA-256 (and, when asked, the CRCs S3 uses as
//! full-object checksums) is computed in one in-order pass over the bytes *as they are
//! written*, from memory: the writer whose chunk is next at the hash frontier hashes it
//! right away and then keeps going through whatever chunks were held for it; a chunk that
//! arrives early is held (a reference to the immutable Python `bytes`, or a copy of any
//! other buffer) until the frontier reaches it. Nothing just written is read back. Only a
//! range marked done (a resumed prefix already on disk) is hashed by reading the file.
//! A writer without a file (`for_stream`) hands each piece, in order, to a sink instead.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crc_fast::{CrcAlgorithm, Digest as CrcDigest};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use sha2::{Digest, Sha256};

use crate::aligned::{AlignedBuf, ALIGN};
use crate::error::{CoreError, CoreResult, IoContext};
use crate::hash::to_hex;
use crate::pybuffer::{self, SharedBytes};
use crate::reader::read_full_at;
use crate::sys::{self, Writeback};

/// Read size of the read-back of a resumed prefix.
const HASH_BLOCK: usize = 4 << 20;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn is_all_zero(data: &[u8]) -> bool {
    // 16 bytes at a time: the compiler makes each a single vector compare.
    let (words, tail) = data.as_chunks::<16>();
    words.iter().all(|w| u128::from_ne_bytes(*w) == 0) && tail.iter().all(|&b| b == 0)
}

/// The filesystem's allocation unit on ext4/xfs: the finest hole a skipped block can leave.
pub(crate) const ZERO_BLOCK: u64 = 4096;

/// (start, end) index ranges of `data` (which lands at file offset `offset`) that hold a
/// non-zero byte, in whole `ZERO_BLOCK`s aligned to the file, adjacent blocks merged. For
/// dense data each block's first word is non-zero, so the scan costs next to nothing and
/// yields one run: one pwrite, as before.
pub(crate) fn nonzero_runs(data: &[u8], offset: u64) -> Vec<(usize, usize)> {
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
        // flock(LOCK_EX | LOCK_NB) on Linux, like the Python side's locks.
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(CoreError::Locked(temp_path.display().to_string())),
            Err(TryLockError::Error(err)) => {
                return Err(CoreError::io(format!("locking {}", temp_path.display()), err))
            }
        }
        let ours = file.metadata().context(|| format!("inspecting {}", temp_path.display()))?;
        match std::fs::metadata(temp_path) {
            Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => return Ok(file),
            _ => continue, // renamed away under us: open the new name again
        }
    }
    Err(CoreError::Locked(temp_path.display().to_string()))
}

/// The CRCs S3 accepts as full-object checksums, computed in the in-order pass on request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrcKind {
    Crc64Nvme,
    Crc32c,
    Crc32,
}

impl CrcKind {
    pub const ALL: [CrcKind; 3] = [CrcKind::Crc64Nvme, CrcKind::Crc32c, CrcKind::Crc32];

    /// The algorithm as S3 names it (`x-amz-checksum-crc64nvme`, `ChecksumAlgorithm=CRC64NVME`).
    pub fn s3_name(self) -> &'static str {
        match self {
            CrcKind::Crc64Nvme => "CRC64NVME",
            CrcKind::Crc32c => "CRC32C",
            CrcKind::Crc32 => "CRC32",
        }
    }

    pub fn from_s3_name(name: &str) -> Option<CrcKind> {
        CrcKind::ALL.into_iter().find(|kind| kind.s3_name().eq_ignore_ascii_case(name))
    }

    fn algorithm(self) -> CrcAlgorithm {
        match self {
            CrcKind::Crc64Nvme => CrcAlgorithm::Crc64Nvme,
            CrcKind::Crc32c => CrcAlgorithm::Crc32Iscsi,
            CrcKind::Crc32 => CrcAlgorithm::Crc32IsoHdlc,
        }
    }
}

/// What the in-order pass computes; owned by whichever thread is the hasher at the moment.
struct Digests {
    sha256: Option<Sha256>,
    crcs: Vec<(CrcKind, CrcDigest)>,
    /// Read buffer for ranges hashed from disk, allocated on first use.
    buf: Vec<u8>,
}

impl Digests {
    fn new(sha256: bool, crcs: &[CrcKind]) -> Self {
        Digests {
            sha256: sha256.then(Sha256::new),
            crcs: crcs.iter().map(|&kind| (kind, CrcDigest::new(kind.algorithm()))).collect(),
            buf: Vec::new(),
        }
    }

    fn update(&mut self, data: &[u8]) {
        if let Some(sha) = &mut self.sha256 {
            sha.update(data);
        }
        for (_, crc) in &mut self.crcs {
            crc.update(data);
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            sha256: self.sha256.as_ref().map(|sha| to_hex(&sha.clone().finalize())),
            crcs: self.crcs.iter().map(|(kind, crc)| (*kind, crc.finalize())).collect(),
        }
    }
}

/// The digests of [0, size) once the frontier is there.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub sha256: Option<String>,
    pub crcs: Vec<(CrcKind, u64)>,
}

/// Bytes of a chunk that arrived before the frontier, kept until it gets there.
pub enum Held {
    Copied(Vec<u8>),
    /// An immutable Python `bytes`, or a memoryview of a buffer its caller gave up: the
    /// reference keeps the memory alive, so it can be read later without the GIL or a copy.
    Shared(SharedBytes),
}

impl Held {
    fn bytes(&self) -> &[u8] {
        match self {
            Held::Copied(data) => data,
            Held::Shared(shared) => shared.bytes(),
        }
    }

    fn object(&self) -> Option<&Py<PyAny>> {
        match self {
            Held::Copied(_) => None,
            Held::Shared(shared) => Some(shared.object()),
        }
    }
}

/// The bytes of one `write`, and what the hasher may keep of them if they arrive early.
pub enum Chunk<'a> {
    /// Borrowed for the call only (copied if they must be held); `object`, when given, is a
    /// Python object holding exactly these bytes, passed on uncopied to a stream sink.
    Borrowed { data: &'a [u8], object: Option<&'a Py<PyAny>> },
    /// Bytes that may be held by reference instead of a copy.
    Shared(&'a SharedBytes),
}

impl Chunk<'_> {
    fn data(&self) -> &[u8] {
        match self {
            Chunk::Borrowed { data, .. } => data,
            Chunk::Shared(shared) => shared.bytes(),
        }
    }

    fn object(&self) -> Option<&Py<PyAny>> {
        match self {
            Chunk::Borrowed { object, .. } => *object,
            Chunk::Shared(shared) => Some(shared.object()),
        }
    }
}

enum Segment {
    Memory(Held),
    /// Already on disk (a resumed prefix): hashed by reading the file.
    Disk,
}

impl Segment {
    fn memory_len(&self) -> u64 {
        match self {
            Segment::Memory(held) => held.bytes().len() as u64,
            Segment::Disk => 0,
        }
    }
}

/// Where a stream writer's bytes go, in order.
pub trait Sink: Send + Sync {
    /// `object`, when given, is a Python object holding exactly `data` (passed on uncopied).
    fn deliver(&self, data: &[u8], object: Option<&Py<PyAny>>) -> CoreResult<()>;
}

/// A Python callable as the sink: `sink(data)`, called with the GIL taken for the call only.
struct PySink(Py<PyAny>);

impl Sink for PySink {
    fn deliver(&self, data: &[u8], object: Option<&Py<PyAny>>) -> CoreResult<()> {
        Python::attach(|py| {
            let argument = match object {
                Some(object) => object.clone_ref(py),
                None => PyBytes::new(py, data).into_any().unbind(),
            };
            self.0.call1(py, (argument,))?;
            Ok(())
        })
    }
}

/// A failure of the in-order pass, kept so that every later call can report it again
/// with the same class (an `io::Error` is not `Clone`).
struct Failure {
    context: String,
    os_error: Option<i32>,
    kind: io::ErrorKind,
    detail: String,
    /// An exception raised by Python code (a stream sink): every caller re-raises that same
    /// exception, cause included, whichever thread happened to meet it first.
    python: Option<Arc<PyErr>>,
}

impl Failure {
    fn of(err: &CoreError) -> Failure {
        match err {
            CoreError::Io { context, source } => Failure {
                context: context.clone(),
                os_error: source.raw_os_error(),
                kind: source.kind(),
                detail: source.to_string(),
                python: None,
            },
            other => Failure {
                context: "the in-order pass over the written bytes stopped".into(),
                os_error: None,
                kind: io::ErrorKind::Other,
                detail: other.to_string(),
                python: match other {
                    CoreError::Python(exc) => Some(Arc::clone(exc)),
                    _ => None,
                },
            },
        }
    }

    fn to_error(&self) -> CoreError {
        if let Some(exc) = &self.python {
            return CoreError::Python(Arc::clone(exc));
        }
        let source = match self.os_error {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.kind, self.detail.clone()),
        };
        CoreError::io(self.context.clone(), source)
    }
}

/// Who drives the pass: a writer (the failure is its own result) or a background thread
/// started for a resumed prefix (nobody waits for its result but `digest_at`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Driver {
    Writer,
    Background,
}

#[derive(Default)]
struct OrderState {
    /// Ranges not yet taken by a hasher: start -> (end, bytes).
    pending: BTreeMap<u64, (u64, Segment)>,
    /// End of what the hasher has taken (== `hashed` while nobody is hashing).
    claimed: u64,
    /// Bytes hashed (and, for a stream, delivered): [0, hashed).
    hashed: u64,
    /// A thread is hashing; `digests` is then out with it.
    active: bool,
    digests: Option<Digests>,
    held_bytes: u64,
    held_peak: u64,
    /// The original error, for the first caller that reports it.
    error: Option<CoreError>,
    failure: Option<Failure>,
    closed: bool,
}

impl OrderState {
    fn check(&mut self) -> CoreResult<()> {
        if let Some(err) = self.error.take() {
            return Err(err);
        }
        if let Some(failure) = &self.failure {
            return Err(failure.to_error());
        }
        if self.closed {
            return Err(CoreError::InvalidArgument("the writer is closed".into()));
        }
        Ok(())
    }

    /// Queue a range for the hasher. Where two ranges start at one offset the longer wins;
    /// overlaps are trimmed when hashed (the first bytes hashed for an offset count).
    fn insert(&mut self, start: u64, end: u64, segment: Segment) -> Option<Segment> {
        let added = segment.memory_len();
        match self.pending.get(&start) {
            Some((old_end, _)) if *old_end >= end => return Some(segment),
            _ => {}
        }
        self.held_bytes += added;
        self.held_peak = self.held_peak.max(self.held_bytes);
        let replaced = self.pending.insert(start, (end, segment)).map(|(_, old)| old);
        if let Some(old) = &replaced {
            self.held_bytes -= old.memory_len();
        }
        replaced
    }

    /// The next range that touches the frontier, with ranges wholly behind it dropped.
    fn next_contiguous(&mut self, dropped: &mut Vec<Segment>) -> Option<(u64, u64, Segment)> {
        loop {
            let entry = self.pending.first_entry()?;
            if *entry.key() > self.claimed {
                return None;
            }
            let start = *entry.key();
            let (end, segment) = entry.remove();
            self.held_bytes -= segment.memory_len();
            if end <= self.claimed {
                dropped.push(segment);
                continue;
            }
            return Some((start, end, segment));
        }
    }

    fn has_contiguous(&self) -> bool {
        self.pending.first_key_value().is_some_and(|(&start, _)| start <= self.claimed)
    }
}

/// The in-order pass: SHA-256 / CRCs of [0, hashed), and the delivery to a stream sink.
struct Ordered {
    state: Mutex<OrderState>,
    changed: Condvar,
    /// The temp file, for reading a resumed prefix back. Taken on close: the writer's own
    /// handle is dropped on abort, and this one must not keep the file (and its lock) open
    /// until the garbage collector finds the writer.
    file: Mutex<Option<Arc<File>>>,
    path: PathBuf,
    sink: Option<Box<dyn Sink>>,
    /// Set when the writer closes: a read-back in progress stops at its next block.
    stop: AtomicBool,
    background: Mutex<Vec<JoinHandle<()>>>,
}

impl Ordered {
    fn new(file: Option<Arc<File>>, path: PathBuf, sink: Option<Box<dyn Sink>>, digests: Digests) -> Arc<Self> {
        let state = OrderState { digests: Some(digests), ..OrderState::default() };
        Arc::new(Ordered {
            state: Mutex::new(state),
            changed: Condvar::new(),
            file: Mutex::new(file),
            path,
            sink,
            stop: AtomicBool::new(false),
            background: Mutex::new(Vec::new()),
        })
    }

    /// A writer's bytes for [offset, offset + data.len()) are stored: hash them now if they
    /// are next (and then whatever was held for after them), else hold them: by reference
    /// when they are `Chunk::Shared`, else as a copy.
    fn accept(&self, offset: u64, chunk: &Chunk<'_>) -> CoreResult<()> {
        let data = chunk.data();
        let end = offset + data.len() as u64;
        let mut held: Option<Held> = None;
        loop {
            let mut state = lock(&self.state);
            state.check()?;
            if data.is_empty() || end <= state.claimed {
                return Ok(()); // nothing new for the hash (a rewrite of hashed bytes)
            }
            if !state.active && offset <= state.claimed {
                // This writer becomes the hasher, starting with its own bytes (no hold).
                let skip = (state.claimed - offset) as usize;
                state.active = true;
                state.claimed = end;
                let mut digests = state.digests.take().expect("an idle pass keeps its digests");
                drop(state);
                drop(held); // a copy made while the frontier moved up to us
                let whole = if skip == 0 { chunk.object() } else { None };
                let result = self.consume(&mut digests, &data[skip..], whole);
                return self.drive(digests, result, Driver::Writer);
            }
            match (held.take(), chunk) {
                (Some(ready), _) => {
                    let unused = state.insert(offset, end, Segment::Memory(ready));
                    drop(state);
                    drop(unused);
                    return Ok(());
                }
                // Another reference to the same memory: no copy, no GIL needed.
                (None, Chunk::Shared(shared)) => held = Some(Held::Shared((*shared).clone())),
                (None, Chunk::Borrowed { .. }) => {
                    // Copy outside the lock: other writers only need it for a moment.
                    drop(state);
                    held = Some(Held::Copied(data.to_vec()));
                }
            }
        }
    }

    /// Record [offset, offset + len) as on disk already (hashed by reading the file), and
    /// start a thread to hash it if it is next: the caller goes on fetching meanwhile.
    fn mark_on_disk(self: &Arc<Self>, offset: u64, len: u64) -> CoreResult<()> {
        if self.sink.is_some() {
            return Err(CoreError::InvalidArgument("a stream writer has no file to read a done range from".into()));
        }
        let mut state = lock(&self.state);
        state.check()?;
        if len == 0 || offset + len <= state.claimed {
            return Ok(());
        }
        state.insert(offset, offset + len, Segment::Disk);
        if state.active || !state.has_contiguous() {
            return Ok(());
        }
        state.active = true;
        let digests = state.digests.take().expect("an idle pass keeps its digests");
        drop(state);
        let me = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("vmstore-rehash".into())
            .spawn(move || {
                let _ = me.drive(digests, Ok(()), Driver::Background);
            })
            .context(|| "starting the hashing thread".to_string())?;
        let mut threads = lock(&self.background);
        threads.retain(|t| !t.is_finished());
        threads.push(thread);
        Ok(())
    }

    fn consume(&self, digests: &mut Digests, data: &[u8], object: Option<&Py<PyAny>>) -> CoreResult<()> {
        digests.update(data);
        if let Some(sink) = &self.sink {
            sink.deliver(data, object)?;
        }
        Ok(())
    }

    fn consume_disk(&self, digests: &mut Digests, from: u64, to: u64) -> CoreResult<()> {
        let file = lock(&self.file).clone().ok_or_else(|| CoreError::InvalidArgument("the writer is closed".into()))?;
        if digests.buf.is_empty() {
            digests.buf = vec![0u8; HASH_BLOCK];
        }
        let mut buf = std::mem::take(&mut digests.buf);
        let mut pos = from;
        let result = (|| {
            while pos < to {
                if self.stop.load(Ordering::Relaxed) {
                    return Err(CoreError::Cancelled);
                }
                let want = ((to - pos) as usize).min(HASH_BLOCK);
                let n = read_full_at(&file, &mut buf[..want], pos)
                    .context(|| format!("reading back {} at offset {pos}", self.path.display()))?;
                // Past the end of the file means a skipped zero chunk not yet covered by
                // set_len: those bytes are zeros.
                buf[n..want].fill(0);
                digests.update(&buf[..want]);
                pos += want as u64;
            }
            Ok(())
        })();
        digests.buf = buf;
        result
    }

    /// Hash contiguous ranges until none is left; `result` is that of the range just done.
    fn drive(&self, mut digests: Digests, mut result: CoreResult<()>, driver: Driver) -> CoreResult<()> {
        let mut dropped = Vec::new();
        loop {
            let mut state = lock(&self.state);
            if let Err(err) = result {
                state.active = false;
                state.digests = Some(digests);
                let pending = std::mem::take(&mut state.pending);
                state.held_bytes = 0;
                let report = if state.failure.is_some() {
                    err // an earlier failure is the one on record
                } else {
                    state.failure = Some(Failure::of(&err));
                    match driver {
                        Driver::Writer => err,
                        Driver::Background => {
                            state.error = Some(err);
                            CoreError::InvalidArgument("reported by digest_at".into())
                        }
                    }
                };
                self.changed.notify_all();
                drop(state);
                drop(pending);
                return Err(report);
            }
            state.hashed = state.claimed;
            let next = if state.closed { None } else { state.next_contiguous(&mut dropped) };
            let Some((start, end, segment)) = next else {
                state.active = false;
                state.digests = Some(digests);
                if state.closed {
                    dropped.extend(std::mem::take(&mut state.pending).into_values().map(|(_, s)| s));
                    state.held_bytes = 0;
                }
                self.changed.notify_all();
                drop(state);
                drop(dropped);
                return Ok(());
            };
            let from = state.claimed;
            state.claimed = end;
            drop(state);
            dropped.clear();
            let skip = (from - start) as usize;
            result = match &segment {
                Segment::Memory(held) => {
                    let whole = if skip == 0 { held.object() } else { None };
                    self.consume(&mut digests, &held.bytes()[skip..], whole)
                }
                Segment::Disk => self.consume_disk(&mut digests, from, end),
            };
            drop(segment);
        }
    }

    /// Wait until [0, size) is hashed and return its digests.
    fn digest_at(&self, size: u64) -> CoreResult<Snapshot> {
        let mut state = lock(&self.state);
        loop {
            state.check()?;
            if !state.active {
                if state.hashed == size {
                    return Ok(state.digests.as_ref().expect("an idle pass keeps its digests").snapshot());
                }
                if state.hashed > size {
                    return Err(CoreError::InvalidArgument(format!(
                        "cannot hash [0, {size}): {} bytes are hashed already",
                        state.hashed
                    )));
                }
                // Idle below `size` with nothing contiguous queued: the gap was never written.
                if !state.has_contiguous() {
                    return Err(CoreError::InvalidArgument(format!(
                        "cannot hash [0, {size}): only [0, {}) has been written",
                        state.hashed
                    )));
                }
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(200))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn close(&self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(lock(&self.file).take());
        let pending = {
            let mut state = lock(&self.state);
            state.closed = true;
            state.held_bytes = 0;
            self.changed.notify_all();
            std::mem::take(&mut state.pending)
        };
        drop(pending);
        let threads = std::mem::take(&mut *lock(&self.background));
        for thread in threads {
            let _ = thread.join();
        }
    }

    fn hashed(&self) -> u64 {
        lock(&self.state).hashed
    }

    fn held(&self) -> (u64, u64) {
        let state = lock(&self.state);
        (state.held_bytes, state.held_peak)
    }
}

fn parse_crcs(names: &[String]) -> CoreResult<Vec<CrcKind>> {
    let mut kinds = Vec::new();
    for name in names {
        let kind = CrcKind::from_s3_name(name).ok_or_else(|| {
            CoreError::InvalidArgument(format!("unknown CRC {name:?}: expected CRC64NVME, CRC32C or CRC32"))
        })?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(kinds)
}

pub struct WriterCore {
    final_path: PathBuf,
    temp_path: PathBuf,
    /// None for a stream writer, and once committed or aborted.
    file: Mutex<Option<Arc<File>>>,
    /// The temp file opened again with O_DIRECT, when asked for and the filesystem allows;
    /// closed with `file` (an aborted temp's blocks are freed only when its last fd closes).
    direct: Mutex<Option<Arc<File>>>,
    /// Whether `direct` was opened (it stays true once the writer is closed).
    writes_direct: bool,
    stream: bool,
    closed: AtomicBool,
    existing_length: u64,
    /// Zero chunks at or past this offset may be skipped: the file holds only zeros there.
    zero_skip_from: AtomicU64,
    bytes_written: AtomicU64,
    order: Option<Arc<Ordered>>,
}

impl WriterCore {
    pub fn open(final_path: &Path, temp_path: &Path, resume: bool, hash: bool) -> CoreResult<Self> {
        Self::open_with(final_path, temp_path, resume, hash, &[])
    }

    /// A file writer; with `hash` the SHA-256 and with `crcs` those CRCs of the object are
    /// computed in order as chunks are written.
    pub fn open_with(
        final_path: &Path,
        temp_path: &Path,
        resume: bool,
        hash: bool,
        crcs: &[CrcKind],
    ) -> CoreResult<Self> {
        Self::open_direct(final_path, temp_path, resume, hash, crcs, false)
    }

    /// `open_with`, and with `direct` the data is written with O_DIRECT where the filesystem
    /// takes it: straight from memory to the device, no page-cache copy (after
    /// drop_caches, first-touching fresh page-cache pages is most of a download's kernel
    /// CPU), and the host's cache is left to the VMs. Unaligned heads and tails go through
    /// the page cache as before.
    pub fn open_direct(
        final_path: &Path,
        temp_path: &Path,
        resume: bool,
        hash: bool,
        crcs: &[CrcKind],
        direct: bool,
    ) -> CoreResult<Self> {
        if temp_path == final_path {
            return Err(CoreError::InvalidArgument("temp_path must differ from final_path".into()));
        }
        let file = open_locked(temp_path)?;
        if !resume {
            file.set_len(0).context(|| format!("truncating {}", temp_path.display()))?;
        }
        let existing_length = file.metadata().context(|| format!("inspecting {}", temp_path.display()))?.len();
        // tmpfs and some network filesystems refuse O_DIRECT (EINVAL): those write cached.
        let direct = if direct {
            OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(temp_path).ok()
        } else {
            None
        };
        let writes_direct = direct.is_some();
        let direct = Mutex::new(direct.map(Arc::new));
        let file = Arc::new(file);
        let order = (hash || !crcs.is_empty())
            .then(|| Ordered::new(Some(Arc::clone(&file)), temp_path.to_path_buf(), None, Digests::new(hash, crcs)));
        Ok(WriterCore {
            final_path: final_path.to_path_buf(),
            temp_path: temp_path.to_path_buf(),
            file: Mutex::new(Some(file)),
            direct,
            writes_direct,
            stream: false,
            closed: AtomicBool::new(false),
            existing_length,
            zero_skip_from: AtomicU64::new(existing_length),
            bytes_written: AtomicU64::new(0),
            order,
        })
    }

    /// A writer without a file: the bytes go to `sink` in order, hashed on the way.
    pub fn for_stream(sink: Box<dyn Sink>, crcs: &[CrcKind]) -> Self {
        WriterCore {
            final_path: PathBuf::new(),
            temp_path: PathBuf::new(),
            file: Mutex::new(None),
            direct: Mutex::new(None),
            writes_direct: false,
            stream: true,
            closed: AtomicBool::new(false),
            existing_length: 0,
            zero_skip_from: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            order: Some(Ordered::new(None, PathBuf::from("<stream>"), Some(sink), Digests::new(true, crcs))),
        }
    }

    pub fn temp_path(&self) -> &Path {
        &self.temp_path
    }

    pub fn existing_length(&self) -> u64 {
        self.existing_length
    }

    fn closed_error(&self) -> CoreError {
        let what =
            if self.stream { "stream writer".to_string() } else { format!("writer for {}", self.final_path.display()) };
        CoreError::InvalidArgument(format!("{what} is closed"))
    }

    fn file(&self) -> CoreResult<Arc<File>> {
        if self.stream {
            return Err(CoreError::InvalidArgument("a stream writer has no file".into()));
        }
        lock(&self.file).clone().ok_or_else(|| self.closed_error())
    }

    /// Write `data` at `offset`; returns how many of its bytes were stored. Where the file
    /// is known to hold zeros (past `zero_skip_from`), all-zero blocks are left as holes,
    /// so a sparse image stays sparse even when its data does not start on a chunk
    /// boundary: only the non-zero runs are written. A chunk ahead of the hash frontier is
    /// copied to be hashed later (see `write_from` for the uncopied way).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> CoreResult<u64> {
        self.write_from(offset, &Chunk::Borrowed { data, object: None })
    }

    /// `write_at` for bytes that came from a Python object (passed on to a stream sink as it
    /// is); `Chunk::Shared` bytes are held by reference, not copied, if they arrive early.
    pub fn write_from(&self, offset: u64, chunk: &Chunk<'_>) -> CoreResult<u64> {
        let data = chunk.data();
        let stored = if self.stream {
            if self.closed.load(Ordering::Acquire) {
                return Err(self.closed_error());
            }
            data.len() as u64
        } else {
            self.store(offset, data)?
        };
        self.bytes_written.fetch_add(data.len() as u64, Ordering::Relaxed);
        if let Some(order) = &self.order {
            order.accept(offset, chunk)?;
        }
        Ok(stored)
    }

    fn store(&self, offset: u64, data: &[u8]) -> CoreResult<u64> {
        let file = self.file()?;
        let direct = lock(&self.direct).clone();
        let write = |start: usize, end: usize| {
            let at = offset + start as u64;
            let cached = match &direct {
                Some(direct) => write_direct(direct, &data[start..end], at)
                    .context(|| format!("writing {} at offset {at}", self.temp_path.display()))?,
                None => 0,
            };
            let at = at + cached as u64;
            file.write_all_at(&data[start + cached..end], at)
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
        Ok(stored)
    }

    /// [offset, offset + len) is on disk already (a resumed prefix): the hasher reads it
    /// from the file, on a thread of its own when it is next, so fetching goes on meanwhile.
    pub fn mark_done(&self, offset: u64, len: u64) -> CoreResult<()> {
        match &self.order {
            Some(order) => order.mark_on_disk(offset, len),
            None => Ok(()),
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
        self.sync_range(offset, len, Writeback::Start);
    }

    /// Wait until a range is on disk; bounds the dirty pages a long copy accumulates.
    pub fn wait_writeback(&self, offset: u64, len: u64) {
        self.sync_range(offset, len, Writeback::Wait);
    }

    fn sync_range(&self, offset: u64, len: u64, how: Writeback) {
        if let Ok(file) = self.file() {
            // Advisory: a failure (e.g. on NFS) is harmless, commit() fsyncs the whole file.
            let _ = sys::sync_file_range(&file, offset, len, how);
        }
    }

    fn snapshot(&self, size: u64) -> CoreResult<Snapshot> {
        match &self.order {
            Some(order) => order.digest_at(size),
            None => Err(CoreError::InvalidArgument("ChunkWriter was opened without hash=True or crc".into())),
        }
    }

    pub fn hexdigest(&self, size: u64) -> CoreResult<String> {
        self.snapshot(size)?
            .sha256
            .ok_or_else(|| CoreError::InvalidArgument("ChunkWriter was opened without hash=True".into()))
    }

    /// The CRCs asked for at open, of [0, size), once the frontier is there.
    pub fn crc_values(&self, size: u64) -> CoreResult<Vec<(CrcKind, u64)>> {
        Ok(self.snapshot(size)?.crcs)
    }

    /// Bytes hashed in order so far (for a stream: delivered to the sink).
    pub fn hashed_length(&self) -> u64 {
        self.order.as_ref().map_or(0, |order| order.hashed())
    }

    /// (bytes held now for the frontier, most ever held at once).
    pub fn held_bytes(&self) -> (u64, u64) {
        self.order.as_ref().map_or((0, 0), |order| order.held())
    }

    fn close_order(&self) {
        if let Some(order) = &self.order {
            order.close();
        }
    }

    pub fn commit(&self) -> CoreResult<()> {
        if self.stream {
            if self.closed.swap(true, Ordering::AcqRel) {
                return Err(self.closed_error());
            }
            self.close_order();
            return Ok(());
        }
        let file = lock(&self.file).take().ok_or_else(|| self.closed_error())?;
        drop(lock(&self.direct).take());
        self.closed.store(true, Ordering::Release);
        self.close_order();
        let result = (|| {
            file.sync_all().context(|| format!("flushing {} to disk", self.temp_path.display()))?;
            std::fs::rename(&self.temp_path, &self.final_path)
                .context(|| format!("renaming {} to {}", self.temp_path.display(), self.final_path.display()))?;
            sync_parent_dir(&self.final_path)
        })();
        drop(file);
        if result.is_err() {
            let _ = std::fs::remove_file(&self.temp_path);
        }
        result
    }

    pub fn abort(&self, keep: bool) -> CoreResult<()> {
        self.closed.store(true, Ordering::Release);
        self.close_order();
        if self.stream {
            return Ok(());
        }
        let file = lock(&self.file).take();
        drop(lock(&self.direct).take());
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
        self.closed.load(Ordering::Acquire)
    }
}

impl Drop for WriterCore {
    fn drop(&mut self) {
        // Never leave an unfinished temp behind by accident; keeping it is an explicit choice.
        let _ = self.abort(false);
    }
}

/// Bytes an O_DIRECT write takes at a time, through a per-thread aligned bounce buffer, when
/// the caller's bytes are not block-aligned (a Python `bytes`): a MiB keeps the copy in cache
/// and the extra memory small. Aligned bytes (a pooled `ChunkBuffer`) are written as they are.
const DIRECT_BOUNCE: usize = 1 << 20;

thread_local! {
    static BOUNCE: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

/// Write the block-aligned body of `data` (at `at`) with O_DIRECT; returns how many leading
/// bytes were written (0 when `at` is unaligned or the filesystem refused): the caller
/// writes the rest through the page cache.
fn write_direct(direct: &File, data: &[u8], at: u64) -> io::Result<usize> {
    if !at.is_multiple_of(ALIGN as u64) {
        return Ok(0);
    }
    let body = data.len() / ALIGN * ALIGN;
    if (data.as_ptr() as usize).is_multiple_of(ALIGN) {
        return write_direct_from(direct, &data[..body], at);
    }
    BOUNCE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let mut bounce = match slot.take() {
            Some(buf) => AlignedBuf::new(buf.vec, DIRECT_BOUNCE),
            None => AlignedBuf::new(Vec::new(), DIRECT_BOUNCE),
        };
        let mut done = 0;
        let result = (|| {
            if !bounce.aligned() {
                return Ok(());
            }
            while done < body {
                let n = (body - done).min(DIRECT_BOUNCE);
                let window = &mut bounce.bytes_mut()[..n];
                window.copy_from_slice(&data[done..done + n]);
                let wrote = write_direct_from(direct, window, at + done as u64)?;
                done += wrote;
                if wrote < n {
                    return Ok(()); // refused or cut short: the caller writes the rest cached
                }
            }
            Ok(())
        })();
        *slot = Some(bounce);
        result.map(|()| done)
    })
}

/// The O_DIRECT write of block-aligned memory, for `write_direct`: a pooled buffer as it is
/// (no bounce copy; measured: the copy was 8 % of a cold 1 GiB HTTP download's samples), or
/// a filled bounce window. Returns how many leading bytes were written; a
/// refusal (EINVAL) or a short write that leaves the rest unaligned stops there, and the
/// caller writes the rest through the page cache.
fn write_direct_from(direct: &File, body: &[u8], at: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < body.len() {
        match direct.write_at(&body[done..], at + done as u64) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the device took no bytes")),
            Ok(n) => {
                done += n;
                if !done.is_multiple_of(ALIGN) {
                    return Ok(done);
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => return Ok(done),
            Err(err) => return Err(err),
        }
    }
    Ok(done)
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

    fn write_and_start_writeback(&self, offset: u64, chunk: &Chunk<'_>) -> CoreResult<()> {
        let stored = self.core.write_from(offset, chunk)?;
        if stored > 0 && !self.core.stream {
            // Start writeback now, so the disk works while the network does and the
            // fsync in commit() has little left to flush.
            self.core.start_writeback(offset, chunk.data().len() as u64);
        }
        Ok(())
    }
}

#[pymethods]
impl ChunkWriter {
    #[new]
    #[pyo3(signature = (final_path, temp_path, *, resume = false, hash = false, crc = Vec::new(), direct = false))]
    fn new(
        py: Python<'_>,
        final_path: PathBuf,
        temp_path: PathBuf,
        resume: bool,
        hash: bool,
        crc: Vec<String>,
        direct: bool,
    ) -> PyResult<Self> {
        let crcs = parse_crcs(&crc)?;
        let core = py.detach(|| WriterCore::open_direct(&final_path, &temp_path, resume, hash, &crcs, direct))?;
        Ok(ChunkWriter {
            core,
            final_path: final_path.to_string_lossy().into_owned(),
            temp_path: temp_path.to_string_lossy().into_owned(),
        })
    }

    /// A writer that hands the bytes, in order, to `sink(data)` instead of a file.
    #[staticmethod]
    #[pyo3(signature = (sink, *, crc = Vec::new()))]
    fn for_stream(sink: &Bound<'_, PyAny>, crc: Vec<String>) -> PyResult<Self> {
        if !sink.is_callable() {
            return Err(PyValueError::new_err("sink must be callable (e.g. a stream's write method)"));
        }
        let crcs = parse_crcs(&crc)?;
        let core = WriterCore::for_stream(Box::new(PySink(sink.clone().unbind())), &crcs);
        Ok(ChunkWriter { core, final_path: String::new(), temp_path: String::new() })
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
    fn is_stream(&self) -> bool {
        self.core.stream
    }

    /// Whether the data is written with O_DIRECT.
    #[getter]
    fn direct(&self) -> bool {
        self.core.writes_direct
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
    fn hashed_length(&self) -> u64 {
        self.core.hashed_length()
    }

    #[getter]
    fn held_bytes(&self) -> u64 {
        self.core.held_bytes().0
    }

    #[getter]
    fn held_bytes_peak(&self) -> u64 {
        self.core.held_bytes().1
    }

    #[getter]
    fn closed(&self) -> bool {
        self.core.is_closed()
    }

    /// `owned=True`: the caller gives `data` up (it never changes it afterwards), so an early
    /// chunk of any buffer type is held by reference; otherwise only a `bytes` is.
    #[pyo3(signature = (offset, data, *, owned = false))]
    fn write_at(&self, py: Python<'_>, offset: u64, data: &Bound<'_, PyAny>, owned: bool) -> PyResult<()> {
        if owned || data.downcast::<PyBytes>().is_ok() {
            // A bytes, or a given-up buffer pinned by a memoryview (dropped without the GIL
            // if the hold outlives this call).
            let shared = SharedBytes::of_given_up(data)?;
            return Ok(py.detach(|| self.write_and_start_writeback(offset, &Chunk::Shared(&shared)))?);
        }
        // Any other buffer stays exported (alive, not resizable) for the call, and is copied
        // if it has to be held.
        let object = data.clone().unbind();
        let result = pybuffer::borrow(py, data, 0, |slice| {
            self.write_and_start_writeback(offset, &Chunk::Borrowed { data: slice, object: Some(&object) })
        })?;
        Ok(result?)
    }

    fn mark_done(&self, offset: u64, length: u64) -> PyResult<()> {
        Ok(self.core.mark_done(offset, length)?)
    }

    fn set_len(&self, py: Python<'_>, size: u64) -> PyResult<()> {
        Ok(py.detach(|| self.core.set_len(size))?)
    }

    fn hexdigest(&self, py: Python<'_>, size: u64) -> PyResult<String> {
        Ok(py.detach(|| self.core.hexdigest(size))?)
    }

    fn crc_values<'py>(&self, py: Python<'py>, size: u64) -> PyResult<Bound<'py, PyDict>> {
        let values = py.detach(|| self.core.crc_values(size))?;
        let dict = PyDict::new(py);
        for (kind, value) in values {
            dict.set_item(kind.s3_name(), value)?;
        }
        Ok(dict)
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
        if self.core.stream {
            return "ChunkWriter(<stream>)".to_string();
        }
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
        assert_eq!(writer.hexdigest(4 << 20).expect("digest"), to_hex(&expected.finalize()));
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
    fn abort_closes_every_fd_of_the_temp_so_its_blocks_are_freed() {
        // In the crate's directory: O_DIRECT needs a filesystem that takes it.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let writer = WriterCore::open_direct(&final_path, &temp_path, false, true, &[], true).expect("open");
        writer.write_at(0, &vec![7u8; 1 << 16]).expect("write");
        writer.abort(false).expect("abort");
        let open_on_temp = std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with(&*temp_path.to_string_lossy()))
            .count();
        assert_eq!(open_on_temp, 0, "the aborted temp is still open (direct: {})", writer.writes_direct);
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

    fn sha_hex(data: &[u8]) -> String {
        to_hex(&Sha256::digest(data))
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8).collect()
    }

    #[test]
    fn early_chunks_are_hashed_from_memory_not_read_back() {
        // Chunk 1 lands before chunk 0; its bytes on disk are then garbled behind the
        // writer's back. Hashing from memory still gives the digest of what was written:
        // proof that nothing is read back.
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let writer = WriterCore::open(&final_path, &temp_path, false, true).expect("open");
        let data = pattern(3 << 16, 1);
        let chunk = 1 << 16;
        writer.write_at(chunk as u64, &data[chunk..2 * chunk]).expect("write 1");
        writer.write_at(2 * chunk as u64, &data[2 * chunk..]).expect("write 2");
        assert_eq!(writer.held_bytes(), (2 * chunk as u64, 2 * chunk as u64));
        assert_eq!(writer.hashed_length(), 0);
        let other = OpenOptions::new().write(true).open(&temp_path).expect("open again");
        other.write_all_at(&vec![0xee; chunk], chunk as u64).expect("garble");
        writer.write_at(0, &data[..chunk]).expect("write 0");
        assert_eq!(writer.hashed_length(), data.len() as u64);
        assert_eq!(writer.held_bytes(), (0, 2 * chunk as u64));
        assert_eq!(writer.hexdigest(data.len() as u64).expect("digest"), sha_hex(&data));
    }

    #[test]
    fn many_threads_writing_shuffled_chunks_hash_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let writer = WriterCore::open_with(&final_path, &temp_path, false, true, &CrcKind::ALL).expect("open");
        let chunk = 10_000usize;
        let data = pattern(64 * chunk + 123, 2);
        let count = data.len().div_ceil(chunk);
        // A fixed shuffle: every thread takes every 4th chunk, walking backwards.
        std::thread::scope(|scope| {
            for t in 0..4 {
                let (writer, data) = (&writer, &data);
                scope.spawn(move || {
                    for i in (0..count).rev().filter(|i| i % 4 == t) {
                        let end = ((i + 1) * chunk).min(data.len());
                        writer.write_at((i * chunk) as u64, &data[i * chunk..end]).expect("write");
                    }
                });
            }
        });
        let size = data.len() as u64;
        assert_eq!(writer.hexdigest(size).expect("digest"), sha_hex(&data));
        let crcs = writer.crc_values(size).expect("crcs");
        assert_eq!(
            crcs,
            CrcKind::ALL.iter().map(|&k| (k, crc_fast::checksum(k.algorithm(), &data))).collect::<Vec<_>>()
        );
        assert_eq!(writer.held_bytes().0, 0);
        writer.commit().expect("commit");
        assert_eq!(std::fs::read(&final_path).expect("read"), data);
    }

    #[test]
    fn crcs_match_the_published_check_values() {
        // The "123456789" check values of the CRC catalogue, as S3 computes them.
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let writer = WriterCore::open_with(&final_path, &temp_path, false, false, &CrcKind::ALL).expect("open");
        writer.write_at(4, b"56789").expect("write");
        writer.write_at(0, b"1234").expect("write");
        let crcs = writer.crc_values(9).expect("crcs");
        assert_eq!(
            crcs,
            vec![
                (CrcKind::Crc64Nvme, 0xae8b_1486_0a79_9888),
                (CrcKind::Crc32c, 0xe306_9283),
                (CrcKind::Crc32, 0xcbf4_3926)
            ]
        );
        assert!(writer.hexdigest(9).is_err(), "no SHA-256 was asked for");
        assert_eq!(CrcKind::from_s3_name("crc64nvme"), Some(CrcKind::Crc64Nvme));
        assert!(parse_crcs(&["SHA1".to_string()]).is_err());
    }

    #[test]
    fn resumed_prefix_is_read_back_and_memory_chunks_follow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let chunk = 1 << 16;
        let data = pattern(6 * chunk, 3);
        // A partial from an earlier run: chunks 0, 1 and 3 landed.
        std::fs::write(&temp_path, &data[..4 * chunk]).expect("partial");
        let writer = WriterCore::open(&final_path, &temp_path, true, true).expect("open");
        writer.write_at(5 * chunk as u64, &data[5 * chunk..]).expect("write 5");
        writer.mark_done(0, 2 * chunk as u64).expect("mark 0-1");
        writer.mark_done(3 * chunk as u64, chunk as u64).expect("mark 3");
        writer.write_at(4 * chunk as u64, &data[4 * chunk..5 * chunk]).expect("write 4");
        writer.write_at(2 * chunk as u64, &data[2 * chunk..3 * chunk]).expect("write 2");
        assert_eq!(writer.hexdigest(data.len() as u64).expect("digest"), sha_hex(&data));
        assert_eq!(writer.held_bytes().0, 0);
    }

    #[test]
    fn a_read_back_failure_keeps_its_io_error() {
        // A FIFO as the temp file: open and lock work, but a positioned read fails with
        // ESPIPE, a real I/O error on the read-back path. It must stay an I/O error (not an
        // invalid argument) for every call that reports it.
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        crate::sys::mkfifo(&temp_path).expect("mkfifo");
        let writer = WriterCore::open(&final_path, &temp_path, true, true).expect("open");
        writer.mark_done(0, 4096).expect("mark");
        for _ in 0..2 {
            match writer.hexdigest(4096) {
                Err(CoreError::Io { context, source }) => {
                    assert_eq!(source.raw_os_error(), Some(libc::ESPIPE), "{context}: {source}");
                    assert!(context.contains("reading back"), "{context}");
                }
                other => panic!("expected an I/O error, got {other:?}"),
            }
        }
        assert!(matches!(writer.write_at(4096, b"x"), Err(CoreError::Io { .. })), "later writes report it too");
    }

    struct Collect(Mutex<Vec<u8>>, Option<usize>);

    impl Sink for Collect {
        fn deliver(&self, data: &[u8], _object: Option<&Py<PyAny>>) -> CoreResult<()> {
            let mut got = lock(&self.0);
            if self.1.is_some_and(|limit| got.len() + data.len() > limit) {
                return Err(CoreError::io("writing to the consumer", io::Error::from_raw_os_error(libc::EPIPE)));
            }
            got.extend_from_slice(data);
            Ok(())
        }
    }

    #[test]
    fn a_stream_writer_delivers_in_order_as_the_frontier_moves() {
        let sink = Arc::new(Collect(Mutex::new(Vec::new()), None));
        struct Shared(Arc<Collect>);
        impl Sink for Shared {
            fn deliver(&self, data: &[u8], object: Option<&Py<PyAny>>) -> CoreResult<()> {
                self.0.deliver(data, object)
            }
        }
        let writer = WriterCore::for_stream(Box::new(Shared(Arc::clone(&sink))), &[CrcKind::Crc64Nvme]);
        let data = pattern(5000, 4);
        writer.write_at(3000, &data[3000..]).expect("write");
        writer.write_at(1000, &data[1000..3000]).expect("write");
        assert!(lock(&sink.0).is_empty(), "nothing may go out before byte 0");
        writer.write_at(0, &data[..1000]).expect("write");
        assert_eq!(*lock(&sink.0), data);
        assert_eq!(writer.hexdigest(5000).expect("digest"), sha_hex(&data));
        assert!(writer.set_len(10).is_err() && writer.mark_done(0, 1).is_err(), "a stream has no file");
        writer.commit().expect("finish");
        assert!(writer.write_at(5000, b"late").is_err());
    }

    #[test]
    fn a_failing_sink_stops_the_stream_with_its_error() {
        let writer = WriterCore::for_stream(Box::new(Collect(Mutex::new(Vec::new()), Some(1500))), &[]);
        writer.write_at(1000, &[1u8; 1000]).expect("held");
        match writer.write_at(0, &[2u8; 1000]) {
            Err(CoreError::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::EPIPE)),
            other => panic!("expected the sink's error, got {other:?}"),
        }
        assert_eq!(writer.held_bytes().0, 0, "held chunks are released");
        assert!(matches!(writer.hexdigest(2000), Err(CoreError::Io { .. })));
        assert!(matches!(writer.write_at(2000, b"more"), Err(CoreError::Io { .. })));
    }

    #[test]
    fn abort_during_a_long_read_back_returns_promptly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let writer = WriterCore::open(&final_path, &temp_path, true, true).expect("open");
        writer.set_len(1 << 40).expect("sparse terabyte");
        writer.mark_done(0, 1 << 40).expect("mark");
        let started = std::time::Instant::now();
        writer.abort(false).expect("abort");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(!temp_path.exists());
    }

    #[test]
    fn direct_writes_store_the_same_bytes_and_holes_with_an_unaligned_tail() {
        direct_writes_round_trip(false);
    }

    #[test]
    fn direct_writes_from_aligned_memory_skip_the_bounce_and_store_the_same_bytes() {
        direct_writes_round_trip(true);
    }

    fn direct_writes_round_trip(from_aligned_memory: bool) {
        // In the crate's directory: /tmp may be a tmpfs, which refuses O_DIRECT.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let (final_path, temp_path) = paths(dir.path());
        let writer = WriterCore::open_direct(&final_path, &temp_path, false, true, &[], true).expect("open");
        let takes_direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&temp_path).is_ok();
        assert_eq!(writer.writes_direct, takes_direct);
        let size = (3 << 20) + 4096 * 3 + 123;
        let mut data: Vec<u8> = (0..size as u32).map(|i| (i % 251) as u8 | 1).collect();
        data[1 << 20..2 << 20].fill(0); // a hole in the middle
        writer.set_len(size as u64).expect("len");
        let mut aligned = AlignedBuf::new(Vec::new(), size);
        aligned.bytes_mut().copy_from_slice(&data);
        assert!(aligned.aligned());
        let source: &[u8] = if from_aligned_memory { aligned.bytes() } else { &data };
        for (i, chunk) in source.chunks(1 << 20).enumerate().rev() {
            writer.write_at((i << 20) as u64, chunk).expect("write");
        }
        assert_eq!(writer.hexdigest(size as u64).expect("digest"), crate::hash::to_hex(&Sha256::digest(&data)));
        writer.commit().expect("commit");
        assert_eq!(std::fs::read(&final_path).expect("read"), data);
        let allocated = std::fs::metadata(&final_path).expect("meta").blocks() * 512;
        assert!(allocated < (size as u64) - (1 << 20) + 65536, "the zero MiB was written: {allocated}");
    }
}

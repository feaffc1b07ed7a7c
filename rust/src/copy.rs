//! The overlapped local copy: read -> hash -> write on three threads, so a copy takes
//! max(read, hash, write) rather than their sum. Holes in the source are hashed as zeros
//! but never read or written; all-zero chunks are not written either.
//!
//! With no sink the same pipeline is a whole-file hash whose reads overlap the hashing.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{CoreError, CoreResult, IoContext};
use crate::hash::{hash_span, hex_digest, update_zeros};
use crate::progress::Progress;
use crate::ratelimit::{Pacing, Side, TokenBucket};
use crate::reader::{advise_sequential, data_extents, read_full_at, SourceFile};
use crate::writer::WriterCore;

/// Buffers in flight: one being read, one hashed, one written, one spare.
const BUFFERS: usize = 4;
/// Writeback of a chunk is awaited this many chunks later, which bounds dirty pages
/// without making the writer wait on the disk for every chunk.
const WRITEBACK_LAG: u64 = 2;
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyStats {
    pub sha256: String,
    pub size: u64,
    pub bytes_copied: u64,
    pub resumed_from: u64,
    pub holes_skipped: u64,
}

enum Block {
    Data { offset: u64, buf: Vec<u8>, len: usize },
    Zero { len: u64 },
}

fn overlaps(extents: &[(u64, u64)], start: u64, end: u64) -> bool {
    extents.iter().any(|&(off, len)| off < end && off + len > start)
}

/// Shared by the pipeline's threads: the first error wins and stops everyone.
struct Control<'a> {
    stop: AtomicBool,
    error: Mutex<Option<CoreError>>,
    cancel: Option<&'a AtomicBool>,
}

impl Control<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }

    fn fail(&self, err: CoreError) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(err);
        }
        self.stop.store(true, Ordering::Relaxed);
    }

    /// For a rate limiter's wait: an error once the copy is stopped or cancelled.
    fn check(&self) -> CoreResult<()> {
        if self.stopped() {
            Err(CoreError::Cancelled)
        } else {
            Ok(())
        }
    }

    fn take_error(&self) -> Option<CoreError> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Hash [0, end) of a file, reading only its data extents; counts into `done`.
/// With `pace`, the bytes read (not the holes) are taken from the rate limiter.
fn hash_prefix(
    file: &File,
    path: &Path,
    end: u64,
    done: &AtomicU64,
    control: &Control<'_>,
    pace: Option<&TokenBucket>,
) -> CoreResult<Sha256> {
    let extents = data_extents(file, end).context(|| format!("finding data extents of {}", path.display()))?;
    let mut state = Sha256::new();
    // Paced reads stay within the burst: a 4 MiB read would go out faster than the limit.
    let mut buf = vec![0u8; pace.map_or(4 << 20, |b| (b.burst() as usize).min(4 << 20))];
    let tick = |n: u64, read: bool| {
        done.fetch_add(n, Ordering::Relaxed);
        if let (Some(bucket), true) = (pace, read) {
            if bucket.acquire(n, || control.check()).is_err() {
                return false;
            }
        }
        !control.stopped()
    };
    if hash_span(file, path, &extents, (0, end), &mut buf, &mut state, tick)? {
        Ok(state)
    } else {
        Err(CoreError::Cancelled)
    }
}

/// Re-hash the partial's prefix and the source's prefix (in parallel); reuse the prefix only
/// if both are equal. Returns the hash state of the verified prefix. The side on the share
/// (`pacing`) is read within the rate limit.
fn verify_prefix(
    source: &SourceFile,
    sink: &WriterCore,
    end: u64,
    progress: &mut Progress,
    pacing: Option<Pacing<'_>>,
) -> CoreResult<Option<Sha256>> {
    let partial = File::open(sink.temp_path()).context(|| format!("opening {}", sink.temp_path().display()))?;
    let cancel = progress.cancel_flag();
    let control = Control { stop: AtomicBool::new(false), error: Mutex::new(None), cancel: cancel.as_deref() };
    let (src_done, tmp_done) = (AtomicU64::new(0), AtomicU64::new(0));
    let (src_pace, tmp_pace) = (Pacing::on(pacing, Side::Source), Pacing::on(pacing, Side::Destination));
    let (src_state, tmp_state) = std::thread::scope(|scope| -> CoreResult<_> {
        let src = scope.spawn(|| hash_prefix(&source.file, &source.path, end, &src_done, &control, src_pace));
        let tmp = scope.spawn(|| hash_prefix(&partial, sink.temp_path(), end, &tmp_done, &control, tmp_pace));
        while !(src.is_finished() && tmp.is_finished()) {
            let done = src_done.load(Ordering::Relaxed).min(tmp_done.load(Ordering::Relaxed));
            if let Err(err) = progress.poll(done) {
                control.fail(err);
                break;
            }
            std::thread::sleep(POLL);
        }
        let src = src.join().unwrap_or(Err(CoreError::Cancelled));
        let tmp = tmp.join().unwrap_or(Err(CoreError::Cancelled));
        if let Some(err) = control.take_error() {
            return Err(err);
        }
        Ok((src?, tmp?))
    })?;
    if hex_digest(&src_state) == hex_digest(&tmp_state) {
        Ok(Some(src_state))
    } else {
        Ok(None)
    }
}

/// Open a copy's source without ever blocking, and refuse anything but a regular file.
///
/// A FIFO with no writer blocks a plain open() forever and a device reports a size of 0, so
/// the file is opened with O_NONBLOCK (open returns at once; reads of a regular file ignore
/// the flag) and judged by fstat of the descriptor actually opened, not by an earlier stat.
fn open_source(path: &Path) -> CoreResult<SourceFile> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .context(|| format!("opening {}", path.display()))?;
    let meta = file.metadata().context(|| format!("reading {}", path.display()))?;
    let kind = meta.file_type();
    if kind.is_dir() {
        return Err(CoreError::io(
            format!("reading {}", path.display()),
            std::io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO (named pipe)"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_block_device() || kind.is_char_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(CoreError::InvalidArgument(format!(
            "{} is {what}, not a regular file; only regular files are copied (read a pipe or device through a stream)",
            path.display()
        )));
    }
    advise_sequential(&file);
    Ok(SourceFile { file, path: path.to_path_buf(), size: meta.len() })
}

/// Copy (or with `sink == None` just hash) `source_path`. The sink is left uncommitted.
///
/// With `pacing`, the bytes that cross the share's side (read from the source, or stored
/// into the destination: holes and skipped zero blocks are not traffic) are taken from the
/// rate limiter, in pieces of at most its burst.
pub fn copy_file(
    source_path: &Path,
    sink: Option<&WriterCore>,
    chunk_size: usize,
    resume: bool,
    progress: &mut Progress,
    pacing: Option<Pacing<'_>>,
) -> CoreResult<CopyStats> {
    if chunk_size == 0 {
        return Err(CoreError::InvalidArgument("chunk_size must be positive".into()));
    }
    let source = open_source(source_path)?;
    let size = source.size;
    progress.set_total(size);
    let extents = source.extents()?;
    let chunk = chunk_size as u64;

    let mut start = 0u64;
    let mut state = Sha256::new();
    if let Some(sink) = sink {
        let candidate = sink.existing_length().min(size) / chunk * chunk;
        if resume && candidate > 0 {
            if let Some(verified) = verify_prefix(&source, sink, candidate, progress, pacing)? {
                state = verified;
                start = candidate;
            }
        }
        // Anything past the verified prefix is stale: drop it so zero chunks may be skipped.
        sink.set_len(start)?;
    }

    let cancel = progress.cancel_flag();
    let control = Control { stop: AtomicBool::new(false), error: Mutex::new(None), cancel: cancel.as_deref() };
    let hashed = AtomicU64::new(start);
    let written = AtomicU64::new(start);
    let holes = AtomicU64::new(0);

    let (pool_tx, pool_rx) = sync_channel::<Vec<u8>>(BUFFERS);
    let in_flight = BUFFERS.min(size.saturating_sub(start).div_ceil(chunk).max(1) as usize);
    for _ in 0..in_flight {
        // Cannot block: the channel has room for BUFFERS buffers.
        let _ = pool_tx.send(vec![0u8; chunk_size]);
    }
    let (to_hash_tx, to_hash_rx) = sync_channel::<Block>(1);

    let (read_pace, write_pace) = (Pacing::on(pacing, Side::Source), Pacing::on(pacing, Side::Destination));
    let digest = std::thread::scope(|scope| -> CoreResult<String> {
        let reader =
            scope.spawn(|| read_stage(&source, &extents, start, chunk, pool_rx, to_hash_tx, &control, read_pace));
        let (to_write_tx, to_write_rx) = sync_channel::<Block>(1);
        let (hash_pool, write_pool) = match sink {
            Some(_) => (None, Some(pool_tx)),
            None => (Some(pool_tx), None),
        };
        let forward = sink.map(|_| to_write_tx);
        let hasher = scope.spawn(|| hash_stage(state, to_hash_rx, forward, hash_pool, &hashed, &control));
        let writer = sink.map(|sink| {
            let written = &written;
            let holes = &holes;
            let control = &control;
            scope.spawn(move || {
                let pool = write_pool.unwrap_or_else(|| sync_channel(1).0);
                write_stage(sink, to_write_rx, pool, chunk, written, holes, control, write_pace)
            })
        });

        loop {
            let finished =
                reader.is_finished() && hasher.is_finished() && writer.as_ref().is_none_or(|w| w.is_finished());
            if finished {
                break;
            }
            let done = match sink {
                Some(_) => written.load(Ordering::Relaxed),
                None => hashed.load(Ordering::Relaxed),
            };
            if let Err(err) = progress.poll(done) {
                control.fail(err);
            }
            std::thread::sleep(POLL);
        }
        let _ = reader.join();
        let digest = hasher.join().ok().flatten();
        if let Some(w) = writer {
            let _ = w.join();
        }
        if let Some(err) = control.take_error() {
            return Err(err);
        }
        if progress.is_cancelled() {
            return Err(CoreError::Cancelled);
        }
        digest.ok_or(CoreError::Cancelled)
    })?;

    if let Some(sink) = sink {
        sink.set_len(size)?;
    }
    progress.finish()?;
    Ok(CopyStats {
        sha256: digest,
        size,
        bytes_copied: size - start,
        resumed_from: start,
        holes_skipped: holes.load(Ordering::Relaxed),
    })
}

/// pread `buf` at `offset` until full or the end of the file; with `pace`, in pieces of at
/// most its burst, each taken from the limiter before it is read. None: stopped meanwhile.
fn read_block(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    pace: Option<&TokenBucket>,
    control: &Control<'_>,
) -> Option<std::io::Result<usize>> {
    let Some(bucket) = pace else { return Some(read_full_at(file, buf, offset)) };
    let step = (bucket.burst() as usize).max(1);
    let mut got = 0;
    while got < buf.len() {
        let end = (got + step).min(buf.len());
        bucket.acquire((end - got) as u64, || control.check()).ok()?;
        match read_full_at(file, &mut buf[got..end], offset + got as u64) {
            Ok(n) => {
                got += n;
                if got < end {
                    break; // the end of the file
                }
            }
            Err(err) => return Some(Err(err)),
        }
    }
    Some(Ok(got))
}

/// Write `data` at `offset`; with `pace`, in pieces of at most its burst, each piece's
/// stored bytes (all-zero blocks are not written) taken from the limiter after it.
/// Returns the bytes stored.
fn write_block(
    sink: &WriterCore,
    offset: u64,
    data: &[u8],
    pace: Option<&TokenBucket>,
    control: &Control<'_>,
) -> CoreResult<u64> {
    let Some(bucket) = pace else { return sink.write_at(offset, data) };
    let step = (bucket.burst() as usize).max(1);
    let mut stored = 0;
    for (index, piece) in data.chunks(step).enumerate() {
        let written = sink.write_at(offset + (index * step) as u64, piece)?;
        bucket.acquire(written, || control.check())?;
        stored += written;
    }
    Ok(stored)
}

#[allow(clippy::too_many_arguments)]
fn read_stage(
    source: &SourceFile,
    extents: &[(u64, u64)],
    start: u64,
    chunk: u64,
    pool: Receiver<Vec<u8>>,
    out: SyncSender<Block>,
    control: &Control<'_>,
    pace: Option<&TokenBucket>,
) {
    let mut offset = start;
    while offset < source.size {
        if control.stopped() {
            return;
        }
        let len = chunk.min(source.size - offset);
        let block = if overlaps(extents, offset, offset + len) {
            let Ok(mut buf) = pool.recv() else { return };
            let Some(read) = read_block(&source.file, &mut buf[..len as usize], offset, pace, control) else {
                return;
            };
            match read {
                Ok(got) if got == len as usize => Block::Data { offset, buf, len: got },
                Ok(_) => {
                    control.fail(CoreError::io(
                        format!("reading {}", source.path.display()),
                        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file shrank while being copied"),
                    ));
                    return;
                }
                Err(err) => {
                    control.fail(CoreError::io(format!("reading {} at offset {offset}", source.path.display()), err));
                    return;
                }
            }
        } else {
            Block::Zero { len }
        };
        if out.send(block).is_err() {
            return;
        }
        offset += len;
    }
}

fn hash_stage(
    mut state: Sha256,
    input: Receiver<Block>,
    forward: Option<SyncSender<Block>>,
    pool: Option<SyncSender<Vec<u8>>>,
    hashed: &AtomicU64,
    control: &Control<'_>,
) -> Option<String> {
    for block in input {
        if control.stopped() {
            return None;
        }
        let len = match &block {
            Block::Data { buf, len, .. } => {
                state.update(&buf[..*len]);
                *len as u64
            }
            Block::Zero { len, .. } => {
                update_zeros(&mut state, *len);
                *len
            }
        };
        hashed.fetch_add(len, Ordering::Relaxed);
        match (&forward, block) {
            (Some(next), block) => {
                if next.send(block).is_err() {
                    return None;
                }
            }
            (None, Block::Data { buf, .. }) => {
                if let Some(pool) = &pool {
                    let _ = pool.send(buf);
                }
            }
            (None, Block::Zero { .. }) => {}
        }
    }
    if control.stopped() {
        return None;
    }
    Some(hex_digest(&state))
}

#[allow(clippy::too_many_arguments)]
fn write_stage(
    sink: &WriterCore,
    input: Receiver<Block>,
    pool: SyncSender<Vec<u8>>,
    chunk: u64,
    written: &AtomicU64,
    holes: &AtomicU64,
    control: &Control<'_>,
    pace: Option<&TokenBucket>,
) {
    for block in input {
        if control.stopped() {
            return;
        }
        let result = match block {
            Block::Data { offset, buf, len } => {
                let outcome = write_block(sink, offset, &buf[..len], pace, control).map(|stored| {
                    if stored > 0 {
                        sink.start_writeback(offset, len as u64);
                        if offset >= WRITEBACK_LAG * chunk {
                            sink.wait_writeback(offset - WRITEBACK_LAG * chunk, chunk);
                        }
                    }
                    holes.fetch_add(len as u64 - stored, Ordering::Relaxed);
                    len as u64
                });
                let _ = pool.send(buf);
                outcome
            }
            Block::Zero { len, .. } => {
                holes.fetch_add(len, Ordering::Relaxed);
                Ok(len)
            }
        };
        match result {
            Ok(len) => {
                written.fetch_add(len, Ordering::Relaxed);
            }
            Err(err) => {
                control.fail(err);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8).collect()
    }

    #[test]
    fn copy_matches_source_and_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        let data = pattern(1_000_001, 1);
        std::fs::write(&src, &data).expect("write");
        let dst = dir.path().join("dst");
        let writer = WriterCore::open(&dst, &dir.path().join("dst.partial"), false, false).expect("open");
        let stats = copy_file(&src, Some(&writer), 65536, false, &mut Progress::silent(0), None).expect("copy");
        writer.commit().expect("commit");
        assert_eq!(std::fs::read(&dst).expect("read"), data);
        assert_eq!(stats.sha256, crate::hash::to_hex(&Sha256::digest(&data)));
        assert_eq!(stats.bytes_copied, data.len() as u64);
    }

    #[test]
    fn hash_only_pipeline_equals_direct_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        let data = pattern(300_000, 2);
        std::fs::write(&src, &data).expect("write");
        let stats = copy_file(&src, None, 4096, false, &mut Progress::silent(0), None).expect("hash");
        assert_eq!(stats.sha256, crate::hash::to_hex(&Sha256::digest(&data)));
    }

    #[test]
    fn empty_file_copies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::write(&src, b"").expect("write");
        let dst = dir.path().join("dst");
        let writer = WriterCore::open(&dst, &dir.path().join("p"), false, false).expect("open");
        let stats = copy_file(&src, Some(&writer), 4096, false, &mut Progress::silent(0), None).expect("copy");
        writer.commit().expect("commit");
        assert_eq!(stats.sha256, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(std::fs::metadata(&dst).expect("meta").len(), 0);
    }

    #[test]
    fn sparse_source_stays_sparse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("sparse");
        let mut file = File::create(&src).expect("create");
        file.seek(SeekFrom::Start(5 << 20)).expect("seek");
        file.write_all(&pattern(1 << 20, 3)).expect("data");
        file.set_len(16 << 20).expect("len");
        drop(file);
        let dst = dir.path().join("dst");
        let writer = WriterCore::open(&dst, &dir.path().join("p"), false, false).expect("open");
        let stats = copy_file(&src, Some(&writer), 1 << 20, false, &mut Progress::silent(0), None).expect("copy");
        writer.commit().expect("commit");
        assert_eq!(std::fs::read(&dst).expect("dst"), std::fs::read(&src).expect("src"));
        let (s, d) = (std::fs::metadata(&src).expect("s"), std::fs::metadata(&dst).expect("d"));
        assert_eq!(d.len(), 16 << 20);
        assert!(d.blocks() <= s.blocks(), "dst {} blocks > src {}", d.blocks(), s.blocks());
        assert_eq!(stats.holes_skipped, 15 << 20);
    }

    #[test]
    fn resume_reuses_a_verified_prefix_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        let data = pattern(1 << 20, 4);
        std::fs::write(&src, &data).expect("write");
        let (dst, partial) = (dir.path().join("dst"), dir.path().join("dst.partial"));

        // A good partial: the first 300 KB of the source.
        std::fs::write(&partial, &data[..300_000]).expect("partial");
        let writer = WriterCore::open(&dst, &partial, true, false).expect("open");
        let stats = copy_file(&src, Some(&writer), 65536, true, &mut Progress::silent(0), None).expect("copy");
        writer.commit().expect("commit");
        assert_eq!(stats.resumed_from, 300_000 / 65536 * 65536);
        assert_eq!(std::fs::read(&dst).expect("dst"), data);

        // A corrupted partial is detected and the copy starts over.
        let mut bad = data[..300_000].to_vec();
        bad[1000] ^= 0xff;
        std::fs::write(&partial, &bad).expect("partial");
        let writer = WriterCore::open(&dst, &partial, true, false).expect("open");
        let stats = copy_file(&src, Some(&writer), 65536, true, &mut Progress::silent(0), None).expect("copy");
        writer.commit().expect("commit");
        assert_eq!(stats.resumed_from, 0);
        assert_eq!(std::fs::read(&dst).expect("dst"), data);
        assert_eq!(stats.sha256, crate::hash::to_hex(&Sha256::digest(&data)));
    }

    fn paced(bucket: &TokenBucket, side: Side) -> Option<Pacing<'_>> {
        Some(Pacing { bucket, side })
    }

    #[test]
    fn paced_reads_take_the_data_read_and_wait_for_the_rate() {
        // 3 MiB of data (and a 1 MiB hole, never read) at 4 MiB/s, burst 512 KiB: the
        // copy takes at least (3 MiB - 512 KiB) / 4 MiB/s = 0.625 s.
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        let mut file = File::create(&src).expect("create");
        file.write_all(&pattern(2 << 20, 5)).expect("data");
        file.seek(SeekFrom::Start(3 << 20)).expect("seek");
        file.write_all(&pattern(1 << 20, 6)).expect("data");
        drop(file);
        let bucket = TokenBucket::new(4 << 20).expect("bucket");
        let dst = dir.path().join("dst");
        let writer = WriterCore::open(&dst, &dir.path().join("p"), false, false).expect("open");
        let started = std::time::Instant::now();
        let stats =
            copy_file(&src, Some(&writer), 1 << 20, false, &mut Progress::silent(0), paced(&bucket, Side::Source))
                .expect("copy");
        let took = started.elapsed().as_secs_f64();
        writer.commit().expect("commit");
        assert_eq!(std::fs::read(&dst).expect("dst"), std::fs::read(&src).expect("src"));
        assert_eq!(stats.size, 4 << 20);
        assert_eq!(bucket.granted(), 3 << 20, "holes are not traffic");
        assert!(took >= 0.625 - 0.005, "took {took} s");
    }

    #[test]
    fn paced_writes_take_only_the_bytes_stored() {
        // Allocated zeros are read but not written: an upload onto the share does not send them.
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        let mut data = pattern(3 << 20, 7);
        data[1 << 20..2 << 20].fill(0);
        std::fs::write(&src, &data).expect("write");
        let bucket = TokenBucket::new(256 << 20).expect("bucket");
        let dst = dir.path().join("dst");
        let writer = WriterCore::open(&dst, &dir.path().join("p"), false, false).expect("open");
        copy_file(&src, Some(&writer), 1 << 20, false, &mut Progress::silent(0), paced(&bucket, Side::Destination))
            .expect("copy");
        writer.commit().expect("commit");
        assert_eq!(std::fs::read(&dst).expect("dst"), data);
        assert_eq!(bucket.granted(), 2 << 20);
    }

    #[test]
    fn a_paced_resume_reads_the_paced_side_of_the_prefix_within_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        let data = pattern(2 << 20, 8);
        std::fs::write(&src, &data).expect("write");
        let (dst, partial) = (dir.path().join("dst"), dir.path().join("dst.partial"));
        std::fs::write(&partial, &data[..1 << 20]).expect("partial");
        let bucket = TokenBucket::new(256 << 20).expect("bucket");
        let writer = WriterCore::open(&dst, &partial, true, false).expect("open");
        let stats =
            copy_file(&src, Some(&writer), 1 << 20, true, &mut Progress::silent(0), paced(&bucket, Side::Source))
                .expect("copy");
        writer.commit().expect("commit");
        assert_eq!(stats.resumed_from, 1 << 20);
        // The source's prefix was re-read (1 MiB) and its rest copied (1 MiB).
        assert_eq!(bucket.granted(), 2 << 20);
        assert_eq!(std::fs::read(&dst).expect("dst"), data);
    }

    #[test]
    fn a_cancelled_paced_copy_stops_waiting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::write(&src, pattern(8 << 20, 9)).expect("write");
        // 8 MiB at 1 MiB/s would take 7.5 s; cancelled after 0.2 s it must end at once.
        let bucket = TokenBucket::new(1 << 20).expect("bucket");
        let cancel = std::sync::Arc::new(AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&cancel);
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            flag.store(true, Ordering::SeqCst);
        });
        let mut progress = Progress::silent(0).with_cancel(cancel);
        let writer = WriterCore::open(&dir.path().join("dst"), &dir.path().join("p"), false, false).expect("open");
        let started = std::time::Instant::now();
        let result = copy_file(&src, Some(&writer), 1 << 20, false, &mut progress, paced(&bucket, Side::Source));
        canceller.join().expect("join");
        assert!(matches!(result, Err(CoreError::Cancelled)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn fifo_source_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(status.success());
        // A plain open() would wait for a writer forever; this must return at once.
        let err = copy_file(&fifo, None, 4096, false, &mut Progress::silent(0), None).expect_err("must fail");
        assert!(matches!(err, CoreError::InvalidArgument(ref m) if m.contains("FIFO")), "{err:?}");
    }

    #[test]
    fn directory_source_is_eisdir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = copy_file(dir.path(), None, 4096, false, &mut Progress::silent(0), None).expect_err("must fail");
        match err {
            CoreError::Io { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::EISDIR)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_source_is_not_found() {
        let err = copy_file(Path::new("/no/such/file"), None, 4096, false, &mut Progress::silent(0), None)
            .expect_err("must fail");
        match err {
            CoreError::Io { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
            other => panic!("{other:?}"),
        }
    }
}

//! UploadSource: the one sequential pass over an upload's source, a file or a Python stream.
//!
//! Each part is read once into memory that is then handed to Python (and on to the HTTP
//! body) without a copy, and hashed from that same memory: in order into the whole-object
//! SHA-256 and CRC-64/NVME, and on its own for the part's CRC-64/NVME (and SHA-256 when
//! asked). The bytes hashed are the bytes sent; nothing reads the source a second time.
//!
//! File parts live in pooled native buffers (`PartBuffer`): a 200 GB upload reuses the same
//! few part-sized allocations instead of faulting in fresh memory for every part.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use crc_fast::{CrcAlgorithm, Digest as CrcDigest};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes};
use sha2::{Digest, Sha256};

use crate::aligned::{AlignedBuf, ALIGN};
use crate::buffer::with_bytes;
use crate::error::{CoreError, CoreResult, IoContext};
use crate::hash::{hex_digest, to_hex};
pub use crate::pybuffer::PartBuffer;
use crate::reader::{read_full_at, SourceFile};

/// Spare part buffers kept for reuse; more than the parts in flight is never needed.
const POOL_SPARES: usize = 16;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Part-sized allocations returned by dropped `PartBuffer`s.
#[derive(Default)]
pub struct BufferPool {
    spares: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A buffer for `len` bytes (contents unspecified: the caller overwrites them).
    pub fn take(&self, len: usize) -> AlignedBuf {
        let room = len.next_multiple_of(ALIGN) + ALIGN;
        let mut spares = lock(&self.spares);
        let best =
            spares.iter().enumerate().filter(|(_, v)| v.len() >= room).min_by_key(|(_, v)| v.len()).map(|(i, _)| i);
        let vec = match best {
            Some(i) => spares.swap_remove(i),
            None => Vec::new(),
        };
        drop(spares);
        AlignedBuf::new(vec, len)
    }

    pub fn give_back(&self, buf: AlignedBuf) {
        let mut spares = lock(&self.spares);
        if spares.len() < POOL_SPARES {
            spares.push(buf.vec);
        }
    }
}

/// One part of the source, as read and hashed.
#[pyclass(module = "vmstore._native", frozen, get_all)]
pub struct SourcePart {
    /// 1-based, in source order.
    number: u64,
    offset: u64,
    length: u64,
    /// CRC-64/NVME of this part's bytes.
    crc64nvme: u64,
    /// SHA-256 hex of this part's bytes, when the source was opened with part_sha256.
    sha256: Option<String>,
    /// The bytes: a PartBuffer (file sources), a bytearray (streams), or None when the
    /// part was only hashed (`keep=False`).
    data: Option<Py<PyAny>>,
}

#[pymethods]
impl SourcePart {
    #[getter]
    fn end(&self) -> u64 {
        self.offset + self.length
    }

    fn __repr__(&self) -> String {
        format!("SourcePart(number={}, offset={}, length={})", self.number, self.offset, self.length)
    }
}

/// A file source: shared with the read-ahead thread.
struct FileInput {
    source: SourceFile,
    extents: Vec<(u64, u64)>,
    /// The same file opened with O_DIRECT, when asked for and possible.
    direct: Option<File>,
}

impl FileInput {
    /// Read bytes [offset, offset + len) into `buf`; how many the file still had.
    fn read(&self, buf: &mut AlignedBuf, offset: u64, len: usize) -> CoreResult<usize> {
        match self.direct.as_ref().filter(|_| buf.aligned()) {
            Some(file) => read_direct_span(&self.source, file, &self.extents, offset, buf.window(), len),
            None => read_file_span(&self.source, None, &self.extents, offset, buf.window(), len),
        }
    }
}

/// The next part, being read on its own thread while the current one is hashed and sent:
/// O_DIRECT has no kernel readahead, so the pass does its own, one part deep.
struct ReadAhead {
    offset: u64,
    len: usize,
    handle: std::thread::JoinHandle<(AlignedBuf, CoreResult<usize>)>,
}

enum Input {
    File(Arc<FileInput>),
    Stream { stream: Py<PyAny>, readinto: bool },
}

/// Bytes hashed by both checksums in turn (well inside a core's L2 cache).
const ABSORB_BLOCK: usize = 128 << 10;

/// The in-order state of the pass.
struct Pass {
    sha: Sha256,
    /// CRC-64/NVME of [0, position), combined from the parts' CRCs (no second CRC pass).
    crc: u64,
    position: u64,
    parts: u64,
    eof: bool,
    /// Reused for parts that are only hashed (a resumed upload's stored parts).
    scratch: Option<AlignedBuf>,
    ahead: Option<ReadAhead>,
}

impl Pass {
    fn absorb(&mut self, data: &[u8], part_sha256: bool) -> (u64, Option<String>) {
        // Both checksums a cache-sized block at a time: the CRC reads what the SHA-256 has
        // just pulled into the cache, not the part again from memory.
        let mut part = CrcDigest::new(CrcAlgorithm::Crc64Nvme);
        for block in data.chunks(ABSORB_BLOCK) {
            self.sha.update(block);
            part.update(block);
        }
        let part_crc = part.finalize();
        self.crc =
            if self.position == 0 { part_crc } else { crate::crc64::combine(self.crc, part_crc, data.len() as u64) };
        let sha = part_sha256.then(|| to_hex(&Sha256::digest(data)));
        self.position += data.len() as u64;
        (part_crc, sha)
    }

    fn new() -> Self {
        Pass { sha: Sha256::new(), crc: 0, position: 0, parts: 0, eof: false, scratch: None, ahead: None }
    }
}

/// Fill `buf[..len]` with bytes [offset, offset + len) of the file: data extents are read,
/// holes are zeros without a read. Returns how many bytes the file still had. `buf` may be
/// longer than `len` (up to the next block boundary): an O_DIRECT read of the file's last
/// block fills whole blocks.
///
/// With `direct` (the file opened O_DIRECT, `buf` block-aligned), every block-aligned span is
/// read straight from the device into `buf`: no page-cache copy, and the pages of a 200 GB
/// image do not evict the host's cache (qemu-img's `-T none`). Anything unaligned, and a
/// filesystem that refuses O_DIRECT for a span, goes through the page cache.
fn read_file_span(
    source: &SourceFile,
    direct: Option<&File>,
    extents: &[(u64, u64)],
    offset: u64,
    buf: &mut [u8],
    len: usize,
) -> CoreResult<usize> {
    let end = offset + len as u64;
    let mut pos = offset;
    let first = extents.partition_point(|&(o, l)| o + l <= offset);
    let aligned = |v: u64| v.is_multiple_of(ALIGN as u64);
    for &(o, l) in &extents[first..] {
        if o >= end {
            break;
        }
        let (start, stop) = (o.max(offset), (o + l).min(end));
        if start > pos {
            buf[(pos - offset) as usize..(start - offset) as usize].fill(0);
        }
        let at = (start - offset) as usize;
        let want = (stop - start) as usize;
        let mut got = None;
        if let Some(file) = direct {
            let whole_blocks = aligned(start) && (aligned(stop) || stop == source.size);
            if whole_blocks && at + want.next_multiple_of(ALIGN) <= buf.len() {
                let slot = &mut buf[at..at + want.next_multiple_of(ALIGN)];
                match read_full_at(file, slot, start) {
                    Ok(n) => got = Some(n.min(want)),
                    Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(err) => {
                        return Err(CoreError::io(format!("reading {} at offset {start}", source.path.display()), err))
                    }
                }
            }
        }
        let got = match got {
            Some(n) => n,
            None => read_full_at(&source.file, &mut buf[at..at + want], start)
                .context(|| format!("reading {} at offset {start}", source.path.display()))?,
        };
        if got < want {
            return Ok(at + got);
        }
        pos = stop;
    }
    if pos < end {
        buf[(pos - offset) as usize..len].fill(0);
    }
    Ok(len)
}

/// Direct reads have no kernel readahead: a part is read as `DIRECT_STREAMS` concurrent
/// pieces, so the device sees several requests at once (the depth readahead would give).
const DIRECT_STREAMS: usize = 4;

/// `read_file_span` with O_DIRECT, the part cut into block-aligned pieces read at once.
fn read_direct_span(
    source: &SourceFile,
    direct: &File,
    extents: &[(u64, u64)],
    offset: u64,
    buf: &mut [u8],
    len: usize,
) -> CoreResult<usize> {
    let piece = len.div_ceil(DIRECT_STREAMS).next_multiple_of(ALIGN).max(1 << 20);
    if piece >= len {
        return read_file_span(source, Some(direct), extents, offset, buf, len);
    }
    let results: Vec<CoreResult<usize>> = std::thread::scope(|scope| {
        let handles: Vec<_> = buf
            .chunks_mut(piece)
            .enumerate()
            .filter(|(i, _)| i * piece < len)
            .map(|(i, window)| {
                let at = i * piece;
                let want = piece.min(len - at);
                scope.spawn(move || read_file_span(source, Some(direct), extents, offset + at as u64, window, want))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(CoreError::InvalidArgument("a read thread panicked".into()))))
            .collect()
    });
    let mut total = 0;
    for (i, result) in results.into_iter().enumerate() {
        let got = result?;
        let want = piece.min(len - i * piece);
        if got < want {
            return Ok(i * piece + got);
        }
        total += got;
    }
    Ok(total)
}

/// The source of one upload, read once from front to back by `next_part`.
#[pyclass(module = "vmstore._native", frozen)]
pub struct UploadSource {
    input: Input,
    pass: Mutex<Pass>,
    pool: Arc<BufferPool>,
    part_sha256: bool,
    name: String,
    size: Option<u64>,
}

impl UploadSource {
    fn new(input: Input, name: String, size: Option<u64>, part_sha256: bool) -> Self {
        UploadSource {
            input,
            pass: Mutex::new(Pass::new()),
            pool: Arc::new(BufferPool::default()),
            part_sha256,
            name,
            size,
        }
    }

    fn file_part(
        &self,
        py: Python<'_>,
        input: &Arc<FileInput>,
        pass: &mut Pass,
        length: u64,
        keep: bool,
    ) -> PyResult<Option<SourcePart>> {
        let size = input.source.size;
        let offset = pass.position;
        let len = length.min(size.saturating_sub(offset)) as usize;
        if len == 0 {
            pass.eof = true;
            return Ok(None);
        }
        let part_sha256 = self.part_sha256;
        let pool = &self.pool;
        let (buf, crc, sha) = py.detach(|| -> CoreResult<(AlignedBuf, u64, Option<String>)> {
            let ahead = pass.ahead.take();
            let (buf, got) = match ahead {
                Some(ahead) if ahead.offset == offset && ahead.len == len => {
                    let (buf, got) = ahead.handle.join().unwrap_or_else(|_| {
                        (
                            AlignedBuf::new(Vec::new(), 0),
                            Err(CoreError::InvalidArgument("the read-ahead thread panicked".into())),
                        )
                    });
                    (buf, got?)
                }
                other => {
                    if let Some(stale) = other {
                        if let Ok((buf, _)) = stale.handle.join() {
                            pool.give_back(buf);
                        }
                    }
                    let mut buf = match (keep, pass.scratch.take()) {
                        (false, Some(old)) => AlignedBuf::new(old.vec, len),
                        _ => pool.take(len),
                    };
                    let got = input.read(&mut buf, offset, len)?;
                    (buf, got)
                }
            };
            if got < len {
                pool.give_back(buf);
                return Err(CoreError::io(
                    format!("reading {} at offset {}", input.source.path.display(), offset + got as u64),
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the file shrank to {} bytes while being uploaded", offset + got as u64),
                    ),
                ));
            }
            let next = offset + len as u64;
            if input.direct.is_some() && next < size {
                let (next_len, input, pool) = ((length.min(size - next)) as usize, Arc::clone(input), Arc::clone(pool));
                pass.ahead = Some(ReadAhead {
                    offset: next,
                    len: next_len,
                    handle: std::thread::spawn(move || {
                        let mut buf = pool.take(next_len);
                        let got = input.read(&mut buf, next, next_len);
                        (buf, got)
                    }),
                });
            }
            let (crc, sha) = pass.absorb(buf.bytes(), part_sha256);
            Ok((buf, crc, sha))
        })?;
        pass.parts += 1;
        let data = if keep {
            Some(Py::new(py, PartBuffer::new(buf, Arc::clone(&self.pool)))?.into_any())
        } else if pass.scratch.is_none() {
            pass.scratch = Some(buf);
            None
        } else {
            self.pool.give_back(buf);
            None
        };
        Ok(Some(SourcePart { number: pass.parts, offset, length: len as u64, crc64nvme: crc, sha256: sha, data }))
    }

    fn stream_part(
        &self,
        py: Python<'_>,
        stream: &Py<PyAny>,
        readinto: bool,
        pass: &mut Pass,
        length: u64,
    ) -> PyResult<Option<SourcePart>> {
        if pass.eof {
            return Ok(None);
        }
        let offset = pass.position;
        let want = usize::try_from(length).map_err(|_| PyValueError::new_err("part length too large"))?;
        let stream = stream.bind(py);
        let data = PyByteArray::new(py, &[]);
        let mut filled = 0usize;
        if readinto {
            data.resize(want)?;
            let view = py.import("builtins")?.getattr("memoryview")?.call1((&data,))?;
            while filled < want {
                let window = view.get_item(pyo3::types::PySlice::new(py, filled as isize, want as isize, 1))?;
                let got = stream.call_method1("readinto", (window,))?;
                if got.is_none() {
                    return Err(PyValueError::new_err(format!(
                        "{} is in non-blocking mode and had no data; give a blocking stream",
                        self.name
                    )));
                }
                let n: usize = got.extract()?;
                if n == 0 {
                    pass.eof = true;
                    break;
                }
                filled += n;
            }
            view.call_method0("release")?;
            if filled < want {
                data.resize(filled)?;
            }
        } else {
            while filled < want {
                let block = stream.call_method1("read", (want - filled,))?;
                let block = block
                    .downcast::<PyBytes>()
                    .map_err(|_| PyTypeError::new_err(format!("{}.read() must return bytes", self.name)))?;
                let got = block.as_bytes().len();
                if got == 0 {
                    pass.eof = true;
                    break;
                }
                // bytearray += bytes: one memcpy, done by CPython.
                data.call_method1(intern!(py, "extend"), (block,))?;
                filled += got;
            }
        }
        if filled == 0 {
            pass.eof = true;
            return Ok(None);
        }
        let part_sha256 = self.part_sha256;
        let (crc, sha) = with_bytes(py, data.as_any(), |bytes| pass.absorb(bytes, part_sha256))?;
        pass.parts += 1;
        Ok(Some(SourcePart {
            number: pass.parts,
            offset,
            length: filled as u64,
            crc64nvme: crc,
            sha256: sha,
            data: Some(data.into_any().unbind()),
        }))
    }
}

#[pymethods]
impl UploadSource {
    /// Open a regular file. ``direct`` reads it with O_DIRECT where the filesystem allows
    /// (no page-cache copy, the host's cache left alone); ``part_sha256`` also computes each
    /// part's SHA-256.
    #[staticmethod]
    #[pyo3(signature = (path, *, part_sha256 = false, direct = false))]
    fn file(py: Python<'_>, path: PathBuf, part_sha256: bool, direct: bool) -> PyResult<Self> {
        let (source, extents, direct) = py.detach(|| -> CoreResult<_> {
            let source = SourceFile::open(&path)?;
            let extents = source.extents()?;
            // tmpfs and some FUSE filesystems refuse O_DIRECT (EINVAL): read those cached.
            let direct =
                if direct { OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).ok() } else { None };
            Ok((source, extents, direct))
        })?;
        let size = source.size;
        let name = path.display().to_string();
        Ok(UploadSource::new(
            Input::File(Arc::new(FileInput { source, extents, direct })),
            name,
            Some(size),
            part_sha256,
        ))
    }

    /// Whether the file is read with O_DIRECT.
    #[getter]
    fn direct(&self) -> bool {
        matches!(&self.input, Input::File(input) if input.direct.is_some())
    }

    /// Read a Python binary stream (``readinto`` when it has one, else ``read``).
    #[staticmethod]
    #[pyo3(signature = (stream, *, name = "<stream>".to_string(), part_sha256 = false))]
    fn stream(stream: Bound<'_, PyAny>, name: String, part_sha256: bool) -> PyResult<Self> {
        let readinto = stream.hasattr("readinto")?;
        if !readinto && !stream.hasattr("read")? {
            return Err(PyTypeError::new_err(format!("{name} has neither readinto() nor read()")));
        }
        Ok(UploadSource::new(Input::Stream { stream: stream.unbind(), readinto }, name, None, part_sha256))
    }

    /// The next part, at most ``length`` bytes (fewer only at the end), or None at the end.
    /// ``keep=False`` hashes the part without keeping its bytes (file sources only).
    #[pyo3(signature = (length, *, keep = true))]
    fn next_part(&self, py: Python<'_>, length: u64, keep: bool) -> PyResult<Option<SourcePart>> {
        if length == 0 {
            return Err(PyValueError::new_err("part length must be positive"));
        }
        let mut pass = lock(&self.pass);
        if pass.eof {
            return Ok(None);
        }
        match &self.input {
            Input::File(input) => self.file_part(py, input, &mut pass, length, keep),
            Input::Stream { stream, readinto } => self.stream_part(py, stream, *readinto, &mut pass, length),
        }
    }

    /// Bytes consumed so far.
    #[getter]
    fn position(&self) -> u64 {
        lock(&self.pass).position
    }

    /// The file's size when opened (None for a stream).
    #[getter]
    fn size(&self) -> Option<u64> {
        self.size
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Whether the end of the source was reached.
    #[getter]
    fn exhausted(&self) -> bool {
        let pass = lock(&self.pass);
        pass.eof || self.size.is_some_and(|size| pass.position >= size)
    }

    /// SHA-256 hex of every byte consumed so far, in order.
    fn sha256(&self) -> String {
        hex_digest(&lock(&self.pass).sha)
    }

    /// CRC-64/NVME of every byte consumed so far, in order (S3's FULL_OBJECT checksum).
    fn crc64nvme(&self) -> u64 {
        lock(&self.pass).crc
    }

    fn __repr__(&self) -> String {
        format!("UploadSource({:?}, position={})", self.name, lock(&self.pass).position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    use crate::codec::crc64nvme as crc64;

    #[test]
    fn crc64nvme_matches_the_published_check_value() {
        // The CRC-64/NVME catalogue check value for "123456789".
        assert_eq!(crc64(b"123456789"), 0xae8b_1486_0a79_9888);
    }

    #[test]
    fn file_span_reads_extents_and_zero_fills_holes() {
        let file = tempfile::NamedTempFile::new().expect("temp");
        file.as_file().set_len(64 << 10).expect("len");
        std::os::unix::fs::FileExt::write_all_at(file.as_file(), &[7u8; 4096], 20 << 10).expect("write");
        let source = SourceFile::open(file.path()).expect("open");
        let extents = source.extents().expect("extents");
        let mut buf = vec![0xffu8; 32 << 10];
        assert_eq!(read_file_span(&source, None, &extents, 16 << 10, &mut buf, 32 << 10).expect("read"), 32 << 10);
        assert!(buf[..4 << 10].iter().all(|&b| b == 0));
        assert!(buf[4 << 10..8 << 10].iter().all(|&b| b == 7));
        assert!(buf[8 << 10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn pass_hashes_whole_and_parts_from_the_same_bytes() {
        let mut file = tempfile::NamedTempFile::new().expect("temp");
        let data: Vec<u8> = (0..250_000u32).map(|i| (i * 31 % 251) as u8).collect();
        file.write_all(&data).expect("write");
        let source = SourceFile::open(file.path()).expect("open");
        let extents = source.extents().expect("extents");
        let mut pass = Pass::new();
        for chunk in data.chunks(100_000) {
            let mut buf = vec![0u8; chunk.len()];
            read_file_span(&source, None, &extents, pass.position, &mut buf, chunk.len()).expect("read");
            let (crc, sha) = pass.absorb(&buf, true);
            assert_eq!(crc, crc64(chunk));
            assert_eq!(sha.expect("sha"), to_hex(&Sha256::digest(chunk)));
        }
        assert_eq!(hex_digest(&pass.sha), to_hex(&Sha256::digest(&data)));
        assert_eq!(pass.crc, crc64(&data));
    }

    #[test]
    fn pool_reuses_buffers_of_sufficient_capacity() {
        let pool = BufferPool::default();
        let buf = pool.take(10_000);
        assert!(buf.aligned());
        let ptr = buf.vec.as_ptr();
        pool.give_back(buf);
        let again = pool.take(6_000);
        assert_eq!(again.bytes().len(), 6_000);
        assert_eq!(again.vec.as_ptr(), ptr);
        assert_eq!(pool.take(50_000).bytes().len(), 50_000);
    }

    #[test]
    fn direct_reads_match_cached_reads_including_the_unaligned_tail() {
        // In the crate's own directory: /tmp may be a tmpfs, which refuses O_DIRECT.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let path = dir.path().join("disk.raw");
        let data: Vec<u8> = (0..(3 * ALIGN as u32 + 1234)).map(|i| (i % 251) as u8 ^ 0x5a).collect();
        std::fs::write(&path, &data).expect("write");
        let source = SourceFile::open(&path).expect("open");
        let extents = source.extents().expect("extents");
        let Ok(direct) = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path) else {
            return; // this filesystem has no O_DIRECT: nothing to compare
        };
        let mut buf = AlignedBuf::new(Vec::new(), data.len() - ALIGN);
        let got = read_file_span(&source, Some(&direct), &extents, ALIGN as u64, buf.window(), data.len() - ALIGN)
            .expect("read");
        assert_eq!(got, data.len() - ALIGN);
        assert_eq!(buf.bytes(), &data[ALIGN..]);
    }
}

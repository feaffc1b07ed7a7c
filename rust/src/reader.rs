//! Positioned reads of a source file, and its data extents so holes are neither read nor
//! sent (the upload pass in `source` and the local copy in `copy` read through these).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::aligned::ALIGN;
use crate::error::{CoreError, CoreResult, IoContext};
use crate::sys::{self, Seek};

/// (offset, length) of each data region of `file`, in order, via SEEK_DATA/SEEK_HOLE.
/// A filesystem without hole reporting yields one extent covering the whole file.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let data = match sys::seek(file, pos, Seek::Data) {
            Ok(data) => data,
            Err(err) => match err.raw_os_error() {
                Some(libc::ENXIO) => break, // no data after pos: the rest is a hole
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if pos == 0 => return Ok(vec![(0, size)]),
                _ => return Err(err),
            },
        };
        if data >= size {
            break;
        }
        let hole = sys::seek(file, data, Seek::Hole).map_or(size, |hole| hole.min(size));
        extents.push((data, hole - data));
        pos = hole;
    }
    Ok(extents)
}

/// Read exactly `buf.len()` bytes at `offset`, fewer only at end of file.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

pub fn advise_sequential(file: &File) {
    // Advice only: a filesystem that ignores it reads the same bytes.
    let _ = sys::advise_sequential(file);
}

pub struct SourceFile {
    pub file: File,
    pub path: PathBuf,
    pub size: u64,
}

impl SourceFile {
    pub fn open(path: &Path) -> CoreResult<Self> {
        let file = File::open(path).context(|| format!("opening {}", path.display()))?;
        let meta = file.metadata().context(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            return Err(CoreError::io(
                format!("reading {}", path.display()),
                io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
        advise_sequential(&file);
        Ok(SourceFile { file, path: path.to_path_buf(), size: meta.len() })
    }

    pub fn extents(&self) -> CoreResult<Vec<(u64, u64)>> {
        data_extents(&self.file, self.size).context(|| format!("finding data extents of {}", self.path.display()))
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
pub fn read_file_span(
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
pub fn read_direct_span(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn sparse_file_reports_only_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sparse.raw");
        let mut file = File::create(&path).expect("create");
        file.seek(SeekFrom::Start(8 << 20)).expect("seek");
        file.write_all(&[1u8; 4096]).expect("write");
        file.set_len(32 << 20).expect("extend");
        drop(file);
        let file = File::open(&path).expect("open");
        let extents = data_extents(&file, 32 << 20).expect("extents");
        let data: u64 = extents.iter().map(|e| e.1).sum();
        assert!(data < 1 << 20, "{extents:?}");
        assert!(extents.iter().any(|&(off, len)| off <= 8 << 20 && off + len >= (8 << 20) + 4096));
    }

    #[test]
    fn dense_file_is_one_extent() {
        let mut file = tempfile::NamedTempFile::new().expect("temp");
        file.write_all(&[7u8; 100_000]).expect("write");
        let extents = data_extents(file.as_file(), 100_000).expect("extents");
        assert_eq!(extents, vec![(0, 100_000)]);
    }

    #[test]
    fn read_full_at_stops_at_end_of_file() {
        let mut file = tempfile::NamedTempFile::new().expect("temp");
        file.write_all(b"hello world").expect("write");
        let mut buf = [0u8; 32];
        let n = read_full_at(file.as_file(), &mut buf, 6).expect("read");
        assert_eq!(&buf[..n], b"world");
    }
}

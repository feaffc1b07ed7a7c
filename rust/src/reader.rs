//! Positioned reads of a source file, and its data extents so holes are neither read nor
//! sent (the upload pass in `source` and the local copy in `copy` read through these).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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

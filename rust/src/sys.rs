//! The system calls the core makes that std does not wrap. With `pybuffer` (the Python
//! buffer protocol) this is one of the two modules allowed `unsafe`: lib.rs denies it
//! everywhere else. Each function here is safe to call: it takes a `&File` (an open
//! descriptor for at least as long as the call) or a path, passes no pointer the kernel
//! could keep, and reports failure as the `io::Error` of errno.
//!
//! Why libc and not `rustix`: rustix would make these calls safe by itself, but it has no
//! `sync_file_range`, so libc would stay for that one; five one-line wrappers here cost less
//! than a second system-call crate. File locking needs neither: std's `File::try_lock` is
//! flock(2) on Linux.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// What `seek` looks for from an offset (lseek(2) SEEK_DATA / SEEK_HOLE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seek {
    Data,
    Hole,
}

/// The offset of the next data (or hole) at or after `offset`. ENXIO: no data after it;
/// EINVAL / EOPNOTSUPP: the filesystem does not report holes.
pub fn seek(file: &File, offset: u64, what: Seek) -> io::Result<u64> {
    let whence = match what {
        Seek::Data => libc::SEEK_DATA,
        Seek::Hole => libc::SEEK_HOLE,
    };
    let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek takes a descriptor, open for the duration of the borrow of `file`, and
    // integers; it touches no memory of ours.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(at as u64)
}

/// Tell the kernel the whole file will be read sequentially (larger read-ahead).
pub fn advise_sequential(file: &File) -> io::Result<()> {
    // SAFETY: posix_fadvise takes a valid descriptor and integers; it touches no memory.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    // posix_fadvise returns the error number instead of setting errno.
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// How far `sync_file_range` goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writeback {
    /// Start writing the range's dirty pages, without waiting.
    Start,
    /// Start it and wait until the range is on disk.
    Wait,
}

/// sync_file_range(2) over [offset, offset + len).
pub fn sync_file_range(file: &File, offset: u64, len: u64, how: Writeback) -> io::Result<()> {
    let flags = match how {
        Writeback::Start => libc::SYNC_FILE_RANGE_WRITE,
        Writeback::Wait => {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER
        }
    };
    let overflow = |_| io::Error::from_raw_os_error(libc::EOVERFLOW);
    let (offset, len) =
        (libc::off64_t::try_from(offset).map_err(overflow)?, libc::off64_t::try_from(len).map_err(overflow)?);
    // SAFETY: a valid descriptor and integers; no memory is passed.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// statfs(2) of `path`: its filesystem's magic number (`f_type`).
pub fn filesystem_magic(path: &Path) -> io::Result<i64> {
    let c_path = c_path(path)?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: c_path is NUL-terminated and outlives the call; `stat` is writable memory of
    // the size statfs fills, and is read only after the call succeeded (then it is fully
    // initialised).
    let stat = unsafe {
        if libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        stat.assume_init()
    };
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64, not on every target
    Ok(stat.f_type as i64)
}

/// mkfifo(3), for tests that need a file whose positioned reads fail.
#[cfg(test)]
pub fn mkfifo(path: &Path) -> io::Result<()> {
    let c_path = c_path(path)?;
    // SAFETY: c_path is NUL-terminated and outlives the call.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    #[test]
    fn seek_finds_the_data_and_the_hole_of_a_sparse_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sparse");
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).expect("create");
        file.write_all_at(&[1u8; 4096], 1 << 20).expect("write");
        file.set_len(4 << 20).expect("extend");
        let data = seek(&file, 0, Seek::Data).expect("data");
        // A filesystem without hole reporting says data starts at 0: both are correct.
        assert!(data == 0 || data == 1 << 20, "{data}");
        let hole = seek(&file, data, Seek::Hole).expect("hole");
        assert!(hole > data && hole <= 4 << 20, "{hole}");
        match seek(&file, 4 << 20, Seek::Data) {
            Err(err) => assert_eq!(err.raw_os_error(), Some(libc::ENXIO)),
            Ok(at) => panic!("data past the end at {at}"),
        }
        assert_eq!(seek(&file, u64::MAX, Seek::Data).expect_err("overflow").raw_os_error(), Some(libc::EOVERFLOW));
    }

    #[test]
    fn advice_and_writeback_succeed_on_a_regular_file() {
        let mut file = tempfile::tempfile().expect("temp");
        file.write_all(&[3u8; 65536]).expect("write");
        advise_sequential(&file).expect("fadvise");
        sync_file_range(&file, 0, 65536, Writeback::Start).expect("start");
        sync_file_range(&file, 0, 65536, Writeback::Wait).expect("wait");
    }

    #[test]
    fn statfs_errors_carry_errno() {
        assert_eq!(
            filesystem_magic(Path::new("/no/such/dir")).expect_err("missing").raw_os_error(),
            Some(libc::ENOENT)
        );
        assert_eq!(filesystem_magic(Path::new("a\0b")).expect_err("nul").kind(), io::ErrorKind::InvalidInput);
        assert!(filesystem_magic(Path::new("/")).expect("root") != 0);
    }

    #[test]
    fn mkfifo_makes_a_fifo() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fifo");
        mkfifo(&path).expect("mkfifo");
        assert!(std::fs::metadata(&path).expect("stat").file_type().is_fifo());
        assert_eq!(mkfifo(&path).expect_err("exists").raw_os_error(), Some(libc::EEXIST));
    }

    #[test]
    fn unsafe_is_allowed_in_these_two_modules_only() {
        // lib.rs denies unsafe_code; an `allow` elsewhere would quietly undo that.
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("rust/src");
        let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
        assert!(lib.contains("#![deny(unsafe_code)]"));
        for entry in std::fs::read_dir(&src).expect("src") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if !name.ends_with(".rs") || name == "sys.rs" || name == "pybuffer.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            assert!(!text.contains("allow(unsafe_code)"), "{name} allows unsafe code");
        }
    }
}

//! The one error type of the core and the one place that maps it onto the Python classes
//! defined in `vmstore.errors`.

use std::fmt;
use std::io;
use std::sync::Arc;

use pyo3::exceptions::PyBlockingIOError;
use pyo3::prelude::pyfunction;
use pyo3::PyErr;

pyo3::import_exception!(vmstore.errors, NotFoundError);
pyo3::import_exception!(vmstore.errors, PermissionDeniedError);
pyo3::import_exception!(vmstore.errors, OperationFailedError);
pyo3::import_exception!(vmstore.errors, CancelledError);
pyo3::import_exception!(vmstore.errors, ChecksumMismatchError);
pyo3::import_exception!(vmstore.errors, InvalidConfigError);
pyo3::import_exception!(vmstore.errors, NetworkError);

#[derive(Debug)]
pub enum CoreError {
    /// A system call failed; `context` says what was being done to which path.
    Io {
        context: String,
        source: io::Error,
    },
    /// The caller's cancel token was set.
    Cancelled,
    /// The bytes' SHA-256 is not the one expected.
    ChecksumMismatch {
        context: String,
        expected: String,
        actual: String,
    },
    /// Another writer holds the temp file's lock.
    Locked(String),
    InvalidArgument(String),
    /// An exception raised by Python code the core called (a progress callback, a signal, a
    /// stream sink). Shared, so a failure kept for later callers re-raises the same exception
    /// (cause included) without taking the GIL to copy it.
    Python(Arc<PyErr>),
}

pub type CoreResult<T> = Result<T, CoreError>;

impl CoreError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        CoreError::Io { context: context.into(), source }
    }
}

/// Attach "what was being done" to an `io::Result`.
pub trait IoContext<T> {
    fn context<F: FnOnce() -> String>(self, what: F) -> CoreResult<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context<F: FnOnce() -> String>(self, what: F) -> CoreResult<T> {
        self.map_err(|source| CoreError::Io { context: what(), source })
    }
}

impl From<PyErr> for CoreError {
    fn from(err: PyErr) -> Self {
        CoreError::Python(Arc::new(err))
    }
}

/// What kind of failure an I/O error is, by the question a user would ask about it.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum IoClass {
    NotFound,
    PermissionDenied,
    NoSpace,
    /// An NFS server that went away shows up as these, not as socket errors.
    Network,
    /// A path that cannot work as given (a directory where a file is needed, too long).
    InvalidPath,
    Other,
}

impl IoClass {
    /// The `vmstore.errors` class an error of this kind is raised as.
    pub fn class_name(self) -> &'static str {
        match self {
            IoClass::NotFound => "NotFoundError",
            IoClass::PermissionDenied => "PermissionDeniedError",
            IoClass::Network => "NetworkError",
            IoClass::InvalidPath => "InvalidConfigError",
            IoClass::NoSpace | IoClass::Other => "OperationFailedError",
        }
    }
}

/// THE errno table of vmstore: every errno not listed is `Other` (OperationFailedError).
/// `vmstore/_oserrors.py` maps the OSErrors Python raises itself with a copy of it, and
/// tests/test_errors.py checks, errno by errno, that the two agree (through `errno_classes`).
pub const ERRNO_TABLE: &[(i32, IoClass)] = &[
    (libc::ENOENT, IoClass::NotFound),
    // A path component that is a file, not a directory: the path cannot exist.
    (libc::ENOTDIR, IoClass::NotFound),
    (libc::EACCES, IoClass::PermissionDenied),
    (libc::EPERM, IoClass::PermissionDenied),
    (libc::EROFS, IoClass::PermissionDenied),
    (libc::ENOSPC, IoClass::NoSpace),
    (libc::EDQUOT, IoClass::NoSpace),
    (libc::EFBIG, IoClass::NoSpace),
    // An NFS server that went away shows up as these rather than as socket errors.
    (libc::ESTALE, IoClass::Network),
    (libc::ETIMEDOUT, IoClass::Network),
    (libc::EHOSTDOWN, IoClass::Network),
    (libc::EHOSTUNREACH, IoClass::Network),
    (libc::ENETUNREACH, IoClass::Network),
    (libc::ENETDOWN, IoClass::Network),
    (libc::ECONNREFUSED, IoClass::Network),
    (libc::ECONNRESET, IoClass::Network),
    (libc::ECONNABORTED, IoClass::Network),
    (libc::ENOTCONN, IoClass::Network),
    (libc::EISDIR, IoClass::InvalidPath),
    (libc::ENAMETOOLONG, IoClass::InvalidPath),
    (libc::ELOOP, IoClass::InvalidPath),
    // open() of a socket file, or of a device without a driver.
    (libc::ENXIO, IoClass::InvalidPath),
];

pub fn classify(err: &io::Error) -> IoClass {
    if let Some(code) = err.raw_os_error() {
        return classify_errno(code);
    }
    // Errors made by std or by this crate, not by a system call.
    match err.kind() {
        io::ErrorKind::NotFound => IoClass::NotFound,
        io::ErrorKind::PermissionDenied => IoClass::PermissionDenied,
        // A path with a NUL byte, which no system call can take.
        io::ErrorKind::InvalidInput => IoClass::InvalidPath,
        _ => IoClass::Other,
    }
}

pub fn classify_errno(code: i32) -> IoClass {
    ERRNO_TABLE.iter().find(|(errno, _)| *errno == code).map_or(IoClass::Other, |(_, class)| *class)
}

/// `[(errno, class name)]` for every errno the table lists, so Python can check that its
/// mapping of OSError agrees with the core's. Registered in lib.rs as `errno_classes`.
#[pyfunction]
pub fn errno_classes() -> Vec<(i32, &'static str)> {
    ERRNO_TABLE.iter().map(|(errno, class)| (*errno, class.class_name())).collect()
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::Io { context, source } => {
                let hint = match classify(source) {
                    IoClass::NotFound => "",
                    IoClass::Network => " (the file server did not answer; check the mount, then retry)",
                    IoClass::PermissionDenied => {
                        " (check the path's permissions and that the filesystem is mounted read-write)"
                    }
                    IoClass::NoSpace => {
                        " (free space on the destination filesystem, then retry: the partial file was removed)"
                    }
                    IoClass::InvalidPath => " (give the path of a regular file)",
                    IoClass::Other => "",
                };
                write!(f, "{context}: {source}{hint}")
            }
            CoreError::Cancelled => write!(f, "transfer cancelled"),
            CoreError::ChecksumMismatch { context, expected, actual } => {
                write!(f, "{context}: SHA-256 mismatch: expected {expected}, got {actual}")
            }
            CoreError::Locked(path) => write!(f, "{path} is locked by another writer"),
            CoreError::InvalidArgument(msg) => write!(f, "{msg}"),
            CoreError::Python(err) => write!(f, "{err}"),
        }
    }
}

impl std::error::Error for CoreError {}

impl From<CoreError> for PyErr {
    fn from(err: CoreError) -> PyErr {
        let message = err.to_string();
        match err {
            CoreError::Io { source, .. } => match classify(&source) {
                IoClass::NotFound => NotFoundError::new_err(message),
                IoClass::PermissionDenied => PermissionDeniedError::new_err(message),
                IoClass::Network => NetworkError::new_err(message),
                IoClass::InvalidPath => InvalidConfigError::new_err(message),
                IoClass::NoSpace | IoClass::Other => OperationFailedError::new_err(message),
            },
            CoreError::Cancelled => CancelledError::new_err(message),
            CoreError::ChecksumMismatch { .. } => ChecksumMismatchError::new_err(message),
            CoreError::Locked(_) => PyBlockingIOError::new_err(message),
            CoreError::InvalidArgument(_) => InvalidConfigError::new_err(message),
            CoreError::Python(err) => {
                Arc::try_unwrap(err).unwrap_or_else(|shared| pyo3::Python::attach(|py| shared.clone_ref(py)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_errno_values() {
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::ENOENT)), IoClass::NotFound);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EROFS)), IoClass::PermissionDenied);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EACCES)), IoClass::PermissionDenied);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::ENOSPC)), IoClass::NoSpace);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EDQUOT)), IoClass::NoSpace);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::ESTALE)), IoClass::Network);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EIO)), IoClass::Other);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::ECONNRESET)), IoClass::Network);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EISDIR)), IoClass::InvalidPath);
        // EINVAL from a system call is not a bad path: only std's own InvalidInput is.
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EINVAL)), IoClass::Other);
        assert_eq!(classify(&io::Error::new(io::ErrorKind::InvalidInput, "nul")), IoClass::InvalidPath);
    }

    #[test]
    fn every_errno_is_listed_once() {
        let mut seen = std::collections::HashSet::new();
        for (errno, _) in ERRNO_TABLE {
            assert!(seen.insert(*errno), "errno {errno} is listed twice");
        }
        assert_eq!(errno_classes().len(), ERRNO_TABLE.len());
    }

    #[test]
    fn message_names_context_and_hint() {
        let err = CoreError::io("writing /x/y", io::Error::from_raw_os_error(libc::ENOSPC));
        let text = err.to_string();
        assert!(text.starts_with("writing /x/y: "), "{text}");
        assert!(text.contains("free space"), "{text}");
    }
}

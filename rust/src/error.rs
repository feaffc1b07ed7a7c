//! The one error type of the core and the one place that maps it onto the Python classes
//! defined in `vmstore.errors`.

use std::fmt;
use std::io;

use pyo3::exceptions::PyBlockingIOError;
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
    Io { context: String, source: io::Error },
    /// The caller's cancel token was set.
    Cancelled,
    /// The bytes' SHA-256 is not the one expected.
    ChecksumMismatch { context: String, expected: String, actual: String },
    /// Another writer holds the temp file's lock.
    Locked(String),
    InvalidArgument(String),
    /// An exception raised by Python code the core called (a progress callback, a signal).
    Python(PyErr),
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
        CoreError::Python(err)
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
    Other,
}

pub fn classify(err: &io::Error) -> IoClass {
    if let Some(code) = err.raw_os_error() {
        match code {
            libc::ENOENT | libc::ENOTDIR => return IoClass::NotFound,
            libc::EACCES | libc::EPERM | libc::EROFS => return IoClass::PermissionDenied,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => return IoClass::NoSpace,
            libc::ESTALE | libc::ETIMEDOUT | libc::EHOSTDOWN | libc::EHOSTUNREACH | libc::ENETUNREACH => {
                return IoClass::Network
            }
            _ => {}
        }
    }
    match err.kind() {
        io::ErrorKind::NotFound => IoClass::NotFound,
        io::ErrorKind::PermissionDenied => IoClass::PermissionDenied,
        _ => IoClass::Other,
    }
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::Io { context, source } => {
                let hint = match classify(source) {
                    IoClass::NotFound => "",
                    IoClass::Network => " (the file server did not answer; check the mount, then retry)",
                    IoClass::PermissionDenied => " (check the path's permissions and that the filesystem is mounted read-write)",
                    IoClass::NoSpace => " (free space on the destination filesystem, then retry: the partial file was removed)",
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
                IoClass::NoSpace | IoClass::Other => OperationFailedError::new_err(message),
            },
            CoreError::Cancelled => CancelledError::new_err(message),
            CoreError::ChecksumMismatch { .. } => ChecksumMismatchError::new_err(message),
            CoreError::Locked(_) => PyBlockingIOError::new_err(message),
            CoreError::InvalidArgument(_) => InvalidConfigError::new_err(message),
            CoreError::Python(err) => err,
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
    }

    #[test]
    fn message_names_context_and_hint() {
        let err = CoreError::io("writing /x/y", io::Error::from_raw_os_error(libc::ENOSPC));
        let text = err.to_string();
        assert!(text.starts_with("writing /x/y: "), "{text}");
        assert!(text.contains("free space"), "{text}");
    }
}

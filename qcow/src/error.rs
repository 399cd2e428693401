//! Typed errors of the QCOW2 crate.
//!
//! Every error that comes from a file names the file; every format error names
//! the field or table at fault, so that a person reading the message knows what
//! is wrong and where.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors returned by this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on a named file.
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid QCOW2 image, or a structure in it is damaged.
    #[error("{path}: invalid qcow2 {field}: {detail}")]
    Format {
        path: PathBuf,
        field: &'static str,
        detail: String,
    },
    /// The image is valid but uses a feature this implementation does not support
    /// (for the requested access mode).
    #[error("{path}: unsupported: {detail}")]
    Unsupported { path: PathBuf, detail: String },
    /// A backing file was refused by the chain gate.
    #[error("{path}: backing file {backing:?} refused: {reason}")]
    BackingRefused {
        path: PathBuf,
        backing: String,
        reason: String,
    },
    /// A request addressed bytes outside the virtual disk.
    #[error("{path}: request {offset}+{len} is beyond the end of the virtual disk ({size} bytes)")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A write was attempted on an image opened read-only.
    #[error("{path}: image is opened read-only")]
    ReadOnly { path: PathBuf },
    /// Invalid arguments from the caller (for example a cluster size that is not a power of two).
    #[error("{0}")]
    InvalidArgument(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }

    pub(crate) fn format(
        path: impl Into<PathBuf>,
        field: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Error::Format {
            path: path.into(),
            field,
            detail: detail.into(),
        }
    }

    pub(crate) fn unsupported(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.into(),
            detail: detail.into(),
        }
    }

    /// The errno class of this error, for protocol layers that must answer with one
    /// (NBD replies carry an errno). Format errors map to EIO, range errors to EINVAL.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::OutOfRange { .. } | Error::InvalidArgument(_) => libc::EINVAL,
            Error::ReadOnly { .. } => libc::EPERM,
            Error::Unsupported { .. } => libc::ENOTSUP,
            Error::Format { .. } | Error::BackingRefused { .. } => libc::EIO,
        }
    }
}

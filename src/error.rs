//! The error type of the filesystem core: every failure carries its context and the errno
//! it becomes at the FUSE boundary. Everything above the core uses `anyhow` with context.

use std::io;

/// A failure of a filesystem operation, with the errno the kernel should see.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {}", errno_name(*.errno))]
pub struct FsError {
    pub errno: libc::c_int,
    pub context: String,
    #[source]
    pub source: Option<io::Error>,
}

impl FsError {
    pub fn new(errno: libc::c_int, context: impl Into<String>) -> Self {
        Self { errno, context: context.into(), source: None }
    }

    /// Wraps an I/O error, keeping its errno (EIO when it has none).
    pub fn io(source: io::Error, context: impl Into<String>) -> Self {
        Self {
            errno: source.raw_os_error().unwrap_or(libc::EIO),
            context: context.into(),
            source: Some(source),
        }
    }

    pub fn not_found(context: impl Into<String>) -> Self {
        Self::new(libc::ENOENT, context)
    }

    pub fn read_only(context: impl Into<String>) -> Self {
        Self::new(libc::EROFS, context)
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// The symbolic name of an errno, for logs and docs ("ENOENT").
pub fn errno_name(errno: libc::c_int) -> &'static str {
    match errno {
        libc::ENOENT => "ENOENT",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EROFS => "EROFS",
        libc::EINVAL => "EINVAL",
        libc::EIO => "EIO",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::ESTALE => "ESTALE",
        libc::EBADF => "EBADF",
        libc::ENOSYS => "ENOSYS",
        libc::EFBIG => "EFBIG",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::EBUSY => "EBUSY",
        libc::ENODATA => "ENODATA",
        _ => "errno",
    }
}

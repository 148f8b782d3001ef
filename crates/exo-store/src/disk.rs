//! Positional reads and writes, atomic replacement, and free disk space, on every OS we run on.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes all of `bytes` at `offset` of `file` (no shared cursor: chunks from several peers are
/// written at once).
pub(crate) fn write_at(file: &File, path: &Path, bytes: &[u8], offset: u64) -> Result<()> {
    #[cfg(unix)]
    let written = std::os::unix::fs::FileExt::write_all_at(file, bytes, offset);
    #[cfg(windows)]
    let written = windows_all(bytes.len(), std::io::ErrorKind::WriteZero, |done| {
        std::os::windows::fs::FileExt::seek_write(file, &bytes[done..], offset + done as u64)
    });
    written.map_err(|e| Error::io(path, e))
}

/// Reads exactly `buffer.len()` bytes at `offset` of `file`.
pub(crate) fn read_at(file: &File, path: &Path, buffer: &mut [u8], offset: u64) -> Result<()> {
    #[cfg(unix)]
    let read = std::os::unix::fs::FileExt::read_exact_at(file, buffer, offset);
    #[cfg(windows)]
    let read = windows_all(buffer.len(), std::io::ErrorKind::UnexpectedEof, |done| {
        std::os::windows::fs::FileExt::seek_read(file, &mut buffer[done..], offset + done as u64)
    });
    read.map_err(|e| Error::io(path, e))
}

/// Repeats a positional read or write (`step(done)` moves bytes from `done` on) until `len`
/// bytes moved: Windows has no `*_all_at`. A step that moves nothing is `short`.
#[cfg(windows)]
fn windows_all(
    len: usize,
    short: std::io::ErrorKind,
    mut step: impl FnMut(usize) -> std::io::Result<usize>,
) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
        match step(done) {
            Ok(0) => return Err(short.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Replaces `path` with `bytes` so that a reader (or a restart after a crash) sees the old
/// content or the new, never a mix: written beside it, synced, then renamed over it.
pub(crate) fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = path.with_extension("partial");
    {
        use std::io::Write;
        let mut file = File::create(&temporary).map_err(|e| Error::io(&temporary, e))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(&temporary, e))?;
    }
    std::fs::rename(&temporary, path).map_err(|e| Error::io(path, e))
}

/// Frees the disk space of `len` bytes at `offset` of `file`, which then read as zeros, where
/// the OS can (Linux: a punched hole). `Ok(false)` where it cannot: the bytes stay.
pub(crate) fn punch_hole(file: &File, path: &Path, offset: u64, len: u64) -> Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(at), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Ok(false);
        };
        // SAFETY: `file` is open for writing and stays open during the call; the call only
        // changes the file's allocation, never memory of ours.
        let done = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at,
                length,
            )
        };
        if done != 0 {
            return Err(Error::io(path, std::io::Error::last_os_error()));
        }
        Ok(true)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, path, offset, len);
        Ok(false)
    }
}

/// Bytes free for this user on the file system holding `path`, when the OS says.
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        let mut stats = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: `c_path` is a NUL-terminated path and `stats` points to writable memory of
        // the size `statvfs` fills; it is read only when the call succeeded.
        let done = unsafe { libc::statvfs(c_path.as_ptr(), stats.as_mut_ptr()) };
        if done != 0 {
            return None;
        }
        // SAFETY: `statvfs` returned 0, so it filled the whole structure.
        let stats = unsafe { stats.assume_init() };
        #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
        Some((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

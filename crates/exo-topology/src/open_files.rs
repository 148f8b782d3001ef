//! This process's limit on open files, raised at start-up so that a node's many connections
//! (HTTP clients, shard links, peers) do not run out of file descriptors at a low default.
//!
//! Many systems start a process with a soft limit of 1,024 and a much higher hard limit; the
//! soft limit may be raised up to the hard one without privileges.

/// The soft limit on open files before and after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit now.
    pub after: u64,
}

/// Raises this process's soft limit on open files to its hard limit (on macOS at most
/// `OPEN_MAX`, which the kernel holds a process to whatever the hard limit says). `Ok(None)`
/// where the platform has no such limit (Windows).
#[cfg(unix)]
pub fn raise_open_file_limit() -> std::io::Result<Option<OpenFileLimit>> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` only writes the `rlimit` it is given, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    let mut wanted = limit.rlim_max;
    if cfg!(target_os = "macos") {
        wanted = wanted.min(MACOS_OPEN_MAX);
    }
    if wanted <= before {
        return Ok(Some(OpenFileLimit {
            before: to_u64(before),
            after: to_u64(before),
        }));
    }
    limit.rlim_cur = wanted;
    // SAFETY: `setrlimit` only reads the `rlimit` it is given, which lives for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some(OpenFileLimit {
        before: to_u64(before),
        after: to_u64(wanted),
    }))
}

/// Raises this process's soft limit on open files; Windows has no such limit.
#[cfg(not(unix))]
pub fn raise_open_file_limit() -> std::io::Result<Option<OpenFileLimit>> {
    Ok(None)
}

/// [`raise_open_file_limit`] as a binary calls it at start, before anything opens a socket:
/// what happened is logged at debug, and a failure only logged (the process runs on at the
/// limit it has).
pub fn raise_open_file_limit_at_start() {
    match raise_open_file_limit() {
        Ok(Some(limit)) => tracing::debug!(
            before = limit.before,
            after = limit.after,
            "soft limit on open files"
        ),
        Ok(None) => {}
        Err(error) => tracing::debug!(%error, "could not raise the soft limit on open files"),
    }
}

/// macOS's `OPEN_MAX`: `setrlimit` refuses a higher soft limit on open files.
#[cfg(unix)]
const MACOS_OPEN_MAX: libc::rlim_t = 10_240;

/// `rlim_t` is `u64` on Linux and macOS and may be narrower or signed elsewhere.
#[cfg(unix)]
#[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
fn to_u64(value: libc::rlim_t) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

#[cfg(all(test, unix))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit_and_raising_again_changes_nothing() {
        let first = raise_open_file_limit().unwrap().unwrap();
        assert!(first.after >= first.before, "{first:?}");
        let second = raise_open_file_limit().unwrap().unwrap();
        assert_eq!(second.before, first.after);
        assert_eq!(second.after, first.after);
    }
}

//! The open-files limit, which bounds how many clients one process can hold.
//!
//! Many systems start services with a soft limit of 1024 files and a much higher hard limit.
//! echod raises the soft limit to the hard one at start (as the Go runtime and most servers
//! do), and by default sets `--max-connections` just below it, so that echod reaches its own
//! limit, which queues newcomers, before the kernel's, which fails accepts.

/// Files kept in reserve below the open-files limit for listeners, the metrics endpoint,
/// logs, and the runtime's own descriptors.
pub const RESERVED_FILES: u64 = 128;

/// Below this many connections the default limit is worth a warning: the open-files limit leaves
/// almost nothing for clients.
pub const FEW_CONNECTIONS: usize = 256;

/// Connection limit used when `--max-connections` is not given on a system without an
/// open-files limit (Windows).
pub const DEFAULT_MAX_CONNECTIONS_UNLIMITED: usize = 100_000;

/// Raises the soft open-files limit to the hard limit; returns the soft limit now in force.
#[cfg(unix)]
pub fn raise_open_files_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        #[allow(clippy::unnecessary_cast, reason = "rlim_t is not u64 on every Unix")]
        Some(limit.rlim_cur as u64)
    }
}

/// Windows has no per-process open-files limit to raise.
#[cfg(not(unix))]
pub fn raise_open_files_limit() -> Option<u64> {
    None
}

/// The default connection limit for an open-files limit.
pub fn default_max_connections(open_files: Option<u64>) -> usize {
    match open_files {
        Some(files) if files < 1 << 40 => files.saturating_sub(RESERVED_FILES).max(1) as usize,
        _ => DEFAULT_MAX_CONNECTIONS_UNLIMITED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limit_leaves_a_reserve() {
        assert_eq!(default_max_connections(Some(20_000)), 20_000 - RESERVED_FILES as usize);
        assert_eq!(default_max_connections(Some(64)), 1);
        assert_eq!(default_max_connections(None), DEFAULT_MAX_CONNECTIONS_UNLIMITED);
        assert_eq!(default_max_connections(Some(u64::MAX)), DEFAULT_MAX_CONNECTIONS_UNLIMITED);
    }
}

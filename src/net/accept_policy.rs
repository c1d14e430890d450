//! What the accept loop does when `accept()` fails. The whole policy lives here.
//!
//! An accept error never ends the server. Errors fall in two groups:
//!
//! * **the connection's own**: the client gave up between the handshake and our accept
//!   (`ECONNABORTED`, `ECONNRESET`, `EPROTO`, `EINTR`). Nothing is wrong with the server; accept
//!   again at once.
//! * **everything else**: out of file descriptors (`EMFILE`, `ENFILE`), socket buffers
//!   (`ENOBUFS`) or memory (`ENOMEM`); a security module or firewall refusing the accept
//!   (`EPERM`, which may repeat for every pending connection); anything unknown. Accepting again
//!   at once may fail again at once: the pending connection stays queued and the listener stays
//!   readable, so a naive loop spins a core. Instead back off, starting at [`MIN_BACKOFF`] and
//!   doubling up to [`MAX_BACKOFF`], until an accept succeeds; the log says so at most once per
//!   [`LOG_EVERY`], with the number of errors in between.

use std::io;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

pub const MIN_BACKOFF: Duration = Duration::from_millis(5);
pub const MAX_BACKOFF: Duration = Duration::from_millis(500);
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// The `kind` label of `echod_accept_errors_total`.
pub fn kind(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted => {
            return "connection_aborted"
        }
        io::ErrorKind::OutOfMemory => return "out_of_memory",
        io::ErrorKind::PermissionDenied => return "permission_denied",
        _ => {}
    }
    match err.raw_os_error() {
        Some(code) if os::TOO_MANY_FILES.contains(&code) => "too_many_open_files",
        Some(code) if os::NO_BUFFERS.contains(&code) => "no_buffers",
        Some(code) if os::NO_MEMORY.contains(&code) => "out_of_memory",
        Some(code) if os::PERMISSION.contains(&code) => "permission_denied",
        Some(code) if os::CONNECTION.contains(&code) => "connection_aborted",
        _ => "other",
    }
}

/// Per-listener state of the policy: the current backoff and the log's rate limit.
#[derive(Debug)]
pub struct AcceptPolicy {
    listener: String,
    backoff: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl AcceptPolicy {
    /// The policy of one listener, named in its log lines as `listener`.
    pub fn new(listener: impl Into<String>) -> AcceptPolicy {
        let listener = listener.into();
        AcceptPolicy { listener, backoff: MIN_BACKOFF, last_log: None, suppressed: 0 }
    }

    /// An accept succeeded: resources are back, so the next failure starts a fresh backoff.
    pub fn on_success(&mut self) {
        self.backoff = MIN_BACKOFF;
    }

    /// An accept failed: returns how long to pause before accepting again (`None`: at once).
    pub fn on_error(&mut self, err: &io::Error) -> Option<Duration> {
        let kind = kind(err);
        if kind == "connection_aborted" {
            return None;
        }
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        let now = Instant::now();
        if self.last_log.is_none_or(|at| now.duration_since(at) >= LOG_EVERY) {
            warn!(
                listener = %self.listener,
                error = %err,
                kind,
                suppressed = self.suppressed,
                backoff = ?pause,
                "accept failed; backing off until resources return"
            );
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        Some(pause)
    }
}

#[cfg(unix)]
mod os {
    pub const TOO_MANY_FILES: [i32; 2] = [libc::EMFILE, libc::ENFILE];
    pub const NO_BUFFERS: [i32; 1] = [libc::ENOBUFS];
    pub const NO_MEMORY: [i32; 1] = [libc::ENOMEM];
    pub const PERMISSION: [i32; 2] = [libc::EPERM, libc::EACCES];
    pub const CONNECTION: [i32; 4] = [libc::ECONNABORTED, libc::ECONNRESET, libc::EPROTO, libc::EINTR];
}

#[cfg(windows)]
mod os {
    // Winsock error codes (winerror.h): WSAEMFILE, WSAENOBUFS, WSAECONNABORTED, WSAECONNRESET,
    // WSAEINTR; ERROR_NOT_ENOUGH_MEMORY and ERROR_OUTOFMEMORY.
    pub const TOO_MANY_FILES: [i32; 1] = [10024];
    pub const NO_BUFFERS: [i32; 1] = [10055];
    pub const NO_MEMORY: [i32; 2] = [8, 14];
    // WSAEACCES.
    pub const PERMISSION: [i32; 1] = [10013];
    pub const CONNECTION: [i32; 3] = [10053, 10054, 10004];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_errors_retry_at_once() {
        let mut policy = AcceptPolicy::new("127.0.0.1:1");
        let err = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(kind(&err), "connection_aborted");
        assert_eq!(policy.on_error(&err), None);
    }

    #[cfg(unix)]
    #[test]
    fn resource_errors_back_off_doubling_to_a_cap_and_reset_on_success() {
        let mut policy = AcceptPolicy::new("127.0.0.1:1");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(kind(&emfile), "too_many_open_files");
        assert_eq!(kind(&io::Error::from_raw_os_error(libc::ENOBUFS)), "no_buffers");
        let pauses: Vec<_> = (0..10).map(|_| policy.on_error(&emfile).unwrap()).collect();
        assert_eq!(pauses[0], MIN_BACKOFF);
        assert_eq!(pauses[1], MIN_BACKOFF * 2);
        assert_eq!(*pauses.last().unwrap(), MAX_BACKOFF);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        policy.on_success();
        assert_eq!(policy.on_error(&emfile), Some(MIN_BACKOFF));
    }

    #[cfg(unix)]
    #[test]
    fn a_refused_accept_backs_off_instead_of_spinning() {
        let mut policy = AcceptPolicy::new("127.0.0.1:1");
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(kind(&eperm), "permission_denied");
        assert_eq!(policy.on_error(&eperm), Some(MIN_BACKOFF));
        assert_eq!(policy.on_error(&eperm), Some(MIN_BACKOFF * 2));
    }

    #[test]
    fn unknown_errors_back_off() {
        let mut policy = AcceptPolicy::new("127.0.0.1:1");
        let err = io::Error::other("mystery");
        assert_eq!(kind(&err), "other");
        assert_eq!(policy.on_error(&err), Some(MIN_BACKOFF));
    }
}

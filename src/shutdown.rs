//! Turns the platform's stop requests into one drain signal.
//!
//! * Unix: SIGINT (ctrl-c in a terminal) and SIGTERM (what `kill`, containers, Kubernetes and
//!   systemd send).
//! * Windows: the console control events ctrl-c, ctrl-break, ctrl-close (the console window is
//!   closing) and ctrl-shutdown (the system is shutting down). Windows ends the process soon after
//!   ctrl-close or ctrl-shutdown is delivered (about 5 s for close; the system's timeout for
//!   shutdown), so a long drain is cut short there: that is the platform's rule.
//!
//! The first request starts the drain. A second one means "now": the caller exits at once with
//! [`Signal::forced_exit_code`].
//!
//! Handlers are installed by [`Signals::install`], before the listeners are bound, so a stop
//! request that arrives during start-up is not lost to the default action.
//!
//! SIGHUP is no stop request: it asks for the TLS files to be read again ([`ReloadRequests`],
//! installed only when echod serves TLS; Windows has no equivalent, and there the files are
//! only checked for changes).

use std::io;

/// A stop request from the operating system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT, or ctrl-c on Windows.
    Interrupt,
    /// SIGTERM.
    Terminate,
    /// Windows ctrl-break.
    Break,
    /// Windows ctrl-close.
    Close,
    /// Windows ctrl-shutdown.
    Shutdown,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
            Signal::Break => "CTRL_BREAK",
            Signal::Close => "CTRL_CLOSE",
            Signal::Shutdown => "CTRL_SHUTDOWN",
        }
    }

    /// Exit status when a second request forces an immediate exit: 128 + the signal number, as
    /// shells report a process killed by that signal (130 for SIGINT, 143 for SIGTERM).
    pub fn forced_exit_code(self) -> i32 {
        match self {
            Signal::Terminate => 143,
            _ => 130,
        }
    }
}

/// The installed handlers; [`Signals::recv`] waits for the next request.
pub struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(windows)]
    ctrl_c: tokio::signal::windows::CtrlC,
    #[cfg(windows)]
    ctrl_break: tokio::signal::windows::CtrlBreak,
    #[cfg(windows)]
    ctrl_close: tokio::signal::windows::CtrlClose,
    #[cfg(windows)]
    ctrl_shutdown: tokio::signal::windows::CtrlShutdown,
}

impl Signals {
    /// Installs the handlers. Must be called within a tokio runtime.
    pub fn install() -> io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(windows)]
        {
            use tokio::signal::windows;
            Ok(Signals {
                ctrl_c: windows::ctrl_c()?,
                ctrl_break: windows::ctrl_break()?,
                ctrl_close: windows::ctrl_close()?,
                ctrl_shutdown: windows::ctrl_shutdown()?,
            })
        }
    }

    /// Waits for the next stop request.
    pub async fn recv(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => Signal::Interrupt,
                _ = self.terminate.recv() => Signal::Terminate,
            }
        }
        #[cfg(windows)]
        {
            tokio::select! {
                _ = self.ctrl_c.recv() => Signal::Interrupt,
                _ = self.ctrl_break.recv() => Signal::Break,
                _ = self.ctrl_close.recv() => Signal::Close,
                _ = self.ctrl_shutdown.recv() => Signal::Shutdown,
            }
        }
    }
}

/// Requests to reload the TLS files: SIGHUP on Unix; none on Windows.
pub struct ReloadRequests {
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl ReloadRequests {
    /// Installs the SIGHUP handler. Must be called within a tokio runtime.
    pub fn install() -> io::Result<ReloadRequests> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(ReloadRequests { hangup: signal(SignalKind::hangup())? })
        }
        #[cfg(not(unix))]
        {
            Ok(ReloadRequests {})
        }
    }

    /// Waits for the next request; `false` once no more can come.
    pub async fn recv(&mut self) -> bool {
        #[cfg(unix)]
        {
            self.hangup.recv().await.is_some()
        }
        #[cfg(not(unix))]
        {
            std::future::pending::<bool>().await
        }
    }
}

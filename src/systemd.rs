//! systemd integration: socket activation and readiness notification. No-ops elsewhere.
//!
//! * **Socket activation** (`LISTEN_PID`/`LISTEN_FDS`, see `sd_listen_fds(3)`): systemd binds the
//!   ports, even privileged ones such as RFC 862's port 7, and keeps them open while echod
//!   restarts or upgrades, so no connect is refused in between. Every passed socket becomes an
//!   echo listener.
//! * **Notification** (`NOTIFY_SOCKET`, see `sd_notify(3)`): with `Type=notify`, systemd learns
//!   that echod is ready once every listener is bound, and that it is stopping when the drain
//!   begins.

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::Error;

/// Listening sockets passed by systemd socket activation, if any. They are adopted at most
/// once per process: a second call (a second server in the same process) gets none, rather than
/// wrapping descriptors another socket already owns.
#[cfg(unix)]
pub fn inherited_listeners() -> Result<Vec<(SocketAddr, TcpListener)>, Error> {
    use socket2::{Socket, Type};
    use std::io;
    use std::os::fd::FromRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};

    static ADOPTED: AtomicBool = AtomicBool::new(false);
    if ADOPTED.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let fds = sd_notify::listen_fds().map_err(|e| Error::SocketActivation(e.to_string()))?;
    fds.map(|fd| {
        // SAFETY: LISTEN_PID names this process, so systemd passed these descriptors to it, open;
        // nothing else in the process owns them, and each is wrapped exactly once.
        let socket = unsafe { Socket::from_raw_fd(fd) };
        let adopt = || -> io::Result<(SocketAddr, TcpListener)> {
            if socket.r#type()? != Type::STREAM {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a stream socket"));
            }
            let addr = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))?;
            socket.set_nonblocking(true)?;
            Ok((addr, TcpListener::from_std(socket.into())?))
        };
        adopt().map_err(|e| Error::SocketActivation(format!("file descriptor {fd}: {e}")))
    })
    .collect()
}

/// Socket activation is a systemd feature: elsewhere no listener is ever passed.
#[cfg(not(unix))]
pub fn inherited_listeners() -> Result<Vec<(SocketAddr, TcpListener)>, Error> {
    Ok(Vec::new())
}

/// Tells systemd the service is ready (every listener bound), if it is watching.
pub fn notify_ready() {
    #[cfg(unix)]
    notify(&[sd_notify::NotifyState::Ready]);
}

/// Tells systemd the service is stopping (the drain began), if it is watching.
pub fn notify_stopping() {
    #[cfg(unix)]
    notify(&[sd_notify::NotifyState::Stopping]);
}

#[cfg(unix)]
fn notify(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(err) = sd_notify::notify(state) {
        tracing::warn!(error = %err, "could not notify systemd");
    }
}

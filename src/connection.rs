//! One client's echo, from the moment its stages are done to the close, as one future; and the
//! accounting that records every connection's end exactly once, whichever way it ends.
//!
//! # Phases: no buffers while idle, bigger buffers for bulk traffic
//!
//! `copy_bidirectional` allocates (and zero-fills) its buffers as soon as it first runs and holds
//! them until it ends, so a literal "one copy per connection" pins two buffers and a loop for every
//! idle client. The IOCP servers echod descends from posted zero-byte receives for the same reason.
//! Here a connection alternates between two phases:
//!
//! 1. **waiting**: no buffers; the task sleeps on the stream's readiness (and the idle deadline,
//!    and the drain);
//! 2. **copying** ([`crate::echo::copy`]): a `copy_bidirectional_with_sizes` runs with buffers of
//!    the current size.
//!
//! A copy phase ends early only at a point where doing so loses nothing: when every byte received
//! has also been sent (and flushed), both copy buffers and the loop are empty. These end it
//! there:
//!
//! * the moment everything is echoed and nothing waits to be read, for a connection that is not
//!   in a dialogue (its previous phase went quiet more than a tick ago, or it has none): a client
//!   that echoes once and falls silent holds its buffers for microseconds, not a second;
//! * a once-a-tick check that finds no traffic since the previous tick and nothing left to read:
//!   the buffers are freed, the next phase starts small again, and the connection waits;
//! * during a drain, the moment the phase has nothing in flight: the connection then closes;
//! * a read that filled the whole buffer (the client sends faster than one buffer per read): the
//!   metered reader stops the copy at the next balanced read, and the next phase runs at once with
//!   buffers four times larger, up to [`MAX_BUFFER`], as far as the buffer budget allows.
//!
//! # Accounting
//!
//! [`Account`] is created when the connection is accepted and records its close in `Drop`: the
//! active gauge, the close reason, the duration and the final byte counts are exact on every path,
//! a panic in the task or the task being dropped included.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::{debug, error};

use crate::context::ConnContext;
use crate::echo::copy::{copy_phase, CopyPhase, PhaseEnd, PhaseStart};
use crate::echo::ring::Pace;
use crate::echo::{EchoStream, INITIAL_BUFFER, MAX_BUFFER};
use crate::metrics::{CloseReason, Published};

/// A connection that talks again within this long of its last phase going quiet is in a
/// dialogue: its next phase keeps its buffers until a quiet tick rather than freeing them (and
/// setting them up again) after every message.
const STICKY_MS: u32 = crate::echo::copy::TICK.as_millis() as u32;

/// During a drain, how long a connection with nothing in flight must have been quiet before it
/// is closed: long enough not to cut a client between two messages of a dialogue.
pub(crate) const DRAIN_QUIET: std::time::Duration = crate::echo::copy::TICK;

/// What a connection learned in its stages, kept only for connections that have any.
#[derive(Debug, Default)]
pub(crate) struct Extras {
    /// The client's address from a PROXY header, when it differs from the socket's peer.
    pub client: Option<SocketAddr>,
    /// The subject of the client's TLS certificate.
    pub client_cert: Option<String>,
    /// The connection's place in its source's count (per-source limits on).
    pub source: Option<crate::access::SourceSlot>,
}

/// One connection's entry in the server's books, from accept to close.
pub(crate) struct Account {
    ctx: Arc<ConnContext>,
    peer: SocketAddr,
    started: Instant,
    published: Published,
    reason: Option<CloseReason>,
    extras: Option<Box<Extras>>,
}

impl Account {
    /// Counts the connection as open (`echod_connections_active` + 1).
    pub(crate) fn open(ctx: Arc<ConnContext>, peer: SocketAddr) -> Account {
        ctx.metrics.connection_opened();
        Account {
            ctx,
            peer,
            started: Instant::now(),
            published: Published::default(),
            reason: None,
            extras: None,
        }
    }

    pub(crate) fn ctx(&self) -> &Arc<ConnContext> {
        &self.ctx
    }

    /// Milliseconds since the connection was accepted (saturating at `u32::MAX`, about 50 days).
    pub(crate) fn age_ms(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_millis()).unwrap_or(u32::MAX)
    }

    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The client's address: the PROXY header's, else the socket's peer.
    pub(crate) fn client(&self) -> SocketAddr {
        self.extras.as_ref().and_then(|e| e.client).unwrap_or(self.peer)
    }

    /// The subject of the client's TLS certificate, if it presented one.
    pub(crate) fn client_cert(&self) -> Option<&str> {
        self.extras.as_ref().and_then(|e| e.client_cert.as_deref())
    }

    pub(crate) fn extras(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// Records how the connection ends (the last call wins); the close itself is recorded when
    /// the account is dropped.
    pub(crate) fn end(&mut self, reason: CloseReason) {
        self.reason = Some(reason);
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let reason = self.reason.unwrap_or_else(|| {
            if std::thread::panicking() {
                error!(peer = %self.peer, "connection task panicked; connection closed");
                CloseReason::Error
            } else {
                // Dropped without an end: the runtime is shutting down.
                CloseReason::Shutdown
            }
        });
        let Published { received, sent } = self.published;
        let lifetime = self.started.elapsed();
        self.ctx.metrics.connection_closed(reason, lifetime);
        match self.extras.as_deref() {
            Some(Extras { client, client_cert: Some(cert), .. }) => debug!(
                peer = %self.peer, client = %client.unwrap_or(self.peer), client_cert = %cert, received, sent,
                duration = ?lifetime, reason = reason.as_str(), "connection closed"
            ),
            Some(Extras { client: Some(client), .. }) => debug!(
                peer = %self.peer, %client, received, sent, duration = ?lifetime, reason = reason.as_str(),
                "connection closed"
            ),
            _ => debug!(
                peer = %self.peer, received, sent, duration = ?lifetime, reason = reason.as_str(),
                "connection closed"
            ),
        }
    }
}

pin_project! {
    /// One client's echo: the future its task runs once the stages (if any) are done.
    ///
    /// Written by hand rather than as an `async fn` because this is what every held connection
    /// costs in memory (besides the kernel's socket): the task stores exactly these fields, with
    /// the waiting phase's state in place and the copy phase's behind one box. The compiler's
    /// layout of the equivalent `async fn` was twice the size.
    #[project = ConnectionProj]
    pub(crate) struct Connection<S, P> {
        account: Account,
        _permit: OwnedSemaphorePermit,
        // Buffer size of the next copy phase.
        buffer: u32,
        // When the last copy phase went quiet or grew, in milliseconds since the connection
        // started (0: never): a connection that talks again soon after keeps its next phase's
        // buffers until a quiet tick; one that does not frees them the moment it is drained.
        quiet_at_ms: u32,
        #[pin]
        phase: Phase<S, P>,
    }
}

pin_project! {
    #[project = PhaseProj]
    #[project_replace = PhaseTaken]
    enum Phase<S, P> {
        // Accepted; set up on the first poll, inside the connection's own task.
        Start { stream: S, pace: P },
        // No buffers held: asleep on the stream's readiness, the drain and the idle deadline.
        Waiting {
            stream: S,
            pace: P,
            #[pin]
            drain: WaitForCancellationFutureOwned,
            // The idle deadline; during a drain, the moment the connection has been quiet long
            // enough to be closed.
            idle: Option<Pin<Box<Sleep>>>,
            last_activity: Instant,
        },
        // A copy phase owns the stream until it ends.
        Copying { copy: CopyPhase<S, P> },
        // After the close.
        Done,
    }
}

impl<S: EchoStream, P: Pace + 'static> Connection<S, P> {
    /// The echo of an accepted client whose stages are done. `permit` is its slot under
    /// `--max-connections`, released when the connection ends.
    pub(crate) fn new(account: Account, permit: OwnedSemaphorePermit, stream: S, pace: P) -> Self {
        Connection {
            account,
            _permit: permit,
            buffer: INITIAL_BUFFER as u32,
            quiet_at_ms: 0,
            phase: Phase::Start { stream, pace },
        }
    }
}

impl<S, P> Phase<S, P> {
    /// The waiting phase, with the idle clock running from `last_activity`.
    fn waiting(stream: S, pace: P, ctx: &ConnContext, last_activity: Instant) -> Phase<S, P> {
        Phase::Waiting {
            stream,
            pace,
            drain: ctx.listeners_closed.clone().cancelled_owned(),
            idle: ctx.idle_timeout.map(|t| Box::pin(tokio::time::sleep_until(last_activity + t))),
            last_activity,
        }
    }
}

impl<S: EchoStream, P: Pace + 'static> Future for Connection<S, P> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            let mut outcome = match this.phase.as_mut().project() {
                PhaseProj::Start { .. } => {
                    let PhaseTaken::Start { stream, pace } = this.phase.as_mut().project_replace(Phase::Done)
                    else {
                        unreachable!("the phase was Start")
                    };
                    let ctx = this.account.ctx.clone();
                    this.phase.set(Phase::waiting(stream, pace, &ctx, Instant::now()));
                    continue;
                }
                PhaseProj::Waiting { stream, drain, idle, last_activity, .. } => {
                    // Readiness first: data that arrived is echoed, even during a drain.
                    match stream.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(err)) => return this.close(CloseReason::from_io_error(&err)),
                        Poll::Pending => {
                            let ctx = &this.account.ctx;
                            let quiet_since = *last_activity;
                            if ctx.closing_idle() || drain.poll(cx).is_ready() {
                                // Nothing in flight: closing loses nothing, once the client has
                                // been quiet a moment (not between two messages of a dialogue).
                                let close_at = quiet_since + DRAIN_QUIET;
                                if Instant::now() >= close_at {
                                    return this.close(CloseReason::Shutdown);
                                }
                                let deadline = idle.as_ref().map_or(close_at, |t| t.deadline().min(close_at));
                                match idle {
                                    Some(timer) if timer.deadline() == deadline => {}
                                    Some(timer) => timer.as_mut().reset(deadline),
                                    None => *idle = Some(Box::pin(tokio::time::sleep_until(deadline))),
                                }
                            }
                            if idle.as_mut().is_some_and(|idle| idle.as_mut().poll(cx).is_ready()) {
                                let idle_out = ctx.idle_timeout.is_some_and(|t| quiet_since.elapsed() >= t);
                                return this.close(if idle_out {
                                    CloseReason::IdleTimeout
                                } else {
                                    CloseReason::Shutdown
                                });
                            }
                            return Poll::Pending;
                        }
                    }
                    // Readable (data, FIN or RST: the copy will tell which): start copying.
                    let PhaseTaken::Waiting { stream, pace, .. } =
                        this.phase.as_mut().project_replace(Phase::Done)
                    else {
                        unreachable!("the phase was Waiting")
                    };
                    this.start_copy(stream, pace);
                    continue;
                }
                PhaseProj::Copying { copy } => match copy.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(outcome) => outcome,
                },
                PhaseProj::Done => return Poll::Ready(()),
            };
            this.account.published = outcome.published;
            match outcome.end {
                PhaseEnd::Grow => {
                    *this.buffer = (outcome.size * 4).min(MAX_BUFFER) as u32;
                    // Busy: the bigger phase keeps its buffers until a quiet tick.
                    *this.quiet_at_ms = this.account.age_ms().max(1);
                    // Straight into the next phase: a TLS stream may hold decrypted bytes that
                    // its socket's readiness would never announce.
                    this.start_copy(outcome.stream, outcome.pace);
                }
                PhaseEnd::Quiet => {
                    *this.buffer = INITIAL_BUFFER as u32;
                    *this.quiet_at_ms = this.account.age_ms().max(1);
                    let ctx = this.account.ctx.clone();
                    this.phase.set(Phase::waiting(outcome.stream, outcome.pace, &ctx, outcome.last_activity));
                }
                PhaseEnd::Finished => {
                    let reason = outcome.pace.close_reason().unwrap_or(CloseReason::Eof);
                    return this.close(reason);
                }
                PhaseEnd::Closed(reason) => {
                    outcome.stream.end_session();
                    return this.close(reason);
                }
                PhaseEnd::InjectedReset => return this.close(CloseReason::InjectedReset),
                PhaseEnd::Failed(err) => return this.close(CloseReason::from_io_error(&err)),
            }
        }
    }
}

impl<S: EchoStream, P: Pace + 'static> ConnectionProj<'_, S, P> {
    fn start_copy(&mut self, stream: S, pace: P) {
        let start = PhaseStart {
            stream,
            pace,
            published: self.account.published,
            size: *self.buffer as usize,
            end_when_drained: *self.quiet_at_ms == 0
                || self.account.age_ms().saturating_sub(*self.quiet_at_ms) > STICKY_MS,
        };
        let copy = copy_phase(start, self.account.ctx.clone());
        self.phase.set(Phase::Copying { copy });
    }

    /// Ends the connection: drops the stream if the phase still holds it (a copy phase's outcome
    /// has already been dropped by then) and notes why; the account records the close. A waiting
    /// connection that echod closes on its own (idle timeout, drain) ends its session first.
    fn close(&mut self, reason: CloseReason) -> Poll<()> {
        if let PhaseTaken::Waiting { mut stream, .. } = self.phase.as_mut().project_replace(Phase::Done) {
            if matches!(reason, CloseReason::IdleTimeout | CloseReason::Shutdown) {
                stream.end_session();
            }
        }
        self.account.end(reason);
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::Semaphore;

    use super::*;
    use crate::budget::Budget;
    use crate::echo::copy::looped_phase;
    use crate::echo::ring::Plain;
    use crate::metrics::{Registry, Sampled, ServerMetrics};

    fn context() -> Arc<ConnContext> {
        let metrics = ServerMetrics::new(Some(Registry::new()), 1);
        Arc::new(ConnContext::new(Arc::new(metrics), None, Budget::new(1 << 20, INITIAL_BUFFER)))
    }

    /// One sample's value in the context's metrics.
    fn sample(ctx: &ConnContext, series: &str) -> f64 {
        let text = ctx.metrics.registry().expect("metrics on").render(&Sampled::default());
        let line =
            text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series} in\n{text}"));
        line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a value")
    }

    /// The task of an idle connection is what every held connection costs (besides the kernel's
    /// socket): keep it small. The copy phase's state is boxed and exists only while copying;
    /// freed, it leaves a hole in the heap between the tasks that stay, so keep it small too.
    #[tokio::test]
    async fn a_connection_task_and_its_copy_phase_are_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let ctx = context();
        let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        let task = Connection::new(Account::open(ctx.clone(), peer), permit, stream, Plain);
        let size = std::mem::size_of_val(&task);
        println!("connection task future: {size} bytes");
        // tokio stores a task's future with about 100 bytes of its own, in 128-byte steps: at
        // up to 280 bytes the whole task takes 384.
        assert!(size <= 280, "connection task future is {size} bytes");

        let _second_client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (second, _) = listener.accept().await.unwrap();
        let start = PhaseStart {
            stream: second,
            pace: Plain,
            published: Published::default(),
            size: INITIAL_BUFFER,
            end_when_drained: false,
        };
        let copy = copy_phase(start, ctx.clone());
        let copy_size = std::mem::size_of_val(&*copy);
        println!("copy phase state: {copy_size} bytes");
        let _third_client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (third, _) = listener.accept().await.unwrap();
        let start = PhaseStart {
            stream: third,
            pace: Plain,
            published: Published::default(),
            size: INITIAL_BUFFER,
            end_when_drained: false,
        };
        let looped = looped_phase(start, ctx);
        let looped_size = std::mem::size_of_val(&*looped);
        println!("copy phase state through the loop: {looped_size} bytes");
        // A plain TCP socket's phase is the direct echo, which has no loop to store.
        assert!(copy_size < looped_size, "a plain TCP phase runs through the loop");
        // Windows' socket type is a little larger (784 bytes measured under Wine).
        let bound = if cfg!(windows) { 800 } else { 768 };
        assert!(looped_size <= bound, "copy phase state is {looped_size} bytes");
        drop((task, client));
    }

    /// A connection whose task panics is still closed in the books: active back to zero, the
    /// close counted (as an error).
    #[tokio::test]
    async fn a_panicking_connection_task_is_still_accounted() {
        let ctx = context();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let task = tokio::spawn({
            let ctx = ctx.clone();
            async move {
                let _account = Account::open(ctx, peer);
                panic!("injected panic");
            }
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(sample(&ctx, "echod_connections_active "), 0.0);
        assert_eq!(sample(&ctx, "echod_connections_closed_total{reason=\"error\"}"), 1.0);
    }
}

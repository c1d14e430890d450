//! `echod --service`: echod run by the Windows service control manager (the SCM).
//!
//! Register it once (`sc.exe create echod binPath= "C:\...\echod.exe --service --listen ..."`);
//! the SCM then starts the process with that command line. `--service` is not one of the
//! [`Config`] flags: it only tells `main` to hand the process to the SCM, and the rest of the
//! line is parsed as usual.
//!
//! The service's stop request (`sc stop`, `net stop`, the Services console) and the system's
//! shutdown notice start the same drain as ctrl-c: they complete the `shutdown` future that
//! [`Server::run`] waits on, exactly as [`crate::run`] completes it on the first console signal.
//! The states reported to the SCM follow the server's life:
//!
//! | state | when |
//! |---|---|
//! | START_PENDING | while flags are parsed and the listeners bound |
//! | RUNNING (accepts STOP, SHUTDOWN) | once every listener is bound |
//! | STOP_PENDING, wait hint delay + timeout + 10 s | from the stop request to the drain's end |
//! | STOPPED, exit code 0 | after the drain |
//! | STOPPED, service-specific exit code 1 or 2 | could not start (1), bad flag or value (2) |
//!
//! The SCM discards a service's standard error, so logs go nowhere unless the service's
//! command line redirects them; the exit code and the state are what the SCM keeps.
//!
//! [`serve`] (bind, report, wait for the stop, drain) has nothing Windows-specific and is tested
//! on every platform; only [`run`], the SCM glue, is Windows-only.

use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tracing::info;

use crate::{Config, DrainReport, Error, Server};

/// The flag that selects service mode.
pub const FLAG: &str = "--service";

/// The name given to the SCM (ignored by Windows for a service in its own process, as here:
/// the name given to `sc create` is the service's).
pub const SERVICE_NAME: &str = "echod";

/// How long past delay + timeout the SCM is told to wait for the drain to end.
pub const STOP_MARGIN: Duration = Duration::from_secs(10);

/// What the service tells the SCM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Parsing flags and binding.
    Starting,
    /// Serving on these addresses.
    Running { listening: Vec<SocketAddr> },
    /// Draining after a stop request; done within `wait_hint`.
    Stopping { wait_hint: Duration },
    /// Ended, with echod's exit status (0 after a drain, 1 could not start, 2 usage error).
    Stopped { exit_code: u32 },
}

/// The command line without `--service`, when it asks for service mode.
pub fn requested(args: impl IntoIterator<Item = OsString>) -> Option<Vec<OsString>> {
    let args: Vec<OsString> = args.into_iter().collect();
    if !args.iter().skip(1).any(|a| a == FLAG) {
        return None;
    }
    let mut rest = Vec::with_capacity(args.len());
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || arg != FLAG {
            rest.push(arg);
        }
    }
    Some(rest)
}

/// The service's life, apart from the SCM: binds, reports [`State::Running`], serves until
/// `stop` completes, reports [`State::Stopping`] and drains as [`Server::run`] does for ctrl-c.
/// The caller reports [`State::Starting`] before and [`State::Stopped`] after.
pub async fn serve(
    config: &Config,
    stop: impl Future<Output = ()>,
    report: &(dyn Fn(State) + Sync),
) -> Result<DrainReport, Error> {
    let server = Server::bind(config)?;
    crate::log_start(config, &server);
    info!("running as a Windows service");
    report(State::Running { listening: server.local_addrs() });
    let wait_hint = stop_wait_hint(config);
    let drained = server
        .run(async move {
            stop.await;
            info!("stop requested by the service manager");
            report(State::Stopping { wait_hint });
        })
        .await;
    Ok(drained)
}

/// The SCM's wait hint for the drain: `--shutdown-delay` + `--shutdown-timeout` + a margin,
/// capped where the SCM's milliseconds field ends.
pub fn stop_wait_hint(config: &Config) -> Duration {
    let hint = config.shutdown_delay.saturating_add(config.shutdown_timeout).saturating_add(STOP_MARGIN);
    hint.min(Duration::from_millis(u64::from(u32::MAX)))
}

#[cfg(windows)]
pub use scm::run;

#[cfg(windows)]
mod scm {
    use std::ffi::OsString;
    use std::process::ExitCode;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    use clap::Parser;
    use tracing::error;
    use windows_service::service::{
        ServiceControl, ServiceControlAccept, ServiceExitCode, ServiceState, ServiceStatus, ServiceType,
    };
    use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
    use windows_service::{define_windows_service, service_dispatcher};

    use super::{serve, State, SERVICE_NAME};
    use crate::{telemetry, Config};

    /// The process's command line (without `--service`), for the service's main function, whose
    /// arguments are the SCM's start parameters instead.
    static ARGS: OnceLock<Vec<OsString>> = OnceLock::new();
    /// The exit status the service stopped with, for the process's own.
    static EXIT: AtomicU32 = AtomicU32::new(1);

    define_windows_service!(ffi_service_main, service_main);

    /// Hands the process to the SCM and returns once the service has stopped. Run from a
    /// console (not by the SCM), it fails at once: the SCM is not there to connect to.
    pub fn run(args: Vec<OsString>) -> ExitCode {
        let _ = ARGS.set(args);
        match service_dispatcher::start(SERVICE_NAME, ffi_service_main) {
            Ok(()) => ExitCode::from(u8::try_from(EXIT.load(Ordering::SeqCst)).unwrap_or(1)),
            Err(err) => {
                let reason = match &err {
                    windows_service::Error::Winapi(os) => os.to_string(),
                    other => other.to_string(),
                };
                eprintln!(
                    "echod: --service: cannot connect to the service control manager ({reason}); \
                     --service is for a command line registered with `sc.exe create`"
                );
                ExitCode::FAILURE
            }
        }
    }

    fn service_main(_start_parameters: Vec<OsString>) {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut stop_tx = Some(stop_tx);
        let handler = move |control| match control {
            ServiceControl::Stop | ServiceControl::Shutdown => {
                if let Some(tx) = stop_tx.take() {
                    let _ = tx.send(());
                }
                ServiceControlHandlerResult::NoError
            }
            ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
            _ => ServiceControlHandlerResult::NotImplemented,
        };
        let status = match service_control_handler::register(SERVICE_NAME, handler) {
            Ok(status) => status,
            Err(err) => {
                eprintln!("echod: cannot register with the service control manager: {err}");
                return;
            }
        };
        let checkpoint = Mutex::new(0u32);
        let report = |state: State| {
            let mut checkpoint = checkpoint.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            *checkpoint += 1;
            if let Err(err) = status.set_service_status(service_status(&state, *checkpoint)) {
                error!("cannot report {state:?} to the service control manager: {err}");
            }
        };
        report(State::Starting);
        let exit_code = serve_service(stop_rx, &report);
        EXIT.store(exit_code, Ordering::SeqCst);
        report(State::Stopped { exit_code });
    }

    /// Parses the flags, runs [`serve`] on a runtime like `main`'s; returns echod's exit status.
    fn serve_service(stop: tokio::sync::oneshot::Receiver<()>, report: &(dyn Fn(State) + Sync)) -> u32 {
        let config = match Config::try_parse_from(ARGS.get().cloned().unwrap_or_default()) {
            Ok(config) => config,
            Err(err) => {
                let _ = err.print();
                return 2;
            }
        };
        telemetry::init(config.log_format);
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads())
            .thread_name("echod-worker")
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => {
                error!("cannot start the runtime: {err}");
                return 1;
            }
        };
        // A closed channel (the handler gone) also stops the service.
        let result = runtime.block_on(serve(&config, async move { _ = stop.await }, report));
        runtime.shutdown_timeout(Duration::from_secs(1));
        match result {
            Ok(_) => 0,
            Err(err) => {
                error!("{err}");
                1
            }
        }
    }

    fn service_status(state: &State, checkpoint: u32) -> ServiceStatus {
        let (current_state, controls_accepted, wait_hint, exit_code) = match state {
            State::Starting => {
                (ServiceState::StartPending, ServiceControlAccept::empty(), Duration::from_secs(30), 0)
            }
            State::Running { .. } => (
                ServiceState::Running,
                ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
                Duration::ZERO,
                0,
            ),
            State::Stopping { wait_hint } => {
                (ServiceState::StopPending, ServiceControlAccept::empty(), *wait_hint, 0)
            }
            State::Stopped { exit_code } => {
                (ServiceState::Stopped, ServiceControlAccept::empty(), Duration::ZERO, *exit_code)
            }
        };
        let pending = matches!(current_state, ServiceState::StartPending | ServiceState::StopPending);
        ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state,
            controls_accepted,
            exit_code: if exit_code == 0 {
                ServiceExitCode::Win32(0)
            } else {
                ServiceExitCode::ServiceSpecific(exit_code)
            },
            checkpoint: if pending { checkpoint } else { 0 },
            wait_hint,
            process_id: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_flag_is_taken_out_of_the_command_line() {
        assert_eq!(requested(os(&["echod", "--listen", "127.0.0.1:0"])), None);
        assert_eq!(
            requested(os(&["echod", "--service", "--listen", "127.0.0.1:0"])),
            Some(os(&["echod", "--listen", "127.0.0.1:0"]))
        );
        assert_eq!(
            requested(os(&["echod", "--workers", "2", "--service"])),
            Some(os(&["echod", "--workers", "2"]))
        );
        // The program's own name is never the flag, and a look-alike is not the flag.
        assert_eq!(requested(os(&["--service"])), None);
        assert_eq!(requested(os(&["echod", "--services"])), None);
    }

    #[test]
    fn the_wait_hint_covers_delay_and_timeout() {
        let mut config = Config::loopback();
        config.shutdown_delay = Duration::from_secs(5);
        config.shutdown_timeout = Duration::from_secs(25);
        assert_eq!(stop_wait_hint(&config), Duration::from_secs(40));
        config.shutdown_timeout = Duration::from_secs(u64::MAX / 2);
        assert_eq!(stop_wait_hint(&config), Duration::from_millis(u64::from(u32::MAX)));
    }

    async fn echo(stream: &mut TcpStream, data: &[u8]) {
        stream.write_all(data).await.expect("write");
        let mut back = vec![0; data.len()];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(back, data);
    }

    /// The service's stop request drains like ctrl-c: the connected client keeps echoing, new
    /// connections are refused, and once the client leaves the server ends with its report.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_request_drains() {
        let mut config = Config::loopback();
        config.shutdown_timeout = Duration::from_secs(20);
        let states = Arc::new(Mutex::new(Vec::new()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (running_tx, running_rx) = tokio::sync::oneshot::channel();
        let running_tx = Mutex::new(Some(running_tx));
        let seen = states.clone();
        let service = tokio::spawn(async move {
            let report = move |state: State| {
                if let State::Running { listening } = &state {
                    if let Some(tx) = running_tx.lock().expect("lock").take() {
                        let _ = tx.send(listening[0]);
                    }
                }
                seen.lock().expect("lock").push(state);
            };
            serve(&config, async move { _ = stop_rx.await }, &report).await
        });
        let addr = tokio::time::timeout(Duration::from_secs(10), running_rx)
            .await
            .expect("running in time")
            .expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        echo(&mut client, b"before the stop").await;

        stop_tx.send(()).expect("the service waits for the stop");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(addr).await.is_err() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the listener still accepts after the stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        echo(&mut client, b"during the drain").await;
        assert!(!service.is_finished(), "the drain waits for the connected client");
        drop(client);

        let drained = tokio::time::timeout(Duration::from_secs(10), service)
            .await
            .expect("the drain ends once the client left")
            .expect("the service task")
            .expect("serve");
        // The client, and perhaps a probe connect above that the listener took just before it
        // closed; none needed the timeout.
        assert!(drained.draining >= 1 && drained.closed_by_timeout == 0, "{drained:?}");
        let states = states.lock().expect("lock").clone();
        assert_eq!(
            states,
            vec![
                State::Running { listening: vec![addr] },
                State::Stopping { wait_hint: Duration::from_secs(20) + STOP_MARGIN }
            ]
        );
    }

    #[tokio::test]
    async fn a_listener_that_cannot_bind_is_an_error_before_running() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut config = Config::loopback();
        config.listen = vec![crate::config::ListenSpec::tcp(taken.local_addr().expect("addr"))];
        let states = Mutex::new(Vec::new());
        let report = |state: State| states.lock().expect("lock").push(state);
        let result = serve(&config, std::future::pending(), &report).await;
        assert!(matches!(result, Err(Error::Bind { .. })), "{result:?}");
        assert!(states.lock().expect("lock").is_empty(), "nothing reported before a listener is bound");
    }
}

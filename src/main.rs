//! The `echod` binary: parses flags, starts logging and the runtime, and runs the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use echod::{telemetry, Config};

/// jemalloc on Linux: idle connections then cost under 1 KiB of RSS each (see `echod::memory`).
#[cfg(all(feature = "jemalloc", target_os = "linux"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's start-up options (its `malloc_conf`), read before the first allocation; the
/// `_RJEM_MALLOC_CONF` environment variable still overrides them. Why these: `echod::memory`.
#[cfg(all(feature = "jemalloc", target_os = "linux"))]
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_OPTIONS: &[u8; echod::memory::JEMALLOC_OPTIONS.len()] = echod::memory::JEMALLOC_OPTIONS;

fn main() -> ExitCode {
    // A process the Windows service manager starts: it runs the service (src/service.rs).
    #[cfg(windows)]
    if let Some(args) = echod::service::requested(std::env::args_os()) {
        return echod::service::run(args);
    }
    let config = Config::parse();
    if let Some(kind) = config.generate {
        return echod::generate::print(kind, Config::command());
    }
    if let Err(err) = config.check() {
        err.exit();
    }
    telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads())
        .thread_name("echod-worker")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(echod::run(config));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

//! The `echod` binary: parses flags, starts logging and the runtime, and runs the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use echod::{telemetry, Config};

fn main() -> ExitCode {
    let config = Config::parse();
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

//! Logging: `tracing` events to stderr, as text or JSON, filtered by `RUST_LOG`.
//!
//! What is logged at which level: `info` for the start line, one line per listener and one per
//! shutdown phase; `warn` for trouble an operator should see (accept failures, rate-limited);
//! `debug` for each connection (peer, bytes, duration, how it ended). Set `RUST_LOG=echod=debug`
//! to see connections.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, before the runtime starts.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, and never when NO_COLOR is set.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
    log_panics();
}

/// Routes panic messages through the log, so they reach the same collector in the same format
/// (a JSON log stays JSON) instead of raw text on stderr.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        tracing::error!(panic = %message, location = %location, thread = %thread, "panic");
    }));
}

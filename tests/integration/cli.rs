//! The `echod` command line as an operator meets it: usage errors exit 2 and name the flag,
//! `--version` and `--help` describe the binary, start-up failures exit 1 promptly with the
//! address and the reason, and `--log-format json` writes one JSON object per line.
//!
//! These tests drive the built binary and run on every platform, Windows included.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::{run_to_exit, TIMEOUT};

/// Every flag `--help` must document.
const FLAGS: [&str; 21] = [
    "--listen",
    "--allow",
    "--deny",
    "--max-connections-per-source",
    "--connect-rate-per-source",
    "--max-buffer-memory",
    "--tcp-keepalive-interval",
    "--tcp-keepalive-count",
    "--tcp-user-timeout",
    "--proxy-header-timeout",
    "--proxy-from",
    "--banner",
    "--workers",
    "--max-connections",
    "--idle-timeout",
    "--tcp-keepalive",
    "--backlog",
    "--shutdown-timeout",
    "--shutdown-delay",
    "--metrics-listen",
    "--log-format",
];

/// Every environment variable `--help` must document.
const ENV_VARS: [&str; 21] = [
    "ECHOD_LISTEN",
    "ECHOD_ALLOW",
    "ECHOD_DENY",
    "ECHOD_MAX_CONNECTIONS_PER_SOURCE",
    "ECHOD_CONNECT_RATE_PER_SOURCE",
    "ECHOD_MAX_BUFFER_MEMORY",
    "ECHOD_TCP_KEEPALIVE_INTERVAL",
    "ECHOD_TCP_KEEPALIVE_COUNT",
    "ECHOD_TCP_USER_TIMEOUT",
    "ECHOD_PROXY_HEADER_TIMEOUT",
    "ECHOD_PROXY_FROM",
    "ECHOD_BANNER",
    "ECHOD_WORKERS",
    "ECHOD_MAX_CONNECTIONS",
    "ECHOD_IDLE_TIMEOUT",
    "ECHOD_TCP_KEEPALIVE",
    "ECHOD_BACKLOG",
    "ECHOD_SHUTDOWN_TIMEOUT",
    "ECHOD_SHUTDOWN_DELAY",
    "ECHOD_METRICS_LISTEN",
    "ECHOD_LOG_FORMAT",
];

/// Runs echod with `args` (and a harmless listen/metrics configuration, so a usage error that
/// is wrongly accepted fails fast instead of serving on the default ports) and expects exit 2
/// with every one of `needles` in the output.
fn expect_usage_error(args: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    let (code, output) = run_to_exit(args, env);
    assert_eq!(code, Some(2), "echod {args:?} (env {env:?}) should exit 2; output:\n{output}");
    for needle in needles {
        assert!(output.contains(needle), "echod {args:?}: output should name {needle:?}:\n{output}");
    }
}

#[test]
fn unknown_flag_is_a_usage_error() {
    expect_usage_error(&["--bogus"], &[], &["--bogus"]);
}

#[test]
fn zero_workers_is_a_usage_error() {
    expect_usage_error(&["--workers", "0"], &[], &["--workers", "'0'"]);
}

#[test]
fn negative_max_connections_is_a_usage_error() {
    // Both forms name the flag and the value (numeric flags accept a leading minus as a value,
    // so clap does not mistake `-1` for a flag of its own).
    expect_usage_error(&["--max-connections=-1"], &[], &["--max-connections", "-1"]);
    expect_usage_error(&["--max-connections", "-1"], &[], &["--max-connections", "-1"]);
}

#[test]
fn zero_max_connections_is_a_usage_error() {
    expect_usage_error(&["--max-connections", "0"], &[], &["--max-connections"]);
}

#[test]
fn malformed_duration_is_a_usage_error() {
    expect_usage_error(&["--idle-timeout", "soon"], &[], &["--idle-timeout", "soon"]);
    expect_usage_error(&["--shutdown-timeout", "later"], &[], &["--shutdown-timeout", "later"]);
}

#[test]
fn malformed_listen_address_is_a_usage_error() {
    expect_usage_error(&["--listen", "nonsense"], &[], &["--listen", "nonsense"]);
}

#[test]
fn bad_listen_specs_name_the_flag_and_the_offending_part() {
    for (spec, part) in [
        ("http://127.0.0.1:80", "http://"),
        ("tcp://127.0.0.1:0?colour=red", "colour"),
        ("tcp://127.0.0.1:0?proxy=v9", "proxy=v9"),
        ("tcp://127.0.0.1:0?delay=-1s", "delay=-1s"),
        ("tcp://127.0.0.1:0?rate=fast", "rate=fast"),
        ("tcp://127.0.0.1:0?reset_probability=2", "reset_probability=2"),
        ("tcp://127.0.0.1:0?close_after=9-1", "close_after=9-1"),
        ("tcp://localhost:80", "localhost:80"),
    ] {
        expect_usage_error(&["--listen", spec], &[], &["--listen", part]);
    }
    expect_usage_error(
        &[],
        &[("ECHOD_LISTEN", "127.0.0.1:0,tcp://127.0.0.1:0?bogus=1")],
        &["--listen", "bogus"],
    );
}

#[test]
fn bad_banners_proxy_sources_and_ranges_name_the_flag() {
    expect_usage_error(&["--banner", "{who}"], &[], &["--banner", "{who}"]);
    expect_usage_error(
        &["--listen", "127.0.0.1:0?proxy=v1", "--proxy-from", "10.0.0.0/99"],
        &[],
        &["--proxy-from"],
    );
    expect_usage_error(&["--proxy-from", "10.0.0.0/8"], &[], &["--proxy-from", "proxy="]);
    expect_usage_error(&["--allow", "10.0.0.0/33"], &[], &["--allow", "10.0.0.0/33"]);
    expect_usage_error(&["--deny", "somewhere"], &[], &["--deny", "somewhere"]);
    expect_usage_error(&[], &[("ECHOD_DENY", "10.0.0.0/8,bogus")], &["--deny", "bogus"]);
    expect_usage_error(&["--max-connections-per-source", "0"], &[], &["--max-connections-per-source"]);
    expect_usage_error(&["--connect-rate-per-source", "-3"], &[], &["--connect-rate-per-source", "-3"]);
    for (flag, value) in [
        ("--shutdown-timeout", "-5s"),
        ("--shutdown-delay", "-1s"),
        ("--idle-timeout", "-3m"),
        ("--tcp-keepalive", "10h"),
        ("--tcp-keepalive-interval", "0s"),
        ("--tcp-keepalive-count", "1000"),
        ("--tcp-user-timeout", "-1s"),
        ("--proxy-header-timeout", "-2s"),
        ("--max-buffer-memory", "-64MiB"),
        ("--max-buffer-memory", "12 parsecs"),
    ] {
        expect_usage_error(&[flag, value], &[], &[flag, value]);
    }
}

#[test]
fn malformed_metrics_address_is_a_usage_error() {
    expect_usage_error(&["--metrics-listen", "nope"], &[], &["--metrics-listen", "nope"]);
}

#[test]
fn unknown_log_format_is_a_usage_error() {
    expect_usage_error(&["--log-format", "xml"], &[], &["--log-format", "xml", "text", "json"]);
}

#[test]
fn bad_value_from_the_environment_is_a_usage_error() {
    // clap names the flag the variable stands for, and the value.
    expect_usage_error(&[], &[("ECHOD_WORKERS", "zero")], &["--workers", "zero"]);
    expect_usage_error(&[], &[("ECHOD_LOG_FORMAT", "xml")], &["--log-format", "xml"]);
}

#[test]
fn version_prints_name_and_crate_version() {
    let (code, output) = run_to_exit(&["--version"], &[]);
    assert_eq!(code, Some(0), "--version output:\n{output}");
    let expected = format!("echod {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(output.trim(), expected);
}

#[test]
fn help_documents_every_flag_and_environment_variable() {
    let (code, output) = run_to_exit(&["--help"], &[]);
    assert_eq!(code, Some(0), "--help output:\n{output}");
    for name in FLAGS.iter().chain(ENV_VARS.iter()) {
        assert!(output.contains(name), "--help does not mention {name}:\n{output}");
    }
}

/// Runs echod against an address some other socket holds, expects exit 1 within a few seconds,
/// and returns the output.
fn run_against_busy_port(args: &[&str]) -> String {
    let started = Instant::now();
    let (code, output) = run_to_exit(args, &[]);
    assert_eq!(code, Some(1), "echod {args:?} should exit 1; output:\n{output}");
    assert!(started.elapsed() < Duration::from_secs(10), "echod took {:?} to give up", started.elapsed());
    output
}

#[test]
fn busy_listen_port_fails_start_up() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind a port to hold");
    let busy = holder.local_addr().unwrap().to_string();
    let output = run_against_busy_port(&["--listen", &busy, "--metrics-listen", "off"]);
    assert!(output.contains(&busy), "the error should name {busy}:\n{output}");
    if cfg!(target_os = "linux") {
        assert!(output.contains("in use"), "the error should give the reason:\n{output}");
    }
    drop(holder);
}

#[test]
fn busy_metrics_port_fails_start_up() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind a port to hold");
    let busy = holder.local_addr().unwrap().to_string();
    let output = run_against_busy_port(&["--listen", "127.0.0.1:0", "--metrics-listen", &busy]);
    assert!(output.contains(&busy), "the error should name {busy}:\n{output}");
    assert!(output.contains("--metrics-listen"), "the error should name the flag:\n{output}");
    if cfg!(target_os = "linux") {
        assert!(output.contains("in use"), "the error should give the reason:\n{output}");
    }
    drop(holder);
}

#[test]
fn json_log_lines_are_json_objects() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_echod"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start echod");
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // Killed when the test ends, pass or fail.
    let _guard = KillOnDrop(child);

    let deadline = Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).expect("echod logs its start-up lines");
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        let object = value.as_object().unwrap_or_else(|| panic!("log line is not an object: {line}"));
        // flatten_event puts the message and the fields at the top level.
        let message = object.get("message").and_then(|m| m.as_str()).expect("a message field");
        assert!(object.get("level").is_some_and(|l| l.is_string()), "a level field: {line}");
        assert!(object.contains_key("timestamp"), "a timestamp field: {line}");
        if message == "listening" {
            let address = object.get("address").and_then(|a| a.as_str()).expect("listening has an address");
            address.parse::<std::net::SocketAddr>().expect("the address is a socket address");
        }
        seen.push(message.to_string());
        if message == "echod started" {
            assert!(object.contains_key("version"), "the start line carries the version: {line}");
            break;
        }
    }
    assert!(seen.iter().any(|m| m == "listening"), "no listening line among {seen:?}");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

//! echod's integration tests: one test crate (`cargo test --test integration`), so cargo
//! compiles and links one test binary rather than one per file, on Linux and in the Windows
//! cross-build run under Wine. Each module was a crate of its own; their tests now share one
//! process and run concurrently, in threads. `cargo test --test integration tls::` runs one
//! module.

mod common;

// Linux routes all of 127.0.0.0/8 to loopback, which these tests' clients are told apart by.
#[cfg(target_os = "linux")]
mod access;
mod architecture;
mod bench_client;
mod cli;
mod echo;
mod faults;
// /proc and RLIMIT_NOFILE.
#[cfg(target_os = "linux")]
mod fd_exhaustion;
mod generate;
mod http_endpoint;
mod limits;
// /proc/PID/status (VmRSS).
#[cfg(target_os = "linux")]
mod memory;
mod metrics;
mod proxy;
mod shutdown;
// Unix signals and systemd socket activation.
#[cfg(unix)]
mod signals;
mod tls;
mod udp;

//! Running out of file descriptors: with a tiny open-files limit and a flood of clients, accept
//! fails with EMFILE. echod must back off instead of spinning on the still-readable listener,
//! rate-limit its log, stay alive, and serve again once descriptors return.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use crate::common::{self, Binary};

/// Open-files limit (soft and hard) for echod in this test.
const OPEN_FILES: libc::rlim_t = 64;
/// Clients the test holds open: well past what echod can accept under that limit.
const FLOOD: usize = 150;
/// The window over which CPU use is measured while the flood is held.
const WINDOW: Duration = Duration::from_millis(1500);

/// CPU time (user + system) the process has used so far, from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which is in parentheses and may contain spaces): state is
    // field 3, utime field 14, stime field 15.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields[11].parse().unwrap();
    let stime: u64 = fields[12].parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(ticks > 0);
    Duration::from_secs_f64((utime + stime) as f64 / ticks as f64)
}

/// CPU time of every thread of the process, from the scheduler's nanosecond accounting
/// (/proc/PID/task/TID/schedstat, first field): finer than the clock ticks of /proc/PID/stat.
fn scheduler_cpu_time(pid: u32) -> Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads");
    let nanos: u64 = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

fn reset_on_close(stream: &TcpStream) {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
}

/// One attempt at an echo with short timeouts; `Err` if it does not complete.
fn try_echo(addr: SocketAddr, data: &[u8], within: Duration) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, within)?;
    stream.set_read_timeout(Some(within))?;
    stream.set_write_timeout(Some(within))?;
    stream.write_all(data)?;
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back)?;
    assert_eq!(back, data, "echo differs");
    Ok(())
}

#[test]
fn accept_backs_off_when_out_of_file_descriptors() {
    let mut command = Binary::command(&["--max-connections", "10000", "--metrics-listen", "off"]);
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: OPEN_FILES, rlim_max: OPEN_FILES };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let echod = Binary::start_command(command);
    let pid = echod.child.id();

    // The flood: every connect completes in the kernel's backlog; echod accepts until it runs
    // out of descriptors.
    let flood: Vec<TcpStream> = (0..FLOOD)
        .map(|i| {
            let stream = TcpStream::connect_timeout(&echod.addr, common::TIMEOUT)
                .unwrap_or_else(|e| panic!("flood connect {i}: {e}"));
            reset_on_close(&stream);
            stream
        })
        .collect();
    let line = echod.wait_for_log("accept failed");
    assert!(line.contains("too_many_open_files"), "the log should say why: {line}");

    // Hold the flood and watch: echod must sleep between attempts, not spin.
    let cpu_before = cpu_time(pid);
    let sched_before = scheduler_cpu_time(pid);
    let started = Instant::now();
    let mut logged = 0;
    loop {
        let left = WINDOW.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        match echod.log.recv_timeout(left) {
            Ok(line) if line.contains("accept failed") => logged += 1,
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => panic!("echod closed its stderr (exited?)"),
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time(pid).saturating_sub(cpu_before);
    let sched = scheduler_cpu_time(pid).saturating_sub(sched_before);
    let share = cpu.as_secs_f64() / elapsed.as_secs_f64();
    println!(
        "fd exhaustion: echod used {:.1} ms CPU (utime+stime; scheduler: {:.3} ms) over {:.0} ms = {:.2}% of one core, \
         {} 'accept failed' lines",
        cpu.as_secs_f64() * 1e3,
        sched.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e3,
        share * 100.0,
        logged
    );
    assert!(share < 0.10, "echod used {:.1}% of a core while out of descriptors", share * 100.0);
    assert!(logged <= 2, "{logged} 'accept failed' lines in {elapsed:?}: the log is not rate-limited");
    let mut echod = echod;
    assert!(echod.child.try_wait().unwrap().is_none(), "echod exited while out of descriptors");

    // Release the flood with resets; a newcomer must be served once descriptors return.
    drop(flood);
    let released = Instant::now();
    let deadline = released + Duration::from_secs(10);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match try_echo(echod.addr, b"served again", Duration::from_secs(2)) {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no echo within 10 s after the flood ended ({attempts} attempts): {e}"
                );
            }
        }
    }
    println!(
        "fd exhaustion: served again {:?} after the flood ended ({attempts} attempt(s))",
        released.elapsed()
    );
    assert!(echod.child.try_wait().unwrap().is_none(), "echod exited");
    echod.signal(libc::SIGTERM);
    assert_eq!(echod.wait_exit(Duration::from_secs(10)), Some(0));
}

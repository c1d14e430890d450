//! Progress while a run lasts: a bar on a terminal, a plain line every second otherwise.

use std::io::IsTerminal;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::stats::{lock, Stats};

pub struct Progress {
    stats: Arc<Stats>,
    /// Known length of the run, for the bar: its duration, else its count.
    duration: Option<Duration>,
    count: Option<u64>,
    unit: &'static str,
    enabled: bool,
    state: Mutex<Option<(Option<ProgressBar>, tokio::task::JoinHandle<()>)>>,
}

impl Progress {
    pub fn new(
        stats: Arc<Stats>,
        duration: Option<Duration>,
        count: Option<u64>,
        unit: &'static str,
        enabled: bool,
    ) -> Progress {
        Progress { stats, duration, count, unit, enabled, state: Mutex::new(None) }
    }

    /// Starts reporting, `start` being the start of the measured phase.
    pub fn start(&self, start: Instant) {
        if !self.enabled {
            return;
        }
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match (self.duration, self.count) {
                (Some(d), _) => ProgressBar::new(d.as_millis() as u64),
                (None, Some(n)) => ProgressBar::new(n),
                (None, None) => ProgressBar::new_spinner(),
            };
            bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(5));
            let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
                .expect("valid template")
                .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        let stats = self.stats.clone();
        let (duration, unit) = (self.duration, self.unit);
        let task_bar = bar.clone();
        let task = tokio::spawn(async move {
            let every = if task_bar.is_some() { Duration::from_millis(200) } else { Duration::from_secs(1) };
            let mut tick = tokio::time::interval_at((start + every).into(), every);
            let mut last = (start, 0u64, 0u64);
            loop {
                tick.tick().await;
                let now = Instant::now();
                let (messages, bytes) = (stats.messages.load(Relaxed), stats.bytes.load(Relaxed));
                let secs = (now - last.0).as_secs_f64().max(1e-9);
                let line = format!(
                    "{messages} {unit} ({:.0}/s, {:.1} MiB/s), {} connections, {} errors",
                    (messages - last.1) as f64 / secs,
                    (bytes - last.2) as f64 / secs / 1048576.0,
                    stats.connections.load(Relaxed),
                    stats.errors(),
                );
                last = (now, messages, bytes);
                match &task_bar {
                    Some(bar) => {
                        match duration {
                            Some(d) => {
                                bar.set_position(((now - start).as_millis() as u64).min(d.as_millis() as u64))
                            }
                            None => bar.set_position(messages),
                        }
                        bar.set_message(line);
                    }
                    None => eprintln!("echod-bench: t={:.1}s {line}", (now - start).as_secs_f64()),
                }
            }
        });
        *lock(&self.state) = Some((bar, task));
    }

    /// Prints a line without garbling the bar.
    pub fn println(&self, line: &str) {
        match lock(&self.state).as_ref() {
            Some((Some(bar), _)) => bar.println(line),
            _ => eprintln!("echod-bench: {line}"),
        }
    }

    /// Stops reporting.
    pub fn finish(&self) {
        if let Some((bar, task)) = lock(&self.state).take() {
            task.abort();
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        }
    }
}

//! `merge`: several runs' `--json` results as one. Counts are summed, throughput is taken over
//! the union of the measured windows, and percentiles come from the sum of the histograms
//! (percentiles cannot be averaged). Each result either embeds its histogram (`--histogram -`)
//! or names its interval log file (`--histogram FILE`); the histogram must hold exactly as
//! many values as the result counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

use crate::hlog;
use crate::stats::{new_histogram, Percentiles};

/// The fields of a result that merging reads.
#[derive(Debug, Deserialize)]
struct Part {
    mode: String,
    #[serde(default)]
    worker: Option<String>,
    ok: bool,
    messages: u64,
    bytes: u64,
    errors: u64,
    connections_opened: u64,
    #[serde(default)]
    error_kinds: BTreeMap<String, u64>,
    window_start: f64,
    window_end: f64,
    latency_us: Percentiles,
    #[serde(default)]
    histogram: Option<String>,
    #[serde(default)]
    histogram_file: Option<PathBuf>,
    #[serde(default)]
    banners: Option<BTreeMap<String, u64>>,
    #[serde(default)]
    other_banners: Option<u64>,
}

/// One worker's row of the merged report.
#[derive(Debug, Serialize)]
struct Row {
    worker: String,
    file: String,
    ok: bool,
    messages: u64,
    bytes: u64,
    errors: u64,
    window_start: f64,
    window_end: f64,
    msgs_per_s: f64,
    mib_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Debug, Serialize)]
struct Merged {
    mode: String,
    workers: usize,
    ok: bool,
    messages: u64,
    bytes: u64,
    errors: u64,
    connections_opened: u64,
    error_kinds: BTreeMap<String, u64>,
    /// Earliest start and latest end of the windows (seconds since the epoch).
    window_start: f64,
    window_end: f64,
    /// The length of the union of the windows: the time some worker was measuring.
    elapsed_s: f64,
    msgs_per_s: f64,
    mib_per_s: f64,
    latency_us: Percentiles,
    #[serde(skip_serializing_if = "Option::is_none")]
    banners: Option<BTreeMap<String, u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    other_banners: Option<u64>,
    per_worker: Vec<Row>,
}

/// The first line of `text` that is a result (a JSON object with a `mode`): a `--json` file,
/// or a worker's whole log, whatever else it holds.
fn find_result(text: &str) -> Result<Part, String> {
    let mut first_error = None;
    for line in text.lines().map(str::trim).filter(|l| l.starts_with('{')) {
        match serde_json::from_str::<Part>(line) {
            Ok(part) => return Ok(part),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(match first_error {
        Some(e) => format!("its JSON line is no echod-bench result: {e}"),
        None => "no echod-bench --json result in it".to_string(),
    })
}

/// A relative histogram file is looked for where the result names it (from the current
/// directory), then beside the result.
fn resolve(histogram: &Path, result: &Path) -> PathBuf {
    if histogram.is_absolute() || histogram.exists() {
        return histogram.to_path_buf();
    }
    match (result.parent(), histogram.file_name()) {
        (Some(dir), Some(name)) if dir.join(name).exists() => dir.join(name),
        _ => histogram.to_path_buf(),
    }
}

/// The length of the union of closed intervals.
fn union_length(mut spans: Vec<(f64, f64)>) -> f64 {
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut current: Option<(f64, f64)> = None;
    for (s, e) in spans {
        match current {
            Some((cs, ce)) if s <= ce => current = Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                current = Some((s, e));
            }
            None => current = Some((s, e)),
        }
    }
    total + current.map_or(0.0, |(s, e)| e - s)
}

fn merge(files: &[PathBuf]) -> Result<Merged, String> {
    let mut all = new_histogram();
    all.auto(true);
    let mut rows = Vec::new();
    let mut spans = Vec::new();
    let mut kinds = BTreeMap::new();
    let mut banners: Option<BTreeMap<String, u64>> = None;
    let mut other_banners = 0;
    let (mut messages, mut bytes, mut errors, mut opened) = (0u64, 0u64, 0u64, 0u64);
    let mut mode: Option<String> = None;
    let mut ok = true;
    for file in files {
        let text =
            std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let part = find_result(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        match &mode {
            Some(m) if *m != part.mode => {
                return Err(format!("{}: a {} run, the others are {m}", file.display(), part.mode));
            }
            _ => mode = Some(part.mode.clone()),
        }
        let histogram = match (&part.histogram, &part.histogram_file) {
            (Some(encoded), _) => hlog::decode(encoded).map_err(|e| format!("{}: {e}", file.display()))?,
            (None, Some(path)) => {
                let path = resolve(path, file);
                let log = std::fs::read(&path)
                    .map_err(|e| format!("{}: cannot read {}: {e}", file.display(), path.display()))?;
                hlog::read_log(&log).map_err(|e| format!("{}: {e}", path.display()))?.0
            }
            (None, None) => {
                return Err(format!(
                    "{}: has no histogram (run echod-bench with --histogram FILE or --histogram -)",
                    file.display()
                ));
            }
        };
        if histogram.len() != part.latency_us.count {
            return Err(format!(
                "{}: its histogram holds {} values but the result counts {}: not the same run",
                file.display(),
                histogram.len(),
                part.latency_us.count
            ));
        }
        all.add(&histogram).map_err(|e| format!("{}: cannot add its histogram: {e:?}", file.display()))?;
        messages += part.messages;
        bytes += part.bytes;
        errors += part.errors;
        opened += part.connections_opened;
        ok &= part.ok;
        for (k, v) in &part.error_kinds {
            *kinds.entry(k.clone()).or_insert(0) += v;
        }
        if let Some(b) = &part.banners {
            let into = banners.get_or_insert_with(BTreeMap::new);
            for (k, v) in b {
                *into.entry(k.clone()).or_insert(0) += v;
            }
            other_banners += part.other_banners.unwrap_or(0);
        }
        let secs = (part.window_end - part.window_start).max(1e-9);
        spans.push((part.window_start, part.window_end));
        let p = Percentiles::of(&histogram);
        rows.push(Row {
            worker: part.worker.clone().unwrap_or_else(|| {
                file.file_name()
                    .map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned())
            }),
            file: file.display().to_string(),
            ok: part.ok,
            messages: part.messages,
            bytes: part.bytes,
            errors: part.errors,
            window_start: part.window_start,
            window_end: part.window_end,
            msgs_per_s: part.messages as f64 / secs,
            mib_per_s: part.bytes as f64 / secs / 1048576.0,
            p50_us: p.p50,
            p99_us: p.p99,
        });
    }
    let elapsed = union_length(spans.clone()).max(1e-9);
    Ok(Merged {
        mode: mode.unwrap_or_default(),
        workers: rows.len(),
        ok: ok && errors == 0,
        messages,
        bytes,
        errors,
        connections_opened: opened,
        error_kinds: kinds,
        window_start: spans.iter().map(|s| s.0).fold(f64::INFINITY, f64::min),
        window_end: spans.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max),
        elapsed_s: elapsed,
        msgs_per_s: messages as f64 / elapsed,
        mib_per_s: bytes as f64 / elapsed / 1048576.0,
        latency_us: Percentiles::of(&all),
        other_banners: banners.as_ref().map(|_| other_banners),
        banners,
        per_worker: rows,
    })
}

fn print_text(m: &Merged) {
    println!("merged {} run of {} worker(s): {:.2} s (union of the windows)", m.mode, m.workers, m.elapsed_s);
    println!(
        "  {:<12} {} ops, {:.1}/s, {:.2} MiB/s echoed ({} bytes)",
        "throughput", m.messages, m.msgs_per_s, m.mib_per_s, m.bytes
    );
    let p = &m.latency_us;
    println!(
        "  {:<12} p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1} µs  (n={})",
        "latency", p.p50, p.p90, p.p99, p.p999, p.max, p.count
    );
    println!("  {:<12} {} opened", "connections", m.connections_opened);
    println!("  {:<12} {} {}", "errors", m.errors, if m.ok { "(ok)" } else { "(FAILED)" });
    for (kind, n) in &m.error_kinds {
        println!("    {kind}: {n}");
    }
    if let Some(banners) = &m.banners {
        print_banners(banners, m.other_banners.unwrap_or(0));
    }
    println!(
        "  {:<20} {:>10} {:>12} {:>10} {:>10} {:>10} {:>7}",
        "worker", "ops", "ops/s", "MiB/s", "p50 µs", "p99 µs", "errors"
    );
    for r in &m.per_worker {
        println!(
            "  {:<20} {:>10} {:>12.1} {:>10.2} {:>10.1} {:>10.1} {:>7}",
            r.worker, r.messages, r.msgs_per_s, r.mib_per_s, r.p50_us, r.p99_us, r.errors
        );
    }
}

/// The banner lines seen, most frequent first.
pub fn print_banners(banners: &BTreeMap<String, u64>, other: u64) {
    let mut list: Vec<_> = banners.iter().collect();
    list.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    println!("  {:<12} {} distinct", "banners", banners.len() + usize::from(other > 0));
    for (text, n) in list {
        println!("    {n:>8}  {}", text.escape_debug());
    }
    if other > 0 {
        println!("    {other:>8}  (others, not kept)");
    }
}

pub fn main(files: &[PathBuf], json: bool) -> ExitCode {
    match merge(files) {
        Ok(merged) => {
            if json {
                match serde_json::to_string(&merged) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("echod-bench: error: cannot write the merged result: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print_text(&merged);
            }
            if merged.ok {
                ExitCode::SUCCESS
            } else {
                eprintln!("echod-bench: error: {} error(s) in the merged runs", merged.errors);
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("echod-bench: error: merge: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_of_windows() {
        assert_eq!(union_length(vec![(0.0, 2.0), (1.0, 3.0)]), 3.0);
        assert_eq!(union_length(vec![(5.0, 6.0), (0.0, 1.0)]), 2.0);
        assert_eq!(union_length(vec![(0.0, 4.0), (1.0, 2.0)]), 4.0);
        assert_eq!(union_length(vec![]), 0.0);
    }
}

//! Latency histograms on disk and in JSON: HdrHistogram's interval log format (one line per
//! slice of the measured window, each a compressed V2 histogram in base64), readable by
//! HdrHistogram's own tools, and the same encoding of the whole window for embedding in a
//! report.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hdrhistogram::serialization::interval_log::{
    IntervalLogIterator, IntervalLogWriterBuilder, LogEntry, Tag,
};
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;

use crate::run::wall;
use crate::stats::{new_histogram, Interval};

/// Compressed V2 serialization of `h`, in base64 (the payload of an interval log line).
pub fn encode(h: &Histogram<u64>) -> Result<String, String> {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| format!("cannot serialize the histogram: {e}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The histogram of an [`encode`]d string (compressed or plain V2).
pub fn decode(text: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("histogram does not decode: {e:?}"))
}

/// A tag for the log lines: the worker's name with what the format forbids (`,` and white
/// space) replaced.
fn tag_text(worker: &str) -> String {
    worker.chars().map(|c| if c == ',' || c.is_whitespace() { '_' } else { c }).collect()
}

fn epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// The interval log of a run: header comments (format version, StartTime and BaseTime at the
/// start of the measured window, the legend), then one line per slice, its timestamp relative
/// to BaseTime. Values are nanoseconds.
pub fn interval_log(
    intervals: &[Interval],
    window_start: SystemTime,
    worker: Option<&str>,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    IntervalLogWriterBuilder::new()
        .add_comment(&format!(
            "Logged with echod-bench {}: echo latency in nanoseconds",
            env!("CARGO_PKG_VERSION")
        ))
        .add_comment("[Histogram log format version 1.3]")
        .with_start_time(window_start)
        .with_base_time(window_start)
        .begin_log_with(&mut out, &mut serializer)
        .map_err(|e| e.to_string())?;
    out.extend_from_slice(
        b"\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n",
    );
    let tag = worker.map(tag_text);
    let base = epoch(window_start);
    {
        let mut writer = IntervalLogWriterBuilder::new()
            .begin_log_with(&mut out, &mut serializer)
            .map_err(|e| e.to_string())?;
        for interval in intervals {
            let start = epoch(wall(interval.start)).saturating_sub(base);
            writer
                .write_histogram(
                    &interval.histogram,
                    start,
                    interval.length,
                    tag.as_deref().and_then(Tag::new),
                )
                .map_err(|e| format!("cannot write the interval log: {e}"))?;
        }
    }
    Ok(out)
}

/// One interval log line for the whole window, its timestamp absolute (seconds since the
/// epoch, the format's meaning when no BaseTime is given): a log on its own, and lines of
/// several workers concatenated make one log.
pub fn window_line(
    histogram: &Histogram<u64>,
    window_start: SystemTime,
    length: Duration,
    worker: Option<&str>,
) -> Result<String, String> {
    let mut out = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    let tag = worker.map(tag_text);
    {
        let mut writer = IntervalLogWriterBuilder::new()
            .begin_log_with(&mut out, &mut serializer)
            .map_err(|e| e.to_string())?;
        writer
            .write_histogram(histogram, epoch(window_start), length, tag.as_deref().and_then(Tag::new))
            .map_err(|e| format!("cannot write the histogram line: {e}"))?;
    }
    String::from_utf8(out).map_err(|e| e.to_string()).map(|s| s.trim_end().to_string())
}

/// The sum of every interval in an interval log (any tag), and how many intervals it has.
pub fn read_log(log: &[u8]) -> Result<(Histogram<u64>, usize), String> {
    let mut all = new_histogram();
    all.auto(true);
    let mut n = 0;
    // The parser wants every line ended, the last one too.
    let owned;
    let log = if log.ends_with(b"\n") {
        log
    } else {
        owned = [log, b"\n"].concat();
        &owned[..]
    };
    for entry in IntervalLogIterator::new(log) {
        match entry {
            Ok(LogEntry::Interval(interval)) => {
                let h = decode(interval.encoded_histogram())?;
                all.add(&h).map_err(|e| format!("cannot add interval {n}: {e:?}"))?;
                n += 1;
            }
            Ok(_) => {}
            Err(e) => return Err(format!("interval log does not parse after {n} interval(s): {e:?}")),
        }
    }
    Ok((all, n))
}

/// Writes `bytes` to `path`, naming it in any error.
pub fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn encode_decode_round_trip() {
        let mut h = new_histogram();
        for v in [1, 50, 1_000, 123_456, 9_999_999, 3_000_000_000] {
            h.record(v).unwrap();
        }
        let back = decode(&encode(&h).unwrap()).unwrap();
        assert_eq!(back.len(), h.len());
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert_eq!(back.max(), h.max());
        assert!(encode(&h).unwrap().starts_with("HISTFAAA"), "compressed V2 cookie");
    }

    #[test]
    fn interval_log_sums_back_to_the_whole() {
        let t0 = Instant::now();
        let start = wall(t0);
        let mut intervals = Vec::new();
        let mut whole = new_histogram();
        for i in 0..3u64 {
            let mut h = new_histogram();
            for v in 0..100 * (i + 1) {
                h.record(1_000 + v * 37).unwrap();
            }
            whole.add(&h).unwrap();
            intervals.push(Interval {
                start: t0 + Duration::from_secs(i),
                length: Duration::from_secs(1),
                histogram: h,
            });
        }
        let log = interval_log(&intervals, start, Some("w 1")).unwrap();
        let text = String::from_utf8(log.clone()).unwrap();
        assert!(text.contains("#[StartTime: "), "{text}");
        assert!(text.contains("#[BaseTime: "), "{text}");
        assert!(text.contains("Tag=w_1,1.000,1.000,"), "{text}");
        let (sum, n) = read_log(&log).unwrap();
        assert_eq!(n, 3);
        assert_eq!(sum.len(), whole.len());
        assert_eq!(sum.value_at_quantile(0.99), whole.value_at_quantile(0.99));

        let line = window_line(&whole, start, Duration::from_secs(3), None).unwrap();
        assert!(!line.contains('\n'));
        let (one, n) = read_log(line.as_bytes()).unwrap();
        assert_eq!((one.len(), n), (whole.len(), 1));
    }
}

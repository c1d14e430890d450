//! Parsers for the values flags take: durations, sizes, counts, addresses and `off`.
//!
//! Each parser checks its value against what the operating system and echod's arithmetic accept,
//! so a value that would fail later (a keepalive above Linux's limit, a timeout that overflows a
//! deadline) is refused at start, by clap, naming the flag: exit status 2.
//!
//! Flags that take these values set `allow_hyphen_values`, so `--shutdown-timeout -5s` reaches
//! the parser (and is refused naming the flag) instead of clap reading `-5s` as an unknown flag.

use std::net::SocketAddr;
use std::time::Duration;

/// Longest duration any flag accepts: deadlines are computed as `now + duration`, and this keeps
/// that sum far inside what every platform's clock can represent.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration that can be switched off (`off`); a newtype because clap treats a bare
/// `Option<T>` field as "the flag may be absent", not as a value of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalDuration(pub Option<Duration>);

/// An address that can be switched off (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

/// Parses a humantime duration (`500ms`, `5s`, `1h 30m`) within `min..=max`.
pub fn duration_in(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("`{s}`: a duration cannot be negative"));
    }
    let d = humantime::parse_duration(t).map_err(|e| format!("`{s}`: {e} (expected e.g. 500ms, 30s, 5m)"))?;
    if d < min || d > max {
        return Err(format!(
            "`{s}` is out of range: must be between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// A duration, `off`, within `min..=max` when not off.
pub fn optional_duration_in(s: &str, min: Duration, max: Duration) -> Result<OptionalDuration, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(OptionalDuration(None));
    }
    duration_in(s, min, max).map(|d| OptionalDuration(Some(d)))
}

/// A duration given in whole seconds (socket options that count in seconds).
pub fn whole_seconds_in(s: &str, min_secs: u64, max_secs: u64) -> Result<Duration, String> {
    let d = duration_in(s, Duration::from_secs(min_secs), Duration::from_secs(max_secs))?;
    if d.subsec_nanos() != 0 {
        return Err(format!("`{s}`: must be a whole number of seconds"));
    }
    Ok(d)
}

/// An address, or `off`.
pub fn optional_addr(s: &str) -> Result<OptionalAddr, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(OptionalAddr(None));
    }
    s.trim()
        .parse()
        .map(|a| OptionalAddr(Some(a)))
        .map_err(|e| format!("`{s}`: {e} (expected e.g. 0.0.0.0:9007, [::1]:9007 or off)"))
}

/// Parses a size in bytes: `4096`, `64KiB`, `1MiB`, `2GiB` (binary units; `K`, `M`, `G` mean the
/// same), or `64kB`, `1MB` (decimal units). Whitespace between number and unit is allowed.
pub fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("`{s}`: a size cannot be negative"));
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("`{s}` is not a size (expected e.g. 4096, 64KiB, 1MiB)"));
    }
    let n: u64 = digits.parse().map_err(|_| format!("`{s}`: number too large"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "k" | "KiB" | "kiB" | "Ki" => 1 << 10,
        "M" | "MiB" | "Mi" => 1 << 20,
        "G" | "GiB" | "Gi" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("`{s}`: unknown unit `{other}` (use B, KiB, MiB, GiB, kB, MB or GB)")),
    };
    n.checked_mul(multiplier).ok_or_else(|| format!("`{s}`: size too large"))
}

/// A size within `min..=max` bytes.
pub fn size_in(s: &str, min: u64, max: u64) -> Result<u64, String> {
    let n = size(s)?;
    if n < min || n > max {
        return Err(format!(
            "`{s}` is out of range: must be between {} and {}",
            format_size(min),
            format_size(max)
        ));
    }
    Ok(n)
}

/// A size as people write it: the largest binary unit that divides it exactly.
pub fn format_size(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}

/// A whole number within `min..=max`.
pub fn count_in(s: &str, min: u64, max: u64) -> Result<u64, String> {
    let t = s.trim();
    let n: u64 = t.parse().map_err(|_| format!("`{s}` is not a whole number"))?;
    if n < min || n > max {
        return Err(format!("`{s}` is out of range: must be between {min} and {max}"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn durations_are_range_checked_and_never_negative() {
        assert_eq!(duration_in("1m 30s", S(1), S(3600)), Ok(S(90)));
        assert!(duration_in("-5s", S(0), S(10)).unwrap_err().contains("negative"));
        assert!(duration_in("10h", S(1), S(32767)).unwrap_err().contains("out of range"));
        assert!(duration_in("soon", S(1), S(10)).is_err());
        assert_eq!(optional_duration_in("OFF", S(1), S(2)), Ok(OptionalDuration(None)));
        assert!(whole_seconds_in("1500ms", 1, 10).unwrap_err().contains("whole"));
        assert_eq!(whole_seconds_in("2s", 1, 10), Ok(S(2)));
    }

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size("64KiB"), Ok(64 << 10));
        assert_eq!(size("64 K"), Ok(64 << 10));
        assert_eq!(size("1MiB"), Ok(1 << 20));
        assert_eq!(size("2G"), Ok(2 << 30));
        assert_eq!(size("64kB"), Ok(64_000));
        assert_eq!(size("1MB"), Ok(1_000_000));
        assert!(size("-1MiB").unwrap_err().contains("negative"));
        assert!(size("1 parsec").unwrap_err().contains("unknown unit"));
        assert!(size("MiB").is_err());
        assert!(size("99999999999999999999").is_err());
        assert!(size("18446744073709551615GiB").unwrap_err().contains("too large"));
        assert!(size_in("1KiB", 4096, 8192).unwrap_err().contains("4KiB"));
        assert_eq!(format_size(3 << 20), "3MiB");
        assert_eq!(format_size(1000), "1000B");
    }

    #[test]
    fn counts_and_addresses() {
        assert_eq!(count_in("3", 1, 127), Ok(3));
        assert!(count_in("0", 1, 127).is_err());
        assert!(count_in("-1", 1, 127).is_err());
        assert_eq!(optional_addr("off"), Ok(OptionalAddr(None)));
        assert!(optional_addr("nope").is_err());
    }
}

//! The process-wide budget for echo buffers (`--max-buffer-memory`).
//!
//! A copy phase of buffer size `s` holds at most `3 × s` bytes: the copy's two buffers and the
//! loop, which grows up to `s`. Every phase leases that from the budget when it starts and
//! returns it when it ends (also when its future is dropped). A phase at the smallest size is
//! always granted, so every client can be served whatever the others hold; a phase with bigger
//! buffers is granted only within the budget, else it runs at the largest size that fits. So the
//! echo memory of the whole process is at most `max(budget, copying connections × 3 × smallest
//! size)`, which `--max-connections` bounds in turn; quiet connections hold nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Echo memory a copy phase with buffers of `size` bytes may hold.
pub(crate) const fn phase_cost(size: usize) -> usize {
    3 * size
}

/// The budget: its limit and what the running copy phases hold.
pub struct Budget {
    limit: usize,
    /// Smallest buffer size: phases of this size are always granted.
    base: usize,
    used: AtomicUsize,
    copying: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize, base: usize) -> Budget {
        Budget { limit, base, used: AtomicUsize::new(0), copying: AtomicUsize::new(0) }
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes leased by running copy phases.
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// Connections in a copy phase now.
    pub fn copying(&self) -> usize {
        self.copying.load(Relaxed)
    }

    /// Leases a phase of the largest size not above `wanted` (halving by 4, as buffers grow)
    /// that fits the budget, or of the base size, which always fits. Returns the size granted;
    /// [`Budget::release`] must be called with it when the phase ends.
    pub(crate) fn lease(&self, wanted: usize) -> usize {
        self.copying.fetch_add(1, Relaxed);
        let mut size = wanted.max(self.base);
        while size > self.base {
            if self.try_take(phase_cost(size)) {
                return size;
            }
            size = (size / 4).max(self.base);
        }
        self.used.fetch_add(phase_cost(self.base), Relaxed);
        self.base
    }

    /// Whether a phase of `size` could be granted now (a hint: another phase may take the room
    /// first, and then the lease falls back to a smaller size).
    pub(crate) fn has_room(&self, size: usize) -> bool {
        self.used() + phase_cost(size) <= self.limit
    }

    fn try_take(&self, cost: usize) -> bool {
        self.used
            .fetch_update(Relaxed, Relaxed, |used| {
                used.checked_add(cost).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// Returns a phase's lease.
    pub(crate) fn release(&self, size: usize) {
        self.used.fetch_sub(phase_cost(size), Relaxed);
        self.copying.fetch_sub(1, Relaxed);
    }
}

/// Where the default limit came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitSource {
    Flag,
    /// Half of this cgroup's memory limit.
    Cgroup(u64),
    /// A quarter of the machine's memory.
    Machine(u64),
    /// Neither could be read.
    Fallback,
}

/// The limit when the flag says `auto`.
pub const FALLBACK_LIMIT: u64 = 1 << 30;

/// The default budget: half of the cgroup's memory limit (the container's or the unit's), else
/// a quarter of the machine's memory, else [`FALLBACK_LIMIT`].
pub fn default_limit() -> (u64, LimitSource) {
    if let Some(limit) = cgroup_memory_limit(Path::new("/proc/self/cgroup"), Path::new("/sys/fs/cgroup")) {
        return (limit / 2, LimitSource::Cgroup(limit));
    }
    if let Some(total) = machine_memory() {
        return (total / 4, LimitSource::Machine(total));
    }
    (FALLBACK_LIMIT, LimitSource::Fallback)
}

/// The tightest memory limit on this process's cgroup or its ancestors (cgroup v2
/// `memory.max`), or the v1 `memory.limit_in_bytes`; `None` when unlimited or unreadable.
fn cgroup_memory_limit(self_cgroup: &Path, root: &Path) -> Option<u64> {
    let membership = fs::read_to_string(self_cgroup).ok()?;
    let mut tightest: Option<u64> = None;
    let mut consider = |value: Option<u64>| {
        if let Some(v) = value {
            tightest = Some(tightest.map_or(v, |t| t.min(v)));
        }
    };
    for line in membership.lines() {
        // v2: "0::/path"; v1: "N:controllers:/path".
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        if controllers.is_empty() {
            let mut dir: PathBuf = root.join(relative);
            loop {
                consider(read_limit(&dir.join("memory.max")));
                if dir == root || !dir.pop() || !dir.starts_with(root) {
                    break;
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            for dir in [root.join("memory").join(relative), root.join("memory")] {
                consider(read_limit(&dir.join("memory.limit_in_bytes")));
            }
        }
    }
    tightest
}

/// A limit file's value; `max` and v1's "no limit" (a page-aligned value near `i64::MAX`) are
/// no limit.
fn read_limit(file: &Path) -> Option<u64> {
    let text = fs::read_to_string(file).ok()?;
    let value: u64 = text.trim().parse().ok()?;
    (value < 1 << 62).then_some(value)
}

/// Total memory of the machine (Linux `/proc/meminfo`).
fn machine_memory() -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_grow_only_within_the_budget_and_the_base_always_fits() {
        let base = 4096;
        let budget = Budget::new(phase_cost(64 * 1024) + phase_cost(base), base);
        assert_eq!(budget.lease(64 * 1024), 64 * 1024);
        assert_eq!(budget.copying(), 1);
        // The next big phase falls back to the largest size that fits: here the base... which
        // always fits, even past the limit.
        assert_eq!(budget.lease(256 * 1024), 4096);
        assert_eq!(budget.lease(16 * 1024), 4096, "no room left for 16 KiB");
        assert!(budget.used() > budget.limit(), "base phases may exceed the budget");
        assert!(!budget.has_room(16 * 1024));
        budget.release(64 * 1024);
        assert!(budget.has_room(16 * 1024));
        assert_eq!(budget.lease(16 * 1024), 16 * 1024);
        budget.release(16 * 1024);
        budget.release(4096);
        budget.release(4096);
        assert_eq!((budget.used(), budget.copying()), (0, 0));
    }

    #[test]
    fn cgroup_limits_are_read_from_v2_and_v1_layouts() {
        let dir = std::env::temp_dir().join(format!("echod-cgroup-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let v2 = dir.join("v2");
        fs::create_dir_all(v2.join("kubepods/pod1")).unwrap();
        fs::write(v2.join("memory.max"), "max\n").unwrap();
        fs::write(v2.join("kubepods/memory.max"), "1073741824\n").unwrap();
        fs::write(v2.join("kubepods/pod1/memory.max"), "max\n").unwrap();
        fs::write(dir.join("self-v2"), "0::/kubepods/pod1\n").unwrap();
        assert_eq!(cgroup_memory_limit(&dir.join("self-v2"), &v2), Some(1 << 30), "a parent's limit counts");

        let v1 = dir.join("v1");
        fs::create_dir_all(v1.join("memory/docker/abc")).unwrap();
        fs::write(v1.join("memory/docker/abc/memory.limit_in_bytes"), "268435456\n").unwrap();
        fs::write(dir.join("self-v1"), "12:cpu,cpuacct:/docker/abc\n9:memory:/docker/abc\n").unwrap();
        assert_eq!(cgroup_memory_limit(&dir.join("self-v1"), &v1), Some(256 << 20));

        fs::write(v2.join("kubepods/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_memory_limit(&dir.join("self-v2"), &v2), None, "unlimited");
        fs::remove_dir_all(&dir).unwrap();
    }
}

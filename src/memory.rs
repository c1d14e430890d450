//! Which allocator the echod binary uses, and why: what an idle connection costs in RSS is
//! mostly decided by the allocator, not by echod's own structures.
//!
//! An idle connection holds 640 live bytes (its task, 384 B, and its socket's registration in
//! the runtime, 256 B). Getting RSS near that takes two things from the allocator:
//!
//! * **Transient and long-lived allocations apart.** A connection's copy phase (its state, its
//!   buffers, the loop) is allocated between the tasks of connections that stay, and freed a tick
//!   after the traffic stops. glibc's malloc carves both from the same heap, so the freed copy
//!   state leaves holes between live tasks that no page can be returned from: 1.9 KiB of RSS per
//!   idle connection at best (with every buffer mmapped on its own), 10 KiB with its defaults.
//!   jemalloc keeps each size class on slabs of its own, so the copy phases' slabs empty out
//!   completely once the connections go quiet.
//! * **Freed pages given back while the server is idle.** jemalloc returns emptied pages after a
//!   decay time, but only when some thread allocates or frees to drive it; an idle server does
//!   neither. So a background thread purges them: `background_thread:true`, one of them.
//!   Dirty pages are kept for `dirty_decay_ms` (1 s) so bursts of connections reuse them without
//!   a system call, then unmapped at once (`muzzy_decay_ms:0`: `MADV_FREE`d pages would still
//!   count in RSS until the kernel needs them).
//!
//! Measured at 10,000 held connections with `bench/run`: 0.92 KiB of RSS per idle connection
//! (glibc with 4 KiB mmap threshold: 1.9 KiB; the baseline echo: 4.75 KiB). Purging at once
//! (`dirty_decay_ms:0`) gets the same figure but raises churn's CPU per connection from
//! 0.81–0.85× the baseline's to 1.11–1.27×, unmapping and faulting pages for every short
//! connection. mimalloc was also measured: it keeps
//! a page freed by another worker thread until its owning thread allocates again, which an idle
//! worker never does (5 KiB per connection with two workers).
//!
//! The binary installs jemalloc on Linux (cargo feature `jemalloc`, on by default); the library
//! uses whatever allocator its embedder chose.

/// jemalloc's options for the echod binary, as a C string (jemalloc's `malloc_conf`). The
/// environment variable `_RJEM_MALLOC_CONF` overrides them at start.
pub const JEMALLOC_OPTIONS: &[u8; 85] =
    b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

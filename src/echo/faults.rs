//! Faults injected into the echo on purpose (`--listen ...?delay=...&rate=...`): a [`Pace`] for
//! the loop between the two copies, which is where time and bytes can be held back.
//!
//! * **delay**: every byte entering the loop is stamped with the time it becomes readable; the
//!   loop releases only bytes whose time has come. A pipeline: twenty messages sent together come
//!   back together, one delay later.
//! * **rate**: a token bucket in front of the loop's reader (burst: 50 ms of the rate, at least
//!   1 byte, at most 64 KiB). The loop then fills, the copy stops reading, and backpressure reaches
//!   the client as on a slow path.
//! * **stall/close/reset points**: the loop releases exactly up to the point (a count of bytes
//!   echoed over the connection's life). At a stall it releases nothing more and takes no more
//!   input; at a close it reports EOF (the copy sends a FIN after exactly those bytes); at a
//!   reset it holds the rest back and the copy phase resets the socket once every byte up to the
//!   point has been sent.
//!
//! A listener without faults uses [`Plain`](super::ring::Plain), for which all of this compiles
//! away.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::ring::{Pace, PaceEnd};
use super::traffic::Traffic;
use crate::config::{ByteCount, FaultSpec};
use crate::metrics::CloseReason;
#[cfg(test)]
use crate::random::chance;
use crate::random::random_u64;

/// A point drawn uniformly from `range`.
fn draw(range: ByteCount) -> u64 {
    match range.max - range.min {
        0 => range.min,
        span => range.min + random_u64() % span.saturating_add(1),
    }
}

/// What happens at the first point reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    Stall,
    Close,
    Reset,
}

/// One connection's faults and their state, kept across copy phases.
pub(crate) struct Faults {
    delay: Option<Delay>,
    rate: Option<Bucket>,
    /// The first of the stall, close and reset points, in bytes echoed, and what it does.
    point: Option<(u64, Point)>,
    /// Bytes released to the copy's reader over the connection's life.
    released: u64,
    timer: Option<Pin<Box<Sleep>>>,
    ended: Option<CloseReason>,
}

struct Delay {
    by: Duration,
    /// Bytes in the loop, in order, with the time each run becomes readable.
    arrivals: VecDeque<(Instant, usize)>,
}

struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl Faults {
    /// The faults of one new connection of a listener with `spec` (random points drawn now).
    pub(crate) fn new(spec: &FaultSpec) -> Faults {
        let mut points: Vec<(u64, Point)> = Vec::new();
        if let Some(n) = spec.stall_after {
            points.push((n, Point::Stall));
        }
        if let Some(range) = spec.close_after {
            points.push((draw(range), Point::Close));
        }
        if let Some(range) = spec.reset_after {
            points.push((draw(range), Point::Reset));
        }
        let point = points.into_iter().min_by_key(|&(at, _)| at);
        Faults {
            delay: spec.delay.map(|by| Delay { by, arrivals: VecDeque::new() }),
            rate: spec.rate.map(|rate| {
                let rate = rate as f64;
                let burst = (rate / 20.0).clamp(1.0, 64.0 * 1024.0);
                Bucket { rate, burst, tokens: burst, refilled: Instant::now() }
            }),
            point,
            released: 0,
            timer: None,
            ended: None,
        }
    }

    /// Sleeps until `at`, registering `cx` to be woken then. Returns `true` if `at` has already
    /// passed.
    fn wait_until(&mut self, cx: &mut Context<'_>, at: Instant) -> bool {
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

impl Pace for Faults {
    const ACTIVE: bool = true;

    fn on_write(&mut self, _buffered: usize, n: usize) {
        if let Some(delay) = &mut self.delay {
            delay.arrivals.push_back((Instant::now() + delay.by, n));
        }
    }

    fn readable(&mut self, cx: &mut Context<'_>, buffered: usize) -> Result<usize, PaceEnd> {
        let mut allowed = buffered;
        if let Some((at, point)) = self.point {
            let left = at.saturating_sub(self.released);
            if left == 0 {
                return match point {
                    Point::Close => {
                        self.ended = Some(CloseReason::InjectedClose);
                        Err(PaceEnd::Close)
                    }
                    // A stall holds everything; a reset holds the rest until the copy phase
                    // resets the socket.
                    Point::Stall | Point::Reset => Ok(0),
                };
            }
            allowed = allowed.min(usize::try_from(left).unwrap_or(usize::MAX));
        }
        if allowed == 0 {
            return Ok(0);
        }
        let now = Instant::now();
        if let Some(delay) = &self.delay {
            let due: usize = delay.arrivals.iter().take_while(|(at, _)| *at <= now).map(|&(_, n)| n).sum();
            if due == 0 {
                let next = delay.arrivals.front().map(|&(at, _)| at);
                if let Some(next) = next {
                    if !self.wait_until(cx, next) {
                        return Ok(0);
                    }
                    // The timer fired between the two clock reads: poll again at once.
                    cx.waker().wake_by_ref();
                }
                return Ok(0);
            }
            allowed = allowed.min(due);
        }
        if let Some(bucket) = &mut self.rate {
            let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * bucket.rate).min(bucket.burst);
            bucket.refilled = now;
            // Release whole chunks: wait until the tokens cover what is waiting, or a burst.
            let wanted = (allowed as f64).min(bucket.burst);
            if bucket.tokens < wanted {
                let wait = Duration::from_secs_f64((wanted - bucket.tokens) / bucket.rate);
                let at = now + wait.max(Duration::from_millis(1));
                if self.wait_until(cx, at) {
                    cx.waker().wake_by_ref();
                }
                return Ok(0);
            }
            allowed = allowed.min(bucket.tokens as usize);
        }
        Ok(allowed)
    }

    fn on_read(&mut self, n: usize) {
        self.released += n as u64;
        if let Some(bucket) = &mut self.rate {
            bucket.tokens -= n as f64;
        }
        if let Some(delay) = &mut self.delay {
            let mut left = n;
            while left > 0 {
                let Some(front) = delay.arrivals.front_mut() else { break };
                if front.1 <= left {
                    left -= front.1;
                    delay.arrivals.pop_front();
                } else {
                    front.1 -= left;
                    left = 0;
                }
            }
        }
    }

    fn accepts_input(&self) -> bool {
        !matches!(self.point, Some((at, Point::Stall)) if self.released >= at)
    }

    fn start_phase(&mut self, traffic: &Traffic) {
        if let Some((at, Point::Reset)) = self.point {
            traffic.reset_at.store(at, Relaxed);
        }
    }

    fn close_reason(&self) -> Option<CloseReason> {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    fn spec(f: impl FnOnce(&mut FaultSpec)) -> FaultSpec {
        let mut s = FaultSpec::default();
        f(&mut s);
        s
    }

    #[test]
    fn points_release_exactly_up_to_the_first_point() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut f = Faults::new(&spec(|s| {
            s.close_after = Some(ByteCount { min: 10, max: 10 });
            s.reset_after = Some(ByteCount { min: 20, max: 20 });
        }));
        assert_eq!(f.readable(&mut cx, 64), Ok(10));
        f.on_read(10);
        assert_eq!(f.readable(&mut cx, 54), Err(PaceEnd::Close));
        assert_eq!(f.close_reason(), Some(CloseReason::InjectedClose));

        let mut f = Faults::new(&spec(|s| s.stall_after = Some(5)));
        assert_eq!(f.readable(&mut cx, 3), Ok(3));
        f.on_read(3);
        assert!(f.accepts_input());
        assert_eq!(f.readable(&mut cx, 9), Ok(2));
        f.on_read(2);
        assert_eq!(f.readable(&mut cx, 9), Ok(0));
        assert!(!f.accepts_input(), "a stall stops reading");
    }

    #[test]
    fn ranges_draw_within_bounds_and_chance_is_exact_at_the_ends() {
        for _ in 0..1000 {
            let n = draw(ByteCount { min: 100, max: 200 });
            assert!((100..=200).contains(&n));
        }
        let _ = draw(ByteCount { min: 0, max: u64::MAX });
        assert!((0..1000).all(|_| !chance(0.0)));
        assert!((0..1000).all(|_| chance(1.0)));
        let hits = (0..10_000).filter(|_| chance(0.5)).count();
        assert!((4_000..6_000).contains(&hits), "{hits}");
    }

    #[tokio::test(start_paused = true)]
    async fn delay_releases_bytes_only_when_due() {
        let mut f = Faults::new(&spec(|s| s.delay = Some(Duration::from_millis(100))));
        let mut cx = Context::from_waker(Waker::noop());
        f.on_write(0, 5);
        tokio::time::advance(Duration::from_millis(50)).await;
        f.on_write(5, 7);
        assert_eq!(f.readable(&mut cx, 12), Ok(0), "nothing due yet");
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(f.readable(&mut cx, 12), Ok(5), "the first run is due");
        f.on_read(5);
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(f.readable(&mut cx, 7), Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_releases_at_its_pace() {
        // 1,000 B/s: a burst of 50 B, then 50 B per 50 ms.
        let mut f = Faults::new(&spec(|s| s.rate = Some(1000)));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(f.readable(&mut cx, 500), Ok(50));
        f.on_read(50);
        assert_eq!(f.readable(&mut cx, 450), Ok(0));
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(f.readable(&mut cx, 450), Ok(50));
    }
}

//! One copy phase's byte counts and flags, shared by the metered socket, the loop and the phase's
//! watch.
//!
//! Only the connection's own task touches them, so the atomics are uncontended: single-writer
//! loads and stores, no read-modify-write. (They are atomics rather than `Cell`s because the
//! phase's future must be `Send`, and its parts hold `&Traffic`.)

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};

use crate::metrics::Published;

pub(crate) struct Traffic {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    /// The client's FIN has been read: the copy is finishing and must not be interrupted.
    pub eof: AtomicBool,
    /// A read filled the whole buffer: the client stream's reader holds off until the echo
    /// has caught up (balanced), and the read then ends the phase to grow.
    pub grow: AtomicBool,
    /// What the last read of the client stream returned: [`Traffic::NOTHING_YET`],
    /// [`Traffic::DATA`] or [`Traffic::DRAINED`].
    pub reading: AtomicU8,
    /// Bytes written to a stream that buffers writes (TLS) and not yet flushed.
    pub unflushed: AtomicBool,
    /// The loop's reader last returned `Pending` (see `ring`).
    pub reader_parked: AtomicBool,
    /// Data or EOF reached the loop while its reader was parked: poll the copy again.
    pub reader_wanted: AtomicBool,
    /// The loop's writer last returned `Pending`: the loop was full.
    pub writer_parked: AtomicBool,
    /// The reader made room while the writer was parked: poll the copy again.
    pub writer_wanted: AtomicBool,
    /// A fault resets the connection once this many bytes have been sent (`u64::MAX`: never).
    pub reset_at: AtomicU64,
}

impl Traffic {
    /// The reads of this phase have found nothing yet (pending, or not polled).
    pub const NOTHING_YET: u8 = 0;
    /// The last read returned data (or the end of the stream).
    pub const DATA: u8 = 1;
    /// The last read was pending, after this phase had read data.
    pub const DRAINED: u8 = 2;

    /// Counts continuing from the connection's totals so far.
    pub fn new(totals: Published) -> Traffic {
        Traffic {
            received: AtomicU64::new(totals.received),
            sent: AtomicU64::new(totals.sent),
            eof: AtomicBool::new(false),
            grow: AtomicBool::new(false),
            reading: AtomicU8::new(Traffic::NOTHING_YET),
            unflushed: AtomicBool::new(false),
            reader_parked: AtomicBool::new(false),
            reader_wanted: AtomicBool::new(false),
            writer_parked: AtomicBool::new(false),
            writer_wanted: AtomicBool::new(false),
            reset_at: AtomicU64::new(u64::MAX),
        }
    }

    pub fn add(counter: &AtomicU64, n: usize) {
        counter.store(counter.load(Relaxed) + n as u64, Relaxed);
    }

    pub fn totals(&self) -> (u64, u64) {
        (self.received.load(Relaxed), self.sent.load(Relaxed))
    }

    /// Every byte received has been echoed and flushed: nothing is buffered anywhere in the
    /// connection, so the copy can be dropped without losing a byte.
    pub fn balanced(&self) -> bool {
        let (received, sent) = self.totals();
        received == sent && !self.unflushed.load(Relaxed)
    }

    /// Everything written to the client stream has been flushed to the socket.
    pub fn flushed(&self) -> bool {
        !self.unflushed.load(Relaxed)
    }

    /// Balanced, and the client has nothing more waiting to be read: the phase has done all there
    /// is to do for now.
    pub fn drained(&self) -> bool {
        self.reading.load(Relaxed) != Traffic::DATA && !self.eof.load(Relaxed) && self.balanced()
    }

    /// Drained after echoing something in this phase (a phase started by a stale readiness has
    /// echoed nothing yet, and is not done).
    pub fn echoed_and_drained(&self) -> bool {
        self.reading.load(Relaxed) == Traffic::DRAINED && !self.eof.load(Relaxed) && self.balanced()
    }

    /// One end of the loop unblocked the other: the copy must be polled again.
    pub fn wanted(&self) -> bool {
        self.reader_wanted.load(Relaxed) || self.writer_wanted.load(Relaxed)
    }

    /// After a write or flush to the client: if a read has filled the buffer (the client
    /// stream's reader then holds off, to grow) and the echo has now caught up, have the copy
    /// polled again, and that read ends the phase to grow. It borrows the loop writer's flag
    /// rather than a field of its own: one more flag would take the phase's state past its size
    /// bound (a test in `connection`). Not the reader's: the loop's reader is polled again later
    /// in the same poll and clears its flag, which would lose this wake; the loop's writer (the
    /// client-to-loop direction, polled first) is not polled again before the copy is.
    pub fn note_echo_progress(&self) {
        if self.grow.load(Relaxed) && self.balanced() {
            self.writer_wanted.store(true, Relaxed);
        }
    }
}

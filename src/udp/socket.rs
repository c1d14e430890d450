//! UDP sockets: binding them, and moving batches of datagrams through them.
//!
//! On Linux a batch is received with one `recvmmsg` and answered with one `sendmmsg` (up to
//! [`BATCH`] datagrams each), straight into and out of buffers the loop allocated once, the
//! source address of each datagram becoming the destination of its reply. Elsewhere (Windows,
//! the BSDs, macOS) the batch is gathered with one non-blocking `recvfrom` per datagram and
//! answered with one `sendto` each: the same loop, without the system calls that take many
//! datagrams at once.
//!
//! Sends never wait: a datagram whose send would block (the socket's send buffer is full) is
//! dropped and counted, so nothing queues in echod.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use crate::metrics::{UdpDrop, UdpTally};

/// Datagrams received (and answered) per system call.
pub const BATCH: usize = 64;

/// Bytes of each datagram's slot: more than the largest UDP payload (65,507 bytes over IPv4,
/// 65,527 over IPv6), so no datagram is ever cut short.
pub const SLOT: usize = 65_536;

/// Socket buffer sizes as requested and as granted by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffers {
    pub requested: usize,
    pub receive: usize,
    pub send: usize,
}

impl Buffers {
    /// Whether the kernel gave less than asked for either direction.
    pub fn capped(&self) -> bool {
        self.receive < self.requested || self.send < self.requested
    }
}

/// Binds one UDP socket: non-blocking, IPv6 sockets IPv6-only (so `0.0.0.0:P` and `[::]:P` can
/// both be served), the given buffers, and `SO_REUSEPORT` when several sockets of this process
/// share the address (Linux).
pub fn bind(addr: SocketAddr, buffer: usize, reuse_port: bool) -> io::Result<(Socket, Buffers)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    #[cfg(target_os = "linux")]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = reuse_port;
    socket.set_nonblocking(true)?;
    // The kernel caps these silently at its maximum; what was granted is read back below.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    let buffers = Buffers {
        requested: buffer,
        receive: granted(socket.recv_buffer_size()?),
        send: granted(socket.send_buffer_size()?),
    };
    Ok((socket, buffers))
}

/// The buffer size the application asked for, from what the kernel reports: Linux reports
/// twice the size granted (the other half is its bookkeeping).
fn granted(reported: usize) -> usize {
    if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    }
}

/// What became of the datagrams of one batch's send.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub datagrams: u64,
    pub bytes: u64,
    /// Datagrams not sent: the send would have blocked, or failed.
    pub failed: u64,
}

impl Sent {
    /// Adds what a batch's send did to its tally: replies sent, and those that could not be
    /// (`send_error`).
    pub fn add_to(&self, tally: &mut UdpTally) {
        tally.sent += self.datagrams;
        tally.bytes_sent += self.bytes;
        tally.dropped[UdpDrop::SendError as usize] += self.failed;
    }
}

#[cfg(target_os = "linux")]
pub use linux::Batch;

#[cfg(not(target_os = "linux"))]
pub use portable::Batch;

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::mem::{size_of, zeroed};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::RawFd;
    use std::ptr;

    use super::{Sent, BATCH, SLOT};

    /// One loop's buffers and message headers, allocated once.
    pub struct Batch {
        data: Box<[u8]>,
        names: Box<[libc::sockaddr_storage]>,
        iov: Box<[libc::iovec]>,
        recv: Box<[libc::mmsghdr]>,
        send: Box<[libc::mmsghdr]>,
        /// Source of each received datagram.
        sources: Box<[SocketAddr]>,
        /// Which received datagrams are answered.
        answer: Box<[bool]>,
        received: usize,
    }

    impl Default for Batch {
        fn default() -> Batch {
            Batch::new()
        }
    }

    // SAFETY: the raw pointers in the headers point only into the boxed slices this batch owns
    // (heap memory that does not move with the struct); nothing else holds them.
    unsafe impl Send for Batch {}

    impl Batch {
        pub fn new() -> Batch {
            // SAFETY: all-zero is a valid value of these plain C structs.
            let zero_name: libc::sockaddr_storage = unsafe { zeroed() };
            let zero_msg: libc::mmsghdr = unsafe { zeroed() };
            let mut b = Batch {
                data: vec![0u8; BATCH * SLOT].into_boxed_slice(),
                names: vec![zero_name; BATCH].into_boxed_slice(),
                iov: vec![libc::iovec { iov_base: ptr::null_mut(), iov_len: 0 }; BATCH].into_boxed_slice(),
                recv: vec![zero_msg; BATCH].into_boxed_slice(),
                send: vec![zero_msg; BATCH].into_boxed_slice(),
                sources: vec![SocketAddr::from(([0, 0, 0, 0], 0)); BATCH].into_boxed_slice(),
                answer: vec![false; BATCH].into_boxed_slice(),
                received: 0,
            };
            for i in 0..BATCH {
                b.iov[i].iov_base = b.data[i * SLOT..].as_mut_ptr().cast();
                let hdr = &mut b.recv[i].msg_hdr;
                hdr.msg_name = (&mut b.names[i] as *mut libc::sockaddr_storage).cast();
                hdr.msg_iov = &mut b.iov[i];
                hdr.msg_iovlen = 1;
            }
            b
        }

        /// Receives up to [`BATCH`] datagrams without waiting; returns how many (0 when none
        /// was waiting: `WouldBlock`).
        pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
            self.received = 0;
            for i in 0..BATCH {
                self.iov[i].iov_len = SLOT;
                let hdr = &mut self.recv[i].msg_hdr;
                hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                hdr.msg_flags = 0;
                self.recv[i].msg_len = 0;
            }
            // SAFETY: the headers point at this batch's own names, iovecs and slots, each
            // sized as their lengths say; the kernel writes at most that much.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.recv.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            for i in 0..n {
                let len = self.recv[i].msg_len as usize;
                self.iov[i].iov_len = len;
                let hdr = &self.recv[i].msg_hdr;
                // A cut datagram cannot be echoed unchanged; with slots larger than any UDP
                // payload it never happens.
                let whole = hdr.msg_flags & libc::MSG_TRUNC == 0;
                match (whole, socket_addr(&self.names[i])) {
                    (true, Some(source)) => {
                        self.sources[i] = source;
                        self.answer[i] = true;
                    }
                    _ => {
                        self.sources[i] = SocketAddr::from(([0, 0, 0, 0], 0));
                        self.answer[i] = false;
                    }
                }
            }
            self.received = n;
            Ok(n)
        }

        /// The length of datagram `i` of the last [`recv`](Batch::recv).
        pub fn datagram_len(&self, i: usize) -> usize {
            self.iov[i].iov_len
        }

        pub fn source(&self, i: usize) -> SocketAddr {
            self.sources[i]
        }

        pub fn received(&self) -> usize {
            self.received
        }

        /// Whether datagram `i` could be received whole (and so may be answered).
        pub fn whole(&self, i: usize) -> bool {
            self.answer[i]
        }

        /// Leaves datagram `i` unanswered.
        pub fn drop_datagram(&mut self, i: usize) {
            self.answer[i] = false;
        }

        /// Sends every datagram still to be answered back to its source, without waiting.
        pub fn send(&mut self, fd: RawFd) -> Sent {
            let mut count = 0;
            for i in 0..self.received {
                if self.answer[i] {
                    let mut hdr = self.recv[i].msg_hdr;
                    hdr.msg_flags = 0;
                    self.send[count].msg_hdr = hdr;
                    self.send[count].msg_len = 0;
                    count += 1;
                }
            }
            let mut sent = Sent::default();
            let mut at = 0;
            // Each round sends at least one datagram or gives one (or all) up: at most `count`
            // rounds, plus a few interrupted ones.
            let mut interrupted = 0;
            while at < count {
                // SAFETY: the headers were copied from the receive headers, which point at
                // this batch's own names and iovecs; the kernel only reads through them.
                let n = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.send[at..].as_mut_ptr(),
                        (count - at) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    let n = n as usize;
                    for m in &self.send[at..at + n] {
                        // SAFETY: msg_iov points at one of this batch's iovecs.
                        sent.bytes += unsafe { (*m.msg_hdr.msg_iov).iov_len } as u64;
                    }
                    sent.datagrams += n as u64;
                    at += n;
                    continue;
                }
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) if interrupted < 8 => interrupted += 1,
                    // The send buffer is full: everything left would block too.
                    Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                        sent.failed += (count - at) as u64;
                        break;
                    }
                    // This one datagram cannot be sent (its destination is unreachable, say):
                    // give it up and go on with the rest.
                    _ => {
                        tracing::debug!(error = %err, "UDP reply not sent");
                        sent.failed += 1;
                        at += 1;
                    }
                }
            }
            sent
        }
    }

    /// The address in a `sockaddr_storage` the kernel filled.
    fn socket_addr(name: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match i32::from(name.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in, which it is large
                // and aligned enough for.
                let sin = unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for sockaddr_in6.
                let sin6 = unsafe { &*(name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    u32::from_be(sin6.sin6_flowinfo),
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod portable {
    use std::io;
    use std::net::SocketAddr;

    use tokio::net::UdpSocket;

    use super::{Sent, BATCH, SLOT};

    /// One loop's buffers, allocated once.
    pub struct Batch {
        data: Box<[u8]>,
        lens: [usize; BATCH],
        sources: [SocketAddr; BATCH],
        answer: [bool; BATCH],
        received: usize,
    }

    impl Default for Batch {
        fn default() -> Batch {
            Batch::new()
        }
    }

    impl Batch {
        pub fn new() -> Batch {
            Batch {
                data: vec![0u8; BATCH * SLOT].into_boxed_slice(),
                lens: [0; BATCH],
                sources: [SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
                answer: [false; BATCH],
                received: 0,
            }
        }

        /// Receives what is waiting, up to [`BATCH`] datagrams, without waiting; returns how
        /// many (`WouldBlock` when none was).
        pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
            self.received = 0;
            // Bounded: each attempt either fills a slot or is one of a few skipped errors.
            for _ in 0..2 * BATCH {
                if self.received == BATCH {
                    break;
                }
                let i = self.received;
                match socket.try_recv_from(&mut self.data[i * SLOT..(i + 1) * SLOT]) {
                    Ok((len, source)) => {
                        self.lens[i] = len;
                        self.sources[i] = source;
                        self.answer[i] = true;
                        self.received += 1;
                    }
                    // Windows reports an ICMP port unreachable (a reply to a source that has
                    // gone) on the next receive: nothing to do with the datagrams waiting.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => continue,
                    Err(e) if self.received == 0 => return Err(e),
                    Err(_) => break,
                }
            }
            Ok(self.received)
        }

        pub fn datagram_len(&self, i: usize) -> usize {
            self.lens[i]
        }

        pub fn source(&self, i: usize) -> SocketAddr {
            self.sources[i]
        }

        pub fn received(&self) -> usize {
            self.received
        }

        pub fn whole(&self, i: usize) -> bool {
            self.answer[i]
        }

        pub fn drop_datagram(&mut self, i: usize) {
            self.answer[i] = false;
        }

        /// Sends every datagram still to be answered back to its source, without waiting.
        pub fn send(&mut self, socket: &UdpSocket) -> Sent {
            let mut sent = Sent::default();
            for i in 0..self.received {
                if !self.answer[i] {
                    continue;
                }
                let len = self.lens[i];
                match socket.try_send_to(&self.data[i * SLOT..i * SLOT + len], self.sources[i]) {
                    Ok(n) if n == len => {
                        sent.datagrams += 1;
                        sent.bytes += n as u64;
                    }
                    Ok(_) => sent.failed += 1,
                    Err(e) => {
                        tracing::debug!(error = %e, "UDP reply not sent");
                        sent.failed += 1;
                    }
                }
            }
            sent
        }
    }
}

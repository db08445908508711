//! The one place with `unsafe`: batch socket syscalls, socket options the standard library
//! lacks, and read-only file mappings. Everything here has a small safe API.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Room for one `SO_RXQ_OVFL` control message (a `u32`) with its header and padding.
const CMSG_BYTES: usize = 64;

/// Maps `file` read-only. An empty file gives an empty slice without a mapping.
pub fn map_read_only(file: &File) -> io::Result<Mapped> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Mapped(None));
    }
    // SAFETY: the store only ever appends to a log or replaces it whole with rename(2); it
    // never truncates a mapped file in place (see `store`), so the mapped pages stay backed for
    // the mapping's lifetime. Bytes being appended while we read are covered by the block
    // checksums, which reject a half-written block.
    let map = unsafe { memmap2::Mmap::map(file)? };
    Ok(Mapped(Some(map)))
}

/// A read-only view of a whole file.
pub struct Mapped(Option<memmap2::Mmap>);

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        match &self.0 {
            Some(map) => map,
            None => &[],
        }
    }
}

/// Space left for an unprivileged writer on the file system holding `path`: (bytes, inodes).
pub fn free_space(path: &std::path::Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: zero is a valid statvfs; `c_path` is NUL-terminated and outlives the call,
    // which only writes into `stats`.
    let mut stats: libc::statvfs = unsafe { mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // The statvfs fields are u64 on Linux' 64-bit targets.
    Ok((
        stats.f_bavail.saturating_mul(stats.f_frsize),
        stats.f_favail,
    ))
}

/// Reserves `len` bytes of disk for `file` (`posix_fallocate`), so that writing through a
/// mapping of it can never fail for lack of space (which would be a SIGBUS, not an error).
pub fn reserve(file: &File, len: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscall on a valid, open descriptor; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Maps `file` read-write and shared: stores reach the page cache at once and survive the
/// death of the process. The file must have been [`reserve`]d to its full length.
pub fn map_read_write(file: &File) -> io::Result<memmap2::MmapMut> {
    // SAFETY: the only files mapped this way are journals, each private to the writer that
    // holds its writer lock; nothing else truncates or writes them while mapped, and their
    // blocks are reserved, so no store through the mapping can fault.
    unsafe { memmap2::MmapMut::map_mut(file) }
}

/// Makes the directory `name` inside the open directory `dir` (`mkdirat`) with `mode`: the
/// kernel walks no path above `dir`. Like `mkdir`, it never follows a link at `name`.
pub fn mkdir_at(dir: &File, name: &std::ffi::CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is an open descriptor.
    let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens `name` relative to the open directory `dir` (`openat`) with `flags`, and `mode` for
/// a file it creates.
pub fn open_at(
    dir: &File,
    name: &std::ffi::CStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<File> {
    // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is an open descriptor.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and nothing else owns it.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How [`bind_udp`] sets a UDP socket up.
#[derive(Debug, Clone, Copy)]
pub struct UdpSetup {
    /// Receive buffer to ask for, in bytes; forced past `net.core.rmem_max` when the process
    /// has `CAP_NET_ADMIN`, otherwise whatever the kernel grants.
    pub rcvbuf_bytes: usize,
    /// `SO_REUSEPORT`: several sockets share the address and the kernel spreads flows.
    pub reuse_port: bool,
    /// Non-blocking (for a poll loop) or blocking (for a loop that waits in `recvmmsg`).
    pub nonblocking: bool,
    /// `SO_RXQ_OVFL`: every datagram carries the socket's drop count as ancillary data, which
    /// the kernel builds for each datagram received. [`socket_drops`] reads the same count
    /// without it.
    pub drop_counter_per_datagram: bool,
}

/// A bound UDP socket and the receive buffer the kernel granted it (as the kernel reports it:
/// twice the usable size it books).
pub fn bind_udp(addr: SocketAddr, setup: &UdpSetup) -> io::Result<(std::net::UdpSocket, usize)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // `[::]` takes IPv4 too, whatever the host's bindv6only default.
        socket.set_only_v6(false)?;
    }
    if setup.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(setup.nonblocking)?;
    let _ = socket.set_recv_buffer_size(setup.rcvbuf_bytes);
    if socket.recv_buffer_size()? / 2 < setup.rcvbuf_bytes {
        // Needs CAP_NET_ADMIN; without it the socket keeps what rmem_max allows.
        let _ = force_recv_buffer(&socket, setup.rcvbuf_bytes);
    }
    if setup.drop_counter_per_datagram {
        setsockopt_int(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)?;
    }
    socket.bind(&addr.into())?;
    let granted = socket.recv_buffer_size()?;
    Ok((socket.into(), granted))
}

/// Sets the receive buffer with `SO_RCVBUFFORCE`, which may exceed `net.core.rmem_max` but
/// needs `CAP_NET_ADMIN`.
fn force_recv_buffer(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    setsockopt_int(
        socket.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        bytes,
    )
}

/// The socket's running count of datagrams the kernel dropped because its receive buffer was
/// full (`SK_MEMINFO_DROPS` of `SO_MEMINFO`, the `drops` column of `/proc/net/udp`). It counts
/// every drop, including the ones after the last datagram queued, and wraps at 2^32.
pub fn socket_drops(socket: &impl AsRawFd) -> io::Result<u32> {
    let mut meminfo = [0u32; 16];
    let mut len = mem::size_of_val(&meminfo) as libc::socklen_t;
    // SAFETY: `meminfo` is a live buffer of `len` bytes; the kernel writes at most `len` bytes
    // into it and stores the length it wrote in `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            meminfo.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let at = libc::SK_MEMINFO_DROPS as usize;
    if (len as usize) < (at + 1) * mem::size_of::<u32>() {
        return Err(io::Error::from(io::ErrorKind::Unsupported));
    }
    Ok(meminfo[at])
}

/// Preallocated buffers for receiving up to `capacity` datagrams with one `recvmmsg` call.
/// The message headers point into the batch's own buffers and are built once, so a call only
/// resets what the kernel wrote. Steady state allocates nothing.
pub struct RecvBatch {
    /// `capacity` slots of `slot_bytes`, one per datagram.
    bufs: Vec<u8>,
    slot_bytes: usize,
    /// Room for one `SO_RXQ_OVFL` control message per slot, or empty (no ancillary data).
    cmsgs: Vec<[u64; CMSG_BYTES / 8]>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    received: usize,
}

// SAFETY: the raw pointers in `iovecs` and `headers` only ever point into this struct's own
// heap buffers, which are never reallocated; nothing else shares them.
unsafe impl Send for RecvBatch {}

/// One datagram of a [`RecvBatch`].
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// The bytes received (at most the batch's largest datagram).
    pub bytes: &'a [u8],
    /// The datagram was longer than the batch's largest datagram, so `bytes` is only its
    /// beginning.
    pub truncated: bool,
    /// The socket's cumulative kernel drop count, when `SO_RXQ_OVFL` reported one (only in a
    /// batch made by [`RecvBatch::with_drop_counter`]).
    pub drops: Option<u32>,
}

impl RecvBatch {
    /// Buffers for `capacity` datagrams of up to `max_datagram_bytes` each (a longer one is
    /// received cut and flagged as truncated), without room for ancillary data.
    pub fn new(capacity: usize, max_datagram_bytes: usize) -> RecvBatch {
        RecvBatch::build(capacity, max_datagram_bytes, false)
    }

    /// Like [`RecvBatch::new`], with room for the `SO_RXQ_OVFL` drop count of each datagram.
    pub fn with_drop_counter(capacity: usize, max_datagram_bytes: usize) -> RecvBatch {
        RecvBatch::build(capacity, max_datagram_bytes, true)
    }

    fn build(capacity: usize, max_datagram_bytes: usize, cmsg: bool) -> RecvBatch {
        assert!(capacity > 0 && capacity <= 1024, "recvmmsg batch capacity");
        let slot_bytes = max_datagram_bytes + 1;
        let mut batch = RecvBatch {
            bufs: vec![0u8; capacity * slot_bytes],
            slot_bytes,
            cmsgs: vec![[0u64; CMSG_BYTES / 8]; if cmsg { capacity } else { 0 }],
            // SAFETY: iovec and mmsghdr are plain C structs for which all-zero is valid.
            iovecs: vec![unsafe { mem::zeroed() }; capacity],
            headers: vec![unsafe { mem::zeroed() }; capacity],
            received: 0,
        };
        for i in 0..capacity {
            batch.iovecs[i] = libc::iovec {
                iov_base: batch.bufs[i * slot_bytes..].as_mut_ptr().cast(),
                iov_len: slot_bytes,
            };
            // SAFETY: zero is a valid msghdr; the pointers set below point into the batch's
            // heap buffers, which live (and stay put) as long as the batch.
            let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
            hdr.msg_iov = &mut batch.iovecs[i];
            hdr.msg_iovlen = 1;
            if cmsg {
                hdr.msg_control = batch.cmsgs[i].as_mut_ptr().cast();
                hdr.msg_controllen = CMSG_BYTES as _;
            }
            batch.headers[i] = libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            };
        }
        batch
    }

    /// Datagrams one call receives at most.
    pub fn capacity(&self) -> usize {
        self.headers.len()
    }

    /// Receives as many datagrams as are queued, up to the capacity, without blocking.
    /// Returns how many; `WouldBlock` when none are queued. Fewer than the capacity means the
    /// socket's queue was empty when the call returned.
    pub fn recv(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        self.recv_with(socket, libc::MSG_DONTWAIT)
    }

    /// On a blocking socket: waits for one datagram (up to the socket's `SO_RCVTIMEO`, then
    /// `WouldBlock`), then takes as many more as are queued, up to the capacity.
    pub fn recv_wait(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        self.recv_with(socket, libc::MSG_WAITFORONE)
    }

    fn recv_with(&mut self, socket: &impl AsRawFd, flags: libc::c_int) -> io::Result<usize> {
        let n = self.headers.len();
        if !self.cmsgs.is_empty() {
            // The kernel shrinks msg_controllen to what it wrote.
            for header in &mut self.headers[..n] {
                header.msg_hdr.msg_controllen = CMSG_BYTES as _;
            }
        }
        self.received = 0;
        // SAFETY: `headers` holds `n` initialised mmsghdr whose iovecs and control buffers
        // point into `self.bufs` and `self.cmsgs`, which live as long as `self` and are not
        // touched by anything else during the call.
        let rc = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                n as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received = rc as usize;
        Ok(self.received)
    }

    /// Datagram `i` of the last receive (`i` below what it returned).
    pub fn get(&self, i: usize) -> Datagram<'_> {
        assert!(i < self.received);
        let header = &self.headers[i];
        let len = (header.msg_len as usize).min(self.slot_bytes);
        let truncated = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len >= self.slot_bytes;
        let start = i * self.slot_bytes;
        Datagram {
            bytes: &self.bufs[start..start + len],
            truncated,
            drops: self.drops(i),
        }
    }

    fn drops(&self, i: usize) -> Option<u32> {
        if self.cmsgs.is_empty() {
            return None;
        }
        let hdr = &self.headers[i].msg_hdr;
        // SAFETY: `hdr` was filled by the kernel in the last recvmmsg; CMSG_FIRSTHDR and
        // CMSG_NXTHDR stay within `msg_control[..msg_controllen]`, and the data read is the
        // u32 the kernel stores for SO_RXQ_OVFL (read unaligned to be safe).
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
            while !cmsg.is_null() {
                let c = &*cmsg;
                if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SO_RXQ_OVFL {
                    return Some(std::ptr::read_unaligned(
                        libc::CMSG_DATA(cmsg).cast::<u32>(),
                    ));
                }
                cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
            }
        }
        None
    }
}

/// Preallocated headers for sending many datagrams to one address with `sendmmsg`.
pub struct SendBatch {
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers are rebuilt before every call and not used outside it.
unsafe impl Send for SendBatch {}

impl SendBatch {
    /// Room for `capacity` datagrams per call.
    pub fn new(capacity: usize) -> SendBatch {
        assert!(capacity > 0 && capacity <= 1024, "sendmmsg batch capacity");
        SendBatch {
            // SAFETY: iovec and mmsghdr are plain C structs for which all-zero is valid.
            iovecs: vec![unsafe { mem::zeroed() }; capacity],
            headers: vec![unsafe { mem::zeroed() }; capacity],
        }
    }

    /// Sends `datagrams` (at most the capacity) to `to`; returns how many the kernel took,
    /// which may be fewer. Errors are returned as they are (`WouldBlock`, `ENOBUFS`, ...).
    pub fn send(
        &mut self,
        socket: &impl AsRawFd,
        datagrams: &[&[u8]],
        to: SocketAddr,
    ) -> io::Result<usize> {
        let n = datagrams.len().min(self.headers.len());
        if n == 0 {
            return Ok(0);
        }
        let addr = SockAddr::from(to);
        for (i, datagram) in datagrams.iter().take(n).enumerate() {
            self.iovecs[i] = libc::iovec {
                iov_base: datagram.as_ptr() as *mut libc::c_void,
                iov_len: datagram.len(),
            };
            // SAFETY: zero is a valid msghdr; the pointers set below outlive the call.
            let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
            hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
            hdr.msg_namelen = addr.len();
            hdr.msg_iov = &mut self.iovecs[i];
            hdr.msg_iovlen = 1;
            self.headers[i] = libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            };
        }
        // SAFETY: the first `n` headers point at `addr`, `self.iovecs` and the caller's
        // datagrams, all alive until the call returns; the kernel only reads them.
        let rc = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                n as libc::c_uint,
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }
}

/// The effective user id of the process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes nothing, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// Raises the soft limit on open files to the hard limit, so that a process that holds many
/// connections runs out of descriptors as late as the system allows. Returns the soft limit
/// in force afterwards.
pub fn raise_open_files_limit() -> io::Result<u64> {
    // SAFETY: zero is a valid rlimit; getrlimit only writes into `limit`.
    let mut limit: libc::rlimit = unsafe { mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads `raised`, which lives across the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    const MAX: usize = 1024;

    fn receiver(drop_counter_per_datagram: bool, nonblocking: bool) -> UdpSocket {
        let setup = UdpSetup {
            rcvbuf_bytes: 1 << 20,
            reuse_port: false,
            nonblocking,
            drop_counter_per_datagram,
        };
        bind_udp("127.0.0.1:0".parse().unwrap(), &setup).unwrap().0
    }

    fn round_trip(mut recv: RecvBatch, rx: &UdpSocket) {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let payloads: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; usize::from(i) + 1]).collect();
        let slices: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        let mut send = SendBatch::new(16);
        assert_eq!(
            send.send(&tx, &slices, rx.local_addr().unwrap()).unwrap(),
            10
        );
        let mut got = Vec::new();
        while got.len() < 10 {
            // Blocks for the first datagram, then takes what is queued.
            rx.set_nonblocking(false).unwrap();
            let n = recv.recv_wait(rx).unwrap();
            for i in 0..n {
                let d = recv.get(i);
                assert!(!d.truncated);
                assert_eq!(d.drops.unwrap_or(0), 0);
                got.push(d.bytes.to_vec());
            }
        }
        assert_eq!(got, payloads);
        assert_eq!(recv.recv(rx).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(socket_drops(rx).unwrap(), 0);
    }

    #[test]
    fn send_batch_and_recv_batch_round_trip() {
        round_trip(RecvBatch::new(4, MAX), &receiver(false, true));
    }

    #[test]
    fn recv_batch_with_drop_counter_round_trip() {
        round_trip(RecvBatch::with_drop_counter(4, MAX), &receiver(true, true));
    }

    #[test]
    fn oversize_datagrams_are_flagged() {
        let rx = receiver(false, false);
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        tx.send_to(&[7u8; 3000], to).unwrap();
        tx.send_to(&[8u8; 101], to).unwrap();
        tx.send_to(&[9u8; 100], to).unwrap();
        let mut recv = RecvBatch::new(1, 100);
        let mut truncated = Vec::new();
        for _ in 0..3 {
            assert_eq!(recv.recv_wait(&rx).unwrap(), 1);
            truncated.push((recv.get(0).bytes.len(), recv.get(0).truncated));
        }
        assert_eq!(truncated, [(101, true), (101, true), (100, false)]);
    }

    #[test]
    fn socket_drops_counts_what_a_full_buffer_refused() {
        // The smallest buffer the kernel allows holds a few datagrams; nothing reads while
        // 200 are sent, so the rest are dropped, and every one is either queued or counted.
        let setup = UdpSetup {
            rcvbuf_bytes: 1,
            reuse_port: false,
            nonblocking: true,
            drop_counter_per_datagram: false,
        };
        let rx = bind_udp("127.0.0.1:0".parse().unwrap(), &setup).unwrap().0;
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..200 {
            tx.send_to(&[1u8; 200], rx.local_addr().unwrap()).unwrap();
        }
        let mut recv = RecvBatch::new(64, MAX);
        let mut queued = 0;
        loop {
            match recv.recv(&rx) {
                Ok(n) => queued += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let drops = socket_drops(&rx).unwrap() as usize;
        assert!(drops > 0);
        assert_eq!(queued + drops, 200);
    }
}

//! The one place with `unsafe`: batch socket syscalls, socket options the standard library
//! lacks, and read-only file mappings. Everything here has a small safe API.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::SockAddr;

/// Largest datagram a slot holds; a longer one is reported as truncated.
pub const SLOT_BYTES: usize = crate::wire::MAX_DATAGRAM_BYTES + 1;

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

/// Asks for `SO_RXQ_OVFL`: every received datagram then carries the socket's running count
/// of datagrams the kernel dropped for lack of buffer space.
pub fn enable_drop_counter(socket: &impl AsRawFd) -> io::Result<()> {
    setsockopt_int(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)
}

/// Sets the receive buffer with `SO_RCVBUFFORCE`, which may exceed `net.core.rmem_max` but
/// needs `CAP_NET_ADMIN`.
pub fn force_recv_buffer(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    setsockopt_int(
        socket.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        bytes,
    )
}

/// Preallocated buffers for receiving up to `capacity` datagrams with one `recvmmsg` call.
/// Steady state allocates nothing.
pub struct RecvBatch {
    bufs: Vec<[u8; SLOT_BYTES]>,
    cmsgs: Vec<[u64; CMSG_BYTES / 8]>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    received: usize,
}

// SAFETY: the raw pointers in `iovecs` and `headers` only ever point into this struct's own
// heap buffers and are rebuilt before every call; nothing else shares them.
unsafe impl Send for RecvBatch {}

/// One datagram of a [`RecvBatch`].
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// The bytes received (at most [`SLOT_BYTES`]).
    pub bytes: &'a [u8],
    /// The datagram was longer than a slot, so `bytes` is only its beginning.
    pub truncated: bool,
    /// The socket's cumulative kernel drop count, when `SO_RXQ_OVFL` reported one.
    pub drops: Option<u32>,
}

impl RecvBatch {
    /// Buffers for `capacity` datagrams.
    pub fn new(capacity: usize) -> RecvBatch {
        assert!(capacity > 0 && capacity <= 1024, "recvmmsg batch capacity");
        RecvBatch {
            bufs: vec![[0u8; SLOT_BYTES]; capacity],
            cmsgs: vec![[0u64; CMSG_BYTES / 8]; capacity],
            // SAFETY: iovec and mmsghdr are plain C structs for which all-zero is valid.
            iovecs: vec![unsafe { mem::zeroed() }; capacity],
            headers: vec![unsafe { mem::zeroed() }; capacity],
            received: 0,
        }
    }

    /// Receives as many datagrams as are queued, up to the capacity, without blocking.
    /// Returns how many; `WouldBlock` when none are queued.
    pub fn recv(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        let n = self.bufs.len();
        for i in 0..n {
            self.iovecs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: SLOT_BYTES,
            };
            // SAFETY: zero is a valid msghdr; every pointer set below outlives the call.
            let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
            hdr.msg_iov = &mut self.iovecs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            hdr.msg_controllen = CMSG_BYTES as _;
            self.headers[i] = libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            };
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
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received = rc as usize;
        Ok(self.received)
    }

    /// Datagram `i` of the last [`RecvBatch::recv`] (`i` below what it returned).
    pub fn get(&self, i: usize) -> Datagram<'_> {
        assert!(i < self.received);
        let header = &self.headers[i];
        let len = (header.msg_len as usize).min(SLOT_BYTES);
        let truncated = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0
            || len > crate::wire::MAX_DATAGRAM_BYTES;
        Datagram {
            bytes: &self.bufs[i][..len],
            truncated,
            drops: self.drops(i),
        }
    }

    fn drops(&self, i: usize) -> Option<u32> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn send_batch_and_recv_batch_round_trip() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        enable_drop_counter(&rx).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let payloads: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; usize::from(i) + 1]).collect();
        let slices: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        let mut send = SendBatch::new(16);
        assert_eq!(
            send.send(&tx, &slices, rx.local_addr().unwrap()).unwrap(),
            10
        );
        let mut recv = RecvBatch::new(4);
        let mut got = Vec::new();
        while got.len() < 10 {
            match recv.recv(&rx) {
                Ok(n) => {
                    for i in 0..n {
                        let d = recv.get(i);
                        assert!(!d.truncated);
                        assert_eq!(d.drops.unwrap_or(0), 0);
                        got.push(d.bytes.to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, payloads);
        assert_eq!(
            recv.recv(&rx).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn oversize_datagrams_are_flagged() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[7u8; 3000], rx.local_addr().unwrap()).unwrap();
        rx.set_nonblocking(false).unwrap();
        let mut peek = [0u8; 1];
        rx.peek_from(&mut peek).unwrap();
        let mut recv = RecvBatch::new(2);
        assert_eq!(recv.recv(&rx).unwrap(), 1);
        assert!(recv.get(0).truncated);
    }
}

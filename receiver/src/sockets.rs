//! Building the UDP sockets: dual stack, large receive buffer, one socket per thread.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use ipevent_core::sys::UdpSetup;

/// A bound, non-blocking UDP socket and what the kernel granted it.
pub struct BoundSocket {
    /// The socket.
    pub socket: std::net::UdpSocket,
    /// The address it is bound to (with the real port when 0 was asked).
    pub local: SocketAddr,
    /// Receive buffer the kernel granted, bytes (as the kernel reports it).
    pub rcvbuf_bytes: usize,
}

/// Binds one socket to `addr`. With `reuse_port`, several sockets may share the address and
/// the kernel spreads flows over them.
pub fn bind(addr: SocketAddr, rcvbuf_bytes: usize, reuse_port: bool) -> Result<BoundSocket> {
    match bind_exact(addr, rcvbuf_bytes, reuse_port) {
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && is_no_ipv6(&e) => {
            // A host without IPv6 still gets the service on IPv4.
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            log::warn!("IPv6 is not available here ({e}); listening on {v4} instead of {addr}");
            bind_exact(v4, rcvbuf_bytes, reuse_port)
        }
        other => other,
    }
    .with_context(|| format!("binding UDP {addr}"))
}

fn is_no_ipv6(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .and_then(io::Error::raw_os_error)
        .is_some_and(|code| code == libc::EAFNOSUPPORT || code == libc::EADDRNOTAVAIL)
}

fn bind_exact(addr: SocketAddr, rcvbuf_bytes: usize, reuse_port: bool) -> Result<BoundSocket> {
    let setup = UdpSetup {
        rcvbuf_bytes,
        reuse_port,
        nonblocking: true,
        // Drops are read from the socket once per pass (`sys::socket_drops`), not carried by
        // every datagram.
        drop_counter_per_datagram: false,
    };
    let (socket, granted) = ipevent_core::sys::bind_udp(addr, &setup)?;
    let local = socket.local_addr()?;
    Ok(BoundSocket {
        socket,
        local,
        rcvbuf_bytes: granted,
    })
}

/// Logs what each socket got and how to get more when it is short of what was asked.
pub fn report_buffer(bound: &BoundSocket, wanted: usize) {
    let usable = bound.rcvbuf_bytes / 2;
    if usable < wanted {
        log::warn!(
            "UDP {}: receive buffer {} KiB granted of {} KiB asked; bursts beyond it are dropped \
             by the kernel (counted as kernel_drops). Raise the limit with \
             `sysctl -w net.core.rmem_max={}` or run with CAP_NET_ADMIN",
            bound.local,
            usable / 1024,
            wanted / 1024,
            wanted
        );
    } else {
        log::info!("UDP {}: receive buffer {} KiB", bound.local, usable / 1024);
    }
}

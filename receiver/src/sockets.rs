//! Building the UDP sockets: dual stack, large receive buffer, kernel drop counter.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

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
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // `[::]` takes IPv4 too, whatever the host's bindv6only default.
        socket.set_only_v6(false)?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    let granted = grow_recv_buffer(&socket, rcvbuf_bytes);
    ipevent_core::sys::enable_drop_counter(&socket).context("enabling SO_RXQ_OVFL")?;
    socket.bind(&addr.into())?;
    let socket: std::net::UdpSocket = socket.into();
    let local = socket.local_addr()?;
    Ok(BoundSocket {
        socket,
        local,
        rcvbuf_bytes: granted,
    })
}

/// Asks for `wanted` bytes of receive buffer, forcing past `net.core.rmem_max` when allowed,
/// and returns what the kernel granted. Linux reports twice the usable size it books.
fn grow_recv_buffer(socket: &Socket, wanted: usize) -> usize {
    let _ = socket.set_recv_buffer_size(wanted);
    let granted = socket.recv_buffer_size().unwrap_or(0);
    if granted / 2 < wanted {
        // Needs CAP_NET_ADMIN; quietly keep what we have otherwise.
        let _ = ipevent_core::sys::force_recv_buffer(socket, wanted);
    }
    socket.recv_buffer_size().unwrap_or(granted)
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

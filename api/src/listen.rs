//! The listening socket: dual stack on `[::]`, with a clear fallback to IPv4 on a host
//! without IPv6.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};

/// Connections the kernel queues before the server accepts them; bursts of clients beyond
/// this see connection resets instead of unbounded queueing.
const LISTEN_BACKLOG: i32 = 1024;

/// Binds `addr` for a non-blocking server. `[::]` takes IPv4 too; when the host has no IPv6
/// it binds `0.0.0.0` on the same port and says so.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    match bind_one(addr) {
        Ok(listener) => Ok(listener),
        Err(e) if addr.ip() == Ipv6Addr::UNSPECIFIED && ipv6_unavailable(&e) => {
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            log::warn!("IPv6 is unavailable on this host ({e}); listening on {v4}, IPv4 only");
            bind_one(v4).with_context(|| format!("binding {v4}"))
        }
        Err(e) => Err(e).with_context(|| format!("binding {addr}")),
    }
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // Dual stack whatever net.ipv6.bindv6only says.
        socket.set_only_v6(false)?;
    }
    // A restart must not wait for the previous process's connections in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

fn ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
    )
}

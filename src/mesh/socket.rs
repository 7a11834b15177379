//! UDP sockets for the mesh, configured through socket2.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::debug;

use super::config::MulticastDiscovery;
use crate::error::Error;

/// The node's unicast socket.
///
/// Deliberately without `SO_REUSEADDR`: on Linux it lets a second UDP socket bind the
/// same port and take a share of its datagrams, so a port clash would split a node in
/// two silently instead of failing here.
pub(crate) fn bind_unicast(addr: SocketAddr, buffer: usize) -> Result<UdpSocket, Error> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    set_buffers(&socket, buffer);
    socket
        .bind(&addr.into())
        .map_err(|error| bind_error(addr, error))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Prepares `socket` to send beacons to the group through the discovery interface, and
/// opens the socket that receives them.
pub(crate) fn join_multicast(
    unicast: &UdpSocket,
    discovery: &MulticastDiscovery,
) -> Result<UdpSocket, Error> {
    let group = *discovery.group.ip();
    let cannot = |what: &str, error: io::Error| {
        Error::config(
            "multicast",
            format!(
                "cannot {what} {} on {}: {error}",
                discovery.group, discovery.interface
            ),
        )
    };
    let sender = socket2::SockRef::from(unicast);
    sender
        .set_multicast_if_v4(&discovery.interface)
        .map_err(|e| cannot("send to", e))?;
    sender
        .set_multicast_loop_v4(true)
        .map_err(|e| cannot("send to", e))?;

    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Every node on the host listens on the group's port, so this one socket shares it.
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    let listen = SocketAddrV4::new(group, discovery.group.port());
    socket
        .bind(&listen.into())
        .map_err(|e| cannot("listen on", e))?;
    socket
        .join_multicast_v4(&group, &discovery.interface)
        .map_err(|e| cannot("join", e))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn set_buffers(socket: &Socket, buffer: usize) {
    // The kernel caps these at its configured maximum; a smaller buffer still works,
    // it only absorbs shorter bursts.
    if let Err(error) = socket.set_recv_buffer_size(buffer) {
        debug!(%error, "could not size the receive buffer");
    }
    if let Err(error) = socket.set_send_buffer_size(buffer) {
        debug!(%error, "could not size the send buffer");
    }
}

fn bind_error(addr: SocketAddr, error: io::Error) -> Error {
    match error.kind() {
        io::ErrorKind::AddrInUse => Error::config("bind", format!("{addr} is already in use")),
        io::ErrorKind::AddrNotAvailable => {
            Error::config("bind", format!("{addr} is not an address of this host"))
        }
        _ => Error::Transport(error),
    }
}

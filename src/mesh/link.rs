//! What carries a node's datagrams: a UDP socket, or (with the `quic` feature) QUIC
//! connections. The driver sees the same thing either way: datagrams to and from
//! peer addresses.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::UdpSocket;

#[cfg(feature = "quic")]
use super::quic::QuicLink;

pub(crate) enum Link {
    /// Shared with the handles, which send publishes that find the node idle.
    Udp(Arc<UdpSocket>),
    #[cfg(feature = "quic")]
    Quic(QuicLink),
}

impl Link {
    /// The UDP socket, for a link that is one.
    pub(crate) fn udp(&self) -> Option<Arc<UdpSocket>> {
        match self {
            Link::Udp(socket) => Some(Arc::clone(socket)),
            #[cfg(feature = "quic")]
            Link::Quic(_) => None,
        }
    }

    pub(crate) async fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            Link::Udp(socket) => socket.recv_from(buf).await,
            #[cfg(feature = "quic")]
            Link::Quic(quic) => quic.recv(buf).await,
        }
    }

    /// Like `recv`, but `WouldBlock` when nothing waits.
    pub(crate) fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            Link::Udp(socket) => socket.try_recv_from(buf),
            #[cfg(feature = "quic")]
            Link::Quic(quic) => quic.try_recv(buf),
        }
    }

    pub(crate) async fn send(&mut self, datagram: &Bytes, to: SocketAddr) -> io::Result<()> {
        match self {
            Link::Udp(socket) => socket.send_to(datagram, to).await.map(drop),
            // A reference count, not a copy.
            #[cfg(feature = "quic")]
            Link::Quic(quic) => quic.send(datagram.clone(), to),
        }
    }

    /// Lets the last datagrams leave; a QUIC link then closes its connections.
    pub(crate) async fn close(&mut self) {
        #[cfg(feature = "quic")]
        if let Link::Quic(quic) = self {
            quic.close().await;
        }
    }
}

//! The mesh over QUIC: the same datagrams, carried as QUIC datagrams (RFC 9221) on
//! connections authenticated both ways with TLS 1.3 certificates, for links across
//! untrusted or wide-area networks.
//!
//! One quinn endpoint per node, bound to the node's address, both accepts and opens
//! connections; a datagram for a peer without a connection opens one and waits in a
//! short queue until it is up. A connection that fails or closes is forgotten, and the
//! next datagram for that peer tries again. Datagrams arrive from a connection's
//! remote address, which is the peer's own endpoint address: the mesh sees the same
//! addresses as over UDP.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ClientConfig, Connection, Endpoint, IdleTimeout, ServerConfig, TransportConfig};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{Semaphore, mpsc};

use tracing::{debug, warn};

use crate::error::Error;

/// The ALPN protocol both ends must speak.
const ALPN: &[u8] = b"syncbus-mesh/1";
/// QUIC's own bytes around a datagram (short header, packet number, tag, frame), with
/// room to spare: the mesh's datagrams are sized to the MTU floor less this.
pub(crate) const QUIC_OVERHEAD: usize = 64;
/// Datagrams that wait for a connection to come up; more are dropped.
const QUEUED_PER_PEER: usize = 256;
/// A connection with nothing heard for this long is closed. SWIM probes every member
/// far more often.
/// Also how long a connection to a peer that crashed and came back (whose endpoint
/// cannot reset the old connection) is used before the next datagram reconnects.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Handshakes in progress at most; more incoming connections are refused. Each costs
/// tens of kilobytes until it completes or times out.
const MAX_HANDSHAKES: usize = 64;
/// Longest a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest MTU floor accepted: jumbo frames. Much larger first packets would not
/// fit QUIC's initial congestion window, and no connection would ever open.
const MAX_MTU_FLOOR: u16 = 9000;
/// How long datagrams queued before closing get to leave: QUIC drops what is still
/// queued when a connection closes.
const CLOSE_GRACE: Duration = Duration::from_millis(50);
/// Datagrams (and connection news) waiting for the node's task.
const INBOX: usize = 4096;

/// How a node speaks QUIC: its certificate, its key, whom it trusts, and the path MTU
/// it may count on.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuicConfig {
    /// PEM file with this node's certificate chain, leaf first. The certificate must
    /// name `server_name` and be valid for both server and client authentication.
    pub cert_chain: PathBuf,
    /// PEM file with the certificate's private key.
    pub private_key: PathBuf,
    /// PEM file with the certificate authorities whose certificates peers must have.
    pub trust: PathBuf,
    /// The name every node's certificate carries, checked on every connection.
    /// Default `syncbus`.
    pub server_name: String,
    /// The smallest UDP payload every path between nodes carries; mesh datagrams are
    /// sized to fit it with QUIC's overhead. At least 1,200 (QUIC's own minimum).
    /// Default 1,200.
    pub mtu_floor: u16,
}

impl QuicConfig {
    /// QUIC with the given certificate files and defaults for the rest.
    pub fn new(
        cert_chain: impl Into<PathBuf>,
        private_key: impl Into<PathBuf>,
        trust: impl Into<PathBuf>,
    ) -> QuicConfig {
        QuicConfig {
            cert_chain: cert_chain.into(),
            private_key: private_key.into(),
            trust: trust.into(),
            server_name: "syncbus".to_owned(),
            mtu_floor: 1200,
        }
    }

    /// The largest mesh datagram that fits the MTU floor.
    pub(crate) fn max_datagram(&self) -> usize {
        usize::from(self.mtu_floor) - QUIC_OVERHEAD
    }

    fn validate(&self) -> Result<(), Error> {
        if !(1200..=MAX_MTU_FLOOR).contains(&self.mtu_floor) {
            return Err(Error::config(
                "quic.mtu_floor",
                format!(
                    "{} is outside 1,200 (the least QUIC allows) to {MAX_MTU_FLOOR}",
                    self.mtu_floor
                ),
            ));
        }
        if ServerName::try_from(self.server_name.as_str()).is_err() {
            return Err(Error::config(
                "quic.server_name",
                format!("{:?} is not a DNS name or IP address", self.server_name),
            ));
        }
        Ok(())
    }

    /// The endpoint's TLS and transport settings, read from the files.
    fn endpoint_configs(&self) -> Result<(ServerConfig, ClientConfig), Error> {
        self.validate()?;
        let chain = read_certs(&self.cert_chain, "quic.cert_chain")?;
        let key = PrivateKeyDer::from_pem_file(&self.private_key)
            .map_err(|e| pem_error("quic.private_key", &self.private_key, &e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for cert in read_certs(&self.trust, "quic.trust")? {
            roots
                .add(cert)
                .map_err(|e| pem_error("quic.trust", &self.trust, &e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_error =
            |field: &'static str| move |e: rustls::Error| Error::config(field, format!("TLS: {e}"));

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| Error::config("quic.trust", format!("TLS: {e}")))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error("quic"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(tls_error("quic.private_key"))?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error("quic"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(tls_error("quic.private_key"))?;
        client.alpn_protocols = vec![ALPN.to_vec()];

        let transport = Arc::new(self.transport());
        let server = QuicServerConfig::try_from(server)
            .map_err(|e| Error::config("quic", format!("TLS: {e}")))?;
        let mut server = ServerConfig::with_crypto(Arc::new(server));
        server.transport_config(transport.clone());
        let client = QuicClientConfig::try_from(client)
            .map_err(|e| Error::config("quic", format!("TLS: {e}")))?;
        let mut client = ClientConfig::new(Arc::new(client));
        client.transport_config(transport);
        Ok((server, client))
    }

    fn transport(&self) -> TransportConfig {
        let mut transport = TransportConfig::default();
        transport
            .max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok())
            .keep_alive_interval(Some(KEEP_ALIVE))
            .initial_mtu(self.mtu_floor)
            .min_mtu(self.mtu_floor)
            .datagram_receive_buffer_size(Some(1 << 20))
            .datagram_send_buffer_size(1 << 20)
            // Nothing but datagrams: no streams either way.
            .max_concurrent_bidi_streams(0u32.into())
            .max_concurrent_uni_streams(0u32.into());
        transport
    }
}

fn read_certs(
    path: &std::path::Path,
    field: &'static str,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(field, path, &e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error(field, path, "no certificate in it"));
    }
    Ok(certs)
}

fn pem_error(field: &'static str, path: &std::path::Path, reason: &str) -> Error {
    Error::config(field, format!("{}: {reason}", path.display()))
}

/// Connections refused or failed, counted so that the warning about them is logged at
/// the 1st, 2nd, 4th, 8th... time rather than on every retry.
#[derive(Default)]
struct Refusals(AtomicU64);

impl Refusals {
    fn warn(&self, what: std::fmt::Arguments<'_>) {
        let count = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        if count.is_power_of_two() {
            warn!(count, "{what}");
        } else {
            debug!(count, "{what}");
        }
    }
}

/// What the connection tasks tell the node's task.
enum News {
    Datagram(SocketAddr, Bytes),
    Up(Connection),
    /// A connection closed (`Some(its id)`), or one never came up (`None`).
    Down(SocketAddr, Option<usize>),
}

enum Peer {
    /// Connecting; datagrams wait.
    Connecting(Vec<Bytes>),
    Up(Connection),
}

/// A node's QUIC endpoint and its connections.
pub(crate) struct QuicLink {
    endpoint: Endpoint,
    server_name: String,
    peers: HashMap<SocketAddr, Peer>,
    news: mpsc::Receiver<News>,
    news_sender: mpsc::Sender<News>,
    refusals: Arc<Refusals>,
}

impl QuicLink {
    /// Binds the endpoint at `addr` and starts accepting connections.
    pub(crate) fn bind(addr: SocketAddr, config: &QuicConfig) -> Result<QuicLink, Error> {
        let (server, client) = config.endpoint_configs()?;
        let mut endpoint = Endpoint::server(server, addr).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                Error::config("bind", format!("{addr} is already in use"))
            } else {
                Error::Transport(e)
            }
        })?;
        endpoint.set_default_client_config(client);
        let (news_sender, news) = mpsc::channel(INBOX);
        let refusals = Arc::new(Refusals::default());
        tokio::spawn(accept(
            endpoint.clone(),
            news_sender.clone(),
            config.server_name.clone(),
            refusals.clone(),
        ));
        Ok(QuicLink {
            endpoint,
            server_name: config.server_name.clone(),
            peers: HashMap::new(),
            news,
            news_sender,
            refusals,
        })
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The next datagram from any peer, copied into `buf`.
    pub(crate) async fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let Some(news) = self.news.recv().await else {
                return std::future::pending().await;
            };
            if let Some(received) = self.take(news, buf) {
                return Ok(received);
            }
        }
    }

    /// Like `recv`, but `WouldBlock` when nothing waits.
    pub(crate) fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let news = self
                .news
                .try_recv()
                .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
            if let Some(received) = self.take(news, buf) {
                return Ok(received);
            }
        }
    }

    /// Applies connection news; a datagram is copied into `buf` (cut at its length:
    /// an oversized one then shows as oversized, as over UDP).
    fn take(&mut self, news: News, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        match news {
            News::Datagram(from, datagram) => {
                let len = datagram.len().min(buf.len());
                buf[..len].copy_from_slice(&datagram[..len]);
                Some((len, from))
            }
            News::Up(connection) => {
                let addr = canonical(connection.remote_address());
                let queued = match self.peers.insert(addr, Peer::Up(connection.clone())) {
                    Some(Peer::Connecting(queued)) => queued,
                    _ => Vec::new(),
                };
                for datagram in queued {
                    if let Err(error) = connection.send_datagram(datagram) {
                        debug!(%error, peer = %addr, "QUIC datagram not sent");
                    }
                }
                None
            }
            News::Down(addr, id) => {
                let gone = match self.peers.get(&addr) {
                    Some(Peer::Up(connection)) => Some(connection.stable_id()) == id,
                    Some(Peer::Connecting(_)) => id.is_none(),
                    None => false,
                };
                if gone {
                    self.peers.remove(&addr);
                }
                None
            }
        }
    }

    /// Sends a datagram to `to`, connecting first if needed.
    pub(crate) fn send(&mut self, datagram: Bytes, to: SocketAddr) -> io::Result<()> {
        match self.peers.get_mut(&to) {
            Some(Peer::Up(connection)) => connection.send_datagram(datagram).map_err(|e| {
                // A lost connection is forgotten; the next datagram reconnects.
                if matches!(e, quinn::SendDatagramError::ConnectionLost(_)) {
                    self.peers.remove(&to);
                }
                io::Error::other(e)
            }),
            Some(Peer::Connecting(queued)) if queued.len() < QUEUED_PER_PEER => {
                queued.push(datagram);
                Ok(())
            }
            Some(Peer::Connecting(_)) => Err(io::Error::other("QUIC connection still opening")),
            None => {
                let connecting = self
                    .endpoint
                    .connect(to, &self.server_name)
                    .map_err(io::Error::other)?;
                self.peers.insert(to, Peer::Connecting(vec![datagram]));
                let (news, name) = (self.news_sender.clone(), self.server_name.clone());
                tokio::spawn(connect(to, connecting, news, name, self.refusals.clone()));
                Ok(())
            }
        }
    }

    /// Gives the last datagrams (a goodbye) a moment to leave, then closes every
    /// connection, telling peers.
    pub(crate) async fn close(&self) {
        tokio::time::sleep(CLOSE_GRACE).await;
        self.endpoint.close(0u32.into(), b"leaving");
        let _ = tokio::time::timeout(CLOSE_GRACE * 4, self.endpoint.wait_idle()).await;
    }
}

/// Accepts connections until the endpoint closes: at most `MAX_HANDSHAKES` at a time,
/// each within `HANDSHAKE_TIMEOUT`.
async fn accept(
    endpoint: Endpoint,
    news: mpsc::Sender<News>,
    server_name: String,
    refusals: Arc<Refusals>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
            debug!(peer = %incoming.remote_address(), "too many QUIC handshakes; refused");
            incoming.refuse();
            continue;
        };
        let (news, name, refusals) = (news.clone(), server_name.clone(), refusals.clone());
        let peer = incoming.remote_address();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await;
            drop(permit);
            match handshake {
                Ok(Ok(connection)) => serve(connection, news, &name, &refusals).await,
                Ok(Err(error)) => refusals.warn(format_args!(
                    "QUIC connection from {peer} refused: {error} (is its certificate from \
                     an authority in the trust file?)"
                )),
                Err(_) => debug!(%peer, "QUIC handshake timed out"),
            }
        });
    }
}

async fn connect(
    to: SocketAddr,
    connecting: quinn::Connecting,
    news: mpsc::Sender<News>,
    server_name: String,
    refusals: Arc<Refusals>,
) {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(connection)) => serve(connection, news, &server_name, &refusals).await,
        Ok(Err(error)) => {
            refusals.warn(format_args!("QUIC connection to {to} failed: {error}"));
            let _ = news.send(News::Down(to, None)).await;
        }
        Err(_) => {
            debug!(peer = %to, "QUIC connection timed out");
            let _ = news.send(News::Down(to, None)).await;
        }
    }
}

/// Checks the peer's certificate carries `server_name` (TLS checked that for the side
/// that dialled, but not for the side that was dialled), reports the connection up,
/// then forwards its datagrams until it closes.
async fn serve(
    connection: Connection,
    news: mpsc::Sender<News>,
    server_name: &str,
    refusals: &Refusals,
) {
    let addr = canonical(connection.remote_address());
    if !peer_is_named(&connection, server_name) {
        refusals.warn(format_args!(
            "QUIC peer {addr}'s certificate does not name {server_name:?}; closed"
        ));
        connection.close(1u32.into(), b"wrong certificate name");
        let _ = news.send(News::Down(addr, None)).await;
        return;
    }
    if news.send(News::Up(connection.clone())).await.is_err() {
        return;
    }
    loop {
        match connection.read_datagram().await {
            Ok(datagram) => {
                if news.send(News::Datagram(addr, datagram)).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                debug!(%error, peer = %addr, "QUIC connection closed");
                let _ = news
                    .send(News::Down(addr, Some(connection.stable_id())))
                    .await;
                return;
            }
        }
    }
}

/// Whether the leaf certificate the peer presented is valid for `server_name`.
fn peer_is_named(connection: &Connection, server_name: &str) -> bool {
    let Some(identity) = connection.peer_identity() else {
        return false;
    };
    let Ok(chain) = identity.downcast::<Vec<CertificateDer<'static>>>() else {
        return false;
    };
    let (Some(leaf), Ok(name)) = (chain.first(), ServerName::try_from(server_name)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
}

/// An address as the mesh knows it: an IPv4 peer reached from a dual-stack endpoint
/// shows as `::ffff:a.b.c.d`, and is `a.b.c.d` to everyone else.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

//! A TCP proxy on loopback that can cut off the connections it carries while leaving
//! them open, as a network partition does, and keeps carrying new ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Proxy {
    /// Connections numbered below this carry nothing more.
    stalled_below: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
    accepting: JoinHandle<()>,
}

impl Proxy {
    /// Carries every connection accepted on `listener` to 127.0.0.1:`upstream`.
    pub fn start(listener: TcpListener, upstream: u16) -> Proxy {
        let stalled_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (stalled, numbers) = (stalled_below.clone(), next.clone());
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let id = numbers.fetch_add(1, Ordering::SeqCst);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(id, client_read, server_write, stalled.clone()));
                tokio::spawn(pump(id, server_read, client_write, stalled.clone()));
            }
        });
        Proxy {
            stalled_below,
            next,
            accepting,
        }
    }

    /// Every connection open now stops carrying bytes, both ways, and stays open.
    pub fn stall_existing(&self) {
        let next = self.next.load(Ordering::SeqCst);
        self.stalled_below.store(next, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn pump(
    id: u64,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled_below: Arc<AtomicU64>,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if id < stalled_below.load(Ordering::SeqCst) {
            // Held, neither forwarded nor refused, until the test ends.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

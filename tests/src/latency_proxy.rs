//! A TCP proxy that puts a network's round-trip time between a client and a local server, so
//! that `make bench` can count how many round trips a registration costs: every chunk of bytes
//! is delivered half a round trip after it was sent, in order, either way. The TCP handshake
//! with the proxy itself is local, so the first bytes a client sends are held one round trip
//! longer: from the client's point of view its first answer comes as late as over a real
//! network, where `connect` takes a round trip.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::serve::Background;

pub struct LatencyProxy {
    addr: SocketAddr,
    _task: Background,
}

impl LatencyProxy {
    /// Proxies to `upstream` with `rtt` between the two.
    pub async fn start(upstream: SocketAddr, rtt: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, rtt));
            }
        });
        Ok(Self {
            addr,
            _task: Background::new(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, rtt: Duration) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        delayed(client_read, server_write, rtt / 2, rtt),
        delayed(server_read, client_write, rtt / 2, Duration::ZERO),
    );
}

/// Copies `from` to `to`, each chunk `one_way` after it was read (the first `first_extra`
/// later still); the end of the stream is passed on the same way.
async fn delayed(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    one_way: Duration,
    first_extra: Duration,
) {
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut extra = first_extra;
        while let Ok(n) = from.read(&mut buf).await {
            let at = Instant::now() + one_way + std::mem::take(&mut extra);
            // An empty chunk is the end of the stream.
            if chunks.send((at, buf[..n].to_vec())).is_err() || n == 0 {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = due.recv().await {
            sleep_until(at).await;
            if chunk.is_empty() || to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

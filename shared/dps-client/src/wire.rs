//! The connection under a registration: TCP + TLS opened on its own (a [`Line`], which can be
//! opened while the caller is still deciding whether the device may register), then MQTT 3.1.1
//! packets framed by rumqttc's codec. rumqttc's event loop is not used: it opens its connection
//! and sends CONNECT in one step, so a connection could not be ready before the device is
//! known, and it flushes every packet on its own, so two requests could not share a flight.

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use domain::config::HostPort;

use crate::DpsError;

/// Largest packet accepted either way: DPS's answers are a few hundred bytes.
const MAX_PACKET: usize = 128 * 1024;

/// A TCP + TLS connection to DPS on which nothing has been sent yet: no MQTT CONNECT, nothing
/// about any device. Dropping it closes it.
pub struct Line {
    stream: TlsStream<TcpStream>,
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Line")
    }
}

/// Opens a TCP connection to `endpoint` and completes the TLS handshake (server certificate
/// verified against `tls`'s roots). The caller bounds the wait.
pub async fn open(endpoint: &HostPort, tls: Arc<ClientConfig>) -> Result<Line, DpsError> {
    let name = ServerName::try_from(endpoint.host.clone())
        .map_err(|e| DpsError::Tls(format!("DPS host name: {e}")))?;
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| DpsError::Connection(format!("TCP connection to DPS: {e}")))?;
    // Without TCP_NODELAY, Nagle holds each small request until the peer's delayed ACK
    // (~40 ms on Linux): measured as +100 ms per registration in `make bench`.
    tcp.set_nodelay(true)
        .map_err(|e| DpsError::Connection(e.to_string()))?;
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| tls_failure(&e))?;
    Ok(Line { stream })
}

/// A TLS failure that is the certificate or the TLS conversation itself is final (retrying
/// cannot change it); one that is the network under it (a reset, an early EOF) is not.
fn tls_failure(error: &io::Error) -> DpsError {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(refusal) => DpsError::Tls(refusal.to_string()),
        None => DpsError::Connection(format!("TLS handshake with DPS: {error}")),
    }
}

/// MQTT packets over a [`Line`]: queued, then written together by [`Wire::flush`] (one
/// flight), and read one at a time. Reading is cancel-safe: bytes read before a cancelled
/// [`Wire::next`] stay buffered for the next call.
pub(crate) struct Wire {
    line: Line,
    incoming: BytesMut,
    outgoing: BytesMut,
}

impl Wire {
    pub(crate) fn new(line: Line) -> Self {
        Self {
            line,
            incoming: BytesMut::with_capacity(4096),
            outgoing: BytesMut::with_capacity(1024),
        }
    }

    pub(crate) fn queue(&mut self, packet: Packet) -> Result<(), DpsError> {
        packet
            .write(&mut self.outgoing, MAX_PACKET)
            .map(|_| ())
            .map_err(|e| DpsError::Protocol(format!("cannot encode an MQTT packet: {e}")))
    }

    pub(crate) async fn flush(&mut self) -> Result<(), DpsError> {
        let stream = &mut self.line.stream;
        stream
            .write_all(&self.outgoing)
            .await
            .map_err(|e| DpsError::Connection(format!("writing to DPS: {e}")))?;
        self.outgoing.clear();
        stream
            .flush()
            .await
            .map_err(|e| DpsError::Connection(format!("writing to DPS: {e}")))
    }

    /// The next packet from DPS. A closed connection is a connection error (worth another
    /// connection); bytes that are not MQTT are a protocol error.
    pub(crate) async fn next(&mut self) -> Result<Packet, DpsError> {
        loop {
            match Packet::read(&mut self.incoming, MAX_PACKET) {
                Ok(packet) => return Ok(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(DpsError::Protocol(format!("malformed MQTT from DPS: {e}"))),
            }
            let read = self
                .line
                .stream
                .read_buf(&mut self.incoming)
                .await
                .map_err(|e| DpsError::Connection(format!("reading from DPS: {e}")))?;
            if read == 0 {
                return Err(DpsError::Connection("DPS closed the connection".into()));
            }
        }
    }
}

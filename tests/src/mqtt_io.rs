//! MQTT 3.1.1 packets on a server-side stream, with rumqttc's own codec: what both simulators
//! read and write.

use std::sync::Mutex;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Larger than any request either service accepts (certificates and CSRs are a few KB).
pub const MAX_PACKET: usize = 96 * 1024;

/// The next packet, or `None` when the peer closed the stream or sent something unparsable
/// (both services close the connection then).
pub async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Option<Packet> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(packet) => return Some(packet),
            Err(CodecError::InsufficientBytes(_)) => {
                if stream.read_buf(buf).await.ok()? == 0 {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
}

pub async fn write_packet<S: AsyncWrite + Unpin>(
    stream: &mut S,
    packet: Packet,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    packet
        .write(&mut out, MAX_PACKET)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    stream.write_all(&out).await?;
    stream.flush().await
}

/// A poisoned lock still holds consistent data here (every critical section is one insert or
/// lookup), so a panicked test thread must not take the simulator down with it.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The QoS granted for a subscription: both services grant at most QoS 1.
pub fn granted(requested: QoS) -> QoS {
    if requested == QoS::AtMostOnce {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

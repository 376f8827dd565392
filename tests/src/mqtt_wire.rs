//! A server-side MQTT connection in either MQTT 3.1.1 or MQTT 5 (rumqttc's codecs), reduced to
//! what the AWS IoT simulator acts on: AWS IoT Core speaks both, and the AWS IoT Device SDKs use
//! either (MQTT 5 with their newer service clients). The version is the client's: read from its
//! CONNECT, kept for the connection.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::mqtt_io::MAX_PACKET;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// The client's CONNECT.
#[derive(Debug, Clone)]
pub struct Hello {
    pub version: Version,
    pub client_id: String,
    pub keep_alive: u16,
    /// MQTT 3.1.1 clean session / MQTT 5 clean start.
    pub clean: bool,
    /// How long the session outlives the connection, seconds: MQTT 5's session expiry
    /// interval (0 if absent); for MQTT 3.1.1, unbounded (`u32::MAX`) without clean session.
    pub session_expiry: u32,
}

/// A PUBLISH either way.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub qos: QoS,
    pub pkid: u16,
    pub payload: Bytes,
    /// MQTT 5 request/response properties (absent in MQTT 3.1.1).
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

impl Message {
    pub fn new(topic: String, qos: QoS, payload: impl Into<Bytes>) -> Self {
        Self {
            topic,
            qos,
            pkid: 0,
            payload: payload.into(),
            response_topic: None,
            correlation_data: None,
        }
    }
}

/// What a client sends after CONNECT.
#[derive(Debug)]
pub enum Request {
    Subscribe {
        pkid: u16,
        filters: Vec<(String, QoS)>,
    },
    Publish(Message),
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    Ping,
    Disconnect,
    /// Acknowledgements and anything else the simulator has no use for.
    Other,
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadClientId,
    NotAuthorized,
}

/// The protocol level of the CONNECT at the start of `buf`, once that much of it has arrived
/// (rumqttc's 3.1.1 codec would take a level-5 CONNECT for its own and misread it).
fn protocol_level(buf: &[u8]) -> Option<u8> {
    // Fixed header: type byte, then the remaining length in 1 to 4 bytes.
    let mut end = 1;
    while buf.get(end)? & 0x80 != 0 {
        end += 1;
        if end > 4 {
            return Some(0);
        }
    }
    // Variable header: the protocol name ("MQTT", length-prefixed), then the level.
    let name = usize::from(u16::from_be_bytes([*buf.get(end + 1)?, *buf.get(end + 2)?]));
    buf.get(end + 3 + name).copied()
}

pub struct ServerConnection<S> {
    stream: S,
    buf: BytesMut,
    version: Version,
}

fn to5(qos: QoS) -> QoS5 {
    match qos {
        QoS::AtMostOnce => QoS5::AtMostOnce,
        QoS::AtLeastOnce => QoS5::AtLeastOnce,
        QoS::ExactlyOnce => QoS5::ExactlyOnce,
    }
}

fn from5(qos: QoS5) -> QoS {
    match qos {
        QoS5::AtMostOnce => QoS::AtMostOnce,
        QoS5::AtLeastOnce => QoS::AtLeastOnce,
        QoS5::ExactlyOnce => QoS::ExactlyOnce,
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ServerConnection<S> {
    /// Reads the client's CONNECT, in whichever version it is; `None` if the stream ends or
    /// holds anything else first.
    pub async fn accept(stream: S) -> Option<(Self, Hello)> {
        let mut connection = Self {
            stream,
            buf: BytesMut::with_capacity(8192),
            version: Version::V311,
        };
        loop {
            let parsed = match protocol_level(&connection.buf) {
                None => None,
                Some(5) => {
                    connection.version = Version::V5;
                    match v5::Packet::read(&mut connection.buf, Some(MAX_PACKET as u32)) {
                        Ok(v5::Packet::Connect(c, _, _)) => Some(Hello {
                            version: Version::V5,
                            session_expiry: c
                                .properties
                                .and_then(|p| p.session_expiry_interval)
                                .unwrap_or(0),
                            client_id: c.client_id,
                            keep_alive: c.keep_alive,
                            clean: c.clean_start,
                        }),
                        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => None,
                        _ => return None,
                    }
                }
                Some(_) => match v4::Packet::read(&mut connection.buf, MAX_PACKET) {
                    Ok(v4::Packet::Connect(c)) => Some(Hello {
                        version: Version::V311,
                        session_expiry: if c.clean_session { 0 } else { u32::MAX },
                        client_id: c.client_id,
                        keep_alive: c.keep_alive,
                        clean: c.clean_session,
                    }),
                    Err(CodecError::InsufficientBytes(_)) => None,
                    _ => return None,
                },
            };
            if let Some(hello) = parsed {
                return Some((connection, hello));
            }
            if connection.stream.read_buf(&mut connection.buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The next request, or `None` when the client closed the stream or sent something
    /// unparsable (the connection is closed then, as AWS IoT does).
    pub async fn next(&mut self) -> Option<Request> {
        loop {
            // Some(request), or None when more bytes are needed; unparsable ends the connection.
            let parsed = match self.version {
                Version::V311 => match v4::Packet::read(&mut self.buf, MAX_PACKET) {
                    Ok(packet) => Some(request4(packet)),
                    Err(CodecError::InsufficientBytes(_)) => None,
                    Err(_) => return None,
                },
                Version::V5 => match v5::Packet::read(&mut self.buf, Some(MAX_PACKET as u32)) {
                    Ok(packet) => Some(request5(packet)),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => None,
                    Err(_) => return None,
                },
            };
            if let Some(request) = parsed {
                return Some(request);
            }
            if self.stream.read_buf(&mut self.buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    pub async fn connack(&mut self, session_present: bool) -> std::io::Result<()> {
        match self.version {
            Version::V311 => {
                let ack = v4::ConnAck::new(v4::ConnectReturnCode::Success, session_present);
                self.write4(v4::Packet::ConnAck(ack)).await
            }
            Version::V5 => {
                self.write5(v5::Packet::ConnAck(v5::ConnAck {
                    session_present,
                    code: v5::ConnectReturnCode::Success,
                    properties: None,
                }))
                .await
            }
        }
    }

    pub async fn refuse(&mut self, why: Refusal) -> std::io::Result<()> {
        match self.version {
            Version::V311 => {
                let code = match why {
                    Refusal::BadClientId => v4::ConnectReturnCode::BadClientId,
                    Refusal::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
                };
                self.write4(v4::Packet::ConnAck(v4::ConnAck::new(code, false)))
                    .await
            }
            Version::V5 => {
                let code = match why {
                    Refusal::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                    Refusal::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                };
                self.write5(v5::Packet::ConnAck(v5::ConnAck {
                    session_present: false,
                    code,
                    properties: None,
                }))
                .await
            }
        }
    }

    /// SUBACK: each filter's granted QoS, or `None` where it was refused.
    pub async fn suback(&mut self, pkid: u16, granted: &[Option<QoS>]) -> std::io::Result<()> {
        match self.version {
            Version::V311 => {
                let codes = granted
                    .iter()
                    .map(|g| match g {
                        Some(qos) => v4::SubscribeReasonCode::Success(*qos),
                        None => v4::SubscribeReasonCode::Failure,
                    })
                    .collect();
                self.write4(v4::Packet::SubAck(v4::SubAck::new(pkid, codes)))
                    .await
            }
            Version::V5 => {
                let return_codes = granted
                    .iter()
                    .map(|g| match g {
                        Some(qos) => v5::SubscribeReasonCode::Success(to5(*qos)),
                        None => v5::SubscribeReasonCode::NotAuthorized,
                    })
                    .collect();
                self.write5(v5::Packet::SubAck(v5::SubAck {
                    pkid,
                    return_codes,
                    properties: None,
                }))
                .await
            }
        }
    }

    pub async fn puback(&mut self, pkid: u16) -> std::io::Result<()> {
        match self.version {
            Version::V311 => self.write4(v4::Packet::PubAck(v4::PubAck::new(pkid))).await,
            Version::V5 => {
                self.write5(v5::Packet::PubAck(v5::PubAck::new(pkid, None)))
                    .await
            }
        }
    }

    pub async fn unsuback(&mut self, pkid: u16, filters: usize) -> std::io::Result<()> {
        match self.version {
            Version::V311 => {
                self.write4(v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)))
                    .await
            }
            Version::V5 => {
                self.write5(v5::Packet::UnsubAck(v5::UnsubAck {
                    pkid,
                    reasons: vec![v5::UnsubAckReason::Success; filters],
                    properties: None,
                }))
                .await
            }
        }
    }

    pub async fn pong(&mut self) -> std::io::Result<()> {
        match self.version {
            Version::V311 => self.write4(v4::Packet::PingResp).await,
            Version::V5 => self.write5(v5::Packet::PingResp(v5::PingResp)).await,
        }
    }

    pub async fn publish(&mut self, message: Message) -> std::io::Result<()> {
        match self.version {
            Version::V311 => {
                let mut publish =
                    v4::Publish::from_bytes(message.topic, message.qos, message.payload);
                publish.pkid = message.pkid;
                self.write4(v4::Packet::Publish(publish)).await
            }
            Version::V5 => {
                let properties = (message.response_topic.is_some()
                    || message.correlation_data.is_some())
                .then(|| v5::PublishProperties {
                    response_topic: message.response_topic,
                    correlation_data: message.correlation_data,
                    ..Default::default()
                });
                let mut publish =
                    v5::Publish::new(message.topic, to5(message.qos), message.payload, properties);
                publish.pkid = message.pkid;
                self.write5(v5::Packet::Publish(publish)).await
            }
        }
    }

    async fn write4(&mut self, packet: v4::Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        packet
            .write(&mut out, MAX_PACKET)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.flush(&out).await
    }

    async fn write5(&mut self, packet: v5::Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        packet
            .write(&mut out, Some(MAX_PACKET as u32))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.flush(&out).await
    }

    async fn flush(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }
}

fn request4(packet: v4::Packet) -> Request {
    match packet {
        v4::Packet::Subscribe(s) => Request::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| (f.path, f.qos)).collect(),
        },
        v4::Packet::Publish(p) => Request::Publish(Message {
            topic: p.topic,
            qos: p.qos,
            pkid: p.pkid,
            payload: p.payload,
            response_topic: None,
            correlation_data: None,
        }),
        v4::Packet::Unsubscribe(u) => Request::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Request::Ping,
        v4::Packet::Disconnect => Request::Disconnect,
        _ => Request::Other,
    }
}

fn request5(packet: v5::Packet) -> Request {
    match packet {
        v5::Packet::Subscribe(s) => Request::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, from5(f.qos)))
                .collect(),
        },
        v5::Packet::Publish(p) => {
            let (response_topic, correlation_data) = p
                .properties
                .map(|props| (props.response_topic, props.correlation_data))
                .unwrap_or_default();
            Request::Publish(Message {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                qos: from5(p.qos),
                pkid: p.pkid,
                payload: p.payload,
                response_topic,
                correlation_data,
            })
        }
        v5::Packet::Unsubscribe(u) => Request::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Request::Ping,
        v5::Packet::Disconnect(_) => Request::Disconnect,
        _ => Request::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_level_is_read_once_it_has_arrived() {
        // CONNECT, remaining length 16, "MQTT", level 5 / 4.
        let v5 = [0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 30];
        let v4 = [0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30];
        assert_eq!(protocol_level(&v5), Some(5));
        assert_eq!(protocol_level(&v4), Some(4));
        assert_eq!(protocol_level(&v5[..8]), None, "not there yet");
        assert_eq!(protocol_level(&[]), None);
        // A two-byte remaining length moves the variable header by one.
        let long = [0x10, 0x80, 0x01, 0, 4, b'M', b'Q', b'T', b'T', 5];
        assert_eq!(protocol_level(&long), Some(5));
        // A remaining length longer than MQTT allows is not a CONNECT of either version.
        assert_eq!(
            protocol_level(&[0x10, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Some(0)
        );
    }
}

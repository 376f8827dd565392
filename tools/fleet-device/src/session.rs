//! One MQTT connection to AWS IoT (or the simulator), driven request by request: subscribe to the
//! reply topics first (AWS IoT delivers replies only to subscribers), publish, then wait for
//! `/accepted` or `/rejected`. Every wait is bounded by the caller's deadline, and a broken
//! connection ends the session instead of reconnecting behind the caller's back.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::ClientConfig;
use serde_json::Value;
use tokio::time::{timeout_at, Instant};

use crate::{DeviceError, Format};

pub struct Session {
    client: AsyncClient,
    events: EventLoop,
    deadline: Instant,
    connected: bool,
}

impl Session {
    /// Connects and waits for CONNACK.
    pub async fn connect(
        host: &str,
        port: u16,
        client_id: &str,
        tls: Arc<ClientConfig>,
        deadline: Instant,
    ) -> Result<Self, DeviceError> {
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(64 * 1024, 64 * 1024)
            .set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
        let (client, mut events) = AsyncClient::new(options, 10);
        // Small request/reply packets: Nagle would hold each one for the peer's delayed ACK.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        events.set_network_options(network);
        let mut session = Self {
            client,
            events,
            deadline,
            connected: false,
        };
        loop {
            if let Event::Incoming(Incoming::ConnAck(_)) = session.next("connect").await? {
                session.connected = true;
                return Ok(session);
            }
        }
    }

    async fn next(&mut self, step: &'static str) -> Result<Event, DeviceError> {
        match timeout_at(self.deadline, self.events.poll()).await {
            Err(_) => Err(DeviceError::Timeout { step }),
            Ok(Err(e)) => {
                self.connected = false;
                Err(classify(&e, step))
            }
            Ok(Ok(event)) => Ok(event),
        }
    }

    /// Publishes `payload` to the operation's topic (`base` in `format`) and returns the
    /// `/accepted` body, or the `/rejected` one as [`DeviceError::Rejected`].
    pub async fn request(
        &mut self,
        step: &'static str,
        base: &str,
        format: Format,
        payload: &Value,
    ) -> Result<Value, DeviceError> {
        let topic = format.topic(base);
        let (accepted, rejected) = (format!("{topic}/accepted"), format!("{topic}/rejected"));
        let filters =
            [&accepted, &rejected].map(|t| SubscribeFilter::new(t.to_string(), QoS::AtLeastOnce));
        self.client
            .subscribe_many(filters)
            .await
            .map_err(|e| DeviceError::Connection(format!("{step}: {e}")))?;
        loop {
            if let Event::Incoming(Incoming::SubAck(ack)) = self.next(step).await? {
                if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    return Err(DeviceError::NotAuthorized(format!(
                        "subscribing to {topic}/accepted and /rejected was refused; does the claim policy allow them?"
                    )));
                }
                break;
            }
        }
        self.client
            .publish(&topic, QoS::AtLeastOnce, false, format.encode(payload))
            .await
            .map_err(|e| DeviceError::Connection(format!("{step}: {e}")))?;
        loop {
            let Event::Incoming(Incoming::Publish(reply)) = self.next(step).await? else {
                continue;
            };
            let body = format.decode(&reply.payload).ok_or_else(|| {
                DeviceError::Malformed(format!(
                    "{step}: the reply on {} is not {format:?}",
                    reply.topic
                ))
            })?;
            if reply.topic == accepted {
                return Ok(body);
            }
            if reply.topic == rejected {
                return Err(DeviceError::Rejected {
                    step,
                    status: body.get("statusCode").and_then(Value::as_u64).unwrap_or(0),
                    code: text(&body, "errorCode"),
                    message: text(&body, "errorMessage"),
                });
            }
        }
    }

    /// Sends DISCONNECT and waits (briefly) until it is written.
    pub async fn close(mut self) {
        if !self.connected || self.client.try_disconnect().is_err() {
            return;
        }
        let limit = self.deadline.min(Instant::now() + Duration::from_secs(2));
        let _ = timeout_at(limit, async {
            loop {
                match self.events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

fn text(body: &Value, name: &str) -> String {
    body.get(name)
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_default()
}

/// Turns a connection failure into what the user has to do about it. TLS alerts from the server
/// arrive as I/O errors whose text names the alert.
fn classify(e: &ConnectionError, step: &'static str) -> DeviceError {
    let text = e.to_string();
    if let ConnectionError::ConnectionRefused(code) = e {
        return DeviceError::NotAuthorized(format!("the server refused the connection ({code:?})"));
    }
    if text.contains("CertificateExpired") {
        return DeviceError::CertificateExpired;
    }
    if [
        "BadCertificate",
        "UnknownCA",
        "CertificateUnknown",
        "CertificateRevoked",
        "AccessDenied",
    ]
    .iter()
    .any(|alert| text.contains(alert))
    {
        return DeviceError::CertificateRefused(text);
    }
    if text.contains("NotValidForName") || text.contains("UnknownIssuer") {
        return DeviceError::ServerNotTrusted(text);
    }
    DeviceError::Connection(format!("{step}: {text}"))
}

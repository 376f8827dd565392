//! Persistent MQTT sessions as AWS IoT Core keeps them: a client that connects without clean
//! session (MQTT 3.1.1) or clean start and with a session expiry (MQTT 5) finds its
//! subscriptions again when it reconnects within the session's lifetime, and CONNACK says so
//! (`session present`). AWS IoT keeps a persistent session one hour by default.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use tokio::time::Instant;

use crate::mqtt_io::lock;
use crate::mqtt_wire::Hello;

/// AWS IoT's default persistent session expiry.
pub const MAX_SESSION: Duration = Duration::from_secs(3600);

/// Subscriptions: filter and granted QoS.
pub type Subscriptions = Vec<(String, QoS)>;

#[derive(Default)]
pub struct Sessions {
    kept: Mutex<HashMap<String, (Instant, Subscriptions)>>,
}

impl Sessions {
    /// The subscriptions a connecting client resumes, and whether it had a session.
    pub fn resume(&self, hello: &Hello) -> (Subscriptions, bool) {
        let mut kept = lock(&self.kept);
        let session = kept.remove(&hello.client_id);
        match session {
            Some((until, subscriptions)) if !hello.clean && Instant::now() < until => {
                (subscriptions, true)
            }
            _ => (Vec::new(), false),
        }
    }

    /// Keeps a disconnected client's subscriptions for its session's lifetime, if any.
    pub fn keep(&self, hello: &Hello, subscriptions: Subscriptions) {
        if hello.session_expiry == 0 {
            return;
        }
        let lifetime = Duration::from_secs(u64::from(hello.session_expiry)).min(MAX_SESSION);
        lock(&self.kept).insert(
            hello.client_id.clone(),
            (Instant::now() + lifetime, subscriptions),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt_wire::Version;

    fn hello(clean: bool, session_expiry: u32) -> Hello {
        Hello {
            version: Version::V5,
            client_id: "claim.SN-0001".into(),
            keep_alive: 30,
            clean,
            session_expiry,
        }
    }

    #[test]
    fn a_persistent_session_keeps_its_subscriptions_and_a_clean_one_does_not() {
        let sessions = Sessions::default();
        let subscribed = vec![(
            "$aws/certificates/create/json/accepted".to_owned(),
            QoS::AtLeastOnce,
        )];
        // MQTT 3.1.1 without clean session (unbounded, capped at AWS's hour).
        sessions.keep(&hello(false, u32::MAX), subscribed.clone());
        assert_eq!(
            sessions.resume(&hello(false, 0)),
            (subscribed.clone(), true)
        );
        // Taken by that connection: a second resume finds nothing until it is kept again.
        assert_eq!(sessions.resume(&hello(false, 0)), (Vec::new(), false));
        // Clean start discards a kept session.
        sessions.keep(&hello(false, 60), subscribed.clone());
        assert_eq!(sessions.resume(&hello(true, 60)), (Vec::new(), false));
        assert_eq!(sessions.resume(&hello(false, 60)), (Vec::new(), false));
        // Session expiry 0 (MQTT 5's default): nothing outlives the connection.
        sessions.keep(&hello(false, 0), subscribed);
        assert_eq!(sessions.resume(&hello(false, 0)), (Vec::new(), false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_ends_with_its_expiry() {
        let sessions = Sessions::default();
        sessions.keep(&hello(false, 10), vec![("a/b".into(), QoS::AtMostOnce)]);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(sessions.resume(&hello(false, 10)), (Vec::new(), false));
    }
}

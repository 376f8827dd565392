//! One connection event. A provisioning becomes confirmed only when the certificate that
//! connected is the one the hook recorded for the serial; only then are the thing's other
//! certificates (the ones a re-provisioning replaced, possibly an attacker's) set INACTIVE and
//! detached. A failure is returned as an error, so that Lambda retries the event (the topic
//! rule invokes asynchronously) and the `failed` alarm sees it.

use serde_json::Value;
use shared::aws::Failure;
use shared::clock::unix_now;
use shared::registry::{Confirmation, Confirmations, RegistryError};

use crate::config::Config;
use crate::event::Connected;
use crate::ports::Certificates;

/// What one event came to. The code is stable, for log queries, metrics and alarms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The serial's recorded certificate connected for the first time.
    Confirmed,
    /// Confirmed before; nothing left to retire.
    AlreadyConfirmed,
    /// Not a certificate's connection of a provisioned thing's client id.
    Ignored,
    /// A certificate other than the recorded one connected as the thing (a replaced one that
    /// is still active until the new one connects, or one nobody recorded).
    NotRecorded,
    /// The device table or AWS IoT failed; the event is retried.
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Self::Confirmed,
        Self::AlreadyConfirmed,
        Self::Ignored,
        Self::NotRecorded,
        Self::Failed,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Self::Confirmed => "confirmed",
            Self::AlreadyConfirmed => "already-confirmed",
            Self::Ignored => "ignored",
            Self::NotRecorded => "not-recorded",
            Self::Failed => "failed",
        }
    }
}

/// Why an event could not be handled; Lambda retries it.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("device table: {0}")]
    Registry(#[from] RegistryError),
    #[error("AWS IoT: {0:?}")]
    Iot(Failure),
}

/// What the handler reports of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    /// Certificates set INACTIVE and detached.
    pub retired: Vec<String>,
}

/// Handles one event, logs it and counts its outcome.
pub async fn handle(
    event: Value,
    config: &Config,
    registry: &impl Confirmations,
    certificates: &impl Certificates,
) -> Result<Report, HandleError> {
    let result = decide(event, config, registry, certificates).await;
    let outcome = match &result {
        Ok(report) => report.outcome,
        Err(_) => Outcome::Failed,
    };
    lambda_support::metrics::emit(outcome.code(), &[]);
    if let Err(e) = &result {
        tracing::error!(outcome = outcome.code(), error = %e, "connection not handled; retried");
    }
    result
}

async fn decide(
    event: Value,
    config: &Config,
    registry: &impl Confirmations,
    certificates: &impl Certificates,
) -> Result<Report, HandleError> {
    let ignored = |why: &str| {
        tracing::info!(
            outcome = Outcome::Ignored.code(),
            reason = why,
            "event ignored"
        );
        Ok(Report {
            outcome: Outcome::Ignored,
            retired: Vec::new(),
        })
    };
    let connected = match Connected::parse(event) {
        Ok(c) => c,
        Err(e) => return ignored(&e.to_string()),
    };
    // The device policy lets a certificate connect only as its thing, named prefix + serial.
    let Some(serial) = connected
        .client_id
        .strip_prefix(&config.thing_name_prefix)
        .filter(|s| !s.is_empty())
    else {
        return ignored("client id is not a provisioned thing's name");
    };
    let thing = connected.client_id.as_str();
    let certificate = connected.certificate_id.as_str();

    let replaced = match registry.confirm(serial, certificate, unix_now()).await? {
        Confirmation::NotRecorded => {
            tracing::warn!(
                outcome = Outcome::NotRecorded.code(),
                serial,
                thing,
                certificate_id = certificate,
                "a certificate the device table does not record connected as the thing"
            );
            return Ok(Report {
                outcome: Outcome::NotRecorded,
                retired: Vec::new(),
            });
        }
        Confirmation::Recorded {
            newly: false,
            replaced: None,
        } => {
            return Ok(Report {
                outcome: Outcome::AlreadyConfirmed,
                retired: Vec::new(),
            })
        }
        Confirmation::Recorded { replaced, .. } => replaced,
    };

    // The device holds its new certificate: every other one the thing holds goes, the
    // recorded replaced one and any a chain of unconfirmed replacements left behind.
    let mut retired = Vec::new();
    for other in certificates
        .attached(thing)
        .await
        .map_err(HandleError::Iot)?
        .into_iter()
        .filter(|a| a.certificate_id != certificate)
    {
        certificates
            .retire(thing, &other)
            .await
            .map_err(HandleError::Iot)?;
        retired.push(other.certificate_id);
    }
    if let Some(replaced) = &replaced {
        registry.retired(serial, certificate, replaced).await?;
    }
    tracing::info!(
        outcome = Outcome::Confirmed.code(), serial, thing, certificate_id = certificate,
        retired = ?retired, "provisioning confirmed"
    );
    Ok(Report {
        outcome: Outcome::Confirmed,
        retired,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    use serde_json::json;
    use shared::memory::MemoryTable;
    use shared::registry::{
        DeviceId, DeviceRecord, Provisioning, ProvisioningState, SerialRegistry,
    };

    use crate::ports::Attached;

    fn cert(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    /// AWS IoT's things and certificates, in memory: attached ARNs per thing, statuses.
    #[derive(Default)]
    struct Iot {
        attached: Mutex<HashMap<String, Vec<String>>>,
        inactive: Mutex<Vec<String>>,
        failure: Mutex<Option<Failure>>,
    }

    impl Iot {
        fn attach(&self, thing: &str, certificate: &str) {
            self.attached
                .lock()
                .unwrap()
                .entry(thing.into())
                .or_default()
                .push(certificate.into());
        }

        fn holds(&self, thing: &str) -> Vec<String> {
            self.attached
                .lock()
                .unwrap()
                .get(thing)
                .cloned()
                .unwrap_or_default()
        }
    }

    impl Certificates for Iot {
        async fn attached(&self, thing: &str) -> Result<Vec<Attached>, Failure> {
            if let Some(f) = self.failure.lock().unwrap().clone() {
                return Err(f);
            }
            Ok(self
                .holds(thing)
                .into_iter()
                .map(|id| Attached {
                    arn: format!("arn:aws:iot:ap-northeast-1:123456789012:cert/{id}"),
                    certificate_id: id,
                })
                .collect())
        }

        async fn retire(&self, thing: &str, c: &Attached) -> Result<(), Failure> {
            self.inactive.lock().unwrap().push(c.certificate_id.clone());
            if let Some(list) = self.attached.lock().unwrap().get_mut(thing) {
                list.retain(|id| *id != c.certificate_id);
            }
            Ok(())
        }
    }

    fn config() -> Config {
        Config::from_env(&[("DEVICES_TABLE", "d"), ("THING_NAME_PREFIX", "fleet-")]).unwrap()
    }

    fn connected(client_id: &str, certificate: &str) -> Value {
        json!({"clientId": client_id, "timestamp": 1573002230757u64, "eventType": "connected",
               "sessionIdentifier": "a4666d2a7d844ae4ac5d7b38c9cb7967",
               "principalIdentifier": certificate, "ipAddress": "192.0.2.0", "versionNumber": 0})
    }

    /// SN-1 provisioned (pending) with `current`, replacing `replaced`.
    fn table(current: &str, replaced: Option<&str>) -> MemoryTable {
        let table = MemoryTable::new();
        let mut record = DeviceRecord::allowed(DeviceId::Serial("SN-1".into()));
        record.provisioning = Some(Provisioning {
            certificate_id: current.into(),
            claim_certificate_id: None,
            provisioned_at: unix_now() - 10,
            state: ProvisioningState::Pending,
            replaced_certificate_id: replaced.map(str::to_owned),
            issued_to: Some("installer-a".into()),
            confirmed_at: None,
        });
        table.put(record);
        table
    }

    async fn provisioning(table: &MemoryTable) -> Provisioning {
        table
            .serial("SN-1")
            .await
            .unwrap()
            .unwrap()
            .provisioning
            .unwrap()
    }

    #[tokio::test]
    async fn the_recorded_certificates_first_connection_confirms_and_retires_the_rest() {
        let (table, iot) = (table(&cert(2), Some(&cert(1))), Iot::default());
        // cert 0: left behind by an earlier unconfirmed replacement; cert 1: replaced.
        for n in [0, 1, 2] {
            iot.attach("fleet-SN-1", &cert(n));
        }
        let report = handle(connected("fleet-SN-1", &cert(2)), &config(), &table, &iot)
            .await
            .unwrap();
        assert_eq!(report.outcome, Outcome::Confirmed);
        assert_eq!(report.retired, vec![cert(0), cert(1)]);
        assert_eq!(iot.holds("fleet-SN-1"), vec![cert(2)]);
        assert_eq!(*iot.inactive.lock().unwrap(), vec![cert(0), cert(1)]);
        let p = provisioning(&table).await;
        assert_eq!(p.state, ProvisioningState::Confirmed);
        assert!(p.confirmed_at.is_some());
        assert_eq!(p.replaced_certificate_id, None);
        // AWS IoT delivering the event again, or the device reconnecting: nothing more.
        let again = handle(connected("fleet-SN-1", &cert(2)), &config(), &table, &iot)
            .await
            .unwrap();
        assert_eq!(again.outcome, Outcome::AlreadyConfirmed);
        assert_eq!(iot.inactive.lock().unwrap().len(), 2);
    }

    /// The replaced certificate still connects until the new one has: it confirms nothing and
    /// retires nothing (a device that loses power mid-way keeps a working certificate).
    #[tokio::test]
    async fn another_certificate_confirms_nothing_and_retires_nothing() {
        let (table, iot) = (table(&cert(2), Some(&cert(1))), Iot::default());
        iot.attach("fleet-SN-1", &cert(1));
        iot.attach("fleet-SN-1", &cert(2));
        for (client, certificate) in [
            ("fleet-SN-1", cert(1)),
            ("fleet-SN-1", cert(9)),
            ("fleet-SN-404", cert(2)),
        ] {
            let report = handle(connected(client, &certificate), &config(), &table, &iot)
                .await
                .unwrap();
            assert_eq!(
                report.outcome,
                Outcome::NotRecorded,
                "{client} {certificate}"
            );
        }
        assert_eq!(provisioning(&table).await.state, ProvisioningState::Pending);
        assert!(iot.inactive.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn events_that_are_not_a_things_certificate_connecting_are_ignored() {
        let (table, iot) = (table(&cert(2), None), Iot::default());
        let mut disconnected = connected("fleet-SN-1", &cert(2));
        disconnected["eventType"] = json!("disconnected");
        for event in [
            disconnected,
            connected("claim.abc", &cert(2)),
            connected("fleet-", &cert(2)),
            connected("fleet-SN-1", "123456789012/AROAEXAMPLE:someone"),
            json!({"unexpected": true}),
        ] {
            let report = handle(event.clone(), &config(), &table, &iot)
                .await
                .unwrap();
            assert_eq!(report.outcome, Outcome::Ignored, "{event}");
        }
        assert_eq!(table.calls(), 0, "nothing reached the table");
        assert_eq!(provisioning(&table).await.state, ProvisioningState::Pending);
    }

    /// A failure is an error (Lambda retries the event); the retry finishes the work.
    #[tokio::test]
    async fn failures_are_retried_and_the_retry_completes() {
        let (table, iot) = (table(&cert(2), Some(&cert(1))), Iot::default());
        iot.attach("fleet-SN-1", &cert(1));
        iot.attach("fleet-SN-1", &cert(2));
        *iot.failure.lock().unwrap() = Some(Failure::Throttled);
        let event = connected("fleet-SN-1", &cert(2));
        assert!(matches!(
            handle(event.clone(), &config(), &table, &iot).await,
            Err(HandleError::Iot(Failure::Throttled))
        ));
        // Confirmed already, but the replaced certificate is still recorded: the retry
        // retires it.
        assert_eq!(
            provisioning(&table).await.replaced_certificate_id,
            Some(cert(1))
        );
        *iot.failure.lock().unwrap() = None;
        let report = handle(event.clone(), &config(), &table, &iot)
            .await
            .unwrap();
        assert_eq!(report.retired, vec![cert(1)]);
        table.fail_with(Some(RegistryError::Throttled));
        assert!(matches!(
            handle(event, &config(), &table, &iot).await,
            Err(HandleError::Registry(RegistryError::Throttled))
        ));
    }

    proptest::proptest! {
        /// Any payload: never a panic, never a confirmation of a serial nobody provisioned.
        #[test]
        fn any_event_confirms_nothing_unrecorded(event in shared::strategies::json_with_keys(
            &["clientId", "eventType", "principalIdentifier", "connected", "fleet-SN-1"])) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (table, iot) = (MemoryTable::new(), Iot::default());
            let report = runtime.block_on(handle(event, &config(), &table, &iot)).unwrap();
            proptest::prop_assert!(
                matches!(report.outcome, Outcome::Ignored | Outcome::NotRecorded),
                "{report:?}"
            );
        }
    }
}

//! Every local stand-in the functions need, started together and seeded with the sample
//! story's data: the local AWS endpoint (device table, group key), the DPS simulator and the IoT
//! control-plane double. [`LocalStack::env`] is the functions' environment pointing at them.

use std::path::Path;

use aws_sdk_ssm::types::ParameterType;
use shared::keys::SymmetricKey;
use shared::registry::{DeviceId, DeviceRecord, DeviceStatus, DynamoRegistry};

use crate::device_ca::{kms_device_ca, DeviceCa};
use crate::dps_sim::{DpsLimits, DpsSimConfig, DpsSimulator};
use crate::iot_control::IotControlPlane;
use crate::iot_hub::IotHubRegistry;
use crate::local_aws::{random_key_base64, LocalAws};

pub const TABLE: &str = "devices";
pub const GROUP_KEY_PARAMETER: &str = "/soracom-dps/group-key";
pub const ID_SCOPE: &str = "0ne00DEMO01";
pub const TEMPLATE: &str = "fleet-template";
/// Where sim-lifecycle finds each hub's service connection string (`<prefix><hub>`).
pub const HUB_CREDENTIALS_PREFIX: &str = "/soracom-dps/iot-hub/";
/// Where azure-dps-register finds SORACOM Beam's pre-shared key.
pub const BEAM_PSK_PARAMETER: &str = "/soracom-dps/beam-psk";
/// The demo's SORACOM operator (the sample client contexts name it).
pub const OPERATOR_ID: &str = "OP0012345678";
pub const HUBS: [&str; 2] = [
    "demo-hub-1.azure-devices.net",
    "demo-hub-2.azure-devices.net",
];
/// The SIM that `events/azure-dps-register/client-context-blocked.json` names.
pub const BLOCKED_IMSI: &str = "440103999999999";
/// The SIM that `events/azure-dps-register/client-context-expired.json` names.
pub const EXPIRED_IMSI: &str = "440103888888888";
/// Where azure-dps-register with `ATTESTATION=x509` finds the device CA's certificate.
pub const DEVICE_CA_PARAMETER: &str = "/soracom-dps/device-ca";

#[derive(Debug, thiserror::Error)]
#[error("local stack: {0}")]
pub struct StackError(String);

fn err(e: impl std::fmt::Display) -> StackError {
    StackError(e.to_string())
}

/// A fresh directory under the system's temporary one, removed when dropped.
pub type TempDir = tempfile::TempDir;

/// A [`TempDir`] whose name starts with `label` (to tell runs apart when one is kept).
pub fn temp_dir(label: &str) -> std::io::Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{label}-"))
        .tempdir()
}

pub struct LocalStack {
    pub aws: LocalAws,
    pub dps: DpsSimulator,
    pub iot: IotControlPlane,
    /// The IoT Hub registry of both demo hubs (sim-lifecycle disables devices there).
    pub hubs: IotHubRegistry,
    pub group_key: SymmetricKey,
    /// The key SORACOM Beam signs with (made at start, kept in SSM).
    pub beam_psk: String,
    pub registry: DynamoRegistry,
    /// The X.509 device CA: its key in the local KMS, its certificate in SSM, DPS enrolling
    /// the operator's root above it.
    pub device_ca: DeviceCa,
    dir: TempDir,
}

impl LocalStack {
    pub async fn start() -> Result<Self, StackError> {
        let aws = LocalAws::start().await.map_err(err)?;
        let group_key_b64 = random_key_base64();
        let group_key = SymmetricKey::from_base64(&group_key_b64).map_err(err)?;

        let kms = aws_sdk_kms::Client::new(&aws.sdk_config().await);
        let device_ca = kms_device_ca(&kms).await.map_err(err)?;
        aws.put_parameter(
            DEVICE_CA_PARAMETER,
            &device_ca.intermediate_pem,
            ParameterType::String,
        )
        .await
        .map_err(err)?;

        let mut dps_config = DpsSimConfig::new(ID_SCOPE);
        dps_config.group_keys.push(group_key.clone());
        dps_config.x509_cas.push(device_ca.root_pem.clone());
        dps_config.hubs = HUBS.iter().map(|h| (*h).to_owned()).collect();
        dps_config.retry_after = 1;
        // The demo and the replays run under DPS's own quotas.
        dps_config.limits = DpsLimits::DPS;
        let dps = DpsSimulator::start(dps_config, ([127, 0, 0, 1], 0).into())
            .await
            .map_err(err)?;
        let iot = IotControlPlane::start(&[TEMPLATE]).await.map_err(err)?;
        let hubs = IotHubRegistry::start(&HUBS).await.map_err(err)?;

        aws.create_devices_table(TABLE).await.map_err(err)?;
        aws.put_parameter(
            GROUP_KEY_PARAMETER,
            &group_key_b64,
            ParameterType::SecureString,
        )
        .await
        .map_err(err)?;
        for hub in HUBS {
            let connection = hubs.connection_string(hub).unwrap_or_default();
            aws.put_parameter(
                &format!("{HUB_CREDENTIALS_PREFIX}{hub}"),
                &connection,
                ParameterType::SecureString,
            )
            .await
            .map_err(err)?;
        }
        let beam_psk = random_key_base64();
        aws.put_parameter(BEAM_PSK_PARAMETER, &beam_psk, ParameterType::SecureString)
            .await
            .map_err(err)?;
        let registry = DynamoRegistry::new(aws.dynamodb().await, TABLE);
        let mut blocked_sim = DeviceRecord::allowed(DeviceId::Sim(BLOCKED_IMSI.into()));
        blocked_sim.status = DeviceStatus::Blocked;
        let mut expired_sim = DeviceRecord::allowed(DeviceId::Sim(EXPIRED_IMSI.into()));
        expired_sim.valid_until = Some(1);
        let mut serial = DeviceRecord::allowed(DeviceId::Serial("SN-0001".into()));
        serial.overrides.insert("Location".into(), "tokyo-1".into());
        let mut blocked_serial = DeviceRecord::allowed(DeviceId::Serial("SN-0666".into()));
        blocked_serial.status = DeviceStatus::Blocked;
        // The demo's second device, provisioned by the official AWS IoT Device SDK.
        let sdk_serial = DeviceRecord::allowed(DeviceId::Serial("SN-0002".into()));
        for record in [blocked_sim, expired_sim, serial, blocked_serial, sdk_serial] {
            registry.put(&record).await.map_err(err)?;
        }

        let dir = temp_dir("local-stack").map_err(err)?;
        std::fs::write(dir.path().join("dps-ca.pem"), dps.ca_pem()).map_err(err)?;
        std::fs::write(dir.path().join("iot-hub-ca.pem"), hubs.ca_pem()).map_err(err)?;
        Ok(Self {
            aws,
            dps,
            iot,
            hubs,
            group_key,
            beam_psk,
            registry,
            device_ca,
            dir,
        })
    }

    /// The environment of all three functions, pointed at this stack.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
            ("AWS_ENDPOINT_URL", self.aws.endpoint().to_owned()),
            // Service-specific endpoint: CreateProvisioningClaim goes to the IoT double.
            ("AWS_ENDPOINT_URL_IOT", self.iot.endpoint()),
            ("DEVICES_TABLE", TABLE.to_owned()),
            ("DPS_ID_SCOPE", ID_SCOPE.to_owned()),
            (
                "DPS_ENDPOINT",
                format!("127.0.0.1:{}", self.dps.addr().port()),
            ),
            (
                "DPS_TRUSTED_CA_FILE",
                self.dir.path().join("dps-ca.pem").display().to_string(),
            ),
            ("GROUP_KEY_PARAMETER", GROUP_KEY_PARAMETER.to_owned()),
            ("PROVISIONING_TEMPLATE", TEMPLATE.to_owned()),
            // The demo's template names things fleet-<serial> (story::device::THING_PREFIX).
            ("THING_NAME_PREFIX", "fleet-".to_owned()),
            (
                "IOT_DATA_ENDPOINT",
                "local-ats.iot.us-east-1.amazonaws.com".to_owned(),
            ),
            ("BEAM_PSK_PARAMETER", BEAM_PSK_PARAMETER.to_owned()),
            ("BEAM_OPERATOR_ID", OPERATOR_ID.to_owned()),
            ("HUB_CREDENTIALS_PREFIX", HUB_CREDENTIALS_PREFIX.to_owned()),
            ("IOT_HUB_ENDPOINT", self.hubs.endpoint()),
            (
                "IOT_HUB_TRUSTED_CA_FILE",
                self.dir.path().join("iot-hub-ca.pem").display().to_string(),
            ),
            ("RUST_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// [`Self::env`] for azure-dps-register deployed for X.509 devices (`Attestation=x509`).
    pub fn x509_env(&self) -> Vec<(String, String)> {
        let mut env = self.env();
        env.extend(
            [
                ("ATTESTATION", "x509"),
                ("CA_KMS_KEY_ID", self.device_ca.key_id.as_str()),
                ("CA_CERTIFICATE_PARAMETER", DEVICE_CA_PARAMETER),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        env
    }

    /// Writes [`Self::env`] as a `KEY=VALUE` file for `cargo lambda watch --env-file`.
    pub fn write_env_file(&self, path: &Path) -> std::io::Result<()> {
        write_env(&self.env(), path)
    }

    /// Writes [`Self::x509_env`] the same way.
    pub fn write_x509_env_file(&self, path: &Path) -> std::io::Result<()> {
        write_env(&self.x509_env(), path)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn write_env(env: &[(String, String)], path: &Path) -> std::io::Result<()> {
    let text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(path, text)
}

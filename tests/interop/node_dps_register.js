// Registers one device through the official Azure IoT Node.js provisioning SDK (the SDK the
// original Funk -> Lambda write-up used). Prints one JSON line with the result, or exits 1 with
// the error's name on stderr. Trust the simulator's CA with NODE_EXTRA_CA_CERTS.
'use strict';

const { Mqtt } = require('azure-iot-provisioning-device-mqtt');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');

function arg(name) {
  const at = process.argv.indexOf('--' + name);
  return at > 0 ? process.argv[at + 1] : undefined;
}

const host = arg('host'); // host:port: the SDK builds 'mqtts://' + host
const security = new SymmetricKeySecurityClient(arg('registration-id'), arg('key'));
const client = ProvisioningDeviceClient.create(host, arg('scope'), new Mqtt(), security);
if (arg('payload')) {
  client.setProvisioningPayload(JSON.parse(arg('payload')));
}
// The SDK can hang on a dropped connection; the caller bounds the run as well.
const timer = setTimeout(() => { console.error('Timeout'); process.exit(1); }, 30000);
client.register((err, result) => {
  clearTimeout(timer);
  if (err) {
    console.error(err.name || 'Error');
    process.exit(1);
  }
  console.log(JSON.stringify({
    status: result.status,
    assignedHub: result.assignedHub,
    deviceId: result.deviceId,
    payload: result.payload,
  }));
  process.exit(0);
});

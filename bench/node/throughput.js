// The baseline's throughput: N registrations by C concurrent callers with the official Node.js
// provisioning SDK, as the seed 000 handler registers. Device keys are derived from the group
// key (HMAC-SHA256 of the registration id). Prints one JSON line of figures.
'use strict';
const crypto = require('crypto');
const { Mqtt } = require('azure-iot-provisioning-device-mqtt');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');

function arg(name, fallback) {
  const at = process.argv.indexOf('--' + name);
  return at > 0 ? process.argv[at + 1] : fallback;
}
const host = arg('host');
const scope = arg('scope');
const groupKey = Buffer.from(arg('group-key'), 'base64');
const total = Number(arg('count', '1000'));
const concurrency = Number(arg('concurrency', '100'));
const perCallTimeout = Number(arg('timeout-ms', '60000'));

function registerOne(i) {
  const id = `bench-node-${i}`;
  const key = crypto.createHmac('sha256', groupKey).update(id).digest('base64');
  const client = ProvisioningDeviceClient.create(host, scope, new Mqtt(), new SymmetricKeySecurityClient(id, key));
  const started = process.hrtime.bigint();
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve({ ok: false, ms: perCallTimeout, error: 'Timeout' }), perCallTimeout);
    client.register((err) => {
      clearTimeout(timer);
      const ms = Number(process.hrtime.bigint() - started) / 1e6;
      resolve({ ok: !err, ms, error: err ? (err.name || 'Error') : undefined });
    });
  });
}

(async () => {
  const started = process.hrtime.bigint();
  let next = 0;
  const results = [];
  async function worker() {
    while (next < total) {
      const i = next++;
      results.push(await registerOne(i));
    }
  }
  await Promise.all(Array.from({ length: concurrency }, worker));
  const wallMs = Number(process.hrtime.bigint() - started) / 1e6;
  const errors = {};
  for (const r of results) if (!r.ok) errors[r.error] = (errors[r.error] || 0) + 1;
  console.log(JSON.stringify({
    successes: results.filter((r) => r.ok).length,
    failures: results.filter((r) => !r.ok).length,
    errors,
    latencies_ms: results.filter((r) => r.ok).map((r) => r.ms),
    wall_ms: wallMs,
  }));
  process.exit(0);
})();

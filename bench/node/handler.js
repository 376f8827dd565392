// The original write-up's Lambda handler (seed 000), as published, with three changes a
// benchmark needs: the DPS host comes from PROVISIONING_HOST (the simulator) instead of
// global.azure-devices-provisioning.net, the IMSI is read from the client context's `custom`
// object where SORACOM Funk puts it, and a failed registration reports the error's name.
'use strict';
var iotHubTransport = require('azure-iot-device-mqtt').Mqtt;
var Client = require('azure-iot-device').Client;
var Message = require('azure-iot-device').Message;
var ProvisioningTransport = require('azure-iot-provisioning-device-mqtt').Mqtt;
var SymmetricKeySecurityClient = require('azure-iot-security-symmetric-key').SymmetricKeySecurityClient;
var ProvisioningDeviceClient = require('azure-iot-provisioning-device').ProvisioningDeviceClient;

var provisioningHost = process.env.PROVISIONING_HOST;

module.exports.hello = async (event, context) => {
  var idScope = process.env.PROVISIONING_IDSCOPE;
  var clientContext = context.clientContext || {};
  var registrationId = (clientContext.custom || clientContext).imsi;
  var symmetricKey = process.env[`PROVISIONING_SYMMETRIC_KEY_${registrationId}`];
  var provisioningSecurityClient = new SymmetricKeySecurityClient(registrationId, symmetricKey);

  var provisioningClient = ProvisioningDeviceClient.create(provisioningHost, idScope, new ProvisioningTransport(), provisioningSecurityClient);
  provisioningClient.setProvisioningPayload({a: 'b'});

  var resultString = "";
  var resultStatus = 200;
  try {
    const result = await provisioningClient.register();
    resultString = 'HostName=' + result.assignedHub + ';DeviceId=' + result.deviceId + ';SharedAccessKey=' + symmetricKey;
  } catch (err) {
    resultString = err.name || err.message;
    resultStatus = 500;
  }
  return {
    statusCode: resultStatus,
    body: resultString
  };
};

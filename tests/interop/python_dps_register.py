"""Registers one device through the official Azure IoT Python device SDK (azure-iot-device).

Used by the DPS simulator interop tests: prints one JSON line with the result, or exits 1 with
the SDK's error class on stderr. The SDK always connects to port 8883 of the provisioning host.
With --key the device proves itself with a SAS token of that symmetric key; with --cert and
--cert-key, with that X.509 certificate (chain) and private key in the TLS handshake.
"""

import argparse
import json
import sys

from azure.iot.device import ProvisioningDeviceClient, X509


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--scope", required=True)
    parser.add_argument("--registration-id", required=True)
    parser.add_argument("--key")
    parser.add_argument("--cert")
    parser.add_argument("--cert-key")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--payload")
    args = parser.parse_args()

    with open(args.ca, encoding="ascii") as ca:
        trusted = ca.read()
    if args.cert:
        client = ProvisioningDeviceClient.create_from_x509_certificate(
            provisioning_host=args.host,
            registration_id=args.registration_id,
            id_scope=args.scope,
            x509=X509(cert_file=args.cert, key_file=args.cert_key),
            server_verification_cert=trusted,
        )
    else:
        client = ProvisioningDeviceClient.create_from_symmetric_key(
            provisioning_host=args.host,
            registration_id=args.registration_id,
            id_scope=args.scope,
            symmetric_key=args.key,
            server_verification_cert=trusted,
        )
    if args.payload:
        client.provisioning_payload = json.loads(args.payload)
    try:
        result = client.register()
    except Exception as error:  # the SDK's own error types differ between failure kinds
        print(type(error).__name__, file=sys.stderr)
        return 1
    state = result.registration_state
    # The SDK hands back the returned payload re-serialized as a JSON string.
    payload = state.response_payload
    if isinstance(payload, str):
        payload = json.loads(payload)
    print(json.dumps({
        "status": result.status,
        "assignedHub": state.assigned_hub,
        "deviceId": state.device_id,
        "payload": payload,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Registers one device through the official Azure IoT Python device SDK (azure-iot-device).

Used by the DPS simulator interop test: prints one JSON line with the result, or exits 1 with
the SDK's error class on stderr. The SDK always connects to port 8883 of the provisioning host.
"""

import argparse
import json
import sys

from azure.iot.device import ProvisioningDeviceClient


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--scope", required=True)
    parser.add_argument("--registration-id", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--payload")
    args = parser.parse_args()

    with open(args.ca, encoding="ascii") as ca:
        client = ProvisioningDeviceClient.create_from_symmetric_key(
            provisioning_host=args.host,
            registration_id=args.registration_id,
            id_scope=args.scope,
            symmetric_key=args.key,
            server_verification_cert=ca.read(),
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

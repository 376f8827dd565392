"""Fleet provisioning by claim with the official AWS IoT Device SDK v2 for Python (awsiotsdk),
as its fleet provisioning sample does it: connect with the claim certificate, subscribe to the
accepted/rejected topics, create a certificate (new keys, or from a CSR), then RegisterThing.

Prints one JSON object: {"certificateId", "thingName", "deviceConfiguration"} when provisioned,
or {"rejected": {"step", "statusCode", "errorCode", "errorMessage"}} when AWS IoT (here the
simulator) said no. Exits non-zero only when the conversation itself failed.

--api mqtt3 uses IotIdentityClient over an MQTT 3.1.1 connection (mqtt_connection_builder);
--api mqtt5 uses IotIdentityClientV2 (the request-response client) over an MQTT 5 client
(mqtt5_client_builder), as the SDK's current sample does.
"""

import argparse
import json
import sys
from concurrent.futures import Future

import awsiot
from awscrt import mqtt, mqtt5, mqtt_request_response
from awsiot import iotidentity, mqtt5_client_builder, mqtt_connection_builder

TIMEOUT = 20


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--template", required=True)
    p.add_argument("--serial", required=True)
    p.add_argument("--csr", action="store_true",
                   help="CreateCertificateFromCsr with a key made here, instead of new keys")
    p.add_argument("--reuse-token", action="store_true",
                   help="after provisioning, RegisterThing again with the same ownership token")
    p.add_argument("--api", choices=["mqtt3", "mqtt5"], default="mqtt3")
    return p.parse_args()


class Replies:
    """The first reply on a request's accepted or rejected topic."""

    def __init__(self):
        self.future = Future()

    def accepted(self, response):
        if not self.future.done():
            self.future.set_result(("accepted", response))

    def rejected(self, error):
        if not self.future.done():
            self.future.set_result(("rejected", error))

    def wait(self):
        return self.future.result(TIMEOUT)


def subscribe(client, pairs):
    for subscribe_fn, request, callback in pairs:
        future, _ = subscribe_fn(request=request, qos=mqtt.QoS.AT_LEAST_ONCE, callback=callback)
        future.result(TIMEOUT)


def rejected(step, error):
    return {
        "rejected": {
            "step": step,
            "statusCode": error.status_code,
            "errorCode": error.error_code,
            "errorMessage": error.error_message,
        }
    }


def create_certificate(client, args):
    if args.csr:
        operation = (client.subscribe_to_create_certificate_from_csr_accepted,
                     client.subscribe_to_create_certificate_from_csr_rejected,
                     iotidentity.CreateCertificateFromCsrSubscriptionRequest(),
                     client.publish_create_certificate_from_csr)
    else:
        operation = (client.subscribe_to_create_keys_and_certificate_accepted,
                     client.subscribe_to_create_keys_and_certificate_rejected,
                     iotidentity.CreateKeysAndCertificateSubscriptionRequest(),
                     client.publish_create_keys_and_certificate)
    on_accepted, on_rejected, subscription, publish = operation
    replies = Replies()
    subscribe(client, [(on_accepted, subscription, replies.accepted),
                       (on_rejected, subscription, replies.rejected)])
    publish(create_request(args), mqtt.QoS.AT_LEAST_ONCE).result(TIMEOUT)
    return replies.wait()


def register_thing(client, args, token):
    replies = Replies()
    subscription = iotidentity.RegisterThingSubscriptionRequest(template_name=args.template)
    subscribe(client, [
        (client.subscribe_to_register_thing_accepted, subscription, replies.accepted),
        (client.subscribe_to_register_thing_rejected, subscription, replies.rejected),
    ])
    client.publish_register_thing(
        register_request(args, token), mqtt.QoS.AT_LEAST_ONCE).result(TIMEOUT)
    return replies.wait()


def device_csr(serial):
    """A P-256 key that never leaves the device, and its CSR (as firmware makes them)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


class ClientV1:
    """IotIdentityClient (MQTT 3.1.1): subscribe to accepted/rejected, then publish."""

    def __init__(self, client, args):
        self.client, self.args = client, args

    def create(self):
        return create_certificate(self.client, self.args)

    def register(self, token):
        return register_thing(self.client, self.args, token)


class ClientV2:
    """IotIdentityClientV2 (the request-response client): one call per operation."""

    def __init__(self, identity, args):
        self.identity, self.args = identity, args

    def create(self):
        create = (self.identity.create_certificate_from_csr if self.args.csr
                  else self.identity.create_keys_and_certificate)
        return self.call(create(create_request(self.args)))

    def register(self, token):
        return self.call(self.identity.register_thing(register_request(self.args, token)))

    @staticmethod
    def call(future):
        """("accepted", response), or ("rejected", AWS IoT's rejection); else it failed."""
        try:
            return "accepted", future.result(TIMEOUT)
        except awsiot.V2ServiceException as e:
            if isinstance(e.modeled_error, iotidentity.V2ErrorResponse):
                return "rejected", e.modeled_error
            raise


def create_request(args):
    if args.csr:
        return iotidentity.CreateCertificateFromCsrRequest(
            certificate_signing_request=device_csr(args.serial))
    return iotidentity.CreateKeysAndCertificateRequest()


def register_request(args, token):
    return iotidentity.RegisterThingRequest(
        template_name=args.template,
        certificate_ownership_token=token,
        parameters={"SerialNumber": args.serial},
    )


def provision(api, args):
    outcome, created = api.create()
    if outcome == "rejected":
        return rejected("create-certificate", created)
    token = created.certificate_ownership_token
    outcome, registered = api.register(token)
    if outcome == "rejected":
        return rejected("register-thing", registered)
    result = {
        "certificateId": created.certificate_id,
        "thingName": registered.thing_name,
        "deviceConfiguration": registered.device_configuration,
    }
    if args.reuse_token:
        outcome, again = api.register(token)
        result["again"] = rejected("register-thing", again) if outcome == "rejected" else {
            "thingName": again.thing_name}
    return result


def connection_settings(args):
    """Where and as whom both builders connect: the claim certificate over mutual TLS."""
    return {"endpoint": args.host, "port": args.port, "cert_filepath": args.cert,
            "pri_key_filepath": args.key, "ca_filepath": args.ca, "client_id": args.client_id}


def main_mqtt5(args):
    connected, stopped = Future(), Future()

    def failed(data):
        if not connected.done():
            connected.set_exception(data.exception)

    client = mqtt5_client_builder.mtls_from_path(
        **connection_settings(args),
        on_lifecycle_connection_success=lambda _: connected.done() or connected.set_result(True),
        on_lifecycle_connection_failure=failed,
        on_lifecycle_stopped=lambda _: stopped.set_result(True),
    )
    client.start()
    try:
        connected.result(TIMEOUT)
        options = mqtt_request_response.ClientOptions(
            max_request_response_subscriptions=2,
            max_streaming_subscriptions=0,
            operation_timeout_in_seconds=TIMEOUT,
        )
        result = provision(ClientV2(iotidentity.IotIdentityClientV2(client, options), args), args)
    finally:
        client.stop()
        stopped.result(TIMEOUT)
    print(json.dumps(result))


def main():
    args = parse_args()
    if args.api == "mqtt5":
        return main_mqtt5(args)
    connection = mqtt_connection_builder.mtls_from_path(
        **connection_settings(args),
        clean_session=False,
        keep_alive_secs=30,
    )
    connection.connect().result(TIMEOUT)
    try:
        result = provision(ClientV1(iotidentity.IotIdentityClient(connection), args), args)
    finally:
        connection.disconnect().result(TIMEOUT)
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # the conversation failed: say how, for the test's message
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)

"""Fleet provisioning by claim over the CBOR topics, as constrained firmware does it (the
FreeRTOS / embedded C demos): paho-mqtt for MQTT 3.1.1 and cbor2 for the payloads, an encoder
that is not the simulator's own. CreateKeysAndCertificate, then RegisterThing.

Prints one JSON object: {"certificateId", "thingName"} when provisioned, or {"rejected": {...}}
with the decoded CBOR rejection. Exits non-zero when the conversation itself failed.
"""

import argparse
import json
import queue
import sys

import cbor2
import paho.mqtt.client as mqtt

TIMEOUT = 20


def parse_args():
    p = argparse.ArgumentParser()
    for name in ("--host", "--ca", "--cert", "--key", "--client-id", "--template", "--serial"):
        p.add_argument(name, required=True)
    p.add_argument("--port", type=int, required=True)
    return p.parse_args()


def request(client, replies, base, body):
    """Publishes `body` in CBOR to `base`/cbor; the decoded reply and whether it was accepted."""
    topic = base + "/cbor"
    for verdict in ("accepted", "rejected"):
        result, _ = client.subscribe(f"{topic}/{verdict}", qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
    client.publish(topic, cbor2.dumps(body), qos=1).wait_for_publish(TIMEOUT)
    reply_topic, payload = replies.get(timeout=TIMEOUT)
    return reply_topic.endswith("/accepted"), cbor2.loads(payload)


def main():
    args = parse_args()
    replies = queue.Queue()
    connected = queue.Queue()
    client = mqtt.Client(client_id=args.client_id, clean_session=True)
    client.tls_set(ca_certs=args.ca, certfile=args.cert, keyfile=args.key)
    client.on_connect = lambda c, u, f, rc: connected.put(rc)
    client.on_message = lambda c, u, m: replies.put((m.topic, m.payload))
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    try:
        if connected.get(timeout=TIMEOUT) != 0:
            raise RuntimeError("CONNECT refused")
        ok, created = request(client, replies, "$aws/certificates/create", {})
        if not ok:
            print(json.dumps({"rejected": created}))
            return
        ok, registered = request(
            client, replies, f"$aws/provisioning-templates/{args.template}/provision",
            {"certificateOwnershipToken": created["certificateOwnershipToken"],
             "parameters": {"SerialNumber": args.serial}})
        if not ok:
            print(json.dumps({"rejected": registered}))
            return
        print(json.dumps({"certificateId": created["certificateId"],
                          "thingName": registered["thingName"]}))
    finally:
        client.disconnect()
        client.loop_stop()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)

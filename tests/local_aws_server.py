"""The local AWS endpoint for tests and the demo: moto's server, one request at a time.

moto_server runs werkzeug with a thread per request, and moto's DynamoDB backend does not lock
an item between evaluating a condition expression and writing it, so two concurrent conditional
writes can both succeed there, which real DynamoDB never allows. Serving requests one at a time
restores the per-item atomicity that the functions rely on (and that the tests check); a
read-then-write done in two requests can still interleave, so those races still show.

Usage: python local_aws_server.py [--host 127.0.0.1] [--port 0]; prints werkzeug's
"Running on http://HOST:PORT" line on stderr when ready.
"""

import argparse
import os

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(args.host, args.port, app, threaded=False, use_reloader=False)


if __name__ == "__main__":
    main()

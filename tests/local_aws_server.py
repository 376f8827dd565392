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

from moto.cognitoidp.exceptions import InvalidParameterException, NotAuthorizedError
from moto.cognitoidp.responses import CognitoIdpResponse
from moto.core.responses import EmptyResult
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple


def revoke_token(self):
    """Cognito's RevokeToken, which moto lacks (the installers' page calls it on sign-out): the
    refresh token is revoked, and nothing can refresh with it again. As Cognito does, a token it
    does not know is answered with success, and a token of another app client is refused."""
    token = self._get_param("Token")
    client_id = self._get_param("ClientId")
    if not token or not client_id:
        raise InvalidParameterException("Token and ClientId are required")
    for pool in self.backend.user_pools.values():
        if token in pool.refresh_tokens:
            held = pool.refresh_tokens[token]
            if held is not None and held[0] != client_id:
                raise NotAuthorizedError("the token was not issued to this client")
            pool.refresh_tokens[token] = None
            break
    return EmptyResult()


CognitoIdpResponse.revoke_token = revoke_token


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

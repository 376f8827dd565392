"""The page's SRP (web/srp.js, under Node) against pycognito's, an established Cognito SRP client.

moto's Cognito does not check SRP proofs, so the browser test cannot tell a wrong proof from
a right one; this does: for random secrets, server values, salts, users and passwords, both
implementations must derive the same key and the same PASSWORD_CLAIM_SIGNATURE. Salts are
drawn without a leading zero byte, where pycognito (which hashes the salt's text) and AWS's own
JavaScript libraries (which hash it as a number, as srp.js does) agree.

Prints {"cases": N} when every case matches; exits 1 with the first mismatch otherwise.
"""

import base64
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import sys

from pycognito.aws_srp import AWSSRP, N_HEX

CASES = 25
WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "web")
NODE = """
import { passwordClaim, passwordKey, bytesToHex } from '%s/srp.js';
let input = '';
for await (const chunk of process.stdin) input += chunk;
const out = [];
for (const c of JSON.parse(input)) {
  const ephemeral = { a: BigInt('0x' + c.a), A: BigInt('0x' + c.A) };
  const args = { poolId: c.poolId, userId: c.userId, password: c.password, ephemeral,
                 srpB: c.B, salt: c.salt, secretBlock: c.secretBlock, timestamp: c.timestamp };
  out.push({ key: bytesToHex(await passwordKey(args)), signature: await passwordClaim(args) });
}
console.log(JSON.stringify(out));
"""


class Offline:
    """pycognito wants a boto3 client; nothing here calls it."""


def case():
    big_n = int(N_HEX, 16)
    pool_id = "ap-northeast-1_" + secrets.token_hex(5)
    user_id = secrets.token_hex(16)
    password = "Aa1!" + secrets.token_urlsafe(12)
    srp = AWSSRP(user_id, password, pool_id, "client", client=Offline())
    salt = secrets.token_hex(16)
    while salt.startswith("00"):
        salt = secrets.token_hex(16)
    b = int.from_bytes(os.urandom(384), "big") % big_n
    secret_block = base64.standard_b64encode(os.urandom(48)).decode()
    timestamp = AWSSRP.get_cognito_formatted_timestamp(__import__("datetime").datetime.utcnow())
    key = srp.get_password_authentication_key(user_id, password, b, salt)
    message = (
        pool_id.split("_")[1].encode() + user_id.encode() + base64.standard_b64decode(secret_block)
        + timestamp.encode()
    )
    signature = base64.standard_b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()
    return {
        "poolId": pool_id, "userId": user_id, "password": password,
        "a": f"{srp.small_a_value:x}", "A": f"{srp.large_a_value:x}", "B": f"{b:x}", "salt": salt,
        "secretBlock": secret_block, "timestamp": timestamp,
        "expected": {"key": key.hex(), "signature": signature},
    }


def main():
    cases = [case() for _ in range(CASES)]
    result = subprocess.run(
        ["node", "--input-type=module", "-e", NODE % os.path.abspath(WEB)],
        input=json.dumps(cases), capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0:
        print(json.dumps({"error": result.stderr}))
        sys.exit(1)
    for c, got in zip(cases, json.loads(result.stdout)):
        if got != c["expected"]:
            print(json.dumps({"mismatch": {k: c[k] for k in ("poolId", "salt", "timestamp")},
                              "page": got, "pycognito": c["expected"]}))
            sys.exit(1)
    print(json.dumps({"cases": len(cases)}))


if __name__ == "__main__":
    main()

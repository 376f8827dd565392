// Cognito's SRP-6a (USER_SRP_AUTH), computed as AWS's own client libraries compute it: the
// password never leaves the page, only a proof that this page knows it. Pure functions over
// BigInt and WebCrypto, so that the same file runs in the browser and under Node
// (tests/interop/installer_srp_check.mjs compares it with pycognito's implementation).

// RFC 5054's 3072-bit group, generator 2: Cognito's.
const N_HEX =
  'FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74' +
  '020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437' +
  '4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED' +
  'EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05' +
  '98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB' +
  '9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B' +
  'E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718' +
  '3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33' +
  'A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7' +
  'ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864' +
  'D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2' +
  '08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF';
const N = BigInt('0x' + N_HEX);
const G = 2n;
const INFO = new TextEncoder().encode('Caldera Derived Key\u0001');
const WEEKDAYS = ['Sun', 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat'];
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

const subtle = globalThis.crypto.subtle;

export function hexToBytes(hex) {
  const bytes = new Uint8Array(hex.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(hex.substr(i * 2, 2), 16);
  return bytes;
}

export function bytesToHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Hex of a positive number as Cognito hashes it: even length, and a leading 00 when the first
 * digit would read as a sign bit. */
export function padHex(value) {
  let hex = value.toString(16);
  if (hex.length % 2 === 1) hex = '0' + hex;
  else if ('89abcdefABCDEF'.includes(hex[0])) hex = '00' + hex;
  return hex;
}

async function sha256(bytes) {
  return new Uint8Array(await subtle.digest('SHA-256', bytes));
}

async function hexHash(hex) {
  return bytesToHex(await sha256(hexToBytes(hex)));
}

async function hmac(keyBytes, message) {
  const key = await subtle.importKey('raw', keyBytes, { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
  return new Uint8Array(await subtle.sign('HMAC', key, message));
}

function mod(a, m) {
  const r = a % m;
  return r < 0n ? r + m : r;
}

function modPow(base, exponent, modulus) {
  let result = 1n;
  let b = mod(base, modulus);
  let e = exponent;
  while (e > 0n) {
    if (e & 1n) result = (result * b) % modulus;
    b = (b * b) % modulus;
    e >>= 1n;
  }
  return result;
}

/** A random secret `a` (128 bytes) and the public A = g^a mod N, hex, for InitiateAuth. */
export function newEphemeral(randomBytes = (n) => globalThis.crypto.getRandomValues(new Uint8Array(n))) {
  for (;;) {
    const a = mod(BigInt('0x' + bytesToHex(randomBytes(128))), N);
    const A = modPow(G, a, N);
    if (a !== 0n && A !== 0n) return { a, A, srpA: A.toString(16) };
  }
}

/** Base64 decoded as AWS's libraries decode it: characters outside the alphabet are skipped. */
export function lenientBase64(text) {
  const clean = text.replace(/[^A-Za-z0-9+/]/g, '');
  const padded = clean + '==='.slice((clean.length + 3) % 4);
  const binary = atob(padded.length % 4 === 1 ? padded.slice(0, -1) : padded);
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

/** Cognito's timestamp: "Tue Nov 4 09:05:01 UTC 2026" (day not padded). */
export function cognitoTimestamp(date = new Date()) {
  const two = (n) => String(n).padStart(2, '0');
  return `${WEEKDAYS[date.getUTCDay()]} ${MONTHS[date.getUTCMonth()]} ${date.getUTCDate()} ` +
    `${two(date.getUTCHours())}:${two(date.getUTCMinutes())}:${two(date.getUTCSeconds())} UTC ${date.getUTCFullYear()}`;
}

/** The 16-byte key both sides derive (HKDF of the shared secret S). */
export async function passwordKey({ poolId, userId, password, ephemeral, srpB, salt }) {
  const B = BigInt('0x' + srpB);
  if (mod(B, N) === 0n) throw new Error('the server sent an invalid SRP_B');
  const u = BigInt('0x' + (await hexHash(padHex(ephemeral.A) + padHex(B))));
  if (u === 0n) throw new Error('the SRP parameters give u = 0');
  const k = BigInt('0x' + (await hexHash('00' + N_HEX + '0' + G.toString(16))));
  const poolName = poolId.split('_')[1];
  const identity = bytesToHex(await sha256(new TextEncoder().encode(`${poolName}${userId}:${password}`)));
  // The salt is hashed as a number, as AWS's Amplify and amazon-cognito-identity-js hash it
  // (leading zero bytes dropped, then padded as any number).
  const x = BigInt('0x' + (await hexHash(padHex(BigInt('0x' + salt)) + identity)));
  const S = modPow(B - k * modPow(G, x, N), ephemeral.a + u * x, N);
  const prk = await hmac(hexToBytes(padHex(u)), hexToBytes(padHex(S)));
  return (await hmac(prk, INFO)).slice(0, 16);
}

/** PASSWORD_VERIFIER's answer: the proof over the pool, user, secret block and timestamp. */
export async function passwordClaim({ poolId, userId, password, ephemeral, srpB, salt, secretBlock, timestamp }) {
  const key = await passwordKey({ poolId, userId, password, ephemeral, srpB, salt });
  const enc = new TextEncoder();
  const block = lenientBase64(secretBlock);
  const parts = [enc.encode(poolId.split('_')[1]), enc.encode(userId), block, enc.encode(timestamp)];
  const message = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    message.set(p, at);
    at += p.length;
  }
  const signature = await hmac(key, message);
  return btoa(String.fromCharCode(...signature));
}

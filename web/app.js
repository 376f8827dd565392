// The installer's page: sign in (SRP, first-sign-in password, authenticator app), ask
// claim-issuer for a claim bound to a device serial, and hand over the certificate and key as
// the two files `fleet-device` reads. Tokens and the claim's key live in memory only: no
// localStorage, sessionStorage, cookies or IndexedDB; a reload forgets them.

import { CognitoError, UserPool } from './cognito.js';
import { ScanError, Scanner, cameraAvailable, scanWords } from './scanner.js';

const $ = (id) => document.getElementById(id);
const STEPS = ['sign-in', 'new-password', 'mfa-setup', 'mfa', 'claim', 'result'];
// claim-issuer's default SERIAL_PATTERN (shared::registry::DEFAULT_SERIAL_PATTERN), for a
// config.json without the stack's `serialPattern`.
const DEFAULT_SERIAL_PATTERN = '[A-Za-z0-9][A-Za-z0-9_:-]{0,63}';

let config;
let pool;
let pending; // a sign-in step waiting for the installer's answer
let tokens; // Cognito's AuthenticationResult
let claimTimer;
let objectUrls = [];
let scanner; // the camera session, while one runs

function show(step) {
  if (step !== 'claim') stopScanning();
  for (const id of STEPS) $(id).hidden = id !== step;
  const first = $(step).querySelector('input');
  if (first) first.focus();
}

function tell(text, kind = 'error') {
  const box = $('message');
  box.textContent = text;
  box.className = kind === 'info' ? 'message info' : 'message';
  box.hidden = !text;
}

function waitWords(seconds) {
  if (!Number.isFinite(seconds) || seconds <= 0) return 'a moment';
  if (seconds < 90) return `${Math.ceil(seconds)} seconds`;
  return `${Math.ceil(seconds / 60)} minutes`;
}

/** What a Cognito refusal means to an installer. */
function signInWords(e) {
  const words = {
    NotAuthorizedException: 'Wrong e-mail or password, or the sign-in took too long. Try again.',
    UserNotFoundException: 'Wrong e-mail or password, or the sign-in took too long. Try again.',
    PasswordResetRequiredException: 'Your password must be reset: ask your administrator.',
    UserNotConfirmedException: 'Your account is not confirmed yet: ask your administrator.',
    CodeMismatchException: 'That code is not right: enter the code your authenticator app shows now.',
    EnableSoftwareTokenMFAException: 'That code is not right: enter the code your authenticator app shows now.',
    ExpiredCodeException: 'That code has expired: enter the code your authenticator app shows now.',
    InvalidPasswordException: 'That password is not allowed: use at least 12 characters with upper and lower case letters, digits and a symbol.',
    TooManyRequestsException: 'Too many attempts: wait a few minutes, then try again.',
    LimitExceededException: 'Too many attempts: wait a few minutes, then try again.',
    TooManyFailedAttemptsException: 'Too many attempts: wait a few minutes, then try again.',
    NetworkError: 'The sign-in service cannot be reached: check the connection and try again.',
  };
  return words[e.type] || 'Sign-in failed: try again, or ask your administrator.';
}

/** What a claim-issuer refusal means to an installer. */
function claimWords(status, code, retryAfter) {
  switch (code) {
    case 'bad-request':
      return 'That is not a device serial number: check it against the label.';
    case 'serial-required':
      return 'Enter the device serial number.';
    case 'template-not-allowed':
      return 'This kind of device may not be provisioned here.';
    case 'unauthenticated':
      return 'Your sign-in is no longer valid: sign in again.';
    case 'not-an-installer':
      return 'Your account is not an installer account: ask your administrator to add you to the installers group.';
    case 'rate-limited':
      return `You have asked for the most claims allowed for now: try again in ${waitWords(retryAfter)}.`;
    case 'upstream':
      return 'AWS IoT could not issue the claim: try again in a few minutes, and tell your administrator if it keeps happening.';
    case 'throttled':
    case 'unavailable':
      return `The service is busy or unavailable: try again in ${waitWords(retryAfter)}.`;
    default:
      if (status === 401) return 'Your sign-in is no longer valid: sign in again.';
      if (status === 403) return 'This request was refused.';
      return `The claim service failed (status ${status}): try again later.`;
  }
}

async function signedIn(result) {
  if (result.tokens) {
    tokens = result.tokens;
    pending = undefined;
    $('who').textContent = `Signed in as ${$('username').value}`;
    $('who').hidden = false;
    tell('');
    show('claim');
    return;
  }
  pending = result;
  switch (result.challenge) {
    case 'NEW_PASSWORD_REQUIRED':
      tell('');
      show('new-password');
      break;
    case 'MFA_SETUP': {
      const { secret, step } = await pool.mfaSecret(result);
      pending = step;
      $('mfa-secret').textContent = secret;
      const label = encodeURIComponent(`Device claim:${$('username').value}`);
      $('mfa-uri').textContent = `otpauth://totp/${label}?secret=${secret}&issuer=${encodeURIComponent('Device claim')}`;
      tell('');
      show('mfa-setup');
      break;
    }
    case 'SOFTWARE_TOKEN_MFA':
      tell('');
      show('mfa');
      break;
    default:
      tell('This sign-in needs a step this page does not support: ask your administrator.');
      show('sign-in');
  }
}

/** Runs a sign-in step with its button disabled; refusals become sentences. */
function guarded(form, action) {
  $(form).addEventListener('submit', async (event) => {
    event.preventDefault();
    const button = $(form).querySelector('button[type=submit]');
    button.disabled = true;
    try {
      await action();
    } catch (e) {
      if (e instanceof CognitoError) {
        tell(signInWords(e));
        // A sign-in session Cognito no longer knows cannot go on: start over.
        if (e.type === 'NotAuthorizedException' && pending) {
          pending = undefined;
          show('sign-in');
        }
      } else {
        tell('Something went wrong on this page: reload it and try again.');
      }
    } finally {
      button.disabled = false;
    }
  });
}

function forgetClaim() {
  clearInterval(claimTimer);
  for (const url of objectUrls) URL.revokeObjectURL(url);
  objectUrls = [];
  for (const id of ['download-cert', 'download-key']) $(id).removeAttribute('href');
  $('command').textContent = '';
}

function download(id, text) {
  const url = URL.createObjectURL(new Blob([text], { type: 'application/x-pem-file' }));
  objectUrls.push(url);
  $(id).href = url;
}

function shellQuote(value) {
  return /^[A-Za-z0-9._:/=-]+$/.test(value) ? value : `'${value.replace(/'/g, `'\\''`)}'`;
}

function showClaim(claim) {
  forgetClaim();
  $('result-serial').textContent = claim.serial;
  download('download-cert', claim.certificatePem);
  download('download-key', claim.privateKey);
  const expires = new Date(claim.expiration * 1000);
  $('expires').textContent = expires.toLocaleTimeString();
  $('command').textContent = [
    'fleet-device',
    `--endpoint ${shellQuote(claim.iotEndpoint || config.iotEndpoint || '<your AWS IoT endpoint>')}`,
    '--claim-cert claim.pem.crt --claim-key claim.pem.key',
    `--template ${shellQuote(claim.templateName)}`,
    `--param SerialNumber=${shellQuote(claim.serial)}`,
    '--csr --out /etc/device --verify',
  ].join(' \\\n  ');
  const tick = () => {
    const left = Math.round((expires.getTime() - Date.now()) / 1000);
    if (left <= 0) {
      forgetClaim();
      $('countdown').textContent = 'no longer';
      tell('This claim has expired: get a new one for the device.', 'info');
      return;
    }
    $('countdown').textContent = `${Math.floor(left / 60)}:${String(left % 60).padStart(2, '0')}`;
  };
  tick();
  claimTimer = setInterval(tick, 1000);
  tell('');
  show('result');
}

function stopScanning() {
  if (scanner) scanner.stop();
}

/**
 * Which of a label's codes is the serial: the deployment's pattern, matched whole. A pattern
 * this browser cannot read (Rust's regex syntax and JavaScript's differ at the edges) lets any
 * code through: claim-issuer checks the serial anyway.
 */
function serialTest() {
  try {
    const pattern = new RegExp(`^(?:${config.serialPattern || DEFAULT_SERIAL_PATTERN})$`);
    return (text) => pattern.test(text);
  } catch (e) {
    return (text) => text.length > 0;
  }
}

/** The camera reads the serial off the label into the field; the installer then asks. */
async function scanLabel() {
  stopScanning();
  const session = new Scanner($('scan-video'), {
    isSerial: serialTest(),
    onOther: (text) => {
      $('scan-status').textContent = `That code (${text.slice(0, 40)}) is not a device serial: point the camera at the serial's barcode.`;
    },
  });
  scanner = session;
  $('scan-status').textContent = "Point the camera at the serial's barcode on the device label.";
  $('scanner').hidden = false;
  $('scan').hidden = true;
  tell('');
  try {
    const serial = await session.scan();
    if (serial) {
      $('serial').value = serial;
      tell(`Read ${serial} from the label: check it against the device, then get the claim.`, 'info');
      $('claim-button').focus();
    }
  } catch (e) {
    tell(scanWords(e instanceof ScanError ? e.kind : undefined));
  } finally {
    if (scanner === session) scanner = undefined;
    if (!scanner) {
      $('scanner').hidden = true;
      $('scan').hidden = false;
    }
  }
}

async function requestClaim() {
  stopScanning();
  const serial = $('serial').value.trim();
  const button = $('claim-button');
  button.disabled = true;
  tell('');
  try {
    let response;
    try {
      // No apiUrl: the page's own origin serves /claims (the deployed CloudFront distribution).
      response = await fetch(`${(config.apiUrl || '').replace(/\/$/, '')}/claims`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${tokens.AccessToken}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ serial }),
        credentials: 'omit',
        cache: 'no-store',
      });
    } catch (e) {
      tell('The claim service cannot be reached: check the connection and try again.');
      return;
    }
    const body = await response.json().catch(() => ({}));
    if (response.ok && body.certificatePem && body.privateKey) {
      showClaim(body);
      return;
    }
    const retryAfter = Number(response.headers.get('Retry-After'));
    tell(claimWords(response.status, body.error, retryAfter));
    if (response.status === 401) {
      tokens = undefined;
      show('sign-in');
    }
  } finally {
    button.disabled = false;
  }
}

async function start() {
  try {
    const response = await fetch('config.json', { cache: 'no-store' });
    config = await response.json();
  } catch (e) {
    tell('This page is not configured (config.json is missing): ask your administrator.');
    return;
  }
  pool = new UserPool(config);
  guarded('sign-in', async () => {
    const result = await pool.signIn($('username').value.trim(), $('password').value);
    $('password').value = '';
    await signedIn(result);
  });
  guarded('new-password', async () => {
    const result = await pool.newPassword(pending, $('new-password-value').value);
    $('new-password-value').value = '';
    await signedIn(result);
  });
  guarded('mfa-setup', async () => {
    await signedIn(await pool.mfaVerify(pending, $('mfa-setup-code').value.trim()));
  });
  guarded('mfa', async () => {
    await signedIn(await pool.mfaCode(pending, $('mfa-code').value.trim()));
  });
  $('scan').hidden = !cameraAvailable();
  $('scan').addEventListener('click', scanLabel);
  $('scan-stop').addEventListener('click', stopScanning);
  // A camera left on in a background tab drains the battery and shows the recording light.
  document.addEventListener('visibilitychange', () => {
    if (document.hidden) stopScanning();
  });
  $('claim').addEventListener('submit', (event) => {
    event.preventDefault();
    requestClaim();
  });
  // The clipboard API exists only in secure contexts; elsewhere the command is selected by hand.
  $('copy-command').hidden = !(navigator.clipboard && navigator.clipboard.writeText);
  $('copy-command').addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText($('command').textContent);
      tell('The command is copied: paste it in the device\'s terminal.', 'info');
    } catch (e) {
      tell('This browser did not allow copying: select the command and copy it.');
    }
  });
  $('another').addEventListener('click', () => {
    forgetClaim();
    $('serial').value = '';
    tell('');
    show('claim');
  });
  $('sign-out').addEventListener('click', async () => {
    const refresh = tokens && tokens.RefreshToken;
    tokens = undefined;
    forgetClaim();
    $('who').hidden = true;
    show('sign-in');
    // Signed out here whatever Cognito answers; the refresh token is revoked if it can be.
    try {
      if (refresh) await pool.revoke(refresh);
      tell('Signed out.', 'info');
    } catch (e) {
      tell('Signed out on this device; the sign-in service could not be told (the session ends within the hour).', 'info');
    }
  });
  show('sign-in');
}

start();

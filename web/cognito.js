// The installers' user pool, through Cognito's JSON API (what the AWS SDKs send): sign-in by
// SRP, the first sign-in's new password, setting up and answering the authenticator app's code.
// Tokens stay in this module's memory; nothing is written to any storage.

import { cognitoTimestamp, newEphemeral, passwordClaim } from './srp.js';

/** A refusal from Cognito: its error type (`NotAuthorizedException`, ...) and message. */
export class CognitoError extends Error {
  constructor(type, message) {
    super(message || type);
    this.type = type;
  }
}

export class UserPool {
  /** `config`: {region, userPoolId, clientId, cognitoEndpoint?}. */
  constructor(config) {
    this.poolId = config.userPoolId;
    this.clientId = config.clientId;
    this.endpoint = config.cognitoEndpoint || `https://cognito-idp.${config.region}.amazonaws.com/`;
  }

  async call(operation, body) {
    let response;
    try {
      response = await fetch(this.endpoint, {
        method: 'POST',
        headers: {
          'Content-Type': 'application/x-amz-json-1.1',
          'X-Amz-Target': `AWSCognitoIdentityProviderService.${operation}`,
        },
        body: JSON.stringify(body),
        credentials: 'omit',
        cache: 'no-store',
      });
    } catch (e) {
      throw new CognitoError('NetworkError', 'The sign-in service cannot be reached.');
    }
    const text = await response.text();
    let json = {};
    try {
      json = text ? JSON.parse(text) : {};
    } catch (e) {
      throw new CognitoError('BadResponse', 'The sign-in service answered something unreadable.');
    }
    if (!response.ok) {
      const type = (json.__type || response.headers.get('x-amzn-errortype') || 'Error').split('#').pop().split(':')[0];
      throw new CognitoError(type, json.message || json.Message);
    }
    return json;
  }

  /**
   * Revokes a refresh token (and the tokens issued with it), as signing out should: a copy
   * of it taken off this device can mint no new tokens. Access tokens already issued stay
   * good until they expire (15 minutes): the claims API checks signatures, not revocation.
   */
  async revoke(refreshToken) {
    await this.call('RevokeToken', { Token: refreshToken, ClientId: this.clientId });
  }

  /** Starts a sign-in: the next step (`{challenge, session, parameters}`) or `{tokens}`. */
  async signIn(username, password) {
    const ephemeral = newEphemeral();
    const started = await this.call('InitiateAuth', {
      AuthFlow: 'USER_SRP_AUTH',
      ClientId: this.clientId,
      AuthParameters: { USERNAME: username, SRP_A: ephemeral.srpA },
    });
    if (started.ChallengeName !== 'PASSWORD_VERIFIER') return this.next(started, username);
    const p = started.ChallengeParameters;
    const timestamp = cognitoTimestamp();
    const signature = await passwordClaim({
      poolId: this.poolId,
      userId: p.USER_ID_FOR_SRP,
      password,
      ephemeral,
      srpB: p.SRP_B,
      salt: p.SALT,
      secretBlock: p.SECRET_BLOCK,
      timestamp,
    });
    const user = p.USERNAME || username;
    const answered = await this.call('RespondToAuthChallenge', {
      ChallengeName: 'PASSWORD_VERIFIER',
      ClientId: this.clientId,
      Session: started.Session,
      ChallengeResponses: {
        USERNAME: user,
        PASSWORD_CLAIM_SECRET_BLOCK: p.SECRET_BLOCK,
        PASSWORD_CLAIM_SIGNATURE: signature,
        TIMESTAMP: timestamp,
      },
    });
    return this.next(answered, user);
  }

  next(answer, username) {
    if (answer.AuthenticationResult) {
      return { tokens: answer.AuthenticationResult };
    }
    return {
      challenge: answer.ChallengeName,
      session: answer.Session,
      username: (answer.ChallengeParameters && answer.ChallengeParameters.USERNAME) || username,
    };
  }

  async respond(step, responses) {
    const answer = await this.call('RespondToAuthChallenge', {
      ChallengeName: step.challenge,
      ClientId: this.clientId,
      Session: step.session,
      ChallengeResponses: { USERNAME: step.username, ...responses },
    });
    return this.next(answer, step.username);
  }

  /** First sign-in: the password the installer chose instead of the temporary one. */
  newPassword(step, password) {
    return this.respond(step, { NEW_PASSWORD: password });
  }

  /** The authenticator app's code at sign-in. */
  mfaCode(step, code) {
    return this.respond(step, { SOFTWARE_TOKEN_MFA_CODE: code });
  }

  /** MFA_SETUP: the secret for the installer's authenticator app (and the step to go on with). */
  async mfaSecret(step) {
    const answer = await this.call('AssociateSoftwareToken', { Session: step.session });
    return { secret: answer.SecretCode, step: { ...step, session: answer.Session || step.session } };
  }

  /** MFA_SETUP: the app's first code proves it holds the secret; then sign-in completes. */
  async mfaVerify(step, code) {
    const verified = await this.call('VerifySoftwareToken', {
      Session: step.session,
      UserCode: code,
      FriendlyDeviceName: 'installer',
    });
    if (verified.Status && verified.Status !== 'SUCCESS') {
      throw new CognitoError('CodeMismatchException', 'The code does not match.');
    }
    return this.respond({ ...step, session: verified.Session || step.session }, {});
  }
}

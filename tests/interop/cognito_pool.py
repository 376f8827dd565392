"""The installers' user pool on the local AWS endpoint (moto's Cognito), as infra/template.yaml
defines it: e-mail user names, MFA required with an authenticator app (TOTP), SRP sign-in, an
app client without a secret, the `installers` group.

  python cognito_pool.py setup --endpoint URL
      creates the pool, its app client and group, and the users named in the environment:
      INSTALLER_USER / INSTALLER_PASSWORD (in the group) and VISITOR_USER / VISITOR_PASSWORD
      (not), each with that temporary password, as an administrator creates them; prints
      {"userPoolId", "clientId"}.
  python cognito_pool.py tokens --endpoint URL --pool ID --client ID
      tokens for the authorizer's tests: a signed-in installer's access and ID tokens, an
      access token of another app client of the pool, and one of another pool; prints them.

The region is us-east-1 (what the local stack uses).
"""

import argparse
import json
import os
import secrets

import boto3

REGION = "us-east-1"


def client(endpoint):
    return boto3.client(
        "cognito-idp",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def new_pool(idp, name):
    pool = idp.create_user_pool(
        PoolName=name,
        UsernameAttributes=["email"],
        AutoVerifiedAttributes=["email"],
        AdminCreateUserConfig={"AllowAdminCreateUserOnly": True},
        Policies={
            "PasswordPolicy": {
                "MinimumLength": 12,
                "RequireUppercase": True,
                "RequireLowercase": True,
                "RequireNumbers": True,
                "RequireSymbols": True,
            }
        },
    )["UserPool"]
    idp.set_user_pool_mfa_config(
        UserPoolId=pool["Id"],
        SoftwareTokenMfaConfiguration={"Enabled": True},
        MfaConfiguration="ON",
    )
    app = idp.create_user_pool_client(
        UserPoolId=pool["Id"],
        ClientName="installer-page",
        GenerateSecret=False,
        ExplicitAuthFlows=["ALLOW_USER_SRP_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
    )["UserPoolClient"]
    idp.create_group(GroupName="installers", UserPoolId=pool["Id"])
    return pool["Id"], app["ClientId"]


def add_user(idp, pool_id, user, password, installer):
    idp.admin_create_user(
        UserPoolId=pool_id,
        Username=user,
        TemporaryPassword=password,
        MessageAction="SUPPRESS",
    )
    if installer:
        idp.admin_add_user_to_group(UserPoolId=pool_id, Username=user, GroupName="installers")


def signed_in(idp, pool_id, client_id, user):
    """Tokens of a confirmed installer (an administrator's sign-in: moto issues them directly)."""
    password = "Aa1!" + secrets.token_urlsafe(16)
    try:
        add_user(idp, pool_id, user, password, installer=True)
    except idp.exceptions.UsernameExistsException:
        pass
    idp.admin_set_user_password(UserPoolId=pool_id, Username=user, Password=password, Permanent=True)
    result = idp.admin_initiate_auth(
        UserPoolId=pool_id,
        ClientId=client_id,
        AuthFlow="ADMIN_USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": user, "PASSWORD": password},
    )
    return result["AuthenticationResult"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["setup", "tokens"])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--pool")
    parser.add_argument("--client")
    args = parser.parse_args()
    idp = client(args.endpoint)
    if args.command == "setup":
        pool_id, client_id = new_pool(idp, "installers")
        add_user(idp, pool_id, os.environ["INSTALLER_USER"], os.environ["INSTALLER_PASSWORD"], True)
        add_user(idp, pool_id, os.environ["VISITOR_USER"], os.environ["VISITOR_PASSWORD"], False)
        print(json.dumps({"userPoolId": pool_id, "clientId": client_id}))
        return
    own = signed_in(idp, args.pool, args.client, "api-test@example.com")
    other_client = idp.create_user_pool_client(
        UserPoolId=args.pool, ClientName="another-app", GenerateSecret=False
    )["UserPoolClient"]["ClientId"]
    other_app = signed_in(idp, args.pool, other_client, "api-test@example.com")
    other_pool, other_pool_client = new_pool(idp, "someone-else")
    stranger = signed_in(idp, other_pool, other_pool_client, "api-test@example.com")
    print(
        json.dumps(
            {
                "access": own["AccessToken"],
                "id": own["IdToken"],
                "otherClientAccess": other_app["AccessToken"],
                "otherPoolAccess": stranger["AccessToken"],
            }
        )
    )


if __name__ == "__main__":
    main()

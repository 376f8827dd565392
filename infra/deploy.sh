#!/usr/bin/env bash
# Deploys the bundle into the AWS account of the current credentials: one AWS SAM stack
# (infra/template.yaml) that holds everything, the functions included. SAM builds each function
# with cargo-lambda (BuildMethod: rust-cargolambda) and uploads it once, with the environment,
# role and permissions the template gives it: what runs is what the template says (see
# infra/README.md for why there is no second `cargo lambda deploy`).
#
# usage: infra/deploy.sh [--plan]
#   --plan  print every command that would run, with the values it would use, and stop; needs
#           neither credentials nor network.
#
# Settings (environment):
#   STACK_NAME              default soracom-provisioning
#   AWS_REGION              required to deploy
#   DPS_ID_SCOPE            required: Azure DPS ID scope
#   SORACOM_AWS_ACCOUNT_ID  required: SORACOM's AWS account (SORACOM console, credential store)
#   SORACOM_EXTERNAL_ID     required: external id of the SORACOM credential (never printed)
#   SORACOM_EVENT_HANDLER_EXTERNAL_ID
#                           optional: the external id of the Event Handler's credential set
#                           (sim-lifecycle), not the Funk one; unset: no Event Handler role
#   SIM_CARDS_LISTED        optional: true if the device table lists SIM cards (then every
#                           request must name its card; see SimCardsListed)
#   GROUP_KEY_PARAMETER     default /soracom-dps/group-key (store the key there first)
#   PROVISIONING_TEMPLATE   default fleet-template
#   SERIAL_PATTERN          optional: the regular expression device serials match in full
#                           (default: what AWS IoT accepts in a thing name); claim-issuer and
#                           the hook refuse others, the installers' page scans the code matching it
#   ALLOWED_OPERATOR_IDS    required: your SORACOM operator id(s), comma-separated (OP...); a
#                           deployed stack never admits SIMs of any operator
#   DEVICE_CA_KMS_KEY_ARN   optional: deploy for X.509 devices (Attestation=x509) with this
#                           KMS key as the device CA's key; the CA certificate goes in the SSM
#                           parameter DEVICE_CA_PARAMETER (default /soracom-dps/device-ca)
#   BEAM_PSK_PARAMETER      optional: deploy SORACOM Beam's front door (POST /register), with
#                           Beam's pre-shared key in this SSM SecureString; unset: no Beam route
#   BEAM_OPERATOR_ID        optional: the operator whose Beam signs (needed when
#                           ALLOWED_OPERATOR_IDS lists several)
#   SAM, AWS                the commands to use (default: from .venv-deploy); SAM's build
#                           runs `cargo lambda build`, from .venv/bin (make deploy installs it)
set -euo pipefail
cd "$(dirname "$0")/.."

plan=false
case "${1:-}" in
  --plan) plan=true ;;
  "") ;;
  *) echo "usage: infra/deploy.sh [--plan]" >&2; exit 2 ;;
esac

STACK_NAME=${STACK_NAME:-soracom-provisioning}
GROUP_KEY_PARAMETER=${GROUP_KEY_PARAMETER:-/soracom-dps/group-key}
PROVISIONING_TEMPLATE=${PROVISIONING_TEMPLATE:-fleet-template}
SAM=${SAM:-.venv-deploy/bin/sam}
AWS=${AWS:-.venv-deploy/bin/aws}

missing=()
for name in AWS_REGION DPS_ID_SCOPE SORACOM_AWS_ACCOUNT_ID SORACOM_EXTERNAL_ID ALLOWED_OPERATOR_IDS; do
  [ -n "${!name:-}" ] || missing+=("$name")
done
if [ ${#missing[@]} -gt 0 ]; then
  if $plan; then
    for name in "${missing[@]}"; do printf -v "$name" '<%s>' "$name"; done
  else
    echo "deploy: set ${missing[*]} (see the top of infra/deploy.sh)" >&2
    exit 2
  fi
fi

# The external id is a shared secret with SORACOM: shown masked in the plan and in logs.
overrides=(
  "DpsIdScope=$DPS_ID_SCOPE"
  "GroupKeyParameterName=$GROUP_KEY_PARAMETER"
  "SoracomAwsAccountId=$SORACOM_AWS_ACCOUNT_ID"
  "SoracomExternalId=$SORACOM_EXTERNAL_ID"
  "ProvisioningTemplateName=$PROVISIONING_TEMPLATE"
  "AllowedOperatorIds=$ALLOWED_OPERATOR_IDS"
)
if [ -n "${SORACOM_EVENT_HANDLER_EXTERNAL_ID:-}" ]; then
  overrides+=("SoracomEventHandlerExternalId=$SORACOM_EVENT_HANDLER_EXTERNAL_ID")
fi
if [ -n "${SIM_CARDS_LISTED:-}" ]; then
  overrides+=("SimCardsListed=$SIM_CARDS_LISTED")
fi
if [ -n "${SERIAL_PATTERN:-}" ]; then
  overrides+=("SerialPattern=$SERIAL_PATTERN")
fi
if [ -n "${BEAM_PSK_PARAMETER:-}" ]; then
  overrides+=("BeamPskParameterName=$BEAM_PSK_PARAMETER")
  if [ -n "${BEAM_OPERATOR_ID:-}" ]; then
    overrides+=("BeamOperatorId=$BEAM_OPERATOR_ID")
  fi
fi
if [ -n "${DEVICE_CA_KMS_KEY_ARN:-}" ]; then
  overrides+=(
    "Attestation=x509"
    "DeviceCaKmsKeyArn=$DEVICE_CA_KMS_KEY_ARN"
    "DeviceCaCertificateParameterName=${DEVICE_CA_PARAMETER:-/soracom-dps/device-ca}"
  )
fi

show() {
  local out=() arg
  for arg in "$@"; do
    case "$arg" in
      SoracomExternalId=*) out+=("SoracomExternalId=****") ;;
      SoracomEventHandlerExternalId=*) out+=("SoracomEventHandlerExternalId=****") ;;
      *[[:space:]]*) out+=("'$arg'") ;;
      *) out+=("$arg") ;;
    esac
  done
  echo "+ ${out[*]}"
}

run() {
  show "$@"
  $plan || "$@"
}

echo "# the stack: table, roles, Funk role, provisioning template + hook, Cognito, HTTP API, functions"
run "$SAM" build --template-file infra/template.yaml --build-dir target/sam --beta-features
run "$SAM" deploy --template-file target/sam/template.yaml --stack-name "$STACK_NAME" \
  --region "$AWS_REGION" --capabilities CAPABILITY_IAM --resolve-s3 \
  --no-fail-on-empty-changeset --parameter-overrides "${overrides[@]}"

echo "# the installers' page: web/ and its config.json into the page's bucket (served by CloudFront)"
output() {
  "$AWS" cloudformation describe-stacks --region "$AWS_REGION" --stack-name "$STACK_NAME" \
    --query "Stacks[0].Outputs[?OutputKey=='$1'].OutputValue" --output text
}
if $plan; then
  echo "+ write target/page-config.json from the stack's outputs (InstallersUserPoolId, InstallersAppClientId, SerialPattern; apiUrl empty: /claims is the page's own origin)"
  echo "+ $AWS s3 sync web/ s3://<InstallerPageBucketName>/ --delete --exclude config.json --exclude README.md --exclude 'screenshots/*'"
  echo "+ $AWS s3 cp target/page-config.json s3://<InstallerPageBucketName>/config.json"
else
  mkdir -p target
  # JSON by a JSON encoder: the serial pattern may hold backslashes and quotes. apiUrl is
  # empty: the page's own CloudFront origin serves /claims.
  python3 -c 'import json, sys
keys = ["region", "userPoolId", "clientId", "apiUrl", "serialPattern"]
print(json.dumps(dict(zip(keys, sys.argv[1:]))))' \
    "$AWS_REGION" "$(output InstallersUserPoolId)" "$(output InstallersAppClientId)" "" \
    "$(output SerialPattern)" > target/page-config.json
  bucket=$(output InstallerPageBucketName)
  run "$AWS" s3 sync web/ "s3://$bucket/" --delete --exclude config.json --exclude README.md \
    --exclude 'screenshots/*' --region "$AWS_REGION"
  run "$AWS" s3 cp target/page-config.json "s3://$bucket/config.json" --region "$AWS_REGION" \
    --content-type application/json
fi

echo "# outputs to configure SORACOM Funk and the installer app:"
if $plan; then
  echo "+ $AWS cloudformation describe-stacks --stack-name $STACK_NAME --query Stacks[0].Outputs"
else
  "$AWS" cloudformation describe-stacks --region "$AWS_REGION" --stack-name "$STACK_NAME" \
    --query "Stacks[0].Outputs" --output table
fi

#!/usr/bin/env bash
# Deploys the bundle into the AWS account of the current credentials:
#   1. the stack (infra/template.yaml) with AWS SAM, which builds the functions with cargo-lambda;
#   2. each function's code with `cargo lambda deploy`, with the role and table the stack outputs.
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
#   GROUP_KEY_PARAMETER     default /soracom-dps/group-key (store the key there first)
#   PROVISIONING_TEMPLATE   default fleet-template
#   ALLOWED_OPERATOR_IDS    required: your SORACOM operator id(s), comma-separated (OP...); a
#                           deployed stack never admits SIMs of any operator
#   SAM, AWS, CARGO         the commands to use (default: from .venv-deploy, and cargo)
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
CARGO=${CARGO:-cargo}
FUNCTIONS=(azure-dps-register claim-issuer fleet-prehook)

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

show() {
  local out=() arg
  for arg in "$@"; do
    case "$arg" in
      SoracomExternalId=*) out+=("SoracomExternalId=****") ;;
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

output() {
  if $plan; then
    echo "<output $1 of stack $STACK_NAME>"
  else
    "$AWS" cloudformation describe-stacks --region "$AWS_REGION" --stack-name "$STACK_NAME" \
      --query "Stacks[0].Outputs[?OutputKey=='$1'].OutputValue" --output text
  fi
}

echo "# 1. the stack: table, roles, Funk role, provisioning template + hook, Cognito, HTTP API, functions"
run "$SAM" build --template-file infra/template.yaml --build-dir target/sam --beta-features
run "$SAM" deploy --template-file target/sam/template.yaml --stack-name "$STACK_NAME" \
  --region "$AWS_REGION" --capabilities CAPABILITY_IAM --resolve-s3 \
  --no-fail-on-empty-changeset --parameter-overrides "${overrides[@]}"

echo "# 2. each function's code with cargo lambda, with the stack's role and table"
run "$CARGO" lambda build --release --arm64
table=$(output DevicesTableName)
for fn in "${FUNCTIONS[@]}"; do
  case "$fn" in
    azure-dps-register) role_output=AzureDpsRegisterRoleArn ;;
    claim-issuer) role_output=ClaimIssuerRoleArn ;;
    fleet-prehook) role_output=FleetPrehookRoleArn ;;
  esac
  role=$(output "$role_output")
  # --merge-env keeps the rest of the environment the stack set.
  run "$CARGO" lambda deploy --region "$AWS_REGION" --binary-name "$fn" --role "$role" \
    --merge-env --env-var "DEVICES_TABLE=$table" "$STACK_NAME-$fn"
done

echo "# outputs to configure SORACOM Funk and the installer app:"
if $plan; then
  echo "+ $AWS cloudformation describe-stacks --stack-name $STACK_NAME --query Stacks[0].Outputs"
else
  "$AWS" cloudformation describe-stacks --region "$AWS_REGION" --stack-name "$STACK_NAME" \
    --query "Stacks[0].Outputs" --output table
fi

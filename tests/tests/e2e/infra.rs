//! The deployable template (infra/template.yaml), checked offline: least privilege in every IAM
//! and IoT policy, and every function's environment complete and pointing at resources the
//! template defines. (`make test` also runs cfn-lint on it.)

use std::collections::HashMap;

use serde_yaml::Value;

/// Statements allowed a full `*` resource, with the reason AWS requires it. Empty today.
const FULL_WILDCARD_EXCEPTIONS: &[(&str, &str)] = &[];

pub(crate) fn template() -> Value {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../infra/template.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The text of a scalar, looking through `!Sub`, `!Ref` and `!GetAtt` tags.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Tagged(t) => match &t.value {
            Value::String(s) => Some(format!("{} {s}", t.tag)),
            Value::Sequence(items) => items
                .first()
                .and_then(text)
                .map(|s| format!("{} {s}", t.tag)),
            _ => None,
        },
        _ => None,
    }
}

fn list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Sequence(items)) => items.iter().filter_map(text).collect(),
        Some(other) => text(other).into_iter().collect(),
        None => Vec::new(),
    }
}

/// Every policy statement in the template, with the resource that holds it.
fn statements(t: &Value) -> Vec<(String, Value)> {
    fn walk(owner: &str, v: &Value, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Mapping(m) => {
                if let Some(Value::Sequence(stmts)) = m.get("Statement") {
                    for s in stmts {
                        out.push((owner.to_owned(), s.clone()));
                    }
                }
                for (_, child) in m {
                    walk(owner, child, out);
                }
            }
            Value::Sequence(items) => items.iter().for_each(|i| walk(owner, i, out)),
            Value::Tagged(t) => walk(owner, &t.value, out),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(Value::Mapping(resources)) = t.get("Resources") {
        for (name, resource) in resources {
            walk(name.as_str().unwrap_or(""), resource, &mut out);
        }
    }
    out
}

#[test]
fn no_policy_grants_wildcard_actions_or_resources() {
    let t = template();
    let all = statements(&t);
    assert!(all.len() >= 15, "found only {} statements", all.len());
    let mut problems = Vec::new();
    for (owner, statement) in &all {
        if text(statement.get("Effect").unwrap_or(&Value::Null)).as_deref() != Some("Allow") {
            continue;
        }
        // Trust policies name principals, not resources.
        if statement.get("Principal").is_some() {
            continue;
        }
        for action in list(statement.get("Action")) {
            if action.contains('*') {
                problems.push(format!("{owner}: action {action}"));
            }
        }
        let resources = list(statement.get("Resource"));
        if resources.is_empty() {
            problems.push(format!("{owner}: statement without Resource"));
        }
        for resource in resources {
            let bare = resource.rsplit(' ').next().unwrap_or(&resource);
            // `*`, or an ARN whose resource part is `*` (every resource of the service).
            let full = bare == "*" || bare.rsplit(':').next() == Some("*");
            let excused = FULL_WILDCARD_EXCEPTIONS
                .iter()
                .any(|(who, _)| *who == owner);
            if full && !excused {
                problems.push(format!("{owner}: resource {resource}"));
            }
        }
    }
    assert!(problems.is_empty(), "wildcards:\n{}", problems.join("\n"));
}

fn functions(t: &Value) -> HashMap<String, HashMap<String, String>> {
    let mut out = HashMap::new();
    for (name, resource) in t["Resources"].as_mapping().unwrap() {
        if resource["Type"].as_str() != Some("AWS::Serverless::Function") {
            continue;
        }
        let binary = resource["Metadata"]["BuildProperties"]["Binary"]
            .as_str()
            .unwrap()
            .to_owned();
        let vars = resource["Properties"]["Environment"]["Variables"]
            .as_mapping()
            .unwrap();
        let env = vars
            .iter()
            .map(|(k, v)| (k.as_str().unwrap().to_owned(), text(v).unwrap_or_default()))
            .collect();
        out.insert(binary, env);
        assert!(name.as_str().is_some());
    }
    out
}

#[test]
fn every_function_environment_is_complete_and_names_defined_resources() {
    let t = template();
    let defined: Vec<String> = ["Resources", "Parameters"]
        .iter()
        .flat_map(|section| {
            t[*section]
                .as_mapping()
                .unwrap()
                .keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .collect();
    let functions = functions(&t);
    assert_eq!(functions.len(), 5);
    for (binary, env) in &functions {
        for (name, value) in env {
            if let Some(target) = value
                .strip_prefix("!Ref ")
                .or_else(|| value.strip_prefix("!GetAtt "))
            {
                let target = target.split('.').next().unwrap_or("");
                assert!(
                    defined.iter().any(|d| d == target),
                    "{binary}: {name} refers to undefined {target}"
                );
            }
        }
        assert_eq!(
            env.get("DEVICES_TABLE").map(String::as_str),
            Some("!Ref DevicesTable"),
            "{binary}"
        );
        // The function's own configuration loader accepts this environment: the template's
        // default where a variable takes a parameter that has one, else a dummy value.
        let default_of = |value: &str| {
            let parameter = value.strip_prefix("!Ref ")?;
            text(&t["Parameters"][parameter]["Default"])
        };
        let dummy: HashMap<String, String> = env
            .iter()
            .map(|(k, value)| {
                if let Some(default) = default_of(value) {
                    return (k.clone(), default);
                }
                let v = match k.as_str() {
                    "DPS_ENDPOINT" => "dps.example:8883",
                    "CLAIMS_PER_WINDOW" | "CLAIM_WINDOW_SECONDS" => "20",
                    "REQUIRE_CLAIM_RECORD" | "REQUIRE_SIM_ALLOWLIST" => "true",
                    "PENDING_SECONDS" => "600",
                    "ALLOWED_OPERATOR_IDS" => "",
                    "BEAM_OPERATOR_ID" => "OP0012345678",
                    _ => "value",
                };
                (k.clone(), v.to_owned())
            })
            .collect();
        let loaded = match binary.as_str() {
            "azure-dps-register" => {
                azure_dps_register::config::Config::from_env(&dummy).map(|_| ())
            }
            "fleet-prehook" => fleet_prehook::config::Config::from_env(&dummy).map(|_| ()),
            "claim-issuer" => claim_issuer::config::Config::from_env(&dummy).map(|_| ()),
            "sim-lifecycle" => sim_lifecycle::config::Config::from_env(&dummy).map(|_| ()),
            "fleet-confirm" => fleet_confirm::config::Config::from_env(&dummy).map(|_| ()),
            other => panic!("unknown function binary {other}"),
        };
        assert!(loaded.is_ok(), "{binary}: {loaded:?}");
        if binary == "azure-dps-register" {
            // And with X.509 attestation, as the Attestation parameter allows.
            let mut x509 = dummy.clone();
            x509.insert("ATTESTATION".into(), "x509".into());
            x509.insert(
                "CA_KMS_KEY_ID".into(),
                "arn:aws:kms:ap-northeast-1:1:key/k".into(),
            );
            let loaded = azure_dps_register::config::Config::from_env(&x509);
            assert!(
                matches!(&loaded, Ok(c) if matches!(c.attestation, azure_dps_register::config::Attestation::X509(_))),
                "{loaded:?}"
            );
        }
    }
}

#[test]
fn the_device_ca_key_signs_only_device_certificates_and_only_in_x509_mode() {
    let t = template();
    let role = &t["Resources"]["AzureDpsRegisterRole"]["Properties"]["Policies"];
    let kms: Vec<(String, Value)> = statements(&t)
        .into_iter()
        .filter(|(owner, s)| {
            owner == "AzureDpsRegisterRole"
                && list(s.get("Action")).iter().any(|a| a.starts_with("kms:"))
        })
        .collect();
    let actions: Vec<String> = kms
        .iter()
        .flat_map(|(_, s)| list(s.get("Action")))
        .collect();
    assert_eq!(actions, ["kms:Decrypt", "kms:Sign", "kms:GetPublicKey"]);
    for (_, statement) in &kms {
        let resources = list(statement.get("Resource"));
        let expected = if list(statement.get("Action")) == ["kms:Decrypt"] {
            "!Ref GroupKeyKmsKeyArn"
        } else {
            "!Ref DeviceCaKmsKeyArn"
        };
        assert_eq!(resources, [expected]);
    }
    let sign = &kms[1].1["Condition"]["StringEquals"];
    assert_eq!(
        text(&sign["kms:SigningAlgorithm"]).as_deref(),
        Some("ECDSA_SHA_256")
    );
    // The CA's policy exists only when the stack is deployed for X.509 devices.
    let serialized = serde_yaml::to_string(role).unwrap();
    assert!(serialized.contains("IsX509"), "{serialized}");
    let rule = &t["Rules"]["X509NeedsItsCa"];
    assert!(serde_yaml::to_string(rule)
        .unwrap()
        .contains("DeviceCaKmsKeyArn"));
}

/// The hole: the Beam route was deployed whether or not anyone used Beam, and unsigned
/// requests on it throttled SSM for the whole account. Without a PSK parameter there is no
/// route, no integration, no permission, no PSK grant and no PSK variable.
#[test]
fn without_beam_there_is_no_beam_route() {
    let t = template();
    assert_eq!(
        t["Parameters"]["BeamPskParameterName"]["Default"].as_str(),
        Some(""),
        "Beam must be off unless the operator names its PSK"
    );
    let resources = t["Resources"].as_mapping().unwrap();
    let beam: Vec<&str> = resources
        .iter()
        .filter_map(|(name, _)| name.as_str())
        .filter(|name| name.starts_with("Beam"))
        .collect();
    for name in [
        "BeamApi",
        "BeamStage",
        "BeamIntegration",
        "BeamRoute",
        "BeamInvokePermission",
    ] {
        assert!(beam.contains(&name), "{name} missing");
    }
    for name in &beam {
        assert_eq!(
            resources[*name]["Condition"].as_str(),
            Some("HasBeam"),
            "{name} exists without Beam"
        );
    }
    // Nothing else reaches the Beam API or names the PSK unconditionally.
    for (name, resource) in resources {
        let name = name.as_str().unwrap();
        if name.starts_with("Beam") {
            continue;
        }
        let yaml = serde_yaml::to_string(resource).unwrap();
        assert!(!yaml.contains("BeamApi"), "{name} uses the Beam API");
        for line in yaml.lines().filter(|l| l.contains("BeamPskParameterName")) {
            assert!(
                line.contains("!If") || yaml.contains("- HasBeam"),
                "{name} names the PSK without HasBeam: {line}"
            );
        }
    }
    let azure = &t["Resources"]["AzureDpsRegisterFunction"]["Properties"];
    assert!(
        azure.get("Events").is_none(),
        "a SAM event cannot be conditional"
    );
    let env = &azure["Environment"]["Variables"];
    for variable in ["BEAM_PSK_PARAMETER", "BEAM_OPERATOR_ID"] {
        assert!(
            text(&env[variable]).unwrap().starts_with("!If HasBeam"),
            "{variable} set without Beam"
        );
    }
    assert_eq!(
        t["Outputs"]["BeamRegisterUrl"]["Condition"].as_str(),
        Some("HasBeam")
    );
    // deploy.sh turns Beam on only when told, with the operator when given.
    let off = String::from_utf8(deploy_script(true, &DEPLOY_SETTINGS).stdout).unwrap();
    assert!(!off.contains("BeamPskParameterName"), "{off}");
    let mut with_beam = DEPLOY_SETTINGS.to_vec();
    with_beam.push(("BEAM_PSK_PARAMETER", "/soracom-dps/beam-psk"));
    with_beam.push(("BEAM_OPERATOR_ID", "OP0012345678"));
    let on = String::from_utf8(deploy_script(true, &with_beam).stdout).unwrap();
    assert!(
        on.contains("BeamPskParameterName=/soracom-dps/beam-psk"),
        "{on}"
    );
    assert!(on.contains("BeamOperatorId=OP0012345678"), "{on}");
}

/// fleet-confirm gets the fleet's connect lifecycle events (never a claim's), AWS IoT may
/// invoke it from that rule only, and its role may only read and confirm serials, list and
/// detach the fleet's things' certificates and set certificates inactive.
#[test]
fn a_devices_first_connection_reaches_fleet_confirm_and_nothing_else() {
    let t = template();
    let r = &t["Resources"];
    let rule = &r["FleetConfirmRule"]["Properties"]["TopicRulePayload"];
    let sql = text(&rule["Sql"]).unwrap();
    assert!(
        sql.contains("FROM '$aws/events/presence/connected/+'"),
        "{sql}"
    );
    assert!(
        sql.contains("startswith(clientId, '${ThingNamePrefix}')"),
        "{sql}"
    );
    assert!(sql.contains("NOT startswith(clientId, 'claim.')"), "{sql}");
    assert_eq!(
        text(&rule["Actions"][0]["Lambda"]["FunctionArn"]).as_deref(),
        Some("!GetAtt FleetConfirmFunction.Arn")
    );
    let permission = &r["FleetConfirmInvokePermission"]["Properties"];
    assert_eq!(permission["Principal"].as_str(), Some("iot.amazonaws.com"));
    assert_eq!(
        text(&permission["SourceArn"]).as_deref(),
        Some("!GetAtt FleetConfirmRule.Arn")
    );
    assert!(permission.get("SourceAccount").is_some());
    let env = &r["FleetConfirmFunction"]["Properties"]["Environment"]["Variables"];
    assert_eq!(
        text(&env["THING_NAME_PREFIX"]).as_deref(),
        Some("!Ref ThingNamePrefix")
    );
    let role: Vec<Value> = statements(&t)
        .into_iter()
        .filter(|(owner, _)| owner == "FleetConfirmRole")
        .map(|(_, s)| s)
        .filter(|s| s.get("Principal").is_none())
        .collect();
    let actions: Vec<String> = role.iter().flat_map(|s| list(s.get("Action"))).collect();
    assert_eq!(
        actions,
        [
            "logs:CreateLogStream",
            "logs:PutLogEvents",
            "dynamodb:GetItem",
            "dynamodb:UpdateItem",
            "iot:ListThingPrincipals",
            "iot:DetachThingPrincipal",
            "iot:UpdateCertificate"
        ]
    );
    let things = role
        .iter()
        .find(|s| list(s.get("Action")).contains(&"iot:DetachThingPrincipal".to_owned()))
        .unwrap();
    assert!(list(things.get("Resource"))[0].ends_with(":thing/${ThingNamePrefix}*"));
}

#[test]
fn the_hook_and_funk_role_are_wired_as_aws_requires() {
    let t = template();
    let r = &t["Resources"];
    let hook = &r["FleetProvisioningTemplate"]["Properties"]["PreProvisioningHook"];
    assert_eq!(hook["PayloadVersion"].as_str(), Some("2020-04-01"));
    let permission = &r["FleetPrehookInvokePermission"]["Properties"];
    assert_eq!(permission["Principal"].as_str(), Some("iot.amazonaws.com"));
    assert!(text(&permission["SourceArn"])
        .unwrap()
        .contains(":provisioningtemplate/"));
    assert!(permission.get("SourceAccount").is_some());

    let trust = &r["SoracomFunkRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0];
    assert!(
        trust["Condition"]["StringEquals"]
            .get("sts:ExternalId")
            .is_some(),
        "Funk role without external id"
    );
    let funk = statements(&t)
        .into_iter()
        .filter(|(o, _)| o == "SoracomFunkRole")
        .filter(|(_, s)| s.get("Principal").is_none())
        .collect::<Vec<_>>();
    assert_eq!(funk.len(), 1);
    assert_eq!(list(funk[0].1.get("Action")), vec!["lambda:InvokeFunction"]);
    // Exactly the `live` alias, which each deploy moves to the new version: Funk takes a
    // qualified ARN.
    assert_eq!(
        list(funk[0].1.get("Resource")),
        vec!["!Ref AzureDpsRegisterFunction.Alias"]
    );
    // SORACOM's Event Handler: its own role with its own external id (a leaked Funk id opens
    // no second door), only when the operator gave one, sim-lifecycle's alias only.
    let role = &r["SoracomEventHandlerRole"];
    assert_eq!(role["Condition"].as_str(), Some("HasEventHandler"));
    let trust = &role["Properties"]["AssumeRolePolicyDocument"]["Statement"][0];
    assert_eq!(
        text(&trust["Condition"]["StringEquals"]["sts:ExternalId"]).as_deref(),
        Some("!Ref SoracomEventHandlerExternalId")
    );
    let funk_trust =
        &r["SoracomFunkRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0];
    assert_eq!(
        text(&funk_trust["Condition"]["StringEquals"]["sts:ExternalId"]).as_deref(),
        Some("!Ref SoracomExternalId")
    );
    let rule = serde_yaml::to_string(&t["Rules"]["EventHandlerHasItsOwnExternalId"]).unwrap();
    assert!(
        rule.contains("SoracomEventHandlerExternalId") && rule.contains("SoracomExternalId"),
        "{rule}"
    );
    assert_eq!(
        t["Outputs"]["SoracomEventHandlerRoleArn"]["Condition"].as_str(),
        Some("HasEventHandler")
    );
    let handler_id = [("SORACOM_EVENT_HANDLER_EXTERNAL_ID", "other-s3cret-id")];
    let with_handler = [&DEPLOY_SETTINGS[..], &handler_id[..]].concat();
    let plan = String::from_utf8(deploy_script(true, &with_handler).stdout).unwrap();
    assert!(
        plan.contains("SoracomEventHandlerExternalId=****") && !plan.contains("other-s3cret-id"),
        "{plan}"
    );
    let handler = statements(&t)
        .into_iter()
        .filter(|(o, s)| o == "SoracomEventHandlerRole" && s.get("Principal").is_none())
        .collect::<Vec<_>>();
    assert_eq!(handler.len(), 1);
    assert_eq!(
        list(handler[0].1.get("Action")),
        vec!["lambda:InvokeFunction"]
    );
    assert_eq!(
        list(handler[0].1.get("Resource")),
        vec!["!Ref SimLifecycleFunction.Alias"]
    );
    assert_eq!(
        r["SimLifecycleFunction"]["Properties"]["AutoPublishAlias"].as_str(),
        Some("live")
    );
    let azure = &r["AzureDpsRegisterFunction"]["Properties"];
    assert_eq!(azure["AutoPublishAlias"].as_str(), Some("live"));
    // SORACOM Beam's route: POST /register on its own throttled API, no authorizer (the
    // function verifies Beam's signature first), payload 2.0 (what `beam::is_http_event` reads),
    // invoking the alias, and API Gateway allowed that one route of that API only.
    let route = &r["BeamRoute"]["Properties"];
    assert_eq!(text(&route["ApiId"]).as_deref(), Some("!Ref BeamApi"));
    assert_eq!(route["RouteKey"].as_str(), Some("POST /register"));
    assert_eq!(route["AuthorizationType"].as_str(), Some("NONE"));
    assert_eq!(
        text(&route["Target"]).as_deref(),
        Some("!Sub integrations/${BeamIntegration}")
    );
    let integration = &r["BeamIntegration"]["Properties"];
    assert_eq!(integration["PayloadFormatVersion"].as_str(), Some("2.0"));
    assert_eq!(
        text(&integration["IntegrationUri"]).as_deref(),
        Some("!Ref AzureDpsRegisterFunction.Alias")
    );
    let permission = &r["BeamInvokePermission"]["Properties"];
    assert_eq!(
        permission["Principal"].as_str(),
        Some("apigateway.amazonaws.com")
    );
    assert_eq!(
        text(&permission["FunctionName"]).as_deref(),
        Some("!Ref AzureDpsRegisterFunction.Alias")
    );
    assert!(text(&permission["SourceArn"])
        .unwrap()
        .ends_with(":${BeamApi}/*/POST/register"));
    // A reboot storm cannot take the concurrency fleet-prehook needs within AWS IoT's 5 s.
    assert_eq!(
        text(&azure["ReservedConcurrentExecutions"]).as_deref(),
        Some("!Ref AzureDpsRegisterReservedConcurrency")
    );
    assert_eq!(
        text(&t["Parameters"]["AzureDpsRegisterReservedConcurrency"]["Default"]).as_deref(),
        Some("100")
    );

    // The group key is referenced by name, never present as a value.
    let raw = std::fs::read_to_string(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../infra/template.yaml"),
    )
    .unwrap();
    assert!(!raw.contains("SharedAccessKey") && !raw.contains("PRIVATE KEY"));
}

/// The required deploy settings, with an external id the plan must not show.
const DEPLOY_SETTINGS: [(&str, &str); 5] = [
    ("AWS_REGION", "ap-northeast-1"),
    ("DPS_ID_SCOPE", "0ne00ABC123"),
    ("SORACOM_AWS_ACCOUNT_ID", "123456789012"),
    ("SORACOM_EXTERNAL_ID", "s3cret-external-id"),
    ("ALLOWED_OPERATOR_IDS", "OP0012345678"),
];

fn deploy_script(plan: bool, env: &[(&str, &str)]) -> std::process::Output {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut command = std::process::Command::new("bash");
    command.arg("infra/deploy.sh").current_dir(&root);
    if plan {
        command.arg("--plan");
    }
    for name in [
        "AWS_REGION",
        "DPS_ID_SCOPE",
        "SORACOM_AWS_ACCOUNT_ID",
        "SORACOM_EXTERNAL_ID",
        "SORACOM_EVENT_HANDLER_EXTERNAL_ID",
        "ALLOWED_OPERATOR_IDS",
        "STACK_NAME",
        "DEVICE_CA_KMS_KEY_ARN",
        "DEVICE_CA_PARAMETER",
        "SERIAL_PATTERN",
    ] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied()).output().unwrap()
}

#[test]
fn deploy_plan_shows_every_step_without_credentials_or_secrets() {
    let out = deploy_script(true, &DEPLOY_SETTINGS);
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{plan}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(plan.contains("sam build --template-file infra/template.yaml"));
    assert!(plan.contains("sam deploy") && plan.contains("--capabilities CAPABILITY_IAM"));
    assert!(plan.contains("DpsIdScope=0ne00ABC123") && plan.contains("SoracomExternalId=****"));
    assert!(
        !plan.contains("s3cret-external-id"),
        "the external id leaked into the plan"
    );
    assert!(
        !plan.contains("Attestation="),
        "symmetric keys unless asked: {plan}"
    );
    // One upload per function, by SAM from the template: no `cargo lambda deploy` after it
    // overwriting code and environment (the live functions drifted from the stack).
    assert!(!plan.contains("cargo lambda deploy"), "{plan}");
    let template = template();
    let functions = functions(&template);
    for function in ["azure-dps-register", "claim-issuer", "fleet-prehook"] {
        assert!(
            functions.contains_key(function),
            "the stack builds {function}"
        );
    }
}

/// One serial format for the whole stack: claim-issuer and the hook check the same pattern,
/// by default the one the functions default to, and the page's config gets it from the outputs.
#[test]
fn one_serial_pattern_reaches_claim_issuer_the_hook_and_the_page() {
    let t = template();
    let functions = functions(&t);
    for function in ["claim-issuer", "fleet-prehook"] {
        assert_eq!(
            functions[function]
                .get("SERIAL_PATTERN")
                .map(String::as_str),
            Some("!Ref SerialPattern"),
            "{function}"
        );
    }
    assert_eq!(
        t["Parameters"]["SerialPattern"]["Default"].as_str(),
        Some(shared::registry::DEFAULT_SERIAL_PATTERN)
    );
    assert_eq!(
        text(&t["Outputs"]["SerialPattern"]["Value"]).as_deref(),
        Some("!Ref SerialPattern")
    );
    let out = deploy_script(
        true,
        &[
            DEPLOY_SETTINGS.as_slice(),
            &[("SERIAL_PATTERN", "SN-[0-9]{6}")],
        ]
        .concat(),
    );
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{plan}");
    assert!(plan.contains("SerialPattern=SN-[0-9]{6}"), "{plan}");
    assert!(
        plan.contains("InstallersAppClientId, SerialPattern;"),
        "{plan}"
    );
    assert!(plan.contains("apiUrl empty"), "{plan}");
}

#[test]
fn deploy_plan_for_x509_devices_names_the_ca_key() {
    let out = deploy_script(
        true,
        &[
            DEPLOY_SETTINGS.as_slice(),
            &[(
                "DEVICE_CA_KMS_KEY_ARN",
                "arn:aws:kms:ap-northeast-1:123456789012:key/k-1",
            )],
        ]
        .concat(),
    );
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{plan}");
    for expected in [
        "Attestation=x509",
        "DeviceCaKmsKeyArn=arn:aws:kms:ap-northeast-1:123456789012:key/k-1",
        "DeviceCaCertificateParameterName=/soracom-dps/device-ca",
    ] {
        assert!(plan.contains(expected), "{expected}: {plan}");
    }
    // Every override is a parameter the template declares.
    let template = template();
    for name in [
        "Attestation",
        "DeviceCaKmsKeyArn",
        "DeviceCaCertificateParameterName",
    ] {
        assert!(template["Parameters"].get(name).is_some(), "{name}");
    }
}

#[test]
fn the_installers_page_is_private_behind_cloudfront_with_strict_headers() {
    let t = template();
    let r = &t["Resources"];
    let block = &r["InstallerPageBucket"]["Properties"]["PublicAccessBlockConfiguration"];
    for setting in [
        "BlockPublicAcls",
        "BlockPublicPolicy",
        "IgnorePublicAcls",
        "RestrictPublicBuckets",
    ] {
        assert_eq!(block[setting].as_bool(), Some(true), "{setting}");
    }
    // Only the distribution reads, and only over TLS.
    let policy = &r["InstallerPageBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"];
    let allow = &policy[0];
    assert_eq!(
        allow["Principal"]["Service"].as_str(),
        Some("cloudfront.amazonaws.com")
    );
    assert_eq!(list(allow.get("Action")), ["s3:GetObject"]);
    let source = text(&allow["Condition"]["StringEquals"]["AWS:SourceArn"]).unwrap();
    assert!(
        source.contains("distribution/${InstallerPageDistribution}"),
        "{source}"
    );
    assert_eq!(policy[1]["Effect"].as_str(), Some("Deny"));
    let distribution = &r["InstallerPageDistribution"]["Properties"]["DistributionConfig"];
    let behavior = &distribution["DefaultCacheBehavior"];
    assert_eq!(
        behavior["ViewerProtocolPolicy"].as_str(),
        Some("https-only")
    );
    assert_eq!(
        text(&behavior["ResponseHeadersPolicyId"]).as_deref(),
        Some("!Ref InstallerPageHeaders")
    );
    assert!(distribution["Origins"][0]
        .get("OriginAccessControlId")
        .is_some());
    // The same policy the local page server sends (installer_site::content_security_policy),
    // with this region's Cognito and API Gateway hosts.
    let headers = &r["InstallerPageHeaders"]["Properties"]["ResponseHeadersPolicyConfig"]
        ["SecurityHeadersConfig"];
    let csp = text(&headers["ContentSecurityPolicy"]["ContentSecurityPolicy"]).unwrap();
    let local = local_emulators::installer_site::content_security_policy("C", "A");
    let shape = |policy: &str| -> Vec<String> {
        policy
            .trim_start_matches("!Sub ")
            .split(';')
            .map(|d| d.split_whitespace().next().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(shape(&csp), shape(&local));
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive}: {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    // The camera (label scanning) for the page's own origin, nothing else: as served locally.
    let custom = &r["InstallerPageHeaders"]["Properties"]["ResponseHeadersPolicyConfig"]
        ["CustomHeadersConfig"]["Items"];
    let permissions = custom
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|h| h["Header"].as_str() == Some("Permissions-Policy"))
        .and_then(|h| h["Value"].as_str());
    assert_eq!(
        permissions,
        Some(local_emulators::installer_site::PERMISSIONS_POLICY)
    );
    // Issue: connect-src named every API Gateway host in the region. The claims API is served
    // under the page's own origin (/claims), so connect-src names no API host, and the API
    // needs no CORS at all; the app client has no secret.
    assert!(!csp.contains("execute-api"), "{csp}");
    let connect = csp
        .split(';')
        .find(|d| d.trim_start().starts_with("connect-src"))
        .unwrap();
    assert_eq!(
        connect.split_whitespace().skip(1).collect::<Vec<_>>(),
        [
            "'self'",
            "https://cognito-idp.${AWS::Region}.${AWS::URLSuffix}"
        ]
    );
    assert!(r["ClaimsApi"]["Properties"]
        .get("CorsConfiguration")
        .is_none());
    let claims = &distribution["CacheBehaviors"][0];
    assert_eq!(claims["PathPattern"].as_str(), Some("/claims"));
    assert_eq!(claims["ViewerProtocolPolicy"].as_str(), Some("https-only"));
    let origin = distribution["Origins"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|o| o["Id"] == claims["TargetOriginId"])
        .unwrap();
    assert_eq!(
        text(&origin["DomainName"]).as_deref(),
        Some("!Sub ${ClaimsApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}")
    );
    assert_eq!(
        origin["CustomOriginConfig"]["OriginProtocolPolicy"].as_str(),
        Some("https-only")
    );
    assert_eq!(
        r["InstallersAppClient"]["Properties"]["GenerateSecret"].as_bool(),
        Some(false)
    );
}

#[test]
fn deploy_without_settings_names_them_and_runs_nothing() {
    let out = deploy_script(false, &[("DPS_ID_SCOPE", "0ne00ABC123")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("AWS_REGION")
            && err.contains("SORACOM_EXTERNAL_ID")
            && err.contains("ALLOWED_OPERATOR_IDS")
            && !err.contains("DPS_ID_SCOPE"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

/// The hole: deployed unchanged, the stack admitted every SIM nobody had blocked, of any
/// SORACOM operator. Now a deployed stack refuses unlisted SIMs, and deploying needs the
/// operator ids.
#[test]
fn the_deployed_stack_is_deny_by_default() {
    let t = template();
    let env = &functions(&t)["azure-dps-register"];
    assert_eq!(
        env.get("REQUIRE_SIM_ALLOWLIST").map(String::as_str),
        Some("true")
    );
    let operators = &t["Parameters"]["AllowedOperatorIds"];
    assert!(
        operators.get("Default").is_none(),
        "AllowedOperatorIds has a default"
    );
    let pattern = format!("^(?:{})$", operators["AllowedPattern"].as_str().unwrap());
    let pattern = regex_lite::Regex::new(&pattern).unwrap();
    assert!(pattern.is_match("OP0012345678") && pattern.is_match("OP1,OP2"));
    assert!(!pattern.is_match("") && !pattern.is_match("*"));
    let out = deploy_script(
        false,
        &[
            ("AWS_REGION", "ap-northeast-1"),
            ("DPS_ID_SCOPE", "0ne00ABC123"),
            ("SORACOM_AWS_ACCOUNT_ID", "123456789012"),
            ("SORACOM_EXTERNAL_ID", "s3cret-external-id"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ALLOWED_OPERATOR_IDS"));
}

/// The device table statements of a role (`DeviceTable…`), and their conditions' values for
/// `key`, together.
fn table_condition(t: &Value, role: &str, operator: &str, key: &str) -> Vec<String> {
    let statements: Vec<Value> = statements(t)
        .into_iter()
        .filter(|(owner, s)| {
            owner == role && text(&s["Sid"]).is_some_and(|sid| sid.starts_with("DeviceTable"))
        })
        .map(|(_, s)| s)
        .collect();
    assert!(
        !statements.is_empty(),
        "{role} has no DeviceTable statement"
    );
    // Every statement on the table restricts items and attributes: none may leave them open.
    for s in &statements {
        assert!(
            s["Condition"][operator].get(key).is_some(),
            "{role}: {:?} lacks {operator} {key}",
            s["Sid"]
        );
    }
    statements
        .iter()
        .flat_map(|s| list(s["Condition"][operator].get(key)))
        .collect()
}

fn like(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => value == pattern,
    }
}

/// The hole: every role could read and write every item and attribute of the device table: the
/// hook and claim-issuer could read SIM items and their individual keys. Now each role's
/// statement names the items (by key prefix) and the attributes its function uses, and the
/// lists in the code (what the functions actually project and write) fit within them.
#[test]
fn each_function_touches_only_its_own_items_and_attributes() {
    use shared::budget::BUDGET_ATTRIBUTES;
    use shared::quota::RATE_ATTRIBUTES;
    use shared::registry::{
        CERTIFICATE_ATTRIBUTES, CLAIM_ATTRIBUTES, CLAIM_ISSUE_ATTRIBUTES, CONFIRM_ATTRIBUTES,
        DEVICE_KEY_ATTRIBUTE, LIFECYCLE_ATTRIBUTES, ONCE_ATTRIBUTES, SERIAL_ATTRIBUTES,
        SIM_ATTRIBUTES,
    };
    let t = template();
    let azure: Vec<&str> = SIM_ATTRIBUTES
        .iter()
        .chain(RATE_ATTRIBUTES)
        .chain(BUDGET_ATTRIBUTES)
        .chain(ONCE_ATTRIBUTES)
        .chain(CERTIFICATE_ATTRIBUTES)
        .copied()
        .chain([DEVICE_KEY_ATTRIBUTE])
        .collect();
    let hook: Vec<&str> = SERIAL_ATTRIBUTES
        .iter()
        .chain(CLAIM_ATTRIBUTES)
        .copied()
        .collect();
    let issuer: Vec<&str> = CLAIM_ISSUE_ATTRIBUTES
        .iter()
        .chain(RATE_ATTRIBUTES)
        .copied()
        .collect();
    // (role, attributes its code uses, keys it must reach, keys it must not reach)
    type Expectation<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);
    let roles: [Expectation; 5] = [
        (
            "AzureDpsRegisterRole",
            &azure,
            &[
                "sim#1",
                "simid#1",
                "rate#dps#1",
                "budget#dps#1",
                "beam#1",
                "cert#1",
            ],
            &["serial#1", "claim#1", "rate#installer#1"],
        ),
        (
            "FleetPrehookRole",
            &hook,
            &["serial#1", "claim#1"],
            &[
                "sim#1",
                "simid#1",
                "rate#dps#1",
                "rate#installer#1",
                "budget#dps#1",
            ],
        ),
        (
            "SimLifecycleRole",
            LIFECYCLE_ATTRIBUTES,
            &["sim#1", "simid#1"],
            &[
                "serial#1",
                "claim#1",
                "rate#dps#1",
                "rate#installer#1",
                "budget#dps#1",
            ],
        ),
        (
            "FleetConfirmRole",
            CONFIRM_ATTRIBUTES,
            &["serial#1"],
            &[
                "sim#1",
                "simid#1",
                "claim#1",
                "rate#dps#1",
                "budget#dps#1",
                "cert#1",
            ],
        ),
        (
            "ClaimIssuerRole",
            &issuer,
            &["claim#1", "rate#installer#1"],
            &["sim#1", "simid#1", "serial#1", "rate#dps#1", "budget#dps#1"],
        ),
    ];
    for (role, used, own_keys, other_keys) in roles {
        let keys = table_condition(&t, role, "ForAllValues:StringLike", "dynamodb:LeadingKeys");
        let attributes =
            table_condition(&t, role, "ForAllValues:StringEquals", "dynamodb:Attributes");
        for key in own_keys {
            assert!(
                keys.iter().any(|p| like(p, key)),
                "{role} cannot reach its {key}"
            );
        }
        for key in other_keys {
            assert!(!keys.iter().any(|p| like(p, key)), "{role} reaches {key}");
        }
        for attribute in used {
            assert!(
                attributes.iter().any(|a| a == attribute),
                "{role}: the code uses {attribute}, the policy does not allow it"
            );
        }
        let extra: Vec<&String> = attributes
            .iter()
            .filter(|a| !used.contains(&a.as_str()))
            .collect();
        assert!(
            extra.is_empty(),
            "{role} allows more than it uses: {extra:?}"
        );
        if role != "AzureDpsRegisterRole" {
            assert!(
                !attributes.iter().any(|a| a == DEVICE_KEY_ATTRIBUTE),
                "{role}"
            );
        }
    }
}

/// The holes: AWS IoT's provisioning role trusted the service for any account; a claim could
/// connect with any client id (a provisioned device's too, which disconnects that device); the
/// claims API had no overall throttle; installers' tokens lived an hour and MFA was optional.
#[test]
fn provisioning_role_claim_policy_api_and_sign_in_are_locked_down() {
    let t = template();
    let r = &t["Resources"];
    let trust =
        &r["FleetProvisioningRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0];
    assert_eq!(
        text(&trust["Condition"]["StringEquals"]["aws:SourceAccount"]).as_deref(),
        Some("!Ref AWS::AccountId")
    );

    let claim_connect = statements(&t)
        .into_iter()
        .filter(|(owner, _)| owner == "ClaimPolicy")
        .find(|(_, s)| list(s.get("Action")) == ["iot:Connect"])
        .unwrap()
        .1;
    let resource = list(claim_connect.get("Resource")).remove(0);
    let client_pattern = resource.rsplit("client/").next().unwrap();
    assert_eq!(client_pattern, "claim.*");
    // No thing name can match it: thing names are [a-zA-Z0-9:_-], and the pattern needs a '.'.
    let thing_name = regex_lite::Regex::new("^[a-zA-Z0-9:_-]+$").unwrap();
    let prefix = client_pattern.trim_end_matches('*');
    assert!(!thing_name.is_match(prefix.trim_end_matches('*')));
    assert!(prefix.contains('.'));

    for (api, settings) in [
        (
            "ClaimsApi",
            &r["ClaimsApi"]["Properties"]["DefaultRouteSettings"],
        ),
        (
            "BeamApi",
            &r["BeamStage"]["Properties"]["DefaultRouteSettings"],
        ),
    ] {
        for limit in ["ThrottlingRateLimit", "ThrottlingBurstLimit"] {
            assert!(settings.get(limit).is_some(), "{api} lacks {limit}");
        }
    }

    let pool = &r["InstallersUserPool"]["Properties"];
    assert_eq!(pool["MfaConfiguration"].as_str(), Some("ON"));
    let client = &r["InstallersAppClient"]["Properties"];
    for token in ["AccessToken", "IdToken"] {
        let minutes = client[format!("{token}Validity").as_str()]
            .as_u64()
            .unwrap();
        assert_eq!(
            client["TokenValidityUnits"][token].as_str(),
            Some("minutes")
        );
        assert!(minutes <= 15, "{token} lives {minutes} minutes");
    }
    // Issue: refresh tokens lived 30 days (Cognito's default) and sign-out revoked nothing.
    assert_eq!(client["RefreshTokenValidity"].as_u64(), Some(60));
    assert_eq!(
        client["TokenValidityUnits"]["RefreshToken"].as_str(),
        Some("minutes")
    );
    assert_eq!(client["EnableTokenRevocation"].as_bool(), Some(true));
    let page = std::fs::read_to_string(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web/app.js"),
    )
    .unwrap();
    let sign_out = &page[page.find("$('sign-out')").unwrap()..];
    assert!(
        sign_out[..sign_out.find("});").unwrap()].contains("pool.revoke(refresh)"),
        "the page revokes the refresh token on sign-out"
    );
}

/// The alarms watch the metrics the functions write (`lambda_support::metrics`): the same
/// namespace, metric and dimensions, and outcomes that are codes the functions answer.
#[test]
fn alarms_watch_what_the_functions_emit() {
    use lambda_support::metrics::NAMESPACE;
    let t = template();
    let codes: Vec<&str> = azure_dps_register::handler::Refused::ALL
        .iter()
        .map(|r| r.code())
        .chain(fleet_prehook::handler::Reason::ALL.iter().map(|r| r.code()))
        .chain(sim_lifecycle::handler::OUTCOMES.iter().copied())
        .chain(
            fleet_confirm::handler::Outcome::ALL
                .iter()
                .map(|o| o.code()),
        )
        .collect();
    let mut watched = Vec::new();
    for (name, resource) in t["Resources"].as_mapping().unwrap() {
        if resource["Type"].as_str() != Some("AWS::CloudWatch::Alarm") {
            continue;
        }
        let p = &resource["Properties"];
        let stats: Vec<&Value> = match p.get("Metrics") {
            Some(Value::Sequence(queries)) => queries
                .iter()
                .filter_map(|q| q.get("MetricStat").map(|s| &s["Metric"]))
                .collect(),
            _ => vec![p],
        };
        for metric in stats {
            assert_eq!(metric["Namespace"].as_str(), Some(NAMESPACE), "{name:?}");
            assert_eq!(metric["MetricName"].as_str(), Some("Answers"), "{name:?}");
            let dims: HashMap<String, String> = metric["Dimensions"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|d| (text(&d["Name"]).unwrap(), text(&d["Value"]).unwrap()))
                .collect();
            let function = &dims["Function"];
            assert!(function.starts_with("!Sub ${AWS::StackName}-"), "{name:?}");
            let outcome = dims["Outcome"].as_str();
            assert!(
                codes.contains(&outcome),
                "{name:?} watches unknown {outcome}"
            );
            watched.push(outcome.to_owned());
        }
    }
    for required in [
        "dps-throttled",
        "dps-failed",
        "deadline",
        "registry-unavailable",
        "registry-throttled",
        "registry-malformed",
        "failed",
    ] {
        assert!(
            watched.iter().any(|w| w == required),
            "no alarm on {required}"
        );
    }
}

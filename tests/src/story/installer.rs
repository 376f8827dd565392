//! The installers' page in the story: served with the JWT authorizer stand-in in front of
//! claim-issuer, which runs in `cargo lambda watch` like the other functions. (The page itself
//! is driven in a real browser by `make test`; here the API path it uses.)

use serde_json::{json, Value};

use super::Step;
use crate::installer_site::{self, LocalInstallers};
use crate::lambda_watch::LambdaWatch;
use crate::stack::LocalStack;

fn step(title: &'static str, command: String, outcome: Result<String, String>) -> Step {
    let ok = outcome.is_ok();
    Step {
        title,
        command,
        ok,
        detail: outcome.unwrap_or_else(|e| e),
    }
}

/// The steps, and the page with its installer (kept up by `make demo` for a person).
pub async fn steps(
    stack: &LocalStack,
    watch: &LambdaWatch,
) -> (Vec<Step>, Option<LocalInstallers>) {
    let started =
        LocalInstallers::start(stack.aws.endpoint(), "localhost", &watch.invoke_base()).await;
    match started {
        Ok(local) => (served(stack, &local).await, Some(local)),
        Err(e) => (
            vec![step(
                "the installers' page is served, its API behind the JWT authorizer stand-in",
                "tests/interop/cognito_pool.py setup; installer_site".into(),
                Err(e),
            )],
            None,
        ),
    }
}

async fn served(stack: &LocalStack, local: &LocalInstallers) -> Vec<Step> {
    let site = &local.site;
    let page = crate::http_client::send(hyper::Method::GET, &site.page_url(), &[], "").await;
    let served = match page {
        Ok(a) if a.status == 200 => match a.headers.get("content-security-policy") {
            Some(csp)
                if csp
                    .to_str()
                    .is_ok_and(|c| c.starts_with("default-src 'none'")) =>
            {
                Ok(format!(
                    "{} (CSP default-src 'none'); user pool {} with the installer {} \
                     (MFA required)",
                    site.page_url(),
                    local.pool,
                    local.user
                ))
            }
            _ => Err("the page came without its Content-Security-Policy".into()),
        },
        Ok(a) => Err(format!("GET / answered {}", a.status)),
        Err(e) => Err(e),
    };
    let mut steps = vec![step(
        "the installers' page is served, its API behind the JWT authorizer stand-in",
        format!("GET {}", site.page_url()),
        served,
    )];

    let tokens =
        installer_site::test_tokens(stack.aws.endpoint(), &local.pool, &local.client).await;
    let access = tokens
        .as_ref()
        .ok()
        .and_then(|t| t["access"].as_str())
        .unwrap_or("")
        .to_owned();
    let body = json!({"serial": "SN-0003"});
    let claimed = match installer_site::post_claim(&site.api_url(), Some(&access), &body).await {
        Ok((200, text)) => {
            let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            match answer["certificateId"].as_str() {
                Some(id) if answer["certificatePem"].is_string() => Ok(format!(
                    "200 claim {}… for SN-0003, through claim-issuer in cargo lambda watch",
                    &id[..id.len().min(12)]
                )),
                _ => Err(format!("200 without a certificate: {text}")),
            }
        }
        Ok((status, text)) => Err(format!("{status} {text}")),
        Err(e) => Err(e),
    };
    steps.push(step(
        "an installer's Cognito access token gets a claim through the stand-in",
        format!("POST {}/claims (Bearer <access token>)", site.api_url()),
        tokens.and(claimed),
    ));

    let before = site.invocations();
    let refused = match installer_site::post_claim(
        &site.api_url(),
        Some(&installer_site::forged(&access)),
        &body,
    )
    .await
    {
        Ok((401, _)) if site.invocations() == before => {
            Ok("401 Unauthorized; claim-issuer never invoked".to_owned())
        }
        Ok((status, text)) => Err(format!(
            "expected 401 before the function, got {status} {text}"
        )),
        Err(e) => Err(e),
    };
    steps.push(step(
        "a token whose groups were edited after signing is refused before claim-issuer",
        format!("POST {}/claims (Bearer <forged token>)", site.api_url()),
        refused,
    ));
    steps
}

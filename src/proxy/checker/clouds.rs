//! The clouds' key probes (the I/O half; what to send and how to read the answers is in
//! `providers::aws_check` and `providers::gcp`):
//!
//! - AWS: STS `GetCallerIdentity` (valid credential? whose account?), Bedrock's
//!   model-invocation-logging configuration (a credential whose account logs prompts is
//!   `logging`, out of rotation unless `ALLOW_AWS_LOGGING=true`), then one free, invalid
//!   `InvokeModel` per known model (a validation error means the credential may invoke it; an
//!   access-denied or not-found answer means it may not), which gives the families it serves.
//!   Each call is signed with SigV4 by `providers::aws`, as a proxied request is.
//! - GCP: the credential's access token (the JWT grant; a refused grant is a revoked key), then
//!   a one-token `rawPredict` per model family until one model of the family answers.
//!
//! Requests go one after the other (never a burst), through the proxy's upstream client.

use std::time::SystemTime;

use axum::http::{header, HeaderMap, HeaderValue, Method};
use bytes::Bytes;

use super::{send, Answer, Transient};
use crate::config::Config;
use crate::http1::Fields;
use crate::providers::aws::{self, AwsCredential, Bedrock};
use crate::providers::aws_check::{self, CredentialVerdict, Identity, Logging, ModelAccess};
use crate::providers::{gcp, KeyUse, UpstreamRequest};
use crate::proxy::keys::{rest_duration, CheckResult, KeyStatus};
use crate::proxy::{AuthFailure, Cloud, ProviderUpstream, Upstreams};

/// What the cloud probes take from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `ALLOW_AWS_LOGGING`.
    pub allow_aws_logging: bool,
    /// `AWS_STS_BASE_URL`.
    pub aws_sts_base_url: String,
    /// `AWS_BEDROCK_CONTROL_BASE_URL`.
    pub aws_control_base_url: String,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            allow_aws_logging: config.cli.allow_aws_logging,
            aws_sts_base_url: config.cli.aws_sts_base_url.clone(),
            aws_control_base_url: config.cli.aws_bedrock_control_base_url.clone(),
        }
    }
}

/// Signs and sends one AWS call (`service`, `region`) with the credential.
async fn aws_call(
    upstreams: &Upstreams,
    cred: &AwsCredential,
    service: &str,
    region: &str,
    method: Method,
    url: String,
    body: Option<Vec<u8>>,
) -> Result<Answer, Transient> {
    let body = Bytes::from(body.unwrap_or_default());
    let mut req = http::Request::builder()
        .method(method.clone())
        .uri(url.as_str())
        .body(())
        .map_err(|e| Transient(format!("bad AWS probe URL {url}: {e}")))?;
    let h = req.headers_mut();
    h.insert(header::USER_AGENT, upstreams.user_agent.clone());
    h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    if !body.is_empty() {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    aws::sign_request_for(cred, service, region, &mut req, &body, SystemTime::now())
        .map_err(Transient)?;
    let headers = Fields::from_map(std::mem::take(req.headers_mut()));
    send(
        upstreams,
        UpstreamRequest {
            method,
            url,
            headers,
            body,
        },
    )
    .await
}

fn error_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
}

/// A credential AWS refused: revoked, with AWS's reason.
fn invalid(code: &str) -> CheckResult {
    CheckResult {
        detail: Some(format!("AWS refused the credential ({code})")),
        ..CheckResult::status(KeyStatus::Revoked)
    }
}

/// AWS throttled the check: the key keeps its state (whatever it is: a throttled call says
/// nothing about it) and rests before it is checked again.
fn throttled(upstream: &ProviderUpstream, index: usize, headers: &HeaderMap) -> CheckResult {
    let status = upstream.keys.status(index).unwrap_or(KeyStatus::Unchecked);
    CheckResult {
        rest: Some(rest_duration(headers)),
        ..CheckResult::status(status)
    }
}

/// AWS: caller identity, invocation logging, then access per model.
pub async fn probe_aws(
    upstreams: &Upstreams,
    upstream: &ProviderUpstream,
    index: usize,
    settings: &Settings,
) -> Result<CheckResult, Transient> {
    let Some(Cloud::Aws(bedrock)) = &upstream.cloud else {
        return Err(Transient("not an AWS upstream".into()));
    };
    let bedrock: &Bedrock = bedrock;
    let cred = bedrock
        .credential(index)
        .ok_or_else(|| Transient("no such credential".into()))?;

    // 1. Who is this? A wrong key or secret is found here, for free.
    let (url, signing_region) = aws_check::sts_url(&settings.aws_sts_base_url, &cred.region);
    let a = aws_call(
        upstreams,
        cred,
        aws_check::STS_SERVICE,
        &signing_region,
        Method::GET,
        url,
        None,
    )
    .await?;
    let account = match aws_check::caller_identity(a.status, &a.body) {
        Identity::Valid { account } => Some(account),
        Identity::Verdict(CredentialVerdict::Invalid(code)) => return Ok(invalid(&code)),
        Identity::Verdict(CredentialVerdict::Throttled) => {
            return Ok(throttled(upstream, index, &a.headers))
        }
        Identity::Unexpected(why) if a.status >= 500 => return Err(Transient(why)),
        // Anything else says nothing certain: the model probes decide.
        Identity::Unexpected(why) => {
            tracing::debug!(key = %cred.fingerprint, why, "AWS caller identity unknown");
            None
        }
    };
    let account_text = account
        .as_deref()
        .map_or_else(String::new, |a| format!("account {a}; "));

    // 2. Does the account log prompts?
    let a = aws_call(
        upstreams,
        cred,
        aws::SERVICE,
        &cred.region,
        Method::GET,
        aws_check::logging_url(&settings.aws_control_base_url, &cred.region),
        None,
    )
    .await?;
    if a.status >= 500 {
        return Err(Transient(format!(
            "Bedrock answered {} to the logging configuration",
            a.status
        )));
    }
    let logging = aws_check::logging(a.status, error_type(&a.headers), &a.body);
    let logging_text = match &logging {
        Logging::Enabled if settings.allow_aws_logging => {
            "prompts are logged (allowed by ALLOW_AWS_LOGGING)".to_string()
        }
        Logging::Enabled => {
            return Ok(CheckResult {
                detail: Some(format!(
                    "{account_text}prompts are logged (Bedrock model invocation logging is on in {}); not used unless ALLOW_AWS_LOGGING=true",
                    cred.region
                )),
                ..CheckResult::status(KeyStatus::Logging)
            });
        }
        Logging::Disabled => "logging off".to_string(),
        Logging::Unknown(why) => format!("logging unknown ({why})"),
    };

    // 3. Which models may it invoke?
    let mut families: Vec<String> = Vec::new();
    for &model in aws_check::PROBE_MODELS {
        let family = aws::family(model);
        if families.iter().any(|f| f == family) {
            // One model of the family is enough to serve it; spare the calls.
            continue;
        }
        let mut ids = vec![model.to_string()];
        ids.extend(aws_check::inference_profile(model, &cred.region));
        for id in ids {
            let Some(url) = bedrock.invoke_url_for(index, &id) else {
                continue;
            };
            let a = aws_call(
                upstreams,
                cred,
                aws::SERVICE,
                &cred.region,
                Method::POST,
                url,
                Some(aws_check::probe_body(&id)),
            )
            .await?;
            match aws_check::model_access(a.status, error_type(&a.headers), &a.body) {
                ModelAccess::Available => {
                    families.push(family.to_string());
                    break;
                }
                ModelAccess::Verdict(CredentialVerdict::Invalid(code)) => {
                    return Ok(invalid(&code))
                }
                ModelAccess::Verdict(CredentialVerdict::Throttled) => {
                    return Ok(throttled(upstream, index, &a.headers))
                }
                // Access denied: an inference profile does not change that.
                ModelAccess::Unavailable if a.status == 403 => break,
                ModelAccess::Unavailable if a.status >= 500 => {
                    return Err(Transient(format!(
                        "Bedrock answered {} to a model probe",
                        a.status
                    )))
                }
                ModelAccess::Unavailable => {}
            }
        }
    }
    families.sort();
    if families.is_empty() {
        return Ok(CheckResult {
            families: Some(families),
            detail: Some(format!(
                "{account_text}{logging_text}; no access to any Bedrock model in {} (request model access in the Bedrock console)",
                cred.region
            )),
            ..CheckResult::status(KeyStatus::Revoked)
        });
    }
    Ok(CheckResult {
        families: Some(families),
        detail: Some(format!("{account_text}{logging_text}")),
        ..CheckResult::status(KeyStatus::Working)
    })
}

/// GCP: the token grant, then a one-token call per family until one of its models answers.
pub async fn probe_gcp(
    upstreams: &Upstreams,
    upstream: &ProviderUpstream,
    index: usize,
) -> Result<CheckResult, Transient> {
    let credential = upstream
        .keys
        .credential(index)
        .ok_or_else(|| Transient("no such credential".into()))?;
    let mut families: Vec<String> = Vec::new();
    let mut served: Vec<&str> = Vec::new();
    let mut rest = None;
    for (family, models) in gcp::PROBE_MODELS {
        for &model in *models {
            let mut renewed = false;
            let answer = loop {
                let mut out = UpstreamRequest {
                    method: Method::POST,
                    url: String::new(),
                    headers: Fields::new(),
                    body: Bytes::from(gcp::probe_body(model)),
                };
                out.headers
                    .insert(header::USER_AGENT, upstreams.user_agent.clone());
                match upstream
                    .authorize(&mut out, &KeyUse { index, credential })
                    .await
                {
                    Ok(()) => {}
                    // The token endpoint refused the service account: the key is revoked.
                    Err(AuthFailure::BadKey(why)) => {
                        return Ok(CheckResult {
                            detail: Some(format!("the token grant was refused: {why}")),
                            ..CheckResult::status(KeyStatus::Revoked)
                        })
                    }
                    Err(AuthFailure::Other(why)) => return Err(Transient(why)),
                }
                let a = send(upstreams, out).await?;
                // A cached token revoked early: one retry with a fresh one.
                if a.status == 401 && !renewed && upstream.forget_token(index).await {
                    renewed = true;
                    continue;
                }
                break a;
            };
            match answer.status {
                200..=299 | 529 => {}
                429 => rest = Some(rest_duration(&answer.headers)),
                401 | 403 => {
                    return Ok(CheckResult {
                        detail: Some(format!(
                            "Vertex AI refused the credential (HTTP {})",
                            answer.status
                        )),
                        ..CheckResult::status(KeyStatus::Revoked)
                    })
                }
                s if s >= 500 => {
                    return Err(Transient(format!(
                        "Vertex AI answered {s} to a model probe"
                    )))
                }
                // 404 (the model is not served to this project or region), 400: try the
                // family's next model.
                _ => continue,
            }
            families.push(family.to_string());
            served.push(model);
            break;
        }
    }
    families.sort();
    if families.is_empty() {
        return Ok(CheckResult {
            families: Some(families),
            detail: Some(
                "no access to any Claude model on Vertex AI (enable them in the Model Garden)"
                    .into(),
            ),
            ..CheckResult::status(KeyStatus::Revoked)
        });
    }
    Ok(CheckResult {
        families: Some(families),
        detail: Some(format!("answered: {}", served.join(", "))),
        rest,
        ..CheckResult::status(KeyStatus::Working)
    })
}

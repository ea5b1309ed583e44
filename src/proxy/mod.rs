//! The proxy: routes, the key pools, and the streaming forwarder that relays a client's
//! request to a provider (relay, key rotation, error rescue). Everything about a provider's
//! wire format is asked of [`crate::providers`]; admission and accounting go through
//! [`crate::quota`]. Never reads the user store directly.
//!
//! [`Upstreams`] is built once at startup: one upstream client ([`pool`]: per-thread connection pools)
//! and one [`keys::KeyPool`] per provider. [`routes`] maps client paths to an [`Api`]; the
//! request itself is handled phase by phase in [`forward`].

pub mod checker;
pub mod forward;
pub mod google_ai;
pub mod keys;
pub mod pool;
pub mod queue;

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;

use crate::app::AppState;
use crate::config::{Config, ConfigError};
use crate::error::ProxyError;
use std::sync::Arc;

use crate::providers::{
    aws, azure, gcp, openai, Api, BaseUrl, Endpoint, KeyUse, Provider, UpstreamRequest,
};
use forward::Route;
use keys::{KeyCounts, KeyPool};

/// One provider: where it lives and which keys it is called with.
pub struct ProviderUpstream {
    pub provider: Provider,
    endpoint: Endpoint,
    pub keys: KeyPool,
    /// The variable that configures the base URL, for messages.
    pub base_url_var: &'static str,
    /// The state of a cloud provider that signs requests or fetches tokens per credential.
    cloud: Option<Cloud>,
}

/// Per-credential state of the cloud providers, in key-pool order.
#[derive(Clone)]
enum Cloud {
    Aws(Arc<aws::Bedrock>),
    Gcp(Arc<gcp::Vertex>),
}

/// Why a request could not be authorized with a key.
pub enum AuthFailure {
    /// The key itself was refused (a GCP key the token endpoint rejects): out of rotation.
    BadKey(String),
    /// Anything else: this request fails with 502.
    Other(String),
}

impl ProviderUpstream {
    fn new(
        provider: Provider,
        base: &url::Url,
        base_url_var: &'static str,
        keys: KeyPool,
    ) -> ProviderUpstream {
        ProviderUpstream {
            provider,
            endpoint: Endpoint::Base(BaseUrl::new(base)),
            keys,
            base_url_var,
            cloud: None,
        }
    }

    /// The full upstream URL for a client path (`/v1/...`) and query string, with the key at
    /// `key_index`.
    pub fn url(&self, path: &str, query: Option<&str>, key_index: usize) -> String {
        self.provider
            .upstream_url(&self.endpoint, path, query, key_index)
    }

    /// The keys a request for `model` may use: on Azure, the credentials of the deployment the
    /// client names as `model` when one has that name (each deployment serves one model);
    /// otherwise every key.
    pub fn eligible_keys(&self, model: Option<&str>) -> Option<Vec<usize>> {
        let (Endpoint::Azure(d), Some(model)) = (&self.endpoint, model) else {
            return None;
        };
        let matching: Vec<usize> = d
            .deployments
            .iter()
            .enumerate()
            .filter(|(_, dep)| dep.deployment == model)
            .map(|(i, _)| i)
            .collect();
        (!matching.is_empty()).then_some(matching)
    }

    /// The provider's endpoint state (base URL, deployments, ...).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Azure's deployments (for the model list), if this is Azure.
    pub fn azure_deployments(&self) -> Option<&azure::Deployments> {
        match &self.endpoint {
            Endpoint::Azure(d) => Some(d),
            Endpoint::Base(_) => None,
        }
    }

    /// Puts the operator's credential on the final request: the provider's header, or for
    /// the clouds the SigV4 signature (Bedrock) or the credential's access token (Vertex).
    pub async fn authorize(
        &self,
        req: &mut UpstreamRequest,
        key: &KeyUse<'_>,
    ) -> Result<(), AuthFailure> {
        match &self.cloud {
            None => {
                self.provider
                    .authorize(&self.endpoint, req, key)
                    .map_err(|e| AuthFailure::Other(e.0))?;
                // An OpenAI key's entry for one of its other organisations.
                if let Some(org) = self.keys.organization(key.index) {
                    req.headers.insert(openai::ORGANIZATION_HEADER, org.clone());
                }
                Ok(())
            }
            Some(Cloud::Aws(b)) => b
                .authorize(req, key.index, self.provider == Provider::AwsMistral)
                .map_err(|e| AuthFailure::Other(e.0)),
            // Boxed: a token fetch is a large future that runs rarely (see `pool::send`).
            Some(Cloud::Gcp(v)) => {
                Box::pin(v.authorize(req, key.index))
                    .await
                    .map_err(|e| match e {
                        gcp::VertexAuthError::KeyRejected(m) => AuthFailure::BadKey(m),
                        gcp::VertexAuthError::Other(m) => AuthFailure::Other(m),
                    })
            }
        }
    }

    /// Vertex refused a credential's access token: forget it, so that a retry fetches a new
    /// one. True when there was a token to forget (the retry may succeed).
    pub async fn forget_token(&self, index: usize) -> bool {
        match &self.cloud {
            Some(Cloud::Gcp(v)) => {
                Box::pin(v.forget_token(index)).await;
                true
            }
            _ => false,
        }
    }
}

/// A cloud upstream's [`ProviderUpstream`]: its key pool holds the parsed credentials, its
/// base URL (with `{region}` filled in for display) only serves messages.
fn cloud_upstream(
    provider: Provider,
    template: &str,
    var: &'static str,
    base_url_var: &'static str,
    entries: &[crate::config::Secret],
    cloud: Cloud,
) -> Result<ProviderUpstream, ConfigError> {
    let shown = url::Url::parse(&template.replace("{region}", "region"))
        .map_err(|e| ConfigError(format!("{base_url_var}={template} is not a URL ({e})")))?;
    let keys = KeyPool::with_credential(var, entries, |k| provider.key_credential(k))?;
    let mut up = ProviderUpstream::new(provider, &shown, base_url_var, keys);
    up.cloud = Some(cloud);
    Ok(up)
}

/// Every configured provider with its key pool, and the one upstream client they share.
pub struct Upstreams {
    /// Upstream calls: hyper's low-level HTTP/1.1 client over rustls with a connection pool
    /// per worker thread (`pool.rs`). Not reqwest: its per-request layers (URL re-parsing,
    /// redirect and timeout wrappers, boxed bodies) cost more than the rest of the proxy
    /// (docs/benchmarks.md); not hyper-util's legacy client: its shared pool costs more than
    /// one per thread (docs/performance.md). It follows no redirects (they would re-send the
    /// operator's key elsewhere).
    pool: pool::Pool,
    openai: ProviderUpstream,
    anthropic: ProviderUpstream,
    google_ai: ProviderUpstream,
    mistral_ai: ProviderUpstream,
    azure: ProviderUpstream,
    aws: ProviderUpstream,
    aws_mistral: ProviderUpstream,
    gcp: ProviderUpstream,
    connect_timeout_secs: u64,
    timeout_secs: u64,
    /// The whole-request deadline (`UPSTREAM_TIMEOUT_SECS`), streamed bodies included.
    timeout: Duration,
    /// Sent as `User-Agent` on every upstream request.
    user_agent: HeaderValue,
    /// The fair queue (`USER_CONCURRENCY_LIMIT`, waiting for rate-limited keys; `queue.rs`).
    pub queue: Arc<queue::FairQueue>,
}

impl Upstreams {
    /// Builds the shared client and the key pools. Fails (naming the variable) when a key
    /// cannot be sent as an HTTP header.
    pub fn from_config(config: &Config) -> Result<Upstreams, ConfigError> {
        let pool = pool::Pool::from_config(config)?;
        let cli = &config.cli;
        let bedrock = Arc::new(aws::Bedrock::new(
            &cli.aws_bedrock_base_url,
            config.aws_credentials.clone(),
        ));
        let aws_entries = bedrock.pool_entries();
        let vertex = Arc::new(
            gcp::Vertex::new(
                &cli.gcp_vertex_base_url,
                &cli.gcp_token_url,
                config.gcp_credentials.clone(),
            )
            .map_err(ConfigError)?,
        );
        let gcp_entries = vertex.pool_entries();
        let aws_up = cloud_upstream(
            Provider::Aws,
            &cli.aws_bedrock_base_url,
            aws::VAR,
            "AWS_BEDROCK_BASE_URL",
            &aws_entries,
            Cloud::Aws(bedrock.clone()),
        )?;
        let mut aws_mistral = cloud_upstream(
            Provider::AwsMistral,
            &cli.aws_bedrock_base_url,
            aws::VAR,
            "AWS_BEDROCK_BASE_URL",
            &aws_entries,
            Cloud::Aws(bedrock),
        )?;
        // One credential, two pools: what is learnt about it through one holds for both.
        aws_mistral.keys.share_status_with(&aws_up.keys);
        let gcp_up = cloud_upstream(
            Provider::Gcp,
            &cli.gcp_vertex_base_url,
            gcp::VAR,
            "GCP_VERTEX_BASE_URL",
            &gcp_entries,
            Cloud::Gcp(vertex),
        )?;
        Ok(Upstreams {
            aws: aws_up,
            aws_mistral,
            gcp: gcp_up,
            pool,
            timeout: config.upstream_timeout(),
            user_agent: HeaderValue::from_static(concat!(
                "llm-gatekeeper/",
                env!("CARGO_PKG_VERSION")
            )),
            openai: ProviderUpstream::new(
                Provider::OpenAi,
                &config.cli.openai_base_url,
                "OPENAI_BASE_URL",
                KeyPool::with_credential("OPENAI_KEY", &config.openai_keys, |k| {
                    Provider::OpenAi.key_credential(k)
                })?,
            ),
            anthropic: ProviderUpstream::new(
                Provider::Anthropic,
                &config.cli.anthropic_base_url,
                "ANTHROPIC_BASE_URL",
                KeyPool::with_credential("ANTHROPIC_KEY", &config.anthropic_keys, |k| {
                    Provider::Anthropic.key_credential(k)
                })?,
            ),
            google_ai: ProviderUpstream::new(
                Provider::GoogleAi,
                &config.cli.google_ai_base_url,
                "GOOGLE_AI_BASE_URL",
                KeyPool::with_credential("GOOGLE_AI_KEY", &config.google_ai_keys, |k| {
                    Provider::GoogleAi.key_credential(k)
                })?,
            ),
            mistral_ai: ProviderUpstream::new(
                Provider::MistralAi,
                &config.cli.mistral_ai_base_url,
                "MISTRAL_AI_BASE_URL",
                KeyPool::with_credential("MISTRAL_AI_KEY", &config.mistral_ai_keys, |k| {
                    Provider::MistralAi.key_credential(k)
                })?,
            ),
            azure: ProviderUpstream {
                provider: Provider::Azure,
                endpoint: Endpoint::Azure(azure::Deployments {
                    base_template: config.cli.azure_base_url.clone(),
                    api_version: config.cli.azure_api_version.clone(),
                    deployments: config.azure_deployments.clone(),
                }),
                keys: KeyPool::with_credential("AZURE_CREDENTIALS", &config.azure_keys, |k| {
                    Provider::Azure.key_credential(k)
                })?,
                base_url_var: "AZURE_BASE_URL",
                cloud: None,
            },
            connect_timeout_secs: config.cli.upstream_connect_timeout_secs,
            timeout_secs: config.cli.upstream_timeout_secs,
            queue: Arc::new(queue::FairQueue::new(queue::QueueSettings::from_config(
                config,
            ))),
        })
    }

    /// The provider's upstream (base URL and key pool).
    pub fn provider(&self, provider: Provider) -> &ProviderUpstream {
        match provider {
            Provider::OpenAi => &self.openai,
            Provider::Anthropic => &self.anthropic,
            Provider::GoogleAi => &self.google_ai,
            Provider::MistralAi => &self.mistral_ai,
            Provider::Azure => &self.azure,
            Provider::Aws => &self.aws,
            Provider::AwsMistral => &self.aws_mistral,
            Provider::Gcp => &self.gcp,
        }
    }

    /// How many keys of a provider work right now (for the service info page).
    pub fn key_counts(&self, provider: Provider) -> KeyCounts {
        self.provider(provider).keys.counts()
    }

    /// The upstream client (with this thread's pool of idle connections).
    pub fn pool(&self) -> &pool::Pool {
        &self.pool
    }
}

/// Which [`Api`] a method and normalised path (`/v1/...`) of a provider is, if we proxy it.
pub fn classify(provider: Provider, method: &Method, path: &str) -> Option<Api> {
    let is_post = method == Method::POST;
    let is_get = method == Method::GET;
    match provider {
        Provider::OpenAi => match path {
            "/v1/chat/completions" if is_post => Some(Api::OpenAiChat),
            "/v1/completions" if is_post => Some(Api::OpenAiCompletions),
            "/v1/embeddings" if is_post => Some(Api::OpenAiEmbeddings),
            "/v1/images/generations" if is_post => Some(Api::OpenAiImages),
            "/v1/models" if is_get => Some(Api::OpenAiOther),
            p if is_get && is_model_id_path(p) => Some(Api::OpenAiOther),
            _ => None,
        },
        Provider::Azure => match path {
            "/v1/chat/completions" if is_post => Some(Api::OpenAiChat),
            "/v1/images/generations" if is_post => Some(Api::OpenAiImages),
            _ => None,
        },
        Provider::MistralAi => match path {
            "/v1/chat/completions" if is_post => Some(Api::OpenAiChat),
            "/v1/models" if is_get => Some(Api::OpenAiOther),
            _ => None,
        },
        Provider::Anthropic => match path {
            "/v1/messages" if is_post => Some(Api::AnthropicMessages),
            "/v1/messages/count_tokens" if is_post => Some(Api::AnthropicOther),
            "/v1/models" if is_get => Some(Api::AnthropicOther),
            p if is_get && is_model_id_path(p) => Some(Api::AnthropicOther),
            _ => None,
        },
        // The clouds have routes of their own (`cloud_routes`), not the generic aliases.
        Provider::Aws | Provider::AwsMistral | Provider::Gcp => None,
        // Gemini paths carry the model and method; its routes parse them (`google_ai_*`).
        Provider::GoogleAi => None,
    }
}

/// `/v1/models/{id}` with a single non-empty segment.
fn is_model_id_path(path: &str) -> bool {
    path.strip_prefix("/v1/models/")
        .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// A proxied route at a fixed path (no path parameters) for `POST`: where its requests go,
/// built once at startup. [`fixed_routes`] is the one table of them: [`routes`] registers each
/// with the router, and [`FixedRoutes`] lets the server's front (`app::Front`) send their
/// requests straight to the forwarder without the router and its middleware (issue 18).
#[derive(Clone)]
pub struct FixedRoute {
    /// The client's path, which is also the route template (for the auth route table and the
    /// log line).
    pub path: Arc<str>,
    provider: Provider,
    api: Api,
    /// The upstream path; `None`: the client's path.
    upstream_path: Option<Arc<str>>,
    /// OpenAI chat in, Anthropic Messages up (the clouds' and the alias's chat routes).
    translated: bool,
}

impl FixedRoute {
    fn new(path: String, provider: Provider, api: Api, upstream: Option<&str>) -> FixedRoute {
        FixedRoute {
            path: Arc::from(path),
            provider,
            api,
            upstream_path: upstream.map(Arc::from),
            translated: false,
        }
    }

    fn translated(mut self) -> FixedRoute {
        self.translated = true;
        self
    }

    /// The forwarder's route for one request (a translation keeps per-request state, so each
    /// request gets its own).
    pub fn route(&self) -> Route {
        Route {
            provider: self.provider,
            api: self.api,
            // The client's path, when the route keeps it, is this route's own.
            upstream_path: Some(self.upstream_path.as_ref().unwrap_or(&self.path).clone()),
            translation: if self.translated {
                Some(Arc::new(
                    crate::providers::translate::adapter::OpenAiChatTo::anthropic(),
                ))
            } else {
                None
            },
        }
    }
}

/// Every proxied `POST` route at a fixed path, under `prefix` (`PROXY_ENDPOINT_ROUTE`) where
/// the original has them there. The clouds' routes are listed with and without `/v1`, as the
/// original accepts both; their upstream path is the client's (the cloud builds its own URL).
pub fn fixed_routes(prefix: &str) -> Vec<FixedRoute> {
    use Api::*;
    use Provider::*;
    let images = Some("/v1/images/generations");
    let chat = Some("/v1/chat/completions");
    let mut table = vec![
        FixedRoute::new("/v1/chat/completions".into(), OpenAi, OpenAiChat, None),
        FixedRoute::new("/v1/completions".into(), OpenAi, OpenAiCompletions, None),
        FixedRoute::new("/v1/embeddings".into(), OpenAi, OpenAiEmbeddings, None),
        FixedRoute::new(
            "/v1/images/generations".into(),
            OpenAi,
            OpenAiImages,
            images,
        ),
        FixedRoute::new("/v1/messages".into(), Anthropic, AnthropicMessages, None),
        FixedRoute::new(
            "/v1/messages/count_tokens".into(),
            Anthropic,
            AnthropicOther,
            None,
        ),
        FixedRoute::new(
            format!("{prefix}/mistral-ai/v1/chat/completions"),
            MistralAi,
            OpenAiChat,
            chat,
        ),
        FixedRoute::new(
            format!("{prefix}/azure/openai/v1/chat/completions"),
            Azure,
            OpenAiChat,
            chat,
        ),
        FixedRoute::new(
            format!("{prefix}/azure/openai/v1/images/generations"),
            Azure,
            OpenAiImages,
            images,
        ),
        FixedRoute::new(
            format!("{prefix}/openai-image/v1/images/generations"),
            OpenAi,
            OpenAiImages,
            images,
        ),
    ];
    for v1 in ["/v1", ""] {
        let cloud = |path: String, provider, api| FixedRoute {
            upstream_path: Some(Arc::from(path.as_str())),
            ..FixedRoute::new(path, provider, api, None)
        };
        table.extend([
            cloud(
                format!("{prefix}/aws/claude{v1}/messages"),
                Aws,
                AnthropicMessages,
            ),
            cloud(
                format!("{prefix}/aws/claude{v1}/chat/completions"),
                Aws,
                AnthropicMessages,
            )
            .translated(),
            cloud(
                format!("{prefix}/aws/mistral{v1}/chat/completions"),
                AwsMistral,
                OpenAiChat,
            ),
            cloud(
                format!("{prefix}/gcp/claude{v1}/messages"),
                Gcp,
                AnthropicMessages,
            ),
            cloud(
                format!("{prefix}/gcp/claude{v1}/chat/completions"),
                Gcp,
                AnthropicMessages,
            )
            .translated(),
        ]);
    }
    table
}

/// [`fixed_routes`] by path, for the server's front: a request whose path and method match
/// goes straight to the forwarder.
///
/// Hashed with foldhash rather than the standard map's SipHash, which cost about 200
/// instructions per request here (callgrind): the table is built once from the configuration
/// and only looked up, so a client's path cannot fill it with colliding keys.
pub struct FixedRoutes(
    std::collections::HashMap<Box<str>, FixedRoute, foldhash::fast::RandomState>,
);

impl FixedRoutes {
    pub fn new(prefix: &str) -> FixedRoutes {
        FixedRoutes(
            fixed_routes(prefix)
                .into_iter()
                .map(|r| (Box::from(&*r.path), r))
                .collect(),
        )
    }

    /// The route of a `POST` to `path`, if it is one of the table.
    pub fn get(&self, method: &Method, path: &str) -> Option<&FixedRoute> {
        if method != Method::POST {
            return None;
        }
        self.0.get(path)
    }
}

/// The proxied routes: `/v1/...` (OpenAI paths to the OpenAI upstream, `/v1/messages...` to
/// Anthropic) and the compatibility aliases `{PROXY_ENDPOINT_ROUTE}/openai/...` and
/// `{PROXY_ENDPOINT_ROUTE}/anthropic/...`, with `/v1` added when the client left it out.
pub fn routes(config: &Config) -> Router<AppState> {
    let prefix = &config.proxy_endpoint_route;
    let mut router = Router::new();
    for fixed in fixed_routes(prefix) {
        let path = fixed.path.clone();
        let handler = move |State(s): State<AppState>, req: Request| async move {
            forward::forward(s, fixed.route(), req).await
        };
        router = router.route(&path, post(handler).fallback(wrong_method));
    }
    router
        .route("/v1/models", get(openai_other).fallback(wrong_method))
        .route("/v1/models/{id}", get(openai_other).fallback(wrong_method))
        .route("/v1/{*rest}", any(unknown_route))
        .route(
            &format!("{prefix}/mistral-ai/v1/models"),
            get(mistral_ai_models).fallback(wrong_method),
        )
        .route(
            &format!("{prefix}/azure/openai/v1/models"),
            get(azure_models).fallback(wrong_method),
        )
        .route(&format!("{prefix}/openai/{{*rest}}"), any(openai_alias))
        .route(
            &format!("{prefix}/anthropic/{{*rest}}"),
            any(anthropic_alias),
        )
        .merge(cloud_model_routes(prefix))
        .merge(google_ai::routes(prefix))
}

/// The clouds' model lists, as the original names them (`/v1` may be left out); their
/// `POST` routes are in [`fixed_routes`].
fn cloud_model_routes(prefix: &str) -> Router<AppState> {
    let mut r = Router::new();
    for v1 in ["/v1", ""] {
        r = r
            .route(
                &format!("{prefix}/aws{v1}/models"),
                get(aws_models).fallback(wrong_method),
            )
            .route(
                &format!("{prefix}/aws/{{vendor}}{v1}/models"),
                get(aws_vendor_models).fallback(wrong_method),
            )
            .route(
                &format!("{prefix}/gcp/claude{v1}/models"),
                get(gcp_models).fallback(wrong_method),
            );
    }
    r
}

async fn aws_models(State(s): State<AppState>) -> Response {
    if s.upstreams.provider(Provider::Aws).keys.is_empty() {
        return axum::Json(serde_json::json!({"object": "list", "data": []})).into_response();
    }
    axum::Json(aws::models(None)).into_response()
}
async fn aws_vendor_models(
    State(s): State<AppState>,
    axum::extract::Path(vendor): axum::extract::Path<String>,
) -> Response {
    if s.upstreams.provider(Provider::Aws).keys.is_empty() {
        return axum::Json(serde_json::json!({"object": "list", "data": []})).into_response();
    }
    let vendor = if vendor == "claude" {
        "anthropic"
    } else {
        vendor.as_str()
    };
    axum::Json(aws::models(Some(vendor))).into_response()
}
async fn gcp_models(State(s): State<AppState>) -> Response {
    if s.upstreams.provider(Provider::Gcp).keys.is_empty() {
        return axum::Json(serde_json::json!({"object": "list", "data": []})).into_response();
    }
    axum::Json(gcp::models()).into_response()
}

/// Another method on a proxied path: a JSON error instead of axum's empty 405.
async fn wrong_method(req: Request) -> Response {
    let path = req.uri().path();
    let allowed = if path.ends_with("/models") || path.starts_with("/v1/models/") {
        "GET"
    } else {
        "POST"
    };
    let mut resp = ProxyError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{} {path} is not supported; use {allowed}.", req.method()),
    )
    .into_response();
    resp.headers_mut().insert(
        axum::http::header::ALLOW,
        axum::http::HeaderValue::from_static(allowed),
    );
    resp
}

/// A `/v1/...` path this proxy does not serve: a JSON 404 instead of an empty one.
async fn unknown_route(req: Request) -> Response {
    ProxyError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "{} {} is not a route of this proxy; see the list of supported routes in docs/proxy.md",
            req.method(),
            req.uri().path()
        ),
    )
    .into_response()
}

async fn openai_other(State(s): State<AppState>, req: Request) -> Response {
    forward::proxy(s, Api::OpenAiOther, None, req).await
}
async fn mistral_ai_models(State(s): State<AppState>, req: Request) -> Response {
    let route = Route::to(Provider::MistralAi, Api::OpenAiOther, "/v1/models");
    forward::forward(s, route, req).await
}
/// The Azure model list: the configured deployments (what clients send as `model`), answered
/// here (Azure's data plane has no list of a resource's deployments).
async fn azure_models(State(s): State<AppState>) -> Response {
    let names = s
        .upstreams
        .provider(Provider::Azure)
        .azure_deployments()
        .map(azure::Deployments::names)
        .unwrap_or_default();
    let data: Vec<serde_json::Value> = names
        .into_iter()
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "azure"}))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}
async fn openai_alias(State(s): State<AppState>, req: Request) -> Response {
    alias(s, Provider::OpenAi, "/openai", req).await
}
async fn anthropic_alias(State(s): State<AppState>, req: Request) -> Response {
    alias(s, Provider::Anthropic, "/anthropic", req).await
}

/// `{PROXY_ENDPOINT_ROUTE}/openai/chat/completions` → `/v1/chat/completions`, and so on.
async fn alias(state: AppState, provider: Provider, segment: &str, req: Request) -> Response {
    let full = req.uri().path();
    let rest = full
        .strip_prefix(state.config.proxy_endpoint_route.as_str())
        .and_then(|p| p.strip_prefix(segment))
        .unwrap_or(full);
    let path = if rest == "/v1" || rest.starts_with("/v1/") {
        rest.to_string()
    } else {
        format!("/v1{rest}")
    };
    // OpenAI-format clients for Claude: OpenAI chat in, Anthropic Messages up, OpenAI back.
    if provider == Provider::Anthropic
        && path == "/v1/chat/completions"
        && req.method() == Method::POST
    {
        let route = forward::Route {
            provider: Provider::Anthropic,
            api: Api::AnthropicMessages,
            upstream_path: Some(Arc::from("/v1/messages")),
            translation: Some(std::sync::Arc::new(
                crate::providers::translate::adapter::OpenAiChatTo::anthropic(),
            )),
        };
        return forward::forward(state, route, req).await;
    }
    match classify(provider, req.method(), &path) {
        Some(api) => forward::proxy(state, api, Some(Arc::from(path)), req).await,
        None => ProxyError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "{} {full} is not a route of this proxy; see the list of supported routes in docs/proxy.md",
                req.method()
            ),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_routes() {
        use Provider::*;
        assert_eq!(
            classify(OpenAi, &Method::POST, "/v1/chat/completions"),
            Some(Api::OpenAiChat)
        );
        assert_eq!(classify(OpenAi, &Method::GET, "/v1/chat/completions"), None);
        assert_eq!(
            classify(OpenAi, &Method::GET, "/v1/models/gpt-4o"),
            Some(Api::OpenAiOther)
        );
        assert_eq!(classify(OpenAi, &Method::GET, "/v1/models/a/b"), None);
        assert_eq!(
            classify(Anthropic, &Method::POST, "/v1/messages"),
            Some(Api::AnthropicMessages)
        );
        assert_eq!(classify(Anthropic, &Method::POST, "/v1/files"), None);
    }
}

//! Configuration: every environment variable (and its `--flag`) parsed once into one typed
//! [`Config`], then validated. Knows nothing of HTTP or of the user store.
//!
//! Names and defaults follow the original `oai-reverse-proxy` where it has them. Each variable
//! is documented in `.env.example`; a new variable must be added there too.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;
use url::Url;

/// A secret string whose `Debug`/`Display` never show the value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; only for comparison or for sending to its intended recipient.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// `LOG_FORMAT`: how log lines are written (see `logging`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event: time, level, target, message, fields.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's fields.
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum GatekeeperMode {
    /// Everyone may use the proxy.
    None,
    /// Only holders of `PROXY_KEY` may use the proxy.
    ProxyKey,
    /// Each user has a personal token managed through `/admin/users`.
    UserToken,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum StoreKind {
    /// Users live in memory and are lost on restart.
    Memory,
    /// Users are persisted to a Firebase Realtime Database.
    FirebaseRtdb,
    /// Users are persisted to a local SQLite file.
    Sqlite,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum CaptchaMode {
    /// No self-service tokens.
    None,
    /// Visitors earn temporary tokens by solving an Argon2id proof of work at /user/captcha.
    ProofOfWork,
}

/// Command-line flags; each one can also be set by the environment variable of the same name.
#[derive(Parser, Debug, Clone)]
#[command(name = "llm-gatekeeper", version, about)]
pub struct Cli {
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 7860)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// Who may use the proxy: none | proxy_key | user_token.
    #[arg(long, env = "GATEKEEPER", value_enum, default_value = "none")]
    pub gatekeeper: GatekeeperMode,
    /// The shared password for GATEKEEPER=proxy_key.
    #[arg(long, env = "PROXY_KEY", hide_env_values = true)]
    pub proxy_key: Option<Secret>,
    /// The administrator's key for /admin (and a pass for the proxy in every mode).
    #[arg(long, env = "ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<Secret>,
    /// Comma-separated OpenAI (or OpenAI-compatible) upstream keys.
    #[arg(long, env = "OPENAI_KEY", hide_env_values = true)]
    pub openai_key: Option<Secret>,
    /// Comma-separated Anthropic upstream keys.
    #[arg(long, env = "ANTHROPIC_KEY", hide_env_values = true)]
    pub anthropic_key: Option<Secret>,
    /// Base URL of the OpenAI-style upstream.
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        default_value = "https://api.openai.com"
    )]
    pub openai_base_url: Url,
    /// Base URL of the Anthropic-style upstream.
    #[arg(
        long,
        env = "ANTHROPIC_BASE_URL",
        default_value = "https://api.anthropic.com"
    )]
    pub anthropic_base_url: Url,
    /// AWS Bedrock credentials: comma-separated accessKeyId:secretAccessKey:region.
    #[arg(long, env = "AWS_CREDENTIALS", hide_env_values = true)]
    pub aws_credentials: Option<Secret>,
    /// Base URL of the Bedrock runtime; {region} is replaced by each credential's region.
    #[arg(
        long,
        env = "AWS_BEDROCK_BASE_URL",
        default_value = crate::providers::aws::DEFAULT_BASE_URL
    )]
    pub aws_bedrock_base_url: String,
    /// GCP Vertex AI credentials: comma-separated projectId:clientEmail:region:privateKey.
    #[arg(long, env = "GCP_CREDENTIALS", hide_env_values = true)]
    pub gcp_credentials: Option<Secret>,
    /// Base URL of Vertex AI; {region} is replaced by each credential's region.
    #[arg(
        long,
        env = "GCP_VERTEX_BASE_URL",
        default_value = crate::providers::gcp::DEFAULT_BASE_URL
    )]
    pub gcp_vertex_base_url: String,
    /// The OAuth token endpoint for GCP service accounts.
    #[arg(
        long,
        env = "GCP_TOKEN_URL",
        default_value = crate::providers::gcp::DEFAULT_TOKEN_URL
    )]
    pub gcp_token_url: String,
    /// Comma-separated Google AI (Gemini API) keys.
    #[arg(long, env = "GOOGLE_AI_KEY", hide_env_values = true)]
    pub google_ai_key: Option<Secret>,
    /// Base URL of the Google AI (Gemini API) upstream.
    #[arg(
        long,
        env = "GOOGLE_AI_BASE_URL",
        default_value = "https://generativelanguage.googleapis.com"
    )]
    pub google_ai_base_url: Url,
    /// Comma-separated Mistral AI upstream keys.
    #[arg(long, env = "MISTRAL_AI_KEY", hide_env_values = true)]
    pub mistral_ai_key: Option<Secret>,
    /// Base URL of Mistral AI.
    #[arg(
        long,
        env = "MISTRAL_AI_BASE_URL",
        default_value = "https://api.mistral.ai"
    )]
    pub mistral_ai_base_url: Url,
    /// Comma-separated Azure OpenAI credentials, each `resource:deployment:apikey`.
    #[arg(long, env = "AZURE_CREDENTIALS", hide_env_values = true)]
    pub azure_credentials: Option<Secret>,
    /// Base URL of Azure OpenAI; `{resource}` is replaced by each credential's resource.
    #[arg(
        long,
        env = "AZURE_BASE_URL",
        default_value = crate::providers::azure::DEFAULT_BASE_URL
    )]
    pub azure_base_url: String,
    /// The `api-version` of Azure OpenAI requests.
    #[arg(
        long,
        env = "AZURE_API_VERSION",
        default_value = crate::providers::azure::DEFAULT_API_VERSION
    )]
    pub azure_api_version: String,
    /// Prefix of the compatibility routes ({route}/openai/..., {route}/anthropic/...).
    #[arg(long, env = "PROXY_ENDPOINT_ROUTE", default_value = "/proxy")]
    pub proxy_endpoint_route: String,
    /// How many reverse proxies in front of us append to X-Forwarded-For (0 = ignore the header).
    /// Unset: 0, or 1 on Huggingface Spaces (`SPACE_ID` set), whose proxy is always in front;
    /// read the effective value with [`Config::trusted_proxies`].
    #[arg(long, env = "TRUSTED_PROXIES")]
    pub trusted_proxies: Option<usize>,
    /// Set by Huggingface Spaces; only its presence matters (it makes `TRUSTED_PROXIES` default to 1).
    #[arg(long, env = "SPACE_ID", hide = true)]
    pub space_id: Option<String>,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter directive).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log line format: `text` (for people) or `json` (one JSON object per line, for log
    /// collectors).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Seconds to wait for a TCP/TLS connection to an upstream.
    #[arg(long, env = "UPSTREAM_CONNECT_TIMEOUT_SECS", default_value_t = 10)]
    pub upstream_connect_timeout_secs: u64,
    /// Seconds an upstream request may take in total (streams included).
    #[arg(long, env = "UPSTREAM_TIMEOUT_SECS", default_value_t = 600)]
    pub upstream_timeout_secs: u64,
    /// Largest accepted request body, in megabytes.
    #[arg(long, env = "MAX_REQUEST_BODY_MB", default_value_t = 100)]
    pub max_request_body_mb: u64,
    /// Requests one caller (user token, or address for anonymous and proxy-key callers) may
    /// have in flight; further ones wait their turn in the fair queue. 0 = no limit. Special
    /// users are exempt.
    #[arg(long, env = "USER_CONCURRENCY_LIMIT", default_value_t = 1)]
    pub user_concurrency_limit: u32,
    /// Seconds between SSE comment heartbeats sent to a streaming request while it waits in
    /// the fair queue.
    #[arg(long, env = "HEARTBEAT_INTERVAL_SEC", default_value_t = 5)]
    pub heartbeat_interval_sec: u64,
    /// Seconds a request may wait in the fair queue (for its caller's turn or a free key)
    /// before it is answered 503 with `Retry-After`.
    #[arg(long, env = "QUEUE_TIMEOUT_SECS", default_value_t = 60)]
    pub queue_timeout_secs: u64,
    /// Seconds in-flight requests may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Seconds a client has to send a request's head (method, path, headers); also how long an
    /// idle keep-alive connection is kept waiting for its next request.
    #[arg(long, env = "CLIENT_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub client_header_timeout_secs: u64,
    /// Seconds a request body may pause between two reads before the request is dropped.
    #[arg(long, env = "CLIENT_BODY_TIMEOUT_SECS", default_value_t = 30)]
    pub client_body_timeout_secs: u64,
    /// Concurrent connections per client address (socket peer; 0 = no limit; not applied when
    /// TRUSTED_PROXIES > 0, where the front proxy holds many clients' connections).
    #[arg(long, env = "MAX_CONNECTIONS_PER_IP", default_value_t = 64)]
    pub max_connections_per_ip: usize,
    /// Concurrent client connections in all (0 = derived from the process's open-file limit).
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,
    /// Worker threads serving requests, each with its own runtime and listening socket
    /// (0 = one per CPU the process may use; `TOKIO_WORKER_THREADS` is read when this is unset).
    #[arg(long, env = "WORKERS", default_value_t = 0)]
    pub workers: usize,

    // ----- users (issue 4) -----
    /// Where users are kept: memory | firebase_rtdb | sqlite.
    #[arg(long, env = "GATEKEEPER_STORE", value_enum, default_value = "memory")]
    pub gatekeeper_store: StoreKind,
    /// Hours after a temporary user is disabled before it is deleted.
    #[arg(long, env = "POW_TOKEN_PURGE_HOURS", default_value_t = 48)]
    pub pow_token_purge_hours: u64,
    /// Distinct client addresses one user token may use (0 = unlimited).
    #[arg(long, env = "MAX_IPS_PER_USER", default_value_t = 0)]
    pub max_ips_per_user: u32,
    /// Disable a user who exceeds their address limit instead of refusing the request.
    #[arg(long, env = "MAX_IPS_AUTO_BAN", default_value_t = false, action = clap::ArgAction::Set)]
    pub max_ips_auto_ban: bool,
    /// Comma-separated addresses/CIDRs refused on every route but /health.
    #[arg(long, env = "IP_BLACKLIST", default_value = "")]
    pub ip_blacklist: String,
    /// Comma-separated addresses/CIDRs allowed on /admin.
    #[arg(long, env = "ADMIN_WHITELIST", default_value = "0.0.0.0/0,::/0")]
    pub admin_whitelist: String,
    /// Failed credential attempts per address before it is locked out.
    #[arg(long, env = "BRUTE_FORCE_MAX_FAILED_ATTEMPTS", default_value_t = 5)]
    pub brute_force_max_failed_attempts: u32,
    /// Seconds a failed attempt is remembered (and the lockout lasts).
    #[arg(long, env = "BRUTE_FORCE_TTL_SECONDS", default_value_t = 900)]
    pub brute_force_ttl_seconds: u64,

    // ----- quotas (issue 5) -----
    /// When quotas refresh: hourly | daily | a 5- or 6-field cron expression (empty = never).
    #[arg(long, env = "QUOTA_REFRESH_PERIOD", default_value = "")]
    pub quota_refresh_period: String,
    /// Prompts per minute per user (or per address without a user); 0 disables.
    #[arg(long, env = "TEXT_MODEL_RATE_LIMIT", default_value_t = 4)]
    pub text_model_rate_limit: u32,

    // ----- persistence (issue 6) -----
    /// Firebase Realtime Database URL (GATEKEEPER_STORE=firebase_rtdb).
    #[arg(long, env = "FIREBASE_RTDB_URL")]
    pub firebase_rtdb_url: Option<Url>,
    /// Base64-encoded Firebase service-account JSON.
    #[arg(long, env = "FIREBASE_KEY", hide_env_values = true)]
    pub firebase_key: Option<Secret>,
    /// Name of the RTDB node that holds users.
    #[arg(long, env = "FIREBASE_USERS_REF_NAME", default_value = "users")]
    pub firebase_users_ref_name: String,
    /// host:port of a Firebase RTDB emulator (plain HTTP, no OAuth).
    #[arg(long, env = "FIREBASE_DATABASE_EMULATOR_HOST")]
    pub firebase_database_emulator_host: Option<String>,
    /// Seconds between flushes of changed users to the persistent store.
    #[arg(long, env = "GATEKEEPER_STORE_FLUSH_SECS", default_value_t = 20)]
    pub gatekeeper_store_flush_secs: u64,
    /// SQLite file for GATEKEEPER_STORE=sqlite.
    #[arg(long, env = "SQLITE_PATH", default_value = "data/users.sqlite")]
    pub sqlite_path: PathBuf,

    // ----- web (issue 7) -----
    /// Key that signs admin session cookies (random per start when unset).
    #[arg(long, env = "SIGNING_KEY", hide_env_values = true)]
    pub signing_key: Option<Secret>,
    /// Send session cookies without the Secure flag (for plain-HTTP setups).
    #[arg(long, env = "USE_INSECURE_COOKIES", default_value_t = false, action = clap::ArgAction::Set)]
    pub use_insecure_cookies: bool,
    /// URL of an external session service that may also admit admins.
    #[arg(long, env = "ADMIN_SESSION_VALIDATE_URL")]
    pub admin_session_validate_url: Option<Url>,
    /// Whether users may change their nickname at /user.
    #[arg(long, env = "ALLOW_NICKNAME_CHANGES", default_value_t = true, action = clap::ArgAction::Set)]
    pub allow_nickname_changes: bool,
    /// Serve a bare 200 at / instead of the service info page.
    #[arg(long, env = "STATIC_SERVICE_INFO", default_value_t = false, action = clap::ArgAction::Set)]
    pub static_service_info: bool,

    // ----- keys, queue, metrics (issue 16) -----
    /// Probe upstream keys at startup and periodically (their state, families, trial, tier).
    #[arg(long, env = "CHECK_KEYS", default_value_t = true, action = clap::ArgAction::Set)]
    pub check_keys: bool,
    /// Seconds between two checks of the same OpenAI key (0: check at startup only).
    #[arg(long, env = "OPENAI_KEY_CHECK_PERIOD_SECS", default_value_t = 3600)]
    pub openai_key_check_period_secs: u64,
    /// Seconds between two checks of the same Anthropic key (0: check at startup only).
    #[arg(long, env = "ANTHROPIC_KEY_CHECK_PERIOD_SECS", default_value_t = 21600)]
    pub anthropic_key_check_period_secs: u64,
    /// Seconds between two checks of the same Google AI key (0: check at startup only).
    #[arg(long, env = "GOOGLE_AI_KEY_CHECK_PERIOD_SECS", default_value_t = 21600)]
    pub google_ai_key_check_period_secs: u64,
    /// Seconds between two checks of the same Mistral AI key (0: check at startup only).
    #[arg(long, env = "MISTRAL_AI_KEY_CHECK_PERIOD_SECS", default_value_t = 3600)]
    pub mistral_ai_key_check_period_secs: u64,
    /// Seconds between two checks of the same Azure deployment (0: check at startup only).
    #[arg(long, env = "AZURE_KEY_CHECK_PERIOD_SECS", default_value_t = 3600)]
    pub azure_key_check_period_secs: u64,
    /// Least milliseconds between any two key checks of one provider (no burst at startup).
    #[arg(long, env = "KEY_CHECK_INTERVAL_MS", default_value_t = 3000)]
    pub key_check_interval_ms: u64,
    /// Seconds between two checks of the same AWS credential (0: check at startup only).
    #[arg(long, env = "AWS_KEY_CHECK_PERIOD_SECS", default_value_t = 5400)]
    pub aws_key_check_period_secs: u64,
    /// Seconds between two checks of the same GCP credential (0: check at startup only).
    #[arg(long, env = "GCP_KEY_CHECK_PERIOD_SECS", default_value_t = 5400)]
    pub gcp_key_check_period_secs: u64,
    /// Use AWS credentials whose account logs prompts (Bedrock model invocation logging).
    #[arg(long, env = "ALLOW_AWS_LOGGING", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_aws_logging: bool,
    /// AWS STS endpoint for the key checker's GetCallerIdentity; {region} is replaced.
    #[arg(
        long,
        env = "AWS_STS_BASE_URL",
        default_value = crate::providers::aws_check::DEFAULT_STS_BASE_URL
    )]
    pub aws_sts_base_url: String,
    /// Bedrock's control plane (the logging configuration); {region} is replaced.
    #[arg(
        long,
        env = "AWS_BEDROCK_CONTROL_BASE_URL",
        default_value = crate::providers::aws_check::DEFAULT_CONTROL_BASE_URL
    )]
    pub aws_bedrock_control_base_url: String,

    // ----- proof-of-work tokens (issue 17) -----
    /// Self-service temporary tokens: none | proof_of_work (needs GATEKEEPER=user_token).
    #[arg(long, env = "CAPTCHA_MODE", value_enum, default_value = "none")]
    pub captcha_mode: CaptchaMode,
    /// Hours a proof-of-work token is valid (and a refresh extends it).
    #[arg(long, env = "POW_TOKEN_HOURS", default_value_t = 24)]
    pub pow_token_hours: u64,
    /// Addresses one proof-of-work token may use.
    #[arg(long, env = "POW_TOKEN_MAX_IPS", default_value_t = 2)]
    pub pow_token_max_ips: u32,
    /// Expected hashes per solution: low | medium | high | extreme | a positive number.
    #[arg(long, env = "POW_DIFFICULTY_LEVEL", default_value = "low")]
    pub pow_difficulty_level: String,
    /// Minutes a challenge may take to solve.
    #[arg(long, env = "POW_CHALLENGE_TIMEOUT", default_value_t = 30)]
    pub pow_challenge_timeout: u64,
    /// Argon2id passes per hash of a challenge.
    #[arg(long, env = "ARGON2_TIME_COST", default_value_t = 8)]
    pub argon2_time_cost: u32,
    /// Argon2id memory per hash, in KiB.
    #[arg(long, env = "ARGON2_MEMORY_KB", default_value_t = 65536)]
    pub argon2_memory_kb: u32,
    /// Argon2id lanes.
    #[arg(long, env = "ARGON2_PARALLELISM", default_value_t = 1)]
    pub argon2_parallelism: u32,
    /// Argon2id hash length in bytes.
    #[arg(long, env = "ARGON2_HASH_LENGTH", default_value_t = 32)]
    pub argon2_hash_length: usize,

    // ----- info page (issue 17) -----
    /// The name shown on the public pages.
    #[arg(long, env = "SERVER_TITLE")]
    pub server_title: Option<String>,
    /// Password that unlocks the service info page (unset: the page is public).
    #[arg(long, env = "SERVICE_INFO_PASSWORD", hide_env_values = true)]
    pub service_info_password: Option<Secret>,
    /// Show usage in US$ per model family on / and /user.
    #[arg(long, env = "SHOW_TOKEN_COSTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub show_token_costs: bool,

    // ----- metrics (issue 16) -----
    /// Bearer key for `GET /metrics` (Prometheus); unset: no metrics and no `/metrics` route.
    #[arg(long, env = "METRICS_KEY", hide_env_values = true)]
    pub metrics_key: Option<Secret>,
}

/// The shortest `METRICS_KEY` accepted: the key guards an endpoint reachable from the network.
pub const MIN_METRICS_KEY_CHARS: usize = 16;

/// A configuration problem, phrased for the operator: which variable, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The validated configuration, built once at startup and shared read-only.
#[derive(Debug, Clone)]
pub struct Config {
    pub cli: Cli,
    pub openai_keys: Vec<Secret>,
    pub anthropic_keys: Vec<Secret>,
    /// `AWS_CREDENTIALS`, parsed.
    pub aws_credentials: Vec<crate::providers::aws::AwsCredential>,
    /// `GCP_CREDENTIALS`, parsed.
    pub gcp_credentials: Vec<crate::providers::gcp::GcpCredential>,
    pub google_ai_keys: Vec<Secret>,
    pub mistral_ai_keys: Vec<Secret>,
    /// `AZURE_CREDENTIALS`: the deployment of each key, and the keys, in the same order.
    pub azure_deployments: Vec<crate::providers::azure::Deployment>,
    pub azure_keys: Vec<Secret>,
    pub ip_blacklist: Vec<IpNet>,
    pub admin_whitelist: Vec<IpNet>,
    /// `TOKEN_QUOTA_<FAMILY>` values keyed by family name (lower-case, `_` → `-`).
    pub token_quotas: BTreeMap<String, u64>,
    /// The normalised compatibility prefix: starts with `/`, no trailing `/`.
    pub proxy_endpoint_route: String,
    /// Operator policy (`ALLOWED_MODEL_FAMILIES`, `MAX_*_TOKENS_*`, `REJECT_PHRASES`, …).
    pub policy: crate::policy::Settings,
}

impl Config {
    /// Parses the process's arguments and environment (after loading `.env`, which never
    /// overrides a variable that is already set).
    ///
    /// A variable set to the empty string counts as unset (so a `.env` copied from
    /// `.env.example` works as is). Call this before starting any thread: it edits the
    /// process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let _ = dotenvy::dotenv();
        forget_empty_vars();
        let cli = match Cli::try_parse() {
            Ok(cli) => cli,
            // `--help` and `--version` are not errors: print them and exit 0.
            Err(e)
                if matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                ) =>
            {
                e.exit()
            }
            Err(e) => return Err(ConfigError(describe_clap_error(&e))),
        };
        Config::from_cli(cli, std::env::vars())
    }

    /// Builds a config from flags (tests use this; the process environment is still read by clap
    /// for unset flags) and an explicit list of extra variables (for `TOKEN_QUOTA_*`).
    pub fn from_args<I, T>(
        args: I,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(|e| ConfigError(describe_clap_error(&e)))?;
        Config::from_cli(cli, vars)
    }

    pub fn from_cli(
        cli: Cli,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let split_keys = |s: &Option<Secret>| -> Vec<Secret> {
            s.as_ref()
                .map(|s| {
                    s.expose()
                        .split(',')
                        .map(str::trim)
                        .filter(|k| !k.is_empty())
                        .map(Secret::new)
                        .collect()
                })
                .unwrap_or_default()
        };
        let openai_keys = split_keys(&cli.openai_key);
        let anthropic_keys = split_keys(&cli.anthropic_key);
        let google_ai_keys = split_keys(&cli.google_ai_key);
        let mistral_ai_keys = split_keys(&cli.mistral_ai_key);
        let azure_entries = split_keys(&cli.azure_credentials);
        let (azure_deployments, azure_keys) = crate::providers::azure::parse_credentials(
            &azure_entries.iter().map(Secret::expose).collect::<Vec<_>>(),
        )
        .map_err(ConfigError)?;
        let azure_keys: Vec<Secret> = azure_keys.into_iter().map(Secret::new).collect();
        let azure_sample = cli.azure_base_url.replace("{resource}", "resource");
        match Url::parse(&azure_sample) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Err(ConfigError(format!(
                    "AZURE_BASE_URL={} must be an http:// or https:// URL with a host, where {{resource}} stands for each credential's resource, e.g. https://{{resource}}.openai.azure.com",
                    cli.azure_base_url
                )))
            }
        }
        if cli.azure_api_version.trim().is_empty() {
            return Err(ConfigError(format!(
                "AZURE_API_VERSION must not be empty; use {} (the default) or another api-version of Azure OpenAI",
                crate::providers::azure::DEFAULT_API_VERSION
            )));
        }
        let ip_blacklist = parse_cidr_list("IP_BLACKLIST", &cli.ip_blacklist)?;
        let admin_whitelist = parse_cidr_list("ADMIN_WHITELIST", &cli.admin_whitelist)?;

        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let policy = crate::policy::Settings::from_vars(&vars)?;
        let mut token_quotas = BTreeMap::new();
        for (name, value) in vars {
            if let Some(family) = name.strip_prefix("TOKEN_QUOTA_") {
                let v: u64 = value.trim().parse().map_err(|_| {
                    ConfigError(format!(
                        "{name}={value:?} is not a whole number of tokens; set it to 0 (unlimited) or a positive integer"
                    ))
                })?;
                token_quotas.insert(family.to_ascii_lowercase().replace('_', "-"), v);
            }
        }

        let mut route = cli
            .proxy_endpoint_route
            .trim()
            .trim_end_matches('/')
            .to_string();
        if !route.starts_with('/') {
            route.insert(0, '/');
        }
        if route == "/" || route.is_empty() {
            return Err(ConfigError(
                "PROXY_ENDPOINT_ROUTE must be a path prefix other than \"/\", e.g. /proxy".into(),
            ));
        }

        for (name, url) in [
            ("OPENAI_BASE_URL", &cli.openai_base_url),
            ("ANTHROPIC_BASE_URL", &cli.anthropic_base_url),
            ("GOOGLE_AI_BASE_URL", &cli.google_ai_base_url),
            ("MISTRAL_AI_BASE_URL", &cli.mistral_ai_base_url),
        ] {
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(ConfigError(format!(
                    "{name}={url} must be an http:// or https:// URL with a host, e.g. https://api.openai.com"
                )));
            }
        }

        let aws_credentials = match &cli.aws_credentials {
            Some(raw) => {
                crate::providers::aws::parse_credentials(raw.expose()).map_err(ConfigError)?
            }
            None => Vec::new(),
        };
        let gcp_credentials = match &cli.gcp_credentials {
            Some(raw) => {
                crate::providers::gcp::parse_credentials(raw.expose()).map_err(ConfigError)?
            }
            None => Vec::new(),
        };
        for (name, template, example) in [
            (
                "AWS_BEDROCK_BASE_URL",
                &cli.aws_bedrock_base_url,
                crate::providers::aws::DEFAULT_BASE_URL,
            ),
            (
                "GCP_VERTEX_BASE_URL",
                &cli.gcp_vertex_base_url,
                crate::providers::gcp::DEFAULT_BASE_URL,
            ),
            (
                "GCP_TOKEN_URL",
                &cli.gcp_token_url,
                crate::providers::gcp::DEFAULT_TOKEN_URL,
            ),
            (
                "AWS_STS_BASE_URL",
                &cli.aws_sts_base_url,
                crate::providers::aws_check::DEFAULT_STS_BASE_URL,
            ),
            (
                "AWS_BEDROCK_CONTROL_BASE_URL",
                &cli.aws_bedrock_control_base_url,
                crate::providers::aws_check::DEFAULT_CONTROL_BASE_URL,
            ),
        ] {
            let url = Url::parse(&template.replace("{region}", "us-east-1"));
            if !url.is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()) {
                return Err(ConfigError(format!(
                    "{name}={template} must be an http:// or https:// URL with a host ({{region}} is replaced by the credential's region), e.g. {example}"
                )));
            }
        }

        match cli.gatekeeper {
            GatekeeperMode::ProxyKey
                if cli.proxy_key.as_ref().is_none_or(|k| k.expose().is_empty()) =>
            {
                return Err(ConfigError(
                    "GATEKEEPER=proxy_key needs PROXY_KEY: set PROXY_KEY to the shared password clients must send".into(),
                ));
            }
            GatekeeperMode::UserToken
                if cli.admin_key.as_ref().is_none_or(|k| k.expose().is_empty()) =>
            {
                return Err(ConfigError(
                    "GATEKEEPER=user_token needs ADMIN_KEY: set ADMIN_KEY to a long random secret used to manage users at /admin/users".into(),
                ));
            }
            _ => {}
        }
        for (name, secs) in [
            (
                "UPSTREAM_CONNECT_TIMEOUT_SECS",
                cli.upstream_connect_timeout_secs,
            ),
            ("UPSTREAM_TIMEOUT_SECS", cli.upstream_timeout_secs),
        ] {
            if secs == 0 {
                return Err(ConfigError(format!(
                    "{name} must be at least 1 (seconds); 0 would make every upstream request time out"
                )));
            }
        }
        for (name, secs, why) in [
            (
                "HEARTBEAT_INTERVAL_SEC",
                cli.heartbeat_interval_sec,
                "a waiting stream needs a heartbeat at least every few seconds; the default is 5",
            ),
            (
                "QUEUE_TIMEOUT_SECS",
                cli.queue_timeout_secs,
                "0 would refuse every request that has to wait for a key; the default is 60",
            ),
        ] {
            if secs == 0 || secs > 86_400 {
                return Err(ConfigError(format!(
                    "{name}={secs} must be between 1 and 86400 (seconds): {why}"
                )));
            }
        }
        for (name, secs) in [
            ("CLIENT_HEADER_TIMEOUT_SECS", cli.client_header_timeout_secs),
            ("CLIENT_BODY_TIMEOUT_SECS", cli.client_body_timeout_secs),
        ] {
            if secs == 0 {
                return Err(ConfigError(format!(
                    "{name} must be at least 1 (seconds); without it a slow client could hold a connection forever"
                )));
            }
        }
        if cli.captcha_mode == CaptchaMode::ProofOfWork {
            if cli.gatekeeper != GatekeeperMode::UserToken {
                return Err(ConfigError(
                    "CAPTCHA_MODE=proof_of_work needs GATEKEEPER=user_token (the proof of work earns a user token)".into(),
                ));
            }
            if crate::pow::Difficulty::parse(&cli.pow_difficulty_level).is_none() {
                return Err(ConfigError(format!(
                    "POW_DIFFICULTY_LEVEL={:?} is invalid: use low, medium, high, extreme or a positive whole number of hashes",
                    cli.pow_difficulty_level
                )));
            }
            if cli.pow_token_hours == 0 || cli.pow_challenge_timeout == 0 {
                return Err(ConfigError(
                    "POW_TOKEN_HOURS and POW_CHALLENGE_TIMEOUT must be at least 1".into(),
                ));
            }
        }
        if cli.max_request_body_mb == 0 {
            return Err(ConfigError("MAX_REQUEST_BODY_MB must be at least 1".into()));
        }
        if cli.gatekeeper_store_flush_secs == 0 {
            return Err(ConfigError(
                "GATEKEEPER_STORE_FLUSH_SECS must be at least 1".into(),
            ));
        }
        if let Some(key) = &cli.metrics_key {
            let len = key.expose().chars().count();
            if len < MIN_METRICS_KEY_CHARS {
                return Err(ConfigError(format!(
                    "METRICS_KEY is {len} characters long; use a random secret of at least {MIN_METRICS_KEY_CHARS} characters (e.g. `openssl rand -hex 24`), or leave METRICS_KEY unset to turn /metrics off"
                )));
            }
        }

        Ok(Config {
            openai_keys,
            anthropic_keys,
            aws_credentials,
            gcp_credentials,
            google_ai_keys,
            mistral_ai_keys,
            azure_deployments,
            azure_keys,
            ip_blacklist,
            admin_whitelist,
            token_quotas,
            proxy_endpoint_route: route,
            policy,
            cli,
        })
    }

    pub fn upstream_connect_timeout(&self) -> Duration {
        Duration::from_secs(self.cli.upstream_connect_timeout_secs)
    }
    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_secs(self.cli.upstream_timeout_secs)
    }
    pub fn max_request_body_bytes(&self) -> usize {
        usize::try_from(self.cli.max_request_body_mb.saturating_mul(1024 * 1024))
            .unwrap_or(usize::MAX)
    }
    /// The effective `TRUSTED_PROXIES`: as set, else 1 on Huggingface Spaces (`SPACE_ID`), else
    /// 0, so that a server reached directly cannot be fooled by a forged `X-Forwarded-For`.
    pub fn trusted_proxies(&self) -> usize {
        self.cli
            .trusted_proxies
            .unwrap_or(if self.cli.space_id.is_some() { 1 } else { 0 })
    }
    /// `WORKERS`, or `TOKIO_WORKER_THREADS` (what the runtime read before issue 18), or one
    /// per CPU the process may use (its affinity mask and CPU quota, as
    /// `std::thread::available_parallelism` reads them).
    pub fn workers(&self) -> usize {
        if self.cli.workers > 0 {
            return self.cli.workers;
        }
        if let Some(n) = std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
        {
            return n;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.cli.shutdown_grace_secs)
    }
    pub fn mode(&self) -> GatekeeperMode {
        self.cli.gatekeeper
    }
    /// `ADMIN_KEY`, when it is set to something (an empty value configures no key).
    pub fn admin_key(&self) -> Option<&str> {
        non_empty(&self.cli.admin_key)
    }
    /// `PROXY_KEY`, when it is set to something.
    pub fn proxy_key(&self) -> Option<&str> {
        non_empty(&self.cli.proxy_key)
    }
    /// `METRICS_KEY`, when it is set (then `/metrics` exists).
    pub fn metrics_key(&self) -> Option<&str> {
        non_empty(&self.cli.metrics_key)
    }
}

fn non_empty(secret: &Option<Secret>) -> Option<&str> {
    secret
        .as_ref()
        .map(Secret::expose)
        .filter(|k| !k.is_empty())
}

/// Removes our variables that are set to the empty string, so that clap uses their defaults.
fn forget_empty_vars() {
    use clap::CommandFactory;
    let cmd = Cli::command();
    for arg in cmd.get_arguments() {
        if let Some(name) = arg.get_env() {
            if std::env::var_os(name).is_some_and(|v| v.is_empty()) {
                // Safe here: called from `main` before the runtime starts any thread.
                std::env::remove_var(name);
            }
        }
    }
}

/// Turns clap's multi-line message into one line that names the environment variable, the
/// rejected value and why (e.g. `PORT="abc" is invalid: invalid digit found in string`).
fn describe_clap_error(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    use clap::CommandFactory;
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    if let (Some(arg), Some(value)) = (
        context(ContextKind::InvalidArg),
        context(ContextKind::InvalidValue),
    ) {
        // `arg` reads like "--port <PORT>": find that flag's environment variable.
        let long = arg
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_start_matches('-');
        let var = Cli::command()
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env().map(|v| v.to_string_lossy().into_owned()))
            .unwrap_or_else(|| arg.clone());
        let mut msg = format!("{var}={value:?} is invalid");
        if let Some(cause) = std::error::Error::source(e) {
            msg.push_str(&format!(": {cause}"));
        }
        if let Some(ContextValue::Strings(valid)) = e.get(ContextKind::ValidValue) {
            msg.push_str(&format!("; use one of: {}", valid.join(", ")));
        }
        msg.push_str(&format!(" (set by {var} or --{long})"));
        return msg;
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").to_string()
}

/// Parses a comma-separated list of addresses or CIDR blocks. A bare address becomes a /32
/// (or /128). Any unparseable entry is an error naming the variable: silently skipping it (as
/// the original did) could leave the admin API open.
pub fn parse_cidr_list(var: &str, s: &str) -> Result<Vec<IpNet>, ConfigError> {
    let mut out = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let net = if let Ok(net) = entry.parse::<IpNet>() {
            net
        } else if let Ok(ip) = entry.parse::<IpAddr>() {
            IpNet::from(ip)
        } else {
            return Err(ConfigError(format!(
                "{var}: {entry:?} is not an IP address or CIDR block (e.g. 10.0.0.0/8, 2001:db8::/32, 127.0.0.1)"
            )));
        };
        out.push(net.trunc());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["llm-gatekeeper"];
        v.extend_from_slice(args);
        Config::from_args(v, Vec::<(String, String)>::new())
    }

    #[test]
    fn defaults_are_the_originals() {
        let c = cfg(&[]).expect("defaults parse");
        assert_eq!(c.cli.port, 7860);
        assert_eq!(c.mode(), GatekeeperMode::None);
        assert_eq!(c.proxy_endpoint_route, "/proxy");
        assert_eq!(
            c.trusted_proxies(),
            0,
            "X-Forwarded-For is ignored unless asked for"
        );
    }

    #[test]
    fn trusted_proxies_defaults_to_one_on_huggingface_spaces() {
        assert_eq!(
            cfg(&["--space-id", "me/proxy"])
                .expect("parses")
                .trusted_proxies(),
            1
        );
        let c = cfg(&["--space-id", "me/proxy", "--trusted-proxies", "0"]).expect("parses");
        assert_eq!(c.trusted_proxies(), 0, "an explicit value wins");
        assert_eq!(
            cfg(&["--trusted-proxies", "2"])
                .expect("parses")
                .trusted_proxies(),
            2
        );
    }

    #[test]
    fn invalid_values_name_the_variable_on_one_line() {
        let e = cfg(&["--port", "abc"]).expect_err("must fail");
        assert!(e.0.starts_with("PORT=\"abc\" is invalid"), "{}", e.0);
        assert!(!e.0.contains('\n'));
        let e = cfg(&["--gatekeeper", "bogus"]).expect_err("must fail");
        assert!(e.0.contains("GATEKEEPER=\"bogus\""), "{}", e.0);
        assert!(e.0.contains("proxy_key"), "{}", e.0);
        let e = cfg(&["--openai-base-url", "not a url"]).expect_err("must fail");
        assert!(e.0.starts_with("OPENAI_BASE_URL="), "{}", e.0);
    }

    #[test]
    fn fair_queue_settings_are_checked() {
        let c = cfg(&[]).expect("defaults parse");
        assert_eq!(
            (
                c.cli.user_concurrency_limit,
                c.cli.heartbeat_interval_sec,
                c.cli.queue_timeout_secs
            ),
            (1, 5, 60),
            "the original's defaults"
        );
        for (flag, var) in [
            ("--heartbeat-interval-sec", "HEARTBEAT_INTERVAL_SEC"),
            ("--queue-timeout-secs", "QUEUE_TIMEOUT_SECS"),
        ] {
            let e = cfg(&[flag, "0"]).expect_err("must fail");
            assert!(e.0.starts_with(&format!("{var}=0 must be")), "{}", e.0);
        }
        let e = cfg(&["--user-concurrency-limit=-1"]).expect_err("must fail");
        assert!(e.0.contains("USER_CONCURRENCY_LIMIT"), "{}", e.0);
        assert!(
            cfg(&["--user-concurrency-limit", "0"]).is_ok(),
            "0 = no limit"
        );
    }

    #[test]
    fn proxy_key_mode_needs_proxy_key() {
        let e = cfg(&["--gatekeeper", "proxy_key"]).expect_err("must fail");
        assert!(e.0.contains("PROXY_KEY"));
    }

    #[test]
    fn bad_cidr_names_variable_and_entry() {
        let e = cfg(&["--admin-whitelist", "10.0.0.0/8,nonsense"]).expect_err("must fail");
        assert!(e.0.contains("ADMIN_WHITELIST") && e.0.contains("nonsense"));
    }

    #[test]
    fn token_quotas_are_read_from_vars() {
        let c = Config::from_args(
            ["llm-gatekeeper"],
            vec![("TOKEN_QUOTA_GPT4_32K".to_string(), "100".to_string())],
        )
        .expect("parses");
        assert_eq!(c.token_quotas.get("gpt4-32k"), Some(&100));
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let c = cfg(&["--proxy-key", "hunter2", "--gatekeeper", "proxy_key"]).expect("parses");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}

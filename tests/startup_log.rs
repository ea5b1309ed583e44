//! The real binary's startup lines, as an operator reads them: which store and where (the
//! SQLite path resolved), which providers have keys (a warning for one without), the effective
//! `TRUSTED_PROXIES`, and the `SIGNING_KEY` warning only when someone can sign in to `/admin`.

mod common;

use common::binary::RunningBinary;

/// Starts the binary with `vars`, stops it with SIGTERM and returns what it logged.
fn startup_log(dir: &std::path::Path, vars: &[(&str, &str)]) -> String {
    let server = RunningBinary::start(dir, vars);
    server.sigterm();
    let (status, log) = server.wait();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    log
}

/// The one log line that contains `text`, asserting it exists and has `level`.
fn line<'a>(log: &'a str, level: &str, text: &str) -> &'a str {
    let found: Vec<&str> = log.lines().filter(|l| l.contains(text)).collect();
    assert_eq!(found.len(), 1, "expected one line with {text:?}:\n{log}");
    assert!(
        found[0].contains(&format!(" {level} ")),
        "not a {level} line: {}",
        found[0]
    );
    found[0]
}

#[test]
fn an_operator_sees_store_providers_trusted_proxies_and_admin_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = startup_log(
        dir.path(),
        &[
            ("GATEKEEPER", "user_token"),
            ("ADMIN_KEY", "admin-XYZZY-value"),
            ("OPENAI_KEY", "sk-first-XYZZY,sk-second-XYZZY"),
            ("GATEKEEPER_STORE", "sqlite"),
            ("SQLITE_PATH", "state/users.sqlite"),
            ("TRUSTED_PROXIES", "2"),
        ],
    );
    let abs = dir
        .path()
        .canonicalize()
        .expect("canonical tempdir")
        .join("state/users.sqlite");
    line(
        &log,
        "INFO",
        &format!("user store: sqlite, file {} (SQLITE_PATH)", abs.display()),
    );
    line(&log, "INFO", "access: GATEKEEPER=user_token");
    line(
        &log,
        "INFO",
        "provider OpenAI: 2 keys (OPENAI_KEY), upstream https://api.openai.com/",
    );
    let anthropic = line(
        &log,
        "WARN",
        "provider Anthropic: no key (ANTHROPIC_KEY is not set)",
    );
    assert!(anthropic.contains("/v1/messages"), "{anthropic}");
    assert!(anthropic.contains("set ANTHROPIC_KEY"), "{anthropic}");
    let others = line(&log, "WARN", "providers without keys");
    for var in [
        "GOOGLE_AI_KEY",
        "MISTRAL_AI_KEY",
        "AZURE_CREDENTIALS",
        "AWS_CREDENTIALS",
        "GCP_CREDENTIALS",
    ] {
        assert!(others.contains(var), "{others}");
    }
    line(
        &log,
        "INFO",
        "client addresses: entry 2 from the right of X-Forwarded-For (TRUSTED_PROXIES=2)",
    );
    line(&log, "WARN", "SIGNING_KEY is not set");
    assert!(!log.contains("GATEKEEPER=none on a non-loopback"), "{log}");
    assert!(!log.contains("XYZZY"), "a secret was logged:\n{log}");
    // The summary comes before the server reports it is listening.
    let listening = log.find("listening on http://").expect("listening line");
    assert!(log.find("user store:").expect("store line") < listening);
}

#[test]
fn without_admin_sign_in_there_is_no_signing_key_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = startup_log(
        dir.path(),
        &[("ANTHROPIC_KEY", "sk-ant-one"), ("TRUSTED_PROXIES", "0")],
    );
    line(&log, "INFO", "user store: memory (GATEKEEPER_STORE=memory)");
    line(&log, "INFO", "provider Anthropic: 1 key (ANTHROPIC_KEY)");
    line(
        &log,
        "WARN",
        "provider OpenAI: no key (OPENAI_KEY is not set)",
    );
    line(
        &log,
        "INFO",
        "client addresses: the TCP peer; X-Forwarded-For is ignored (TRUSTED_PROXIES=0)",
    );
    assert!(!log.contains("SIGNING_KEY"), "{log}");
    // GATEKEEPER=none on 127.0.0.1 (the harness binds loopback): no warning. The warning for a
    // public address is a unit test in `app`, since tests only listen on loopback.
    assert!(!log.contains("non-loopback"), "{log}");
}

//! End-to-end in headless Chromium (Debian's `chromium` + `chromium-driver`, through WebDriver
//! with fantoccini, as `tests/browser_admin.rs`): a visitor opens `/user/captcha`
//! (`CAPTCHA_MODE=proof_of_work`, difficulty `low`), the page's script solves the Argon2id
//! challenge with the hash-wasm build the proxy serves, and shows a temporary token; the
//! OpenAI SDK (`async-openai`) then uses that token against the fake upstream. A screenshot is
//! saved in `test-artifacts/`.
//!
//! Argon2's costs are lowered (`ARGON2_TIME_COST=2`, `ARGON2_MEMORY_KB=256`) so the 200-odd
//! hashes of `low` take seconds; the algorithm and the protocol are the production ones.
//! Without Chromium or chromedriver the test is skipped with a note, unless `CI` is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use common::upstream::FakeUpstream;
use fantoccini::{Client, ClientBuilder, Locator};
use llm_gatekeeper::users::UserType;
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";

fn chromedriver() -> Option<PathBuf> {
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Kills chromedriver (and with it Chromium) when the test ends, even on panic.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_driver(path: &Path) -> (Driver, String) {
    let port = common::child_port();
    let child = Command::new(path)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver(child);
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if let Ok(r) = http.get(format!("{url}/status")).send().await {
            if r.status().is_success() {
                return (driver, url);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not start on port {port}");
}

async fn connect(driver_url: &str, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-dev-shm-usage", "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::rustls()
        .expect("TLS connector")
        .capabilities(caps)
        .connect(driver_url)
        .await
        .expect("a Chromium session")
}

async fn shot(c: &Client, name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create test-artifacts/");
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn a_browser_solves_the_captcha_and_the_token_works_with_the_openai_sdk() {
    let Some(driver_path) = chromedriver().filter(|_| Path::new(CHROMIUM).exists()) else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "CI is set but Chromium is missing: apt-get install -y chromium chromium-driver"
            );
        }
        eprintln!("note: skipping the browser test: install Chromium with `apt-get install -y chromium chromium-driver`");
        return;
    };
    let fake = FakeUpstream::start().await;
    let app = common::spawn(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            "browser-captcha-admin-key",
            "--trusted-proxies",
            "0",
            "--openai-key",
            "sk-operator-openai",
            "--openai-base-url",
            &fake.url,
            "--captcha-mode",
            "proof_of_work",
            "--pow-difficulty-level",
            "low",
            "--argon2-time-cost",
            "2",
            "--argon2-memory-kb",
            "256",
        ],
        &[("TOKEN_QUOTA_TURBO", "100000")],
    )
    .await;
    let (_driver, driver_url) = start_driver(&driver_path).await;
    let profile = tempfile::tempdir().expect("profile dir");
    let c = connect(&driver_url, profile.path()).await;

    let outcome = async {
        c.goto(&format!("{}/user/captcha", app.url))
            .await
            .map_err(|e| e.to_string())?;
        let intro = text_of(&c, "main").await;
        if !intro.contains("low") {
            return Err(format!("the page names the difficulty: {intro}"));
        }
        c.find(Locator::Css("#start"))
            .await
            .map_err(|e| e.to_string())?
            .click()
            .await
            .map_err(|e| e.to_string())?;
        // Solving is a search of random length: wait for the result (bounded only so that a
        // broken page cannot hang the suite), or for the page to report a failure.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        loop {
            let status = text_of(&c, "#status").await;
            if status.starts_with("Failed") {
                return Err(format!("the page reported: {status}"));
            }
            let shown = c
                .find(Locator::Css("#result"))
                .await
                .map_err(|e| e.to_string())?
                .is_displayed()
                .await
                .unwrap_or(false);
            if shown {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("no token after 300 s; status: {status}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        shot(&c, "captcha-solved").await;
        let token = c
            .find(Locator::Css("#token"))
            .await
            .map_err(|e| e.to_string())?
            .prop("value")
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        Ok::<String, String>(token)
    }
    .await;
    if outcome.is_err() {
        shot(&c, "captcha-failed").await;
    }
    let _ = c.close().await;
    let token = outcome.expect("the browser earned a token");

    let user = app.state.users.get(&token).expect("the token is a user");
    assert_eq!(user.kind, UserType::Temporary);
    assert_eq!(user.max_ips, Some(2));

    let openai = async_openai::Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", app.url))
            .with_api_key(&token),
    );
    let request = CreateChatCompletionRequestArgs::default()
        .model("gpt-4o-mini")
        .max_tokens(50u32)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Say hello")
            .build()
            .expect("message")
            .into()])
        .build()
        .expect("request");
    let answer = openai.chat().create(request).await.expect("completion");
    assert_eq!(
        answer.choices[0].message.content.as_deref(),
        Some("Hello from the fake upstream")
    );
    assert_eq!(
        fake.last_request().credential().as_deref(),
        Some("sk-operator-openai")
    );
}

//! End-to-end in headless Chromium (Debian's `chromium` + `chromium-driver`, driven through
//! WebDriver with fantoccini): an operator signs in, creates, edits, disables and re-enables a
//! user, imports and exports users and signs out; a user looks up their quota at `/user`. A
//! PNG screenshot of every page is saved in `test-artifacts/`.
//!
//! Without `/usr/bin/chromium` or `chromedriver` the test is skipped with a note, unless the
//! environment variable `CI` is set, in which case it fails.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::web::ADMIN_KEY;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";

fn chromedriver() -> Option<PathBuf> {
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// One headless Chromium session: the WebDriver client and the [`Cleanup`] guard.
struct Browser {
    client: Client,
    cleanup: Cleanup,
}

/// Everything a browser session leaves behind. Dropping it — when the test passes, fails or
/// panics — closes the WebDriver session, kills chromedriver and every Chromium process it
/// started, and removes the profile and download folders.
struct Cleanup {
    /// chromedriver, started as the leader of a process group of its own: Chromium and its
    /// helper processes inherit the group, so one signal reaches the whole tree.
    driver: Child,
    driver_port: u16,
    /// The WebDriver session to close; `None` before it exists and after [`Browser::close`].
    session: Option<String>,
    profile: Option<tempfile::TempDir>,
    downloads: Option<tempfile::TempDir>,
}

impl Browser {
    async fn start(driver_path: &Path) -> Browser {
        let driver_port = common::child_port();
        let driver = Command::new(driver_path)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        // From here on a panic cleans up too: the guard exists before the session does.
        let mut cleanup = Cleanup {
            driver,
            driver_port,
            session: None,
            profile: Some(
                tempfile::Builder::new()
                    .prefix("browser-admin-profile-")
                    .tempdir()
                    .expect("profile dir"),
            ),
            downloads: Some(tempfile::tempdir().expect("download dir")),
        };
        let url = format!("http://127.0.0.1:{driver_port}");
        wait_for_driver(&url).await;
        let client = connect(&url, cleanup.profile(), cleanup.downloads()).await;
        cleanup.session = client.session_id().await.ok().flatten();
        Browser { client, cleanup }
    }

    fn downloads(&self) -> &Path {
        self.cleanup.downloads()
    }

    /// Closes the session the regular way; dropping [`Cleanup`] removes whatever is left.
    async fn close(mut self) {
        if self.client.clone().close().await.is_ok() {
            self.cleanup.session = None;
        }
    }
}

impl Cleanup {
    fn profile(&self) -> &Path {
        self.profile
            .as_ref()
            .map(|d| d.path())
            .expect("profile dir")
    }

    fn downloads(&self) -> &Path {
        self.downloads
            .as_ref()
            .map(|d| d.path())
            .expect("download dir")
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // 1. Ask chromedriver to end the session: it quits Chromium cleanly. The async client
        //    cannot be awaited in `drop` (and during a panic its runtime may be unwinding), so
        //    this is one plain HTTP request with short timeouts.
        if let Some(id) = self.session.take() {
            delete_session(self.driver_port, &id);
        }
        // 2. Kill the whole process group: chromedriver, Chromium and its helpers.
        let pgid = self.driver.id() as libc::pid_t;
        // SAFETY: kill(2) only sends a signal; a negative pid names the group chromedriver
        // leads, which this test started.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.driver.wait();
        // 3. Chromium processes that left the group (if any) still name our unique profile
        //    folder on their command line: kill those, then wait until none is left.
        let profile = self.profile.as_ref().map(|d| d.path().to_path_buf());
        if let Some(profile) = &profile {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let left = processes_using(profile);
                if left.is_empty() || Instant::now() > deadline {
                    break;
                }
                for pid in left {
                    // SAFETY: as above; `pid` runs with our own profile folder.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // 4. Remove the folders (nothing writes to them any more).
        if let Some(dir) = self.profile.take() {
            let _ = dir.close();
        }
        if let Some(dir) = self.downloads.take() {
            let _ = dir.close();
        }
    }
}

/// `DELETE /session/{id}` to chromedriver. Written by hand because it runs inside `Drop`,
/// where neither the async client nor a blocking reqwest client (not in our features) works.
fn delete_session(port: u16, id: &str) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    ) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let req = format!(
        "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_ok() {
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
    }
}

/// Process ids whose command line mentions `profile`.
fn processes_using(profile: &Path) -> Vec<libc::pid_t> {
    let needle = profile.display().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

async fn wait_for_driver(url: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{url}/status")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not answer on {url} within 20 s");
}

async fn connect(driver_url: &str, profile: &Path, downloads: &Path) -> Client {
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
            "prefs": {
                "download.default_directory": downloads.display().to_string(),
                "download.prompt_for_download": false,
            },
        }),
    );
    ClientBuilder::rustls()
        .expect("TLS connector")
        .capabilities(caps)
        .connect(driver_url)
        .await
        .expect("a Chromium session")
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create test-artifacts/");
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(artifacts().join(format!("{name}.png")), png).expect("write screenshot");
}

async fn body_text(c: &Client) -> String {
    c.find(Locator::Css("body"))
        .await
        .expect("body")
        .text()
        .await
        .expect("text")
}

async fn fill(c: &Client, css: &str, value: &str) {
    let e = c.find(Locator::Css(css)).await.expect(css);
    e.clear().await.expect("clear");
    e.send_keys(value).await.expect("type");
}

/// Waits (at most 10 s) for an element of the next page.
async fn wait(c: &Client, css: &str) -> Result<(), String> {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .map(|_| ())
        .map_err(|e| format!("waiting for {css}: {e}"))
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .expect("click");
}

/// Clicks the button `button_css` that submits a form, then waits (bounded) until the browser
/// has left the current page and the next page, fully loaded, shows `next_css`. Reading the
/// page right after the click could still see the old document, or a node of it that the
/// navigation is removing.
async fn submit(c: &Client, button_css: &str, next_css: &str) -> Result<(), String> {
    let old_root = c
        .find(Locator::Css("html"))
        .await
        .map_err(|e| e.to_string())?;
    click(c, button_css).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    // The old document's root answers until the navigation has replaced it.
    while old_root.tag_name().await.is_ok() {
        if Instant::now() > deadline {
            return Err(format!("clicking {button_css} did not leave the page"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait(c, next_css).await?;
    loop {
        let state = c
            .execute("return document.readyState", vec![])
            .await
            .map_err(|e| e.to_string())?;
        if state == "complete" {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the page after {button_css} did not finish loading"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn operator_and_user_journeys_in_chromium() {
    let Some(driver_path) = chromedriver().filter(|_| Path::new(CHROMIUM).exists()) else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "CI is set but Chromium is missing: apt-get install -y chromium chromium-driver"
            );
        }
        eprintln!("note: skipping the browser test: install Chromium with `apt-get install -y chromium chromium-driver`");
        return;
    };
    let app = common::spawn(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            ADMIN_KEY,
            "--openai-key",
            "sk-test-not-real",
            "--quota-refresh-period",
            "daily",
        ],
        &[
            ("TOKEN_QUOTA_TURBO", "100000"),
            ("TOKEN_QUOTA_CLAUDE", "50000"),
        ],
    )
    .await;
    // `localhost` is a secure context for Chromium, so the `Secure` session cookie is kept.
    let base = app.url.replace("127.0.0.1", "localhost");
    let browser = Browser::start(&driver_path).await;
    let result = journey(&browser.client, &app, &base, browser.downloads()).await;
    browser.close().await;
    result.expect("the browser journey succeeds");
}

async fn journey(
    c: &Client,
    app: &common::TestApp,
    base: &str,
    downloads: &Path,
) -> Result<(), String> {
    // The info page.
    c.goto(&format!("{base}/"))
        .await
        .map_err(|e| e.to_string())?;
    assert!(body_text(c).await.contains("Service info"));
    shot(c, "01-info").await;

    // A browser without a session lands on the sign-in page.
    c.goto(&format!("{base}/admin"))
        .await
        .map_err(|e| e.to_string())?;
    let url = c.current_url().await.map_err(|e| e.to_string())?;
    assert_eq!(url.path(), "/admin/login");
    shot(c, "02-login").await;
    fill(c, "input[name=key]", "not-the-key").await;
    submit(c, "button[type=submit]", ".msg.error").await?;
    let text = body_text(c).await;
    assert!(text.contains("Wrong admin key"), "{text}");
    assert!(!c
        .source()
        .await
        .map_err(|e| e.to_string())?
        .contains("not-the-key"));
    shot(c, "03-login-wrong-key").await;
    fill(c, "input[name=key]", ADMIN_KEY).await;
    submit(c, "button[type=submit]", "table").await?;
    assert!(body_text(c).await.contains("Users"));
    shot(c, "04-users-empty").await;

    // Create a user.
    submit(
        c,
        "main a[href='/admin/manage/users/new']",
        "select[name=type]",
    )
    .await?;
    fill(c, "input[name=nickname]", "browser-user").await;
    fill(c, "input[name='limit.turbo']", "2000").await;
    shot(c, "05-new-user").await;
    submit(
        c,
        "form[action='/admin/manage/users/new'] button[type=submit]",
        "input[name=reason]",
    )
    .await?;
    assert!(body_text(c).await.contains("User created."));
    let url = c.current_url().await.map_err(|e| e.to_string())?;
    let token = url
        .path()
        .trim_start_matches("/admin/manage/users/")
        .to_string();
    let user = app
        .state
        .users
        .get(&token)
        .ok_or("the created user exists")?;
    assert_eq!(user.nickname.as_deref(), Some("browser-user"));
    assert_eq!(user.token_limits.get("turbo"), Some(&2000));
    shot(c, "06-user-created").await;

    // Edit it.
    fill(c, "input[name=nickname]", "renamed-user").await;
    fill(c, "textarea[name=adminNote]", "created by the browser test").await;
    c.find(Locator::Css("select#type"))
        .await
        .map_err(|e| e.to_string())?
        .select_by_value("special")
        .await
        .map_err(|e| e.to_string())?;
    submit(
        c,
        "form.card > .actions button[type=submit]",
        "input[name=reason]",
    )
    .await?;
    assert!(body_text(c).await.contains("Changes saved."));
    let user = app.state.users.get(&token).ok_or("user")?;
    assert_eq!(user.nickname.as_deref(), Some("renamed-user"));
    assert_eq!(user.kind, llm_gatekeeper::users::UserType::Special);
    shot(c, "07-user-edited").await;

    // Disable with a reason, then re-enable.
    fill(c, "input[name=reason]", "testing the disable button").await;
    submit(c, "button.danger", "form[action$='/enable']").await?;
    assert!(body_text(c).await.contains("testing the disable button"));
    assert!(app.state.users.get(&token).ok_or("user")?.is_disabled());
    shot(c, "08-user-disabled").await;
    submit(c, "form[action$='/enable'] button", "input[name=reason]").await?;
    assert!(body_text(c).await.contains("User re-enabled."));
    assert!(!app.state.users.get(&token).ok_or("user")?.is_disabled());

    // Import: preview, then apply.
    let file = tempfile::Builder::new()
        .suffix(".json")
        .tempfile()
        .map_err(|e| e.to_string())?;
    std::fs::write(
        file.path(),
        br#"{"users":[{"token":"imported-1","nickname":"imp one","type":"normal"},{"token":"imported-2","promptCount":3}]}"#,
    )
    .map_err(|e| e.to_string())?;
    c.goto(&format!("{base}/admin/manage/import"))
        .await
        .map_err(|e| e.to_string())?;
    c.find(Locator::Css("input[type=file]"))
        .await
        .map_err(|e| e.to_string())?
        .send_keys(&file.path().display().to_string())
        .await
        .map_err(|e| e.to_string())?;
    shot(c, "09-import").await;
    submit(
        c,
        "form[enctype='multipart/form-data'] button",
        "form[action='/admin/manage/import/apply']",
    )
    .await?;
    let text = body_text(c).await;
    assert!(
        text.contains("New users\n2") || text.contains("New users 2"),
        "{text}"
    );
    assert!(
        !app.state.users.contains("imported-1"),
        "a preview changes nothing"
    );
    shot(c, "10-import-preview").await;
    submit(
        c,
        "form[action='/admin/manage/import/apply'] button",
        ".msg.ok",
    )
    .await?;
    assert!(body_text(c).await.contains("Imported 2 users (2 new)."));
    assert!(app.state.users.contains("imported-1"));
    shot(c, "11-import-applied").await;

    // Export: the download holds every user.
    click(c, "a[href='/admin/manage/export']").await;
    let mut exported = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(rd) = std::fs::read_dir(downloads) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("users-") && name.ends_with(".json") {
                    exported = std::fs::read_to_string(e.path()).ok();
                }
            }
        }
        if exported.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exported = exported.ok_or("the export was downloaded")?;
    let v: serde_json::Value = serde_json::from_str(&exported).map_err(|e| e.to_string())?;
    assert_eq!(v["users"].as_array().map(Vec::len), Some(3));

    // The users list and the anti-abuse page.
    c.goto(&format!("{base}/admin/manage/users"))
        .await
        .map_err(|e| e.to_string())?;
    assert!(body_text(c).await.contains("renamed-user"));
    shot(c, "12-users").await;
    c.goto(&format!("{base}/admin/manage/abuse"))
        .await
        .map_err(|e| e.to_string())?;
    assert!(body_text(c).await.contains("Locked-out addresses"));
    shot(c, "13-anti-abuse").await;

    // Sign out: the pages are closed again.
    submit(c, "header form button", "input[name=key]").await?;
    assert!(body_text(c).await.contains("You are signed out."));
    shot(c, "14-signed-out").await;
    c.goto(&format!("{base}/admin/manage/users"))
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(
        c.current_url().await.map_err(|e| e.to_string())?.path(),
        "/admin/login"
    );

    // A user looks up their quota, on a phone-sized screen.
    app.state.users.update(&token, |u| {
        u.ip = vec!["10.1.2.3".to_string()].into();
        u.token_counts.insert("turbo", 1234);
        u.prompt_count = 5;
    });
    c.set_window_size(390, 844)
        .await
        .map_err(|e| e.to_string())?;
    c.goto(&format!("{base}/user"))
        .await
        .map_err(|e| e.to_string())?;
    shot(c, "15-user-lookup").await;
    fill(c, "input[name=token]", &token).await;
    submit(c, "button[type=submit]", "input[name=nickname]").await?;
    let text = body_text(c).await;
    assert!(text.contains("renamed-user"), "{text}");
    assert!(text.contains("10.1.xxx.xxx"));
    assert!(!text.contains("10.1.2.3"));
    assert!(
        !c.current_url()
            .await
            .map_err(|e| e.to_string())?
            .as_str()
            .contains(&token),
        "the token is never in the URL"
    );
    shot(c, "16-user-quota").await;
    fill(c, "input[name=nickname]", "my own name").await;
    submit(c, "form[action='/user/nickname'] button", ".msg.ok").await?;
    assert_eq!(
        app.state
            .users
            .get(&token)
            .ok_or("user")?
            .nickname
            .as_deref(),
        Some("my own name")
    );
    shot(c, "17-user-nickname-saved").await;
    Ok(())
}

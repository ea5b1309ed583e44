//! Helpers for the web-side tests: a tiny cookie-keeping HTTP "browser" that does not follow
//! redirects (so tests see them), CSRF-token scraping, multipart bodies, and a fake external
//! session service.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

/// A response, read fully.
pub struct Page {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Page {
    pub fn location(&self) -> Option<&str> {
        self.headers.get("location").and_then(|v| v.to_str().ok())
    }
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect()
    }
    /// The first CSRF token in the page's forms.
    pub fn csrf(&self) -> String {
        field_value(&self.body, "_csrf").expect("the page has a form with a CSRF token")
    }
}

/// The `value` of the first `<input name="NAME" value="…">` in `html`.
pub fn field_value(html: &str, name: &str) -> Option<String> {
    let needle = format!("name=\"{name}\" value=\"");
    let start = html.find(&needle)? + needle.len();
    let end = html[start..].find('"')? + start;
    Some(
        html[start..end]
            .replace("&#x2f;", "/")
            .replace("&amp;", "&"),
    )
}

/// A cookie-keeping client for one "browser".
pub struct Browser {
    pub base: String,
    client: reqwest::Client,
    pub cookies: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Browser {
    pub fn new(base: &str) -> Browser {
        Browser {
            base: base.to_string(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            cookies: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    pub fn cookie_header(&self) -> String {
        self.cookies
            .lock()
            .expect("lock")
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn set_cookie(&self, name: &str, value: &str) {
        self.cookies
            .lock()
            .expect("lock")
            .insert(name.to_string(), value.to_string());
    }

    fn remember(&self, headers: &reqwest::header::HeaderMap) {
        for v in headers.get_all("set-cookie") {
            let Ok(v) = v.to_str() else { continue };
            let pair = v.split(';').next().unwrap_or("");
            if let Some((k, val)) = pair.split_once('=') {
                let mut jar = self.cookies.lock().expect("lock");
                if v.contains("Max-Age=0") {
                    jar.remove(k.trim());
                } else {
                    jar.insert(k.trim().to_string(), val.trim().to_string());
                }
            }
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Page {
        let cookies = self.cookie_header();
        let req = if cookies.is_empty() {
            req
        } else {
            req.header("cookie", cookies)
        };
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        self.remember(&headers);
        let body = resp.text().await.expect("body");
        Page {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Page {
        self.send(self.client.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Page {
        let mut req = self.client.get(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req).await
    }

    pub async fn post_form(&self, path: &str, fields: &[(&str, &str)]) -> Page {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.send(
            self.client
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body),
        )
        .await
    }

    /// Posts `multipart/form-data` with text fields and one file.
    pub async fn post_multipart(
        &self,
        path: &str,
        fields: &[(&str, &str)],
        file: (&str, &str, &[u8]),
    ) -> Page {
        let boundary = "----gatekeeper-test-boundary-7MA4YWxkTrZu0gW";
        let mut body = Vec::new();
        for (k, v) in fields {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                )
                .as_bytes(),
            );
        }
        let (name, filename, data) = file;
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/json\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        self.send(
            self.client
                .post(format!("{}{path}", self.base))
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(body),
        )
        .await
    }

    /// Signs in at `/admin/login` with `key`; returns the response to the form post.
    pub async fn login(&self, key: &str) -> Page {
        let form = self.get("/admin/login").await;
        assert_eq!(form.status, 200, "the sign-in page is reachable");
        let csrf = form.csrf();
        self.post_form("/admin/login", &[("_csrf", &csrf), ("key", key)])
            .await
    }
}

/// What the fake session service saw on its last call.
#[derive(Default, Clone, Debug)]
pub struct Seen {
    pub cookie: Option<String>,
    pub token: Option<String>,
    pub calls: usize,
}

/// A fake `ADMIN_SESSION_VALIDATE_URL` service on 127.0.0.1:0. The session (cookie `session`
/// or header `X-Session-Token`) decides the answer: `good` → valid user alice; `bad` → 401;
/// `falsy` → 200 valid:false; `slow` → answers valid after 30 s; `malformed` → 200 not JSON;
/// `nouser` → 200 valid:true without user; `stringy` → 200 valid:"true".
pub async fn fake_session_service() -> (String, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = seen.clone();
    let app = Router::new().route(
        "/session/validate",
        get(move |headers: HeaderMap| {
            let seen = s2.clone();
            async move {
                let cookie = headers
                    .get("cookie")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let token = headers
                    .get("x-session-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                {
                    let mut s = seen.lock().expect("lock");
                    s.cookie = cookie.clone();
                    s.token = token.clone();
                    s.calls += 1;
                }
                let session = token.or_else(|| {
                    cookie.as_deref().and_then(|c| {
                        c.split(';')
                            .filter_map(|p| p.trim().split_once('='))
                            .find(|(k, _)| *k == "session")
                            .map(|(_, v)| v.to_string())
                    })
                });
                let json = |s: &str| {
                    (
                        StatusCode::OK,
                        [("content-type", "application/json")],
                        s.to_string(),
                    )
                };
                match session.as_deref() {
                    Some("good") => json(r#"{"valid":true,"user":"alice"}"#),
                    Some("falsy") => json(r#"{"valid":false}"#),
                    Some("slow") => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        json(r#"{"valid":true,"user":"slowpoke"}"#)
                    }
                    Some("malformed") => json("this is not json"),
                    Some("nouser") => json(r#"{"valid":true}"#),
                    Some("stringy") => json(r#"{"valid":"true","user":"mallory"}"#),
                    _ => (
                        StatusCode::UNAUTHORIZED,
                        [("content-type", "application/json")],
                        r#"{"valid":false}"#.to_string(),
                    ),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake session service");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/session/validate"), seen)
}

/// A URL on 127.0.0.1 where nothing listens, while the returned socket lives: its port is
/// bound (without `SO_REUSEADDR`) but not listening, so a connection there is refused and no
/// other test's listener can be given the port. (A port bound and released at once was
/// sometimes handed to a fake session service of a test running alongside, which then
/// answered.)
pub fn unreachable_url() -> (String, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    (format!("http://{addr}/session/validate"), socket)
}

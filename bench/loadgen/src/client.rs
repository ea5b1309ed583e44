//! The HTTP/1.1 load generator: keep-alive connections (hyper's low-level client, one request
//! in flight per connection, like wrk), open-loop fixed-rate and closed-loop modes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpSocket;

use crate::args::{user_token, Args};
use crate::stats::summary_us;

/// The request body every load command sends unless `--body` names a file.
pub const CHAT_BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}"#;

#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
    pub path: String,
}

pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority:?} resolves to nothing"))?;
    Ok(Target {
        addr,
        authority: authority.to_string(),
        path: path.to_string(),
    })
}

pub type Sender = SendRequest<Full<Bytes>>;

/// Opens one keep-alive connection, optionally from a chosen local address.
pub async fn connect(t: &Target, source: Option<IpAddr>) -> Result<Sender, String> {
    let sock = if t.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    if let Some(src) = source {
        sock.bind(SocketAddr::new(src, 0))
            .map_err(|e| format!("bind {src}: {e}"))?;
    }
    let stream = sock
        .connect(t.addr)
        .await
        .map_err(|e| format!("connect {}: {e}", t.addr))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Which credential each request carries.
#[derive(Clone)]
pub enum Tokens {
    None,
    Fixed(String),
    Seeded { seed: u32, count: u64 },
}

#[derive(Clone)]
pub struct Load {
    pub target: Target,
    pub source: Option<IpAddr>,
    pub body: Bytes,
    pub tokens: Tokens,
}

impl Load {
    pub fn from_args(a: &Args) -> Result<Load, String> {
        let target = parse_url(a.req("url")?)?;
        let source = match a.str("source") {
            Some(s) => Some(s.parse().map_err(|_| format!("--source {s:?}"))?),
            None => None,
        };
        let body = match a.str("body") {
            Some(path) => Bytes::from(std::fs::read(path).map_err(|e| format!("{path}: {e}"))?),
            None => Bytes::from_static(CHAT_BODY.as_bytes()),
        };
        let tokens = if let Some(t) = a.str("token") {
            Tokens::Fixed(t.to_string())
        } else if let Some(seed) = a.str("token-seed") {
            let seed = u32::from_str_radix(seed, 16).map_err(|_| "--token-seed is hex")?;
            Tokens::Seeded {
                seed,
                count: a.get("tokens", 1u64)?.max(1),
            }
        } else {
            Tokens::None
        };
        Ok(Load {
            target,
            source,
            body,
            tokens,
        })
    }

    pub fn request(&self, i: u64) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(self.target.path.as_str())
            .header("host", self.target.authority.as_str())
            .header("content-type", "application/json");
        match &self.tokens {
            Tokens::None => {}
            Tokens::Fixed(t) => b = b.header("authorization", format!("Bearer {t}")),
            Tokens::Seeded { seed, count } => {
                b = b.header(
                    "authorization",
                    format!("Bearer {}", user_token(*seed, i % count)),
                )
            }
        }
        b.body(Full::new(self.body.clone()))
            .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
    }
}

/// Sends one request on a ready connection and reads the whole response; returns the status.
async fn exchange(sender: &mut Sender, req: Request<Full<Bytes>>) -> Result<u16, String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

pub fn runtime(a: &Args) -> Result<tokio::runtime::Runtime, String> {
    let threads: usize = a.get("threads", 1)?;
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .map_err(|e| e.to_string())
}

pub fn write_out(a: &Args, v: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    match a.str("out") {
        Some(path) => std::fs::write(path, text + "\n").map_err(|e| format!("{path}: {e}")),
        None => {
            println!("{text}");
            Ok(())
        }
    }
}

#[derive(Default)]
struct Tally {
    latencies: Vec<u64>,
    service: Vec<u64>,
    status: BTreeMap<u16, u64>,
    errors: u64,
    dropped: u64,
    first_error: Option<String>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.latencies.extend(o.latencies);
        self.service.extend(o.service);
        for (k, v) in o.status {
            *self.status.entry(k).or_default() += v;
        }
        self.errors += o.errors;
        self.dropped += o.dropped;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    fn json(mut self, extra: Value, measured_secs: f64) -> Value {
        let done = self.latencies.len() as f64;
        let ok: u64 = self
            .status
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        let status: serde_json::Map<String, Value> = self
            .status
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let mut v = json!({
            "completed": self.latencies.len(),
            "ok_2xx": ok,
            "status": status,
            "errors": self.errors,
            "dropped": self.dropped,
            "first_error": self.first_error,
            "measured_secs": measured_secs,
            "rps": (done / measured_secs * 10.0).round() / 10.0,
            "latency": summary_us(&mut self.latencies),
            "service_time": summary_us(&mut self.service),
        });
        if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
            m.extend(e);
        }
        v
    }
}

/// `rate`: open-loop load. A pacer thread releases request slots at exact intended times
/// (`std::thread::sleep`, ~60 µs precision, unlike tokio's 1 ms timer); connection tasks take
/// the next slot when free. Latency is measured from the intended time, so queueing caused by
/// a slow server counts (coordinated-omission corrected); `service_time` is measured from the
/// actual send.
pub fn run_rate(a: &Args) -> Result<(), String> {
    let load = Load::from_args(a)?;
    let rate: f64 = a.get("rate", 1000.0)?;
    let duration: f64 = a.get("duration", 5.0)?;
    let warmup: f64 = a.get("warmup", 1.0)?;
    let conns: usize = a.get("connections", 64)?;
    if rate <= 0.0 || duration <= 0.0 {
        return Err("--rate and --duration must be positive".into());
    }
    let rt = runtime(a)?;
    let tally = rt.block_on(async move {
        let mut senders = Vec::with_capacity(conns);
        for _ in 0..conns {
            senders.push(connect(&load.target, load.source).await?);
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
        let start = Instant::now() + Duration::from_millis(50);
        let measure_from = start + Duration::from_secs_f64(warmup);
        let end = start + Duration::from_secs_f64(warmup + duration);
        let hard_stop = end + Duration::from_secs(3);
        let total = ((warmup + duration) * rate) as u64;
        let interval_ns = 1e9 / rate;
        std::thread::spawn(move || {
            let mut i = 0u64;
            while i < total {
                let now = Instant::now();
                while i < total {
                    let t = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
                    if t > now {
                        break;
                    }
                    if tx.send((i, t)).is_err() {
                        return;
                    }
                    i += 1;
                }
                if i < total {
                    let next = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
                    let wait = next.saturating_duration_since(Instant::now());
                    if !wait.is_zero() {
                        std::thread::sleep(wait);
                    }
                }
            }
        });
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let mut tasks = Vec::new();
        for mut sender in senders {
            let rx = rx.clone();
            let load = load.clone();
            tasks.push(tokio::spawn(async move {
                let mut t = Tally::default();
                loop {
                    let job = { rx.lock().await.recv().await };
                    let Some((i, intended)) = job else { break };
                    if Instant::now() > hard_stop {
                        t.dropped += 1;
                        continue;
                    }
                    let sent = Instant::now();
                    let res = exchange(&mut sender, load.request(i)).await;
                    let done = Instant::now();
                    match res {
                        Ok(status) => {
                            if intended >= measure_from {
                                t.latencies.push((done - intended).as_nanos() as u64);
                                t.service.push((done - sent).as_nanos() as u64);
                                *t.status.entry(status).or_default() += 1;
                            }
                        }
                        Err(e) => {
                            t.errors += 1;
                            t.first_error.get_or_insert(e);
                            match connect(&load.target, load.source).await {
                                Ok(s) => sender = s,
                                Err(e) => {
                                    t.first_error.get_or_insert(e);
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                            }
                        }
                    }
                }
                t
            }));
        }
        let mut all = Tally::default();
        for task in tasks {
            if let Ok(t) = task.await {
                all.merge(t);
            }
        }
        Ok::<_, String>(all)
    })?;
    let extra = json!({
        "mode": "rate",
        "url": a.req("url")?,
        "target_rate": rate,
        "connections": conns,
        "warmup_secs": warmup,
    });
    write_out(a, &tally.json(extra, duration))
}

/// `max`: closed-loop load; every connection sends its next request as soon as the previous
/// answer is read.
pub fn run_max(a: &Args) -> Result<(), String> {
    let load = Load::from_args(a)?;
    let duration: f64 = a.get("duration", 5.0)?;
    let warmup: f64 = a.get("warmup", 1.0)?;
    let conns: usize = a.get("connections", 32)?;
    let rt = runtime(a)?;
    let tally = rt.block_on(async move {
        let start = Instant::now();
        let measure_from = start + Duration::from_secs_f64(warmup);
        let end = measure_from + Duration::from_secs_f64(duration);
        let mut tasks = Vec::new();
        for c in 0..conns {
            let load = load.clone();
            tasks.push(tokio::spawn(async move {
                let mut t = Tally::default();
                let mut sender: Option<Sender> = None;
                let mut i = c as u64;
                while Instant::now() < end {
                    let s = match sender.as_mut() {
                        Some(s) => s,
                        None => match connect(&load.target, load.source).await {
                            Ok(s) => sender.insert(s),
                            Err(e) => {
                                t.errors += 1;
                                t.first_error.get_or_insert(e);
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        },
                    };
                    let sent = Instant::now();
                    let res = exchange(s, load.request(i)).await;
                    let done = Instant::now();
                    i += conns as u64;
                    match res {
                        Ok(status) => {
                            if sent >= measure_from && done <= end {
                                t.latencies.push((done - sent).as_nanos() as u64);
                                t.service.push((done - sent).as_nanos() as u64);
                                *t.status.entry(status).or_default() += 1;
                            }
                        }
                        Err(e) => {
                            t.errors += 1;
                            t.first_error.get_or_insert(e);
                            sender = None;
                        }
                    }
                }
                t
            }));
        }
        let mut all = Tally::default();
        for task in tasks {
            if let Ok(t) = task.await {
                all.merge(t);
            }
        }
        Ok::<_, String>(all)
    })?;
    let extra = json!({
        "mode": "max",
        "url": a.req("url")?,
        "connections": conns,
        "source": a.str("source"),
        "warmup_secs": warmup,
    });
    write_out(a, &tally.json(extra, duration))
}

pub fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `wait-ready`: polls `GET url` every 2 ms until it answers 200; prints the milliseconds
/// elapsed since `--since-ns` (unix time in ns, e.g. `date +%s%N` just before starting the
/// server) or since its own start.
pub fn wait_ready(a: &Args) -> Result<(), String> {
    let target = parse_url(a.req("url")?)?;
    let timeout: f64 = a.get("timeout", 60.0)?;
    let since: u128 = a.get("since-ns", unix_ns())?;
    let rt = runtime(a)?;
    rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs_f64(timeout);
        loop {
            if let Ok(mut s) = connect(&target, None).await {
                let req = Request::builder()
                    .method(Method::GET)
                    .uri(target.path.as_str())
                    .header("host", target.authority.as_str())
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| e.to_string())?;
                if let Ok(200) = exchange(&mut s, req).await {
                    let ms = (unix_ns().saturating_sub(since)) as f64 / 1e6;
                    println!("{ms:.1}");
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not answer 200 within {timeout} s",
                    a.req("url")?
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

/// `free-port`: prints a TCP port that is free on 127.0.0.1 right now.
pub fn free_port() -> Result<(), String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = l.local_addr().map_err(|e| e.to_string())?.port();
    println!("{port}");
    Ok(())
}

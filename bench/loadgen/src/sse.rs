//! Streaming: a fake SSE upstream whose chunks carry the time they were written, and a client
//! that measures, per chunk, how long it took to arrive (both ends read the same system clock,
//! so the difference is the relay delay: kernel loopback alone when direct, plus the proxy when
//! through it).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::args::Args;
use crate::client::{connect, runtime, unix_ns, write_out, Load};
use crate::stats::{pct_i, summary_us};

pub const STREAM_BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Count slowly."}],"max_tokens":64,"stream":true}"#;

const ID_PREFIX: &str = "chatcmpl-bench-";

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `sse-upstream`: answers every POST with `--chunks` SSE chunks `--gap-ms` apart (the first
/// at once), then a usage chunk and `[DONE]`; any GET with 200 "ok".
pub fn run_upstream(a: &Args) -> Result<(), String> {
    let port: u16 = a.get("port", 0)?;
    let chunks: u64 = a.get("chunks", 20)?;
    let gap = Duration::from_millis(a.get("gap-ms", 20)?);
    let rt = runtime(a)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| format!("bind 127.0.0.1:{port}: {e}"))?;
        eprintln!("sse-upstream listening on {:?}", listener.local_addr().ok());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, chunks, gap));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

async fn handle(
    req: Request<Incoming>,
    chunks: u64,
    gap: Duration,
) -> Result<Response<Body>, Infallible> {
    let is_post = req.method() == Method::POST;
    let _ = req.into_body().collect().await;
    if !is_post {
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok")).boxed()));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        for seq in 0..chunks {
            if seq > 0 {
                tokio::time::sleep(gap).await;
            }
            let finish = if seq + 1 == chunks {
                "\"stop\""
            } else {
                "null"
            };
            let data = format!(
                "data: {{\"id\":\"{ID_PREFIX}{seq}-{ns}\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{seq} \"}},\"finish_reason\":{finish}}}]}}\n\n",
                ns = unix_ns()
            );
            if tx.send(Bytes::from(data)).await.is_err() {
                return;
            }
        }
        let usage = format!(
            "data: {{\"id\":\"chatcmpl-usage\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{chunks},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
            12 + chunks
        );
        let _ = tx.send(Bytes::from(usage)).await;
    });
    let body = StreamBody::new(stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    }));
    let resp = Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()));
    Ok(resp)
}

/// `stream`: `--streams` sequential streaming requests on one keep-alive connection (after one
/// unrecorded warm-up stream). Records time to the first chunk, total time, and every chunk's
/// relay delay.
pub fn run_stream(a: &Args) -> Result<(), String> {
    let mut load = Load::from_args(a)?;
    if a.str("body").is_none() {
        load.body = Bytes::from_static(STREAM_BODY.as_bytes());
    }
    let streams: usize = a.get("streams", 10)?;
    let rt = runtime(a)?;
    let out = rt.block_on(async move {
        let mut sender = connect(&load.target, load.source).await?;
        let mut ttfb = Vec::new();
        let mut total = Vec::new();
        let mut delays: Vec<i64> = Vec::new();
        let mut chunk_counts = Vec::new();
        let mut statuses = Vec::new();
        for k in 0..=streams {
            sender
                .ready()
                .await
                .map_err(|e| format!("connection: {e}"))?;
            let t0 = Instant::now();
            let resp = sender
                .send_request(load.request(k as u64))
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let mut buf = String::new();
            let mut first: Option<Duration> = None;
            let mut got = 0u64;
            let mut my_delays = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("body: {e}"))?;
                let now_ns = unix_ns();
                let at = t0.elapsed();
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.push_str(&String::from_utf8_lossy(&data));
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    if let Some((_seq, sent_ns)) = parse_stamp(&event) {
                        got += 1;
                        first.get_or_insert(at);
                        my_delays.push(now_ns as i64 - sent_ns as i64);
                    }
                }
            }
            let elapsed = t0.elapsed();
            if k == 0 {
                continue; // warm-up
            }
            statuses.push(status);
            chunk_counts.push(got);
            if let Some(f) = first {
                ttfb.push(f.as_nanos() as u64);
            }
            total.push(elapsed.as_nanos() as u64);
            delays.extend(my_delays);
        }
        delays.sort_unstable();
        let d_us = |ns: i64| (ns as f64 / 100.0).round() / 10.0;
        Ok::<_, String>(json!({
            "mode": "stream",
            "streams": streams,
            "status": statuses,
            "chunks_per_stream": chunk_counts,
            "ttfb": summary_us(&mut ttfb),
            "total": summary_us(&mut total),
            "chunk_delay": {
                "count": delays.len(),
                "p50_us": d_us(pct_i(&delays, 0.5)),
                "p99_us": d_us(pct_i(&delays, 0.99)),
                "max_us": d_us(delays.last().copied().unwrap_or(0)),
            },
        }))
    })?;
    let mut out = out;
    if let Some(m) = out.as_object_mut() {
        m.insert("url".into(), json!(a.req("url")?));
    }
    write_out(a, &out)
}

/// `(seq, sent_ns)` from an event whose id is `chatcmpl-bench-<seq>-<ns>`.
fn parse_stamp(event: &str) -> Option<(u64, u128)> {
    let rest = &event[event.find(ID_PREFIX)? + ID_PREFIX.len()..];
    let (seq, rest) = rest.split_once('-')?;
    let ns: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((seq.parse().ok()?, ns.parse().ok()?))
}

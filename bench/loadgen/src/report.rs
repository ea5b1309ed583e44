//! `report`: assembles a run directory (the JSON files `bench/run` and the other commands
//! wrote) into one JSON document and the Markdown report `docs/benchmarks.md`.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::args::Args;

const TARGETS: [(&str, &str); 3] = [
    ("direct", "upstream directly (no proxy)"),
    ("nginx", "nginx as a plain reverse proxy"),
    (
        "gatekeeper",
        "llm-gatekeeper (user_token, quotas, accounting)",
    ),
];

/// Targets measured only in the maximum-throughput rounds (for their CPU per request): the
/// gatekeeper without its access log, without the fair queue's per-caller turn, and the floor
/// forwarders of `bench/floor`.
const EXTRA_TARGETS: [(&str, &str); 4] = [
    (
        "gatekeeper_warn",
        "llm-gatekeeper, same configuration with `LOG_LEVEL=warn` (no access log)",
    ),
    (
        "gatekeeper_noqueue",
        "llm-gatekeeper, same configuration with `USER_CONCURRENCY_LIMIT=0` (no per-caller turn)",
    ),
    (
        "floor",
        "floor: hyper server + hyper's low-level client, per-thread pool, fat LTO (`bench/floor`)",
    ),
    (
        "floor_auth",
        "floor + bearer-token lookup among the users + `memchr` usage scan",
    ),
];

/// `allocs.txt` (written by `tests/alloc_audit.rs` through `bench/run`): `key value` lines,
/// such as `allocations_per_request 312.0`.
fn load_kv(dir: &Path, name: &str) -> Value {
    let Ok(text) = std::fs::read_to_string(dir.join(name)) else {
        return Value::Null;
    };
    let mut m = Map::new();
    for line in text.lines() {
        if let Some((k, v)) = line.trim().split_once(char::is_whitespace) {
            let v = v.trim();
            let value = v
                .parse::<f64>()
                .map(|x| json!(x))
                .unwrap_or_else(|_| json!(v));
            m.insert(k.to_string(), value);
        }
    }
    Value::Object(m)
}

fn load(dir: &Path, name: &str) -> Value {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

/// The rounds of one measurement (`{stem}_r1.json`, `{stem}_r2.json`, ...), or the single
/// `{stem}.json` of a run without rounds.
fn load_rounds(dir: &Path, stem: &str) -> Vec<Value> {
    let rounds: Vec<Value> = (1..)
        .map(|i| format!("{stem}_r{i}.json"))
        .take_while(|n| dir.join(n).exists())
        .map(|n| load(dir, &n))
        .collect();
    if rounds.is_empty() {
        vec![load(dir, &format!("{stem}.json"))]
    } else {
        rounds
    }
}

/// The best round by the figure at `path` (the highest, or with `lowest` the lowest), with every
/// round's figure under `list_key`. Best, not median: on a shared machine noise only ever slows a
/// run down.
fn best_of(rounds: &[Value], path: &str, lowest: bool, list_key: &str) -> Value {
    let worst = if lowest { f64::INFINITY } else { 0.0 };
    let figures: Vec<f64> = rounds
        .iter()
        .map(|r| num(r, path).unwrap_or(worst))
        .collect();
    let best = figures
        .iter()
        .enumerate()
        .max_by(|a, b| {
            let o = a.1.total_cmp(b.1);
            if lowest {
                o.reverse()
            } else {
                o
            }
        })
        .map(|(i, _)| i)
        .unwrap_or(0);
    let mut v = rounds.get(best).cloned().unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert(list_key.into(), json!(figures));
    }
    v
}

/// The interleaved maximum-throughput round of a target with the highest rate
/// (`tput_{t}_r{i}.json`), with the median CPU per request of the rounds.
fn best_round(dir: &Path, t: &str) -> Value {
    let rounds = load_rounds(dir, &format!("tput_{t}"));
    let mut v = best_of(&rounds, "rps", false, "rounds_rps");
    // CPU the system under test spent per request in each round (`tput_{t}_r{i}.cpu.json`).
    let mut cpu: Vec<f64> = (1..=rounds.len())
        .filter_map(|i| {
            let c = load(dir, &format!("tput_{t}_r{i}.cpu.json"));
            let ticks = num(&c, "cpu_ticks")?;
            let clk = num(&c, "clk_tck")?;
            let reqs = num(&rounds[i - 1], "requests")?;
            (ticks > 0.0 && reqs > 0.0).then(|| ticks * 1e6 / clk / reqs)
        })
        .collect();
    if let Some(o) = v.as_object_mut() {
        o.insert("rounds_cpu_us_per_req".into(), json!(cpu));
        cpu.sort_by(f64::total_cmp);
        if let Some(m) = cpu.get(cpu.len() / 2) {
            o.insert("cpu_us_per_req".into(), json!(m));
        }
    }
    v
}

/// The fixed-rate latency round of a target with the lowest P99 (`lat_{t}_{rate}_r{i}.json`).
fn best_latency_round(dir: &Path, t: &str, rate: f64) -> Value {
    best_of(
        &load_rounds(dir, &format!("lat_{t}_{rate}")),
        "latency.p99_us",
        true,
        "rounds_p99_us",
    )
}

/// `a[path] − b[path]`, when both are there.
fn diff(a: &Value, b: &Value, path: &str) -> Option<f64> {
    Some(num(a, path)? - num(b, path)?)
}

/// A number at a dotted path (`"latency.p99_us"`).
fn num(v: &Value, path: &str) -> Option<f64> {
    let mut cur = v;
    for part in path.split('.') {
        cur = cur.get(part)?;
    }
    cur.as_f64()
}

fn fmt_opt(v: Option<f64>, decimals: usize, unit: &str) -> String {
    match v {
        Some(x) => format!("{x:.decimals$}{unit}"),
        None => "n/a".to_string(),
    }
}

fn us_as_ms(v: Option<f64>) -> String {
    fmt_opt(v.map(|x| x / 1000.0), 3, " ms")
}

struct Check {
    name: String,
    goal: String,
    measured: String,
    met: Option<bool>,
    /// A figure shown for reference, with no goal of its own.
    info: bool,
}

impl Check {
    fn goal(name: impl Into<String>, goal: &str, measured: String, met: Option<bool>) -> Check {
        Check {
            name: name.into(),
            goal: goal.into(),
            measured,
            met,
            info: false,
        }
    }

    fn info(name: impl Into<String>, measured: String) -> Check {
        Check {
            name: name.into(),
            goal: "–".into(),
            measured,
            met: None,
            info: true,
        }
    }
}

pub fn run(a: &Args) -> Result<(), String> {
    let dir = Path::new(a.req("dir")?);
    let env = load(dir, "env.json");
    let env_end = load(dir, "env_end.json");
    let rates = load(dir, "rates.json");
    let notes: Vec<(String, String)> = std::fs::read_to_string(dir.join("notes.txt"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(s, t)| (s.to_string(), t.to_string()))
        .collect();

    let mut tput = Map::new();
    let mut latency = Map::new();
    let fixed = num(&rates, "fixed_rate");
    let half = num(&rates, "half_rate");
    let rate_list: Vec<f64> = [fixed, half].into_iter().flatten().collect();
    for (t, _) in TARGETS.iter().chain(EXTRA_TARGETS.iter()) {
        tput.insert((*t).into(), best_round(dir, t));
    }
    for r in &rate_list {
        let mut per = Map::new();
        for (t, _) in TARGETS {
            per.insert(t.into(), best_latency_round(dir, t, *r));
        }
        latency.insert(format!("{r}"), Value::Object(per));
    }
    let streaming = json!({
        "direct": load(dir, "stream_direct.json"),
        "nginx": load(dir, "stream_nginx.json"),
        "gatekeeper": load(dir, "stream_gatekeeper.json"),
    });
    let store = load(dir, "store.json");
    let flood = json!({
        "params": load(dir, "flood_params.json"),
        "legit_alone": load(dir, "flood_legit_alone.json"),
        "flood_alone": load(dir, "flood_alone.json"),
        "legit_during": load(dir, "flood_legit_during.json"),
        "flood_during": load(dir, "flood_during.json"),
    });
    let gk_main = load(dir, "gk_main.json");
    let allocs = load_kv(dir, "allocs.txt");

    // ----- derived numbers and targets
    let rps = |t: &str| num(&tput[t], "rps");
    let ratio = match (rps("gatekeeper"), rps("nginx")) {
        (Some(g), Some(n)) if n > 0.0 => Some(g / n),
        _ => None,
    };
    let cpu = |t: &str| num(&tput[t], "cpu_us_per_req");
    let over = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let cpu_ratio = over(cpu("gatekeeper"), cpu("nginx"));
    let us = |v: Option<f64>| fmt_opt(v, 1, " µs");
    let mut checks = vec![
        Check::goal(
            "CPU per request, llm-gatekeeper / nginx proxy",
            "≤ 1.1",
            format!(
                "{} ({} / {})",
                fmt_opt(cpu_ratio, 2, ""),
                us(cpu("gatekeeper")),
                us(cpu("nginx"))
            ),
            cpu_ratio.map(|r| r <= 1.1),
        ),
        Check::goal(
            "Throughput, llm-gatekeeper / nginx proxy",
            "≥ 1.0",
            fmt_opt(ratio, 2, ""),
            ratio.map(|r| r >= 1.0),
        ),
    ];
    for (t, label) in [
        ("floor", "Floor: CPU per request, minimal forwarder / nginx"),
        (
            "floor_auth",
            "Floor with token lookup + usage scan: CPU per request / nginx",
        ),
    ] {
        if cpu(t).is_some() {
            checks.push(Check::info(
                label,
                format!(
                    "{} ({}); throughput / nginx {}; llm-gatekeeper is {}× this",
                    fmt_opt(over(cpu(t), cpu("nginx")), 2, ""),
                    us(cpu(t)),
                    fmt_opt(over(rps(t), rps("nginx")), 2, ""),
                    fmt_opt(over(cpu("gatekeeper"), cpu(t)), 2, ""),
                ),
            ));
        }
    }
    let log_cost = match (cpu("gatekeeper"), cpu("gatekeeper_warn")) {
        (Some(i), Some(w)) => Some(i - w),
        _ => None,
    };
    if log_cost.is_some() {
        checks.push(Check::info(
            format!(
                "Access log: CPU per request at LOG_LEVEL={} − at warn",
                env.get("gk_log_level")
                    .and_then(Value::as_str)
                    .unwrap_or("info")
            ),
            format!(
                "{} ({} − {})",
                us(log_cost),
                us(cpu("gatekeeper")),
                us(cpu("gatekeeper_warn"))
            ),
        ));
    }
    if let (Some(g), Some(nq)) = (cpu("gatekeeper"), cpu("gatekeeper_noqueue")) {
        checks.push(Check::info(
            "Fair queue: CPU per request with USER_CONCURRENCY_LIMIT=1 − with 0 (keys free)",
            format!("{} ({} − {})", us(Some(g - nq)), us(Some(g)), us(Some(nq))),
        ));
    }
    checks.push(Check::info(
        "Heap allocations per proxied request (tests/alloc_audit.rs)",
        match num(&allocs, "allocations_per_request") {
            Some(n) => format!(
                "{n:.1} allocations, {} bytes",
                fmt_opt(num(&allocs, "bytes_per_request"), 0, "")
            ),
            None => "not measured".into(),
        },
    ));
    let mut added_p99 = Map::new();
    for r in &rate_list {
        let l = &latency[&format!("{r}")];
        let d = match (
            num(&l["gatekeeper"], "latency.p99_us"),
            num(&l["direct"], "latency.p99_us"),
        ) {
            (Some(g), Some(d)) => Some(g - d),
            _ => None,
        };
        let dn = match (
            num(&l["nginx"], "latency.p99_us"),
            num(&l["direct"], "latency.p99_us"),
        ) {
            (Some(g), Some(d)) => Some(g - d),
            _ => None,
        };
        added_p99.insert(
            format!("{r}"),
            json!({"gatekeeper_minus_direct_us": d, "nginx_minus_direct_us": dn}),
        );
        checks.push(Check::goal(
            format!("Added P99 at {r:.0} req/s (llm-gatekeeper − direct)"),
            "≤ 1 ms",
            format!("{} (nginx: {})", us_as_ms(d), us_as_ms(dn)),
            d.map(|x| x <= 1000.0),
        ));
    }
    let sd = &streaming["direct"];
    let sg = &streaming["gatekeeper"];
    let chunk_added = match (num(sg, "chunk_delay.max_us"), num(sd, "chunk_delay.p50_us")) {
        (Some(g), Some(d)) => Some(g - d),
        _ => None,
    };
    let ttfb_added = match (num(sg, "ttfb.p50_us"), num(sd, "ttfb.p50_us")) {
        (Some(g), Some(d)) => Some(g - d),
        _ => None,
    };
    checks.push(Check::goal(
        "Streaming: largest delay added to any chunk",
        "≤ 1 ms",
        us_as_ms(chunk_added),
        chunk_added.map(|x| x <= 1000.0),
    ));
    checks.push(Check::goal(
        "Streaming: time to first chunk, llm-gatekeeper − direct (median)",
        "≤ 1 ms",
        us_as_ms(ttfb_added),
        ttfb_added.map(|x| x <= 1000.0),
    ));
    // The issue-18 streaming target: nginx as a streaming proxy on the same CPU is the bar.
    let worst_gk = num(sg, "chunk_delay.max_us");
    let worst_nginx = num(&streaming["nginx"], "chunk_delay.max_us");
    checks.push(Check::goal(
        "Streaming: worst chunk delay, llm-gatekeeper vs nginx's own worst on the same CPU",
        "≤ nginx",
        format!("{} (nginx: {})", us_as_ms(worst_gk), us_as_ms(worst_nginx)),
        worst_gk.zip(worst_nginx).map(|(g, n)| g <= n),
    ));
    let users = num(&store, "users").unwrap_or(0.0);
    // Strict: the largest of the readings (after the bulk PUT, after the GETs, after a restart
    // from SQLite) must meet the target; all of them are shown.
    let readings: Vec<(&str, f64)> = [
        ("after bulk PUT", "rss_loaded_kb"),
        ("after GETs", "rss_after_get_kb"),
        ("after SQLite startup", "sqlite_rss_kb"),
    ]
    .into_iter()
    .filter_map(|(label, key)| num(&store, key).map(|kb| (label, kb / 1024.0)))
    .collect();
    let rss_max = readings.iter().map(|(_, mb)| *mb).reduce(f64::max);
    checks.push(Check::goal(
        format!("RSS with {users:.0} users (largest reading)"),
        "≤ 64 MB",
        if readings.is_empty() {
            "n/a".into()
        } else {
            readings
                .iter()
                .map(|(label, mb)| format!("{mb:.1} MB {label}"))
                .collect::<Vec<_>>()
                .join("; ")
        },
        rss_max.map(|m| m <= 64.0),
    ));
    let get_ms = num(&store, "get_users_ms");
    checks.push(Check::goal(
        format!("GET /admin/users with {users:.0} users (best of 3)"),
        "≤ 500 ms",
        fmt_opt(get_ms, 1, " ms"),
        get_ms.map(|m| m <= 500.0),
    ));
    let flood_ratio = match (
        num(&flood["legit_during"], "latency.p99_us"),
        num(&flood["legit_alone"], "latency.p99_us"),
    ) {
        (Some(d), Some(a)) if a > 0.0 => Some(d / a),
        _ => None,
    };
    checks.push(Check::goal(
        "Legitimate P99 during the bad-token flood / without",
        "< 2×",
        fmt_opt(flood_ratio, 2, "×"),
        flood_ratio.map(|r| r < 2.0),
    ));

    let targets_json: Vec<Value> = checks
        .iter()
        .map(|c| {
            json!({"name": c.name, "goal": c.goal, "measured": c.measured, "met": c.met, "info": c.info})
        })
        .collect();
    let all = json!({
        "env": env,
        "env_end": env_end,
        "rates": rates,
        "throughput": tput,
        "latency": latency,
        "added_p99": added_p99,
        "throughput_ratio_gatekeeper_over_nginx": ratio,
        "streaming": streaming,
        "streaming_added": {
            "max_chunk_delay_us": chunk_added,
            "ttfb_p50_us": ttfb_added,
            "p50_chunk_delay_us": diff(sg, sd, "chunk_delay.p50_us"),
            "p99_chunk_delay_us": diff(sg, sd, "chunk_delay.p99_us"),
            "nginx_p50_chunk_delay_us": diff(&streaming["nginx"], sd, "chunk_delay.p50_us"),
            "nginx_p99_chunk_delay_us": diff(&streaming["nginx"], sd, "chunk_delay.p99_us"),
            "nginx_max_chunk_delay_us": num(&streaming["nginx"], "chunk_delay.max_us")
                .zip(num(sd, "chunk_delay.p50_us"))
                .map(|(m, p)| m - p),
            "direct_worst_minus_median_us": num(sd, "chunk_delay.max_us").zip(num(sd, "chunk_delay.p50_us")).map(|(m, p)| m - p),
        },
        "store": store,
        "flood": flood,
        "gatekeeper_main_rss_kb": num(&gk_main, "rss_kb"),
        "allocs": allocs,
        "cpu_ratio_gatekeeper_over_nginx": cpu_ratio,
        "access_log_cpu_us_per_req": log_cost,
        "targets": targets_json,
        "notes": notes.iter().map(|(s, t)| json!({"section": s, "note": t})).collect::<Vec<_>>(),
    });
    let json_text = serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?;
    std::fs::write(a.req("json")?, json_text + "\n").map_err(|e| e.to_string())?;

    let md = markdown(&all, &checks, &notes, &rate_list);
    std::fs::write(a.req("md")?, md).map_err(|e| e.to_string())?;
    Ok(())
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("?")
}

fn markdown(all: &Value, checks: &[Check], notes: &[(String, String)], rates: &[f64]) -> String {
    let env = &all["env"];
    let mut m = String::new();
    let w = &mut m;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Output of `bench/run` (run `{}`, {}), llm-gatekeeper commit `{}`{}. Rerun with \
         `bench/run`; raw numbers of this run: [`benchmarks.json`](benchmarks.json). The performance \
         work step by step, with a profile: [`performance.md`](performance.md).\n",
        s(env, "run_id"),
        s(env, "date_utc"),
        s(env, "gatekeeper_commit"),
        match s(env, "gatekeeper_build") {
            "" => String::new(),
            build => format!(", built {build}"),
        }
    );
    let _ = writeln!(
        w,
        "**Machine:** {} CPU(s) ({}), {}. **Tools:** nginx {}, wrk {}, {}; latency, streaming and flood \
         load from this repository's `bench/loadgen`. Load average at start {} and at end {} (a load well above 0 means other processes \
         shared the CPUs and the numbers are pessimistic).\n",
        env.get("cpus").and_then(Value::as_u64).unwrap_or(0),
        s(env, "cpu_model"),
        s(env, "kernel"),
        s(env, "nginx"),
        s(env, "wrk"),
        s(env, "rustc"),
        s(env, "loadavg_start"),
        s(&all["env_end"], "loadavg_end"),
    );
    let _ = writeln!(
        w,
        "**CPU layout:** the system under test (nginx proxy, or llm-gatekeeper) runs on CPU {} with {} worker(s) \
         (`worker_processes` / `WORKERS`); the load generators and the fake upstream share CPU {} \
         (`taskset`). Each load run lasts {} s after a 1 s warm-up.\n",
        s(env, "sut_cpus"),
        env.get("sut_workers").and_then(Value::as_u64).unwrap_or(0),
        s(env, "driver_cpus"),
        env.get("duration_secs").and_then(Value::as_u64).unwrap_or(0),
    );

    let _ = writeln!(w, "## Targets\n");
    let _ = writeln!(w, "| Target | Goal | Measured | Met |\n|---|---|---|---|");
    for c in checks {
        let met = match c.met {
            _ if c.info => "–",
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(w, "| {} | {} | {} | {} |", c.name, c.goal, c.measured, met);
    }
    let sqlite = num(&all["store"], "sqlite_startup_ms");
    let _ = writeln!(
        w,
        "\nStartup loading {} users from SQLite: {} (no target).\n",
        num(&all["store"], "users").unwrap_or(0.0),
        fmt_opt(sqlite, 0, " ms")
    );

    // ----- 1
    let _ = writeln!(w, "## 1. Non-streaming throughput and latency\n");
    let _ = writeln!(
        w,
        "`POST /v1/chat/completions` with a small body; every request carries one of {} user tokens in turn \
         (the same wrk script and tokens for every target, so the load generator's work is identical). \
         The upstream is nginx returning a fixed chat completion with `usage`. llm-gatekeeper runs the \
         full configuration: `GATEKEEPER=user_token` with these {} users, quotas on (every user has token \
         limits far above what a run uses, so each request is checked and reserved against them) and exact \
         accounting (each request charged from the upstream's `usage`), and its log at `LOG_LEVEL={}` \
         (one access line per request, written to a file); nginx has `access_log off`.\n",
        env.get("users").and_then(Value::as_u64).unwrap_or(0),
        env.get("users").and_then(Value::as_u64).unwrap_or(0),
        env.get("gk_log_level")
            .and_then(Value::as_str)
            .unwrap_or("warn")
    );
    let mut header = format!(
        "| Target | Max req/s (wrk, {} conns) | CPU per request | wrk P50 / P99 at max |",
        env.get("connections").and_then(Value::as_u64).unwrap_or(0)
    );
    let mut sep = "|---|---|---|---|".to_string();
    for r in rates {
        let _ = write!(header, " P50 / P99 at {r:.0} req/s |");
        sep.push_str("---|");
    }
    let _ = writeln!(w, "{header}\n{sep}");
    for (t, label) in TARGETS {
        let tp = &all["throughput"][t];
        let non2xx = num(tp, "errors.status").unwrap_or(0.0);
        let rounds = tp
            .get("rounds_rps")
            .and_then(Value::as_array)
            .filter(|r| r.len() > 1)
            .map(|r| {
                let list: Vec<String> = r
                    .iter()
                    .map(|x| format!("{:.0}", x.as_f64().unwrap_or(0.0)))
                    .collect();
                format!(" (rounds: {})", list.join(" / "))
            })
            .unwrap_or_default();
        let mut row = format!(
            "| {label} | {}{rounds}{} | {} | {} / {} |",
            fmt_opt(num(tp, "rps"), 0, ""),
            if non2xx > 0.0 {
                format!(" ({non2xx:.0} non-2xx!)")
            } else {
                String::new()
            },
            match num(tp, "cpu_us_per_req") {
                Some(c) => format!("{c:.1} µs"),
                None => "–".to_string(),
            },
            us_as_ms(num(tp, "latency_us.p50")),
            us_as_ms(num(tp, "latency_us.p99"))
        );
        for r in rates {
            let l = &all["latency"][format!("{r}")][t];
            let bad = num(l, "completed").unwrap_or(0.0) - num(l, "ok_2xx").unwrap_or(0.0)
                + num(l, "errors").unwrap_or(0.0)
                + num(l, "dropped").unwrap_or(0.0);
            let p99_rounds = l
                .get("rounds_p99_us")
                .and_then(Value::as_array)
                .filter(|r| r.len() > 1)
                .map(|r| {
                    let list: Vec<String> = r.iter().map(|x| us_as_ms(x.as_f64())).collect();
                    format!(" (P99 of the rounds: {})", list.join(" / "))
                })
                .unwrap_or_default();
            let _ = write!(
                row,
                " {} / {}{p99_rounds}{} |",
                us_as_ms(num(l, "latency.p50_us")),
                us_as_ms(num(l, "latency.p99_us")),
                if bad > 0.0 {
                    format!(" ({bad:.0} failed)")
                } else {
                    String::new()
                }
            );
        }
        let _ = writeln!(w, "{row}");
    }
    // The throughput-only targets: no latency runs.
    for (t, label) in EXTRA_TARGETS {
        let tp = &all["throughput"][t];
        let Some(rps) = num(tp, "rps") else { continue };
        let non2xx = num(tp, "errors.status").unwrap_or(0.0);
        let mut row = format!(
            "| {label} | {rps:.0}{} | {} | {} / {} |",
            if non2xx > 0.0 {
                format!(" ({non2xx:.0} non-2xx!)")
            } else {
                String::new()
            },
            match num(tp, "cpu_us_per_req") {
                Some(c) => format!("{c:.1} µs"),
                None => "–".to_string(),
            },
            us_as_ms(num(tp, "latency_us.p50")),
            us_as_ms(num(tp, "latency_us.p99"))
        );
        for _ in rates {
            row.push_str(" – |");
        }
        let _ = writeln!(w, "{row}");
    }
    let cpu = |t: &str| num(&all["throughput"][t], "cpu_us_per_req");
    if let (Some(g), Some(n)) = (cpu("gatekeeper"), cpu("nginx")) {
        let _ = writeln!(
            w,
            "\nCPU per request (user + system time of the proxy's processes during each maximum-throughput \
             round, divided by the requests served; median of the rounds): llm-gatekeeper {g:.1} µs, nginx \
             {n:.1} µs, ratio {:.2}. Unlike throughput, this does not depend on how much CPU the virtual \
             machine's neighbours take; the kernel's share (loopback TCP) is included for both.",
            g / n
        );
    }
    if let (Some(g), Some(f), Some(fa)) = (cpu("gatekeeper"), cpu("floor"), cpu("floor_auth")) {
        let _ = writeln!(
            w,
            "\nThe floor (`bench/floor`, same CPU, same load) is the least a forwarder on this stack costs: \
             {f:.1} µs per request, {fa:.1} µs with a bearer-token lookup among the users and a `memchr` \
             scan of the answer for usage. llm-gatekeeper's {g:.1} µs is {:.2}× the latter: what our own \
             work costs above the stack's floor (the floor is built without profile-guided \
             optimisation; llm-gatekeeper's build is stated at the top).",
            g / fa
        );
    }
    if let (Some(g), Some(gw)) = (cpu("gatekeeper"), cpu("gatekeeper_warn")) {
        let _ = writeln!(
            w,
            "\nThe access log (one line per request, at `LOG_LEVEL=info`, through the non-blocking writer) \
             costs {:.1} µs of CPU per request: {g:.1} µs with it, {gw:.1} µs at `LOG_LEVEL=warn`.",
            g - gw
        );
    }
    if let (Some(g), Some(nq)) = (cpu("gatekeeper"), cpu("gatekeeper_noqueue")) {
        let _ = writeln!(
            w,
            "\nThe fair queue while keys are free (each caller's turn under `USER_CONCURRENCY_LIMIT=1`, \
             the default, and the family's \"anyone waiting\" check) costs {:.1} µs of CPU per request: \
             {g:.1} µs with it, {nq:.1} µs with `USER_CONCURRENCY_LIMIT=0`. The load spreads over the \
             users' tokens, so no request waits; what is measured is the gate alone.",
            g - nq
        );
    }
    let allocs = &all["allocs"];
    if let Some(n) = num(allocs, "allocations_per_request") {
        let _ = writeln!(
            w,
            "\nHeap allocations per proxied request: **{n:.1}** ({} bytes; counted by a counting global \
             allocator over {} requests on the server's thread, `tests/alloc_audit.rs`).",
            fmt_opt(num(allocs, "bytes_per_request"), 0, ""),
            fmt_opt(num(allocs, "requests"), 0, "")
        );
    }
    let _ = writeln!(
        w,
        "\nRatio of maximum throughput, llm-gatekeeper / nginx proxy: **{}**; nginx proxy / direct: {}.",
        fmt_opt(num(all, "throughput_ratio_gatekeeper_over_nginx"), 2, ""),
        fmt_opt(
            num(&all["throughput"]["nginx"], "rps")
                .zip(num(&all["throughput"]["direct"], "rps"))
                .map(|(a, b)| a / b),
            2,
            ""
        )
    );
    for r in rates {
        let a = &all["added_p99"][format!("{r}")];
        let _ = writeln!(
            w,
            "P99 added at {r:.0} req/s: llm-gatekeeper **{}**, nginx proxy {}.",
            us_as_ms(num(a, "gatekeeper_minus_direct_us")),
            us_as_ms(num(a, "nginx_minus_direct_us"))
        );
    }
    let _ = writeln!(
        w,
        "\nThe first rate is fixed; the second is half of the lowest maximum measured through a proxy, so no \
         target is saturated. Latency at a fixed rate is measured by `loadgen rate` from each request's \
         intended send time (open loop, 64 keep-alive connections; a pacer thread releases requests with \
         `nanosleep` precision of about 60 µs), so queueing behind a slow answer is counted \
         (coordinated omission corrected, like wrk2).\n\n\
         Every measurement of this section runs in interleaved rounds (direct, nginx, llm-gatekeeper, then \
         again), and the tables show each target's best round: the highest throughput, the lowest P99; \
         every round's figure is listed. On a shared virtual machine noise only ever slows a run down, so \
         the best round is the closest to what the software itself costs, and interleaving gives every \
         target the same chances.\n"
    );

    // ----- 2
    let sd = &all["streaming"]["direct"];
    let sg = &all["streaming"]["gatekeeper"];
    let _ = writeln!(w, "## 2. Streaming relay\n");
    let _ = writeln!(
        w,
        "A fake upstream (`loadgen sse-upstream`) answers with an SSE stream of {} chunks, the first at once \
         and then {} ms apart; each chunk carries the time it was written. The client (`loadgen stream`, one \
         keep-alive connection, {} streams after one warm-up) notes when each chunk arrives; the difference is \
         the relay delay (loopback alone when direct).\n",
        num(env, "stream_chunks").unwrap_or(0.0),
        num(env, "stream_gap_ms").unwrap_or(0.0),
        num(env, "streams").unwrap_or(0.0)
    );
    let _ = writeln!(
        w,
        "| Path | TTFB P50 / max | Total P50 | Chunk relay delay P50 / P99 / max |\n|---|---|---|---|"
    );
    let sn = &all["streaming"]["nginx"];
    for (label, v) in [
        ("direct", sd),
        ("nginx (proxy_buffering off)", sn),
        ("llm-gatekeeper", sg),
    ] {
        let _ = writeln!(
            w,
            "| {label} | {} / {} | {} | {} / {} / {} |",
            us_as_ms(num(v, "ttfb.p50_us")),
            us_as_ms(num(v, "ttfb.max_us")),
            us_as_ms(num(v, "total.p50_us")),
            us_as_ms(num(v, "chunk_delay.p50_us")),
            us_as_ms(num(v, "chunk_delay.p99_us")),
            us_as_ms(num(v, "chunk_delay.max_us")),
        );
    }
    let _ = writeln!(
        w,
        "\nLargest delay added to a chunk (worst proxied chunk − median direct chunk): **{}**; time to first \
         chunk added (medians): **{}**.\n",
        us_as_ms(num(all, "streaming_added.max_chunk_delay_us")),
        us_as_ms(num(all, "streaming_added.ttfb_p50_us"))
    );
    let _ = writeln!(
        w,
        "Typical and tail delay added (proxied − direct): P50 {}, P99 {}. For scale, the direct path's own \
         worst chunk came {} after its median: that much of any single worst reading is the machine's \
         scheduling noise (a virtual machine whose idle CPUs wake with a delay), not the relay.\n",
        us_as_ms(num(all, "streaming_added.p50_chunk_delay_us")),
        us_as_ms(num(all, "streaming_added.p99_chunk_delay_us")),
        us_as_ms(num(all, "streaming_added.direct_worst_minus_median_us"))
    );
    if num(sn, "chunk_delay.p50_us").is_some() {
        let _ = writeln!(
            w,
            "nginx as a streaming proxy on the same CPU adds P50 {}, P99 {}, and its worst chunk came {} \
             after the direct median: the same measure as llm-gatekeeper's **{}** above.\n",
            us_as_ms(num(all, "streaming_added.nginx_p50_chunk_delay_us")),
            us_as_ms(num(all, "streaming_added.nginx_p99_chunk_delay_us")),
            us_as_ms(num(all, "streaming_added.nginx_max_chunk_delay_us")),
            us_as_ms(num(all, "streaming_added.max_chunk_delay_us")),
        );
    }

    // ----- 3
    let st = &all["store"];
    let kb_mb = |k: &str| fmt_opt(num(st, k).map(|x| x / 1024.0), 1, " MB");
    let _ = writeln!(w, "## 3. User store\n");
    let _ = writeln!(w, "| Measure | Value |\n|---|---|");
    let _ = writeln!(w, "| Users | {} |", num(st, "users").unwrap_or(0.0));
    let _ = writeln!(w, "| RSS, empty | {} |", kb_mb("rss_empty_kb"));
    let _ = writeln!(w, "| RSS, users loaded | {} |", kb_mb("rss_loaded_kb"));
    let _ = writeln!(
        w,
        "| RSS, after 3 × GET /admin/users | {} |",
        kb_mb("rss_after_get_kb")
    );
    let _ = writeln!(
        w,
        "| PUT /admin/users (all users, one request) | {} |",
        fmt_opt(num(st, "put_users_ms"), 1, " ms")
    );
    let _ = writeln!(
        w,
        "| GET /admin/users (best; runs: {} / {} / {}) | {} ({} bytes) |",
        fmt_opt(num(st, "get_users_ms_1"), 1, ""),
        fmt_opt(num(st, "get_users_ms_2"), 1, ""),
        fmt_opt(num(st, "get_users_ms_3"), 1, ""),
        fmt_opt(num(st, "get_users_ms"), 1, " ms"),
        fmt_opt(num(st, "get_users_bytes"), 0, "")
    );
    let _ = writeln!(
        w,
        "| Startup from SQLite (exec → /health answers) | {} |",
        fmt_opt(num(st, "sqlite_startup_ms"), 1, " ms")
    );
    let _ = writeln!(
        w,
        "| RSS after SQLite startup | {} |",
        kb_mb("sqlite_rss_kb")
    );
    let _ = writeln!(
        w,
        "\nRSS is `VmRSS` from `/proc/<pid>/status`. The users are normal users with per-family limits; GET is \
         timed by curl (`time_total`, loopback).\n"
    );

    // ----- 4
    let f = &all["flood"];
    let _ = writeln!(w, "## 4. Bad-token flood\n");
    let _ = writeln!(
        w,
        "One address (127.0.0.2, then 127.0.0.3) sends requests with a wrong token as fast as the proxy \
         answers (`loadgen max`, 32 connections); the brute-force lockout locks it after \
         `BRUTE_FORCE_MAX_FAILED_ATTEMPTS` failures, after which every request is refused with 429 after \
         the lockout's 250 ms tarpit pause (so the refused rate is about 32 connections × 4 per second: the \
         flood is slowed, which is the point). Meanwhile legitimate users from 127.0.0.1 send {} req/s (`loadgen rate`).\n",
        fmt_opt(num(&f["params"], "legit_rate"), 0, "")
    );
    let status = |v: &Value| {
        v.get("status")
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_else(|| "n/a".into())
    };
    let _ = writeln!(
        w,
        "| Run | Refused req/s | Statuses | Legitimate P50 / P99 |\n|---|---|---|---|"
    );
    let _ = writeln!(
        w,
        "| flood alone | {} | {} | – |",
        fmt_opt(num(&f["flood_alone"], "rps"), 0, ""),
        status(&f["flood_alone"])
    );
    let _ = writeln!(
        w,
        "| legitimate alone | – | {} | {} / {} |",
        status(&f["legit_alone"]),
        us_as_ms(num(&f["legit_alone"], "latency.p50_us")),
        us_as_ms(num(&f["legit_alone"], "latency.p99_us"))
    );
    let _ = writeln!(
        w,
        "| legitimate during flood | {} | flood: {}; legitimate: {} | {} / {} |",
        fmt_opt(num(&f["flood_during"], "rps"), 0, ""),
        status(&f["flood_during"]),
        status(&f["legit_during"]),
        us_as_ms(num(&f["legit_during"], "latency.p50_us")),
        us_as_ms(num(&f["legit_during"], "latency.p99_us"))
    );
    let _ = writeln!(
        w,
        "\nOn a 2-CPU machine the flood generator shares the load-generator CPU with the legitimate load \
         generator and the upstream, so part of any growth is the generator's, not the proxy's.\n"
    );

    if !notes.is_empty() {
        let _ = writeln!(w, "## Notes from this run\n");
        for (section, text) in notes {
            let _ = writeln!(w, "- **{section}:** {text}");
        }
        let _ = writeln!(w);
    }
    m
}

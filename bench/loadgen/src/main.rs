//! `loadgen`: the benchmark's own measuring tool. One binary with sub-commands, so `bench/run`
//! needs nothing beyond nginx, wrk and curl:
//!
//! - `rate`: open-loop load at a fixed request rate with latency measured from each request's
//!   *intended* send time (as wrk2 does, so a stalled server cannot hide its queueing delay).
//! - `max`: closed-loop load (as fast as the server answers) on a fixed number of connections,
//!   optionally from a chosen source address (the bad-token flood).
//! - `sse-upstream`: a fake OpenAI upstream that answers every POST with an SSE stream of N
//!   chunks separated by gaps, each chunk stamped with the time it was written.
//! - `stream`: requests streams and measures time to first chunk, total time and, per chunk,
//!   the delay between the upstream writing it and the client receiving it.
//! - `gen-users`: writes a `PUT /admin/users` body with N users whose tokens follow a pattern
//!   the load commands (and the wrk script) can reproduce.
//! - `wait-ready`, `free-port`: small process-orchestration helpers.
//! - `report`: assembles a run directory of JSON files into one JSON and the Markdown report.

mod args;
mod client;
mod report;
mod sse;
mod stats;
mod users;

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let Some(cmd) = argv.next() else {
        eprintln!("{}", USAGE);
        return ExitCode::from(2);
    };
    let args = match args::Args::parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen {cmd}: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match cmd.as_str() {
        "rate" => client::run_rate(&args),
        "max" => client::run_max(&args),
        "sse-upstream" => sse::run_upstream(&args),
        "stream" => sse::run_stream(&args),
        "gen-users" => users::gen_users(&args),
        "wait-ready" => client::wait_ready(&args),
        "free-port" => client::free_port(),
        "report" => report::run(&args),
        other => Err(format!("unknown command {other:?}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: loadgen <command> [--flag value ...]
  rate         --url U --rate R --duration S [--warmup S] [--connections C] [--token-seed X --tokens N | --token T] [--source IP] [--out F]
  max          --url U --duration S [--warmup S] [--connections C] [--token-seed X --tokens N | --token T] [--source IP] [--out F]
  sse-upstream --port P [--chunks N] [--gap-ms G]
  stream       --url U [--streams K] [--token T] [--out F]
  gen-users    --count N --token-seed X [--out F]
  wait-ready   --url U [--timeout S] [--since-ns NS]     (prints milliseconds since NS, or since its own start)
  free-port                                               (prints a free loopback TCP port)
  report       --dir RUN_DIR --md OUT.md --json OUT.json";

//! Runs the real `llm-gatekeeper` binary for end-to-end tests: a clean environment, an empty
//! working directory (no `.env` is picked up), a free loopback port read back from the
//! "listening on" log line.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_llm-gatekeeper");

/// The binary with only `vars` set (plus `BIND_ADDRESS=127.0.0.1`, `PORT=0`, `NO_COLOR=1`,
/// `CHECK_KEYS=false`,
/// which `vars` may override), run in `dir`.
pub fn command(dir: &std::path::Path, vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .current_dir(dir)
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", "0")
        .env("NO_COLOR", "1")
        // Key checkers would call the fake upstreams on their own.
        .env("CHECK_KEYS", "false");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

/// Waits for the process to exit, killing it after a generous bound so a test cannot hang.
pub fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running binary; killed when dropped unless it already exited.
pub struct RunningBinary {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    log: Option<std::thread::JoinHandle<String>>,
}

impl RunningBinary {
    /// Starts the binary with `vars` in a fresh temporary directory and waits until it listens.
    pub fn start(dir: &std::path::Path, vars: &[(&str, &str)]) -> RunningBinary {
        let mut child = command(dir, vars)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn binary");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // The log keeps being drained so the server never blocks on a full pipe.
        let log = std::thread::spawn(move || {
            let mut all = String::new();
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(i) = line.find("listening on http://") {
                        let rest = &line[i + "listening on ".len()..];
                        // A text line ends the URL with a space, a JSON line
                        // (`LOG_FORMAT=json`) with the closing quote.
                        let url: String = rest
                            .chars()
                            .take_while(|c| !c.is_whitespace() && *c != '"')
                            .collect();
                        let _ = tx.send(url);
                        sent = true;
                    }
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("the binary did not start listening; stderr: {err}");
            }
        };
        RunningBinary {
            child,
            url,
            log: Some(log),
        }
    }

    /// Sends SIGTERM (through the `kill` command).
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for exit and returns the status and everything the server logged on stdout.
    pub fn wait(mut self) -> (ExitStatus, String) {
        let status = wait_exit(&mut self.child);
        let log = self
            .log
            .take()
            .map(|h| h.join().expect("log reader"))
            .unwrap_or_default();
        (status, log)
    }
}

impl Drop for RunningBinary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

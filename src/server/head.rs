//! The client header timeout (`CLIENT_HEADER_TIMEOUT_SECS`): a connection waiting for a request
//! head (the first one, or the next one on an idle keep-alive connection) is closed once it has
//! waited that long; a connection serving a request (reading its body, writing its response,
//! however long it streams) is never cut by it. The connection's loop (`conn.rs`) polls the
//! timer only while it waits for a head and restarts it when a response has been written.
//! A coarse sleep ([`crate::timer`]): it ends up to a tenth of a second late, and moving it
//! takes the lock of the thread's own sleep table, not a timer-wheel operation per request. Closing is what hyper's timeout did
//! too: no response, the socket closed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::timer::Sleep;

/// The deadline of a connection's current wait for a request head.
#[derive(Debug)]
pub struct HeadTimer {
    timeout: Duration,
    sleep: Sleep,
}

impl HeadTimer {
    /// A new connection: it waits for its first head from now on.
    pub fn start(timeout: Duration) -> HeadTimer {
        HeadTimer {
            timeout,
            sleep: Sleep::until(Instant::now() + timeout),
        }
    }

    /// A response was written: the wait for the next head starts now.
    pub fn restart(&mut self) {
        self.sleep.reset(crate::timer::now() + self.timeout);
    }

    /// Ready once the current wait has lasted longer than the timeout.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.sleep).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_that_sends_no_head_expires() {
        let mut t = HeadTimer::start(Duration::from_millis(50));
        std::future::poll_fn(|cx| t.poll_expired(cx)).await;
    }

    #[tokio::test]
    async fn a_restart_measures_the_wait_from_now() {
        let timeout = Duration::from_millis(300);
        let mut t = HeadTimer::start(timeout);
        tokio::time::sleep(timeout / 2).await;
        t.restart();
        let restarted = Instant::now();
        std::future::poll_fn(|cx| t.poll_expired(cx)).await;
        assert!(restarted.elapsed() >= timeout);
    }
}

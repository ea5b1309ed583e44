//! The client header timeout (`CLIENT_HEADER_TIMEOUT_SECS`), kept by the accept loop instead
//! of hyper: a connection waiting for a request head (the first one, or the next one on an idle
//! keep-alive connection) is closed once it has waited that long; a connection serving a
//! request (reading its body, writing its response, however long it streams) is never cut by
//! it.
//!
//! The connection's service marks the head complete ([`HeadWait::started`], when hyper calls
//! it) and the response's body marks it finished ([`Rearm`], when hyper drops it, which it does
//! once the response is written or abandoned); the connection task watches both through a
//! [`HeadDeadline`], whose coarse sleep ([`crate::timer`]) is moved only when a response
//! finishes. Ours rather than hyper's `header_read_timeout` because with a timer configured
//! hyper arms a new sleep and turns its dispatcher once more for every request: about 1 000
//! instructions per proxied request (callgrind, issue 18). Closing is what hyper's timeout did
//! too: no response, the socket closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::timer::Sleep;

/// What the service and the response body tell the connection task.
#[derive(Debug)]
pub struct HeadWait {
    /// True while the connection waits for a request head.
    waiting: AtomicBool,
    /// Responses finished so far: a change means the wait for a head began anew.
    finished: AtomicU32,
}

impl HeadWait {
    /// A request head arrived: the connection no longer waits for one.
    pub fn started(&self) {
        self.waiting.store(false, Ordering::Release);
    }

    /// A response finished: the wait for the next head begins.
    fn finished(&self) {
        self.finished.fetch_add(1, Ordering::Release);
        self.waiting.store(true, Ordering::Release);
    }
}

/// The connection task's side: the deadline of the current wait for a head.
#[derive(Debug)]
pub struct HeadDeadline {
    wait: Arc<HeadWait>,
    timeout: Duration,
    sleep: Sleep,
    /// Whether `sleep` holds the current wait's deadline.
    armed: bool,
    /// `wait.finished` when `sleep` was last set.
    seen: u32,
}

impl HeadDeadline {
    /// A new connection: it waits for its first head from now on.
    pub fn start(timeout: Duration) -> HeadDeadline {
        HeadDeadline {
            wait: Arc::new(HeadWait {
                waiting: AtomicBool::new(true),
                finished: AtomicU32::new(0),
            }),
            timeout,
            sleep: Sleep::until(Instant::now() + timeout),
            armed: true,
            seen: 0,
        }
    }

    /// For the connection's service and its responses.
    pub fn wait(&self) -> Arc<HeadWait> {
        self.wait.clone()
    }

    /// Ready when the connection has been waiting for a head longer than the timeout; call it
    /// after each poll of the connection (a head that arrived meanwhile is seen first).
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.wait.waiting.load(Ordering::Acquire) {
            // Serving a request. The sleep stays registered with its old deadline; if it fires
            // meanwhile the task is woken for nothing, once.
            self.armed = false;
            return Poll::Pending;
        }
        let finished = self.wait.finished.load(Ordering::Acquire);
        if !self.armed || finished != self.seen {
            // A response finished since the last look (possibly within one poll of the
            // connection, head and all): the wait for the next head starts now.
            self.sleep.reset(Instant::now() + self.timeout);
            self.armed = true;
            self.seen = finished;
        }
        Pin::new(&mut self.sleep).poll(cx)
    }
}

/// A response body that tells its connection when it is done with (dropped by hyper).
#[derive(Debug)]
pub struct Rearm<B> {
    body: B,
    wait: Arc<HeadWait>,
}

impl<B> Rearm<B> {
    pub fn new(body: B, wait: Arc<HeadWait>) -> Rearm<B> {
        Rearm { body, wait }
    }
}

impl<B> Drop for Rearm<B> {
    fn drop(&mut self) {
        self.wait.finished();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Rearm<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[tokio::test]
    async fn a_connection_that_sends_no_head_expires() {
        let mut d = HeadDeadline::start(Duration::from_millis(50));
        std::future::poll_fn(|cx| d.poll_expired(cx)).await;
    }

    #[tokio::test]
    async fn no_expiry_while_a_request_is_served_and_a_fresh_wait_after_it() {
        let timeout = Duration::from_millis(200);
        let mut d = HeadDeadline::start(timeout);
        let wait = d.wait();
        assert!(d.poll_expired(&mut cx()).is_pending());
        // A head arrives; the request is served for longer than the timeout.
        wait.started();
        tokio::time::sleep(timeout * 2).await;
        assert!(
            d.poll_expired(&mut cx()).is_pending(),
            "serving is never cut"
        );
        // The response ends: a new wait, measured from now.
        response_ends_and_the_wait_starts_anew(&mut d, &wait, timeout).await;
    }

    /// Ends a response (its body dropped) and checks that the next expiry comes a whole
    /// `timeout` later.
    async fn response_ends_and_the_wait_starts_anew(
        d: &mut HeadDeadline,
        wait: &Arc<HeadWait>,
        timeout: Duration,
    ) {
        drop(Rearm::new((), wait.clone()));
        let rearmed = Instant::now();
        std::future::poll_fn(|cx| d.poll_expired(cx)).await;
        assert!(
            rearmed.elapsed() >= timeout,
            "the wait was measured from the response's end"
        );
    }

    #[tokio::test]
    async fn a_request_served_within_one_poll_still_restarts_the_wait() {
        let timeout = Duration::from_millis(300);
        let mut d = HeadDeadline::start(timeout);
        let wait = d.wait();
        assert!(d.poll_expired(&mut cx()).is_pending());
        tokio::time::sleep(timeout / 2).await;
        // Head, service and response all inside one poll of the connection: the task never
        // sees `waiting` false.
        wait.started();
        response_ends_and_the_wait_starts_anew(&mut d, &wait, timeout).await;
    }
}

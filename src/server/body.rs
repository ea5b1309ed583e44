//! The request body under the `CLIENT_BODY_TIMEOUT_SECS` timer: a read that waits longer than
//! the timeout between two frames fails with [`BodyTimeout`].
//!
//! Ours rather than `tower_http::timeout::TimeoutBody` for two reasons measured with callgrind
//! (issue 18): that one sets a timer on every read, also when the data is already there (a
//! small request's whole body arrives with its head, so the timer was set and cancelled for
//! nothing), and it does not pass on `is_end_stream` and `size_hint`, so that a reader could
//! not tell that one frame was the whole body and collected a list of frames instead. Here the
//! timer is set only when a read has to wait, and the body's end and size are the inner body's.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// A request body that fails when its client pauses longer than `timeout` between frames.
pub struct ReadTimeout<B = super::RequestBody> {
    timeout: Duration,
    /// Running while a read waits for data; cleared by each frame.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    body: B,
}

impl<B> ReadTimeout<B> {
    pub fn new(timeout: Duration, body: B) -> ReadTimeout<B> {
        ReadTimeout {
            timeout,
            sleep: None,
            body,
        }
    }
}

impl ReadTimeout<super::RequestBody> {
    /// The body's bytes when it arrived whole with the request's head (nothing to wait for,
    /// so no timer); the body itself otherwise.
    pub fn into_whole(self) -> Result<bytes::Bytes, Self> {
        let ReadTimeout {
            timeout,
            sleep,
            body,
        } = self;
        body.into_whole().map_err(|body| ReadTimeout {
            timeout,
            sleep,
            body,
        })
    }
}

/// The error of a body whose client paused longer than `CLIENT_BODY_TIMEOUT_SECS`.
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client sent no body data within CLIENT_BODY_TIMEOUT_SECS")
    }
}

impl std::error::Error for BodyTimeout {}

impl<B> Body for ReadTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.sleep = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let timeout = this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
            Poll::Pending => Poll::Pending,
        }
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
    use http_body_util::BodyExt;

    /// A body that has one frame ready, then waits forever.
    struct OneThenStall(Option<Bytes>);

    impl Body for OneThenStall {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }

    #[tokio::test]
    async fn a_ready_frame_passes_and_a_pause_longer_than_the_timeout_fails() {
        let mut body = ReadTimeout::new(
            Duration::from_millis(50),
            OneThenStall(Some(Bytes::from_static(b"ab"))),
        );
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"ab")));
        assert!(body.sleep.is_none(), "no timer for data that was there");
        let started = tokio::time::Instant::now();
        let err = body.frame().await.expect("an end").expect_err("a timeout");
        assert!(err.is::<BodyTimeout>(), "{err}");
        // The stall is endless, so only a lower bound is certain.
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn the_end_and_size_are_the_inner_bodys() {
        let body = ReadTimeout::new(
            Duration::from_secs(5),
            http_body_util::Full::new(Bytes::from_static(b"abc")),
        );
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        let mut body = body;
        let _ = body.frame().await;
        assert!(body.is_end_stream());
    }
}

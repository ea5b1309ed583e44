//! Reads and writes on a plain TCP socket with the system calls made directly (issue 18): the
//! client's connection, and an upstream connection without TLS. Knows nothing of HTTP; a
//! bottom module like `net`.
//!
//! Why not tokio's own reads and writes: they call the C library's `recv` and `send`, and in a
//! process with more than one thread glibc brackets each of those with its thread-cancellation
//! bookkeeping (`__pthread_enable_asynccancel` / `__pthread_disable_asynccancel`), two atomic
//! compare-and-swaps per call. A proxied request makes four such calls; `perf` put the eight
//! atomics at about 0.12 µs a request, more than 1 % of its CPU (nothing here uses thread
//! cancellation, which Rust never does). `syscall(2)` makes the same call without them. The
//! readiness bookkeeping stays tokio's: [`tokio::net::TcpStream::try_io`] clears the socket's
//! readiness when the call would block, and after a read that did not fill the room (the
//! socket is then empty, as tokio's own reads assume on Linux), so the next read waits for the
//! next event instead of making a system call that finds nothing.

pub mod outbox;

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The least room a read is given when the buffer has none.
const MIN_ROOM: usize = 64;

/// Reads what `tcp` has into the spare room of `buf`: how many bytes (`Ok(0)`: the peer closed
/// its side). Pending until the socket is readable.
pub fn poll_recv(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if buf.capacity() == buf.len() {
        buf.reserve(MIN_ROOM);
    }
    let fd = tcp.as_raw_fd();
    loop {
        ready!(tcp.poll_read_ready(cx))?;
        let room = buf.spare_capacity_mut();
        let (ptr, len) = (room.as_mut_ptr().cast::<u8>(), room.len());
        let mut got = 0;
        let read = tcp.try_io(Interest::READABLE, || {
            let n = recv(fd, ptr, len)?;
            got = n;
            if n > 0 && n < len {
                // The socket is empty now: tokio clears its readiness on this error.
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                continue
            }
            Err(e) => return Poll::Ready(Err(e)),
        }
        // SAFETY: the kernel wrote `got` bytes at the start of the spare room.
        unsafe { buf.set_len(buf.len() + got) };
        return Poll::Ready(Ok(got));
    }
}

/// Writes what it can of `data` to `tcp`: how many bytes. Pending until the socket is
/// writable.
pub fn poll_send(tcp: &TcpStream, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
    let fd = tcp.as_raw_fd();
    loop {
        ready!(tcp.poll_write_ready(cx))?;
        match tcp.try_io(Interest::WRITABLE, || send(fd, data)) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Writes all of `data` to `tcp`.
pub async fn send_all(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = poll_fn(|cx| poll_send(tcp, cx, data)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

/// `recv(fd, ptr, len, 0)`.
#[cfg(target_os = "linux")]
fn recv(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<usize> {
    // SAFETY: recvfrom writes at most `len` bytes at `ptr`, room the caller's buffer owns; the
    // null address and length ask for no peer address. Every argument is passed as a `long`.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            libc::c_long::from(fd),
            ptr,
            len,
            0 as libc::c_long,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `send(fd, data, MSG_NOSIGNAL)`: a closed peer is an error (`EPIPE`), not a signal.
#[cfg(target_os = "linux")]
fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: sendto reads `data.len()` bytes at `data`; the null address sends on the
    // connection. Every argument is passed as a `long`.
    let n = unsafe {
        libc::syscall(
            libc::SYS_sendto,
            libc::c_long::from(fd),
            data.as_ptr(),
            data.len(),
            libc::c_long::from(libc::MSG_NOSIGNAL),
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::c_long,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Elsewhere the C library's calls (the cancellation bookkeeping is glibc's).
#[cfg(not(target_os = "linux"))]
fn recv(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<usize> {
    // SAFETY: recv writes at most `len` bytes at `ptr`, room the caller's buffer owns.
    let n = unsafe { libc::recv(fd, ptr.cast(), len, 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(not(target_os = "linux"))]
fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: send reads `data.len()` bytes at `data`.
    let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    async fn recv_some(tcp: &TcpStream, buf: &mut BytesMut) -> usize {
        // Generous: reached only if a read never wakes, which is the bug this would show.
        tokio::time::timeout(
            Duration::from_secs(20),
            poll_fn(|cx| poll_recv(tcp, cx, buf)),
        )
        .await
        .expect("the read woke")
        .unwrap()
    }

    #[tokio::test]
    async fn what_one_side_sends_the_other_reads_and_a_close_reads_as_zero() {
        let (a, mut b) = pair().await;
        send_all(&a, b"hello, upstream").await.unwrap();
        // A small buffer: reads that fill it and reads that grow it.
        let mut got = BytesMut::with_capacity(4);
        while got.len() < 15 {
            recv_some(&b, &mut got).await;
        }
        assert_eq!(&got[..], b"hello, upstream");
        b.write_all(b"answer").await.unwrap();
        let mut back = BytesMut::with_capacity(64);
        assert_eq!(recv_some(&a, &mut back).await, 6);
        assert_eq!(&back[..], b"answer");
        drop(b);
        assert_eq!(
            recv_some(&a, &mut back).await,
            0,
            "the peer's close reads as 0"
        );
    }

    #[tokio::test]
    async fn a_read_that_emptied_the_socket_still_wakes_for_the_next_bytes() {
        let (mut a, b) = pair().await;
        let mut buf = BytesMut::with_capacity(1024);
        for round in 0..50u8 {
            a.write_all(&[round; 3]).await.unwrap();
            let mut seen = 0;
            while seen < 3 {
                seen += recv_some(&b, &mut buf).await;
            }
        }
        assert_eq!(buf.len(), 150);
        assert!(buf.chunks(3).enumerate().all(|(i, c)| c == [i as u8; 3]));
    }

    #[tokio::test]
    async fn a_large_write_waits_for_a_slow_reader_and_arrives_whole() {
        let (a, mut b) = pair().await;
        let data: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = b.read(&mut chunk).await.unwrap();
                if n == 0 {
                    return all;
                }
                all.extend_from_slice(&chunk[..n]);
            }
        });
        send_all(&a, &data).await.unwrap();
        drop(a);
        assert!(reader.await.unwrap() == data);
    }

    #[tokio::test]
    async fn writing_to_a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = pair().await;
        drop(b);
        let mut failed = false;
        for _ in 0..100 {
            if send_all(&a, &[0u8; 64 * 1024]).await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "writes to a closed connection fail");
    }
}

//! The "stop answering pings" fault switch. tungstenite always answers pings, so this sits
//! between it and the socket and drops server pong frames from the outgoing byte stream
//! while the switch is on.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const OPCODE_PONG: u8 = 0xA;

pub struct PongFilter<S> {
    inner: S,
    drop_pongs: Arc<AtomicBool>,
    hdr: [u8; 14],
    hdr_len: usize,
    hdr_need: usize,
    hdr_written: usize,
    /// Payload bytes left in the current frame, once its header is complete.
    remaining: Option<u64>,
    dropping: bool,
    /// Off during the HTTP upgrade, whose bytes are not websocket frames.
    framing: bool,
}

impl<S> PongFilter<S> {
    pub fn new(inner: S, drop_pongs: Arc<AtomicBool>) -> Self {
        PongFilter {
            inner,
            drop_pongs,
            hdr: [0; 14],
            hdr_len: 0,
            hdr_need: 2,
            hdr_written: 0,
            remaining: None,
            dropping: false,
            framing: false,
        }
    }

    /// Call once the upgrade response is written: from here on the stream is frames.
    pub fn start_framing(&mut self) {
        self.framing = true;
    }

    fn absorb_header(&mut self, buf: &[u8]) -> usize {
        let take = (self.hdr_need - self.hdr_len).min(buf.len());
        self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&buf[..take]);
        self.hdr_len += take;
        if self.hdr_len == 2 {
            let ext = match self.hdr[1] & 0x7F {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask = if self.hdr[1] & 0x80 != 0 { 4 } else { 0 };
            self.hdr_need = 2 + ext + mask;
        }
        if self.hdr_len == self.hdr_need {
            let len = match self.hdr[1] & 0x7F {
                126 => u16::from_be_bytes([self.hdr[2], self.hdr[3]]) as u64,
                127 => u64::from_be_bytes(self.hdr[2..10].try_into().unwrap_or([0; 8])),
                n => n as u64,
            };
            self.remaining = Some(len);
            self.dropping =
                self.drop_pongs.load(Ordering::Relaxed) && self.hdr[0] & 0x0F == OPCODE_PONG;
            self.hdr_written = if self.dropping { self.hdr_len } else { 0 };
        }
        take
    }

    fn next_frame(&mut self) {
        self.hdr_len = 0;
        self.hdr_need = 2;
        self.hdr_written = 0;
        self.remaining = None;
        self.dropping = false;
    }
}

impl<S: AsyncWrite + Unpin> PongFilter<S> {
    /// Writes header bytes that were taken from the caller but not yet passed on.
    fn poll_pending_header(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.remaining.is_some() && self.hdr_written < self.hdr_len {
            let n = ready!(
                Pin::new(&mut self.inner).poll_write(cx, &self.hdr[self.hdr_written..self.hdr_len])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.hdr_written += n;
        }
        if self.remaining == Some(0) {
            self.next_frame();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PongFilter<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PongFilter<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !this.framing {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        ready!(this.poll_pending_header(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let Some(remaining) = this.remaining else {
            let took = this.absorb_header(buf);
            // A frame with no payload is complete with its header.
            let _ = this.poll_pending_header(cx)?;
            return Poll::Ready(Ok(took));
        };
        let take = remaining.min(buf.len() as u64) as usize;
        let n = if this.dropping {
            take
        } else {
            ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..take]))?
        };
        this.remaining = Some(remaining - n as u64);
        if this.remaining == Some(0) {
            this.next_frame();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending_header(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending_header(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        if payload.len() < 126 {
            f.push(payload.len() as u8);
        } else {
            f.push(126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    async fn filtered(on: bool, input: &[u8], step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut f = PongFilter::new(&mut out, Arc::new(AtomicBool::new(on)));
        f.start_framing();
        for chunk in input.chunks(step) {
            f.write_all(chunk).await.unwrap();
        }
        f.flush().await.unwrap();
        drop(f);
        out
    }

    #[tokio::test]
    async fn drops_only_pong_frames_while_on_whatever_the_write_sizes() {
        let big = vec![7u8; 300];
        let mut input = frame(0x2, b"data");
        input.extend(frame(OPCODE_PONG, b"123"));
        input.extend(frame(0x2, &big));
        input.extend(frame(OPCODE_PONG, b""));
        input.extend(frame(0x9, b"p"));
        let mut expected = frame(0x2, b"data");
        expected.extend(frame(0x2, &big));
        expected.extend(frame(0x9, b"p"));
        for step in [1, 2, 3, 7, 64, 1000] {
            assert_eq!(filtered(true, &input, step).await, expected, "step {step}");
            assert_eq!(filtered(false, &input, step).await, input, "step {step}");
        }
    }
}

#[cfg(test)]
mod partial_writes {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Accepts a random number of bytes per call and is sometimes not ready.
    struct Choppy {
        out: Vec<u8>,
        rng: fastrand::Rng,
    }

    impl AsyncWrite for Choppy {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.rng.u8(..) < 64 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = self.rng.usize(1..=buf.len().min(50));
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn partial_and_pending_inner_writes_keep_the_stream_intact() {
        let mut input = Vec::new();
        let mut expected = Vec::new();
        let mut rng = fastrand::Rng::with_seed(3);
        for i in 0..200 {
            let pong = i % 3 == 0;
            let len = rng.usize(0..400);
            let mut f = vec![0x80 | if pong { OPCODE_PONG } else { 0x2 }];
            if len < 126 {
                f.push(len as u8);
            } else {
                f.push(126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            f.extend((0..len).map(|_| rng.u8(..)));
            input.extend_from_slice(&f);
            if !pong {
                expected.extend_from_slice(&f);
            }
        }
        let mut f = PongFilter::new(
            Choppy {
                out: Vec::new(),
                rng: fastrand::Rng::with_seed(9),
            },
            Arc::new(AtomicBool::new(true)),
        );
        f.start_framing();
        let mut pos = 0;
        while pos < input.len() {
            let n = (pos + rng.usize(1..700)).min(input.len());
            f.write_all(&input[pos..n]).await.unwrap();
            pos = n;
        }
        f.flush().await.unwrap();
        assert_eq!(f.inner.out, expected);
    }
}

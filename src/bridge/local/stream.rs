//! A local socket, TCP or Unix, and how a destination connects to one.

use std::io;
use std::net::Shutdown;

use bytes::BufMut;
use tokio::net::{TcpStream, UnixStream};

use crate::lookup::Lookups;
use crate::services::LocalEndpoint;

/// A local socket. Both directions work through `&self`: the connection's task reads and
/// writes it, and the session writes to it directly while nothing is queued (`Sink`).
#[derive(Debug)]
pub enum LocalStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl LocalStream {
    pub(super) async fn readable(&self) -> io::Result<()> {
        match self {
            LocalStream::Tcp(s) => s.readable().await,
            LocalStream::Unix(s) => s.readable().await,
        }
    }

    pub(super) fn try_read_buf(&self, buf: &mut impl BufMut) -> io::Result<usize> {
        match self {
            LocalStream::Tcp(s) => s.try_read_buf(buf),
            LocalStream::Unix(s) => s.try_read_buf(buf),
        }
    }

    pub(super) async fn writable(&self) -> io::Result<()> {
        match self {
            LocalStream::Tcp(s) => s.writable().await,
            LocalStream::Unix(s) => s.writable().await,
        }
    }

    pub(super) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LocalStream::Tcp(s) => s.try_write(buf),
            LocalStream::Unix(s) => s.try_write(buf),
        }
    }

    /// Half-close: the consumer reads EOF after what was written.
    pub(super) fn shutdown_write(&self) -> io::Result<()> {
        match self {
            LocalStream::Tcp(s) => socket2::SockRef::from(s).shutdown(Shutdown::Write),
            LocalStream::Unix(s) => socket2::SockRef::from(s).shutdown(Shutdown::Write),
        }
    }

    /// Makes the close that follows a TCP reset (RST): unsent data is discarded at once
    /// instead of lingering in kernel buffers for a consumer that does not read.
    pub(super) fn reset_on_close(&self) {
        if let LocalStream::Tcp(s) = self {
            let _ = s.set_zero_linger();
        }
    }

    /// Connects to `endpoint`; a host name is resolved through `lookups`, which keep
    /// `hold` until the resolver answers.
    pub async fn connect<H: Send + 'static>(
        endpoint: &LocalEndpoint,
        lookups: &Lookups,
        hold: H,
    ) -> io::Result<Self> {
        match endpoint {
            LocalEndpoint::Tcp { host, port } => {
                let mut last = None;
                for addr in lookups.resolve(host, *port, hold).await? {
                    match TcpStream::connect(addr).await {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(LocalStream::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))
                }))
            }
            LocalEndpoint::Unix(path) => Ok(LocalStream::Unix(UnixStream::connect(path).await?)),
        }
    }
}

//! Local services and checked transfers for the integration tests and the demo.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ring::digest::{Context, SHA256};
use tokio::io::{AsyncBufReadExt, BufReader, Interest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

/// A port that was free a moment ago on 127.0.0.1, for programs that cannot bind port 0
/// and report back (mosquitto, rumqttd, a child process). Callers retry if it was taken.
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`, `RssAnon:`, `RssFile:`).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident KiB of the mappings of file `image` in process `pid` (`/proc/<pid>/smaps`): how
/// much of a binary is in memory, also when qemu-user maps an ARM binary for its guest.
/// `None` when the process maps no such file (`image` must be the canonical path).
pub fn mapped_file_rss_kib(pid: u32, image: &std::path::Path) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let image = image.to_str()?;
    let mut total = None;
    let mut in_image = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            // A mapping's header: "start-end perms offset dev inode [path]".
            Some(f) if f.contains('-') && !f.ends_with(':') => {
                in_image = fields.nth(4) == Some(image);
            }
            Some("Rss:") if in_image => {
                *total.get_or_insert(0) += fields.next()?.parse::<u64>().ok()?;
            }
            _ => {}
        }
    }
    total
}

/// A local service for tests. Dropping it stops accepting; connections already accepted
/// live on until their client closes them.
pub struct EchoService {
    pub addr: Option<SocketAddr>,
    accepted: Arc<AtomicU64>,
    closed: watch::Receiver<u64>,
    _task: AbortOnDropHandle<()>,
}

/// What the service does with each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Echo,
    /// Echoes with reads and writes of random sizes (1 byte to 128 KiB).
    EchoRandomSizes,
    /// Never reads: a stuck consumer.
    Stuck,
}

impl EchoService {
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Waits until `n` connections have ended (the other side closed them).
    pub async fn wait_closed(&mut self, n: u64) {
        let _ = self.closed.wait_for(|c| *c >= n).await;
    }

    pub fn closed(&self) -> u64 {
        *self.closed.borrow()
    }
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn echo<S: AsyncRead + AsyncWrite>(s: S) {
    let (mut r, mut w) = tokio::io::split(s);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// Echoes with reads of random sizes, each written back whole.
async fn echo_random_sizes<S: AsyncRead + AsyncWrite>(s: S) {
    let (mut r, mut w) = tokio::io::split(s);
    let mut rng = fastrand::Rng::new();
    let mut buf = vec![0u8; 128 << 10];
    loop {
        let want = rng.usize(1..=buf.len());
        match r.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = w.shutdown().await;
}

async fn serve(conn: Conn, how: Behaviour, closed: Arc<watch::Sender<u64>>) {
    match (how, conn) {
        (Behaviour::Echo, Conn::Tcp(s)) => echo(s).await,
        (Behaviour::Echo, Conn::Unix(s)) => echo(s).await,
        (Behaviour::EchoRandomSizes, Conn::Tcp(s)) => echo_random_sizes(s).await,
        (Behaviour::EchoRandomSizes, Conn::Unix(s)) => echo_random_sizes(s).await,
        // Never reads; ends when the peer resets the connection.
        (Behaviour::Stuck, Conn::Tcp(s)) => {
            let _ = s.ready(Interest::ERROR).await;
        }
        (Behaviour::Stuck, Conn::Unix(s)) => {
            let _ = s.ready(Interest::ERROR).await;
        }
    }
    closed.send_modify(|c| *c += 1);
}

enum AnyListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

fn spawn_service(listener: AnyListener, how: Behaviour, addr: Option<SocketAddr>) -> EchoService {
    let accepted = Arc::new(AtomicU64::new(0));
    let (closed_tx, closed) = watch::channel(0);
    let closed_tx = Arc::new(closed_tx);
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let conn = match &listener {
                AnyListener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
                AnyListener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
            };
            let Ok(conn) = conn else { return };
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(serve(conn, how, closed_tx.clone()));
        }
    });
    EchoService {
        addr,
        accepted,
        closed,
        _task: AbortOnDropHandle::new(task),
    }
}

pub async fn echo_tcp(bind: &str) -> io::Result<EchoService> {
    service_tcp(bind, Behaviour::Echo).await
}

pub async fn service_tcp(bind: &str, how: Behaviour) -> io::Result<EchoService> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    Ok(spawn_service(AnyListener::Tcp(listener), how, Some(addr)))
}

pub fn echo_unix(path: &Path) -> io::Result<EchoService> {
    service_unix(path, Behaviour::Echo)
}

/// A Unix-socket service: its small socket buffers (no TCP autotuning) make a consumer
/// that does not read back up quickly.
pub fn service_unix(path: &Path, how: Behaviour) -> io::Result<EchoService> {
    let listener = UnixListener::bind(path)?;
    Ok(spawn_service(AnyListener::Unix(listener), how, None))
}

#[derive(Debug, Clone)]
pub struct TransferReport {
    pub bytes: u64,
    pub elapsed: Duration,
    pub sha256: String,
}

impl TransferReport {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes `echo_transfer` sends after the data, to catch a longer echo.
pub const SENTINEL_LEN: usize = 16;

/// Writes `size` pseudo-random bytes (from `seed`) through an echo path while reading the
/// echo back; fails unless the echo has the same length and SHA-256 as what was sent and
/// nothing more (a sentinel written after the data must come back next). A cut connection
/// is an I/O error (EOF, reset); wrong data is `InvalidData`.
pub async fn echo_transfer<S>(stream: S, size: usize, seed: u64) -> io::Result<TransferReport>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    echo_transfer_in(stream, size, seed, false).await
}

/// As `echo_transfer`, writing in chunks of random sizes (1 byte to 128 KiB), so the path's
/// local reads come in every size.
pub async fn echo_transfer_random_sizes<S>(
    stream: S,
    size: usize,
    seed: u64,
) -> io::Result<TransferReport>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    echo_transfer_in(stream, size, seed, true).await
}

async fn echo_transfer_in<S>(
    stream: S,
    size: usize,
    seed: u64,
    random_sizes: bool,
) -> io::Result<TransferReport>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let start = Instant::now();
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut sent = Context::new(&SHA256);
        let mut buf = vec![0u8; if random_sizes { 128 << 10 } else { 48 << 10 }];
        let mut left = size;
        while left > 0 {
            let chunk = if random_sizes {
                rng.usize(1..=buf.len())
            } else {
                buf.len()
            };
            let n = left.min(chunk);
            rng.fill(&mut buf[..n]);
            sent.update(&buf[..n]);
            w.write_all(&buf[..n]).await?;
            left -= n;
        }
        w.flush().await?;
        Ok::<_, io::Error>((sent.finish(), w))
    });
    let mut got = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0usize;
    while received < size {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("echo ended after {received} of {size} bytes"),
            ));
        }
        got.update(&buf[..n]);
        received += n;
    }
    let (sent, mut w) = writer.await.map_err(io::Error::other)??;
    // A sentinel after the data: bytes beyond `size` (a duplicated tail) come back first.
    let sentinel: [u8; SENTINEL_LEN] =
        std::array::from_fn(|i| (seed as u8).wrapping_add(i as u8) ^ 0xA5);
    w.write_all(&sentinel).await?;
    let mut back = [0u8; SENTINEL_LEN];
    r.read_exact(&mut back).await?;
    if back != sentinel {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("echo has bytes beyond the {size} sent"),
        ));
    }
    let (sent, got) = (hex(sent.as_ref()), hex(got.finish().as_ref()));
    if sent != got || received != size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "echo differs: sent {size} bytes sha256 {sent}, got {received} bytes sha256 {got}"
            ),
        ));
    }
    Ok(TransferReport {
        bytes: size as u64,
        elapsed: start.elapsed(),
        sha256: sent,
    })
}

/// Waits until the peer closes the connection (EOF or error), discarding data.
pub async fn wait_closed<S: AsyncRead + Unpin>(s: &mut S) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Lines a child process writes, kept and awaitable: tests and the demo wait for log lines
/// as events instead of sleeping.
#[derive(Clone)]
pub struct LogTail {
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
}

impl LogTail {
    /// Follows `reader` line by line; each line is also echoed to stderr with `prefix`
    /// unless the prefix is empty.
    pub fn follow<R: AsyncRead + Unpin + Send + 'static>(
        reader: R,
        prefix: &'static str,
    ) -> LogTail {
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, count) = watch::channel(0);
        let store = lines.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(reader).lines();
            while let Ok(Some(line)) = r.next_line().await {
                if !prefix.is_empty() {
                    eprintln!("[{prefix}] {line}");
                }
                let n = {
                    let mut v = store.lock().unwrap_or_else(|e| e.into_inner());
                    v.push(line);
                    v.len()
                };
                tx.send_replace(n);
            }
        });
        LogTail { lines, count }
    }

    fn with<T>(&self, f: impl FnOnce(&Vec<String>) -> T) -> T {
        f(&self.lines.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Index and text of the first line at or after `from` that matches; `None` once the
    /// stream has ended without one.
    pub async fn wait(&self, from: usize, pred: impl Fn(&str) -> bool) -> Option<(usize, String)> {
        let mut count = self.count.clone();
        loop {
            let hit = self.with(|v| {
                v.iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, l)| pred(l))
                    .map(|(i, l)| (i, l.clone()))
            });
            if hit.is_some() {
                return hit;
            }
            if count.changed().await.is_err() {
                return None;
            }
        }
    }

    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.with(|v| v.iter().filter(|l| pred(l)).count())
    }

    pub fn text(&self) -> String {
        self.with(|v| v.join("\n"))
    }
}

/// The workspace's Python venv (`.venv`, made by the test set-up with boto3 and aws-cli).
pub fn venv_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv")
}

/// A program from the workspace's venv; the error says how to create it.
pub fn venv_bin(name: &str) -> Result<PathBuf, String> {
    let p = venv_dir().join("bin").join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing: run ./test.sh once (it creates .venv with boto3 and awscli)",
            p.display()
        ))
    }
}

/// A modelled service error, as boto3 reports it: (code, message).
pub type ServiceError = (String, String);

/// One iotsecuretunneling call through boto3 (`tools/tunnels.py`) against a control plane
/// at `endpoint` (`http://127.0.0.1:PORT`): the response or the service's error; `Err` when
/// boto3 itself could not run.
pub async fn boto3(
    endpoint: &str,
    op: &str,
    params: serde_json::Value,
) -> Result<Result<serde_json::Value, ServiceError>, String> {
    let python = venv_bin("python")?;
    let out = tokio::process::Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/tunnels.py"))
        .arg(endpoint)
        .arg(op)
        .arg(params.to_string())
        .output()
        .await
        .map_err(|e| format!("cannot run boto3: {e}"))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|_| {
        format!(
            "boto3 printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if out.status.success() {
        Ok(Ok(v))
    } else {
        let field = |k: &str| v[k].as_str().unwrap_or("").to_owned();
        Ok(Err((field("error"), field("message"))))
    }
}

/// A TCP relay on a free loopback port in front of `target`. `black_hole` turns the
/// connections open at that moment into dead links: nothing is forwarded any more in either
/// direction and nothing is closed, as when a cellular link changes address. Connections
/// made afterwards are relayed normally.
pub struct TcpRelay {
    pub addr: SocketAddr,
    hole: Arc<std::sync::Mutex<tokio_util::sync::CancellationToken>>,
    accepted: Arc<AtomicU64>,
    _task: AbortOnDropHandle<()>,
}

impl TcpRelay {
    pub async fn start(target: SocketAddr) -> io::Result<TcpRelay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hole = Arc::new(std::sync::Mutex::new(
            tokio_util::sync::CancellationToken::new(),
        ));
        let accepted = Arc::new(AtomicU64::new(0));
        let (holes, count) = (hole.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    a = listener.accept() => {
                        let Ok((client, _)) = a else { return };
                        count.fetch_add(1, Ordering::Relaxed);
                        let hole = holes.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        conns.spawn(relay_one(client, target, hole));
                    }
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Ok(TcpRelay {
            addr,
            hole,
            accepted,
            _task: AbortOnDropHandle::new(task),
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Every connection open now becomes a dead link (kept open, nothing forwarded).
    pub fn black_hole(&self) {
        let mut h = self.hole.lock().unwrap_or_else(|e| e.into_inner());
        h.cancel();
        *h = tokio_util::sync::CancellationToken::new();
    }
}

async fn relay_one(
    mut client: TcpStream,
    target: SocketAddr,
    hole: tokio_util::sync::CancellationToken,
) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = hole.cancelled() => {
            // Both sockets stay open and unread until the relay goes away.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_file_rss_counts_only_the_named_files_mappings() {
        let pid = std::process::id();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let own = mapped_file_rss_kib(pid, &exe).unwrap();
        // The test binary runs: some of its code is resident, and it is not all of RSS.
        assert!(own > 0, "no resident pages of {}", exe.display());
        assert!(own < proc_status_kib(pid, "VmRSS:").unwrap());
        let other = std::path::Path::new("/nonexistent/binary");
        assert_eq!(mapped_file_rss_kib(pid, other), None);
    }
}

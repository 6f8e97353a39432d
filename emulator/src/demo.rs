//! The local demo: the emulator, a local echo service, and the agent binary started twice
//! (destination and source) as the reference localproxy would be; one sha256-checked
//! transfer; then the service closes the tunnel and both processes exit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::testkit::{echo_tcp, echo_transfer};
use super::{Emulator, EmulatorConfig, EmulatorTls};
use securetunnel_agent::cli::ENV_ACCESS_TOKEN;
use securetunnel_agent::protocol::Mode;

pub struct DemoOptions {
    /// The `securetunnel-agent` binary.
    pub agent: PathBuf,
    pub bytes: usize,
    pub work_dir: PathBuf,
    /// Re-frame the relayed byte stream (the demo shows it; the bench measures without).
    pub reframe: bool,
}

#[derive(Debug)]
pub struct DemoReport {
    pub sha256: String,
    pub mib_per_s: f64,
    pub dest_peak_rss_kib: Option<u64>,
    pub dest_cpu_s: Option<f64>,
}

type DemoResult<T> = Result<T, String>;

fn step(n: u32, text: &str) {
    println!("[{n}/6] {text}");
}

fn spawn_agent(opts: &DemoOptions, name: &str, token: &str, args: &[String]) -> DemoResult<Child> {
    let log = std::fs::File::create(opts.work_dir.join(format!("{name}.log")))
        .map_err(|e| e.to_string())?;
    Command::new(&opts.agent)
        .arg("local-proxy")
        .args(args)
        .env(ENV_ACCESS_TOKEN, token)
        .env_remove("AWSIOT_TUNNEL_CLIENT_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {}: {e} (build it with cargo build --release)",
                opts.agent.display()
            )
        })
}

/// CPU seconds a process has run (user + system), to the nanosecond, exited threads
/// included: its process CPU clock. (`/proc/<pid>/stat` counts 10 ms ticks, 3% of a 512 MiB
/// push.)
fn cpu_seconds(pid: u32) -> Option<f64> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for the clock id.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    // SAFETY: all zeroes is a valid timespec (32-bit time64 targets add private padding).
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid place for the time.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

async fn wait_exit(child: &mut Child, name: &str) -> DemoResult<i32> {
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(status)) => Ok(status.code().unwrap_or(-1)),
        Ok(Err(e)) => Err(format!("{name}: {e}")),
        Err(_) => Err(format!("{name} did not exit after the tunnel closed")),
    }
}

/// The emulator over TLS, its CA in the work directory, re-framing as `opts` says.
async fn emulator_with_ca(opts: &DemoOptions) -> DemoResult<(Emulator, PathBuf)> {
    let emu = Emulator::start(EmulatorConfig::loopback(EmulatorTls::Generate))
        .await
        .map_err(|e| e.to_string())?;
    let ca = opts.work_dir.join("emulator-ca.pem");
    std::fs::write(&ca, emu.ca_pem().unwrap_or_default()).map_err(|e| e.to_string())?;
    emu.set_reframe(opts.reframe);
    Ok((emu, ca))
}

/// `local-proxy` arguments for one end (`-d` or `-s` with its map) against `emu`.
fn proxy_args(emu: &Emulator, ca: &Path, mode: &str, map: String, verbose: &str) -> Vec<String> {
    [
        "-e",
        &emu.endpoint(),
        "-c",
        &ca.display().to_string(),
        mode,
        &map,
        "-v",
        verbose,
    ]
    .map(str::to_owned)
    .to_vec()
}

pub async fn run(opts: &DemoOptions) -> DemoResult<DemoReport> {
    let (emu, ca) = emulator_with_ca(opts).await?;
    step(
        1,
        &format!(
            "tunneling-service emulator on wss://{} (re-framing {})",
            emu.addr(),
            if opts.reframe { "on" } else { "off" }
        ),
    );

    let t = emu.open_tunnel(&["ECHO"], Duration::from_secs(600));
    let echo = echo_tcp("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let echo_addr = echo.addr.ok_or("echo service has no address")?;
    step(
        2,
        &format!(
            "tunnel {} opened for service ECHO -> local echo service {echo_addr}",
            t.tunnel_id
        ),
    );

    let common = |m: &str, map: String| proxy_args(&emu, &ca, m, map, "4");
    let mut dest = spawn_agent(
        opts,
        "destination",
        &t.destination_access_token,
        &common("-d", format!("ECHO={echo_addr}")),
    )?;
    let dest_pid = dest.id().ok_or("destination exited at once")?;
    wait_peer(&emu, &t.tunnel_id, Mode::Destination).await?;
    step(3, &format!("destination agent (pid {dest_pid}) connected"));

    let port = super::testkit::free_port().map_err(|e| e.to_string())?;
    let mut src = spawn_agent(
        opts,
        "source",
        &t.source_access_token,
        &common("-s", format!("ECHO={port}")),
    )?;
    wait_peer(&emu, &t.tunnel_id, Mode::Source).await?;
    step(
        4,
        &format!(
            "source local proxy (pid {}) connected, listening on 127.0.0.1:{port}",
            src.id().unwrap_or(0)
        ),
    );

    let cpu_before = cpu_seconds(dest_pid);
    let client = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let report = echo_transfer(client, opts.bytes, 42)
        .await
        .map_err(|e| e.to_string())?;
    let dest_cpu_s = cpu_seconds(dest_pid).zip(cpu_before).map(|(a, b)| a - b);
    let dest_peak_rss_kib = super::testkit::proc_status_kib(dest_pid, "VmHWM:");
    let mib = opts.bytes >> 20;
    step(
        5,
        &format!(
            "{mib} MiB echoed through the tunnel: sha256 {} matches ({:.0} MiB/s each way)",
            report.sha256,
            report.mib_per_s()
        ),
    );
    print_destination_cost(dest_peak_rss_kib, dest_cpu_s, opts.bytes);

    close_and_wait(&emu, &t.tunnel_id, &mut dest, &mut src, opts).await?;
    Ok(DemoReport {
        mib_per_s: report.mib_per_s(),
        sha256: report.sha256,
        dest_peak_rss_kib,
        dest_cpu_s,
    })
}

/// The destination's peak RSS and CPU for the echo, when /proc tells.
fn print_destination_cost(rss_kib: Option<u64>, cpu_s: Option<f64>, bytes: usize) {
    let (Some(rss), Some(cpu)) = (rss_kib, cpu_s) else {
        return;
    };
    let mib = bytes >> 20;
    let gib = 2.0 * bytes as f64 / (1u64 << 30) as f64;
    println!(
        "      destination: peak RSS {:.1} MiB; CPU {cpu:.2} s for {} MiB relayed ({:.2} s/GiB)",
        rss as f64 / 1024.0,
        2 * mib,
        cpu / gib
    );
}

/// Step 6: the service closes the tunnel and both ends exit 0.
async fn close_and_wait(
    emu: &crate::Emulator,
    tunnel_id: &str,
    dest: &mut Child,
    src: &mut Child,
    opts: &DemoOptions,
) -> DemoResult<()> {
    emu.close_tunnel(tunnel_id);
    let (d, s) = (
        wait_exit(dest, "destination").await?,
        wait_exit(src, "source").await?,
    );
    step(
        6,
        &format!("service closed the tunnel: destination exited {d}, source exited {s}"),
    );
    if d != 0 || s != 0 {
        return Err(format!(
            "unexpected exit status; logs in {}",
            opts.work_dir.display()
        ));
    }
    Ok(())
}

/// A 1-way push: what `push` measured.
#[derive(Debug)]
pub struct PushReport {
    pub mib_per_s: f64,
    /// CPU seconds per GiB pushed, destination and source.
    pub dest_s_per_gib: f64,
    pub source_s_per_gib: f64,
    pub dest_peak_rss_kib: u64,
}

/// Source -> destination -> a local sink that only reads: `opts.agent` as the destination,
/// `source_agent` as the source, one frame per websocket message (as the service delivers a
/// localproxy source's frames), `conns` connections at once each pushing its share of
/// `opts.bytes`. CPU is counted from the first byte to the sink's last.
pub async fn push(opts: &DemoOptions, source_agent: &Path, conns: usize) -> DemoResult<PushReport> {
    if conns == 0 {
        return Err("push needs at least one connection".into());
    }
    let (emu, ca) = emulator_with_ca(opts).await?;
    let t = emu.open_tunnel(&["PUSH"], Duration::from_secs(600));
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let sink_addr = sink.local_addr().map_err(|e| e.to_string())?;
    let total = opts.bytes;
    let (_sink_task, mut arrived) = spawn_sink(sink, conns);
    let args = |m: &str, map: String| proxy_args(&emu, &ca, m, map, "3");
    let mut dest = spawn_agent(
        opts,
        "destination",
        &t.destination_access_token,
        &args("-d", format!("PUSH={sink_addr}")),
    )?;
    let dest_pid = dest.id().ok_or("destination exited at once")?;
    wait_peer(&emu, &t.tunnel_id, Mode::Destination).await?;
    let port = super::testkit::free_port().map_err(|e| e.to_string())?;
    let src_opts = DemoOptions {
        agent: source_agent.to_owned(),
        bytes: opts.bytes,
        work_dir: opts.work_dir.clone(),
        reframe: opts.reframe,
    };
    let mut src = spawn_agent(
        &src_opts,
        "source",
        &t.source_access_token,
        &args("-s", format!("PUSH={port}")),
    )?;
    let src_pid = src.id().ok_or("source exited at once")?;
    wait_peer(&emu, &t.tunnel_id, Mode::Source).await?;
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        clients.push(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let (d0, s0) = (cpu_seconds(dest_pid), cpu_seconds(src_pid));
    let start = std::time::Instant::now();
    let mut writers = spawn_writers(clients, total);
    let open = all_arrived(&mut writers, &mut arrived, total).await?;
    let (got, each) = arrived.borrow().clone();
    let secs = start.elapsed().as_secs_f64();
    let (d1, s1) = (cpu_seconds(dest_pid), cpu_seconds(src_pid));
    if got != total {
        return Err(format!("the sink received {got} of {total} bytes"));
    }
    check_shares(each, total, conns)?;
    let gib = total as f64 / (1u64 << 30) as f64;
    let per_gib =
        |a: Option<f64>, b: Option<f64>| a.zip(b).map_or(f64::NAN, |(a, b)| (a - b) / gib);
    let report = PushReport {
        mib_per_s: (total >> 20) as f64 / secs,
        dest_s_per_gib: per_gib(d1, d0),
        source_s_per_gib: per_gib(s1, s0),
        dest_peak_rss_kib: super::testkit::proc_status_kib(dest_pid, "VmHWM:").unwrap_or(0),
    };
    drop(open);
    emu.close_tunnel(&t.tunnel_id);
    wait_exit(&mut dest, "destination").await?;
    wait_exit(&mut src, "source").await?;
    Ok(report)
}

/// The sink's reader of each accepted connection; `arrived` holds the sum and each
/// connection's count. Aborted (with its readers) when the handle drops.
fn spawn_sink(
    sink: tokio::net::TcpListener,
    conns: usize,
) -> (
    tokio_util::task::AbortOnDropHandle<()>,
    tokio::sync::watch::Receiver<(usize, Vec<usize>)>,
) {
    use tokio::io::AsyncReadExt;
    let (arrived_tx, arrived) = tokio::sync::watch::channel((0usize, vec![0usize; conns]));
    let task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let mut readers = tokio::task::JoinSet::new();
        for i in 0..conns {
            let Ok((mut c, _)) = sink.accept().await else {
                break;
            };
            let arrived = arrived_tx.clone();
            readers.spawn(async move {
                let mut buf = vec![0u8; 256 << 10];
                while let Ok(n @ 1..) = c.read(&mut buf).await {
                    arrived.send_modify(|(sum, each)| {
                        *sum += n;
                        each[i] += n;
                    });
                }
            });
        }
        while readers.join_next().await.is_some() {}
    }));
    (task, arrived)
}

/// Each client pushes its share; it is kept open until the sink has everything (closing is
/// not part of the push).
fn spawn_writers(
    clients: Vec<TcpStream>,
    total: usize,
) -> tokio::task::JoinSet<std::io::Result<TcpStream>> {
    use tokio::io::AsyncWriteExt;
    let conns = clients.len();
    let mut writers = tokio::task::JoinSet::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let share = push_share(total, conns, i);
        writers.spawn(async move {
            let chunk = vec![0x5au8; 256 << 10];
            let mut sent = 0;
            while sent < share {
                let n = chunk.len().min(share - sent);
                client.write_all(&chunk[..n]).await?;
                sent += n;
            }
            Ok::<TcpStream, std::io::Error>(client)
        });
    }
    writers
}

/// Waits for every writer and for the sink to have `total` bytes: 30 s plus a second per
/// MiB for both. Returns the client connections, still open.
async fn all_arrived(
    writers: &mut tokio::task::JoinSet<std::io::Result<TcpStream>>,
    arrived: &mut tokio::sync::watch::Receiver<(usize, Vec<usize>)>,
    total: usize,
) -> DemoResult<Vec<TcpStream>> {
    let limit = Duration::from_secs(30 + (total >> 20) as u64);
    let pushed = tokio::time::timeout(limit, async {
        let mut open = Vec::new();
        while let Some(r) = writers.join_next().await {
            open.push(r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?);
        }
        // Ends when everything arrived, or when every sink connection has ended (then short).
        let _ = arrived.wait_for(|(sum, _)| *sum >= total).await;
        Ok::<_, String>(open)
    })
    .await;
    match pushed {
        Ok(r) => r,
        Err(_) => {
            let got = arrived.borrow().0;
            Err(format!(
                "the sink received {got} of {total} bytes in {limit:?}"
            ))
        }
    }
}

/// Each connection's bytes arrived on its own connection to the sink.
fn check_shares(mut each: Vec<usize>, total: usize, conns: usize) -> DemoResult<()> {
    let mut shares: Vec<usize> = (0..conns).map(|i| push_share(total, conns, i)).collect();
    shares.sort_unstable();
    each.sort_unstable();
    if each != shares {
        return Err(format!(
            "the sink connections received {each:?} bytes, the clients sent {shares:?}"
        ));
    }
    Ok(())
}

/// Connection `i`'s share of a push: shares differ by at most one byte, the first ones take
/// the remainder.
fn push_share(total: usize, conns: usize, i: usize) -> usize {
    total / conns + usize::from(i < total % conns)
}

async fn wait_peer(emu: &Emulator, tunnel: &str, mode: Mode) -> DemoResult<()> {
    tokio::time::timeout(Duration::from_secs(20), emu.wait_peer(tunnel, mode, true))
        .await
        .map_err(|_| format!("the {mode} did not connect within 20 s"))
}

/// The agent binary: `SECURETUNNEL_DEMO_AGENT` (e.g. a qemu wrapper for an ARM build), else
/// the one next to the running executable (both are built by `cargo build --workspace`).
pub fn sibling_agent() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SECURETUNNEL_DEMO_AGENT") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.join("securetunnel-agent");
    Path::exists(&path).then_some(path)
}

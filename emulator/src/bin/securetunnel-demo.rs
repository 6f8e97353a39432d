//! securetunnel-demo: the product working on one machine, no AWS account, no installed
//! broker. `cargo build --release --workspace && target/release/securetunnel-demo`.
//!
//!   securetunnel-demo [MiB]            the agent flow: open, transfer, rotate, transfer, close
//!   securetunnel-demo local-proxy [MiB] two local-proxy processes through the emulator
//!   securetunnel-demo push [MiB] [CONNS] 1-way push source -> destination -> sink, CPU per GiB
//!                                      (DEMO_REFRAME=1: the emulator cuts messages at random)
//!   securetunnel-demo latency [runs]    notify->connected and rotation switchover, p50/p95
//!   securetunnel-demo memory [conns]    agent RSS idle, and with idle connections

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use securetunnel_emulator::{demo, demo_agent};

fn main() -> ExitCode {
    let Some(agent) = demo::sibling_agent() else {
        eprintln!(
            "securetunnel-demo: securetunnel-agent not found next to this program; run cargo build --release --workspace first"
        );
        return ExitCode::FAILURE;
    };
    warn_if_stale(&agent);
    // The demo checks every step itself; DEMO_LOG=3..6 shows its in-process parts' logs.
    let level = std::env::var("DEMO_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    securetunnel_agent::cli::init_logging(level);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let work_dir = std::env::temp_dir().join(format!("securetunnel-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&work_dir) {
        eprintln!("securetunnel-demo: {}: {e}", work_dir.display());
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("securetunnel-demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(&args, agent, &work_dir));
    match result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&work_dir);
            println!("demo passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo FAILED: {e}\n(files kept in {})", work_dir.display());
            ExitCode::FAILURE
        }
    }
}

/// `cargo run -p securetunnel-emulator` rebuilds the demo but not the agent it drives: warn
/// when the agent binary is older than the agent's own sources (when they are at hand).
/// The demo itself is always linked after the agent, so its own age says nothing.
fn warn_if_stale(agent: &Path) {
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src");
    let (Some(built), Some(newest)) = (modified(agent), newest_in(&sources)) else {
        return;
    };
    if built < newest {
        eprintln!(
            "securetunnel-demo: warning: {} is older than the agent's sources; cargo build --release --workspace rebuilds it",
            agent.display()
        );
    }
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The newest modification time of the files under `dir`, recursively.
fn newest_in(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_in(&path)
        } else {
            modified(&path)
        };
        newest = newest.max(t);
    }
    newest
}

fn number(args: &[String], i: usize, default: usize) -> usize {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

async fn dispatch(args: &[String], agent: PathBuf, work_dir: &Path) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("local-proxy") => {
            let opts = demo::DemoOptions {
                agent,
                bytes: number(args, 1, 64) << 20,
                work_dir: work_dir.to_owned(),
                reframe: std::env::var_os("DEMO_NO_REFRAME").is_none(),
            };
            demo::run(&opts).await.map(|_| ())
        }
        Some("push") => push(args, agent, work_dir).await,
        Some("latency") => demo_agent::latency(&agent, work_dir, number(args, 1, 20))
            .await
            .map(|_| ()),
        Some("memory") => {
            let conns = number(args, 1, 100);
            let (idle, loaded) = demo_agent::memory(&agent, work_dir, conns).await?;
            println!(
                "agent RSS idle (MQTT subscribed, one tunnel connected): {:.2} MiB",
                idle as f64 / 1024.0
            );
            println!(
                "agent RSS with {conns} idle TCP connections: {:.2} MiB (+{:.1} KiB per connection)",
                loaded as f64 / 1024.0,
                loaded.saturating_sub(idle) as f64 / conns as f64
            );
            Ok(())
        }
        _ => demo_agent::run(&agent, work_dir, number(args, 0, 16) << 20).await,
    }
}

async fn push(args: &[String], agent: PathBuf, work_dir: &Path) -> Result<(), String> {
    // SECURETUNNEL_DEMO_SOURCE: the source's binary (default: the destination's).
    let source =
        std::env::var_os("SECURETUNNEL_DEMO_SOURCE").map_or_else(|| agent.clone(), PathBuf::from);
    let opts = demo::DemoOptions {
        agent,
        bytes: number(args, 1, 512) << 20,
        work_dir: work_dir.to_owned(),
        // One tunnel frame per message, as the service delivers a localproxy source's;
        // DEMO_REFRAME=1 cuts them at random (mixed record sizes).
        reframe: std::env::var_os("DEMO_REFRAME").is_some(),
    };
    let conns = number(args, 2, 1);
    let r = demo::push(&opts, &source, conns).await?;
    println!(
        "push {} MiB over {conns} connection(s): {:.0} MiB/s; destination {:.3} s/GiB, peak RSS {:.1} MiB; source {:.3} s/GiB",
        opts.bytes >> 20,
        r.mib_per_s,
        r.dest_s_per_gib,
        r.dest_peak_rss_kib as f64 / 1024.0,
        r.source_s_per_gib
    );
    Ok(())
}

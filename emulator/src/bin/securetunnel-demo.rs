//! securetunnel-demo: the product working on one machine, no AWS account, no installed
//! broker. `cargo build --release --workspace && target/release/securetunnel-demo`.
//!
//!   securetunnel-demo [MiB]            the agent flow: open, transfer, rotate, transfer, close
//!   securetunnel-demo local-proxy [MiB] two local-proxy processes through the emulator
//!   securetunnel-demo push [MiB] [CONNS] 1-way push source -> destination -> sink, CPU per GiB
//!                                      (DEMO_REFRAME=1: the emulator cuts messages at random)
//!   securetunnel-demo latency [runs]    notify->connected and rotation switchover, p50/p95
//!   securetunnel-demo memory [conns]    agent RSS idle, and with idle connections

use std::process::ExitCode;

use securetunnel_emulator::{demo, demo_agent};

fn main() -> ExitCode {
    let Some(agent) = demo::sibling_agent() else {
        eprintln!(
            "securetunnel-demo: securetunnel-agent not found next to this program; run cargo build --release --workspace first"
        );
        return ExitCode::FAILURE;
    };
    // `cargo run -p securetunnel-emulator` rebuilds the demo but not the agent it drives.
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(agent_t), Some(demo_t)) = (
        modified(&agent),
        std::env::current_exe().ok().as_deref().and_then(modified),
    ) {
        if agent_t < demo_t {
            eprintln!(
                "securetunnel-demo: warning: {} is older than this demo; cargo build --workspace rebuilds both",
                agent.display()
            );
        }
    }
    // The demo checks every step itself; DEMO_LOG=3..6 shows its in-process parts' logs.
    let level = std::env::var("DEMO_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    securetunnel_agent::cli::init_logging(level);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
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
    let result = runtime.block_on(async {
        match args.first().map(String::as_str) {
            Some("local-proxy") => {
                let opts = demo::DemoOptions {
                    agent,
                    bytes: number(1, 64) << 20,
                    work_dir: work_dir.clone(),
                    reframe: std::env::var_os("DEMO_NO_REFRAME").is_none(),
                };
                demo::run(&opts).await.map(|_| ())
            }
            Some("push") => {
                // SECURETUNNEL_DEMO_SOURCE: the source's binary (default: the destination's).
                let source = std::env::var_os("SECURETUNNEL_DEMO_SOURCE")
                    .map_or_else(|| agent.clone(), std::path::PathBuf::from);
                let opts = demo::DemoOptions {
                    agent: agent.clone(),
                    bytes: number(1, 512) << 20,
                    work_dir: work_dir.clone(),
                    // One tunnel frame per message, as the service delivers a localproxy
                    // source's; DEMO_REFRAME=1 cuts them at random (mixed record sizes).
                    reframe: std::env::var_os("DEMO_REFRAME").is_some(),
                };
                let conns = number(2, 1);
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
            Some("latency") => demo_agent::latency(&agent, &work_dir, number(1, 20))
                .await
                .map(|_| ()),
            Some("memory") => {
                let conns = number(1, 100);
                let (idle, loaded) = demo_agent::memory(&agent, &work_dir, conns).await?;
                println!("agent RSS idle (MQTT subscribed, one tunnel connected): {:.2} MiB", idle as f64 / 1024.0);
                println!(
                    "agent RSS with {conns} idle TCP connections: {:.2} MiB (+{:.1} KiB per connection)",
                    loaded as f64 / 1024.0,
                    loaded.saturating_sub(idle) as f64 / conns as f64
                );
                Ok(())
            }
            _ => demo_agent::run(&agent, &work_dir, number(0, 16) << 20).await,
        }
    });
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

//! The README's demos, run as the `securetunnel-demo` binary runs them, with the agent binary
//! under test: the headline flow (embedded broker, emulator, the agent process with a config
//! file: open, transfer, rotate, transfer, close, SIGTERM exit 0), the `local-proxy` pair and
//! the push benchmark.

use securetunnel_emulator::demo::{DemoOptions, push, run};
use securetunnel_emulator::demo_agent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_headline_demo_opens_rotates_and_closes_a_tunnel_and_the_agent_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let agent = std::path::Path::new(env!("CARGO_BIN_EXE_securetunnel-agent"));
    if let Err(e) = demo_agent::run(agent, dir.path(), 4 << 20).await {
        panic!("demo failed: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_proxy_demo_moves_data_between_two_agent_processes_and_both_exit_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        agent: env!("CARGO_BIN_EXE_securetunnel-agent").into(),
        bytes: 8 << 20,
        work_dir: dir.path().to_owned(),
        reframe: true,
    };
    let report = run(&opts).await.unwrap_or_else(|e| {
        for log in ["destination.log", "source.log"] {
            let text = std::fs::read_to_string(dir.path().join(log)).unwrap_or_default();
            eprintln!("--- {log}\n{text}");
        }
        panic!("demo failed: {e}")
    });
    assert_eq!(report.sha256.len(), 64);
    let logs = std::fs::read_to_string(dir.path().join("destination.log")).unwrap();
    assert!(logs.contains("websocket connected"), "{logs}");
    assert!(!logs.contains("AQGA"), "the access token reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_benchmark_delivers_every_byte_over_several_connections_and_measures_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let agent = std::path::PathBuf::from(env!("CARGO_BIN_EXE_securetunnel-agent"));
    let opts = DemoOptions {
        agent: agent.clone(),
        // Not a multiple of the connection count: the shares differ by a byte.
        bytes: (8 << 20) + 3,
        work_dir: dir.path().to_owned(),
        reframe: false,
    };
    let report = push(&opts, &agent, 8)
        .await
        .unwrap_or_else(|e| panic!("push failed: {e}"));
    assert!(report.mib_per_s > 0.0, "{report:?}");
    assert!(
        report.dest_s_per_gib.is_finite() && report.dest_s_per_gib >= 0.0,
        "{report:?}"
    );
    assert!(report.dest_peak_rss_kib > 0, "{report:?}");
}

//! The README's demo, run exactly as the `securetunnel-demo` binary runs it: the real agent
//! binary as destination and source processes, through the emulator.

use securetunnel_emulator::demo::{DemoOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_moves_data_between_two_agent_processes_and_both_exit_cleanly() {
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

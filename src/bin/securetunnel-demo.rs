//! securetunnel-demo: shows the product working on one machine, no AWS account needed.
//! Build everything first: `cargo build --release && target/release/securetunnel-demo`.

use std::process::ExitCode;

use securetunnel_agent::emulator::demo::{self, DemoOptions};

fn main() -> ExitCode {
    let Some(agent) = demo::sibling_agent() else {
        eprintln!(
            "securetunnel-demo: securetunnel-agent not found next to this program; run cargo build --release first"
        );
        return ExitCode::FAILURE;
    };
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64);
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
    let opts = DemoOptions {
        agent,
        bytes: mib << 20,
        work_dir: work_dir.clone(),
    };
    match runtime.block_on(demo::run(&opts)) {
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&work_dir);
            println!("demo passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

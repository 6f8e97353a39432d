//! securetunnel-agent: parses the command line and wires the library together.

use std::process::ExitCode;

// The static builds cache freed message buffers: musl's allocator unmaps large blocks on
// every free, on every architecture (block_cache.rs has the rationale).
#[cfg_attr(not(target_env = "musl"), allow(dead_code))]
mod block_cache;
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: block_cache::BlockCache = block_cache::BlockCache::new();

use clap::Parser;
use securetunnel_agent::cli::{self, Cli, Command};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    securetunnel_agent::signals::ignore_hangup();
    let args = Cli::parse();
    // `local-proxy` dies with its terminal, as the reference localproxy does.
    if matches!(args.command, Command::LocalProxy(_)) {
        securetunnel_agent::signals::default_hangup();
    }
    // The quick commands need neither logging nor the runtime.
    match &args.command {
        Command::CheckConfig { user } => return cli::check_config(&args.config, user.as_deref()),
        Command::Status { json } => return cli::status(&args.config, *json),
        _ => {}
    }
    cli::init_logging(args.verbose);
    // One thread: a gateway has few cores and the relay is I/O-bound.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("securetunnel-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        // An idle gateway gives the static build's cached message buffers back.
        #[cfg(target_env = "musl")]
        tokio::spawn(ALLOCATOR.trim_when_idle());
        let cancel = CancellationToken::new();
        if let Err(e) = securetunnel_agent::signals::cancel_on_signals(cancel.clone()) {
            eprintln!("securetunnel-agent: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
        match args.command {
            Command::Run => cli::run_agent(&args.config, cancel).await,
            Command::CheckConfig { .. } | Command::Status { .. } => ExitCode::SUCCESS,
            Command::LocalProxy(a) => cli::local_proxy(*a, cancel).await,
            Command::Doctor {
                regions,
                client_id,
                json,
            } => cli::doctor(&args.config, regions, client_id, json, cancel).await,
        }
    });
    // Blocking work still running (a name lookup, a token stuck in its module) is not waited
    // for: the process is ending.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

//! SIGINT/SIGTERM as a cancellation: the caller owns the token, so tests can trigger it too.

use tokio_util::sync::CancellationToken;
use tracing::info;

/// Cancels `token` on the first SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
    Ok(())
}

/// Ignores SIGHUP. First thing in `main`: a SIGHUP during start-up (a reload sent while the
/// agent starts, or right after a re-exec, which resets caught signals) must not kill the
/// process, which procd would count as a crash. An ignored signal stays ignored across an
/// exec; the agent installs its reload handler before anything slow.
pub fn ignore_hangup() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// SIGHUP back to its default (the process ends), for commands that do not reload.
pub fn default_hangup() {
    // SAFETY: setting a signal's disposition to SIG_DFL has no preconditions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    /// Ignored signals stay ignored across exec: a re-executed agent is covered until its
    /// `main` runs.
    #[test]
    fn an_ignored_sighup_stays_ignored_in_an_executed_program() {
        super::ignore_hangup();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("grep SigIgn /proc/self/status")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mask =
            u64::from_str_radix(text.trim().trim_start_matches("SigIgn:").trim(), 16).unwrap();
        assert_ne!(mask & (1 << (libc::SIGHUP - 1)), 0, "{text}");
    }
}

//! Rate limits on the log lines a peer or a local client can provoke at will (refusals,
//! bad messages, connects), so a flood costs a few lines per minute, not one per message.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// What a rate-limited line is about; each kind has its own allowance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A bad message from the peer.
    Violation,
    /// A stream or connection refused (unmapped service, limit reached).
    Refusal,
    /// A stream replacing another, or a connection id reused.
    Replace,
    /// A local connect.
    LocalConnect,
    /// A local connect that failed.
    LocalConnectFailed,
    /// A reset from the peer.
    PeerReset,
    /// A connection reset because its consumer stalled.
    Stall,
}

const KINDS: usize = 7;

/// Lines of one kind logged per window.
pub const LINES_PER_WINDOW: u32 = 10;
/// The window of `LINES_PER_WINDOW`.
pub const WINDOW: Duration = Duration::from_secs(60);

/// One kind's allowance within the current window.
#[derive(Clone, Copy, Debug, Default)]
struct Allowance {
    window_start: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl Allowance {
    /// Rule (bounded logs): at most `LINES_PER_WINDOW` lines of a kind per `WINDOW`; the
    /// first line of a new window says how many were suppressed before it.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= WINDOW);
        if fresh {
            self.window_start = Some(now);
            self.lines = 0;
        }
        if self.lines >= LINES_PER_WINDOW {
            self.suppressed += 1;
            return None;
        }
        self.lines += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The allowances of one bridge, shared by its session and connection tasks.
#[derive(Debug, Default)]
pub struct LogRate {
    kinds: Mutex<[Allowance; KINDS]>,
}

impl LogRate {
    /// `Some(lines suppressed since the previous one)` when a line of `kind` may be logged.
    pub fn admit(&self, kind: Kind) -> Option<u64> {
        let now = Instant::now();
        // A poisoned lock only means another task panicked mid-update: the counts stay usable.
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds[kind as usize].admit(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_most_lines_per_window_then_suppressed_count() {
        let rate = LogRate::default();
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(rate.admit(Kind::Refusal), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(rate.admit(Kind::Refusal), None);
        }
        // Other kinds keep their own allowance.
        assert_eq!(rate.admit(Kind::Violation), Some(0));
        tokio::time::advance(WINDOW).await;
        assert_eq!(rate.admit(Kind::Refusal), Some(5));
        assert_eq!(rate.admit(Kind::Refusal), Some(0));
    }
}

//! Reconnect policies for one gateway and for a fleet, in one place: the websocket's and
//! MQTT's backoff as pure state driven by the caller's clock, so the fleet simulation
//! (`benches/fleet.rs`) runs exactly the code the agent runs.

use std::time::Duration;

use tokio::time::Instant;

/// A connection that stayed up this long ends its failure streak; one that is dropped sooner
/// (a service or path that accepts and then drops) keeps backing off.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// AWS IoT accepts one CONNECT per second per client id.
pub const MQTT_MIN_CONNECT_SPACING: Duration = Duration::from_secs(1);

/// Exponential backoff with jitter. The n-th consecutive failure waits uniformly in
/// [c/2, c] with c = min(cap, base x 2^n): the floor makes the pace deterministic (with a
/// 0.5 s base and a 30 s cap, at most 8 attempts in any first minute) and the jitter
/// spreads a fleet that failed together.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A policy from `base` (first ceiling is 2 x base) up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self::with_rng(base, cap, fastrand::Rng::new())
    }

    /// The same with a given random source (simulations and tests seed it).
    pub fn with_rng(base: Duration, cap: Duration, rng: fastrand::Rng) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            failures: 0,
            rng,
        }
    }

    /// Rule: an attempt failed or a connection was lost; returns the delay before the next one.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.cap);
        ceiling.mul_f64(0.5 + 0.5 * self.rng.f64())
    }

    /// Rule: a connection that came up and lasted `up_for` ends the streak only if it was
    /// stable (`STABLE_AFTER`).
    pub fn connection_lasted(&mut self, up_for: Duration) {
        if up_for >= STABLE_AFTER {
            self.failures = 0;
        }
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// MQTT reconnects, shaped by AWS IoT's quotas: never two CONNECTs within a second (per client
/// id), and after an established connection is lost the first attempt is spread uniformly
/// over `spread`, so a fleet that lost its broker at once does not return at once (500
/// CONNECTs per second per account).
#[derive(Clone, Debug)]
pub struct MqttReconnect {
    backoff: Backoff,
    spread: Duration,
    last_connect: Option<Instant>,
}

impl MqttReconnect {
    /// `base`/`cap` for failed attempts, `spread` for the first attempt after a loss.
    pub fn new(base: Duration, cap: Duration, spread: Duration) -> Self {
        Self::with_rng(base, cap, spread, fastrand::Rng::new())
    }

    /// The same with a given random source.
    pub fn with_rng(base: Duration, cap: Duration, spread: Duration, rng: fastrand::Rng) -> Self {
        MqttReconnect {
            backoff: Backoff::with_rng(base, cap, rng),
            spread,
            last_connect: None,
        }
    }

    /// A CONNECT goes out now.
    pub fn connecting(&mut self, now: Instant) {
        self.last_connect = Some(now);
    }

    /// Rule: the delay before the next CONNECT. `up_for` is how long the connection that just
    /// ended had been established (`None`: the attempt itself failed).
    pub fn next_delay(&mut self, now: Instant, up_for: Option<Duration>) -> Duration {
        let delay = match up_for {
            Some(up) if up >= STABLE_AFTER => {
                self.backoff.connection_lasted(up);
                self.spread.mul_f64(self.backoff.rng.f64())
            }
            _ => self.backoff.failed(),
        };
        let earliest = self.last_connect.map_or(Duration::ZERO, |t| {
            (t + MQTT_MIN_CONNECT_SPACING).saturating_duration_since(now)
        });
        delay.max(earliest)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.backoff.failures()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(500);
    const CAP: Duration = Duration::from_secs(30);

    #[test]
    fn backoff_grows_exponentially_within_half_and_whole_of_the_ceiling() {
        let mut b = Backoff::with_rng(BASE, CAP, fastrand::Rng::with_seed(7));
        let mut last_ceiling = Duration::ZERO;
        for n in 1..=10u32 {
            let ceiling = (BASE * 2u32.pow(n)).min(CAP);
            let d = b.failed();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "failure {n}: {d:?} vs {ceiling:?}"
            );
            assert!(ceiling >= last_ceiling);
            last_ceiling = ceiling;
        }
        assert_eq!(last_ceiling, CAP);
        // Jitter: two policies with different seeds differ.
        let mut other = Backoff::with_rng(BASE, CAP, fastrand::Rng::with_seed(8));
        let mut again = Backoff::with_rng(BASE, CAP, fastrand::Rng::with_seed(7));
        assert_ne!(other.failed(), again.failed());
    }

    #[test]
    fn at_most_8_attempts_in_the_first_minute_of_failures() {
        for seed in 0..200 {
            let mut b = Backoff::with_rng(BASE, CAP, fastrand::Rng::with_seed(seed));
            let (mut t, mut attempts) = (Duration::ZERO, 0);
            while t < Duration::from_secs(60) {
                attempts += 1;
                t += b.failed();
            }
            assert!(attempts <= 8, "seed {seed}: {attempts} attempts");
        }
    }

    #[test]
    fn only_a_connection_that_stayed_up_30_s_ends_the_failure_streak() {
        let mut b = Backoff::with_rng(BASE, CAP, fastrand::Rng::with_seed(1));
        for _ in 0..5 {
            b.failed();
        }
        b.connection_lasted(Duration::from_secs(29));
        assert_eq!(b.failures(), 5);
        assert!(b.failed() >= Duration::from_secs(8), "the streak went on");
        b.connection_lasted(STABLE_AFTER);
        assert_eq!(b.failures(), 0);
        assert!(b.failed() <= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn mqtt_counts_failed_attempts_until_a_connection_stays_up() {
        let mut m = MqttReconnect::with_rng(BASE, CAP, Duration::ZERO, fastrand::Rng::with_seed(5));
        let now = Instant::now();
        assert_eq!(m.failures(), 0);
        m.next_delay(now, None);
        m.next_delay(now, Some(Duration::from_secs(2)));
        assert_eq!(
            m.failures(),
            2,
            "a short-lived connection counts as a failure"
        );
        m.next_delay(now, Some(STABLE_AFTER));
        assert_eq!(m.failures(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn mqtt_never_connects_twice_within_a_second() {
        let mut m = MqttReconnect::with_rng(
            Duration::from_millis(1),
            Duration::from_millis(2),
            Duration::ZERO,
            fastrand::Rng::with_seed(3),
        );
        let now = Instant::now();
        m.connecting(now);
        let d = m.next_delay(now + Duration::from_millis(100), None);
        assert_eq!(d, Duration::from_millis(900));
        let d = m.next_delay(now + Duration::from_secs(5), None);
        assert!(d <= Duration::from_millis(2));
    }

    #[tokio::test(start_paused = true)]
    async fn mqtt_spreads_the_first_attempt_after_losing_an_established_connection() {
        let spread = Duration::from_secs(20);
        let now = Instant::now();
        let delays: Vec<Duration> = (0..500)
            .map(|seed| {
                let mut m =
                    MqttReconnect::with_rng(BASE, CAP, spread, fastrand::Rng::with_seed(seed));
                m.connecting(now);
                m.next_delay(
                    now + Duration::from_secs(3600),
                    Some(Duration::from_secs(3600)),
                )
            })
            .collect();
        assert!(delays.iter().all(|d| *d <= spread));
        // Uniform over the window: each quarter gets a fair share.
        for q in 0..4u32 {
            let (lo, hi) = (spread * q / 4, spread * (q + 1) / 4);
            let n = delays.iter().filter(|d| **d >= lo && **d < hi).count();
            assert!((80..=170).contains(&n), "quarter {q}: {n}");
        }
        // A connection that was dropped soon after it came up backs off instead.
        let mut m = MqttReconnect::with_rng(BASE, CAP, spread, fastrand::Rng::with_seed(1));
        let d1 = m.next_delay(now, Some(Duration::from_secs(2)));
        let d2 = m.next_delay(now, Some(Duration::from_secs(2)));
        assert!(d1 <= Duration::from_secs(1) && d2 >= Duration::from_secs(1));
    }
}

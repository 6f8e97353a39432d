//! A fleet of gateways that lose their broker at once, replayed against a token-bucket model
//! of AWS IoT's CONNECT quota (500 per second per account) with the agent's real MQTT
//! reconnect policy (`backoff::MqttReconnect`), beside the policy it replaced. Prints, for
//! 10,000 and 50,000 gateways: attempts per device, peak attempts per second, and the time
//! until every gateway is back.
//!
//! A simulation, not a behaviour test: a `harness = false` bench target whose `main` prints
//! the table (`cargo bench --bench fleet`) and asserts, per fleet size, the bounds
//! docs/performance.md and docs/operations.md state. Cargo.toml gives it `test = true`, so `cargo test` (and
//! ./test.sh) runs those assertions too.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use securetunnel_agent::backoff::MqttReconnect;
use tokio::time::Instant;

/// AWS IoT Core's default CONNECT quota per account.
const CONNECTS_PER_SECOND: f64 = 500.0;
/// How long the gateways had been connected before the broker went away.
const UP_BEFORE: Duration = Duration::from_secs(3600);

/// What a device does after a failed or lost connection.
trait Policy {
    fn delay(&mut self, now: Instant, up_for: Option<Duration>) -> Duration;
    fn connecting(&mut self, now: Instant);
}

impl Policy for MqttReconnect {
    fn delay(&mut self, now: Instant, up_for: Option<Duration>) -> Duration {
        self.next_delay(now, up_for)
    }
    fn connecting(&mut self, now: Instant) {
        MqttReconnect::connecting(self, now)
    }
}

/// The policy before this change: first retry within 0.5 s, then 0.5-60 s full jitter.
struct Previous {
    failures: u32,
    rng: fastrand::Rng,
}

impl Policy for Previous {
    fn delay(&mut self, _now: Instant, _up_for: Option<Duration>) -> Duration {
        let ceiling = Duration::from_millis(500)
            .saturating_mul(1u32 << self.failures.min(16))
            .min(Duration::from_secs(60));
        self.failures += 1;
        ceiling.mul_f64(self.rng.f64())
    }
    fn connecting(&mut self, _now: Instant) {}
}

#[derive(Debug)]
struct Outcome {
    attempts_per_device: f64,
    peak_per_second: u64,
    all_back: Duration,
}

/// Replays `n` devices dropped at once; each CONNECT takes a token from the broker's bucket
/// or is refused (throttled) and counts as a failure.
fn replay<P: Policy>(n: usize, mut policy: impl FnMut(u64) -> P) -> Outcome {
    let start = Instant::now();
    let mut devices: Vec<P> = (0..n as u64).map(&mut policy).collect();
    let mut queue = BinaryHeap::new();
    for (i, d) in devices.iter_mut().enumerate() {
        queue.push(Reverse((d.delay(start, Some(UP_BEFORE)), i)));
    }
    let (mut tokens, mut last) = (CONNECTS_PER_SECOND, Duration::ZERO);
    let (mut attempts, mut back) = (0u64, 0usize);
    let mut per_second: Vec<u64> = Vec::new();
    let mut all_back = Duration::ZERO;
    while let Some(Reverse((at, i))) = queue.pop() {
        tokens =
            (tokens + (at - last).as_secs_f64() * CONNECTS_PER_SECOND).min(CONNECTS_PER_SECOND);
        last = at;
        attempts += 1;
        let second = at.as_secs() as usize;
        if per_second.len() <= second {
            per_second.resize(second + 1, 0);
        }
        per_second[second] += 1;
        let now = start + at;
        devices[i].connecting(now);
        if tokens >= 1.0 {
            tokens -= 1.0;
            back += 1;
            all_back = at;
        } else {
            let next = at + devices[i].delay(now, None);
            queue.push(Reverse((next, i)));
        }
    }
    assert_eq!(back, n);
    Outcome {
        attempts_per_device: attempts as f64 / n as f64,
        peak_per_second: per_second.iter().copied().max().unwrap_or(0),
        all_back,
    }
}

fn current(spread: Duration) -> impl FnMut(u64) -> MqttReconnect {
    move |seed| {
        MqttReconnect::with_rng(
            Duration::from_millis(500),
            Duration::from_secs(60),
            spread,
            fastrand::Rng::with_seed(seed),
        )
    }
}

fn previous(seed: u64) -> Previous {
    Previous {
        failures: 0,
        rng: fastrand::Rng::with_seed(seed),
    }
}

fn main() {
    a_fleet_that_lost_its_broker_returns_within_the_connect_quota();
}

fn a_fleet_that_lost_its_broker_returns_within_the_connect_quota() {
    println!("| gateways | policy | attempts per device | peak attempts/s | all back after |");
    println!("|---|---|---|---|---|");
    for n in [10_000usize, 50_000] {
        let before = replay(n, previous);
        let now = replay(n, current(Duration::from_secs(20)));
        // The spread sized for the fleet: n / 500 seconds.
        let sized_spread = Duration::from_secs_f64(n as f64 / CONNECTS_PER_SECOND);
        let sized = replay(n, current(sized_spread));
        let mut rows = vec![
            ("previous".to_owned(), &before),
            ("spread 20 s (default)".to_owned(), &now),
        ];
        if sized_spread != Duration::from_secs(20) {
            rows.push((format!("spread {} s", sized_spread.as_secs()), &sized));
        }
        for (name, o) in rows {
            println!(
                "| {n} | {name} | {:.2} | {} | {:.1} s |",
                o.attempts_per_device,
                o.peak_per_second,
                o.all_back.as_secs_f64()
            );
        }
        assert!(sized.attempts_per_device < 1.1, "{n}: {sized:?}");
        assert!(
            sized.all_back <= sized_spread + Duration::from_secs(5),
            "{n}: {sized:?}"
        );
        assert!(
            now.attempts_per_device < before.attempts_per_device,
            "{n}: {now:?} vs {before:?}"
        );
        assert!(
            now.peak_per_second < before.peak_per_second,
            "{n}: {now:?} vs {before:?}"
        );
        if n == 10_000 {
            // The quota absorbs the spread fleet: about one attempt each, back in ~20 s.
            assert!(now.attempts_per_device < 1.1, "{now:?}");
            assert!(now.all_back <= Duration::from_secs(25), "{now:?}");
            assert!(now.peak_per_second <= 700, "{now:?}");
        }
    }
}

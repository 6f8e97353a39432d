//! The gateway's tunnel state in its named shadow `securetunnel` (`[shadow] enabled`), so a
//! fleet operator sees from the cloud which gateways have tunnels open. The agent builds a
//! `Report` from its table; the MQTT client publishes it as the shadow's reported state,
//! paced by `Pacer`: on change, at most once per `MIN_INTERVAL`, and once after every
//! connect. Pure: no I/O here.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// The shadow's name.
pub const NAME: &str = "securetunnel";
/// At most one document per this long.
pub const MIN_INTERVAL: Duration = Duration::from_secs(5);
/// AWS IoT's largest shadow state document (8 KiB, without metadata): the encoded document
/// stays below it, tunnels beyond it are counted, not listed.
pub const MAX_DOCUMENT: usize = 8 * 1024;
/// A tunnel's last error is cut to this many characters.
pub const MAX_ERROR_CHARS: usize = 160;
/// Connections lost in a row with a document unacknowledged before the shadow stops: AWS IoT
/// closes the connection of a client that publishes where its policy does not allow.
pub const REFUSALS: u32 = 3;

/// The topic a thing's shadow update is published to.
pub fn topic(thing: &str) -> String {
    format!("$aws/things/{thing}/shadow/name/{NAME}/update")
}

/// Rule (policy hint): the IoT policy statement that lets the gateway publish it.
pub fn policy_statement(thing: &str) -> String {
    format!(
        r#"{{"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:REGION:ACCOUNT:topic/{}"}}"#,
        topic(thing)
    )
}

/// What the agent reports; no token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Whether tunnels may be served now ("always" until site consent exists).
    pub consent: String,
    pub tunnels: Vec<Tunnel>,
}

/// One tunnel (one live token) as the fleet sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Tunnel {
    pub thing: String,
    pub services: Vec<String>,
    /// connecting, connected, reconnecting, draining.
    pub phase: String,
    /// Unix time the current websocket came up (left out while connecting: AWS IoT takes
    /// no null inside an array).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    pub open_connections: usize,
    /// At most `MAX_ERROR_CHARS`; it may name the data-plane endpoint or the proxy's host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Serialize)]
struct Reported<'a> {
    version: &'a str,
    mqtt_connected_since: u64,
    consent: &'a str,
    tunnels: &'a [Tunnel],
    /// Always sent: AWS IoT merges reported state, so a field left out would keep its
    /// last value.
    tunnels_not_listed: usize,
}

fn encode(report: &Report, mqtt_connected_since: u64, listed: usize) -> String {
    let reported = Reported {
        version: env!("CARGO_PKG_VERSION"),
        mqtt_connected_since,
        consent: &report.consent,
        tunnels: &report.tunnels[..listed],
        tunnels_not_listed: report.tunnels.len() - listed,
    };
    serde_json::json!({ "state": { "reported": reported } }).to_string()
}

/// Rule: the update document `{"state":{"reported":{...}}}`, at most `MAX_DOCUMENT` bytes:
/// the tunnels that do not fit are counted in `tunnels_not_listed`.
pub fn document(report: &Report, mqtt_connected_since: u64) -> String {
    // The frame (no tunnel) plus each tunnel's own size and a comma: one pass.
    let mut size = encode(report, mqtt_connected_since, 0).len() + 8;
    let mut listed = 0;
    for t in &report.tunnels {
        size += serde_json::to_string(t).map_or(MAX_DOCUMENT, |s| s.len() + 1);
        if size > MAX_DOCUMENT {
            break;
        }
        listed += 1;
    }
    encode(report, mqtt_connected_since, listed)
}

/// Rule: a tunnel's last error as reported, cut to `MAX_ERROR_CHARS` characters.
pub fn error_text(e: &str) -> String {
    e.chars().take(MAX_ERROR_CHARS).collect()
}

/// Whether the policy refuses the documents: connections lost while one was unacknowledged,
/// with none acknowledged since.
#[derive(Debug, Default)]
pub struct Refusals {
    in_a_row: u32,
}

impl Refusals {
    /// A document was acknowledged: the policy allows them.
    pub fn acked(&mut self) {
        self.in_a_row = 0;
    }

    /// Rule: the connection ended (`unacked`: with a document unacknowledged); true once
    /// `REFUSALS` such ends came with no document acknowledged between: the shadow stops,
    /// or the agent would never stay connected to hear a notify.
    pub fn connection_ended(&mut self, unacked: bool) -> bool {
        if unacked {
            self.in_a_row += 1;
        }
        self.in_a_row >= REFUSALS
    }
}

/// When the next document goes out.
#[derive(Debug, Default)]
pub struct Pacer {
    last: Option<Instant>,
    pending: bool,
}

impl Pacer {
    /// The report changed, or the client (re)connected: a document is owed.
    pub fn owe(&mut self) {
        self.pending = true;
    }

    /// Rule: an owed document goes at once, or `MIN_INTERVAL` after the last one.
    pub fn due(&self, now: Instant) -> Option<Instant> {
        self.pending
            .then(|| self.last.map_or(now, |l| (l + MIN_INTERVAL).max(now)))
    }

    /// A document went out at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.last = Some(now);
        self.pending = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel(n: usize) -> Tunnel {
        Tunnel {
            thing: format!("thing-{n}"),
            services: vec!["SSH".into(), "HTTP".into()],
            phase: "connected".into(),
            since: Some(1_796_000_000),
            open_connections: n,
            last_error: Some("x".repeat(100)),
        }
    }

    #[test]
    fn the_document_is_the_reported_state_without_tokens() {
        let report = Report {
            consent: "always".into(),
            tunnels: vec![tunnel(1)],
        };
        let doc: serde_json::Value = serde_json::from_str(&document(&report, 42)).unwrap();
        let r = &doc["state"]["reported"];
        assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(r["mqtt_connected_since"], 42);
        assert_eq!(r["consent"], "always");
        assert_eq!(r["tunnels"][0]["thing"], "thing-1");
        assert_eq!(r["tunnels"][0]["open_connections"], 1);
        assert_eq!(r["tunnels_not_listed"], 0);
    }

    #[test]
    fn absent_values_are_left_out_of_a_tunnel_not_sent_as_null() {
        let mut t = tunnel(1);
        (t.since, t.last_error) = (None, None);
        let report = Report {
            consent: "always".into(),
            tunnels: vec![t],
        };
        let text = document(&report, 1);
        assert!(!text.contains("null"), "{text}");
    }

    #[test]
    fn an_error_is_cut_to_160_characters() {
        assert_eq!(
            error_text(&"é".repeat(200)).chars().count(),
            MAX_ERROR_CHARS
        );
        assert_eq!(error_text("short"), "short");
    }

    #[test]
    fn the_shadow_stops_after_3_connections_lost_with_a_document_unacknowledged_and_none_acknowledged()
     {
        let mut r = Refusals::default();
        assert!(!r.connection_ended(true));
        assert!(!r.connection_ended(false));
        assert!(!r.connection_ended(true));
        r.acked();
        assert!(!r.connection_ended(true));
        assert!(!r.connection_ended(true));
        assert!(r.connection_ended(true));
    }

    #[test]
    fn tunnels_that_do_not_fit_in_8_kib_are_counted_not_listed() {
        let report = Report {
            consent: "always".into(),
            tunnels: (0..100).map(tunnel).collect(),
        };
        let text = document(&report, 1);
        assert!(text.len() <= MAX_DOCUMENT, "{}", text.len());
        // Not far below it either: the tunnels fill the room.
        assert!(text.len() > MAX_DOCUMENT - 400, "{}", text.len());
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let r = &doc["state"]["reported"];
        let listed = r["tunnels"].as_array().unwrap().len();
        assert!(listed > 0 && listed < 100, "{listed}");
        assert_eq!(r["tunnels_not_listed"], 100 - listed);
    }

    #[test]
    fn a_document_goes_at_once_then_at_most_every_5_seconds() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        assert_eq!(p.due(t0), None);
        p.owe();
        assert_eq!(p.due(t0), Some(t0));
        p.sent(t0);
        assert_eq!(p.due(t0), None);
        // A burst of changes right after: one document, 5 s after the last.
        p.owe();
        p.owe();
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(p.due(t1), Some(t0 + MIN_INTERVAL));
        // A change long after goes at once.
        p.sent(t0 + MIN_INTERVAL);
        p.owe();
        let later = t0 + Duration::from_secs(60);
        assert_eq!(p.due(later), Some(later));
    }

    #[test]
    fn the_policy_statement_names_the_update_topic() {
        let s = policy_statement("gw-1");
        assert!(s.contains("iot:Publish"), "{s}");
        assert!(
            s.contains("topic/$aws/things/gw-1/shadow/name/securetunnel/update"),
            "{s}"
        );
    }
}

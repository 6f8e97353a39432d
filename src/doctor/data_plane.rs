//! Step 6 of `doctor`: for each region, the data plane through the proxy and with the
//! tunnel CA settings a bridge uses, and an upgrade without a token, whose refusal proves
//! the path is open. The refusal's `Date` also checks the gateway's clock.

use std::sync::Arc;

use super::handshake::{Side, failure};
use super::reach::{STEP_TIMEOUT, proxy_failure, tcp_failure};
use super::report::{Check, Report};
use super::times::{http_date, now, utc};
use crate::bridge::{DataEndpoint, HandshakeError, Probe, probe};
use crate::config::Config;

/// Largest difference from the service's clock that passes.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// Rule (which regions): those asked for, else those of live or persisted sessions, else
/// the MQTT endpoint's (`<id>-ats.iot.<region>.amazonaws.com`).
pub fn regions(asked: &[String], sessions: &[String], mqtt_host: &str) -> Vec<String> {
    if !asked.is_empty() {
        return asked.to_vec();
    }
    if !sessions.is_empty() {
        return sessions.to_vec();
    }
    let labels: Vec<&str> = mqtt_host.split('.').collect();
    labels
        .windows(2)
        .find(|w| w[0] == "iot" && crate::protocol::is_valid_region(w[1]))
        .map(|w| vec![w[1].to_owned()])
        .unwrap_or_default()
}

/// The endpoint a bridge would use for `region`, with the proxy and `tunnel.resolve`.
fn endpoint(cfg: &Config, region: &str) -> DataEndpoint {
    let mut e = cfg
        .tunnel
        .endpoint
        .clone()
        .unwrap_or_else(|| DataEndpoint::for_region(region))
        .with_proxy(cfg.proxy.as_ref());
    e.connect_to = crate::config::resolve_override(&cfg.tunnel.resolve, &e);
    e
}

/// The checks for each region (one endpoint when `tunnel.endpoint` overrides them).
pub async fn check(
    report: &mut Report,
    cfg: &Config,
    tls: &Arc<rustls::ClientConfig>,
    regions: &[String],
) {
    if regions.is_empty() && cfg.tunnel.endpoint.is_none() {
        let why = "not checked: no region known (no session, and mqtt.endpoint names none); give one with --region REGION";
        report.add(Check::skip("data-plane", "-", why));
        return;
    }
    let mut endpoints: Vec<(String, DataEndpoint)> = regions
        .iter()
        .map(|r| (r.clone(), endpoint(cfg, r)))
        .collect();
    if cfg.tunnel.endpoint.is_some() {
        endpoints.truncate(1);
        if endpoints.is_empty() {
            endpoints.push(("-".into(), endpoint(cfg, "us-east-1")));
        }
    }
    for (region, e) in endpoints {
        let target = format!("{region} {e}");
        // Directly to a name: resolve it first, so a DNS failure is named as one.
        if e.proxy.is_none() && e.connect_to.is_none() {
            let key = if cfg.tunnel.endpoint.is_some() {
                "tunnel.endpoint"
            } else {
                "--region"
            };
            if super::reach::resolve(report, &e.host, e.port, key)
                .await
                .is_none()
            {
                continue;
            }
        }
        match probe(&e, tls, STEP_TIMEOUT).await {
            Ok(answer) => answered(report, &target, &answer),
            Err(err) => {
                let (saw, fix) = refusal(&err, cfg, &e);
                report.add(Check::fail("data-plane", target, saw, fix));
            }
        }
    }
}

fn answered(report: &mut Report, target: &str, answer: &Probe) {
    report.add(path_verdict(target, answer));
    if let Some(theirs) = answer.date.as_deref().and_then(http_date) {
        report.add(clock(theirs, now()));
    }
}

/// Rule (the path to the data plane): the service refuses an upgrade without a token with
/// 400 or 401; another answer comes from something else (a portal, a filtering proxy) or
/// from a service that cannot serve now.
pub fn path_verdict(target: &str, answer: &Probe) -> Check {
    let saw = format!(
        "HTTP {} {:?} to an upgrade without a token",
        answer.status, answer.body
    );
    match answer.status {
        400 | 401 => Check::pass(
            "data-plane",
            target,
            format!("{saw}: the path to the service is open"),
        ),
        500.. => Check::fail(
            "data-plane",
            target,
            saw,
            "the service cannot serve now: try again later",
        ),
        _ => Check::fail(
            "data-plane",
            target,
            format!("{saw}: not the tunneling service's answer"),
            "something between answers for the data plane (a captive portal, a filtering proxy named in tunnel.ca): let the gateway reach it, or check tunnel.endpoint and tunnel.resolve",
        ),
    }
}

/// Rule (clock): the gateway's clock within `MAX_CLOCK_SKEW_SECS` of the service's.
pub fn clock(theirs: i64, ours: i64) -> Check {
    let skew = ours - theirs;
    let saw = format!(
        "the local clock reads {}, the service's {} ({skew:+} s)",
        utc(ours),
        utc(theirs)
    );
    if skew.abs() > MAX_CLOCK_SKEW_SECS {
        let fix = "set the gateway's clock (timedatectl set-ntp true; on OpenWrt, enable the NTP client): certificates and tokens are checked against it";
        Check::fail("clock", "service Date", saw, fix)
    } else {
        Check::pass("clock", "service Date", saw)
    }
}

/// Rule (data-plane failures): the setting that decides each.
fn refusal(err: &HandshakeError, cfg: &Config, e: &DataEndpoint) -> (String, String) {
    match err {
        HandshakeError::Connect { source, .. } => {
            let (saw, _) = tcp_failure(source, e.port);
            let fix = format!(
                "allow outbound TCP {} to {} (or reach it through an HTTP proxy: proxy.url)",
                e.port, e.host
            );
            (saw, fix)
        }
        HandshakeError::Proxy { source, .. } => match &e.proxy {
            Some(p) => proxy_failure(source, p),
            None => (source.to_string(), "check proxy.url and proxy.no_proxy".into()),
        },
        HandshakeError::Tls { source, .. } => {
            let side = Side::DataPlane {
                ca: cfg.tunnel.ca.as_deref(),
            };
            failure(source, side, &e.host)
        }
        HandshakeError::Timeout(t) => (
            format!("no answer within {}s", t.as_secs()),
            format!(
                "check that outbound TCP {} to {} is allowed",
                e.port, e.host
            ),
        ),
        other => (
            other.to_string(),
            "check tunnel.endpoint and tunnel.resolve: something other than the tunneling service answers".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::report::Status;

    #[test]
    fn regions_come_from_the_command_then_the_sessions_then_the_mqtt_endpoint() {
        let host = "a1b2c3-ats.iot.eu-central-1.amazonaws.com";
        let one = |r: &str| vec![r.to_owned()];
        assert_eq!(
            regions(&one("us-west-2"), &one("eu-west-1"), host),
            one("us-west-2")
        );
        assert_eq!(regions(&[], &one("eu-west-1"), host), one("eu-west-1"));
        assert_eq!(regions(&[], &[], host), one("eu-central-1"));
        assert!(regions(&[], &[], "localhost").is_empty());
    }

    #[test]
    fn only_the_services_refusal_proves_the_path_open() {
        let answer = |status: u16| Probe {
            status,
            body: "x".into(),
            date: None,
        };
        assert_eq!(path_verdict("t", &answer(401)).status, Status::Pass);
        assert_eq!(path_verdict("t", &answer(400)).status, Status::Pass);
        let portal = path_verdict("t", &answer(302));
        assert_eq!(portal.status, Status::Fail);
        assert!(
            portal.saw.ends_with("not the tunneling service's answer"),
            "{}",
            portal.saw
        );
        assert_eq!(path_verdict("t", &answer(403)).status, Status::Fail);
        assert!(
            path_verdict("t", &answer(503))
                .fix
                .unwrap()
                .contains("try again later")
        );
    }

    #[test]
    fn a_clock_more_than_5_minutes_off_fails() {
        assert_eq!(
            clock(1_000_000, 1_000_300).status,
            super::super::report::Status::Pass
        );
        let off = clock(1_000_000, 1_000_301);
        assert_eq!(off.status, Status::Fail);
        assert!(off.saw.contains("(+301 s)"), "{}", off.saw);
        assert_eq!(clock(1_000_301, 1_000_000).status, Status::Fail);
    }
}

//! Step 3 of `doctor` (and the TLS part of step 6): the TLS handshake, and what each TLS
//! failure means for the operator: which CA setting, which certificate, the clock, ALPN.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::reach::STEP_TIMEOUT;
use super::report::{Check, Report};
use super::times::{now, utc};

/// Which end is checked: the broker (`mqtt.*`) or the data plane (`tunnel.*`).
#[derive(Clone, Copy, Debug)]
pub enum Side<'a> {
    Broker { ca: Option<&'a Path> },
    DataPlane { ca: Option<&'a Path> },
}

/// The handshake over `tcp`; `alpn` is the protocol the server must agree to, if any.
pub async fn handshake(
    report: &mut Report,
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    host: &str,
    target: &str,
    side: Side<'_>,
    alpn: Option<&str>,
) -> Option<TlsStream<TcpStream>> {
    let name = match ServerName::try_from(host.to_owned()) {
        Ok(n) => n,
        Err(e) => {
            report.add(Check::fail(
                "tls",
                target,
                e.to_string(),
                endpoint_fix(side),
            ));
            return None;
        }
    };
    let connect = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    let tls = match tokio::time::timeout(STEP_TIMEOUT, connect).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let (saw, fix) = failure(&e, side, host);
            report.add(Check::fail("tls", target, saw, fix));
            return None;
        }
        Err(_) => {
            let saw = format!("no TLS handshake within {}s", STEP_TIMEOUT.as_secs());
            let fix = format!(
                "the port answers but does not speak TLS: {}",
                endpoint_fix(side)
            );
            report.add(Check::fail("tls", target, saw, fix));
            return None;
        }
    };
    let conn = tls.get_ref().1;
    let got = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let version = conn
        .protocol_version()
        .map_or("TLS".into(), |v| format!("{v:?}").replace('_', "."));
    if let Some(want) = alpn.filter(|w| !alpn_agreed(w, got.as_deref())) {
        let saw = format!("{version}, but the server did not agree to ALPN {want}");
        report.add(Check::fail("tls", target, saw, ALPN_FIX));
        return None;
    }
    let alpn_text = got.map(|p| format!(", ALPN {p}")).unwrap_or_default();
    let saw = format!("{version}, the server's certificate verified for {host}{alpn_text}");
    report.add(Check::pass("tls", target, saw));
    Some(tls)
}

/// Rule (ALPN): the server must name the protocol offered (AWS IoT on 443 closes or
/// answers HTTPS otherwise).
pub fn alpn_agreed(offered: &str, agreed: Option<&str>) -> bool {
    agreed == Some(offered)
}

/// The rustls error inside an I/O error, if it is one.
pub fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Rule (TLS failures): what the error means and what to change, as (saw, fix).
pub fn failure(e: &io::Error, side: Side<'_>, host: &str) -> (String, String) {
    match rustls_error(e) {
        Some(rustls::Error::InvalidCertificate(c)) => server_certificate(c, side, host),
        Some(rustls::Error::AlertReceived(alert)) => alert_received(*alert, side),
        Some(other) => (format!("TLS failed: {other}"), endpoint_fix(side)),
        None => (
            format!("the connection broke during the TLS handshake: {e}"),
            "check that the port speaks TLS and that no firewall cuts the connection".into(),
        ),
    }
}

/// Rule (the server's certificate refused): the CA setting, the host, or the clock.
fn server_certificate(c: &CertificateError, side: Side<'_>, host: &str) -> (String, String) {
    match c {
        CertificateError::UnknownIssuer => {
            let saw = format!("{host}'s certificate is not signed by a CA the agent trusts");
            (saw, trust_fix(side))
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            let saw = format!("the server's certificate does not name {host}");
            let fix = match side {
                Side::Broker { .. } => "set mqtt.endpoint to your account's endpoint (aws iot describe-endpoint --endpoint-type iot:Data-ATS)",
                Side::DataPlane { .. } => "something other than the tunneling service answers for this name: check tunnel.endpoint, tunnel.resolve and any TLS-inspecting firewall",
            };
            (saw, fix.into())
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => (
            format!(
                "{host}'s certificate is not valid at the local time, {}",
                utc(now())
            ),
            "the gateway's clock is probably wrong: set it (timedatectl set-ntp true; on OpenWrt, enable the NTP client)".into(),
        ),
        other => (format!("{host}'s certificate was refused: {other:?}"), trust_fix(side)),
    }
}

/// What to check when TLS fails for a reason with no setting of its own.
fn endpoint_fix(side: Side<'_>) -> String {
    match side {
        Side::Broker { .. } => {
            "check mqtt.endpoint and mqtt.port, and that no firewall inspects TLS"
        }
        Side::DataPlane { .. } => "check tunnel.endpoint, and that no firewall inspects TLS",
    }
    .into()
}

/// Rule (an unknown server CA): the setting that names the CA.
fn trust_fix(side: Side<'_>) -> String {
    match side {
        Side::Broker { ca: Some(p) } => format!(
            "mqtt.ca ({}) does not hold the CA that signed the broker's certificate: for AWS IoT use AmazonRootCA1.pem",
            p.display()
        ),
        Side::Broker { ca: None } => {
            "set mqtt.ca to the CA that signed the broker's certificate (AWS IoT: AmazonRootCA1.pem)".into()
        }
        Side::DataPlane { ca: Some(p) } => format!(
            "tunnel.ca ({}) does not hold the CA that signed the data plane's certificate (with a TLS-inspecting proxy, its CA)",
            p.display()
        ),
        Side::DataPlane { ca: None } => {
            "install the system CA bundle (ca-certificates), or set tunnel.ca (with a TLS-inspecting proxy, to its CA)".into()
        }
    }
}

/// Rule (an alert from the server): the broker refused the device certificate, or ALPN;
/// the data plane asks for no certificate, so an alert there comes from something between.
pub fn alert_received(alert: AlertDescription, side: Side<'_>) -> (String, String) {
    if let Side::DataPlane { .. } = side {
        return (
            format!("the server ended TLS with alert {alert:?}"),
            "something between the gateway and the data plane refuses the connection (a TLS-inspecting firewall or proxy): let it pass, or check tunnel.endpoint".into(),
        );
    }
    match alert {
        AlertDescription::CertificateExpired => (
            "the server refused the device certificate: it has expired".into(),
            "renew the certificate in mqtt.cert and register the new one in AWS IoT; if the gateway's clock is wrong, set it".into(),
        ),
        AlertDescription::NoApplicationProtocol => (
            "the server refused the ALPN protocol offered".into(),
            ALPN_FIX.into(),
        ),
        AlertDescription::BadCertificate
        | AlertDescription::UnknownCA
        | AlertDescription::CertificateUnknown
        | AlertDescription::CertificateRevoked
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::CertificateRequired
        | AlertDescription::AccessDenied
        | AlertDescription::DecryptError
        | AlertDescription::HandshakeFailure => (
            format!("the server refused the device certificate (TLS alert {alert:?})"),
            "register the certificate in mqtt.cert in AWS IoT and make it ACTIVE (aws iot describe-certificate); its CA must be registered too".into(),
        ),
        other => (
            format!("the server ended TLS with alert {other:?}"),
            "check that the endpoint is AWS IoT's and that no firewall inspects TLS".into(),
        ),
    }
}

/// On port 443 AWS IoT tells MQTT from HTTPS by ALPN.
const ALPN_FIX: &str = "on port 443 AWS IoT takes MQTT only with ALPN x-amzn-mqtt-ca, at its ATS endpoint (mqtt.endpoint from aws iot describe-endpoint --endpoint-type iot:Data-ATS): leave mqtt.alpn out, or use mqtt.port = 8883; a firewall that strips ALPN needs port 8883";

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn an_unknown_server_ca_names_the_ca_setting_of_its_side() {
        let e = wrapped(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let ca = Path::new("/etc/ca.pem");
        let (saw, fix) = failure(&e, Side::Broker { ca: Some(ca) }, "h");
        assert!(saw.contains("not signed by a CA the agent trusts"), "{saw}");
        assert!(fix.starts_with("mqtt.ca (/etc/ca.pem)"), "{fix}");
        assert!(
            failure(&e, Side::Broker { ca: None }, "h")
                .1
                .starts_with("set mqtt.ca")
        );
        let fix = failure(&e, Side::DataPlane { ca: Some(ca) }, "h").1;
        assert!(fix.starts_with("tunnel.ca (/etc/ca.pem)"), "{fix}");
    }

    #[test]
    fn a_server_certificate_outside_its_period_points_at_the_clock() {
        let e = wrapped(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ));
        let (saw, fix) = failure(&e, Side::Broker { ca: None }, "h");
        assert!(saw.contains("the local time"), "{saw}");
        assert!(fix.contains("clock"), "{fix}");
    }

    #[test]
    fn a_wrong_host_name_points_at_mqtt_endpoint() {
        let e = wrapped(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName,
        ));
        assert!(
            failure(&e, Side::Broker { ca: None }, "h")
                .1
                .contains("mqtt.endpoint")
        );
    }

    #[test]
    fn alerts_tell_an_expired_device_certificate_from_an_unregistered_one() {
        let broker = Side::Broker { ca: None };
        let (saw, fix) = alert_received(AlertDescription::CertificateExpired, broker);
        assert!(
            saw.contains("expired") && fix.contains("renew"),
            "{saw} {fix}"
        );
        let (saw, fix) = alert_received(AlertDescription::UnknownCA, broker);
        assert!(saw.contains("refused the device certificate"), "{saw}");
        assert!(fix.contains("ACTIVE"), "{fix}");
        assert!(
            alert_received(AlertDescription::NoApplicationProtocol, broker)
                .1
                .contains("ALPN")
        );
    }

    #[test]
    fn alpn_is_agreed_only_when_the_server_names_the_protocol_offered() {
        assert!(alpn_agreed("x-amzn-mqtt-ca", Some("x-amzn-mqtt-ca")));
        assert!(!alpn_agreed("x-amzn-mqtt-ca", None));
        assert!(!alpn_agreed("x-amzn-mqtt-ca", Some("http/1.1")));
    }

    #[test]
    fn an_alert_from_the_data_plane_points_at_what_is_between() {
        let side = Side::DataPlane { ca: None };
        let (_, fix) = alert_received(AlertDescription::HandshakeFailure, side);
        assert!(
            fix.contains("TLS-inspecting") && !fix.contains("mqtt.cert"),
            "{fix}"
        );
    }

    #[test]
    fn a_connection_cut_during_the_handshake_is_not_called_a_certificate_problem() {
        let e = io::Error::from(io::ErrorKind::UnexpectedEof);
        let (saw, _) = failure(&e, Side::Broker { ca: None }, "h");
        assert!(saw.starts_with("the connection broke"), "{saw}");
    }
}

//! Steps 2 of `doctor`: the MQTT endpoint's (or the proxy's) name resolves and a TCP
//! connection opens, directly or through the configured proxy.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::report::{Check, Report};
use crate::proxy::{HttpProxy, ProxyError};

/// How long one name lookup or connect may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves `host` and connects to `port` (through `proxy` when given); the checks go to
/// `report`. `key` names the setting that holds the host (for the fix).
pub async fn connect(
    report: &mut Report,
    host: &str,
    port: u16,
    proxy: Option<&HttpProxy>,
    key: &str,
) -> Option<TcpStream> {
    let (name, name_port, name_key) = match proxy {
        Some(p) => (p.host.as_str(), p.port, "proxy.url"),
        None => (host, port, key),
    };
    let addrs = resolve(report, name, name_port, name_key).await?;
    let target = crate::proxy::authority(host, port);
    let tcp = match proxy {
        None => direct(&addrs, port).await,
        Some(p) => tokio::time::timeout(STEP_TIMEOUT, crate::proxy::connect(p, host, port))
            .await
            .unwrap_or_else(|_| Err(proxy_timeout(p)))
            .map(|tcp| (tcp, format!("{p} opened a tunnel to {target}")))
            .map_err(|e| proxy_failure(&e, p)),
    };
    match tcp {
        Ok((tcp, saw)) => {
            report.add(Check::pass("tcp", target, saw));
            Some(tcp)
        }
        Err((saw, fix)) => {
            report.add(Check::fail("tcp", target, saw, fix));
            None
        }
    }
}

pub async fn resolve(
    report: &mut Report,
    host: &str,
    port: u16,
    key: &str,
) -> Option<Vec<SocketAddr>> {
    let found = tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host((host, port))).await;
    let result = match found {
        Ok(Ok(addrs)) => Ok(addrs.collect::<Vec<_>>()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", STEP_TIMEOUT.as_secs())),
    };
    match result {
        Ok(addrs) if !addrs.is_empty() => {
            let shown: Vec<String> = addrs.iter().take(3).map(|a| a.ip().to_string()).collect();
            report.add(Check::pass(
                "dns",
                host,
                format!("resolves to {}", shown.join(", ")),
            ));
            Some(addrs)
        }
        Ok(_) => {
            report.add(Check::fail(
                "dns",
                host,
                "resolves to no address",
                dns_fix(key),
            ));
            None
        }
        Err(e) => {
            report.add(Check::fail(
                "dns",
                host,
                format!("cannot resolve: {e}"),
                dns_fix(key),
            ));
            None
        }
    }
}

/// Rule (a name that does not resolve): check the setting, then the gateway's resolver.
fn dns_fix(key: &str) -> String {
    let what = if key == "mqtt.endpoint" {
        "mqtt.endpoint (your account's endpoint: aws iot describe-endpoint --endpoint-type iot:Data-ATS)"
    } else {
        key
    };
    format!("check {what}, then the gateway's DNS (/etc/resolv.conf, or a name server on the link)")
}

async fn direct(addrs: &[SocketAddr], port: u16) -> Result<(TcpStream, String), (String, String)> {
    let started = std::time::Instant::now();
    let tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addrs)).await;
    match tcp {
        Ok(Ok(tcp)) => {
            let peer = tcp
                .peer_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string());
            let ms = started.elapsed().as_millis();
            Ok((tcp, format!("connected to {peer} in {ms} ms")))
        }
        Ok(Err(e)) => Err(tcp_failure(&e, port)),
        Err(_) => Err(tcp_failure(
            &std::io::Error::from(std::io::ErrorKind::TimedOut),
            port,
        )),
    }
}

/// Rule (TCP failures): refused means nothing listens on the port; a timeout means a
/// firewall drops it.
pub fn tcp_failure(e: &std::io::Error, port: u16) -> (String, String) {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => (
            format!("connection refused: nothing listens on port {port}"),
            "check mqtt.port: AWS IoT takes MQTT on 8883, or on 443 with ALPN x-amzn-mqtt-ca"
                .into(),
        ),
        std::io::ErrorKind::TimedOut => (
            format!("no answer within {}s", STEP_TIMEOUT.as_secs()),
            format!(
                "a firewall drops outbound TCP {port}: open it, or use mqtt.port = 443, or an HTTP proxy (proxy.url)"
            ),
        ),
        _ => (
            format!("cannot connect: {e}"),
            "check the gateway's route to the Internet (ip route)".into(),
        ),
    }
}

fn proxy_timeout(p: &HttpProxy) -> ProxyError {
    ProxyError::Io {
        proxy: p.to_string(),
        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
    }
}

/// Rule (proxy failures): what the proxy's answer means and the setting to change.
pub fn proxy_failure(e: &ProxyError, p: &HttpProxy) -> (String, String) {
    let fix = match e {
        ProxyError::Refused { status: 407, .. } if p.auth.is_none() => {
            "the proxy wants credentials: put them in proxy.url (http://user:password@host:port)"
                .to_owned()
        }
        ProxyError::Refused {
            status: 407 | 401, ..
        } => "the proxy refused the user and password in proxy.url: correct them".to_owned(),
        ProxyError::Refused {
            status: 403,
            target,
            ..
        } => {
            format!(
                "the proxy's rules forbid CONNECT to {target}: ask its administrator to allow it"
            )
        }
        ProxyError::Refused { .. } => "check the proxy's log for why it refused".to_owned(),
        ProxyError::Io { .. } => format!("check proxy.url: nothing answers at {p}"),
        ProxyError::Malformed { .. } => format!("check proxy.url: {p} is not an HTTP proxy"),
    };
    (e.to_string(), fix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(auth: bool) -> HttpProxy {
        HttpProxy {
            host: "proxy".into(),
            port: 3128,
            auth: auth.then(|| crate::proxy::ProxyAuth {
                user: "u".into(),
                password: crate::secret::Secret::new("pw"),
            }),
        }
    }

    fn refused(status: u16) -> ProxyError {
        ProxyError::Refused {
            proxy: "http://proxy:3128".into(),
            target: "h:8883".into(),
            status,
            reason: "no".into(),
            hint: "",
        }
    }

    #[test]
    fn each_proxy_refusal_names_what_to_change() {
        assert!(
            proxy_failure(&refused(407), &proxy(false))
                .1
                .contains("put them in proxy.url")
        );
        assert!(
            proxy_failure(&refused(407), &proxy(true))
                .1
                .contains("correct them")
        );
        assert!(
            proxy_failure(&refused(403), &proxy(true))
                .1
                .contains("CONNECT to h:8883")
        );
        let io = ProxyError::Io {
            proxy: "http://proxy:3128".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        assert!(
            proxy_failure(&io, &proxy(false))
                .1
                .contains("nothing answers")
        );
    }

    #[test]
    fn a_refused_connect_points_at_the_port_and_a_timeout_at_the_firewall() {
        let (_, fix) = tcp_failure(&std::io::ErrorKind::ConnectionRefused.into(), 8883);
        assert!(fix.contains("mqtt.port"), "{fix}");
        let (_, fix) = tcp_failure(&std::io::ErrorKind::TimedOut.into(), 8883);
        assert!(fix.contains("firewall drops outbound TCP 8883"), "{fix}");
    }

    #[test]
    fn a_name_that_does_not_resolve_points_at_the_setting() {
        assert!(dns_fix("mqtt.endpoint").contains("describe-endpoint"));
        assert!(dns_fix("proxy.url").starts_with("check proxy.url"));
    }
}

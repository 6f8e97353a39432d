//! Where the data plane is: `data.tunneling.iot.<region>.amazonaws.com:443`, or an override
//! (`tunnel.endpoint`, `local-proxy --proxy-endpoint`), with the proxy and address to use.

use crate::protocol::{self, Mode};

/// Where the data plane is: from the region, or an override.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataEndpoint {
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// TCP port (443 by default).
    pub port: u16,
    /// `wss://` (true) or plain `ws://` to loopback (testing).
    pub tls: bool,
    /// Connect to this address instead of resolving `host` (`tunnel.resolve`); TLS and the
    /// upgrade still name `host`.
    pub connect_to: Option<std::net::SocketAddr>,
    /// Reach it through this HTTP proxy (CONNECT to `connect_to` or `host`); `None` is direct.
    pub proxy: Option<crate::proxy::HttpProxy>,
}

impl DataEndpoint {
    /// `data.tunneling.iot.<region>.amazonaws.com:443` over TLS.
    pub fn for_region(region: &str) -> Self {
        DataEndpoint {
            host: protocol::data_plane_host(region),
            port: 443,
            tls: true,
            connect_to: None,
            proxy: None,
        }
    }

    /// `host[:port]` as localproxy's `-e` takes it (TLS, default port 443). A `ws://`
    /// prefix selects plain websocket, which is only allowed to a loopback address.
    pub fn parse_override(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let (tls, rest) = match lower.split_once("://") {
            Some(("wss", r)) => (true, r),
            Some(("ws", r)) => (false, r),
            Some((scheme, _)) => {
                return Err(format!("unsupported scheme {scheme:?}: use host[:port]"));
            }
            None => (true, lower.as_str()),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            match v6.split_once(']') {
                Some((h, "")) => (h, None),
                Some((h, p)) => (h, Some(p.strip_prefix(':').ok_or("expected [v6]:port")?)),
                None => return Err("unclosed '[' in IPv6 endpoint".into()),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                _ => (rest, None),
            }
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("{s:?} is not host[:port]"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{p:?} is not a port number (1-65535)"))?,
            None => 443,
        };
        if !tls && !is_loopback(host) {
            return Err("plain ws:// is only allowed to a loopback address (testing)".into());
        }
        Ok(DataEndpoint {
            host: host.to_owned(),
            port,
            tls,
            connect_to: None,
            proxy: None,
        })
    }

    /// Goes through `settings`' proxy unless its `no_proxy` names this host.
    pub fn with_proxy(mut self, settings: Option<&crate::proxy::ProxySettings>) -> Self {
        self.proxy = settings.and_then(|s| s.for_host(&self.host)).cloned();
        self
    }

    fn authority(&self) -> String {
        crate::proxy::authority(&self.host, self.port)
    }

    /// The upgrade URL for `mode` (docs/protocol.md §1.1).
    pub fn url(&self, mode: Mode) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!(
            "{scheme}://{}/tunnel?local-proxy-mode={}",
            self.host_header(),
            mode.as_str()
        )
    }

    /// Rule (docs/protocol.md §4.1): the `Host:` of the upgrade names the port only when it
    /// is not the scheme's default (RFC 9110 §4.2.3); the reference localproxy sends the bare
    /// host.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            if self.host.contains(':') {
                format!("[{}]", self.host)
            } else {
                self.host.clone()
            }
        } else {
            self.authority()
        }
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl std::fmt::Display for DataEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "wss" } else { "ws" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

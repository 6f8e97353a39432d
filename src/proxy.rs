//! HTTP proxies (CONNECT): `[proxy]` for the agent's MQTT and websocket connections, and
//! `HTTPS_PROXY`/`NO_PROXY` for `local-proxy`, as the reference localproxy reads them. The
//! TLS inside the tunnel is end to end: the proxy sees only the host and port.

use std::fmt;
use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::secret::Secret;

/// Largest CONNECT response head read from a proxy.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// The port localproxy assumes when a proxy URL names none.
pub const DEFAULT_PORT: u16 = 3128;

/// A proxy's Basic credentials; the password never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyAuth {
    /// The user name (printed).
    pub user: String,
    /// The password.
    pub password: Secret,
}

/// An HTTP proxy that tunnels with CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpProxy {
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Basic credentials, when the URL carries `user:password@`.
    pub auth: Option<ProxyAuth>,
}

impl fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `http://[user@]host:port`: never the password.
impl fmt::Display for HttpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self
            .auth
            .as_ref()
            .map(|a| format!("{}@", a.user))
            .unwrap_or_default();
        write!(f, "http://{user}{}", authority(&self.host, self.port))
    }
}

/// `host:port`, IPv6 in brackets.
pub(crate) fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Why a proxy could not tunnel to the target.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The proxy itself is unreachable, or the exchange broke.
    #[error("cannot talk to proxy {proxy}: {source}")]
    Io {
        /// The proxy, without password.
        proxy: String,
        /// The socket error.
        source: io::Error,
    },
    /// The proxy answered CONNECT with something other than 2xx.
    #[error("proxy {proxy} refused CONNECT {target}: {status} {reason}{hint}")]
    Refused {
        /// The proxy, without password.
        proxy: String,
        /// `host:port` asked for.
        target: String,
        /// The HTTP status.
        status: u16,
        /// The proxy's reason phrase.
        reason: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// The answer was not HTTP.
    #[error("proxy {proxy} answered CONNECT {target} with something that is not HTTP: {what}")]
    Malformed {
        /// The proxy, without password.
        proxy: String,
        /// `host:port` asked for.
        target: String,
        /// What was wrong.
        what: &'static str,
    },
}

/// Rule (proxy URL): `[http://][user:password@]host[:port][/]`; the port defaults to 3128
/// as in localproxy; user and password are percent-decoded. TLS to the proxy itself
/// (`https://`) is not supported.
pub fn parse_proxy_url(url: &str) -> Result<HttpProxy, String> {
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            return Err(
                "https:// proxies (TLS to the proxy) are not supported: use http://, \
                        the tunnel's own TLS runs end to end through it"
                    .into(),
            );
        }
        Some((scheme, _)) => {
            return Err(format!("scheme {scheme:?} is not supported: use http://"));
        }
        None => url,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err("a proxy URL has no path: use http://[user:password@]host:port".into());
    }
    let (auth, hostport) = match rest.rsplit_once('@') {
        Some((userinfo, hostport)) => {
            let Some((user, password)) = userinfo.split_once(':') else {
                return Err("credentials must be user:password".into());
            };
            let auth = ProxyAuth {
                user: percent_decode(user)?,
                password: Secret::new(percent_decode(password)?),
            };
            (Some(auth), hostport)
        }
        None => (None, rest),
    };
    let (host, port) = split_host_port(hostport)?;
    if host.is_empty() {
        return Err("the proxy URL names no host".into());
    }
    Ok(HttpProxy {
        host,
        port: port.unwrap_or(DEFAULT_PORT),
        auth,
    })
}

fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    // Never quote the text: in `http://user:password` (no host) it is the password.
    let parse_port = |p: &str| match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("the port is not a number from 1 to 65535".to_owned()),
    };
    if let Some(v6) = s.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err("an IPv6 host needs its closing ]".into());
        };
        let port = match after.strip_prefix(':') {
            Some(p) => Some(parse_port(p)?),
            None if after.is_empty() => None,
            None => return Err(format!("unexpected {after:?} after the host")),
        };
        return Ok((host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((host, p)) => Ok((host.to_owned(), Some(parse_port(p)?))),
        None => Ok((s.to_owned(), None)),
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a % in the credentials must be followed by two hex digits")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the credentials are not UTF-8 once decoded".into())
}

/// Rule (no_proxy): a lone `*` bypasses every host; an entry matches that host and, for a
/// name, its subdomains (`example.com` and `.example.com` both match `a.example.com`); IP
/// literals match exactly and `addr/prefix` matches an IP host in that network; case and a
/// `:port` suffix of the entry are ignored (as curl does).
pub fn no_proxy_matches(entries: &[String], host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if entries.len() == 1 && entries[0].trim() == "*" {
        return true;
    }
    let host_ip = host.parse::<std::net::IpAddr>().ok();
    entries.iter().any(|e| {
        let e = e.trim();
        if let Some((net, prefix)) = e.split_once('/') {
            return host_ip.is_some_and(|ip| in_network(ip, net, prefix));
        }
        let e = if e.parse::<std::net::IpAddr>().is_ok() {
            e.to_owned()
        } else {
            split_host_port(e).map_or_else(|_| e.to_owned(), |(h, _)| h)
        };
        let e = e
            .trim_start_matches('.')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        !e.is_empty()
            && (host == e
                || (host.parse::<std::net::IpAddr>().is_err()
                    && host.ends_with(&e)
                    && host[..host.len() - e.len()].ends_with('.')))
    })
}

/// Whether `ip` is in `net/prefix` (a malformed entry matches nothing).
fn in_network(ip: std::net::IpAddr, net: &str, prefix: &str) -> bool {
    use std::net::IpAddr;
    let (Ok(net), Ok(prefix)) = (net.parse::<IpAddr>(), prefix.parse::<u32>()) else {
        return false;
    };
    let (a, b, bits) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    if prefix > bits {
        return false;
    }
    let shift = bits - prefix;
    shift == bits || (a >> shift) == (b >> shift)
}

/// Whether a `no_proxy` entry is one `no_proxy_matches` understands; the reason if not.
pub fn check_no_proxy_entry(e: &str) -> Result<(), String> {
    let e = e.trim();
    match e.split_once('/') {
        _ if e.is_empty() => Err("an empty entry".into()),
        Some((net, prefix)) => {
            let ok = net.parse::<std::net::IpAddr>().is_ok_and(|ip| {
                prefix
                    .parse::<u32>()
                    .is_ok_and(|p| p <= if ip.is_ipv4() { 32 } else { 128 })
            });
            ok.then_some(())
                .ok_or_else(|| format!("{e:?} is not an address/prefix network"))
        }
        None if e.contains('*') && e != "*" => Err(format!(
            "{e:?}: a wildcard only works alone (\"*\"); use .example.com for a domain"
        )),
        None => Ok(()),
    }
}

/// A proxy and the hosts that bypass it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxySettings {
    /// The proxy.
    pub proxy: HttpProxy,
    /// `no_proxy` entries.
    pub no_proxy: Vec<String>,
}

impl ProxySettings {
    /// The proxy to use for `host`, or `None` when `no_proxy` says to go direct.
    pub fn for_host(&self, host: &str) -> Option<&HttpProxy> {
        (!no_proxy_matches(&self.no_proxy, host)).then_some(&self.proxy)
    }

    /// From the environment as localproxy and curl read it: `https_proxy`, else
    /// `HTTPS_PROXY`; `no_proxy`, else `NO_PROXY` (comma-separated). Returns the variable
    /// used with the settings, or why its value is refused (naming the variable).
    pub fn from_env() -> Result<Option<(&'static str, ProxySettings)>, String> {
        let found = ["https_proxy", "HTTPS_PROXY"].into_iter().find_map(|v| {
            std::env::var(v)
                .ok()
                .filter(|u| !u.is_empty())
                .map(|u| (v, u))
        });
        let Some((var, url)) = found else {
            return Ok(None);
        };
        let no_proxy = ["no_proxy", "NO_PROXY"]
            .into_iter()
            .find_map(|v| std::env::var(v).ok())
            .map(|v| {
                v.split(',')
                    .map(|e| e.trim().to_owned())
                    .filter(|e| !e.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        match parse_proxy_url(&url) {
            Ok(proxy) => Ok(Some((var, ProxySettings { proxy, no_proxy }))),
            Err(e) => Err(format!("{var}: {e}")),
        }
    }
}

/// Rule (CONNECT response): the status of a response head's first line; any 2xx is success.
pub fn connect_status(head: &str) -> Option<(u16, &str)> {
    let line = head.lines().next()?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    Some((status, parts.next().unwrap_or("").trim()))
}

/// The CONNECT request for `target`, with Basic credentials when the proxy has them.
fn connect_request(proxy: &HttpProxy, target: &str) -> zeroize::Zeroizing<String> {
    let mut req =
        zeroize::Zeroizing::new(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"));
    if let Some(a) = &proxy.auth {
        let plain = zeroize::Zeroizing::new(format!("{}:{}", a.user, a.password.expose()));
        let encoded = zeroize::Zeroizing::new(data_encoding::BASE64.encode(plain.as_bytes()));
        req.push_str("Proxy-Authorization: Basic ");
        req.push_str(&encoded);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

/// Rule (a proxy's words in our logs): printable ASCII only, at most `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(max)
        .collect()
}

/// Rule (proxy refusals): what to do about a CONNECT refused with `status`.
pub fn refusal_hint(status: u16, has_credentials: bool) -> &'static str {
    match (status, has_credentials) {
        (407, false) => ": the proxy wants credentials: use http://user:password@host:port",
        (407 | 401, true) => ": the proxy refused the credentials in the proxy URL",
        (403, _) => ": the proxy's rules forbid this host or port (443 must be allowed)",
        _ => "",
    }
}

/// A TCP connection through `proxy` to `host:port`, ready for the caller's TLS.
pub async fn connect(proxy: &HttpProxy, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
    let target = authority(host, port);
    let io_err = |source| ProxyError::Io {
        proxy: proxy.to_string(),
        source,
    };
    let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(io_err)?;
    tcp.write_all(connect_request(proxy, &target).as_bytes())
        .await
        .map_err(io_err)?;
    // The proxy sends nothing after its head until we speak, so reading in chunks cannot
    // swallow the peer's first bytes.
    let mut head = Vec::with_capacity(512);
    let malformed = |what| ProxyError::Malformed {
        proxy: proxy.to_string(),
        target: target.clone(),
        what,
    };
    let end = loop {
        let mut chunk = [0u8; 512];
        let n = tcp.read(&mut chunk).await.map_err(io_err)?;
        if n == 0 {
            return Err(malformed("it closed the connection before a full response"));
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if head.len() > MAX_RESPONSE_HEAD {
            return Err(malformed("a response head over 8 KiB"));
        }
    };
    let text = String::from_utf8_lossy(&head[..end]);
    let Some((status, reason)) = connect_status(&text) else {
        return Err(malformed("no HTTP status line"));
    };
    if (200..300).contains(&status) {
        // Bytes after a success would be the target's, which speaks only after us.
        if end != head.len() {
            return Err(malformed("data after its 2xx response head"));
        }
        return Ok(tcp);
    }
    let hint = refusal_hint(status, proxy.auth.is_some());
    Err(ProxyError::Refused {
        proxy: proxy.to_string(),
        target,
        status,
        // The proxy's words reach logs and `status`.
        reason: printable(reason, 128),
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_url_forms() {
        let p = parse_proxy_url("http://proxy.plant:8080").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.auth.is_none()),
            ("proxy.plant", 8080, true)
        );
        let p = parse_proxy_url("10.0.0.1").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("10.0.0.1", DEFAULT_PORT));
        let p = parse_proxy_url("HTTP://[fd00::1]:3129/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("fd00::1", 3129));
        let p = parse_proxy_url("http://op%40plant:p%3Ass@proxy:3128").unwrap();
        let auth = p.auth.clone().unwrap();
        assert_eq!(
            (auth.user.as_str(), auth.password.expose()),
            ("op@plant", "p:ss")
        );
        assert_eq!(p.to_string(), "http://op@plant@proxy:3128");
        assert!(!format!("{p:?}").contains("p:ss"));
        for bad in [
            "https://proxy:3128",
            "socks5://proxy:1080",
            "http://proxy:0",
            "http://proxy:99999",
            "http://user@proxy:3128",
            "http://proxy:3128/path",
            "http://:3128",
            "http://[fd00::1:3128",
            "http://u:%zz@proxy",
            "http://op:pw-1",
        ] {
            let e = parse_proxy_url(bad).err().unwrap_or_default();
            assert!(!e.is_empty(), "{bad}");
            assert!(!e.contains("pw-1") && !e.contains("%zz"), "{e}");
        }
    }

    #[test]
    fn no_proxy_matches_hosts_their_subdomains_and_star() {
        let e = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let list = e(&[
            "localhost",
            ".corp.example",
            "amazonaws.com:443",
            "10.1.2.3",
            "::1",
        ]);
        assert!(no_proxy_matches(&list, "localhost"));
        assert!(no_proxy_matches(&list, "git.corp.example"));
        assert!(no_proxy_matches(&list, "corp.example"));
        assert!(no_proxy_matches(
            &list,
            "data.tunneling.iot.eu-west-1.AMAZONAWS.com"
        ));
        assert!(no_proxy_matches(&list, "10.1.2.3"));
        assert!(no_proxy_matches(&list, "[::1]"));
        assert!(!no_proxy_matches(&list, "notamazonaws.com"));
        assert!(!no_proxy_matches(&list, "10.1.2.33"));
        assert!(!no_proxy_matches(&list, "example"));
        assert!(no_proxy_matches(&e(&["*"]), "anything"));
        assert!(!no_proxy_matches(&e(&["*", "x"]), "anything"));
        let nets = e(&["10.0.0.0/8", "fd00::/8", "192.168.1.7/32"]);
        assert!(no_proxy_matches(&nets, "10.200.3.4"));
        assert!(no_proxy_matches(&nets, "[fd12::1]"));
        assert!(no_proxy_matches(&nets, "192.168.1.7"));
        assert!(!no_proxy_matches(&nets, "192.168.1.8"));
        assert!(!no_proxy_matches(&nets, "11.0.0.1"));
        assert!(!no_proxy_matches(&nets, "ten.example"));
        assert!(no_proxy_matches(&e(&["0.0.0.0/0"]), "1.2.3.4"));
        for bad in ["10.0.0.0/33", "x/8", "*.example.com", " "] {
            assert!(check_no_proxy_entry(bad).is_err(), "{bad}");
        }
        for good in ["*", "10.0.0.0/8", ".example.com", "host:443"] {
            assert!(check_no_proxy_entry(good).is_ok(), "{good}");
        }
        assert!(!no_proxy_matches(&[], "anything"));
    }

    #[test]
    fn connect_status_accepts_any_2xx_line() {
        assert_eq!(
            connect_status("HTTP/1.1 200 Connection established\r\n\r\n"),
            Some((200, "Connection established"))
        );
        assert_eq!(
            connect_status("HTTP/1.0 407 Proxy Authentication Required\r\n"),
            Some((407, "Proxy Authentication Required"))
        );
        assert_eq!(connect_status("HTTP/1.1 204\r\n"), Some((204, "")));
        assert_eq!(connect_status("SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(connect_status("HTTP/1.1 abc x\r\n"), None);
    }

    #[test]
    fn the_connect_request_carries_basic_credentials() {
        let p = parse_proxy_url("http://user:s3cret@proxy:3128").unwrap();
        let req = connect_request(&p, "host:443");
        assert_eq!(
            req.as_str(),
            "CONNECT host:443 HTTP/1.1\r\nHost: host:443\r\nProxy-Authorization: Basic dXNlcjpzM2NyZXQ=\r\n\r\n"
        );
        let p = parse_proxy_url("proxy").unwrap();
        assert_eq!(
            connect_request(&p, "[::1]:443").as_str(),
            "CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n"
        );
    }
}

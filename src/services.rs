//! The service map: which local endpoint serves each tunnel service id. It is an allow-list:
//! a service that is not in the map is never connected anywhere.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;

use crate::protocol::is_valid_service_id;

/// Host used for an endpoint given as a bare port (what the reference localproxy does).
pub const DEFAULT_HOST: &str = "127.0.0.1";

/// A local TCP or Unix-socket endpoint, to connect to (destination) or listen on (source).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalEndpoint {
    /// Host name or IP literal (without brackets) and port; names resolve at connect time.
    Tcp {
        /// Host name or IP literal.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix-domain socket path.
    Unix(PathBuf),
}

/// A mapping that cannot be used, naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceMapError {
    /// The service id does not follow the API pattern.
    #[error(
        "service id {0:?} is invalid: use 1-128 characters of letters, digits, ':', '_' or '-'"
    )]
    BadServiceId(String),
    /// The endpoint does not parse.
    #[error("service {service:?}: endpoint {value:?} is invalid: {problem}")]
    BadEndpoint {
        /// The service it is for ("" for an unnamed mapping).
        service: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The same service mapped twice.
    #[error("service {0:?} is mapped twice; keep one mapping per service")]
    Duplicate(String),
    /// An unnamed mapping next to named ones.
    #[error(
        "an unnamed mapping such as \"22\" must be the only mapping; name each one (SSH=22,HTTP=80)"
    )]
    MixedUnnamed,
    /// No mapping at all.
    #[error("the service map is empty: map at least one service, e.g. SSH=22")]
    Empty,
}

impl LocalEndpoint {
    /// Parses `port`, `host:port`, `[v6]:port` or a Unix socket path (anything with a '/').
    /// A bare port uses `default_host`. Port 0 is refused unless `allow_port_zero`
    /// (a source listener that picks a free port).
    pub fn parse(s: &str, default_host: &str, allow_port_zero: bool) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty endpoint".into());
        }
        if s.contains('/') {
            return Ok(LocalEndpoint::Unix(PathBuf::from(s)));
        }
        let port_of = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(0) if !allow_port_zero => Err("port 0 is not a valid destination".into()),
                Ok(port) => Ok(port),
                Err(_) => Err(format!("{p:?} is not a port number (1-65535)")),
            }
        };
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(LocalEndpoint::Tcp {
                host: default_host.to_owned(),
                port: port_of(s)?,
            });
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or("IPv6 endpoints are written [address]:port")?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{h:?} is not an IPv6 address"))?;
            (h, p)
        } else {
            match s.split_once(':') {
                Some((h, p)) if !p.contains(':') && !h.is_empty() => (h, p),
                Some(_) => return Err("IPv6 endpoints are written [address]:port".into()),
                None => return Err("expected a port, host:port, [v6]:port or a socket path".into()),
            }
        };
        Ok(LocalEndpoint::Tcp {
            host: host.to_owned(),
            port: port_of(port)?,
        })
    }
}

impl fmt::Display for LocalEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalEndpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            LocalEndpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            LocalEndpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Service id -> local endpoint, plus the reference localproxy's single unnamed mapping
/// (`-d 22`), which serves V1 streams and a tunnel's only service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "BTreeMap<String, RawEndpoint>")]
pub struct ServiceMap {
    named: BTreeMap<String, LocalEndpoint>,
    unnamed: Option<LocalEndpoint>,
}

/// A TOML value of the map: `SSH = 22` or `HTTP = "10.0.0.2:8080"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawEndpoint {
    /// A bare port.
    Port(i64),
    /// Any other endpoint form.
    Text(String),
}

impl TryFrom<BTreeMap<String, RawEndpoint>> for ServiceMap {
    type Error = ServiceMapError;

    fn try_from(raw: BTreeMap<String, RawEndpoint>) -> Result<Self, Self::Error> {
        let mut map = ServiceMap::default();
        for (service, value) in raw {
            let text = match value {
                RawEndpoint::Port(p) => p.to_string(),
                RawEndpoint::Text(t) => t,
            };
            map.insert_named(&service, &text, DEFAULT_HOST, false)?;
        }
        Ok(map)
    }
}

impl ServiceMap {
    /// Parses a `[services]` table body.
    #[cfg(test)]
    pub(crate) fn from_toml_str(s: &str) -> Result<Self, String> {
        toml::from_str(s).map_err(|e| e.to_string())
    }

    /// Parses the localproxy mapping syntax: `SSH=22,HTTP=10.0.0.1:80` or one unnamed `22`.
    pub fn parse_mappings(
        s: &str,
        default_host: &str,
        allow_port_zero: bool,
    ) -> Result<Self, ServiceMapError> {
        let items: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .collect();
        let mut map = ServiceMap::default();
        for item in &items {
            match item.split_once('=') {
                Some((service, value)) => {
                    map.insert_named(service.trim(), value, default_host, allow_port_zero)?
                }
                None if items.len() == 1 => {
                    let ep = LocalEndpoint::parse(item, default_host, allow_port_zero).map_err(
                        |problem| ServiceMapError::BadEndpoint {
                            service: String::new(),
                            value: (*item).into(),
                            problem,
                        },
                    )?;
                    map.unnamed = Some(ep);
                }
                None => return Err(ServiceMapError::MixedUnnamed),
            }
        }
        if map.is_empty() {
            return Err(ServiceMapError::Empty);
        }
        Ok(map)
    }

    fn insert_named(
        &mut self,
        service: &str,
        value: &str,
        default_host: &str,
        allow_port_zero: bool,
    ) -> Result<(), ServiceMapError> {
        if !is_valid_service_id(service) {
            return Err(ServiceMapError::BadServiceId(service.into()));
        }
        let ep = LocalEndpoint::parse(value, default_host, allow_port_zero).map_err(|problem| {
            ServiceMapError::BadEndpoint {
                service: service.into(),
                value: value.into(),
                problem,
            }
        })?;
        if self.named.insert(service.to_owned(), ep).is_some() {
            return Err(ServiceMapError::Duplicate(service.into()));
        }
        Ok(())
    }

    /// The map with one more named mapping: builds a map in code, without parsing text.
    pub fn with(mut self, service: &str, endpoint: LocalEndpoint) -> Self {
        self.named.insert(service.to_owned(), endpoint);
        self
    }

    /// A map of one unnamed mapping, as `-d 22` makes.
    pub fn unnamed(endpoint: LocalEndpoint) -> Self {
        ServiceMap {
            named: BTreeMap::new(),
            unnamed: Some(endpoint),
        }
    }

    /// No mapping at all.
    pub fn is_empty(&self) -> bool {
        self.named.is_empty() && self.unnamed.is_none()
    }

    /// Named mappings, sorted by service id.
    pub fn named(&self) -> impl Iterator<Item = (&str, &LocalEndpoint)> {
        self.named.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The unnamed mapping, if any.
    pub fn unnamed_endpoint(&self) -> Option<&LocalEndpoint> {
        self.unnamed.as_ref()
    }

    /// The endpoint serving `service_id` in a tunnel whose services are `tunnel_services`
    /// (empty when the service never said). Rule (docs/protocol.md §3.3 SERVICE_IDS): the unnamed
    /// mapping serves V1 streams (empty id) and the tunnel's only service; a V1 stream in a
    /// one-service tunnel may also use that service's named mapping.
    pub fn resolve(&self, service_id: &str, tunnel_services: &[String]) -> Option<&LocalEndpoint> {
        if let Some(ep) = self.named.get(service_id) {
            return Some(ep);
        }
        let only = match tunnel_services {
            [one] => Some(one.as_str()),
            _ => None,
        };
        if service_id.is_empty() {
            return self
                .unnamed
                .as_ref()
                .or_else(|| only.and_then(|s| self.named.get(s)));
        }
        if only == Some(service_id) {
            return self.unnamed.as_ref();
        }
        None
    }

    /// Tunnel services this map cannot serve: their streams will be refused.
    pub fn unmapped<'a>(&self, tunnel_services: &'a [String]) -> Vec<&'a str> {
        tunnel_services
            .iter()
            .filter(|s| self.resolve(s, tunnel_services).is_none())
            .map(String::as_str)
            .collect()
    }
}

/// Which services one tunnel may reach, beyond what the service map has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every service of the map: `local-proxy -d`, whose map the operator gave for this
    /// one tunnel.
    WholeMap,
    /// Only the services the tunnel was opened for (the notify's `services`).
    Opened(Vec<String>),
}

impl Scope {
    /// Rule (scope): a stream or connection is admitted only for a service the tunnel was
    /// opened for, and that the service announced in SERVICE_IDS when it announced any;
    /// the thing's service map is asked after this. A V1 stream (empty id) stands for the
    /// tunnel's only service. The service relays a source's STREAM_START verbatim, so this
    /// is the last check between a tunnel and the gateway's other services.
    pub fn admits(&self, service_id: &str, announced: &[String]) -> bool {
        let Scope::Opened(opened) = self else {
            return true;
        };
        let Some(named) = self.named(service_id, announced) else {
            return false;
        };
        let listed = |list: &[String]| list.iter().any(|s| s == named);
        listed(opened) && (announced.is_empty() || listed(announced))
    }

    /// The service a stream is for: its id, or for a V1 stream (empty id) the tunnel's only
    /// service, announced or opened; `None` when that is not one service.
    pub fn named<'a>(&'a self, service_id: &'a str, announced: &'a [String]) -> Option<&'a str> {
        if !service_id.is_empty() {
            return Some(service_id);
        }
        match (announced, self.opened()) {
            ([one], _) | ([], [one]) => Some(one.as_str()),
            _ => None,
        }
    }

    /// The services the tunnel was opened for; none for `WholeMap`.
    pub fn opened(&self) -> &[String] {
        match self {
            Scope::WholeMap => &[],
            Scope::Opened(services) => services,
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::WholeMap => f.write_str("the whole service map"),
            Scope::Opened(services) => write!(f, "{}", services.join(",")),
        }
    }
}

/// A service map that can be replaced while bridges run (SIGHUP reload): each new stream
/// resolves against the current map; connections already open are not touched.
#[derive(Clone, Debug)]
pub struct SharedServiceMap(tokio::sync::watch::Receiver<std::sync::Arc<ServiceMap>>);

impl SharedServiceMap {
    /// A shared map and the handle that replaces it.
    pub fn new(map: ServiceMap) -> (tokio::sync::watch::Sender<std::sync::Arc<ServiceMap>>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(map));
        (tx, SharedServiceMap(rx))
    }

    /// The map new streams resolve against now.
    pub fn current(&self) -> std::sync::Arc<ServiceMap> {
        self.0.borrow().clone()
    }
}

impl From<ServiceMap> for SharedServiceMap {
    /// A map that never changes.
    fn from(map: ServiceMap) -> Self {
        SharedServiceMap::new(map).1
    }
}

impl FromStr for ServiceMap {
    type Err = ServiceMapError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceMap::parse_mappings(s, DEFAULT_HOST, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> LocalEndpoint {
        LocalEndpoint::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn toml_map_accepts_ports_hosts_ipv6_names_and_unix_paths() {
        let map = ServiceMap::from_toml_str(
            r#"
            SSH = 22
            HTTP = "10.0.0.2:8080"
            DBG = "[::1]:2222"
            WEB = "localhost:8080"
            APP = "/run/app.sock"
            "#,
        )
        .unwrap();
        let t: Vec<String> = vec![];
        assert_eq!(map.resolve("SSH", &t), Some(&tcp("127.0.0.1", 22)));
        assert_eq!(map.resolve("HTTP", &t), Some(&tcp("10.0.0.2", 8080)));
        assert_eq!(map.resolve("DBG", &t), Some(&tcp("::1", 2222)));
        assert_eq!(map.resolve("WEB", &t), Some(&tcp("localhost", 8080)));
        assert_eq!(
            map.resolve("APP", &t),
            Some(&LocalEndpoint::Unix("/run/app.sock".into()))
        );
        assert_eq!(map.resolve("FTP", &t), None);
        assert_eq!(tcp("::1", 2222).to_string(), "[::1]:2222");
    }

    #[test]
    fn toml_errors_name_the_service_and_the_problem() {
        let err = ServiceMap::from_toml_str("SSH = 70000").unwrap_err();
        assert!(err.contains("SSH") && err.contains("70000"), "{err}");
        let err = ServiceMap::from_toml_str(r#""bad name" = 22"#).unwrap_err();
        assert!(err.contains("bad name"), "{err}");
        let err = ServiceMap::from_toml_str(r#"X = "::1:22""#).unwrap_err();
        assert!(err.contains("[address]:port"), "{err}");
    }

    #[test]
    fn cli_mappings_follow_localproxy_syntax() {
        let map: ServiceMap = "SSH=22, HTTP=10.0.0.1:80".parse().unwrap();
        assert_eq!(map.named().count(), 2);
        let one: ServiceMap = "22".parse().unwrap();
        assert_eq!(one.unnamed_endpoint(), Some(&tcp("127.0.0.1", 22)));
        assert_eq!(
            "22,SSH=23".parse::<ServiceMap>(),
            Err(ServiceMapError::MixedUnnamed)
        );
        assert_eq!(
            "SSH=22,SSH=23".parse::<ServiceMap>(),
            Err(ServiceMapError::Duplicate("SSH".into()))
        );
        assert!("SSH=0".parse::<ServiceMap>().is_err());
        assert!(ServiceMap::parse_mappings("SSH=0", "127.0.0.1", true).is_ok());
        assert_eq!("".parse::<ServiceMap>(), Err(ServiceMapError::Empty));
    }

    #[test]
    fn a_map_built_in_code_resolves_each_service_it_was_given() {
        let map = ServiceMap::default()
            .with("SSH", tcp("127.0.0.1", 22))
            .with("HTTP", tcp("::1", 80));
        let t: Vec<String> = vec![];
        assert_eq!(map.resolve("SSH", &t), Some(&tcp("127.0.0.1", 22)));
        assert_eq!(map.resolve("HTTP", &t), Some(&tcp("::1", 80)));
        assert_eq!(map.named().count(), 2);
    }

    #[test]
    fn an_ipv6_endpoint_is_a_checked_address_in_brackets() {
        let parse = |s: &str| LocalEndpoint::parse(s, "127.0.0.1", false);
        assert_eq!(parse("[::1]:22"), Ok(tcp("::1", 22)));
        assert_eq!(parse("[fe80::2]:8080"), Ok(tcp("fe80::2", 8080)));
        assert!(
            parse("[not-v6]:22")
                .unwrap_err()
                .contains("not an IPv6 address")
        );
        assert!(parse("::1:22").unwrap_err().contains("[address]:port"));
        assert!(parse("[::1]22").unwrap_err().contains("[address]:port"));
        assert!(parse("[::1]:0").is_err());
        assert_eq!(tcp("::1", 22).to_string(), "[::1]:22");
        assert_eq!(tcp("10.0.0.2", 22).to_string(), "10.0.0.2:22");
        let unix = LocalEndpoint::Unix("/run/app.sock".into());
        assert_eq!(unix.to_string(), "unix:/run/app.sock");
        for e in [tcp("::1", 22), tcp("10.0.0.2", 22)] {
            assert_eq!(parse(&e.to_string()), Ok(e));
        }
    }

    #[test]
    fn a_host_endpoint_needs_a_host_and_one_port() {
        let parse = |s: &str| LocalEndpoint::parse(s, "127.0.0.1", false);
        assert_eq!(parse(" localhost:80 "), Ok(tcp("localhost", 80)));
        assert!(parse(":80").is_err());
        assert!(parse("").unwrap_err().contains("empty"));
        assert!(parse("host").is_err());
        assert!(
            parse("host:http")
                .unwrap_err()
                .contains("not a port number")
        );
        assert!(parse("0").unwrap_err().contains("port 0"));
        assert_eq!(
            LocalEndpoint::parse("0", "127.0.0.1", true),
            Ok(tcp("127.0.0.1", 0))
        );
    }

    #[test]
    fn unnamed_mapping_serves_v1_streams_and_the_only_service() {
        let map = ServiceMap::unnamed(tcp("127.0.0.1", 22));
        let one = vec!["SSH".to_string()];
        let two = vec!["SSH".to_string(), "HTTP".to_string()];
        assert!(map.resolve("", &one).is_some());
        assert!(map.resolve("SSH", &one).is_some());
        assert!(map.resolve("SSH", &two).is_none());
        assert!(map.resolve("", &two).is_some());
    }

    #[test]
    fn v1_stream_uses_the_named_mapping_of_a_one_service_tunnel() {
        let map: ServiceMap = "SSH=22".parse().unwrap();
        assert!(map.resolve("", &["SSH".to_string()]).is_some());
        assert!(map.resolve("", &[]).is_none());
    }

    #[test]
    fn a_shared_map_is_replaced_for_new_readers_and_outlives_its_sender() {
        let (tx, shared) = SharedServiceMap::new("SSH=22".parse().unwrap());
        let before = shared.current();
        tx.send_replace(std::sync::Arc::new("SSH=2222".parse().unwrap()));
        assert_eq!(before.resolve("SSH", &[]), Some(&tcp("127.0.0.1", 22)));
        assert_eq!(
            shared.current().resolve("SSH", &[]),
            Some(&tcp("127.0.0.1", 2222))
        );
        drop(tx);
        assert!(shared.current().resolve("SSH", &[]).is_some());
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn scope_admits_only_services_the_tunnel_was_opened_for() {
        let http = Scope::Opened(names(&["HTTP"]));
        assert!(http.admits("HTTP", &[]));
        assert!(http.admits("HTTP", &names(&["HTTP"])));
        assert!(!http.admits("SSH", &[]), "mapped but not opened");
        assert!(
            !http.admits("SSH", &names(&["HTTP", "SSH"])),
            "announced but not opened"
        );
        let both = Scope::Opened(names(&["HTTP", "SSH"]));
        assert!(
            !both.admits("SSH", &names(&["HTTP"])),
            "opened but not announced"
        );
        assert!(both.admits("SSH", &names(&["SSH", "HTTP"])));
        assert!(Scope::WholeMap.admits("ANY", &names(&["HTTP"])));
    }

    #[test]
    fn scope_reads_a_v1_stream_as_the_tunnels_only_service() {
        let ssh = Scope::Opened(names(&["SSH"]));
        assert!(ssh.admits("", &[]));
        assert!(ssh.admits("", &names(&["SSH"])));
        assert!(!ssh.admits("", &names(&["HTTP"])));
        let two = Scope::Opened(names(&["SSH", "HTTP"]));
        assert!(!two.admits("", &[]), "no only service to stand for");
        assert!(!two.admits("", &names(&["SSH", "HTTP"])));
        assert!(two.admits("", &names(&["HTTP"])));
        assert_eq!(two.to_string(), "SSH,HTTP");
    }

    #[test]
    fn unmapped_lists_services_that_will_be_refused() {
        let map: ServiceMap = "SSH=22".parse().unwrap();
        let t = vec!["SSH".to_string(), "VNC".to_string()];
        assert_eq!(map.unmapped(&t), vec!["VNC"]);
    }

    #[test]
    fn a_v1_stream_is_named_for_the_tunnels_one_service() {
        let ssh = Scope::Opened(names(&["SSH"]));
        assert_eq!(ssh.named("", &[]), Some("SSH"));
        assert_eq!(ssh.named("", &names(&["VNC"])), Some("VNC"));
        assert_eq!(ssh.named("HTTP", &[]), Some("HTTP"));
        let two = Scope::Opened(names(&["SSH", "HTTP"]));
        assert_eq!(two.named("", &[]), None);
        assert_eq!(Scope::WholeMap.named("", &[]), None);
        assert_eq!(Scope::WholeMap.opened(), &[] as &[String]);
    }
}

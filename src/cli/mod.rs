//! The command line. `local-proxy` takes the reference localproxy's options, so people who
//! run it today can switch without relearning anything.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::bridge::{
    Bridge, BridgeConfig, BridgeEnd, BridgeError, DataEndpoint, Limits, Role, SourceListeners,
};
use crate::protocol::{self, Format};
use crate::secret::Secret;
use crate::services::{DEFAULT_HOST, ServiceMap};
use crate::tls::{TlsOptions, client_config};

/// Where `local-proxy` reads the access token (never from argv by default).
pub const ENV_ACCESS_TOKEN: &str = "AWSIOT_TUNNEL_ACCESS_TOKEN";

#[derive(Parser, Debug)]
/// The whole command line.
#[command(
    name = "securetunnel-agent",
    version,
    about = "AWS IoT Secure Tunneling agent and local proxy"
)]
pub struct Cli {
    /// Log level as in localproxy: 0 off, 1-2 errors, 3 warnings, 4 info, 5 debug, 6 trace.
    #[arg(short = 'v', long, global = true, default_value_t = 4)]
    pub verbose: u8,
    /// The agent's configuration file.
    #[arg(long, global = true, default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: follow the thing's tunnel notifications and serve every tunnel.
    Run,
    /// Load and validate the configuration and the files it names; print a summary.
    CheckConfig {
        /// Check Unix-socket services as this user (default: securetunnel-agent when run
        /// as root and that user exists, else the current user).
        #[arg(long)]
        user: Option<String>,
    },
    /// Check online what stands between this gateway and a working tunnel: configuration,
    /// name and TCP (or proxy), TLS, MQTT connect and subscribe, the data plane. Exit 0 when
    /// all pass, 1 when a check failed, 2 for a configuration error.
    Doctor {
        /// A data-plane region to check (repeatable; default: the regions of live or
        /// persisted sessions, else the MQTT endpoint's).
        #[arg(long = "region", value_name = "REGION")]
        regions: Vec<String>,
        /// Connect to MQTT with this client id (one the policy allows) instead of asking
        /// the running agent: a second connection with the agent's id would disconnect it.
        #[arg(long, value_name = "ID")]
        client_id: Option<String>,
        /// The checklist as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the running agent's MQTT state and tunnels, live (exit 3 when it is not running).
    Status {
        /// The snapshot as JSON (the fields of status.json, current).
        #[arg(long)]
        json: bool,
    },
    /// Run one tunnel end, like the reference localproxy (token from AWSIOT_TUNNEL_ACCESS_TOKEN).
    LocalProxy(Box<LocalProxyArgs>),
}

mod check_config;

pub use check_config::check_config;

/// Loads the config and its files, printing every problem; `None` if any.
pub(crate) fn load_checked(
    path: &std::path::Path,
) -> Option<(crate::config::Config, crate::config::Checked)> {
    let cfg = match crate::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("securetunnel-agent: {} is not usable:\n{e}", path.display());
            return None;
        }
    };
    match crate::config::check_files(&cfg) {
        Ok(checked) => Some((cfg, checked)),
        Err(e) => {
            eprintln!("securetunnel-agent: {} is not usable:\n{e}", path.display());
            None
        }
    }
}

/// `load_checked` on the blocking pool: a key in a token logs in and signs.
async fn load_checked_off_runtime(
    path: &std::path::Path,
) -> Option<(crate::config::Config, crate::config::Checked)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || load_checked(&path))
        .await
        .ok()
        .flatten()
}

/// `status`: the running agent's live snapshot; exit 3 when it is not running, 1 when it
/// cannot be asked (permission, busy).
pub fn status(path: &std::path::Path, json: bool) -> ExitCode {
    // The configuration names the runtime directory; an operator who may not read it (0640)
    // still gets an answer from the default one.
    let dir = match crate::config::load(path) {
        Ok(c) => c.runtime_dir,
        Err(_) => crate::config::runtime_dir_here(),
    };
    match crate::status::query(&dir) {
        Ok(snapshot) if json => match serde_json::to_string_pretty(&snapshot) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("securetunnel-agent: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(snapshot) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            print!("{}", snapshot.render(now));
            ExitCode::SUCCESS
        }
        Err(e @ crate::status::QueryError::NotRunning(_)) => {
            eprintln!("securetunnel-agent: {e}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("securetunnel-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `doctor`: the online checklist (`crate::doctor`).
pub async fn doctor(
    path: &std::path::Path,
    regions: Vec<String>,
    client_id: Option<String>,
    json: bool,
    cancel: CancellationToken,
) -> ExitCode {
    let opts = crate::doctor::Options {
        regions,
        client_id,
        json,
    };
    // Ctrl-C stops it at once; the broker ends a half-done session by itself.
    tokio::select! {
        code = crate::doctor::run(path, &opts) => code,
        _ = cancel.cancelled() => ExitCode::from(130),
    }
}

/// `run`: the agent until SIGINT/SIGTERM.
pub async fn run_agent(path: &std::path::Path, cancel: CancellationToken) -> ExitCode {
    let Some(mut loaded) = load_checked_off_runtime(path).await else {
        return ExitCode::from(2);
    };
    loop {
        let (cfg, checked) = loaded.clone();
        let runtime_dir = cfg.runtime_dir.clone();
        let candidate = match crate::agent::Agent::run(cfg, checked, cancel.clone()).await {
            crate::agent::AgentExit::Stopped => return ExitCode::SUCCESS,
            crate::agent::AgentExit::Upgrade(candidate) => candidate,
        };
        // Sessions are on disk and no bridge runs: try the new binary before it replaces us.
        let tried = tokio::select! {
            r = crate::upgrade_trial::trial(&candidate, &runtime_dir) => r,
            _ = cancel.cancelled() => Err("the agent is stopping".to_owned()),
        };
        if cancel.is_cancelled() {
            return ExitCode::SUCCESS;
        }
        match tried {
            Ok(()) => {
                tracing::info!("the new binary was ready in its trial run: re-executing it");
                let err = candidate.exec();
                // Still here: the checked file was not executed. Exiting would let the
                // service manager start whatever is at the path now, unchecked.
                tracing::error!(
                    "the new binary was not executed ({err}); the running version starts again"
                );
                crate::upgrade::refuse_for_process(&candidate);
            }
            Err(why) => crate::upgrade_trial::record_rollback(&candidate, &why),
        }
        // The configuration as it is now, or, if the new package changed it into one this
        // version refuses, the one it ran with: the running version must come back.
        match load_checked_off_runtime(path).await {
            Some(now) => loaded = now,
            None => tracing::warn!(
                "the configuration is not usable by the running version; it goes on with the one it started with"
            ),
        }
    }
}

/// `-y`: the message format of an older destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClientType {
    /// One service, no service or connection ids.
    #[value(name = "V1", alias = "v1")]
    V1,
    /// Service ids, no connection ids.
    #[value(name = "V2", alias = "v2")]
    V2,
}

/// `local-proxy`'s options, named as in the reference localproxy.
#[derive(Args, Debug)]
pub struct LocalProxyArgs {
    /// AWS region of the tunnel (builds data.tunneling.iot.<region>.amazonaws.com).
    #[arg(
        short = 'r',
        long,
        env = "AWSIOT_TUNNEL_REGION",
        conflicts_with = "proxy_endpoint"
    )]
    pub region: Option<String>,
    /// Data-plane endpoint host[:port] instead of the region's (ws://127.0.0.1:port for a local emulator).
    #[arg(short = 'e', long, env = "AWSIOT_TUNNEL_ENDPOINT")]
    pub proxy_endpoint: Option<String>,
    /// Source mode: listen per service, e.g. SSH=5555,HTTP=8080 (or one port).
    #[arg(
        short = 's',
        long = "source-listen-port",
        conflicts_with = "destination"
    )]
    pub source: Option<String>,
    /// Destination mode: where each service goes, e.g. SSH=22,HTTP=10.0.0.1:80,APP=/run/app.sock.
    #[arg(short = 'd', long = "destination-app")]
    pub destination: Option<String>,
    /// Access token. Visible to other users in the process list: prefer AWSIOT_TUNNEL_ACCESS_TOKEN.
    #[arg(short = 't', long)]
    pub access_token: Option<String>,
    /// Client token (32-128 of [a-zA-Z0-9-]); generated when absent so reconnects work.
    #[arg(
        short = 'i',
        long,
        env = "AWSIOT_TUNNEL_CLIENT_TOKEN",
        hide_env_values = true
    )]
    pub client_token: Option<String>,
    /// PEM file, or directory of PEM files, trusted in addition to the platform roots.
    #[arg(short = 'c', long)]
    pub capath: Option<PathBuf>,
    /// Skip server certificate verification (testing only).
    #[arg(short = 'k', long = "no-ssl-host-verify")]
    pub no_ssl_host_verify: bool,
    /// Source mode: speak the message format of an older destination.
    #[arg(short = 'y', long, value_enum)]
    pub destination_client_type: Option<ClientType>,
    /// Source: listen address; destination: host for port-only mappings.
    #[arg(short = 'b', long)]
    pub local_bind_address: Option<String>,
    /// Reset a connection whose local consumer reads nothing for this many milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub stall_timeout_ms: u64,
    /// Drop and reconnect a websocket that receives nothing for this many seconds, once the
    /// service has answered a ping (0: TCP keepalive only).
    #[arg(long, default_value_t = 60)]
    pub idle_timeout_secs: u64,
}

/// A problem with the command line: printed with what to do, exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(String);

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

impl LocalProxyArgs {
    /// The data-plane endpoint from `-e` or `-r`.
    pub(crate) fn endpoint(&self) -> Result<DataEndpoint, UsageError> {
        match (&self.region, &self.proxy_endpoint) {
            (_, Some(e)) => DataEndpoint::parse_override(e)
                .map_err(|p| usage(format!("-e/--proxy-endpoint {e:?}: {p}"))),
            (Some(r), None) if protocol::is_valid_region(r) => Ok(DataEndpoint::for_region(r)),
            (Some(r), None) => Err(usage(format!(
                "-r/--region {r:?} is not a region name such as us-east-1"
            ))),
            (None, None) => Err(usage(
                "give the tunnel's region with -r (or an endpoint with -e host[:port])",
            )),
        }
    }

    /// The access token from the environment (or, with a warning, `-t`).
    pub(crate) fn access_token(&self) -> Result<Secret, UsageError> {
        let token = match &self.access_token {
            Some(t) => {
                warn!(
                    "access token given with -t: other users can read it in the process list; use {ENV_ACCESS_TOKEN} instead"
                );
                Secret::new(t.as_str())
            }
            None => Secret::new(
                std::env::var(ENV_ACCESS_TOKEN)
                    .map_err(|_| usage(format!("no access token: set {ENV_ACCESS_TOKEN}")))?,
            ),
        };
        if let Some(problem) = protocol::access_token_problem(token.expose()) {
            return Err(usage(format!("{problem}; check {ENV_ACCESS_TOKEN}")));
        }
        Ok(token)
    }

    /// The TLS configuration for a `wss` endpoint: platform roots, `-c`, `-k`.
    pub(crate) fn tls(
        &self,
        endpoint: &DataEndpoint,
    ) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, UsageError> {
        if !endpoint.tls {
            return Ok(None);
        }
        let mut opts = TlsOptions::platform();
        if let Some(path) = &self.capath {
            opts.add_ca_path(path)
                .map_err(|e| usage(format!("-c/--capath: {e}")))?;
        }
        if self.no_ssl_host_verify {
            warn!(
                "!!! -k: the server certificate is NOT verified. Anyone on the network path can read and change this tunnel. Use only against a test endpoint. !!!"
            );
            opts.insecure_skip_verify = true;
        }
        client_config(&opts)
            .map(Some)
            .map_err(|e| usage(e.to_string()))
    }

    /// Builds the bridge configuration; binds source listeners now so a taken port fails early.
    pub(crate) async fn bridge_config(&self) -> Result<BridgeConfig, UsageError> {
        let endpoint = with_env_proxy(self.endpoint()?)?;
        let host = self.local_bind_address.as_deref().unwrap_or(DEFAULT_HOST);
        let role = match (&self.source, &self.destination) {
            (Some(s), None) => {
                let map = ServiceMap::parse_mappings(s, host, true)
                    .map_err(|e| usage(format!("-s: {e}")))?;
                let format = match self.destination_client_type {
                    Some(ClientType::V1) if map.named().count() > 1 => {
                        return Err(usage("-y V1 carries one service: give a single -s mapping"));
                    }
                    Some(ClientType::V1) => Format::V1,
                    Some(ClientType::V2) => Format::V2,
                    None => Format::V3,
                };
                let listeners = SourceListeners::bind(&map)
                    .await
                    .map_err(|e| usage(e.to_string()))?;
                Role::Source { listeners, format }
            }
            (None, Some(d)) => {
                if self.destination_client_type.is_some() {
                    warn!("-y/--destination-client-type only applies in source mode; ignored");
                }
                let services = ServiceMap::parse_mappings(d, host, false)
                    .map_err(|e| usage(format!("-d: {e}")))?;
                // The operator's own map for this one tunnel: every service in it.
                Role::Destination {
                    services: services.into(),
                    scope: crate::services::Scope::WholeMap,
                    consent: crate::consent::Gate::always(),
                }
            }
            _ => {
                return Err(usage(
                    "choose a mode: -s for source (listen) or -d for destination (connect)",
                ));
            }
        };
        let limits = Limits {
            stall_timeout: std::time::Duration::from_millis(self.stall_timeout_ms.max(1)),
            ..Limits::default()
        }
        .with_idle_timeout(std::time::Duration::from_secs(self.idle_timeout_secs));
        Ok(BridgeConfig {
            role,
            tls: self.tls(&endpoint)?,
            endpoint,
            access_token: self.access_token()?,
            client_token: self.client_token.as_deref().map(Secret::new),
            limits,
        })
    }
}

/// HTTPS_PROXY/NO_PROXY as localproxy and curl read them (`ProxySettings::from_env`).
fn with_env_proxy(endpoint: DataEndpoint) -> Result<DataEndpoint, UsageError> {
    let Some((var, settings)) = crate::proxy::ProxySettings::from_env().map_err(usage)? else {
        return Ok(endpoint);
    };
    let endpoint = endpoint.with_proxy(Some(&settings));
    match &endpoint.proxy {
        Some(p) => info!(proxy = %p, "reaching the data plane through the HTTP proxy in {var}"),
        None => info!(host = %endpoint.host, "no_proxy names the data plane: not using {var}"),
    }
    Ok(endpoint)
}

/// Runs `local-proxy` until the tunnel closes or a signal arrives.
pub async fn local_proxy(args: LocalProxyArgs, cancel: CancellationToken) -> ExitCode {
    // Usage problems go straight to stderr: they must show even with logging off.
    let cfg = match args.bridge_config().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("securetunnel-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let bridge = match Bridge::new(cfg) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("securetunnel-agent: {e}");
            return ExitCode::from(2);
        }
    };
    info!(mode = %bridge.mode(), "starting local proxy");
    match bridge.run(cancel).await {
        Ok(BridgeEnd::ClosedByService { .. } | BridgeEnd::Cancelled | BridgeEnd::Retired) => {
            ExitCode::SUCCESS
        }
        Err(e @ BridgeError::Rejected(_)) => {
            error!("{e}; not retrying with this token");
            ExitCode::from(3)
        }
        Err(e) => {
            error!("{e}");
            ExitCode::from(2)
        }
    }
}

/// Libraries whose verbose output can carry secrets or peer data, and the most they may log:
/// tungstenite writes the raw upgrade request (both tokens) at trace level, rumqttc the
/// packets (notify payloads hold tokens), rustls handshake details.
pub const QUIET_TARGETS: &[(&str, tracing::Level)] = &[
    ("tungstenite", tracing::Level::WARN),
    ("tokio_tungstenite", tracing::Level::WARN),
    ("rumqttc", tracing::Level::INFO),
    ("rustls", tracing::Level::WARN),
    ("tokio_rustls", tracing::Level::WARN),
];

/// Rule (secrets): the agent logs at `level`; the libraries in `QUIET_TARGETS` never above
/// their cap, whatever the level and whether their `log` records are forwarded (feature
/// `log`).
pub fn log_filter(
    level: tracing::level_filters::LevelFilter,
) -> tracing_subscriber::filter::Targets {
    use tracing::level_filters::LevelFilter;
    let mut targets = tracing_subscriber::filter::Targets::new().with_default(level);
    for (target, cap) in QUIET_TARGETS {
        let cap = tracing::level_filters::LevelFilter::from_level(*cap);
        targets = targets.with_target(*target, cap.min(level));
    }
    // The audit trail's journal lines are kept whatever the level.
    targets.with_target(crate::audit::TARGET, level.max(LevelFilter::INFO))
}

/// tracing to stderr at the localproxy-style level.
pub fn init_logging(verbose: u8) {
    use tracing::level_filters::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = match verbose {
        0 => LevelFilter::OFF,
        1 | 2 => LevelFilter::ERROR,
        3 => LevelFilter::WARN,
        4 => LevelFilter::INFO,
        5 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    // With feature `log`, try_init also forwards the `log` crate's records, through the
    // same filter.
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .with(log_filter(level))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> LocalProxyArgs {
        let mut argv = vec!["securetunnel-agent", "local-proxy"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::LocalProxy(a) => *a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn localproxy_flags_are_accepted() {
        let a = parse(&[
            "-r",
            "us-east-1",
            "-d",
            "SSH=22,HTTP=10.0.0.1:80",
            "-i",
            "x",
            "-c",
            "/tmp/ca.pem",
            "-k",
        ]);
        assert_eq!(a.region.as_deref(), Some("us-east-1"));
        assert_eq!(a.destination.as_deref(), Some("SSH=22,HTTP=10.0.0.1:80"));
        assert!(a.no_ssl_host_verify);
        let a = parse(&["-e", "127.0.0.1:8443", "-s", "5555", "-y", "V2"]);
        assert_eq!(a.destination_client_type, Some(ClientType::V2));
        assert_eq!(a.endpoint().unwrap().port, 8443);
    }

    #[test]
    fn region_and_endpoint_problems_say_what_to_give() {
        let err = parse(&["-d", "22"]).endpoint().unwrap_err().to_string();
        assert!(err.contains("-r"), "{err}");
        let err = parse(&["-r", "useast1", "-d", "22"])
            .endpoint()
            .unwrap_err()
            .to_string();
        assert!(err.contains("useast1"), "{err}");
        assert!(Cli::try_parse_from(["x", "local-proxy", "-s", "1", "-d", "2"]).is_err());
    }

    #[test]
    fn libraries_that_log_secrets_are_capped_at_every_level() {
        use tracing::Level;
        use tracing::level_filters::LevelFilter;
        let f = log_filter(LevelFilter::TRACE);
        assert!(!f.would_enable("tungstenite::handshake::client", &Level::TRACE));
        assert!(!f.would_enable("tokio_tungstenite", &Level::DEBUG));
        assert!(!f.would_enable("rumqttc::state", &Level::DEBUG));
        assert!(f.would_enable("rumqttc::state", &Level::INFO));
        assert!(f.would_enable("securetunnel_agent::bridge", &Level::TRACE));
        let quiet = log_filter(LevelFilter::ERROR);
        assert!(!quiet.would_enable("tungstenite", &Level::WARN));
        assert!(!quiet.would_enable("securetunnel_agent", &Level::WARN));
    }
}

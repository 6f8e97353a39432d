//! `securetunnel-agent doctor`: what stands between this gateway and a working tunnel,
//! checked online in the order a connection needs it: the configuration, the device
//! certificate's dates, name and TCP (or proxy), TLS, MQTT CONNECT and SUBSCRIBE (each
//! refusal as the policy statement to add), then the data plane of each region.
//!
//! It never disturbs a running agent: AWS IoT drops the older of two connections with one
//! client id, so while the agent runs its status answers for MQTT unless `--client-id`
//! names another id. It leaves nothing behind: it unsubscribes and disconnects cleanly, and
//! reads the state directory without changing it.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Checked, Config};
use crate::status::{QueryError, Snapshot};
use report::{Check, Report};

mod data_plane;
mod handshake;
mod mqtt;
mod reach;
mod report;
mod times;

/// What the command line asks for.
#[derive(Debug, Default)]
pub struct Options {
    /// Data-plane regions to check; empty: those of the sessions, else the MQTT endpoint's.
    pub regions: Vec<String>,
    /// Connect to MQTT with this id even while the agent runs.
    pub client_id: Option<String>,
    pub json: bool,
}

/// Whether the agent runs, as its status socket says.
enum Agent {
    Running(Snapshot),
    NotRunning,
    /// The socket could not be asked (permission, busy): it may run.
    Unknown(String),
}

/// Runs every check and prints the checklist. Exit 0 when all pass, 1 when one failed, 2
/// when the configuration (or a `--region`) is not usable.
pub async fn run(path: &Path, opts: &Options) -> ExitCode {
    // The files are read off the runtime thread.
    let (path_owned, asked) = (path.to_owned(), opts.regions.clone());
    let offline = tokio::task::spawn_blocking(move || offline(&path_owned, &asked)).await;
    let (mut report, loaded) = match offline {
        Ok(done) => done,
        Err(e) => {
            eprintln!("securetunnel-agent: doctor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some((cfg, checked, persisted)) = loaded else {
        print(&report, opts.json);
        return ExitCode::from(2);
    };
    let agent = broker(&mut report, &cfg, &checked, opts).await;
    let mut sessions = persisted;
    if let Some(Agent::Running(s)) = &agent {
        sessions.extend(s.tunnels.iter().map(|t| t.region.clone()));
        sessions.sort();
        sessions.dedup();
    }
    let regions = data_plane::regions(&opts.regions, &sessions, &cfg.mqtt.host);
    data_plane::check(&mut report, &cfg, &checked.tunnel_tls, &regions).await;
    print(&report, opts.json);
    ExitCode::from(report.exit_code())
}

/// What needs no network: the configuration, the certificate's dates, the persisted
/// sessions' regions.
fn offline(path: &Path, regions: &[String]) -> (Report, Option<(Config, Checked, Vec<String>)>) {
    let mut report = Report::default();
    let Some((cfg, checked)) = configuration(&mut report, path, regions) else {
        return (report, None);
    };
    let id = &checked.identity;
    report.add(Check::pass("key", cfg.mqtt.key.to_string(), &id.key));
    certificate(&mut report, id);
    let persisted = crate::persist::SessionStore::regions(&cfg.state_dir);
    (report, Some((cfg, checked, persisted)))
}

fn print(report: &Report, json: bool) {
    if !json {
        print!("{}", report.render());
        return;
    }
    match serde_json::to_string_pretty(report) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("securetunnel-agent: {e}"),
    }
}

/// Step 1: the configuration as `check-config` reads it, and the regions asked for.
fn configuration(
    report: &mut Report,
    path: &Path,
    regions: &[String],
) -> Option<(Config, Checked)> {
    let target = path.display().to_string();
    for r in regions
        .iter()
        .filter(|r| !crate::protocol::is_valid_region(r))
    {
        let saw = format!("--region {r:?} is not a region name");
        report.add(Check::fail(
            "config",
            &target,
            saw,
            "give a region such as eu-west-1",
        ));
    }
    let loaded = crate::config::load(path).and_then(|cfg| {
        let checked = crate::config::check_files(&cfg)?;
        Ok((cfg, checked))
    });
    match loaded {
        // A bad --region: the configuration is fine, the command line is not.
        Ok(_) if report.failed() > 0 => None,
        Ok((cfg, checked)) => {
            let saw = format!(
                "thing {}, MQTT {}:{}",
                cfg.thing_name, cfg.mqtt.host, cfg.mqtt.port
            );
            report.add(Check::pass("config", target, saw));
            for w in &checked.warnings {
                report.add(Check::warn("config", path.display().to_string(), w));
            }
            Some((cfg, checked))
        }
        Err(errors) => {
            for e in errors.0 {
                let fix = if e.fix.is_empty() {
                    "see docs/configuration.md".to_owned()
                } else {
                    e.fix
                };
                report.add(Check::fail("config", e.key, e.problem, fix));
            }
            None
        }
    }
}

/// The device certificate's validity period against the local clock.
fn certificate(report: &mut Report, id: &crate::config::Identity) {
    let target = id.cert_source.clone();
    let validity = times::validity(&id.cert);
    let Some(v) = validity else {
        report.add(Check::skip(
            "certificate",
            target,
            "its validity period could not be read",
        ));
        return;
    };
    let now = times::now();
    let check = match times::period_problem(v, now) {
        None => {
            let saw = format!("valid until {}", times::utc(v.not_after));
            Check::pass("certificate", target, saw)
        }
        Some(problem) => Check::fail("certificate", target, problem, times::period_fix(v, now)),
    };
    report.add(check);
}

async fn agent(cfg: &Config) -> Agent {
    let dir = cfg.runtime_dir.clone();
    match tokio::task::spawn_blocking(move || crate::status::query(&dir)).await {
        Ok(Ok(snapshot)) => Agent::Running(snapshot),
        Ok(Err(QueryError::NotRunning(_))) => Agent::NotRunning,
        Ok(Err(e)) => Agent::Unknown(e.to_string()),
        Err(e) => Agent::Unknown(e.to_string()),
    }
}

/// The notify topics the agent follows: its own thing's and each downstream thing's.
fn topics(cfg: &Config) -> Vec<mqtt::Topic> {
    let own = mqtt::Topic {
        thing: cfg.thing_name.clone(),
        topic: cfg.notify_topic(),
    };
    let downstream = cfg.things.keys().map(|thing| mqtt::Topic {
        thing: thing.clone(),
        topic: crate::protocol::notify::notify_topic(thing),
    });
    std::iter::once(own).chain(downstream).collect()
}

/// Steps 2 to 5: the broker through name, TCP (or proxy), TLS and MQTT. Returns whether
/// the agent runs, as asked right before MQTT (a service manager may have started it).
async fn broker(
    report: &mut Report,
    cfg: &Config,
    checked: &Checked,
    opts: &Options,
) -> Option<Agent> {
    let (host, port) = (cfg.mqtt.host.as_str(), cfg.mqtt.port);
    let proxy = cfg.proxy.as_ref().and_then(|p| p.for_host(host));
    let target = crate::proxy::authority(host, port);
    let own = cfg.mqtt.client_id.as_str();
    let Some(tcp) = reach::connect(report, host, port, proxy, "mqtt.endpoint").await else {
        report.add(Check::skip(
            "mqtt-connect",
            own,
            "not checked: no connection",
        ));
        return None;
    };
    let side = handshake::Side::Broker {
        ca: cfg.mqtt.ca.as_deref(),
    };
    let alpn = cfg.mqtt.alpn.as_deref();
    let config = checked.mqtt_tls.clone();
    let Some(tls) = handshake::handshake(report, tcp, config, host, &target, side, alpn).await
    else {
        report.add(Check::skip(
            "mqtt-connect",
            own,
            "not checked: no TLS connection",
        ));
        return None;
    };
    let agent = agent(cfg).await;
    mqtt_steps(report, cfg, tls, &target, &agent, opts.client_id.as_deref()).await;
    Some(agent)
}

/// Steps 4 and 5: connect with the operator's id; with the agent's own id only while the
/// agent does not run; else ask the agent.
async fn mqtt_steps(
    report: &mut Report,
    cfg: &Config,
    mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    target: &str,
    agent: &Agent,
    client_id: Option<&str>,
) {
    let topics = topics(cfg);
    let own = cfg.mqtt.client_id.as_str();
    match (agent, client_id.filter(|id| *id != own)) {
        (_, Some(id)) => {
            let id = mqtt::Identity {
                client_id: id,
                agents_own: false,
            };
            mqtt::check(report, tls, target, &id, &topics).await;
        }
        (Agent::NotRunning, None) => {
            let id = mqtt::Identity {
                client_id: own,
                agents_own: true,
            };
            mqtt::check(report, tls, target, &id, &topics).await;
        }
        (Agent::Running(snapshot), None) => {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
            mqtt::from_agent(report, snapshot, own, &topics);
        }
        (Agent::Unknown(why), None) => {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
            let saw = format!(
                "cannot tell whether the agent runs ({why}); connecting as {own} would disconnect it"
            );
            let fix = "run doctor as root or as the agent's user, or give --client-id ID (another id the policy allows)";
            report.add(Check::fail("mqtt-connect", own, saw, fix));
        }
    }
}

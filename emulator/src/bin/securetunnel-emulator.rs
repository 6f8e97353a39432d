//! securetunnel-emulator: the tunneling-service stand-in as a process, for manual tests and
//! scripts. Prints one JSON line per event on stdout; runs until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use securetunnel_emulator::pki::{Issued, mutual_tls_client};
use securetunnel_emulator::publisher::PublisherConfig;
use securetunnel_emulator::{Emulator, EmulatorConfig, EmulatorTls, ReplacedPeer};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Stand-in for the AWS IoT Secure Tunneling data plane (testing only)"
)]
struct Args {
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Plain ws:// instead of wss://.
    #[arg(long, conflicts_with_all = ["cert", "key"])]
    plain: bool,
    /// Server certificate (PEM); a CA and certificate are minted when absent.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Where to write the minted CA certificate, for the clients' -c/--capath.
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// Open a tunnel with these comma-separated services at start (repeatable).
    #[arg(long = "tunnel")]
    tunnels: Vec<String>,
    /// Lifetime of the tunnels opened at start.
    #[arg(long, default_value_t = 720)]
    lifetime_minutes: u64,
    /// Cut relayed frames across websocket messages at random points.
    #[arg(long)]
    reframe: bool,
    /// Stop answering pings.
    #[arg(long)]
    no_pongs: bool,
    /// Answer the first N handshakes with STATUS, as N:STATUS.
    #[arg(long, value_parser = parse_failures)]
    fail_handshakes: Option<(u32, u16)>,
    /// Serve the AWS-compatible control plane (boto3, aws-cli) on a free loopback port.
    #[arg(long)]
    control_plane: bool,
    /// Region in notifies and ARNs.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Time scale: seconds that one minute of tunnel lifetime lasts.
    #[arg(long, default_value_t = 60.0)]
    minute_secs: f64,
    /// Cut the connection (no close frame) of a peer at once when its token is rotated.
    #[arg(long)]
    disconnect_on_rotate: bool,
    /// MQTT broker (host:port, mutual TLS) to publish notifies to.
    #[arg(long, requires_all = ["mqtt_cert", "mqtt_key", "mqtt_ca"])]
    mqtt: Option<String>,
    #[arg(long)]
    mqtt_cert: Option<PathBuf>,
    #[arg(long)]
    mqtt_key: Option<PathBuf>,
    #[arg(long)]
    mqtt_ca: Option<PathBuf>,
    /// Notify topic; {thing} is replaced by the thing name.
    #[arg(long, default_value = securetunnel_emulator::publisher::AWS_NOTIFY_TOPIC)]
    notify_topic: String,
    /// What happens to a peer a new connection of the same mode replaces.
    #[arg(long, value_enum, default_value_t = Replaced::Close)]
    replaced_peer: Replaced,
    /// Do not reset the other side's streams when a peer (re)connects.
    #[arg(long)]
    no_stream_reset_on_reconnect: bool,
    /// Accept every upgrade, then cut the connection (no close frame) after this many ms.
    #[arg(long)]
    drop_after_upgrade_ms: Option<u64>,
    /// Black-hole every connection this many ms after its upgrade (no reads, no writes, no close).
    #[arg(long)]
    black_hole_after_ms: Option<u64>,
    /// Print a JSON line per peer connect and disconnect, with whether a reconnecting peer
    /// presented the same access and client token as the previous one of its mode.
    #[arg(long)]
    events: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Replaced {
    Close,
    Keep,
    Drop,
}

fn publisher(args: &Args) -> Result<Option<PublisherConfig>, Box<dyn std::error::Error>> {
    let (Some(broker), Some(cert), Some(key), Some(ca)) =
        (&args.mqtt, &args.mqtt_cert, &args.mqtt_key, &args.mqtt_ca)
    else {
        return Ok(None);
    };
    let (host, port) = broker.rsplit_once(':').ok_or("--mqtt takes host:port")?;
    let identity = Issued {
        cert_pem: std::fs::read_to_string(cert)?,
        key_pem: std::fs::read_to_string(key)?,
    };
    let tls = mutual_tls_client(&std::fs::read_to_string(ca)?, &identity)?;
    Ok(Some(PublisherConfig {
        host: host.to_owned(),
        port: port.parse()?,
        client_id: format!("securetunnel-emulator-{}", std::process::id()),
        tls,
        topic: args.notify_topic.clone(),
    }))
}

fn parse_failures(s: &str) -> Result<(u32, u16), String> {
    let (n, status) = s.split_once(':').ok_or("use N:STATUS, e.g. 2:503")?;
    Ok((
        n.parse().map_err(|_| "N must be a number")?,
        status
            .parse()
            .map_err(|_| "STATUS must be an HTTP status")?,
    ))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    securetunnel_agent::cli::init_logging(4);
    if !args.listen.ip().is_loopback() {
        eprintln!("securetunnel-emulator: --listen must be a loopback address");
        return std::process::ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("securetunnel-emulator: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("securetunnel-emulator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let tls = match (&args.cert, &args.key) {
        _ if args.plain => EmulatorTls::Plain,
        (Some(c), Some(k)) => EmulatorTls::Pem {
            cert_pem: std::fs::read_to_string(c)?,
            key_pem: std::fs::read_to_string(k)?,
        },
        _ => EmulatorTls::Generate,
    };
    let config = EmulatorConfig {
        listen: args.listen,
        tls,
        control_plane: args.control_plane,
        region: args.region.clone(),
        minute: Duration::from_secs_f64(args.minute_secs.max(0.001)),
        publisher: publisher(&args)?,
        max_open_tunnels: 1000,
    };
    let emu = Emulator::start(config).await?;
    emu.set_disconnect_on_rotate(args.disconnect_on_rotate);
    if let (Some(path), Some(pem)) = (&args.ca_out, emu.ca_pem()) {
        std::fs::write(path, pem)?;
    }
    emu.set_reframe(args.reframe);
    emu.set_replaced_peer(match args.replaced_peer {
        Replaced::Close => ReplacedPeer::Close,
        Replaced::Keep => ReplacedPeer::Keep,
        Replaced::Drop => ReplacedPeer::Drop,
    });
    emu.set_reset_streams_on_reconnect(!args.no_stream_reset_on_reconnect);
    emu.set_drop_after_upgrade(args.drop_after_upgrade_ms.map(Duration::from_millis));
    emu.set_black_hole_after_upgrade(args.black_hole_after_ms.map(Duration::from_millis));
    emu.set_answer_pings(!args.no_pongs);
    if let Some((n, status)) = args.fail_handshakes {
        emu.fail_next_handshakes(n, status);
    }
    let started = serde_json::json!({
        "event": "listening",
        "endpoint": emu.endpoint(),
        "controlEndpoint": emu.control_endpoint(),
        "caPath": args.ca_out,
    });
    println!("{started}");
    for services in &args.tunnels {
        let names: Vec<&str> = services.split(',').map(str::trim).collect();
        let t = emu.open_tunnel(&names, Duration::from_secs(args.lifetime_minutes * 60));
        let line = serde_json::json!({
            "event": "tunnel",
            "tunnelId": t.tunnel_id,
            "services": names,
            "sourceAccessToken": t.source_access_token,
            "destinationAccessToken": t.destination_access_token,
        });
        println!("{line}");
    }
    let cancel = CancellationToken::new();
    securetunnel_agent::signals::cancel_on_signals(cancel.clone())?;
    if args.events {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = print_events(&emu) => {}
        }
    } else {
        cancel.cancelled().await;
    }
    Ok(())
}

/// One JSON line per peer event, as they happen.
async fn print_events(emu: &Emulator) {
    use securetunnel_emulator::PeerEventKind;
    use std::collections::HashMap;
    let mut changes = emu.changes();
    let mut printed: HashMap<String, usize> = HashMap::new();
    loop {
        for id in emu.tunnel_ids() {
            let events = emu.peer_events(&id);
            let done = printed.entry(id.clone()).or_default();
            for (i, e) in events.iter().enumerate().skip(*done) {
                let previous = events[..i]
                    .iter()
                    .rev()
                    .find(|p| p.mode == e.mode && p.kind == PeerEventKind::Connected);
                let (change, why) = match &e.kind {
                    PeerEventKind::Connected => ("connected", None),
                    PeerEventKind::Gone(why) => ("gone", Some(why.clone())),
                };
                let same = match (&e.kind, previous) {
                    (PeerEventKind::Connected, Some(p)) => {
                        Some(p.access_token == e.access_token && p.client_token == e.client_token)
                    }
                    _ => None,
                };
                let line = serde_json::json!({
                    "event": "peer",
                    "tunnelId": id,
                    "mode": e.mode.as_str(),
                    "peer": e.peer,
                    "change": change,
                    "why": why,
                    "sameTokensAsBefore": same,
                });
                println!("{line}");
            }
            *done = events.len();
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

//! securetunnel-emulator: the tunneling-service stand-in as a process, for manual tests and
//! scripts. Prints one JSON line per event on stdout; runs until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use securetunnel_emulator::pki::{Issued, mutual_tls_client};
use securetunnel_emulator::publisher::PublisherConfig;
use securetunnel_emulator::{Emulator, EmulatorConfig, EmulatorTls};
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
    /// Disconnect a peer at once when its token is rotated.
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
    cancel.cancelled().await;
    Ok(())
}

//! The `securetunnel-emulator` binary as a tool: its flags, its JSON lines, SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use securetunnel_agent::bridge::{Bridge, BridgeConfig, DataEndpoint, Limits, Role};
use securetunnel_agent::secret::Secret;
use securetunnel_agent::services::ServiceMap;
use securetunnel_agent::tls::{TlsOptions, client_config};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

async fn next_json(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("a line in time")
        .unwrap()
        .expect("the emulator is still running");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binarys_flags_open_tunnels_fail_handshakes_name_the_region_and_print_events() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let mut child = Command::new(env!("CARGO_BIN_EXE_securetunnel-emulator"))
        .args(["--tunnel", "SSH,HTTP", "--control-plane", "--events"])
        .args(["--region", "eu-west-1", "--fail-handshakes", "1:503"])
        .arg("--ca-out")
        .arg(&ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = next_json(&mut lines).await;
    assert_eq!(listening["event"], "listening");
    let endpoint = listening["endpoint"].as_str().unwrap().to_owned();
    assert!(
        listening["controlEndpoint"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );
    let tunnel = next_json(&mut lines).await;
    assert_eq!(tunnel["event"], "tunnel");
    assert_eq!(tunnel["services"], serde_json::json!(["SSH", "HTTP"]));
    let id = tunnel["tunnelId"].as_str().unwrap().to_owned();

    // --ca-out: the minted CA verifies the data plane; --fail-handshakes 1:503: the first
    // upgrade is refused and retried.
    let mut opts = TlsOptions::default();
    opts.add_ca_pem(&std::fs::read(&ca).unwrap()).unwrap();
    let bridge = Bridge::new(BridgeConfig {
        role: Role::Destination {
            services: ServiceMap::default()
                .with(
                    "SSH",
                    securetunnel_agent::services::LocalEndpoint::Tcp {
                        host: "127.0.0.1".into(),
                        port: 22,
                    },
                )
                .into(),
            scope: securetunnel_agent::services::Scope::WholeMap,
            consent: securetunnel_agent::consent::Gate::always(),
        },
        endpoint: DataEndpoint::parse_override(&endpoint).unwrap(),
        tls: Some(client_config(&opts).unwrap()),
        access_token: Secret::new(tunnel["destinationAccessToken"].as_str().unwrap()),
        client_token: None,
        limits: Limits {
            reconnect_min_delay: Duration::from_millis(20),
            reconnect_max_delay: Duration::from_millis(100),
            ..Limits::default()
        },
    })
    .unwrap();
    let stats = bridge.stats();
    let cancel = CancellationToken::new();
    let running = tokio::spawn(bridge.run(cancel.clone()));

    // --events: one line per peer change.
    let event = next_json(&mut lines).await;
    assert_eq!(event["event"], "peer");
    assert_eq!(event["tunnelId"], id.as_str());
    assert_eq!(event["mode"], "destination");
    assert_eq!(event["change"], "connected");
    assert_eq!(
        stats
            .handshake_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "--fail-handshakes 1:503 did not refuse the first upgrade"
    );

    // --region: the control plane names it.
    let control = listening["controlEndpoint"].as_str().unwrap();
    let described = securetunnel_emulator::testkit::boto3(
        control,
        "describe_tunnel",
        serde_json::json!({"tunnelId": id}),
    )
    .await
    .unwrap()
    .unwrap();
    let arn = described["tunnel"]["tunnelArn"].as_str().unwrap();
    assert!(arn.contains(":eu-west-1:"), "{arn}");

    cancel.cancel();
    let _ = running.await;
    // SIGTERM ends it with status 0.
    // SAFETY: kill(2) with a live child's pid and a valid signal number.
    assert_eq!(
        unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) },
        0
    );
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

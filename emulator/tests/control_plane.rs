//! The emulator's control plane against the real clients: aws-cli v1 and boto3.

use std::process::Output;

use securetunnel_emulator::testkit;
use securetunnel_emulator::{Emulator, EmulatorConfig, EmulatorTls};
use serde_json::{Value, json};
use tokio::process::Command;

/// The venv with aws-cli and boto3: when it is missing, the whole test binary fails once,
/// with the one line that says to run ./test.sh, not once per test.
fn venv_bin(name: &str) -> std::path::PathBuf {
    testkit::venv_bin(name).unwrap_or_else(|e| {
        // Straight to stderr: the harness captures eprintln! and the exit would lose it.
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "control_plane: {e}");
        std::process::exit(1)
    })
}

async fn boto3(emu: &Emulator, op: &str, params: Value) -> Result<Value, testkit::ServiceError> {
    let endpoint = emu.control_endpoint().unwrap();
    venv_bin("python");
    testkit::boto3(&endpoint, op, params)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn control_plane() -> Emulator {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_test_writer()
        .try_init();
    let mut cfg = EmulatorConfig::loopback(EmulatorTls::Plain);
    cfg.control_plane = true;
    Emulator::start(cfg).await.unwrap()
}

async fn aws(emu: &Emulator, args: &[&str]) -> Output {
    Command::new(venv_bin("aws"))
        .arg("iotsecuretunneling")
        .args(args)
        .args([
            "--endpoint-url",
            &emu.control_endpoint().unwrap(),
            "--output",
            "json",
        ])
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "y")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_MAX_ATTEMPTS", "1")
        .output()
        .await
        .unwrap()
}

fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "aws failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(&text).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cli_v1_opens_describes_rotates_and_closes_a_tunnel() {
    let emu = control_plane().await;
    let open = ok_json(
        &aws(
            &emu,
            &[
                "open-tunnel",
                "--destination-config",
                "thingName=thing1,services=SSH",
                "--timeout-config",
                "maxLifetimeTimeoutMinutes=30",
                "--description",
                "ssh to dev",
            ],
        )
        .await,
    );
    let id = open["tunnelId"].as_str().unwrap();
    assert!(
        open["tunnelArn"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":tunnel/{id}"))
    );
    assert!(open["sourceAccessToken"].is_string() && open["destinationAccessToken"].is_string());

    let d = ok_json(&aws(&emu, &["describe-tunnel", "--tunnel-id", id]).await);
    assert_eq!(d["tunnel"]["status"], "OPEN");
    assert_eq!(d["tunnel"]["destinationConfig"]["services"], json!(["SSH"]));
    assert_eq!(
        d["tunnel"]["timeoutConfig"]["maxLifetimeTimeoutMinutes"],
        30
    );
    assert_eq!(
        d["tunnel"]["destinationConnectionState"]["status"],
        "DISCONNECTED"
    );

    let r = ok_json(
        &aws(
            &emu,
            &[
                "rotate-tunnel-access-token",
                "--tunnel-id",
                id,
                "--client-mode",
                "DESTINATION",
                "--destination-config",
                "thingName=thing1,services=SSH",
            ],
        )
        .await,
    );
    assert!(r["destinationAccessToken"].is_string());
    assert_ne!(r["destinationAccessToken"], open["destinationAccessToken"]);

    ok_json(&aws(&emu, &["close-tunnel", "--tunnel-id", id]).await);
    let d = ok_json(&aws(&emu, &["describe-tunnel", "--tunnel-id", id]).await);
    assert_eq!(d["tunnel"]["status"], "CLOSED");

    let missing = aws(&emu, &["describe-tunnel", "--tunnel-id", "no-such-tunnel"]).await;
    assert_eq!(missing.status.code(), Some(255));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("An error occurred (ResourceNotFoundException) when calling the DescribeTunnel operation"),
        "{err}"
    );
}

// boto3 checks only minimums client-side; the server must refuse the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_gets_validation_errors_for_what_its_model_does_not_check() {
    let emu = control_plane().await;
    let invalid = [
        (
            "open_tunnel",
            json!({"timeoutConfig": {"maxLifetimeTimeoutMinutes": 721}}),
        ),
        (
            "open_tunnel",
            json!({"destinationConfig": {"thingName": "bad thing", "services": ["SSH"]}}),
        ),
        (
            "open_tunnel",
            json!({"destinationConfig": {"services": ["A", "B", "C", "D"]}}),
        ),
        ("open_tunnel", json!({"description": "tab\tinside"})),
        (
            "open_tunnel",
            json!({"tags": [{"key": "k;", "value": "v"}]}),
        ),
        ("describe_tunnel", json!({"tunnelId": "bad id!"})),
        ("list_tunnels", json!({"maxResults": 101})),
        (
            "rotate_tunnel_access_token",
            json!({"tunnelId": "t", "clientMode": "BOTH"}),
        ),
        (
            "rotate_tunnel_access_token",
            json!({"tunnelId": "t", "clientMode": "SOURCE", "destinationConfig": {"services": ["SSH"]}}),
        ),
    ];
    for (op, params) in invalid {
        let (code, message) = boto3(&emu, op, params.clone()).await.unwrap_err();
        assert_eq!(code, "ValidationException", "{op} {params}: {message}");
    }
    let (code, _) = boto3(&emu, "close_tunnel", json!({"tunnelId": "missing"}))
        .await
        .unwrap_err();
    assert_eq!(code, "ResourceNotFoundException");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_lists_tunnels_newest_first_by_thing_with_paging() {
    let emu = control_plane().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = boto3(
            &emu,
            "open_tunnel",
            json!({"destinationConfig": {"thingName": "t1", "services": ["SSH"]}}),
        )
        .await
        .unwrap();
        ids.push(r["tunnelId"].as_str().unwrap().to_owned());
    }
    boto3(
        &emu,
        "open_tunnel",
        json!({"destinationConfig": {"thingName": "other", "services": ["SSH"]}}),
    )
    .await
    .unwrap();
    let page1 = boto3(
        &emu,
        "list_tunnels",
        json!({"thingName": "t1", "maxResults": 2}),
    )
    .await
    .unwrap();
    let token = page1["nextToken"].as_str().unwrap();
    let page2 = boto3(
        &emu,
        "list_tunnels",
        json!({"thingName": "t1", "maxResults": 2, "nextToken": token}),
    )
    .await
    .unwrap();
    let listed: Vec<&str> = page1["tunnelSummaries"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["tunnelSummaries"].as_array().unwrap())
        .map(|t| t["tunnelId"].as_str().unwrap())
        .collect();
    ids.reverse();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(page2.get("nextToken").is_none());
}

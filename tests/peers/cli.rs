//! The binary's command line: errors name the input and the fix; exit codes are stable.

use std::process::Command;

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_securetunnel-agent"));
    c.env_remove("AWSIOT_TUNNEL_ACCESS_TOKEN")
        .env_remove("AWSIOT_TUNNEL_REGION")
        .env_remove("AWSIOT_TUNNEL_ENDPOINT");
    c
}

fn run(c: &mut Command) -> (i32, String) {
    let out = c.output().expect("agent runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_prints_the_package_version() {
    let out = agent().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_missing_token_is_named_with_the_variable_to_set() {
    let (code, err) = run(agent().args(["local-proxy", "-r", "us-east-1", "-d", "22"]));
    assert_eq!(code, 2);
    assert!(err.contains("AWSIOT_TUNNEL_ACCESS_TOKEN"), "{err}");
}

#[test]
fn a_bad_mapping_names_the_service_and_the_value() {
    let (code, err) = run(agent()
        .args(["local-proxy", "-r", "us-east-1", "-d", "SSH=99999"])
        .env("AWSIOT_TUNNEL_ACCESS_TOKEN", "tok"));
    assert_eq!(code, 2);
    assert!(err.contains("SSH") && err.contains("99999"), "{err}");
}

/// Runs the agent against an emulator that knows no token: its handshake is rejected.
fn against_emulator(extra: &[&str], env_token: Option<&str>) -> (i32, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emu = rt
        .block_on(securetunnel_emulator::Emulator::start(
            securetunnel_emulator::EmulatorConfig::loopback(
                securetunnel_emulator::EmulatorTls::Plain,
            ),
        ))
        .unwrap();
    let mut c = agent();
    c.args(["local-proxy", "-e", &emu.endpoint(), "-d", "22"])
        .args(extra);
    if let Some(t) = env_token {
        c.env("AWSIOT_TUNNEL_ACCESS_TOKEN", t);
    }
    run(&mut c)
}

#[test]
fn a_rejected_token_exits_3_with_the_services_reason() {
    let (code, err) = against_emulator(&[], Some("not-a-real-token"));
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("HTTP 400") && err.contains("Invalid access token"),
        "{err}"
    );
    assert!(!err.contains("not-a-real-token"), "token echoed: {err}");
}

#[test]
fn a_token_on_argv_is_warned_about_and_never_echoed() {
    let (code, err) = against_emulator(&["-t", "argv-token-value"], None);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("process list") && err.contains("AWSIOT_TUNNEL_ACCESS_TOKEN"),
        "{err}"
    );
    assert!(!err.contains("argv-token-value"), "token echoed: {err}");
}

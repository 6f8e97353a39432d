//! `doctor` against real components: mosquitto with the dynamic-security plugin (a
//! SUBSCRIBE its roles do not allow is answered 0x80, as AWS IoT does), the emulator's data
//! plane, tinyproxy, and certificates made for each failure. Each test reads the `--json`
//! checklist field by field.

use std::path::{Path, PathBuf};

use securetunnel_emulator::Emulator;
use securetunnel_emulator::pki::{TestPki, mutual_tls_client};
use securetunnel_emulator::testkit::free_port;
use serde_json::Value;

use crate::common::http_proxy::Tinyproxy;
use crate::common::rig::{ADMIN, Files, Mosquitto};
use crate::common::{DEADLINE, emulator, spawn_logged, within};

const THING: &str = "gw-doc";
const AGENT: &str = env!("CARGO_BIN_EXE_securetunnel-agent");

/// A broker whose policy lets `THING` subscribe to the given topics only, the emulator's
/// data plane, and the files an agent configuration names.
struct Site {
    files: Files,
    mosquitto: Mosquitto,
    emu: Emulator,
    emu_ca: PathBuf,
    _dir: tempfile::TempDir,
}

/// The dynamic-security policy: `THING` may subscribe to `topics`, the admin publish
/// notifies; nothing else is allowed.
fn dynsec(topics: &[&str]) -> String {
    let acls: Vec<Value> = topics
        .iter()
        .map(|t| serde_json::json!({"acltype": "subscribePattern", "topic": t, "priority": 0, "allow": true}))
        .collect();
    serde_json::json!({
        "defaultACLAccess": {"publishClientSend": false, "publishClientReceive": true, "subscribe": false, "unsubscribe": true},
        "clients": [
            {"username": THING, "roles": [{"rolename": "gateway"}]},
            {"username": ADMIN, "roles": [{"rolename": "admin"}]},
        ],
        "groups": [],
        "roles": [
            {"rolename": "gateway", "acls": acls},
            {"rolename": "admin", "acls": [{"acltype": "publishClientSend", "topic": "$aws/things/+/tunnels/notify", "priority": 0, "allow": true}]},
        ],
    })
    .to_string()
}

fn notify(thing: &str) -> String {
    format!("$aws/things/{thing}/tunnels/notify")
}

impl Site {
    async fn start(allowed_things: &[&str], mosquitto_extra: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path());
        let topics: Vec<String> = allowed_things.iter().map(|t| notify(t)).collect();
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        let mosquitto = Mosquitto::start_dynsec(&files, &dynsec(&topics), mosquitto_extra).await;
        let emu = emulator(true).await;
        let emu_ca = Files::write(dir.path(), "emulator-ca.pem", emu.ca_pem().unwrap());
        Site {
            files,
            mosquitto,
            emu,
            emu_ca,
            _dir: dir,
        }
    }

    /// An agent configuration for `THING` (its certificate from `identity`), with lines
    /// added to `[mqtt]` and `[tunnel]` and tables after `[services]`.
    fn config(
        &self,
        identity: (PathBuf, PathBuf),
        mqtt: &str,
        tunnel: &str,
        rest: &str,
    ) -> PathBuf {
        let (cert, key) = identity;
        let d = &self.files.dir;
        let text = format!(
            "thing_name = \"{THING}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n\n[mqtt]\nendpoint = \"127.0.0.1\"\nport = {}\n\
             cert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nkeep_alive_secs = 5\n{mqtt}\n\n[tunnel]\nendpoint = \"{}\"\nca = \"{}\"\n{tunnel}\n\n\
             [services]\nSSH = 22\n\n{rest}\n",
            d.join("state").display(),
            d.join("run").display(),
            self.mosquitto.port,
            cert.display(),
            key.display(),
            self.files.ca.display(),
            self.emu.endpoint(),
            self.emu_ca.display(),
        );
        Files::write(d, "agent.toml", &text)
    }

    fn good_config(&self, rest: &str) -> PathBuf {
        self.config(self.files.thing(THING), "", "", rest)
    }
}

/// `doctor --json` with `args`: its exit code, its checklist, and everything it printed.
async fn doctor(config: &Path, args: &[&str]) -> (i32, Value, String) {
    let out = within(
        "doctor finishes",
        tokio::process::Command::new(AGENT)
            .arg("--config")
            .arg(config)
            .arg("doctor")
            .arg("--json")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let printed = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {printed}"));
    (out.status.code().unwrap_or(-1), json, printed)
}

/// The check named `name` for `target`; fails the test when there is none.
fn check<'a>(report: &'a Value, name: &str, target: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name && c["target"] == target)
        .unwrap_or_else(|| panic!("no check {name} {target} in {report:#}"))
}

fn text<'a>(c: &'a Value, field: &str) -> &'a str {
    c[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {c:#}"))
}

fn names(report: &Value) -> Vec<(String, String)> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (text(c, "name").to_owned(), text(c, "status").to_owned()))
        .collect()
}

#[tokio::test]
async fn every_check_passes_when_the_policy_allows_each_topic_and_the_data_plane_answers() {
    let site = Site::start(&[THING, "plc-1"], "").await;
    let config = site.good_config("[things.plc-1.services]\nHTTP = 80\n");
    let (code, report, printed) = doctor(&config, &[]).await;
    assert_eq!(code, 0, "{printed}");
    assert_eq!(report["ok"], true);
    let order: Vec<(&str, &str)> = vec![
        ("config", "pass"),
        ("key", "pass"),
        ("certificate", "pass"),
        ("dns", "pass"),
        ("tcp", "pass"),
        ("tls", "pass"),
        ("mqtt-connect", "pass"),
        ("mqtt-subscribe", "pass"),
        ("mqtt-subscribe", "pass"),
        ("dns", "pass"),
        ("data-plane", "pass"),
        ("clock", "pass"),
    ];
    let got = names(&report);
    let got: Vec<(&str, &str)> = got.iter().map(|(n, s)| (n.as_str(), s.as_str())).collect();
    assert_eq!(got, order, "{printed}");
    let cfg = check(&report, "config", &config.display().to_string());
    assert_eq!(
        text(cfg, "saw"),
        format!("thing {THING}, MQTT 127.0.0.1:{}", site.mosquitto.port)
    );
    assert!(cfg.get("fix").is_none(), "no fix on a pass: {cfg:#}");
    assert_eq!(
        text(check(&report, "dns", "127.0.0.1"), "saw"),
        "resolves to 127.0.0.1"
    );
    let broker = format!("127.0.0.1:{}", site.mosquitto.port);
    assert!(text(check(&report, "tcp", &broker), "saw").starts_with("connected to 127.0.0.1:"));
    let tls = text(check(&report, "tls", &broker), "saw");
    assert!(
        tls.contains("the server's certificate verified for 127.0.0.1"),
        "{tls}"
    );
    let connect = text(check(&report, "mqtt-connect", THING), "saw");
    assert!(connect.starts_with("CONNACK accepted"), "{connect}");
    for thing in [THING, "plc-1"] {
        let saw = text(check(&report, "mqtt-subscribe", thing), "saw");
        assert_eq!(saw, format!("{} granted (AtLeastOnce)", notify(thing)));
    }
    let dp = check(
        &report,
        "data-plane",
        &format!("- wss://{}", site.emu.endpoint()),
    );
    let saw = text(dp, "saw");
    assert!(
        saw.starts_with("HTTP 401 \"Missing access token\""),
        "{saw}"
    );
    // Nothing left behind: the subscriptions undone, a clean DISCONNECT, no state made.
    let log = &site.mosquitto.log;
    let said = |what: String| async move {
        let seen = tokio::time::timeout(DEADLINE, log.wait(0, |l| l.contains(&what))).await;
        assert!(
            matches!(seen, Ok(Some(_))),
            "mosquitto never logged {what:?}:\n{}",
            log.text()
        );
    };
    // The service's Date against the local clock (the emulator's is this machine's).
    let clock = text(check(&report, "clock", "service Date"), "saw");
    assert!(clock.starts_with("the local clock reads 20"), "{clock}");
    said(format!("Received UNSUBSCRIBE from {THING}")).await;
    said(format!("Received DISCONNECT from {THING}")).await;
    assert!(!site.files.dir.join("state").exists());
}

#[tokio::test]
async fn a_refused_notify_filter_prints_the_policy_statement_to_add() {
    let site = Site::start(&[THING], "").await;
    let config = site.good_config("[things.plc-9.services]\nHTTP = 80\n");
    let (code, report, printed) = doctor(&config, &[]).await;
    assert_eq!(code, 1, "{printed}");
    assert_eq!(report["ok"], false);
    assert_eq!(
        text(check(&report, "mqtt-subscribe", THING), "status"),
        "pass"
    );
    let refused = check(&report, "mqtt-subscribe", "plc-9");
    assert_eq!(text(refused, "status"), "fail");
    let saw = text(refused, "saw");
    assert_eq!(
        saw,
        format!("the broker refused SUBSCRIBE {} (0x80)", notify("plc-9"))
    );
    let fix = text(refused, "fix");
    assert!(
        fix.starts_with("add to the certificate's IoT policy: "),
        "{fix}"
    );
    assert!(
        fix.contains(r#""Action":"iot:Subscribe","Resource":"arn:aws:iot:REGION:ACCOUNT:topicfilter/$aws/things/plc-9/tunnels/notify""#),
        "{fix}"
    );
    assert!(fix.contains(r#""Action":"iot:Receive""#), "{fix}");
}

#[tokio::test]
async fn a_refused_client_id_prints_the_connect_statement() {
    // mosquitto refuses ids outside its prefix with CONNACK 5, as a policy without
    // iot:Connect on the id refuses it.
    let site = Site::start(&[THING], &format!("clientid_prefixes {THING}")).await;
    let config = site.config(site.files.thing(THING), "client_id = \"intruder\"", "", "");
    let (code, report, printed) = doctor(&config, &[]).await;
    assert_eq!(code, 1, "{printed}");
    let refused = check(&report, "mqtt-connect", "intruder");
    assert_eq!(text(refused, "status"), "fail");
    assert_eq!(
        text(refused, "saw"),
        "the broker refused client id \"intruder\": not authorized"
    );
    assert_eq!(
        text(refused, "fix"),
        r#"add to the certificate's IoT policy: {"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:REGION:ACCOUNT:client/intruder"}"#
    );
    assert!(
        !names(&report).iter().any(|(n, _)| n == "mqtt-subscribe"),
        "{printed}"
    );
    // An id the prefix allows passes, on the same broker.
    let (code, _, printed) = doctor(&config, &["--client-id", "gw-doc-doctor"]).await;
    assert_eq!(code, 0, "{printed}");
}

#[tokio::test]
async fn a_server_ca_the_agent_does_not_trust_names_mqtt_ca() {
    let site = Site::start(&[THING], "").await;
    let other = Files::write(
        &site.files.dir,
        "other-ca.crt",
        &TestPki::new("other CA").unwrap().ca_pem(),
    );
    let config = site.config(
        site.files.thing(THING),
        &format!("ca = \"{}\"", other.display()),
        "",
        "",
    );
    // `ca` twice in [mqtt] is a TOML error: replace the first instead.
    let text_cfg = std::fs::read_to_string(&config).unwrap();
    let first = format!("ca = \"{}\"\n", site.files.ca.display());
    std::fs::write(&config, text_cfg.replacen(&first, "", 1)).unwrap();
    let (code, report, printed) = doctor(&config, &[]).await;
    assert_eq!(code, 1, "{printed}");
    let tls = check(
        &report,
        "tls",
        &format!("127.0.0.1:{}", site.mosquitto.port),
    );
    assert_eq!(text(tls, "status"), "fail");
    assert_eq!(
        text(tls, "saw"),
        "127.0.0.1's certificate is not signed by a CA the agent trusts"
    );
    let fix = text(tls, "fix");
    assert!(
        fix.starts_with(&format!(
            "mqtt.ca ({}) does not hold the CA",
            other.display()
        )),
        "{fix}"
    );
    assert_eq!(
        text(check(&report, "mqtt-connect", THING), "status"),
        "skip"
    );
}

#[tokio::test]
async fn an_expired_device_certificate_is_named_with_its_date() {
    let site = Site::start(&[THING], "").await;
    let config = site.config(site.files.expired_thing(THING), "", "", "");
    let (code, report, printed) = doctor(&config, &[]).await;
    assert_eq!(code, 1, "{printed}");
    let cert = check(
        &report,
        "certificate",
        &site
            .files
            .dir
            .join(format!("{THING}.crt"))
            .display()
            .to_string(),
    );
    assert_eq!(text(cert, "status"), "fail");
    let saw = text(cert, "saw");
    assert!(
        saw.starts_with("expired on 2022-01-01 00:00:00 UTC; the local clock reads 20"),
        "{saw}"
    );
    assert!(text(cert, "fix").starts_with("renew the certificate in mqtt.cert"));
    // The broker refuses it too, and says so with a TLS alert.
    let refused = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["status"] == "fail" && c["name"] != "certificate" && c["name"] != "data-plane")
        .unwrap_or_else(|| panic!("the broker's refusal is not reported: {printed}"));
    let saw = text(refused, "saw");
    assert_eq!(
        saw,
        "the server refused the device certificate: it has expired"
    );
}

#[tokio::test]
async fn a_proxy_that_refuses_the_credentials_names_proxy_url_and_never_prints_the_password() {
    let site = Site::start(&[THING], "").await;
    let tp = Tinyproxy::start("BasicAuth op right-pw").await;
    let rest = format!("[proxy]\nurl = \"{}\"\n", tp.url("op:wrong-pw@"));
    let config = site.good_config(&rest);
    let (code, report, printed) = doctor(&config, &[]).await;
    assert_eq!(code, 1, "{printed}");
    assert!(
        !printed.contains("wrong-pw"),
        "the password was printed: {printed}"
    );
    let broker = format!("127.0.0.1:{}", site.mosquitto.port);
    let tcp = check(&report, "tcp", &broker);
    assert_eq!(text(tcp, "status"), "fail");
    assert!(text(tcp, "saw").contains("refused CONNECT"), "{tcp:#}");
    assert_eq!(
        text(tcp, "fix"),
        "the proxy refused the user and password in proxy.url: correct them"
    );
    let dp = report["checks"].as_array().unwrap().last().unwrap();
    assert_eq!(text(dp, "name"), "data-plane");
    assert_eq!(
        text(dp, "fix"),
        "the proxy refused the user and password in proxy.url: correct them"
    );
}

#[tokio::test]
async fn an_unreachable_data_plane_names_the_port_to_open() {
    let site = Site::start(&[THING], "").await;
    let port = free_port().unwrap();
    let config = site.good_config("");
    let text_cfg = std::fs::read_to_string(&config).unwrap();
    let text_cfg = text_cfg.replace(&site.emu.endpoint(), &format!("127.0.0.1:{port}"));
    std::fs::write(&config, text_cfg).unwrap();
    let (code, report, printed) = doctor(&config, &[]).await;
    assert_eq!(code, 1, "{printed}");
    let dp = check(&report, "data-plane", &format!("- wss://127.0.0.1:{port}"));
    assert_eq!(text(dp, "status"), "fail");
    assert_eq!(
        text(dp, "saw"),
        format!("connection refused: nothing listens on port {port}")
    );
    assert!(text(dp, "fix").starts_with(&format!("allow outbound TCP {port} to 127.0.0.1")));
    // The MQTT side is unaffected.
    assert_eq!(
        text(check(&report, "mqtt-connect", THING), "status"),
        "pass"
    );
}

#[tokio::test]
async fn while_the_agent_runs_doctor_asks_it_instead_of_disconnecting_it() {
    let site = Site::start(&[THING], "").await;
    let config = site.good_config("");
    let mut cmd = tokio::process::Command::new(AGENT);
    cmd.arg("--config").arg(&config).arg("run");
    let (_agent, log) = spawn_logged(&mut cmd, "agent");
    let subscribed = tokio::time::timeout(
        DEADLINE,
        log.wait(0, |l| l.contains("subscribed to tunnel notifications")),
    )
    .await;
    assert!(matches!(subscribed, Ok(Some(_))), "{}", log.text());
    let connected = |l: &str| l.contains(&format!(" as {THING} ("));
    assert_eq!(site.mosquitto.log.count(connected), 1);
    let (code, report, printed) = doctor(&config, &[]).await;
    assert_eq!(code, 0, "{printed}");
    let saw = text(check(&report, "mqtt-connect", THING), "saw");
    assert!(
        saw.starts_with("the running agent is subscribed since"),
        "{saw}"
    );
    let saw = text(check(&report, "mqtt-subscribe", THING), "saw");
    assert_eq!(saw, format!("the running agent follows {}", notify(THING)));
    // The agent's own id given explicitly is still the agent's: asked, not used.
    let (code, report, printed) = doctor(&config, &["--client-id", THING]).await;
    assert_eq!(code, 0, "{printed}");
    let saw = text(check(&report, "mqtt-connect", THING), "saw");
    assert!(
        saw.starts_with("the running agent is subscribed since"),
        "{saw}"
    );
    // With another id, doctor connects beside the agent.
    let (code, report, printed) = doctor(&config, &["--client-id", "gw-doc-2"]).await;
    assert_eq!(code, 0, "{printed}");
    let saw = text(check(&report, "mqtt-connect", "gw-doc-2"), "saw");
    assert!(saw.starts_with("CONNACK accepted"), "{saw}");
    // Once the broker has logged the last doctor's goodbye, it has logged every connection
    // before it: still the agent's one, and the agent never lost it.
    let log_m = &site.mosquitto.log;
    let bye = tokio::time::timeout(
        DEADLINE,
        log_m.wait(0, |l| l.contains("Received DISCONNECT from gw-doc-2")),
    )
    .await;
    assert!(matches!(bye, Ok(Some(_))), "{}", log_m.text());
    assert_eq!(log_m.count(connected), 1, "{}", log_m.text());
    assert_eq!(
        log.count(|l| l.contains("MQTT connection")),
        0,
        "{}",
        log.text()
    );
}

/// Publishes `payload` to `THING`'s notify topic as the admin, QoS 1, until the broker
/// acknowledges it.
async fn publish_notify(site: &Site, payload: &str) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
    let mut opts = MqttOptions::new(ADMIN, "127.0.0.1", site.mosquitto.port);
    let tls = mutual_tls_client(&site.files.ca_pem, &site.files.admin).unwrap();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut events) = AsyncClient::new(opts, 10);
    client
        .publish(
            notify(THING),
            QoS::AtLeastOnce,
            false,
            payload.as_bytes().to_vec(),
        )
        .await
        .unwrap();
    within("the broker acknowledges the notify", async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.unwrap() {
                break;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_notify_queued_for_the_stopped_agent_is_neither_shown_nor_taken() {
    let site = Site::start(&[THING], "").await;
    let config = site.good_config("");
    let run = |config: &Path| {
        let mut cmd = tokio::process::Command::new(AGENT);
        cmd.arg("--config").arg(config).arg("run");
        spawn_logged(&mut cmd, "agent")
    };
    let subscribed = |l: &str| l.contains("subscribed to tunnel notifications");
    // The agent's persistent session follows its topic; then the agent stops.
    let (mut agent, log) = run(&config);
    assert!(
        matches!(
            tokio::time::timeout(DEADLINE, log.wait(0, subscribed)).await,
            Ok(Some(_))
        ),
        "{}",
        log.text()
    );
    // SAFETY: kill(2) with a live child's pid and a valid signal number.
    assert_eq!(
        unsafe { libc::kill(agent.id().unwrap() as i32, libc::SIGTERM) },
        0
    );
    within("the agent stops", agent.wait()).await.unwrap();
    // OpenTunnel while it is down: the broker queues the notify in its session.
    let token = "AQGAdoctor-queued-token-1";
    let payload = format!(
        r#"{{"clientAccessToken":"{token}","clientMode":"destination","region":"us-east-1","services":["SSH"]}}"#
    );
    publish_notify(&site, &payload).await;
    let (code, report, printed) = doctor(&config, &[]).await;
    assert_eq!(code, 0, "{printed}");
    let saw = text(check(&report, "mqtt-connect", THING), "saw");
    assert_eq!(saw, "CONNACK accepted (session present: yes)");
    assert!(
        !printed.contains(token),
        "the queued notify's token was printed: {printed}"
    );
    // The agent, started again, still gets it: doctor neither acknowledged nor unsubscribed.
    let (_agent, log) = run(&config);
    let started =
        tokio::time::timeout(DEADLINE, log.wait(0, |l| l.contains("session started"))).await;
    assert!(
        matches!(started, Ok(Some(_))),
        "the queued notify was lost:\n{}",
        log.text()
    );
}

#[tokio::test]
async fn a_configuration_error_or_a_bad_region_exits_2() {
    let site = Site::start(&[THING], "").await;
    let missing = site.files.dir.join("missing.toml");
    let (code, report, printed) = doctor(&missing, &[]).await;
    assert_eq!(code, 2, "{printed}");
    let c = check(&report, "config", &missing.display().to_string());
    assert!(
        text(c, "saw").starts_with("cannot read the configuration"),
        "{c:#}"
    );
    let config = site.good_config("");
    let (code, report, printed) = doctor(&config, &["--region", "mars"]).await;
    assert_eq!(code, 2, "{printed}");
    let c = check(&report, "config", &config.display().to_string());
    assert_eq!(text(c, "saw"), "--region \"mars\" is not a region name");
}

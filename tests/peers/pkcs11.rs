//! Device keys in a token (issue: keys that never leave the hardware): SoftHSM2 tokens whose
//! EC P-256 and RSA 2048 keys were generated inside them, certificates from the rig's CA;
//! the agent connects to mosquitto with mutual TLS through each key, takes a notify and
//! serves a tunnel through the emulator. A wrong PIN, a missing object, a missing module and
//! a key that is not the certificate's are each named, a PIN file the service's user cannot
//! read is warned about, and the PIN is in no output.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::e2e::*;
use crate::common::rig::{Rig, RigOptions};
use crate::common::softhsm::{KeyType, MODULE, SoftHsm};
use securetunnel_emulator::testkit::echo_tcp;

/// `check-config` on `cfg` with the token's SOFTHSM2_CONF: (success, stdout and stderr).
fn check_config(cfg: &Path, hsm: &SoftHsm) -> (bool, String) {
    let (ok, stdout, stderr) = agent_command(&["check-config"], cfg, hsm);
    (ok, stdout + &stderr)
}

/// The agent's `command` on `cfg` with the token's SOFTHSM2_CONF: (success, stdout, stderr).
fn agent_command(command: &[&str], cfg: &Path, hsm: &SoftHsm) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_securetunnel-agent"))
        .args(command)
        .arg("--config")
        .arg(cfg)
        .env("SOFTHSM2_CONF", &hsm.conf)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// A token "gw" with one key of `kind` (label "device", id 01) generated inside it, the
/// rig's config for `thing` with `[mqtt]`'s key lines replaced (the key is `uri`, the module
/// and PIN file are settings; `mqtt.cert` only if `cert_file`), and a certificate for
/// `thing` over the token's key, issued by the rig's CA, as `<thing>.crt`.
fn token_setup(
    rig: &Rig,
    thing: &str,
    kind: KeyType,
    services: &str,
    uri: &str,
    cert_file: bool,
) -> (SoftHsm, PathBuf, PathBuf) {
    let hsm = SoftHsm::new("gw");
    let public = hsm.keypair(kind, "device", "01");
    let cfg = rig.agent_config(thing, services, "");
    // After agent_config, which writes a file identity for the thing: this replaces it.
    let cert = rig.files.thing_for_key(thing, &public);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let dir = &rig.files.dir;
    let old = format!(
        "cert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        dir.join(format!("{thing}.key")).display()
    );
    let mut new = format!(
        "key = \"{uri}\"\npkcs11_module = \"{MODULE}\"\npkcs11_pin_file = \"{}\"\n",
        hsm.pin_file.display()
    );
    if cert_file {
        new.push_str(&format!("cert = \"{}\"\n", cert.display()));
    }
    assert!(text.contains(&old), "{text}");
    std::fs::write(&cfg, text.replace(&old, &new)).unwrap();
    (hsm, cfg, cert)
}

/// The agent with `cfg` and the token, at trace level: subscribed, then a tunnel opened to
/// `thing` carries 1 MiB both ways; its log never holds the PIN.
async fn serves_a_tunnel(rig: &Rig, thing: &str, cfg: &Path, hsm: &SoftHsm) {
    let env = [("SOFTHSM2_CONF", hsm.conf.to_str().unwrap())];
    let mut agent = rig.spawn_agent_with_env_and_args(cfg, &env, &["-v", "6"]);
    agent.expect("subscribed to tunnel notifications").await;
    let (t, _) = open_connected(rig, thing, &["SSH"]).await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 7).await;
    assert!(
        !agent.log.text().contains(hsm.pin()),
        "the PIN is in the agent's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ec_key_generated_in_the_token_with_its_certificate_there_serves_a_tunnel() {
    let rig = Rig::start(RigOptions::default()).await;
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let services = format!("SSH = \"{}\"", echo.addr.unwrap());
    // No mqtt.cert: the certificate object with the key's id is presented.
    let uri = "pkcs11:token=gw;object=device;type=private";
    let (hsm, cfg, cert) = token_setup(&rig, "gw-ec", KeyType::EcP256, &services, uri, false);
    hsm.store_cert(&cert, "device", "01");
    let (ok, out) = check_config(&cfg, &hsm);
    assert!(ok, "{out}");
    assert!(
        out.contains("EC P-256 key in token \"gw\", matches the certificate"),
        "{out}"
    );
    assert!(
        out.contains("certificate      the token's certificate object"),
        "{out}"
    );
    assert!(!out.contains(hsm.pin()), "{out}");
    // doctor shows the key and signs its own MQTT handshake with it.
    let (_, out, stderr) = agent_command(&["doctor", "--json"], &cfg, &hsm);
    assert!(!stderr.contains(hsm.pin()), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&out).expect(&out);
    let check = |name: &str| {
        let checks = report["checks"].as_array().unwrap();
        checks
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .expect(name)
    };
    assert_eq!(check("key")["status"], "pass", "{out}");
    assert!(
        check("key")["saw"]
            .as_str()
            .unwrap()
            .contains("EC P-256 key in token"),
        "{out}"
    );
    assert_eq!(
        check("certificate")["target"],
        "the token's certificate object",
        "{out}"
    );
    assert_eq!(check("mqtt-connect")["status"], "pass", "{out}");
    assert!(!out.contains(hsm.pin()), "{out}");
    serves_a_tunnel(&rig, "gw-ec", &cfg, &hsm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rsa_2048_key_generated_in_the_token_with_a_certificate_file_serves_a_tunnel() {
    let rig = Rig::start(RigOptions::default()).await;
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let services = format!("SSH = \"{}\"", echo.addr.unwrap());
    let uri = "pkcs11:token=gw;id=%01";
    let (hsm, cfg, _) = token_setup(&rig, "gw-rsa", KeyType::Rsa2048, &services, uri, true);
    // The PIN file named in the URI instead of the setting.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let setting = format!("pkcs11_pin_file = \"{}\"\n", hsm.pin_file.display());
    let in_uri = format!("id=%01?pin-source=file:{}", hsm.pin_file.display());
    let text = text.replace(&setting, "").replace("id=%01", &in_uri);
    std::fs::write(&cfg, text).unwrap();
    let (ok, out) = check_config(&cfg, &hsm);
    assert!(ok, "{out}");
    assert!(out.contains("RSA 2048 key in token \"gw\""), "{out}");
    serves_a_tunnel(&rig, "gw-rsa", &cfg, &hsm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_a_missing_object_a_missing_module_and_a_foreign_key_are_named() {
    let rig = Rig::start(RigOptions::default()).await;
    let uri = "pkcs11:token=gw;object=device";
    let (hsm, cfg, cert) = token_setup(&rig, "gw-bad", KeyType::EcP256, "SSH = 22", uri, true);
    let (ok, out) = check_config(&cfg, &hsm);
    assert!(ok, "{out}");
    // Checked as root for a service user who cannot read the PIN file: a warning says so.
    let (ok, out, _) = agent_command(&["check-config", "--user", "nobody"], &cfg, &hsm);
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: mqtt.pkcs11_pin_file: nobody cannot"),
        "{out}"
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    let run = |from: &str, to: &str| {
        std::fs::write(&cfg, text.replace(from, to)).unwrap();
        let (ok, out) = check_config(&cfg, &hsm);
        assert!(!ok, "{out}");
        assert!(!out.contains(hsm.pin()), "{out}");
        out
    };

    let wrong = hsm.dir_file("wrong.pin", "00000000\n");
    let out = run(
        &hsm.pin_file.display().to_string(),
        &wrong.display().to_string(),
    );
    assert!(
        out.contains("mqtt.pkcs11_pin_file: token \"gw\" refused the PIN in"),
        "{out}"
    );
    assert!(out.contains("PinIncorrect"), "{out}");

    let out = run("object=device", "object=devise");
    assert!(
        out.contains(
            "has no private key labelled \"devise\"; private keys present: \"device\" (id=%01)"
        ),
        "{out}"
    );

    let out = run("token=gw;", "token=gateway;");
    assert!(
        out.contains("no token matches the URI; tokens present: \"gw\""),
        "{out}"
    );

    let out = run(MODULE, "/usr/lib/nowhere/libtoken.so");
    assert!(
        out.contains("mqtt.pkcs11_module: /usr/lib/nowhere/libtoken.so does not exist"),
        "{out}"
    );
    let out = run(MODULE, "/etc/hostname");
    assert!(
        out.contains("cannot be loaded as a PKCS#11 module"),
        "{out}"
    );

    // Another thing's certificate: the token's signature does not verify with its key.
    let (other, _) = rig.files.thing("gw-other");
    let out = run(&cert.display().to_string(), &other.display().to_string());
    assert!(out.contains("does not belong to the certificate"), "{out}");
}

//! The end-to-end rig: mosquitto with mutual TLS and per-thing ACLs, the emulator with its
//! control plane publishing notifies to it, the agent as its own process with a config file,
//! and boto3 / aws-cli from the project's venv. Everything on free loopback ports.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use securetunnel_emulator::pki::{Issued, TestPki, mutual_tls_client};
use securetunnel_emulator::publisher::{AWS_NOTIFY_TOPIC, PublisherConfig};
use securetunnel_emulator::testkit::{self, LogTail, free_port};
use securetunnel_emulator::{Emulator, EmulatorConfig, EmulatorTls};
use serde_json::Value;
use tokio::process::{Child, Command};

use super::{DEADLINE, init_logs, require_system_peers, within};

/// Waits for a line or fails the test with the log so far.
async fn wait_line(
    log: &LogTail,
    from: usize,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> (usize, String) {
    match tokio::time::timeout(DEADLINE, log.wait(from, pred)).await {
        Ok(Some(hit)) => hit,
        _ => panic!("no log line {what:?}; log so far:\n{}", log.text()),
    }
}

pub const ADMIN: &str = "tunnel-admin";

pub struct Files {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub ca_pem: String,
    pub server: Issued,
    pub admin: Issued,
    pki: TestPki,
}

impl Files {
    pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A fresh CA with a server certificate for loopback and the admin's identity, written
    /// under `dir`.
    pub fn new(dir: &Path) -> Files {
        let pki = TestPki::new("rig CA").unwrap();
        let ca_pem = pki.ca_pem();
        Files {
            dir: dir.to_owned(),
            ca: Files::write(dir, "ca.crt", &ca_pem),
            server: pki.server(&[]).unwrap(),
            admin: pki.client(ADMIN).unwrap(),
            ca_pem,
            pki,
        }
    }

    /// Certificate and key of a thing, written as `<thing>.crt` / `<thing>.key` (0600).
    pub fn thing(&self, thing: &str) -> (PathBuf, PathBuf) {
        self.identity(thing, &self.pki.client(thing).unwrap())
    }

    /// A thing's certificate that expired in 2021, written like `thing`.
    pub fn expired_thing(&self, thing: &str) -> (PathBuf, PathBuf) {
        self.identity(thing, &self.pki.expired_client(thing).unwrap())
    }

    /// A certificate for `thing` over a token's public key (SubjectPublicKeyInfo, DER),
    /// written as `<thing>.crt`.
    pub fn thing_for_key(&self, thing: &str, spki: &super::softhsm::PublicKey) -> PathBuf {
        let pem = self.pki.client_for_key(thing, spki).unwrap();
        Self::write(&self.dir, &format!("{thing}.crt"), &pem)
    }

    fn identity(&self, thing: &str, id: &Issued) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let cert = Self::write(&self.dir, &format!("{thing}.crt"), &id.cert_pem);
        let key = Self::write(&self.dir, &format!("{thing}.key"), &id.key_pem);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert, key)
    }
}

pub struct Mosquitto {
    pub port: u16,
    conf: PathBuf,
    child: Option<Child>,
    pub log: LogTail,
}

impl Mosquitto {
    pub async fn start(files: &Files, extra_acl: &str) -> Mosquitto {
        let acl = Files::write(
            &files.dir,
            "acl",
            &format!(
                "pattern read $aws/things/%u/tunnels/notify\nuser {ADMIN}\ntopic write $aws/things/+/tunnels/notify\n{extra_acl}\n"
            ),
        );
        Self::start_with(files, &format!("acl_file {}\n", acl.display())).await
    }

    /// With the dynamic-security plugin as the policy (`dynsec` is its JSON file's text):
    /// like AWS IoT, it answers a SUBSCRIBE its roles do not allow with 0x80. `extra`: more
    /// configuration lines.
    pub async fn start_dynsec(files: &Files, dynsec: &str, extra: &str) -> Mosquitto {
        let json = Files::write(&files.dir, "dynsec.json", dynsec);
        let plugin = super::system::mosquitto_dynsec_plugin();
        let policy = format!(
            "plugin {}\nplugin_opt_config_file {}\n{extra}\n",
            plugin.display(),
            json.display()
        );
        Self::start_with(files, &policy).await
    }

    async fn start_with(files: &Files, policy: &str) -> Mosquitto {
        require_system_peers();
        let server_crt = Files::write(&files.dir, "server.crt", &files.server.cert_pem);
        let server_key = Files::write(&files.dir, "server.key", &files.server.key_pem);
        // A free port can be taken between the probe and mosquitto's bind: retry then.
        for _ in 0..5 {
            let port = free_port().unwrap();
            let conf = Files::write(
                &files.dir,
                "mosquitto.conf",
                &format!(
                    "per_listener_settings false\npersistence false\nlog_dest stderr\nlog_type all\nuser root\n\
                     listener {port} 127.0.0.1\nprotocol mqtt\ncafile {}\ncertfile {}\nkeyfile {}\n\
                     require_certificate true\nuse_identity_as_username true\ntls_version tlsv1.2\n\
                     allow_anonymous false\n{policy}",
                    files.ca.display(),
                    server_crt.display(),
                    server_key.display(),
                ),
            );
            let mut m = Mosquitto {
                port,
                conf,
                child: None,
                log: LogTail::follow(tokio::io::empty(), "mosquitto"),
            };
            if m.spawn().await {
                return m;
            }
        }
        panic!("mosquitto did not start on any free port");
    }

    async fn spawn(&mut self) -> bool {
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto is installed (./test.sh installs it: apt-get install mosquitto)");
        self.log = LogTail::follow(child.stderr.take().unwrap(), "mosquitto");
        let (_, line) = wait_line(&self.log, 0, "mosquitto running or failing", |l| {
            l.contains(" running") || l.contains("Error")
        })
        .await;
        self.child = Some(child);
        !line.contains("Error")
    }

    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Same port, fresh broker: no session survives (persistence is off).
    pub async fn restart(&mut self) {
        self.stop().await;
        assert!(
            self.spawn().await,
            "mosquitto restarts on port {}",
            self.port
        );
    }
}

pub struct Rig {
    pub files: Files,
    pub mosquitto: Mosquitto,
    pub emu: Emulator,
    pub emu_ca: PathBuf,
    _dir: tempfile::TempDir,
}

/// Keys added to an agent config's sections.
#[derive(Default)]
pub struct ConfigExtra<'a> {
    /// Top-level keys, before any table.
    pub top: &'a str,
    /// The `[services]` body.
    pub services: &'a str,
    /// Lines added to `[mqtt]`.
    pub mqtt: &'a str,
    /// Lines added to `[tunnel]`.
    pub tunnel: &'a str,
    /// Anything after `[services]` (whole tables such as `[limits]`).
    pub rest: &'a str,
    /// Connect MQTT to this port instead of mosquitto's (a relay in front of it).
    pub mqtt_port: Option<u16>,
    /// No `tunnel.endpoint`: the endpoint comes from the notify's region, and
    /// `[tunnel] resolve` must point it at the emulator.
    pub region_endpoint: bool,
}

pub struct RigOptions {
    /// One "minute" of tunnel lifetime.
    pub minute: Duration,
    /// The emulator's region: in notifies, ARNs and its certificate's data-plane name.
    pub region: &'static str,
    /// More mosquitto ACL lines (a gateway allowed other things' notify topics).
    pub extra_acl: &'static str,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            minute: Duration::from_secs(60),
            region: "us-east-1",
            extra_acl: "",
        }
    }
}

impl Rig {
    pub async fn start(opts: RigOptions) -> Rig {
        require_system_peers();
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path());
        let mosquitto = Mosquitto::start(&files, opts.extra_acl).await;
        let mut cfg = EmulatorConfig::loopback(EmulatorTls::Generate);
        cfg.control_plane = true;
        cfg.minute = opts.minute;
        cfg.region = opts.region.into();
        cfg.publisher = Some(PublisherConfig {
            host: "127.0.0.1".into(),
            port: mosquitto.port,
            client_id: format!("{ADMIN}-{}", uuid::Uuid::new_v4().simple()),
            tls: mutual_tls_client(&files.ca_pem, &files.admin).unwrap(),
            topic: AWS_NOTIFY_TOPIC.into(),
        });
        let emu = Emulator::start(cfg).await.unwrap();
        let emu_ca = Files::write(dir.path(), "emulator-ca.pem", emu.ca_pem().unwrap());
        within("emulator publisher connects", emu.wait_publisher()).await;
        Rig {
            files,
            mosquitto,
            emu,
            emu_ca,
            _dir: dir,
        }
    }

    /// Writes an agent config for `thing` with the given `[services]` body and extra TOML.
    pub fn agent_config(&self, thing: &str, services: &str, extra: &str) -> PathBuf {
        self.agent_config_with(
            thing,
            &ConfigExtra {
                services,
                rest: extra,
                ..ConfigExtra::default()
            },
        )
    }

    /// The same with keys added to `[mqtt]` and `[tunnel]`, and another MQTT port (a relay).
    pub fn agent_config_with(&self, thing: &str, x: &ConfigExtra<'_>) -> PathBuf {
        let (cert, key) = self.files.thing(thing);
        let state = self.files.dir.join(format!("state-{thing}"));
        let endpoint = if x.region_endpoint {
            String::new()
        } else {
            format!("endpoint = \"{}\"", self.emu.endpoint())
        };
        let text = format!(
            "thing_name = \"{thing}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n{}\n\n[mqtt]\nendpoint = \"127.0.0.1\"\nport = {}\n\
             cert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nkeep_alive_secs = 5\n{}\n\n[tunnel]\n{}\n\
             ca = \"{}\"\n{}\n\n[services]\n{}\n\n{}\n",
            state.display(),
            self.files.dir.join(format!("run-{thing}")).display(),
            x.top,
            x.mqtt_port.unwrap_or(self.mosquitto.port),
            cert.display(),
            key.display(),
            self.files.ca.display(),
            x.mqtt,
            endpoint,
            self.emu_ca.display(),
            x.tunnel,
            x.services,
            x.rest,
        );
        Files::write(&self.files.dir, &format!("{thing}.toml"), &text)
    }

    pub fn spawn_agent(&self, config: &Path) -> AgentProc {
        self.spawn_agent_with_env(config, &[])
    }

    pub fn spawn_agent_with_env(&self, config: &Path, env: &[(&str, &str)]) -> AgentProc {
        self.spawn_agent_program(
            Path::new(env!("CARGO_BIN_EXE_securetunnel-agent")),
            config,
            env,
        )
    }

    /// The agent with other global arguments (`-v 6`).
    pub fn spawn_agent_with_args(&self, config: &Path, args: &[&str]) -> AgentProc {
        self.spawn(
            Path::new(env!("CARGO_BIN_EXE_securetunnel-agent")),
            config,
            &[],
            args,
        )
    }

    /// The agent with both an environment and global arguments.
    pub fn spawn_agent_with_env_and_args(
        &self,
        config: &Path,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> AgentProc {
        let program = Path::new(env!("CARGO_BIN_EXE_securetunnel-agent"));
        self.spawn(program, config, env, args)
    }

    /// The agent from `program` (a copy, for upgrade tests).
    pub fn spawn_agent_program(
        &self,
        program: &Path,
        config: &Path,
        env: &[(&str, &str)],
    ) -> AgentProc {
        self.spawn(program, config, env, &["-v", "5"])
    }

    fn spawn(
        &self,
        program: &Path,
        config: &Path,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> AgentProc {
        let (child, log) = super::spawn_logged(
            Command::new(program)
                .arg("run")
                .args(args)
                .arg("--config")
                .arg(config)
                .envs(env.iter().copied()),
            "agent",
        );
        let state_dir = config.with_file_name(format!(
            "state-{}",
            config.file_stem().unwrap().to_string_lossy()
        ));
        AgentProc {
            child,
            log,
            cursor: 0,
            state_dir,
        }
    }

    /// One control-plane call through boto3; `Err((code, message))` for a service error.
    pub async fn api(&self, op: &str, params: Value) -> Result<Value, (String, String)> {
        boto3(&self.emu, op, params).await
    }
}

/// Messages the broker delivers to the admin's subscription, with when they arrived.
pub struct Subscriber {
    pub client: rumqttc::AsyncClient,
    rx: tokio::sync::mpsc::UnboundedReceiver<(tokio::time::Instant, String, String)>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl Subscriber {
    /// The admin subscribed to `filter` (QoS 1), once the broker granted it.
    pub async fn start(rig: &Rig, filter: &str) -> Subscriber {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
        let id = format!("{ADMIN}-sub-{}", uuid::Uuid::new_v4().simple());
        let mut opts = MqttOptions::new(id, "127.0.0.1", rig.mosquitto.port);
        let tls = mutual_tls_client(&rig.files.ca_pem, &rig.files.admin).unwrap();
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, mut events) = AsyncClient::new(opts, 10);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (granted_tx, granted) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut granted_tx = Some(granted_tx);
            while let Ok(event) = events.poll().await {
                match event {
                    Event::Incoming(Packet::SubAck(_)) => {
                        granted_tx.take().map(|g| g.send(()));
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        let text = String::from_utf8_lossy(&p.payload).into_owned();
                        let _ = tx.send((tokio::time::Instant::now(), p.topic.clone(), text));
                    }
                    _ => {}
                }
            }
        });
        within("the broker grants the subscription", granted)
            .await
            .unwrap();
        Subscriber {
            client,
            rx,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// The next message: (arrival, topic, payload).
    pub async fn next(&mut self) -> (tokio::time::Instant, String, String) {
        within("the next message on the subscription", self.rx.recv())
            .await
            .expect("the subscriber's connection ended")
    }
}

/// One iotsecuretunneling call through boto3 against the emulator's control plane;
/// `Err((code, message))` for a service error.
pub async fn boto3(emu: &Emulator, op: &str, params: Value) -> Result<Value, (String, String)> {
    require_system_peers();
    let endpoint = emu
        .control_endpoint()
        .expect("the emulator serves a control plane");
    testkit::boto3(&endpoint, op, params)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub struct AgentProc {
    pub child: Child,
    pub log: LogTail,
    cursor: usize,
    state_dir: PathBuf,
}

impl AgentProc {
    /// Waits for the next line (after the last one waited for) containing `text`.
    pub async fn expect(&mut self, text: &str) -> String {
        let (i, line) = wait_line(&self.log, self.cursor, text, |l| l.contains(text)).await;
        self.cursor = i + 1;
        line
    }

    pub fn count(&self, text: &str) -> usize {
        self.log.count(|l| l.contains(text))
    }

    /// SIGKILL: no clean-up at all, as a crash or the OOM killer.
    pub async fn kill9(&mut self) {
        self.child.kill().await.unwrap();
    }

    /// SIGTERM, then the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("agent running") as i32;
        // SAFETY: kill(2) with a live child's pid and a valid signal number.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        within("agent exits after SIGTERM", self.child.wait())
            .await
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("agent running")
    }

    /// Sends `sig` (SIGHUP, SIGTERM...) to the running agent.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a live child's pid and a valid signal number.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, sig) }, 0);
    }

    /// Persisted sessions in the agent's state directory.
    pub fn session_files(&self) -> usize {
        std::fs::read_dir(self.state_dir.join("sessions"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".session.json"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// A path in the agent's state directory.
    pub fn state_path(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    pub fn status(&self) -> Value {
        let text = std::fs::read_to_string(self.state_dir.join("status.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

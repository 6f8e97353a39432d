//! tinyproxy, Debian's small HTTP CONNECT proxy, on a free loopback port: the real proxy the
//! agent and local-proxy tunnel through in the proxy tests.

use std::process::Stdio;
use std::time::Duration;

use securetunnel_emulator::testkit::{LogTail, free_port};
use tokio::process::{Child, Command};

use super::{DEADLINE, require_system_peers};

pub struct Tinyproxy {
    pub port: u16,
    /// Its log at level Connect: one `Request ...: CONNECT host:port` line per tunnel.
    pub log: LogTail,
    _child: Child,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// With `extra` config lines (`BasicAuth user pass`, `ConnectPort 443`).
    pub async fn start(extra: &str) -> Tinyproxy {
        require_system_peers();
        let dir = tempfile::tempdir().unwrap();
        // A free port can be taken between the probe and tinyproxy's bind: retry then.
        for _ in 0..5 {
            let port = free_port().unwrap();
            let conf = dir.path().join("tinyproxy.conf");
            std::fs::write(
                &conf,
                format!(
                    "Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nLogLevel Connect\nMaxClients 64\nTimeout 600\n{extra}\n"
                ),
            )
            .unwrap();
            let mut child = Command::new("tinyproxy")
                .arg("-d")
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect(
                    "tinyproxy is installed (./test.sh installs it: apt-get install tinyproxy-bin)",
                );
            let log = LogTail::follow(child.stdout.take().unwrap(), "tinyproxy");
            let _err = LogTail::follow(child.stderr.take().unwrap(), "tinyproxy");
            // Ready once it accepts; gone if the port was taken.
            let ready = tokio::time::timeout(DEADLINE, async {
                loop {
                    if tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .is_ok()
                    {
                        return true;
                    }
                    if child.try_wait().ok().flatten().is_some() {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("tinyproxy starts or exits");
            if ready {
                return Tinyproxy {
                    port,
                    log,
                    _child: child,
                    _dir: dir,
                };
            }
        }
        panic!("tinyproxy did not start on any free port");
    }

    pub fn url(&self, userinfo: &str) -> String {
        format!("http://{userinfo}127.0.0.1:{}", self.port)
    }

    /// Waits for its log line of a CONNECT to `target` (`host:port`); fails the test without.
    pub async fn saw_connect(&self, target: &str) {
        let needle = format!("CONNECT {target} ");
        let seen = tokio::time::timeout(DEADLINE, self.log.wait(0, |l| l.contains(&needle))).await;
        assert!(
            matches!(seen, Ok(Some(_))),
            "tinyproxy never tunnelled to {target}:\n{}",
            self.log.text()
        );
    }
}

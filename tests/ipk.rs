//! The OpenWrt packages: each .ipk unpacks to what opkg expects, with the right control
//! fields, files, modes and procd init script. The payload is the binary named by
//! SECURETUNNEL_IPK_BINARY_<ARCH> (the cross builds), else this build's binary.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn build(arch: &str, out: &Path) -> PathBuf {
    let var = format!(
        "SECURETUNNEL_IPK_BINARY_{}",
        arch.split('_').next().unwrap().to_uppercase()
    );
    let binary =
        std::env::var(var).unwrap_or_else(|_| env!("CARGO_BIN_EXE_securetunnel-agent").into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/openwrt/build-ipk.sh");
    let printed = run(Command::new(script).arg(binary).arg(arch).arg(out));
    PathBuf::from(printed.trim())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn check(arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ipk = build(arch, dir.path());
    assert_eq!(
        ipk.file_name().unwrap().to_str().unwrap(),
        format!(
            "securetunnel-agent_{}_{arch}.ipk",
            env!("CARGO_PKG_VERSION")
        )
    );
    let members: Vec<String> = run(Command::new("tar").arg("tzf").arg(&ipk))
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        members,
        ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
    );

    let x = dir.path().join("x");
    for part in ["outer", "control", "data"] {
        std::fs::create_dir_all(x.join(part)).unwrap();
    }
    run(Command::new("tar")
        .arg("xzf")
        .arg(&ipk)
        .arg("-C")
        .arg(x.join("outer")));
    assert_eq!(
        std::fs::read_to_string(x.join("outer/debian-binary")).unwrap(),
        "2.0\n"
    );
    run(Command::new("tar")
        .arg("xzf")
        .arg(x.join("outer/control.tar.gz"))
        .arg("-C")
        .arg(x.join("control")));
    run(Command::new("tar")
        .arg("xzf")
        .arg(x.join("outer/data.tar.gz"))
        .arg("-C")
        .arg(x.join("data")));

    let control = std::fs::read_to_string(x.join("control/control")).unwrap();
    let field = |name: &str| {
        control
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("control has no {name}: {control}"))
            .to_owned()
    };
    assert_eq!(field("Package"), "securetunnel-agent");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(field("Architecture"), arch);
    assert_eq!(field("Section"), "net");
    assert_eq!(field("License"), "MIT");
    assert!(field("Installed-Size").parse::<u64>().unwrap() > 100_000);
    assert!(!field("Maintainer").is_empty() && !field("Description").is_empty());
    assert!(
        control.lines().all(|l| !l.ends_with(": ")),
        "empty field in {control}"
    );
    assert_eq!(
        std::fs::read_to_string(x.join("control/conffiles")).unwrap(),
        "/etc/securetunnel-agent/agent.toml\n"
    );
    for script in ["postinst", "prerm"] {
        assert_eq!(mode(&x.join("control").join(script)), 0o755, "{script}");
    }
    let postinst = std::fs::read_to_string(x.join("control/postinst")).unwrap();
    assert!(postinst.contains("enable"), "{postinst}");
    // Upgrades leave the running agent alone: it re-executes the new binary itself.
    assert!(
        !postinst.contains("restart") && !postinst.contains(" start"),
        "{postinst}"
    );
    let trace = Command::new("sh")
        .arg("-x")
        .arg(x.join("control/prerm"))
        .arg("upgrade")
        .output()
        .unwrap();
    assert!(trace.status.success());
    let trace = String::from_utf8_lossy(&trace.stderr);
    assert!(
        !trace.contains("init.d"),
        "prerm upgrade touched the service:\n{trace}"
    );

    let data = x.join("data");
    let mut files: Vec<String> = run(Command::new("tar")
        .arg("tzf")
        .arg(x.join("outer/data.tar.gz")))
    .lines()
    .filter(|l| !l.ends_with('/'))
    .map(str::to_owned)
    .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "./etc/init.d/securetunnel-agent",
            "./etc/securetunnel-agent/agent.toml",
            "./usr/bin/securetunnel-agent"
        ]
    );
    assert_eq!(mode(&data.join("usr/bin/securetunnel-agent")), 0o755);
    assert_eq!(mode(&data.join("etc/init.d/securetunnel-agent")), 0o755);
    assert_eq!(mode(&data.join("etc/securetunnel-agent/agent.toml")), 0o600);
    let owners = run(Command::new("tar")
        .arg("tzvf")
        .arg(x.join("outer/data.tar.gz")));
    assert!(
        owners.lines().all(|l| l.contains(" 0/0 ")),
        "files not owned by root: {owners}"
    );

    let init = std::fs::read_to_string(data.join("etc/init.d/securetunnel-agent")).unwrap();
    assert!(init.starts_with("#!/bin/sh /etc/rc.common\n"), "{init}");
    for needle in [
        "USE_PROCD=1",
        "START=",
        "procd_set_param command \"$PROG\" run --config \"$CONF\"",
        "procd_set_param respawn",
        "procd_send_signal securetunnel-agent '*' HUP",
    ] {
        assert!(init.contains(needle), "init script lacks {needle:?}");
    }
    let sh = Command::new("sh")
        .arg("-n")
        .arg(data.join("etc/init.d/securetunnel-agent"))
        .status()
        .unwrap();
    assert!(sh.success(), "init script does not parse");
}

#[test]
fn the_aarch64_ipk_is_laid_out_as_opkg_expects() {
    check("aarch64_generic");
}

#[test]
fn the_arm_cortex_a7_ipk_is_laid_out_as_opkg_expects() {
    check("arm_cortex-a7");
}

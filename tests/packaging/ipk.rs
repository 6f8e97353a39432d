//! The OpenWrt packages: each .ipk unpacks to what opkg expects, with the right control
//! fields, files, modes and procd init script, and carries a static binary for its
//! architecture: the cross build named by SECURETUNNEL_IPK_BINARY_<ARCH> (`./test.sh` builds
//! and names them; there is no host-binary substitute).

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

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/openwrt/build-ipk.sh")
}

/// The cross-built binary for an opkg architecture, and the ELF machine it must be.
fn binary(arch: &str) -> (PathBuf, u16) {
    crate::common::require_system_peers();
    let (name, target, machine) = match arch {
        "aarch64_generic" => ("AARCH64", "aarch64-unknown-linux-musl", 183),
        "arm_cortex-a7" => ("ARM", "armv7-unknown-linux-musleabihf", 40),
        other => panic!("no cross target for {other}"),
    };
    let var = format!("SECURETUNNEL_IPK_BINARY_{name}");
    let path = std::env::var(&var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: run ./test.sh, or build the binary with \
             `cross/setup.sh {target} && cross/build.sh {target}` and set \
             {var}=target/{target}/release/securetunnel-agent"
        )
    });
    (PathBuf::from(path), machine)
}

fn build(arch: &str, out: &Path) -> PathBuf {
    let (binary, _) = binary(arch);
    let printed = run(Command::new(script()).arg(binary).arg(arch).arg(out));
    PathBuf::from(printed.trim())
}

/// (ELF machine, has a program interpreter) of an ELF file, little-endian, 32 or 64 bit.
fn elf_machine_and_interp(bytes: &[u8]) -> (u16, bool) {
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let is64 = bytes[4] == 2;
    let (phoff, phentsize, phnum) = if is64 {
        (
            u64_at(32) as usize,
            u16_at(54) as usize,
            u16_at(56) as usize,
        )
    } else {
        (
            u32_at(28) as usize,
            u16_at(42) as usize,
            u16_at(44) as usize,
        )
    };
    // PT_INTERP (3): a dynamically linked binary, which OpenWrt's musl may not satisfy.
    let interp = (0..phnum).any(|i| u32_at(phoff + i * phentsize) == 3);
    (u16_at(18), interp)
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
    // The data plane's public roots come from OpenWrt's bundle.
    assert_eq!(field("Depends"), "ca-bundle");
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
    // postinst into an image root (IPKG_INSTROOT): the agent's user and group, with the
    // first free ids from 200, and nothing started.
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/ash\nx:x:200:200::/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nx:x:200:\n").unwrap();
    std::fs::write(root.join("etc/shadow"), "root:::0:99999:7:::\n").unwrap();
    for _ in 0..2 {
        let out = Command::new("sh")
            .arg(x.join("control/postinst"))
            .env("IPKG_INSTROOT", &root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(group.ends_with("securetunnel-agent:x:201:\n"), "{group}");
    assert!(
        passwd.ends_with("securetunnel-agent:x:201:201:securetunnel-agent:/var/run/securetunnel-agent:/bin/false\n"),
        "{passwd}"
    );
    assert_eq!(
        passwd
            .lines()
            .filter(|l| l.starts_with("securetunnel-agent:"))
            .count(),
        1,
        "added twice: {passwd}"
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
    let packed = std::fs::read(data.join("usr/bin/securetunnel-agent")).unwrap();
    let (machine, interp) = elf_machine_and_interp(&packed);
    assert_eq!(
        machine,
        binary(arch).1,
        "the {arch} package carries another machine's binary"
    );
    assert!(!interp, "the {arch} package's binary is not static");
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
        "procd_set_param respawn 3600 5 5",
        "procd_set_param user \"$USER\"",
        "procd_set_param no_new_privs 1",
        "procd_set_param term_timeout 15",
        "chgrp \"$USER\" /etc/securetunnel-agent \"$CONF\"",
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

#[test]
fn a_binary_for_another_machine_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let host = env!("CARGO_BIN_EXE_securetunnel-agent");
    let out = Command::new(script())
        .arg(host)
        .arg("arm_cortex-a7")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the host binary was packed for ARM");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ELF machine 62") && err.contains("cross/build.sh"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// The init script's start, run with procd's and the system's commands stubbed: it creates
/// and hands over the state directory the configuration names (on flash, under a root-owned
/// parent the agent cannot write), and raises the open-files limit to the unit's.
#[test]
fn the_init_script_hands_over_the_configured_state_dir_and_raises_the_descriptor_limit() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("etc/securetunnel-agent/state");
    let conf = dir.path().join("agent.toml");
    std::fs::write(
        &conf,
        format!("thing_name = \"gw\"\nstate_dir = \"{}\"\n", state.display()),
    )
    .unwrap();
    let init = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("packaging/openwrt/securetunnel-agent.init"),
    )
    .unwrap()
    .replace(
        "CONF=/etc/securetunnel-agent/agent.toml",
        &format!("CONF={}", conf.display()),
    );
    let calls = dir.path().join("calls");
    let harness = format!(
        "log() {{ echo \"$*\" >> {calls}; }}\n\
         chown() {{ log chown \"$@\"; }}\nchgrp() {{ log chgrp \"$@\"; }}\nchmod() {{ log chmod \"$@\"; }}\n\
         logger() {{ log logger \"$@\"; }}\nprocd_open_instance() {{ :; }}\nprocd_close_instance() {{ :; }}\n\
         procd_set_param() {{ log procd_set_param \"$@\"; }}\n{init}\nstart_service\n",
        calls = calls.display()
    );
    let status = Command::new("sh").arg("-c").arg(&harness).status().unwrap();
    assert!(status.success());
    let calls = std::fs::read_to_string(&calls).unwrap();
    assert!(state.is_dir(), "the configured state_dir was not made");
    assert!(
        calls.contains(&format!(
            "chown -h securetunnel-agent:securetunnel-agent {}",
            state.display()
        )),
        "{calls}"
    );
    assert!(
        calls.contains(&format!("chmod 0700 {}", state.display())),
        "{calls}"
    );
    assert!(
        calls.contains("procd_set_param limits nofile=8192 8192"),
        "{calls}"
    );
}

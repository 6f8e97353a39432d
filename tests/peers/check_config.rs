//! `check-config` on real key files: every key form AWS IoT devices meet loads, a key that
//! does not match its certificate is named, a readable key is warned about.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    crate::common::require_system_peers();
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a client certificate for `name` signed with `key` (already in `dir`).
fn certify(dir: &Path, key: &str, name: &str) -> PathBuf {
    if !dir.join("ca.key").exists() {
        openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "ca.key",
            ],
        );
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "30",
                "-subj",
                "/CN=Test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        std::fs::write(
            dir.join("client.ext"),
            "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
    }
    let csr = format!("{name}.csr");
    let crt = format!("{name}.crt");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "30",
            "-extfile",
            "client.ext",
        ],
    );
    dir.join(crt)
}

/// A P-256 key in SEC1 form (`BEGIN EC PRIVATE KEY`).
fn ec_key(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            name,
        ],
    );
}

fn config(dir: &Path, cert: &Path, key: &Path) -> PathBuf {
    let text = format!(
        "thing_name = \"gw-1\"\nstate_dir = \"{}\"\n[mqtt]\nendpoint = \"example-ats.iot.eu-west-1.amazonaws.com\"\n\
         cert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n[services]\nSSH = 22\n",
        dir.join("state").display(),
        cert.display(),
        key.display(),
        dir.join("ca.crt").display()
    );
    let p = dir.join("agent.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn check(cfg: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_securetunnel-agent"))
        .args(["check-config", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn private(p: &Path) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn ec_and_rsa_keys_load_in_pkcs8_sec1_and_pkcs1_form() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ec_key(d, "ec-sec1.key");
    openssl(
        d,
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "ec-sec1.key",
            "-out",
            "ec-pkcs8.key",
        ],
    );
    openssl(
        d,
        &["genrsa", "-traditional", "-out", "rsa-pkcs1.key", "2048"],
    );
    openssl(
        d,
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "rsa-pkcs1.key",
            "-out",
            "rsa-pkcs8.key",
        ],
    );
    let ec_cert = certify(d, "ec-sec1.key", "ec");
    let rsa_cert = certify(d, "rsa-pkcs1.key", "rsa");
    for (key, cert, header) in [
        ("ec-sec1.key", &ec_cert, "BEGIN EC PRIVATE KEY"),
        ("ec-pkcs8.key", &ec_cert, "BEGIN PRIVATE KEY"),
        ("rsa-pkcs1.key", &rsa_cert, "BEGIN RSA PRIVATE KEY"),
        ("rsa-pkcs8.key", &rsa_cert, "BEGIN PRIVATE KEY"),
    ] {
        let key = d.join(key);
        assert!(std::fs::read_to_string(&key).unwrap().contains(header));
        private(&key);
        let (code, out) = check(&config(d, cert, &key));
        assert_eq!(code, 0, "{}: {out}", key.display());
        assert!(
            out.contains(": OK") && out.contains("matches the certificate"),
            "{out}"
        );
        assert!(!out.contains("warning"), "{out}");
    }
}

#[test]
fn a_key_of_another_certificate_is_named_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ec_key(d, "a.key");
    ec_key(d, "b.key");
    let cert = certify(d, "a.key", "a");
    private(&d.join("b.key"));
    let (code, out) = check(&config(d, &cert, &d.join("b.key")));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("mqtt.key") && out.contains("does not belong to the certificate"),
        "{out}"
    );
}

#[test]
fn a_group_readable_key_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ec_key(d, "a.key");
    let cert = certify(d, "a.key", "a");
    std::fs::set_permissions(d.join("a.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = check(&config(d, &cert, &d.join("a.key")));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: mqtt.key") && out.contains("chmod 600"),
        "{out}"
    );
}

#[test]
fn the_example_config_names_each_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.toml"))
            .unwrap();
    let example = dir.path().join("agent.toml");
    std::fs::write(&example, shipped.replace("# thing_name =", "thing_name =")).unwrap();
    let (code, out) = check(&example);
    assert_eq!(code, 2, "{out}");
    for key in ["mqtt.cert", "mqtt.key", "mqtt.ca"] {
        assert!(out.contains(key), "{key} missing from: {out}");
    }
}

/// `check-config --user nobody` on a config whose Unix-socket services `nobody` can or
/// cannot reach. The sockets belong to whoever runs the tests (root or not), in /dev/shm:
/// world-searchable, and hidden by no unit setting.
#[test]
fn unix_socket_services_are_checked_for_the_agents_user() {
    use std::os::unix::fs::MetadataExt;
    let keys = tempfile::tempdir().unwrap();
    let k = keys.path();
    ec_key(k, "a.key");
    let cert = certify(k, "a.key", "a");
    private(&k.join("a.key"));
    let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm is a writable tmpfs");
    let d = shm.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bind = |p: &Path, mode: u32| {
        let l = std::os::unix::net::UnixListener::bind(p).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        l
    };
    let _open = bind(&d.join("open.sock"), 0o666);
    let grp = bind(&d.join("group.sock"), 0o660);
    std::fs::create_dir(d.join("private")).unwrap();
    std::fs::set_permissions(d.join("private"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let _priv = bind(&d.join("private/app.sock"), 0o666);
    // The group the socket got (the test user's), by name as /etc/group has it.
    let gid = std::fs::metadata(d.join("group.sock")).unwrap().gid();
    let group = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 3 && f[2] == gid.to_string()).then(|| f[0].to_owned())
        })
        .unwrap_or_else(|| gid.to_string());
    let cfg = config(k, &cert, &k.join("a.key"));
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    for (name, path) in [
        ("OPEN", "open.sock"),
        ("GRP", "group.sock"),
        ("PRIV", "private/app.sock"),
        ("GONE", "missing.sock"),
    ] {
        text.push_str(&format!("{name} = \"{}\"\n", d.join(path).display()));
    }
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_securetunnel-agent"))
        .args(["check-config", "--user", "nobody", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    let warning = |service: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("warning: service {service}: ")))
            .map(str::to_owned)
    };
    assert_eq!(warning("OPEN"), None, "{text}");
    assert_eq!(warning("SSH"), None, "{text}");
    let grp_warning = warning("GRP").unwrap_or_default();
    assert!(
        grp_warning.contains("nobody cannot connect")
            && grp_warning.contains(&format!("SupplementaryGroups={group}")),
        "{text}"
    );
    let private_dir = format!("directory {} is 0700", d.join("private").display());
    assert!(
        warning("PRIV").unwrap_or_default().contains(&private_dir),
        "{text}"
    );
    assert!(
        warning("GONE")
            .unwrap_or_default()
            .contains("does not exist"),
        "{text}"
    );
    drop(grp);

    let out = Command::new(env!("CARGO_BIN_EXE_securetunnel-agent"))
        .args(["check-config", "--user", "no-such-user", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--user no-such-user: no such user"));
}

//! Whether the agent, as the packaged service runs it, can reach each Unix-socket service:
//! the unit's sandbox hides some directories, and a socket needs write permission (and every
//! directory above it search permission) for the agent's user.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::services::{LocalEndpoint, ServiceMap};

/// The user the packages create and run the agent as.
pub const SERVICE_USER: &str = "securetunnel-agent";

/// The packaged unit, for the sandbox settings it really sets.
const UNIT: &str = include_str!("../packaging/systemd/securetunnel-agent.service");

/// Who the checks are for: a uid, its groups, and a name for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub uid: u32,
    pub gids: Vec<u32>,
}

impl Identity {
    /// The user the agent will run as: `--user`, else the packaged user when checking as
    /// root (if it exists), else whoever runs the check.
    pub fn agent(user: Option<&str>) -> Result<Identity, String> {
        if let Some(name) = user {
            return Identity::lookup(name)
                .ok_or_else(|| format!("--user {name}: no such user in /etc/passwd"));
        }
        let me = Identity::current();
        if me.uid == 0 {
            return Ok(Identity::lookup(SERVICE_USER).unwrap_or(me));
        }
        Ok(me)
    }

    /// This process's effective user and groups (from /proc/self/status).
    pub fn current() -> Identity {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |key: &str| -> Vec<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| {
                    v.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        // Uid:/Gid: list real, effective, saved, fs: take the effective one.
        let uid = field("Uid:").get(1).copied().unwrap_or(u32::MAX);
        let mut gids: Vec<u32> = field("Gid:").get(1).copied().into_iter().collect();
        gids.extend(field("Groups:"));
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let name = record(&passwd, 2, &uid.to_string())
            .map_or_else(|| format!("uid {uid}"), |f| f[0].to_owned());
        Identity { name, uid, gids }
    }

    /// `name` as /etc/passwd and /etc/group describe it.
    pub fn lookup(name: &str) -> Option<Identity> {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        Identity::from_files(name, &passwd, &group)
    }

    /// With the unit's `SupplementaryGroups=` added (names resolved in /etc/group).
    pub fn with_groups(mut self, names: &[String]) -> Identity {
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        for name in names {
            let gid = record(&group, 0, name).and_then(|f| f[2].parse::<u32>().ok());
            self.gids.extend(gid);
        }
        self
    }

    fn from_files(name: &str, passwd: &str, group: &str) -> Option<Identity> {
        let f = record(passwd, 0, name)?;
        let (uid, primary) = (f[2].parse().ok()?, f[3].parse().ok()?);
        let mut gids = vec![primary];
        for f in records(group) {
            if f[3].split(',').any(|m| m == name) {
                if let Ok(g) = f[2].parse() {
                    gids.push(g);
                }
            }
        }
        Some(Identity {
            name: name.to_owned(),
            uid,
            gids,
        })
    }
}

/// What the service manager's unit does to the agent's view of the file system and groups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitSettings {
    /// `PrivateTmp=yes`: /tmp and /var/tmp are the agent's own.
    pub private_tmp: bool,
    /// `ProtectHome=yes` or `tmpfs`: /home, /root and /run/user are empty (`read-only` still
    /// lets it connect to sockets there).
    pub hides_home: bool,
    /// `SupplementaryGroups=`, by name.
    pub groups: Vec<String>,
}

/// Time `systemctl show` gets: during a package upgrade systemd may be busy reloading; the
/// packaged unit is used then.
const SYSTEMCTL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A command's output, or an error if it did not finish within `limit` (it is killed).
fn output_within(
    cmd: &mut std::process::Command,
    limit: std::time::Duration,
) -> std::io::Result<std::process::Output> {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let start = std::time::Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "did not answer in time",
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output()
}

impl UnitSettings {
    /// From `systemctl show`-style `Key=value` lines (the unit file's own syntax too).
    pub fn parse(text: &str) -> UnitSettings {
        let mut u = UnitSettings::default();
        for line in text.lines() {
            match line.trim().split_once('=') {
                Some(("PrivateTmp", v)) => u.private_tmp = v == "yes" || v == "true",
                Some(("ProtectHome", v)) => u.hides_home = matches!(v, "yes" | "true" | "tmpfs"),
                Some(("SupplementaryGroups", v)) => {
                    u.groups = v.split_whitespace().map(str::to_owned).collect()
                }
                _ => {}
            }
        }
        u
    }

    /// The installed unit with its drop-ins (`systemctl show`), else the packaged unit.
    pub fn installed() -> UnitSettings {
        let shown = output_within(
            std::process::Command::new("systemctl")
                .args([
                    "show",
                    "-p",
                    "LoadState",
                    "-p",
                    "PrivateTmp",
                    "-p",
                    "ProtectHome",
                ])
                .args(["-p", "SupplementaryGroups", "securetunnel-agent.service"]),
            SYSTEMCTL_TIMEOUT,
        );
        match shown {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                if text.lines().any(|l| l.trim() == "LoadState=loaded") {
                    return UnitSettings::parse(&text);
                }
                UnitSettings::parse(UNIT)
            }
            _ => UnitSettings::parse(UNIT),
        }
    }
}

/// Rule (sandbox): the directories the unit hides from the agent, with the setting that
/// hides them; `None` when the unit leaves `path` visible.
pub fn hidden_by(path: &Path, unit: &UnitSettings) -> Option<&'static str> {
    let under = |dir: &str| path.starts_with(dir);
    if (under("/tmp") || under("/var/tmp")) && unit.private_tmp {
        return Some("PrivateTmp=yes");
    }
    if (under("/home") || under("/root") || under("/run/user")) && unit.hides_home {
        return Some("ProtectHome=yes");
    }
    None
}

/// Rule (permissions): whether `who` has every bit of `want` (r=4, w=2, x=1) on a file of
/// `mode` owned by `uid`:`gid`. Only the first class that matches counts, as in the kernel.
pub fn permits(mode: u32, uid: u32, gid: u32, who: &Identity, want: u32) -> bool {
    if who.uid == 0 {
        return true;
    }
    let bits = if who.uid == uid {
        mode >> 6
    } else if who.gids.contains(&gid) {
        mode >> 3
    } else {
        mode
    } & 7;
    bits & want == want
}

/// What stands between `who` and the socket at `path`, as one sentence naming the fix;
/// `None` when it can connect.
pub fn socket_problem(path: &Path, who: &Identity, unit: Option<&UnitSettings>) -> Option<String> {
    // Symlinked directories (/var/run -> /run) are judged where they lead.
    let real = path
        .parent()
        .and_then(|d| d.canonicalize().ok())
        .zip(path.file_name())
        .map_or_else(|| path.to_owned(), |(d, f)| d.join(f));
    let hidden = unit.and_then(|u| hidden_by(path, u).or_else(|| hidden_by(&real, u)));
    let path = real.as_path();
    if let Some(setting) = hidden {
        return Some(format!(
            "{} is hidden by the unit's {setting}: put the socket under /run (or another \
             directory outside /tmp, /var/tmp, /home, /root and /run/user)",
            path.display()
        ));
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some(format!(
                "{} does not exist (yet): start the service that listens on it",
                path.display()
            ));
        }
        Err(e) => return Some(format!("{}: {e}", path.display())),
    };
    if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
        return Some(format!("{} is not a Unix socket", path.display()));
    }
    if let Some(why) = unreachable(path, who) {
        return Some(why);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if !permits(mode, meta.uid(), meta.gid(), who, 2) {
        return Some(format!(
            "{} cannot connect to {}: it is {mode:04o} {}:{}; {}",
            who.name,
            path.display(),
            meta.uid(),
            meta.gid(),
            grant(who, meta.uid(), meta.gid(), mode, 0o020)
        ));
    }
    None
}

/// "`who` cannot reach `path`", naming the first directory above it that `who` cannot pass
/// through, and the fix; `None` when every directory lets it through.
fn unreachable(path: &Path, who: &Identity) -> Option<String> {
    path.ancestors().skip(1).find_map(|dir| {
        let d = std::fs::metadata(dir).ok()?;
        let mode = d.permissions().mode() & 0o7777;
        (!permits(mode, d.uid(), d.gid(), who, 1)).then(|| {
            format!(
                "{} cannot reach {}: directory {} is {mode:04o} {}:{}; {}",
                who.name,
                path.display(),
                dir.display(),
                d.uid(),
                d.gid(),
                grant(who, d.uid(), d.gid(), mode, 0o010)
            )
        })
    })
}

/// What stands between `who` and reading the file at `path` (a certificate, a key, a PIN)
/// as the service runs it, as one sentence naming the fix; `None` when it can read it (or
/// the file is missing: that is an error of its own).
pub fn file_problem(path: &Path, who: &Identity, unit: Option<&UnitSettings>) -> Option<String> {
    if let Some(setting) = unit.and_then(|u| hidden_by(path, u)) {
        return Some(format!(
            "{} is hidden by the unit's {setting}: keep it under /etc/securetunnel-agent",
            path.display()
        ));
    }
    let meta = std::fs::metadata(path).ok()?;
    if let Some(why) = unreachable(path, who) {
        return Some(why);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if permits(mode, meta.uid(), meta.gid(), who, 4) {
        return None;
    }
    let fix = if mode & 0o040 != 0 && who.uid != meta.uid() {
        grant(who, meta.uid(), meta.gid(), mode, 0o040)
    } else {
        format!("chown {} it and keep it mode 0600", who.name)
    };
    Some(format!(
        "{} cannot read {}: it is {mode:04o} {}:{}; {fix}",
        who.name,
        path.display(),
        meta.uid(),
        meta.gid()
    ))
}

/// The fix for a permission problem: the group when the group class would do.
fn grant(who: &Identity, uid: u32, gid: u32, mode: u32, group_bit: u32) -> String {
    if who.uid == uid {
        // The owner class applies to the agent's user: no group can help.
        return "it belongs to the agent's user, whose own permission bits lack it: chmod u+rwx on directories, u+w on the socket".into();
    }
    if mode & group_bit != 0 {
        let group = group_name(gid).unwrap_or_else(|| gid.to_string());
        format!(
            "the agent's user needs group {group}: add SupplementaryGroups={group} in a drop-in \
             (systemctl edit securetunnel-agent)"
        )
    } else {
        "give the agent's user access (group permission and SupplementaryGroups=)".into()
    }
}

fn group_name(gid: u32) -> Option<String> {
    let group = std::fs::read_to_string("/etc/group").ok()?;
    record(&group, 2, &gid.to_string()).map(|f| f[0].to_owned())
}

/// The records of /etc/passwd or /etc/group text with at least four fields.
fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
}

/// The first record whose field `field` is `value`.
fn record<'a>(text: &'a str, field: usize, value: &str) -> Option<Vec<&'a str>> {
    records(text).find(|f| f[field] == value)
}

/// One warning per Unix-socket service `who` cannot reach.
pub fn unix_socket_warnings(
    services: &ServiceMap,
    who: &Identity,
    unit: Option<&UnitSettings>,
) -> Vec<String> {
    let named = services.named().map(|(s, e)| (s.to_owned(), e));
    let unnamed = services
        .unnamed_endpoint()
        .map(|e| ("(unnamed)".to_owned(), e));
    named
        .chain(unnamed)
        .filter_map(|(service, e)| match e {
            LocalEndpoint::Unix(p) => {
                socket_problem(p, who, unit).map(|w| format!("service {service}: {w}"))
            }
            LocalEndpoint::Tcp { .. } => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32, gids: &[u32]) -> Identity {
        Identity {
            name: "agent".into(),
            uid,
            gids: gids.to_vec(),
        }
    }

    #[test]
    fn a_socket_under_tmp_or_home_is_hidden_by_the_units_sandbox() {
        let unit = UnitSettings::parse(UNIT);
        let hidden_by = |p: &Path| hidden_by(p, &unit);
        assert_eq!(
            hidden_by(Path::new("/tmp/app.sock")),
            Some("PrivateTmp=yes")
        );
        assert_eq!(
            hidden_by(Path::new("/var/tmp/a/b.sock")),
            Some("PrivateTmp=yes")
        );
        assert_eq!(
            hidden_by(Path::new("/home/u/app.sock")),
            Some("ProtectHome=yes")
        );
        assert_eq!(
            hidden_by(Path::new("/run/user/1000/s")),
            Some("ProtectHome=yes")
        );
        assert_eq!(hidden_by(Path::new("/run/app/app.sock")), None);
        assert_eq!(hidden_by(Path::new("/tmpfoo/app.sock")), None);
    }

    #[test]
    fn drop_ins_shown_by_systemctl_change_what_is_hidden_and_the_groups() {
        let shown = "LoadState=loaded\nPrivateTmp=no\nProtectHome=read-only\nSupplementaryGroups=www-data dialout\n";
        let u = UnitSettings::parse(shown);
        assert_eq!(hidden_by(Path::new("/tmp/app.sock"), &u), None);
        assert_eq!(hidden_by(Path::new("/home/u/app.sock"), &u), None);
        assert_eq!(u.groups, vec!["www-data".to_owned(), "dialout".to_owned()]);
        let tmpfs = UnitSettings::parse("ProtectHome=tmpfs\nPrivateTmp=yes\n");
        assert_eq!(
            hidden_by(Path::new("/root/s"), &tmpfs),
            Some("ProtectHome=yes")
        );
        let packaged = UnitSettings::parse(UNIT);
        assert!(packaged.private_tmp && packaged.hides_home && packaged.groups.is_empty());
    }

    #[test]
    fn only_the_first_matching_permission_class_counts() {
        // Owner without write is refused even though others may write.
        assert!(!permits(0o0502, 7, 9, &user(7, &[]), 2));
        assert!(permits(0o0660, 1, 9, &user(7, &[9]), 2));
        assert!(!permits(0o0660, 1, 9, &user(7, &[8]), 2));
        assert!(permits(0o0666, 1, 9, &user(7, &[]), 2));
        assert!(permits(0o0600, 1, 9, &user(0, &[]), 2));
        assert!(!permits(0o0750, 1, 9, &user(7, &[]), 1));
    }

    #[test]
    fn a_file_the_agents_user_cannot_read_is_named_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token.pin");
        std::fs::write(&file, "1234\n").unwrap();
        let set =
            |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
        let meta = std::fs::metadata(&file).unwrap();
        // Another user, in no group of the file's.
        let agent = user(meta.uid() + 4242, &[]);
        set(dir.path(), 0o700).unwrap();
        let why = file_problem(&file, &agent, None).unwrap();
        assert!(
            why.contains("cannot reach") && why.contains("is 0700"),
            "{why}"
        );
        set(dir.path(), 0o755).unwrap();
        set(&file, 0o600).unwrap();
        let why = file_problem(&file, &agent, None).unwrap();
        assert!(
            why.contains("cannot read") && why.contains("chown agent"),
            "{why}"
        );
        set(&file, 0o640).unwrap();
        let in_group = user(meta.uid() + 4242, &[meta.gid()]);
        assert_eq!(file_problem(&file, &in_group, None), None);
        assert!(
            file_problem(&file, &agent, None)
                .unwrap()
                .contains("SupplementaryGroups=")
        );
        assert_eq!(
            file_problem(&dir.path().join("missing"), &agent, None),
            None
        );
        let unit = UnitSettings::parse(UNIT);
        let hidden = file_problem(Path::new("/home/u/key.pem"), &agent, Some(&unit)).unwrap();
        assert!(hidden.contains("ProtectHome=yes"), "{hidden}");
    }

    #[test]
    fn the_agents_groups_come_from_passwd_and_group() {
        let passwd =
            "root:x:0:0::/root:/bin/sh\nsecuretunnel-agent:x:998:997::/:/usr/sbin/nologin\n";
        let group = "www-data:x:33:nginx,securetunnel-agent\nsecuretunnel-agent:x:997:\nother:x:5:securetunnel-agents\n";
        let who = Identity::from_files(SERVICE_USER, passwd, group).unwrap();
        assert_eq!((who.uid, who.gids), (998, vec![997, 33]));
        assert_eq!(Identity::from_files("nobody", passwd, group), None);
    }
}

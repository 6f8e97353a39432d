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
        let name = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|p| {
                p.lines().find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 3 && f[2].parse() == Ok(uid)).then(|| f[0].to_owned())
                })
            })
            .unwrap_or_else(|| format!("uid {uid}"));
        Identity { name, uid, gids }
    }

    /// `name` as /etc/passwd and /etc/group describe it.
    pub fn lookup(name: &str) -> Option<Identity> {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        Identity::from_files(name, &passwd, &group)
    }

    fn from_files(name: &str, passwd: &str, group: &str) -> Option<Identity> {
        let (uid, primary) = passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[0] == name)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })?;
        let mut gids = vec![primary];
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
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

/// Rule (sandbox): the directories the packaged unit hides from the agent, with the setting
/// that hides them; `None` when the unit leaves `path` visible.
pub fn hidden_by(path: &Path) -> Option<&'static str> {
    let sets = |setting: &str| UNIT.lines().any(|l| l.trim() == setting);
    let under = |dir: &str| path.starts_with(dir);
    if (under("/tmp") || under("/var/tmp")) && sets("PrivateTmp=yes") {
        return Some("PrivateTmp=yes");
    }
    if (under("/home") || under("/root") || under("/run/user")) && sets("ProtectHome=yes") {
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
pub fn socket_problem(path: &Path, who: &Identity, systemd: bool) -> Option<String> {
    if let Some(setting) = hidden_by(path).filter(|_| systemd) {
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
    for dir in path.ancestors().skip(1) {
        let Ok(d) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = d.permissions().mode() & 0o7777;
        if !permits(mode, d.uid(), d.gid(), who, 1) {
            return Some(format!(
                "{} cannot reach {}: directory {} is {mode:04o} {}:{}; {}",
                who.name,
                path.display(),
                dir.display(),
                d.uid(),
                d.gid(),
                grant(d.gid(), mode, 0o010)
            ));
        }
    }
    let mode = meta.permissions().mode() & 0o7777;
    if !permits(mode, meta.uid(), meta.gid(), who, 2) {
        return Some(format!(
            "{} cannot connect to {}: it is {mode:04o} {}:{}; {}",
            who.name,
            path.display(),
            meta.uid(),
            meta.gid(),
            grant(meta.gid(), mode, 0o020)
        ));
    }
    None
}

/// The fix for a permission problem: the group when the group class would do.
fn grant(gid: u32, mode: u32, group_bit: u32) -> String {
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
    group.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && f[2].parse() == Ok(gid)).then(|| f[0].to_owned())
    })
}

/// One warning per Unix-socket service `who` cannot reach.
pub fn unix_socket_warnings(services: &ServiceMap, who: &Identity, systemd: bool) -> Vec<String> {
    let named = services.named().map(|(s, e)| (s.to_owned(), e));
    let unnamed = services
        .unnamed_endpoint()
        .map(|e| ("(unnamed)".to_owned(), e));
    named
        .chain(unnamed)
        .filter_map(|(service, e)| match e {
            LocalEndpoint::Unix(p) => {
                socket_problem(p, who, systemd).map(|w| format!("service {service}: {w}"))
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
    fn the_agents_groups_come_from_passwd_and_group() {
        let passwd =
            "root:x:0:0::/root:/bin/sh\nsecuretunnel-agent:x:998:997::/:/usr/sbin/nologin\n";
        let group = "www-data:x:33:nginx,securetunnel-agent\nsecuretunnel-agent:x:997:\nother:x:5:securetunnel-agents\n";
        let who = Identity::from_files(SERVICE_USER, passwd, group).unwrap();
        assert_eq!((who.uid, who.gids), (998, vec![997, 33]));
        assert_eq!(Identity::from_files("nobody", passwd, group), None);
    }
}

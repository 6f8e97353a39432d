//! Live sessions on disk, so a restart (crash, watchdog, OOM kill, upgrade) rejoins every
//! tunnel with the same access and client token instead of losing it. One file per session
//! in `<state_dir>/sessions/`, written atomically (exclusive no-follow temp file, fsync,
//! rename) with mode 0600 in a directory only the agent's user may use. A file that is not
//! ours or does not parse is moved aside with a warning, never fatal.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::secret::Secret;

/// A file larger than this is not one of ours (a session file is under 5 KiB).
const MAX_FILE: u64 = 64 * 1024;
const SUFFIX: &str = ".session.json";

/// What a restart needs to rejoin a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistedSession {
    /// Random name of the file, never derived from a token.
    pub file_id: String,
    pub thing: String,
    pub region: String,
    pub services: Vec<String>,
    pub access_token: Secret,
    pub client_token: Secret,
    /// When the token first connected: the agent's own lifetime counts from it.
    pub first_connected: Option<Moment>,
    /// When its notify arrived: a session that never connects ends 12 h after it. `None`
    /// in files of earlier versions.
    pub received: Option<Moment>,
}

/// A moment on two clocks: the wall clock, which survives a reboot but may jump (or be unset
/// before NTP on a gateway without a real-time clock), and the time since boot of one boot,
/// which does neither but is only comparable within that boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moment {
    pub unix_secs: u64,
    pub boot_id: String,
    pub uptime_ms: u64,
}

impl Moment {
    pub fn now() -> Moment {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let uptime_ms = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0, |secs| (secs * 1000.0) as u64);
        Moment {
            unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            boot_id,
            uptime_ms,
        }
    }

    /// Rule: the time from `self` to `later`. Within one boot, by the time since boot;
    /// across a reboot, by the wall clock if the result is plausible (not negative, at most
    /// the service's 12 hours); otherwise unknown (`None`).
    pub fn elapsed_until(&self, later: &Moment) -> Option<Duration> {
        if !self.boot_id.is_empty() && self.boot_id == later.boot_id {
            return Some(Duration::from_millis(
                later.uptime_ms.saturating_sub(self.uptime_ms),
            ));
        }
        let secs = later.unix_secs.checked_sub(self.unix_secs)?;
        (secs <= 12 * 3600).then(|| Duration::from_secs(secs))
    }

    /// Rule: the time from a notify's arrival (`self`) to `later`. Within one boot, by the
    /// time since boot; across a reboot, by the wall clock whatever the gap (the clock was
    /// right when the notify arrived: its TLS needed it), unless it went back (unset again:
    /// unknown, `None`).
    pub fn since_notify(&self, later: &Moment) -> Option<Duration> {
        if !self.boot_id.is_empty() && self.boot_id == later.boot_id {
            return self.elapsed_until(later);
        }
        let secs = later.unix_secs.checked_sub(self.unix_secs)?;
        Some(Duration::from_secs(secs))
    }
}

/// The file's shape. Tokens are written from and read into memory that is wiped.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileV1<T> {
    version: u32,
    thing: String,
    region: String,
    services: Vec<String>,
    access_token: T,
    client_token: T,
    first_connected_unix: Option<u64>,
    #[serde(default)]
    boot_id: String,
    #[serde(default)]
    first_connected_uptime_ms: u64,
    #[serde(default)]
    received: Option<FileMoment>,
}

/// A `Moment` in the file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMoment {
    unix: u64,
    boot_id: String,
    uptime_ms: u64,
}

impl From<&Moment> for FileMoment {
    fn from(m: &Moment) -> Self {
        FileMoment {
            unix: m.unix_secs,
            boot_id: m.boot_id.clone(),
            uptime_ms: m.uptime_ms,
        }
    }
}

impl From<FileMoment> for Moment {
    fn from(m: FileMoment) -> Self {
        Moment {
            unix_secs: m.unix,
            boot_id: m.boot_id,
            uptime_ms: m.uptime_ms,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
    #[error(
        "{dir} is owned by uid {owner}, not by this agent (uid {me}): sessions are not persisted there; give the agent its own state_dir"
    )]
    Foreign { dir: PathBuf, owner: u32, me: u32 },
}

/// The sessions directory.
#[derive(Clone)]
pub struct SessionStore {
    dir: PathBuf,
}

pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A directory only this user uses: created 0700 when missing; an existing one must be a
/// real directory (not a symlink) owned by `me`, and is left as it is (it may be shared
/// with a service manager that set its mode).
pub(crate) fn private_dir(dir: &Path, me: u32) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() || !meta.is_dir() => {
            Err(io::Error::other("is a symlink or not a directory"))
        }
        Ok(meta) if meta.uid() != me => Err(io::Error::other(format!(
            "belongs to uid {}, not to the agent's user (uid {me})",
            meta.uid()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        Err(e) => Err(e),
    }
}

impl SessionStore {
    /// Opens (creating, mode 0700) `<state_dir>/sessions`. Refuses a directory that another
    /// user owns: whoever controls it could plant sessions or read tokens.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        Self::open_as(state_dir, euid())
    }

    fn open_as(state_dir: &Path, me: u32) -> Result<Self, StoreError> {
        let dir = state_dir.join("sessions");
        let io_err = |source| StoreError::Io {
            dir: dir.clone(),
            source,
        };
        match fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
        {
            Ok(()) => {}
            Err(e) => return Err(io_err(e)),
        }
        // The state directory may be a symlink (to a data partition); the sessions
        // directory inside it may not.
        for (d, meta) in [
            (state_dir, fs::metadata(state_dir)),
            (dir.as_path(), fs::symlink_metadata(&dir)),
        ] {
            let meta = meta.map_err(io_err)?;
            if !meta.is_dir() {
                return Err(StoreError::Io {
                    dir: d.to_owned(),
                    source: io::Error::other("not a directory"),
                });
            }
            if meta.uid() != me {
                return Err(StoreError::Foreign {
                    dir: d.to_owned(),
                    owner: meta.uid(),
                    me,
                });
            }
        }
        // Only the agent's user may list or read the sessions.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        Ok(SessionStore { dir })
    }

    fn path(&self, file_id: &str) -> PathBuf {
        self.dir.join(format!("{file_id}{SUFFIX}"))
    }

    /// A new random file id.
    pub fn new_id() -> String {
        uuid::Uuid::new_v4().simple().to_string()
    }

    /// Writes (or replaces) a session's file atomically.
    pub fn save(&self, s: &PersistedSession) -> io::Result<()> {
        let file = FileV1 {
            version: 1,
            thing: s.thing.clone(),
            region: s.region.clone(),
            services: s.services.clone(),
            access_token: s.access_token.expose(),
            client_token: s.client_token.expose(),
            first_connected_unix: s.first_connected.as_ref().map(|m| m.unix_secs),
            boot_id: s
                .first_connected
                .as_ref()
                .map_or_else(String::new, |m| m.boot_id.clone()),
            first_connected_uptime_ms: s.first_connected.as_ref().map_or(0, |m| m.uptime_ms),
            received: s.received.as_ref().map(FileMoment::from),
        };
        // Room for the largest file up front, so the buffer never reallocates and leaves an
        // unwiped copy of a token behind.
        let mut text = Zeroizing::new(Vec::with_capacity(MAX_FILE as usize));
        serde_json::to_writer(&mut *text, &file).map_err(io::Error::other)?;
        let tmp = self
            .dir
            .join(format!(".{}.tmp-{}", s.file_id, fastrand::u64(..)));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            fs::rename(&tmp, self.path(&s.file_id))?;
            sync_dir(&self.dir)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    /// Removes every session file: persistence was turned off, and the files hold tokens.
    pub fn clear(state_dir: &Path) {
        let dir = state_dir.join("sessions");
        let owned = fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir() && m.uid() == euid());
        if !owned {
            return;
        }
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(SUFFIX) || name.ends_with(REJECTED) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Removes a session's file (the session ended).
    pub fn remove(&self, file_id: &str) -> io::Result<()> {
        match fs::remove_file(self.path(file_id)) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every persisted session. Files that are not ours or do not parse are moved aside
    /// (`<name>.rejected`), each with the reason; leftover temp files are removed.
    pub fn load(&self) -> (Vec<PersistedSession>, Vec<String>) {
        let mut sessions = Vec::new();
        let mut warnings = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                warnings.push(format!("{}: {e}", self.dir.display()));
                return (sessions, warnings);
            }
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in names {
            let path = self.dir.join(&name);
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(file_id) = name.strip_suffix(SUFFIX) else {
                continue;
            };
            match read_session(&path, file_id) {
                Ok(s) => sessions.push(s),
                Err(Unusable::NotOurs(why)) => {
                    // Unlinked, never followed: chmod or rename through a planted link
                    // would act on its target.
                    let removed = fs::remove_file(&path).is_ok();
                    warnings.push(format!(
                        "session file {} {why}; {}",
                        path.display(),
                        if removed {
                            "removed"
                        } else {
                            "left in place (cannot remove it)"
                        }
                    ));
                }
                Err(Unusable::Invalid(why)) => {
                    // Ours (a private regular file) but unusable: kept for whoever
                    // investigates, for `REJECTED_KEPT` (it may hold a live token).
                    let aside = self.dir.join(format!("{name}{REJECTED}"));
                    let moved = fs::rename(&path, &aside).is_ok();
                    warnings.push(format!(
                        "session file {} {why}; {}",
                        path.display(),
                        if moved {
                            format!("moved aside to {} (removed after 12 h)", aside.display())
                        } else {
                            "left in place (cannot move it)".to_owned()
                        }
                    ));
                }
            }
        }
        self.sweep_rejected(SystemTime::now());
        (sessions, warnings)
    }

    /// The regions of the sessions in `state_dir`, read without changing anything (no
    /// directory made, no file moved aside): what `doctor` checks by default.
    pub fn regions(state_dir: &Path) -> Vec<String> {
        let dir = state_dir.join("sessions");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut regions: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|name| {
                let id = name.strip_suffix(SUFFIX)?;
                read_session(&dir.join(&name), id).ok().map(|s| s.region)
            })
            .collect();
        regions.sort();
        regions.dedup();
        regions
    }

    /// Removes the files moved aside more than `REJECTED_KEPT` ago (by their change time,
    /// which a rename sets); returns how many. Called at start and hourly.
    pub fn sweep_rejected(&self, now: SystemTime) -> usize {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let Ok(meta) = fs::symlink_metadata(entry.path()) else {
                continue;
            };
            let name = entry.file_name();
            let changed = UNIX_EPOCH + Duration::from_secs(meta.ctime().max(0) as u64);
            if name.to_string_lossy().ends_with(REJECTED)
                && rejected_expired(changed, now)
                && fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }
}

/// How long an unusable session file is kept aside.
pub const REJECTED_KEPT: Duration = Duration::from_secs(12 * 3600);
const REJECTED: &str = ".rejected";

/// Rule: a file moved aside at `changed` is removed from `REJECTED_KEPT` later on (a token in
/// it has expired by then); one dated in the future (clock stepped back) is kept.
pub fn rejected_expired(changed: SystemTime, now: SystemTime) -> bool {
    now.duration_since(changed)
        .is_ok_and(|age| age >= REJECTED_KEPT)
}

/// Why a file in the sessions directory is not used.
enum Unusable {
    /// Not a private regular file of this agent (a link, a FIFO, someone else's).
    NotOurs(String),
    /// Ours, but it does not parse or is not valid.
    Invalid(String),
}

fn read_session(path: &Path, file_id: &str) -> Result<PersistedSession, Unusable> {
    // O_NONBLOCK: a FIFO planted here must not hang the start.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Unusable::NotOurs(format!("cannot be opened ({e})")))?;
    let meta = f.metadata().map_err(|e| Unusable::NotOurs(e.to_string()))?;
    if !meta.is_file() || meta.uid() != euid() || meta.mode() & 0o077 != 0 {
        return Err(Unusable::NotOurs(format!(
            "is not a private file of this agent (uid {}, mode {:04o})",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    parse_session(f, meta.len(), file_id).map_err(Unusable::Invalid)
}

fn parse_session(f: File, len: u64, file_id: &str) -> Result<PersistedSession, String> {
    if len > MAX_FILE {
        return Err(format!("is {len} bytes, too large to be a session"));
    }
    let mut text = Zeroizing::new(Vec::with_capacity(len as usize));
    io::Read::read_to_end(&mut io::Read::take(f, MAX_FILE), &mut text)
        .map_err(|e| e.to_string())?;
    // The error's position only: its text could quote a value.
    let file: FileV1<String> = serde_json::from_slice(&text).map_err(|e| {
        format!(
            "does not parse ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        )
    })?;
    // Wrap the tokens at once so they are wiped whatever happens next.
    let access_token = Secret::new(file.access_token);
    let client_token = Secret::new(file.client_token);
    if file.version != 1 {
        return Err(format!("has version {}, this agent reads 1", file.version));
    }
    let s = PersistedSession {
        file_id: file_id.to_owned(),
        thing: file.thing,
        region: file.region,
        services: file.services,
        access_token,
        client_token,
        first_connected: file.first_connected_unix.map(|unix_secs| Moment {
            unix_secs,
            boot_id: file.boot_id,
            uptime_ms: file.first_connected_uptime_ms,
        }),
        received: file.received.map(Moment::from),
    };
    validate(&s)?;
    Ok(s)
}

/// Rule: a persisted session is used only if it is as valid as a notify would have to be.
fn validate(s: &PersistedSession) -> Result<(), String> {
    use crate::protocol::{
        access_token_problem, is_valid_client_token, is_valid_region, is_valid_service_id,
    };
    if !is_valid_service_id(&s.thing) {
        return Err("names an invalid thing".into());
    }
    if !is_valid_region(&s.region) {
        return Err("names an invalid region".into());
    }
    if !(1..=3).contains(&s.services.len()) || !s.services.iter().all(|x| is_valid_service_id(x)) {
        return Err("lists invalid services".into());
    }
    if let Some(p) = access_token_problem(s.access_token.expose()) {
        return Err(format!("holds an unusable access token ({p})"));
    }
    if !is_valid_client_token(s.client_token.expose()) {
        return Err("holds an invalid client token".into());
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> PersistedSession {
        PersistedSession {
            file_id: id.to_owned(),
            thing: "gw-1".into(),
            region: "eu-west-1".into(),
            services: vec!["SSH".into(), "HTTP".into()],
            access_token: Secret::new("AQGA-token"),
            client_token: Secret::new(uuid::Uuid::new_v4().to_string()),
            first_connected: Some(Moment {
                unix_secs: 1_800_000_000,
                boot_id: "b1".into(),
                uptime_ms: 5000,
            }),
            received: Some(Moment {
                unix_secs: 1_799_999_990,
                boot_id: "b1".into(),
                uptime_ms: 100,
            }),
        }
    }

    #[test]
    fn a_saved_session_loads_back_and_leaves_with_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path()).unwrap();
        let s = session(&SessionStore::new_id());
        store.save(&s).unwrap();
        let (loaded, warnings) = store.load();
        assert_eq!(loaded, vec![s.clone()]);
        assert!(warnings.is_empty(), "{warnings:?}");
        let meta = fs::metadata(store.path(&s.file_id)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let dmeta = fs::metadata(dir.path().join("sessions")).unwrap();
        assert_eq!(dmeta.mode() & 0o777, 0o700);
        store.remove(&s.file_id).unwrap();
        assert!(store.load().0.is_empty());
        store.remove(&s.file_id).unwrap();
    }

    #[test]
    fn regions_are_read_without_touching_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(SessionStore::regions(dir.path()).is_empty());
        assert!(!dir.path().join("sessions").exists(), "nothing made");
        let store = SessionStore::open(dir.path()).unwrap();
        for region in ["eu-west-1", "us-east-1", "eu-west-1"] {
            let mut s = session(&SessionStore::new_id());
            s.region = region.into();
            store.save(&s).unwrap();
        }
        let junk = dir.path().join("sessions").join("junk.session.json");
        fs::write(&junk, "{").unwrap();
        fs::set_permissions(&junk, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            SessionStore::regions(dir.path()),
            ["eu-west-1", "us-east-1"]
        );
        assert!(junk.exists(), "an unusable file stays where it is");
    }

    #[test]
    fn a_corrupt_or_foreign_file_is_moved_aside_never_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path()).unwrap();
        let good = session("good");
        store.save(&good).unwrap();
        fs::write(store.path("garbage"), "{not json").unwrap();
        fs::set_permissions(store.path("garbage"), fs::Permissions::from_mode(0o600)).unwrap();
        // World-readable: someone else may have written or read it.
        store.save(&session("open")).unwrap();
        fs::set_permissions(store.path("open"), fs::Permissions::from_mode(0o644)).unwrap();
        // A symlink is never followed.
        std::os::unix::fs::symlink(store.path("good"), store.path("link")).unwrap();
        let (loaded, warnings) = store.load();
        assert_eq!(loaded, vec![good]);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings.iter().all(|w| !w.contains("AQGA")), "{warnings:?}");
        assert!(store.dir.join(format!("garbage{SUFFIX}.rejected")).exists());
        // Not ours: removed, not kept.
        assert!(
            !store.path("open").exists()
                && !store.dir.join(format!("open{SUFFIX}.rejected")).exists()
        );
        // Moved aside: the next start does not warn again.
        assert!(store.load().1.is_empty());
    }

    #[test]
    fn a_planted_link_is_unlinked_and_its_target_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path()).unwrap();
        // A file the agent may write but must never chmod or move: the link's target.
        let target = dir.path().join("precious");
        fs::write(&target, "keep me").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&target, store.path("planted")).unwrap();
        let (loaded, warnings) = store.load();
        assert!(loaded.is_empty());
        assert!(warnings[0].contains("removed"), "{warnings:?}");
        assert!(
            fs::symlink_metadata(store.path("planted")).is_err(),
            "the link is gone"
        );
        let meta = fs::metadata(&target).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o644, "the target's mode was changed");
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep me");
        assert!(
            fs::read_dir(&store.dir).unwrap().count() == 0,
            "nothing moved aside"
        );
    }

    #[test]
    fn files_moved_aside_are_removed_after_12_hours() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(!rejected_expired(
            t0,
            t0 + REJECTED_KEPT - Duration::from_secs(1)
        ));
        assert!(rejected_expired(t0, t0 + REJECTED_KEPT));
        assert!(
            !rejected_expired(t0, t0 - Duration::from_secs(60)),
            "clock stepped back"
        );
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path()).unwrap();
        fs::write(store.dir.join("x.session.json.rejected"), "AQGA").unwrap();
        fs::write(store.dir.join("y.session.json"), "other").unwrap();
        assert_eq!(store.sweep_rejected(SystemTime::now()), 0, "fresh");
        assert_eq!(store.sweep_rejected(SystemTime::now() + REJECTED_KEPT), 1);
        assert!(!store.dir.join("x.session.json.rejected").exists());
        assert!(store.dir.join("y.session.json").exists());
    }

    #[test]
    fn a_file_of_an_earlier_version_without_its_notify_time_loads() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path()).unwrap();
        let mut s = session("old");
        s.received = None;
        store.save(&s).unwrap();
        let text = fs::read_to_string(store.path("old")).unwrap();
        assert!(text.contains("\"received\":null"), "{text}");
        let without = text.replace(",\"received\":null", "");
        fs::write(store.path("old"), without).unwrap();
        assert_eq!(store.load().0, vec![s]);
    }

    #[test]
    fn an_invalid_session_is_refused_like_a_bad_notify() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path()).unwrap();
        let mut s = session("bad");
        s.client_token = Secret::new("short");
        store.save(&s).unwrap();
        let (loaded, warnings) = store.load();
        assert!(loaded.is_empty());
        assert!(warnings[0].contains("client token"), "{warnings:?}");
    }

    #[test]
    fn a_state_dir_owned_by_someone_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = euid() + 1;
        let err = SessionStore::open_as(dir.path(), other).err().unwrap();
        assert!(
            matches!(err, StoreError::Foreign { me, .. } if me == other),
            "{err}"
        );
        assert!(err.to_string().contains("state_dir"), "{err}");
    }

    #[test]
    fn the_file_never_holds_a_token_after_remove_and_temp_files_do_not_survive() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path()).unwrap();
        fs::write(store.dir.join(".x.tmp-1"), "partial").unwrap();
        let (loaded, warnings) = store.load();
        assert!(loaded.is_empty() && warnings.is_empty());
        assert!(!store.dir.join(".x.tmp-1").exists());
    }

    #[test]
    fn elapsed_time_since_a_first_connect_survives_clock_jumps_and_reboots() {
        let at = |unix_secs, boot: &str, uptime_ms| Moment {
            unix_secs,
            boot_id: boot.into(),
            uptime_ms,
        };
        let first = at(1000, "b1", 10_000);
        // Same boot: the time since boot decides, whatever the wall clock did (NTP step).
        assert_eq!(
            first.elapsed_until(&at(999_999, "b1", 70_000)),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            first.elapsed_until(&at(5, "b1", 70_000)),
            Some(Duration::from_secs(60))
        );
        // Another boot: the wall clock, when plausible.
        assert_eq!(
            first.elapsed_until(&at(1600, "b2", 1)),
            Some(Duration::from_secs(600))
        );
        assert_eq!(first.elapsed_until(&at(500, "b2", 1)), None, "clock behind");
        assert_eq!(
            first.elapsed_until(&at(1000 + 13 * 3600, "b2", 1)),
            None,
            "beyond any tunnel's lifetime: the clock was unset"
        );
        let now = Moment::now();
        assert!(!now.boot_id.is_empty() && now.uptime_ms > 0);
        // A notify's arrival counts across any reboot gap (its clock was right), not back.
        assert_eq!(
            first.since_notify(&at(1000 + 13 * 3600, "b2", 1)),
            Some(Duration::from_secs(13 * 3600))
        );
        assert_eq!(
            first.since_notify(&at(500, "b2", 1)),
            None,
            "clock unset again"
        );
        assert_eq!(
            first.since_notify(&at(5, "b1", 70_000)),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn turning_persistence_off_removes_the_files_that_hold_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path()).unwrap();
        store.save(&session("a")).unwrap();
        std::fs::write(store.dir.join("x.session.json.rejected"), "t").unwrap();
        SessionStore::clear(dir.path());
        assert_eq!(std::fs::read_dir(&store.dir).unwrap().count(), 0);
    }
}

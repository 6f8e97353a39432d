use super::*;

fn names(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

#[test]
fn only_a_regular_file_grants() {
    assert!(grants(&Reading::Present));
    for r in [
        Reading::Absent,
        Reading::NoDirectory,
        Reading::Symlink,
        Reading::NotAFile,
        Reading::Unreadable("denied".into()),
    ] {
        assert!(!grants(&r), "{r:?}");
    }
}

#[test]
fn consent_covers_every_service_unless_it_lists_some() {
    assert!(covers(&[], "HTTP"));
    let ssh = names(&["SSH"]);
    assert!(covers(&ssh, "SSH"));
    assert!(!covers(&ssh, "HTTP"));
}

#[test]
fn without_consent_only_services_it_does_not_cover_are_admitted() {
    let ssh = names(&["SSH"]);
    assert!(!admits(false, &ssh, "SSH"));
    assert!(admits(false, &ssh, "HTTP"));
    assert!(admits(true, &ssh, "SSH"));
    assert!(!admits(false, &[], "HTTP"));
}

#[test]
fn a_tunnel_awaits_consent_only_when_it_covers_all_its_services() {
    let ssh = names(&["SSH"]);
    assert!(!may_connect(false, &ssh, &names(&["SSH"])));
    assert!(may_connect(false, &ssh, &names(&["SSH", "HTTP"])));
    assert!(!may_connect(false, &[], &names(&["SSH", "HTTP"])));
    assert!(may_connect(true, &[], &names(&["SSH"])));
}

#[test]
fn the_state_is_always_granted_or_withheld() {
    assert_eq!(state_name(&Gate::always()), "always");
    let (tx, rx) = watch::channel(false);
    let gate = Gate::new(rx, &[]);
    assert_eq!(state_name(&gate), "withheld");
    tx.send_replace(true);
    assert_eq!(state_name(&gate), "granted");
}

#[test]
fn the_nearest_existing_directory_leads_to_the_file() {
    let dir = std::env::temp_dir();
    let path = dir.join("consent-nearest-x/y/allow");
    assert_eq!(
        nearest_existing(&path),
        Some((dir.clone(), "consent-nearest-x".into()))
    );
    assert_eq!(
        nearest_existing(&dir.join("allow")),
        Some((dir, "allow".into()))
    );
}

#[test]
fn a_link_a_directory_and_a_missing_directory_are_read_as_such() {
    let dir = tempdir("read");
    let file = dir.join("allow");
    assert_eq!(reading_of(&file), Reading::Absent);
    assert_eq!(reading_of(&dir.join("no/allow")), Reading::NoDirectory);
    std::fs::write(dir.join("target"), "").unwrap();
    std::os::unix::fs::symlink(dir.join("target"), &file).unwrap();
    assert_eq!(reading_of(&file), Reading::Symlink);
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    assert_eq!(reading_of(&file), Reading::NotAFile);
    std::fs::remove_dir(&file).unwrap();
    std::fs::write(&file, "").unwrap();
    assert_eq!(reading_of(&file), Reading::Present);
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "consent-{tag}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits (bounded) until the gate's consent is `want`.
async fn until(gate: &mut Gate, want: bool) {
    let wait = async {
        while gate.admits("SSH") != want {
            gate.changed().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("consent never became {want}"));
}

#[tokio::test]
async fn the_watcher_follows_the_file_through_a_missing_directory() {
    let root = tempdir("watch");
    let path = root.join("a/b/allow");
    let watcher = Watcher::start(path.clone()).unwrap();
    let mut gate = watcher.gate(&[]);
    assert!(!gate.admits("SSH"));
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::write(&path, "").unwrap();
    until(&mut gate, true).await;
    std::fs::remove_file(&path).unwrap();
    until(&mut gate, false).await;
    std::fs::write(&path, "").unwrap();
    until(&mut gate, true).await;
    // The directory goes with the file: withheld, and followed when it comes back.
    std::fs::remove_dir_all(root.join("a")).unwrap();
    until(&mut gate, false).await;
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::write(&path, "").unwrap();
    until(&mut gate, true).await;
    std::fs::remove_dir_all(root).unwrap();
}

#[tokio::test]
async fn a_symbolic_link_never_grants() {
    let root = tempdir("link");
    let path = root.join("allow");
    std::fs::write(root.join("target"), "").unwrap();
    std::os::unix::fs::symlink(root.join("target"), &path).unwrap();
    let watcher = Watcher::start(path.clone()).unwrap();
    let mut gate = watcher.gate(&[]);
    assert!(!gate.admits("SSH"), "a link at start grants nothing");
    std::fs::write(root.join("file"), "").unwrap();
    std::fs::rename(root.join("file"), &path).unwrap();
    until(&mut gate, true).await;
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(root.join("target"), &path).unwrap();
    until(&mut gate, false).await;
    std::fs::remove_dir_all(root).unwrap();
}

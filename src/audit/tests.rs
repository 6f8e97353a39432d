use super::*;

#[test]
fn every_kind_has_the_same_name_in_the_journal_and_the_json() {
    for k in Kind::ALL {
        assert_eq!(serde_json::to_value(k).unwrap(), k.as_str(), "{k:?}");
    }
    for e in End::ALL {
        assert_eq!(serde_json::to_value(e).unwrap(), e.as_str(), "{e:?}");
    }
}

#[test]
fn an_event_leaves_out_what_it_does_not_know_and_cuts_its_reason() {
    let e = Event::new(Kind::NotifyRefused, "gw-1").because(&"x".repeat(500));
    let v = serde_json::to_value(&e).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["event", "reason", "thing", "time"]);
    assert_eq!(v["reason"].as_str().unwrap().len(), MAX_REASON_CHARS);
    assert!(v["time"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn the_first_end_of_a_connection_is_the_one_recorded() {
    let cell = EndCell::default();
    assert_eq!(cell.get_or(End::Reset), End::Reset);
    cell.set(End::Consent);
    cell.set(End::TunnelEnded);
    assert_eq!(cell.get_or(End::Reset), End::Consent);
}

#[test]
fn a_tunnels_events_carry_its_thing_token_hash_and_channel() {
    let t = Trail::default()
        .tunnel("plc-1", "token:0badf00d".into())
        .with_channel(Some("ch-9"));
    let e = t.event(Kind::ConnectionOpened);
    assert_eq!(e.thing, "plc-1");
    assert_eq!(e.tunnel.as_deref(), Some("token:0badf00d"));
    assert_eq!(e.channel.as_deref(), Some("ch-9"));
    assert!(!t.is_on());
}

#[test]
fn audit_topics_are_ones_aws_iot_takes_for_a_publish() {
    assert_eq!(topic_problem("sites/plant-7/audit"), None);
    assert_eq!(topic_problem("$aws/rules/audit_to_s3/gw-1"), None);
    assert!(topic_problem("").is_some());
    assert!(topic_problem(&"a".repeat(257)).is_some());
    assert!(topic_problem("audit/#").is_some());
    assert!(topic_problem("audit/+/x").is_some());
    assert!(topic_problem("$aws/things/gw/audit").is_some());
    assert!(topic_problem("a/b/c/d/e/f/g/h/i").is_some());
    assert_eq!(topic_problem("$aws/rules/r/a/b/c/d/e/f/g/h"), None);
    assert!(policy_statement("sites/audit").contains("topic/sites/audit"));
}

#[test]
fn a_file_is_rotated_before_a_line_would_take_it_past_its_bound() {
    assert!(!must_rotate(0, 5000, 1024));
    assert!(!must_rotate(1000, 24, 1024));
    assert!(must_rotate(1000, 25, 1024));
}

#[tokio::test]
async fn the_files_never_hold_more_than_their_bound() {
    let dir = std::env::temp_dir().join(format!(
        "audit-rotate-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let bound = FileBound {
        size: 4096,
        files: 3,
    };
    let sink = FileSink::start(&dir, bound).unwrap();
    let trail = Trail::new(Some(sink), None);
    for i in 0..200 {
        trail.record(&Event::new(Kind::ConnectionOpened, &format!("thing-{i}")));
    }
    trail.flush(std::time::Duration::from_secs(5)).await;
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]);
    let mut lines = 0;
    for n in &names {
        let text = std::fs::read_to_string(dir.join(n)).unwrap();
        assert!(text.len() as u64 <= bound.size, "{n}: {}", text.len());
        for l in text.lines() {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
            lines += 1;
        }
    }
    // The newest survive: the last event is in the current file.
    let current = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    assert!(current.contains("\"thing-199\""));
    assert!(lines < 200 && lines > 40, "{lines}");
    assert_eq!(trail.dropped(), (0, 0));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_event_the_mqtt_queue_has_no_room_for_is_dropped_and_counted() {
    let (tx, mut rx) = mpsc::channel(1);
    let trail = Trail::new(None, Some(tx));
    let e = Event::new(Kind::ConsentGranted, "gw-1");
    trail.record(&e);
    trail.record(&e);
    assert_eq!(trail.dropped(), (0, 1));
    let line = rx.try_recv().unwrap();
    assert!(line.contains("\"consent_granted\""), "{line}");
    assert_eq!(Trail::default().dropped(), (0, 0));
}

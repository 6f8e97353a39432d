use super::*;

const MIN: &str = r#"
    thing_name = "gw-1"
    [mqtt]
    endpoint = "a1b2c3-ats.iot.eu-west-1.amazonaws.com"
    cert = "/etc/x/cert.pem"
    key = "/etc/x/key.pem"
    [services]
    SSH = 22
"#;

fn parse_str(s: &str) -> Result<Config, ConfigErrors> {
    parse(s, Path::new("agent.toml"))
}

#[test]
fn downstream_things_are_validated_by_key() {
    let c = parse_str(&format!(
        "{MIN}\n[things.PLC-42]\nmax_tunnels = 2\n[things.PLC-42.services]\nHTTP = \"10.0.0.42:80\"\n[things.cam-7.services]\nRTSP = \"10.0.0.57:554\"\n"
    ))
    .unwrap();
    assert_eq!(c.things.len(), 2);
    assert_eq!(c.things["PLC-42"].max_tunnels, Some(2));
    assert!(c.things["cam-7"].services.named().any(|(s, _)| s == "RTSP"));
    for (bad, key) in [
        ("[things.gw-1.services]\nSSH = 22", "things.\"gw-1\""),
        (
            "[things.\"bad name\".services]\nSSH = 22",
            "things.\"bad name\"",
        ),
        (
            "[things.PLC-1]\nmax_tunnels = 0\n[things.PLC-1.services]\nSSH = 22",
            "things.\"PLC-1\".max_tunnels",
        ),
        ("[things.PLC-1.services]", "things.\"PLC-1\".services"),
    ] {
        let e = parse_str(&format!("{MIN}\n{bad}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{key}: {e}");
    }
    let many: String = (0..50)
        .map(|i| format!("[things.t{i}.services]\nSSH = 22\n"))
        .collect();
    let e = parse_str(&format!("{MIN}\n{many}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("50 subscriptions per MQTT connection"), "{e}");
    let ok: String = (0..49)
        .map(|i| format!("[things.t{i}.services]\nSSH = 22\n"))
        .collect();
    assert_eq!(parse_str(&format!("{MIN}\n{ok}")).unwrap().things.len(), 49);
}

#[test]
fn a_proxy_url_is_refused_by_key_without_quoting_its_password() {
    let with = |proxy: &str| format!("{MIN}\n[proxy]\n{proxy}\n");
    let c = parse_str(&with(
        r#"url = "http://op:pw-1@proxy:3128"
        no_proxy = ["localhost"]"#,
    ))
    .unwrap();
    let p = c.proxy.unwrap();
    assert_eq!(p.proxy.to_string(), "http://op@proxy:3128");
    assert_eq!(p.no_proxy, vec!["localhost".to_owned()]);
    for (bad, why) in [
        (r#"url = "https://op:pw-1@proxy:3128""#, "https:// proxies"),
        (r#"url = "http://op:pw-1@proxy:0""#, "port"),
        (r#"no_proxy = ["x"]"#, "is missing"),
        (r#"url = "http://op:pw-1""#, "port"),
    ] {
        let e = parse_str(&with(bad)).unwrap_err().to_string();
        assert!(e.contains("proxy.url") && e.contains(why), "{e}");
        assert!(!e.contains("pw-1"), "{e}");
    }
    assert!(parse_str(MIN).unwrap().proxy.is_none());
}

#[test]
fn defaults_are_named_and_applied() {
    let c = parse_str(MIN).unwrap();
    assert_eq!(c.tunnel.stall_timeout, Duration::from_secs(5));
    assert_eq!(c.mqtt.port, 8883);
    assert_eq!(c.mqtt.client_id, "gw-1");
    assert_eq!(c.limits.max_tunnels, 10);
    assert_eq!(c.limits.max_lifetime, Duration::from_secs(720 * 60));
    assert_eq!(c.rotation, RotationPolicy::Replace);
    assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(c.notify_topic(), "$aws/things/gw-1/tunnels/notify");
}

#[test]
fn tunnel_resolve_replaces_dns_for_a_data_plane_host_and_keeps_its_port() {
    let c = parse_str(&format!(
        "{MIN}\n[tunnel]\nresolve = {{ \"Data.Tunneling.IoT.us-east-1.amazonaws.com\" = \"10.0.0.5\", \"other\" = \"[fd00::5]:8443\" }}\n"
    ))
    .unwrap();
    let ep = DataEndpoint::for_region("us-east-1");
    assert_eq!(
        resolve_override(&c.tunnel.resolve, &ep),
        Some("10.0.0.5:443".parse().unwrap())
    );
    let other = DataEndpoint::parse_override("other:9000").unwrap();
    assert_eq!(
        resolve_override(&c.tunnel.resolve, &other),
        Some("[fd00::5]:8443".parse().unwrap())
    );
    assert_eq!(
        resolve_override(&c.tunnel.resolve, &DataEndpoint::for_region("eu-west-1")),
        None
    );
    let e = parse_str(&format!(
        "{MIN}\n[tunnel]\nresolve = {{ \"h\" = \"not-an-ip\" }}\n"
    ))
    .unwrap_err();
    assert_eq!(e.0[0].key, "tunnel.resolve.\"h\"");
}

#[test]
fn port_443_offers_the_amazon_mqtt_alpn_unless_configured() {
    assert_eq!(mqtt_alpn(443, None).as_deref(), Some("x-amzn-mqtt-ca"));
    assert_eq!(mqtt_alpn(8883, None), None);
    assert_eq!(mqtt_alpn(443, Some("mqtt")).as_deref(), Some("mqtt"));
    assert_eq!(mqtt_alpn(443, Some("")), None);
    assert_eq!(mqtt_alpn(8883, Some("x")).as_deref(), Some("x"));
    let c = parse_str(&MIN.replace("[services]", "port = 443\n[services]")).unwrap();
    assert_eq!(c.mqtt.alpn.as_deref(), Some("x-amzn-mqtt-ca"));
}

#[test]
fn notify_topic_can_be_remapped_but_not_to_a_wildcard() {
    let c = parse_str(&MIN.replace(
        "[services]",
        "notify_topic = \"local/gw-1/notify\"\n[services]",
    ))
    .unwrap();
    assert_eq!(c.notify_topic(), "local/gw-1/notify");
    let e = parse_str(&MIN.replace(
        "[services]",
        "notify_topic = \"local/+/notify\"\n[services]",
    ))
    .unwrap_err();
    assert_eq!(e.0[0].key, "mqtt.notify_topic");
}

#[test]
fn unknown_keys_are_rejected_with_their_name_and_line() {
    let e = parse_str(&format!("{MIN}\n[limits]\nmax_tunels = 3\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_tunels") && e.contains("line"), "{e}");
}

#[test]
fn each_invalid_value_names_key_problem_and_fix() {
    let bad = MIN.replace("gw-1", "gw 1").replace(
        "a1b2c3-ats.iot.eu-west-1.amazonaws.com",
        "mqtts://host:8883",
    ) + "[limits]\nmax_lifetime_minutes = 721\nmax_tunnels = 0\n";
    let e = parse_str(&bad).unwrap_err();
    let keys: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "thing_name",
            "mqtt.endpoint",
            "limits.max_tunnels",
            "limits.max_lifetime_minutes"
        ]
    );
    assert!(e.0.iter().all(|e| !e.fix.is_empty()));
}

#[test]
fn a_bad_service_mapping_names_the_service() {
    let e = parse_str(&MIN.replace("SSH = 22", "SSH = 70000"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("SSH") && e.contains("70000"), "{e}");
}

#[test]
fn rotation_policy_parallel_is_opt_in() {
    let c = parse_str(&format!("{MIN}\n[rotation]\npolicy = \"parallel\"\n")).unwrap();
    assert_eq!(c.rotation, RotationPolicy::Parallel);
    assert!(parse_str(&format!("{MIN}\n[rotation]\npolicy = \"both\"\n")).is_err());
}

/// Every example file in config/ parses, so the documentation cannot drift from the code.
#[test]
fn every_example_in_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        match path.file_name().and_then(|n| n.to_str()) {
            Some("services.toml") => {
                let map = ServiceMap::from_toml_str(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(map.named().count(), 5);
            }
            Some("agent.toml") => {
                // As shipped the thing name is commented out (the service stays idle);
                // an operator uncomments it.
                let err = parse(&text, &path).unwrap_err().to_string();
                assert!(err.contains("thing_name"), "{err}");
                let text = text.replace("# thing_name =", "thing_name =");
                let cfg = parse(&text, &path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(cfg.thing_name, "gateway-01");
                assert_eq!(cfg.mqtt.port, 8883);
            }
            other => panic!("no check for config/{other:?}: add one"),
        }
        checked += 1;
    }
    assert_eq!(checked, 2, "an example in config/ is missing");
}

#[test]
fn limits_that_would_not_fit_the_units_ceilings_are_refused() {
    let l = AgentLimits {
        max_tunnels: 10,
        max_connections_per_tunnel: 128,
        max_lifetime: Duration::ZERO,
        max_buffered: 8 << 20,
    };
    let (fds, memory) = resource_needs(&l);
    assert!(
        fds <= UNIT_LIMIT_NOFILE && memory <= UNIT_MEMORY_MAX,
        "defaults fit"
    );
    let e = parse_str(&format!(
        "{MIN}\n[limits]\nmax_tunnels = 100\nmax_connections_per_tunnel = 1024\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("LimitNOFILE") && e.contains("MemoryMax"), "{e}");
    assert!(
        e.contains("limits.max_tunnels x limits.max_connections_per_tunnel"),
        "{e}"
    );
}

#[test]
fn the_units_ceilings_are_the_ones_checked() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd/securetunnel-agent.service"),
    )
    .unwrap();
    assert!(
        unit.contains(&format!("\nLimitNOFILE={UNIT_LIMIT_NOFILE}\n")),
        "{unit}"
    );
    assert!(
        unit.contains(&format!("\nMemoryMax={}M\n", UNIT_MEMORY_MAX >> 20)),
        "{unit}"
    );
}

#[test]
fn the_runtime_directory_is_under_run_or_var_run() {
    assert_eq!(
        default_runtime_dir(true),
        Path::new("/run/securetunnel-agent")
    );
    assert_eq!(
        default_runtime_dir(false),
        Path::new("/var/run/securetunnel-agent")
    );
}

/// `MIN` with `[mqtt]`'s cert and key lines replaced by `mqtt`.
fn with_key(mqtt: &str) -> Result<Config, ConfigErrors> {
    let text = MIN.replace(
        "    cert = \"/etc/x/cert.pem\"\n    key = \"/etc/x/key.pem\"\n",
        &format!("{mqtt}\n"),
    );
    parse_str(&text)
}

fn keys_of(e: ConfigErrors) -> Vec<String> {
    e.0.into_iter().map(|e| e.key).collect()
}

#[test]
fn a_key_file_needs_its_certificate_and_no_token_settings() {
    let e = with_key("key = \"/k.pem\"\npkcs11_module = \"/m.so\"").unwrap_err();
    assert_eq!(keys_of(e), ["mqtt.cert", "mqtt.pkcs11_module"]);
    let c = with_key("key = \"/k.pem\"\ncert = \"/c.pem\"").unwrap();
    assert_eq!(c.mqtt.key, DeviceKey::File("/k.pem".into()));
}

#[cfg(feature = "pkcs11")]
#[test]
fn a_token_key_takes_its_module_and_pin_file_from_the_settings_or_the_uri() {
    let c = with_key("key = \"pkcs11:token=gw;object=dev?module-path=/m.so&pin-source=file:/pin\"")
        .unwrap();
    let DeviceKey::Token(k) = &c.mqtt.key else {
        panic!("{:?}", c.mqtt.key)
    };
    assert_eq!(
        (k.module.to_str(), k.pin_file.to_str()),
        (Some("/m.so"), Some("/pin"))
    );
    assert_eq!(c.mqtt.cert, None);
    let c = with_key(
        "key = \"pkcs11:object=dev\"\npkcs11_module = \"/m.so\"\npkcs11_pin_file = \"/pin\"",
    )
    .unwrap();
    assert!(matches!(c.mqtt.key, DeviceKey::Token(_)));
}

#[cfg(feature = "pkcs11")]
#[test]
fn a_token_key_without_a_module_or_pin_file_or_with_two_is_refused() {
    let e = with_key("key = \"pkcs11:object=dev\"").unwrap_err();
    assert_eq!(keys_of(e), ["mqtt.pkcs11_module", "mqtt.pkcs11_pin_file"]);
    let e = with_key(
        "key = \"pkcs11:object=dev?module-path=/a.so\"\npkcs11_module = \"/b.so\"\npkcs11_pin_file = \"pin\"",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("differ"), "{e}");
    assert!(
        e.contains("pkcs11_pin_file: pin is not an absolute path"),
        "{e}"
    );
    let e = with_key("key = \"pkcs11:token=gw\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("names no key"), "{e}");
}

#[test]
fn the_shadow_is_off_unless_enabled_and_its_table_takes_no_other_key() {
    assert!(!parse_str(MIN).unwrap().shadow);
    assert!(
        parse_str(&format!("{MIN}\n[shadow]\nenabled = true\n"))
            .unwrap()
            .shadow
    );
    let e = parse_str(&format!("{MIN}\n[shadow]\nenable = true\n")).unwrap_err();
    assert!(e.to_string().contains("enable"), "{e}");
}

#[test]
fn consent_is_always_unless_a_file_mode_names_its_path_and_services() {
    assert_eq!(parse_str(MIN).unwrap().consent, None);
    let c = parse_str(&format!("{MIN}\n[consent]\nmode = \"file\"\n")).unwrap();
    let s = c.consent.unwrap();
    assert_eq!(s.path, c.runtime_dir.join("allow"));
    assert!(s.services.is_empty());
    let c = parse_str(&format!(
        "{MIN}\n[consent]\nmode = \"file\"\npath = \"/run/keyswitch/on\"\nservices = [\"SSH\"]\n"
    ))
    .unwrap();
    let s = c.consent.unwrap();
    assert_eq!(
        (s.path.to_str(), s.services),
        (Some("/run/keyswitch/on"), vec!["SSH".to_owned()])
    );
}

#[test]
fn consent_keys_that_would_not_do_what_they_say_are_refused_by_name() {
    let bad = |body: &str| {
        parse_str(&format!("{MIN}\n[consent]\n{body}\n"))
            .unwrap_err()
            .to_string()
    };
    let e = bad("mode = \"switch\"");
    assert!(
        e.contains("consent.mode") && e.contains("\"switch\""),
        "{e}"
    );
    let e = bad("path = \"/run/x/allow\"");
    assert!(
        e.contains("consent.path") && e.contains("is set but consent.mode"),
        "{e}"
    );
    let e = bad("mode = \"file\"\npath = \"allow\"");
    assert!(
        e.contains("consent.path") && e.contains("not an absolute path"),
        "{e}"
    );
    // A misspelt service would leave the one meant open.
    let e = bad("mode = \"file\"\nservices = [\"ssh\"]");
    assert!(
        e.contains("consent.services") && e.contains("\"ssh\"") && e.contains("SSH"),
        "{e}"
    );
    let e = bad("mode = \"file\"\nservices = []");
    assert!(e.contains("consent.services") && e.contains("empty"), "{e}");
}

#[test]
fn the_audit_file_is_2_x_1_mib_unless_set_and_its_keys_are_checked_by_name() {
    let a = parse_str(MIN).unwrap().audit;
    assert_eq!(a.file.map(|b| (b.size, b.files)), Some((1024 * 1024, 2)));
    assert_eq!(a.mqtt_topic, None);
    let c = parse_str(&format!(
        "{MIN}\n[audit]\nfile_size_kib = 64\nfiles = 3\nmqtt_topic = \"$aws/rules/audit/gw-1\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.audit.file.map(|b| (b.size, b.files)),
        Some((64 * 1024, 3))
    );
    assert_eq!(c.audit.mqtt_topic.as_deref(), Some("$aws/rules/audit/gw-1"));
    assert_eq!(
        parse_str(&format!("{MIN}\n[audit]\nfile = false\n"))
            .unwrap()
            .audit
            .file,
        None
    );
    let bad = |body: &str| {
        parse_str(&format!("{MIN}\n[audit]\n{body}\n"))
            .unwrap_err()
            .to_string()
    };
    let e = bad("file_size_kib = 4");
    assert!(
        e.contains("audit.file_size_kib") && e.contains("16-65536"),
        "{e}"
    );
    let e = bad("files = 0");
    assert!(e.contains("audit.files"), "{e}");
    let e = bad("mqtt_topic = \"audit/#\"");
    assert!(
        e.contains("audit.mqtt_topic") && e.contains("wildcard"),
        "{e}"
    );
}

//! Every example file in config/ parses, so the documentation cannot drift from the code.

use securetunnel_agent::config;
use securetunnel_agent::services::ServiceMap;

#[test]
fn every_example_in_config_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
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
                // As shipped the thing name is commented out (the service stays idle); an
                // operator uncomments it.
                let err = config::parse(&text, &path).unwrap_err().to_string();
                assert!(err.contains("thing_name"), "{err}");
                let text = text.replace("# thing_name =", "thing_name =");
                let cfg = config::parse(&text, &path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(cfg.thing_name, "gateway-01");
                assert_eq!(cfg.mqtt.port, 8883);
            }
            other => panic!("no check for config/{other:?}: add one"),
        }
        checked += 1;
    }
    assert_eq!(checked, 2, "an example in config/ is missing");
}

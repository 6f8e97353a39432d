//! Every example file in config/ parses, so the documentation cannot drift from the code.

use securetunnel_agent::config;
use securetunnel_agent::services::ServiceMap;

#[test]
fn every_example_in_config_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().and_then(|n| n.to_str()) == Some("services.toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let map = ServiceMap::from_toml_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(map.named().count(), 5);
            checked += 1;
        }
    }
    assert_eq!(checked, 1, "config/services.toml is missing");
}

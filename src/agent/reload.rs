//! SIGHUP: a new service map for new streams, and downstream things added or removed; live
//! tunnels and connections stay. Other settings take effect at the next restart.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{info, warn};

use super::Agent;
use super::start::thing_caps;
use crate::config::{Config, ThingConfig};
use crate::services::SharedServiceMap;
use crate::systemd;

/// Rule (reload): the settings that differ between two configurations and take effect
/// only at a restart (everything but `[services]` and `[things]`), compared by value.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    // Every field named: a new setting does not compile until it is placed here.
    let Config {
        path: _,
        thing_name,
        mqtt,
        tunnel,
        services: _,
        limits,
        rotation,
        state_dir,
        runtime_dir,
        upgrade_deadline,
        proxy,
        things: _,
        shadow,
        consent,
        audit,
    } = new;
    [
        ("thing_name", *thing_name != old.thing_name),
        ("mqtt", *mqtt != old.mqtt),
        ("tunnel", *tunnel != old.tunnel),
        ("limits", *limits != old.limits),
        ("rotation", *rotation != old.rotation),
        ("state_dir", *state_dir != old.state_dir),
        ("runtime_dir", *runtime_dir != old.runtime_dir),
        (
            "upgrade_deadline",
            *upgrade_deadline != old.upgrade_deadline,
        ),
        ("proxy", *proxy != old.proxy),
        ("shadow", *shadow != old.shadow),
        ("consent", *consent != old.consent),
        ("audit", *audit != old.audit),
    ]
    .into_iter()
    .filter_map(|(k, changed)| changed.then_some(k))
    .collect()
}

impl Agent {
    pub(super) fn reload(&mut self) {
        systemd::reloading();
        match crate::config::load(&self.cfg.path) {
            Ok(new) => self.apply(new),
            // One line per problem would split the record in journald: join them.
            Err(e) => warn!(
                "reload failed, keeping the current service map: {}",
                e.to_string().trim().replace('\n', "; ")
            ),
        }
        self.write_status();
    }

    fn apply(&mut self, new: Config) {
        let restart_only = restart_only_changes(&self.cfg, &new);
        if !restart_only.is_empty() {
            warn!(changed = ?restart_only, "these settings take effect at the next restart; only [services] and [things] are reloaded");
        }
        let summary: Vec<String> = new
            .services
            .named()
            .map(|(s, e)| format!("{s} -> {e}"))
            .collect();
        if let Some((tx, _)) = self.maps.get(&self.cfg.thing_name) {
            tx.send_replace(Arc::new(new.services.clone()));
        }
        self.cfg.services = new.services;
        self.reload_things(new.things);
        info!(services = ?summary, "service map reloaded; live tunnels keep running");
    }

    /// Downstream things added (mapped, subscribed), changed (new map for new streams; live
    /// tunnels stay) or removed (unsubscribed; their tunnels stop).
    fn reload_things(&mut self, things: BTreeMap<String, ThingConfig>) {
        let own = self.cfg.thing_name.clone();
        let removed: Vec<String> = self
            .maps
            .keys()
            .filter(|name| **name != own && !things.contains_key(*name))
            .cloned()
            .collect();
        for name in &removed {
            self.maps.remove(name);
            let stops = self.lifecycle.thing_removed(name);
            info!(thing = %name, bridges = stops.len(), "downstream thing removed: unsubscribing; its tunnels stop");
            for effect in stops {
                if let crate::tunnels::Effect::Stop(id) = effect {
                    self.stop(id);
                }
            }
        }
        for (name, t) in &things {
            match self.maps.get(name) {
                Some((tx, _)) => {
                    tx.send_replace(Arc::new(t.services.clone()));
                }
                None => {
                    info!(thing = %name, "downstream thing added: subscribing to its notifications");
                    self.maps
                        .insert(name.clone(), SharedServiceMap::new(t.services.clone()));
                }
            }
        }
        self.cfg.things = things;
        self.lifecycle.set_thing_caps(thing_caps(&self.cfg));
        self.downstream_tx
            .send_replace(self.cfg.things.keys().cloned().collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A configuration: `top` goes before the first table, `mqtt` into `[mqtt]`, `rest` after.
    fn config(top: &str, mqtt: &str, rest: &str) -> Config {
        let text = format!(
            "thing_name = \"gw-1\"\n{top}\n[mqtt]\nendpoint = \"a1-ats.iot.eu-west-1.amazonaws.com\"\n\
             cert = \"/etc/x/cert.pem\"\nkey = \"/etc/x/key.pem\"\n{mqtt}\n{rest}"
        );
        crate::config::parse(&text, Path::new("agent.toml")).unwrap()
    }

    #[test]
    fn a_reload_names_every_setting_that_waits_for_a_restart_and_only_those() {
        let base = config("", "", "[services]\nSSH = 22");
        assert!(restart_only_changes(&base, &base.clone()).is_empty());
        // The service map and the downstream things are reloaded: not named.
        let reloadable = config(
            "",
            "",
            "[services]\nSSH = 2222\nHTTP = 80\n[things.PLC-1.services]\nMODBUS = 502",
        );
        assert!(restart_only_changes(&base, &reloadable).is_empty());
        let cases = [
            (
                config("", "keep_alive_secs = 60", "[services]\nSSH = 22"),
                "mqtt",
            ),
            (
                config("", "", "[services]\nSSH = 22\n[limits]\nmax_tunnels = 3"),
                "limits",
            ),
            (
                config(
                    "",
                    "",
                    "[services]\nSSH = 22\n[rotation]\npolicy = \"parallel\"",
                ),
                "rotation",
            ),
            (
                config("state_dir = \"/tmp/elsewhere\"", "", "[services]\nSSH = 22"),
                "state_dir",
            ),
            (
                config("runtime_dir = \"/tmp/run-x\"", "", "[services]\nSSH = 22"),
                "runtime_dir",
            ),
            (
                config("upgrade_deadline_minutes = 5.0", "", "[services]\nSSH = 22"),
                "upgrade_deadline",
            ),
            (
                config(
                    "",
                    "",
                    "[services]\nSSH = 22\n[tunnel]\nstall_timeout_ms = 900",
                ),
                "tunnel",
            ),
            (
                config(
                    "",
                    "",
                    "[services]\nSSH = 22\n[proxy]\nurl = \"http://proxy:3128\"",
                ),
                "proxy",
            ),
        ];
        for (changed, name) in cases {
            assert_eq!(restart_only_changes(&base, &changed), vec![name]);
        }
        let mut renamed = base.clone();
        renamed.thing_name = "gw-2".into();
        assert_eq!(restart_only_changes(&base, &renamed), vec!["thing_name"]);
    }
}

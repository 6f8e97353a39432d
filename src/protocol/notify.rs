//! The notify message: what AWS IoT publishes on a thing's notify topic when a tunnel is
//! opened or its token rotated (docs/protocol.md §5). Parsed tolerantly (unknown fields
//! ignored) but validated before the agent sees it.

use serde::Deserialize;

use super::{is_valid_region, is_valid_service_id};
use crate::secret::Secret;

/// A thing's notify topic.
pub fn notify_topic(thing: &str) -> String {
    format!("$aws/things/{thing}/tunnels/notify")
}

/// A notify that passed validation: a destination token for a region and 1-3 services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The thing whose notify topic carried it.
    pub thing: String,
    /// The destination access token.
    pub token: Secret,
    /// The region whose data plane serves the tunnel.
    pub region: String,
    /// The services the tunnel was opened for (its scope).
    pub services: Vec<String>,
}

/// Why a notify was refused; never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("payload is not UTF-8")]
    /// The payload is not text.
    NotUtf8,
    #[error("payload is not a JSON object: {0}")]
    /// The payload is not a JSON object.
    Json(String),
    #[error("clientMode is {0:?}; this agent only serves \"destination\" tokens")]
    /// A source token: this agent is a destination.
    Mode(String),
    #[error("region {0:?} is not a region name such as us-east-1")]
    /// Not a region name.
    Region(String),
    #[error("clientAccessToken is invalid: {0}")]
    /// The token breaks a rule (length, characters).
    Token(&'static str),
    #[error("{0} services listed; a tunnel has 1 to 3")]
    /// Not 1 to 3 services.
    ServiceCount(usize),
    #[error("service name {0:?} is invalid (1-128 of [a-zA-Z0-9:_-])")]
    /// A service name that is not an identifier.
    ServiceName(String),
}

#[derive(Deserialize)]
struct RawNotify {
    #[serde(rename = "clientAccessToken")]
    token: Option<String>,
    #[serde(rename = "clientMode")]
    mode: Option<String>,
    region: Option<String>,
    services: Option<Vec<String>>,
}

/// Rule (docs/protocol.md §5): what a usable notify looks like.
pub fn parse(thing: &str, payload: &[u8]) -> Result<Notification, Refusal> {
    let text = std::str::from_utf8(payload).map_err(|_| Refusal::NotUtf8)?;
    // A string from the payload as a refusal quotes it: its start, enough to recognise it.
    fn shown(s: &str) -> String {
        s.chars().take(64).collect()
    }
    let raw: RawNotify = serde_json::from_str(text).map_err(|e| Refusal::Json(e.to_string()))?;
    // Wrap the token at once so it is wiped whatever happens next.
    let token = Secret::new(raw.token.unwrap_or_default());
    let mode = raw.mode.unwrap_or_default();
    if mode != "destination" {
        return Err(Refusal::Mode(shown(&mode)));
    }
    let region = raw.region.unwrap_or_default();
    if !is_valid_region(&region) {
        return Err(Refusal::Region(shown(&region)));
    }
    if let Some(problem) = super::access_token_problem(token.expose()) {
        return Err(Refusal::Token(problem));
    }
    let services = raw.services.unwrap_or_default();
    if !(1..=3).contains(&services.len()) {
        return Err(Refusal::ServiceCount(services.len()));
    }
    if let Some(bad) = services.iter().find(|s| !is_valid_service_id(s)) {
        return Err(Refusal::ServiceName(shown(bad)));
    }
    Ok(Notification {
        thing: thing.to_owned(),
        token,
        region,
        services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notify(mode: &str, token: &str, region: &str, services: &str) -> Vec<u8> {
        format!(r#"{{"clientAccessToken":"{token}","clientMode":"{mode}","region":"{region}","services":{services},"extra":1}}"#).into_bytes()
    }

    #[test]
    fn a_valid_notify_parses_and_unknown_fields_are_ignored() {
        let n = parse(
            "gw",
            &notify("destination", "AQGA", "eu-west-1", r#"["SSH","HTTP"]"#),
        )
        .unwrap();
        assert_eq!(n.region, "eu-west-1");
        assert_eq!(n.services, ["SSH", "HTTP"]);
        assert_eq!(n.token.expose(), "AQGA");
    }

    #[test]
    fn a_refusal_quotes_the_first_64_characters_of_the_bad_value() {
        let long = format!("{}{}", "r".repeat(64), "TAIL");
        let refusal = parse("gw", &notify("destination", "AQGA", &long, r#"["SSH"]"#));
        match refusal {
            Err(Refusal::Region(shown)) => assert_eq!(shown, "r".repeat(64)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_invalid_notify_is_refused_with_its_reason() {
        type Case = (Vec<u8>, fn(&Refusal) -> bool);
        let cases: Vec<Case> = vec![
            (notify("source", "AQGA", "us-east-1", r#"["SSH"]"#), |r| {
                matches!(r, Refusal::Mode(_))
            }),
            (notify("destination", "", "us-east-1", r#"["SSH"]"#), |r| {
                matches!(r, Refusal::Token(_))
            }),
            (
                notify("destination", &"a".repeat(4097), "us-east-1", r#"["SSH"]"#),
                |r| matches!(r, Refusal::Token(_)),
            ),
            (notify("destination", "AQGA", "mars", r#"["SSH"]"#), |r| {
                matches!(r, Refusal::Region(_))
            }),
            (
                notify("destination", "AQGA", "us-east-1", r#"["A","B","C","D"]"#),
                |r| matches!(r, Refusal::ServiceCount(4)),
            ),
            (notify("destination", "AQGA", "us-east-1", "[]"), |r| {
                matches!(r, Refusal::ServiceCount(0))
            }),
            (
                notify("destination", "AQGA", "us-east-1", r#"["no space"]"#),
                |r| matches!(r, Refusal::ServiceName(_)),
            ),
            (b"{not json".to_vec(), |r| matches!(r, Refusal::Json(_))),
            (vec![0xff, 0xfe, 0x00], |r| matches!(r, Refusal::NotUtf8)),
        ];
        for (payload, expected) in cases {
            let refusal = parse("gw", &payload).unwrap_err();
            assert!(expected(&refusal), "{refusal:?}");
            assert!(!refusal.to_string().contains("AQGA"));
        }
    }
}

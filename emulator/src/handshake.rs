//! The tunneling service's upgrade checks (docs/protocol.md §1.2), as a pure function of the
//! request and the token table, so each rule is tested without a socket.

use tokio_tungstenite::tungstenite::handshake::server::Request;

use super::state::{State, TokenUse};
use securetunnel_agent::bridge::request_size;
use securetunnel_agent::protocol::{
    MAX_HANDSHAKE_REQUEST, Mode, SUBPROTOCOL_V1, SUBPROTOCOL_V2, SUBPROTOCOL_V3,
    is_valid_client_token,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub tunnel_id: String,
    pub mode: Mode,
    pub subprotocol: &'static str,
    pub token: String,
    pub client_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub status: u16,
    pub body: String,
}

fn reject(status: u16, body: &str) -> Rejected {
    Rejected {
        status,
        body: body.to_owned(),
    }
}

pub const PREVIOUSLY_USED: &str =
    "Invalid access token: The access token was previously used and can not be used again.";
pub const CLIENT_TOKEN_MISMATCH: &str = "Invalid client token: The provided client token does not match the client token that was previously set.";

/// Which subprotocol the service picks: the newest one offered.
fn pick_subprotocol(req: &Request) -> Option<&'static str> {
    let offered: Vec<String> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_owned()))
        .collect();
    [SUBPROTOCOL_V3, SUBPROTOCOL_V2, SUBPROTOCOL_V1]
        .into_iter()
        .find(|p| offered.iter().any(|o| o == p))
}

/// Exactly one token, from the `access-token` header or the `awsiot-tunnel-token` cookie.
fn access_token(req: &Request) -> Result<String, Rejected> {
    let mut found: Vec<String> = req
        .headers()
        .get_all("access-token")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    for cookie in req.headers().get_all("cookie") {
        let Ok(cookie) = cookie.to_str() else {
            continue;
        };
        for part in cookie.split(';') {
            if let Some(v) = part.trim().strip_prefix("awsiot-tunnel-token=") {
                found.push(v.to_owned());
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(reject(401, "Missing access token")),
        _ => Err(reject(
            400,
            "Invalid access token: more than one access token was provided.",
        )),
    }
}

/// Applies every upgrade rule; on success the token is marked used (bound to the client
/// token, if one came) and counted.
pub fn decide(state: &mut State, req: &Request) -> Result<Accepted, Rejected> {
    // Every handshake that presents a token counts for it, whatever the verdict.
    if let Ok(token) = access_token(req) {
        state.count_handshake(&token);
    }
    if let Some(status) = state.take_injected_failure() {
        return Err(reject(status, "Injected failure (emulator fault switch)"));
    }
    if req.uri().path() != "/tunnel" {
        return Err(reject(400, "Invalid path: use /tunnel"));
    }
    let mode = match req.uri().query() {
        Some("local-proxy-mode=source") => Mode::Source,
        Some("local-proxy-mode=destination") => Mode::Destination,
        _ => {
            return Err(reject(
                400,
                "Invalid local-proxy-mode: use local-proxy-mode=source or local-proxy-mode=destination",
            ));
        }
    };
    if request_size(req) > MAX_HANDSHAKE_REQUEST {
        return Err(reject(
            400,
            "Request too large: the upgrade request must be under 4 KiB",
        ));
    }
    let subprotocol = pick_subprotocol(req).ok_or_else(|| {
        reject(
            400,
            "Unsupported subprotocol: offer aws.iot.securetunneling-3.0 (or -2.0, -1.0)",
        )
    })?;
    let token = access_token(req)?;
    let client_token = client_token(req)?;
    let (tunnel_id, token_mode, usage) = match state.lookup_token(&token) {
        Some(found) => found,
        None => {
            return Err(reject(
                400,
                "Invalid access token: The access token is not valid.",
            ));
        }
    };
    match usage {
        TokenUse::Revoked => {
            return Err(reject(
                400,
                "Invalid access token: The access token has been revoked.",
            ));
        }
        TokenUse::TunnelClosed => {
            return Err(reject(400, "Invalid access token: The tunnel is closed."));
        }
        TokenUse::Fresh | TokenUse::Used { .. } => {}
    }
    if token_mode != mode {
        return Err(reject(
            400,
            &format!(
                "Invalid access token: The access token is not valid for local-proxy-mode={mode}."
            ),
        ));
    }
    if let TokenUse::Used {
        client_token: bound,
    } = usage
    {
        check_binding(bound.as_deref(), client_token.as_deref())?;
    }
    state.mark_used(&tunnel_id, mode, client_token.clone());
    Ok(Accepted {
        tunnel_id,
        mode,
        subprotocol,
        token,
        client_token,
    })
}

/// Rule: at most one `client-token` header, matching `^[a-zA-Z0-9-]{32,128}$`.
fn client_token(req: &Request) -> Result<Option<String>, Rejected> {
    let values: Vec<_> = req.headers().get_all("client-token").iter().collect();
    match values[..] {
        [] => Ok(None),
        [one] => match one.to_str() {
            Ok(ct) if is_valid_client_token(ct) => Ok(Some(ct.to_owned())),
            _ => Err(reject(
                400,
                "Invalid client token: it must match ^[a-zA-Z0-9-]{32,128}$",
            )),
        },
        _ => Err(reject(
            400,
            "Invalid client token: more than one client token was provided.",
        )),
    }
}

/// Rule: a token used before reconnects only with the client token it was first used with.
fn check_binding(bound: Option<&str>, presented: Option<&str>) -> Result<(), Rejected> {
    match (bound, presented) {
        (None, _) => Err(reject(400, PREVIOUSLY_USED)),
        (Some(b), Some(c)) if b == c => Ok(()),
        (Some(_), _) => Err(reject(400, CLIENT_TOKEN_MISMATCH)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn req(mode: &str, token: Option<&str>, client: Option<&str>) -> Request {
        let mut b = Request::builder()
            .uri(format!("/tunnel?local-proxy-mode={mode}"))
            .header("sec-websocket-protocol", SUBPROTOCOL_V3);
        if let Some(t) = token {
            b = b.header("access-token", t);
        }
        if let Some(c) = client {
            b = b.header("client-token", c);
        }
        b.body(()).unwrap()
    }

    const CT: &str = "0123456789abcdef0123456789abcdef";
    const CT2: &str = "ffffffffffffffffffffffffffffffff";

    #[test]
    fn a_token_without_client_token_is_single_use() {
        let mut s = State::default();
        let t = s.open_tunnel(&["SSH"], Duration::from_secs(60), None);
        assert!(
            decide(
                &mut s,
                &req("destination", Some(&t.destination_access_token), None)
            )
            .is_ok()
        );
        let again = decide(
            &mut s,
            &req("destination", Some(&t.destination_access_token), None),
        );
        assert_eq!(again.unwrap_err().body, PREVIOUSLY_USED);
    }

    #[test]
    fn a_reconnect_must_repeat_the_same_client_token() {
        let mut s = State::default();
        let t = s.open_tunnel(&["SSH"], Duration::from_secs(60), None);
        let tok = t.destination_access_token.as_str();
        assert!(decide(&mut s, &req("destination", Some(tok), Some(CT))).is_ok());
        assert!(decide(&mut s, &req("destination", Some(tok), Some(CT))).is_ok());
        assert_eq!(
            decide(&mut s, &req("destination", Some(tok), Some(CT2)))
                .unwrap_err()
                .body,
            CLIENT_TOKEN_MISMATCH
        );
        assert_eq!(
            decide(&mut s, &req("destination", Some(tok), None))
                .unwrap_err()
                .body,
            CLIENT_TOKEN_MISMATCH
        );
        assert_eq!(s.handshakes_for_token(tok), 4);
    }

    #[test]
    fn wrong_mode_unknown_token_and_missing_token_are_4xx() {
        let mut s = State::default();
        let t = s.open_tunnel(&["SSH"], Duration::from_secs(60), None);
        let wrong = decide(
            &mut s,
            &req("source", Some(&t.destination_access_token), None),
        )
        .unwrap_err();
        assert_eq!(wrong.status, 400);
        assert!(wrong.body.contains("local-proxy-mode=source"));
        assert_eq!(
            decide(&mut s, &req("source", Some("nope"), None))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            decide(&mut s, &req("source", None, None))
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            decide(&mut s, &req("sideways", Some("x"), None))
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn revoked_and_closed_tokens_are_refused() {
        let mut s = State::default();
        let t = s.open_tunnel(&["SSH"], Duration::from_secs(60), None);
        let new = s.rotate(&t.tunnel_id, Mode::Destination).unwrap();
        let old = decide(
            &mut s,
            &req("destination", Some(&t.destination_access_token), Some(CT)),
        );
        assert!(old.unwrap_err().body.contains("revoked"));
        assert!(decide(&mut s, &req("destination", Some(&new), Some(CT))).is_ok());
        s.close_tunnel(&t.tunnel_id);
        let closed = decide(&mut s, &req("source", Some(&t.source_access_token), None));
        assert!(closed.unwrap_err().body.contains("closed"));
    }

    #[test]
    fn injected_failures_answer_the_next_n_handshakes() {
        let mut s = State::default();
        let t = s.open_tunnel(&["SSH"], Duration::from_secs(60), None);
        s.fail_next_handshakes(2, 503);
        let r = req("destination", Some(&t.destination_access_token), Some(CT));
        assert_eq!(decide(&mut s, &r).unwrap_err().status, 503);
        assert_eq!(decide(&mut s, &r).unwrap_err().status, 503);
        assert!(decide(&mut s, &r).is_ok());
    }

    #[test]
    fn newest_offered_subprotocol_is_picked() {
        let r = Request::builder()
            .uri("/tunnel?local-proxy-mode=source")
            .header(
                "sec-websocket-protocol",
                format!("{SUBPROTOCOL_V1}, {SUBPROTOCOL_V2}"),
            )
            .body(())
            .unwrap();
        assert_eq!(pick_subprotocol(&r), Some(SUBPROTOCOL_V2));
    }
}

//! The AWS-compatible control plane (service `iotsecuretunneling`, JSON 1.1): `POST /` with
//! `X-Amz-Target: IoTSecuredTunneling.<Op>`, accepted by boto3 and aws-cli. Validation is
//! the server's job (botocore checks only minimums), so every pattern and range is checked
//! here; errors are HTTP 400 with `{"__type", "message"}`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::Shared;
use super::state::{Tunnel, TunnelSpec};
use securetunnel_agent::protocol::Mode;

const MAX_BODY: usize = 1 << 20;
pub const TARGET_PREFIX: &str = "IoTSecuredTunneling.";

/// An operation's failure, as the wire carries it.
#[derive(Debug, PartialEq, Eq)]
pub struct ApiError {
    pub kind: &'static str,
    pub message: String,
}

fn validation(message: impl Into<String>) -> ApiError {
    ApiError {
        kind: "ValidationException",
        message: message.into(),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError {
        kind: "ResourceNotFoundException",
        message: format!("Tunnel {id} not found"),
    }
}

type ApiResult = Result<Value, ApiError>;

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// --- field rules (botocore model, docs/protocol.md §6.2) ---

/// ThingName and Service share one pattern, the agent's rule.
use securetunnel_agent::protocol::is_valid_service_id as is_name;

fn is_tunnel_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-+=:".contains(&b))
}

/// `[^\p{C}]{1,2048}`: no control, format, private-use or unassigned characters.
fn is_description(s: &str) -> bool {
    let count = s.chars().count();
    (1..=2048).contains(&count)
        && !s.chars().any(|c| {
            c.is_control()
                || matches!(c, '\u{AD}' | '\u{600}'..='\u{605}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}' | '\u{E000}'..='\u{F8FF}')
        })
}

/// `^([\p{L}\p{Z}\p{N}_.:/=+\-@]*)$`
fn is_tag_text(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_alphanumeric() || c.is_whitespace() || "_.:/=+-@".contains(c))
}

fn str_field<'a>(body: &'a Value, key: &str) -> Result<Option<&'a str>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(validation(format!("{key} must be a string"))),
    }
}

fn tunnel_id(body: &Value) -> Result<String, ApiError> {
    match str_field(body, "tunnelId")? {
        Some(id) if is_tunnel_id(id) => Ok(id.to_owned()),
        Some(id) => Err(validation(format!(
            "tunnelId {id:?} must match [a-zA-Z0-9_\\-+=:]{{1,128}}"
        ))),
        None => Err(validation("tunnelId is required")),
    }
}

/// A destinationConfig: the thing (optional) and its 1-3 services.
type Destination = (Option<String>, Vec<String>);

/// `destinationConfig`: thingName optional, services required (1-3 names).
fn destination_config(body: &Value) -> Result<Option<Destination>, ApiError> {
    let Some(dc) = body.get("destinationConfig").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let thing = match str_field(dc, "thingName")? {
        Some(t) if is_name(t) => Some(t.to_owned()),
        Some(t) => {
            return Err(validation(format!(
                "destinationConfig.thingName {t:?} must match [a-zA-Z0-9:_-]{{1,128}}"
            )));
        }
        None => None,
    };
    let services: Vec<String> = match dc.get("services") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| validation("destinationConfig.services must be strings"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(validation("destinationConfig.services is required")),
    };
    if !(1..=3).contains(&services.len()) {
        return Err(validation(format!(
            "destinationConfig.services has {} entries; give 1 to 3",
            services.len()
        )));
    }
    if let Some(bad) = services.iter().find(|s| !is_name(s)) {
        return Err(validation(format!(
            "service {bad:?} must match [a-zA-Z0-9:_-]{{1,128}}"
        )));
    }
    Ok(Some((thing, services)))
}

fn tags(body: &Value) -> Result<Vec<(String, String)>, ApiError> {
    let Some(v) = body.get("tags").filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let items = v
        .as_array()
        .ok_or_else(|| validation("tags must be a list"))?;
    if !(1..=200).contains(&items.len()) {
        return Err(validation("tags must have 1 to 200 entries"));
    }
    items
        .iter()
        .map(|t| {
            let key = str_field(t, "key")?.ok_or_else(|| validation("tag key is required"))?;
            let value = str_field(t, "value")?.ok_or_else(|| validation("tag value is required"))?;
            let (kl, vl) = (key.chars().count(), value.chars().count());
            if !(1..=128).contains(&kl) || vl > 256 || !is_tag_text(key) || !is_tag_text(value) {
                return Err(validation(format!("tag {key:?}: keys are 1-128 and values 0-256 of letters, numbers, spaces and _.:/=+-@")));
            }
            Ok((key.to_owned(), value.to_owned()))
        })
        .collect()
}

// --- operations ---

pub async fn open_tunnel(shared: &Arc<Shared>, body: &Value) -> ApiResult {
    let description = match str_field(body, "description")? {
        Some(d) if is_description(d) => Some(d.to_owned()),
        Some(_) => {
            return Err(validation(
                "description must be 1-2048 characters without control characters",
            ));
        }
        None => None,
    };
    let tags = tags(body)?;
    let dest = destination_config(body)?;
    let minutes = match body
        .get("timeoutConfig")
        .and_then(|t| t.get("maxLifetimeTimeoutMinutes"))
    {
        None | Some(Value::Null) => 720,
        Some(v) => match v.as_u64() {
            Some(m @ 1..=720) => m as u32,
            _ => {
                return Err(validation(
                    "timeoutConfig.maxLifetimeTimeoutMinutes must be 1 to 720",
                ));
            }
        },
    };
    if shared.lock().open_count() >= shared.max_open_tunnels {
        return Err(ApiError {
            kind: "LimitExceededException",
            message: format!("at most {} tunnels may be open", shared.max_open_tunnels),
        });
    }
    let (thing, services) = match dest {
        Some((t, s)) => (t, Some(s)),
        None => (None, None),
    };
    let spec = TunnelSpec {
        description,
        tags,
        thing_name: thing.clone(),
        services: services.clone(),
        timeout_minutes: minutes,
    };
    let t = super::open_tunnel(shared, spec);
    if let (Some(thing), Some(services)) = (thing, services) {
        shared
            .notify(&thing, &t.destination_access_token, &services)
            .await;
    }
    Ok(json!({
        "tunnelId": t.tunnel_id,
        "tunnelArn": shared.arn(&t.tunnel_id),
        "sourceAccessToken": t.source_access_token,
        "destinationAccessToken": t.destination_access_token,
    }))
}

pub async fn rotate(shared: &Arc<Shared>, body: &Value) -> ApiResult {
    let id = tunnel_id(body)?;
    let modes: &[Mode] = match str_field(body, "clientMode")? {
        Some("SOURCE") => &[Mode::Source],
        Some("DESTINATION") => &[Mode::Destination],
        Some("ALL") => &[Mode::Source, Mode::Destination],
        Some(other) => {
            return Err(validation(format!(
                "clientMode {other:?} must be SOURCE, DESTINATION or ALL"
            )));
        }
        None => return Err(validation("clientMode is required")),
    };
    let dest = destination_config(body)?;
    if dest.is_some() && modes == [Mode::Source] {
        return Err(validation(
            "destinationConfig is not allowed with clientMode SOURCE",
        ));
    }
    {
        let st = shared.lock();
        match st.tunnel(&id) {
            None => return Err(not_found(&id)),
            Some(t) if t.closed => return Err(validation(format!("Tunnel {id} is closed"))),
            Some(_) => {}
        }
    }
    let mut out = json!({ "tunnelArn": shared.arn(&id) });
    let mut new_destination = None;
    for &mode in modes {
        let token = shared.rotate(&id, mode).ok_or_else(|| not_found(&id))?;
        match mode {
            Mode::Source => out["sourceAccessToken"] = json!(token),
            Mode::Destination => {
                out["destinationAccessToken"] = json!(token);
                new_destination = Some(token);
            }
        }
    }
    if let (Some((Some(thing), services)), Some(token)) = (dest, new_destination) {
        shared.notify(&thing, &token, &services).await;
    }
    Ok(out)
}

pub fn close(shared: &Arc<Shared>, body: &Value) -> ApiResult {
    let id = tunnel_id(body)?;
    if shared.lock().tunnel(&id).is_none() {
        return Err(not_found(&id));
    }
    super::close_tunnel(shared, &id, "tunnel closed");
    if body.get("delete").and_then(Value::as_bool) == Some(true) {
        shared.lock().delete_tunnel(&id);
    }
    Ok(json!({}))
}

fn connection_state(t: &Tunnel, mode: Mode) -> Value {
    let status = if t.peer(mode).is_some() {
        "CONNECTED"
    } else {
        "DISCONNECTED"
    };
    json!({ "status": status, "lastUpdatedAt": epoch(t.last_updated(mode)) })
}

pub fn describe(shared: &Arc<Shared>, body: &Value) -> ApiResult {
    let id = tunnel_id(body)?;
    let st = shared.lock();
    let t = st.tunnel(&id).ok_or_else(|| not_found(&id))?;
    let mut tunnel = summary(shared, t);
    tunnel["sourceConnectionState"] = connection_state(t, Mode::Source);
    tunnel["destinationConnectionState"] = connection_state(t, Mode::Destination);
    tunnel["timeoutConfig"] = json!({ "maxLifetimeTimeoutMinutes": t.spec.timeout_minutes });
    if let Some(services) = &t.spec.services {
        let mut dc = json!({ "services": services });
        if let Some(thing) = &t.spec.thing_name {
            dc["thingName"] = json!(thing);
        }
        tunnel["destinationConfig"] = dc;
    }
    if !t.spec.tags.is_empty() {
        tunnel["tags"] = t
            .spec
            .tags
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
    }
    Ok(json!({ "tunnel": tunnel }))
}

fn summary(shared: &Shared, t: &Tunnel) -> Value {
    let mut v = json!({
        "tunnelId": t.id,
        "tunnelArn": shared.arn(&t.id),
        "status": if t.closed { "CLOSED" } else { "OPEN" },
        "createdAt": epoch(t.created_at),
        "lastUpdatedAt": epoch(t.last_updated_at),
    });
    if let Some(d) = &t.spec.description {
        v["description"] = json!(d);
    }
    v
}

pub fn list(shared: &Arc<Shared>, body: &Value) -> ApiResult {
    let thing = match str_field(body, "thingName")? {
        Some(t) if is_name(t) => Some(t),
        Some(t) => {
            return Err(validation(format!(
                "thingName {t:?} must match [a-zA-Z0-9:_-]{{1,128}}"
            )));
        }
        None => None,
    };
    let max = match body.get("maxResults") {
        None | Some(Value::Null) => 100,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=100) => n as usize,
            _ => return Err(validation("maxResults must be 1 to 100")),
        },
    };
    let start = match str_field(body, "nextToken")? {
        None => 0,
        Some(tok) => tok
            .strip_prefix("n")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| validation("nextToken is not one this service returned"))?,
    };
    let st = shared.lock();
    let mut all: Vec<&Tunnel> = st
        .tunnels()
        .filter(|t| thing.is_none() || t.spec.thing_name.as_deref() == thing)
        .collect();
    // Newest first.
    all.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(max)
        .map(|t| summary(shared, t))
        .collect();
    let mut out = json!({ "tunnelSummaries": page });
    if start + max < all.len() {
        out["nextToken"] = json!(format!("n{}", start + max));
    }
    Ok(out)
}

pub async fn dispatch(shared: &Arc<Shared>, target: &str, body: &Value) -> ApiResult {
    match target.strip_prefix(TARGET_PREFIX) {
        Some("OpenTunnel") => open_tunnel(shared, body).await,
        Some("RotateTunnelAccessToken") => rotate(shared, body).await,
        Some("CloseTunnel") => close(shared, body),
        Some("DescribeTunnel") => describe(shared, body),
        Some("ListTunnels") => list(shared, body),
        _ => Err(ApiError {
            kind: "UnknownOperationException",
            message: format!("operation {target:?} is not supported by this emulator"),
        }),
    }
}

// --- HTTP/1.1 ---

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => {
                    conns.spawn(connection(s, shared.clone()));
                }
                Err(e) => {
                    warn!("control plane accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

struct HttpRequest {
    method: String,
    path: String,
    target: String,
    keep_alive: bool,
    body: Vec<u8>,
}

async fn read_request(s: &mut TcpStream, buf: &mut BytesMut) -> Option<HttpRequest> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = req.parse(buf) {
            let header = |name: &str| {
                req.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(str::to_owned)
            };
            let len: usize = header("content-length")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if len > MAX_BODY {
                return None;
            }
            let keep_alive = !header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
            let (method, path) = (
                req.method.unwrap_or("").to_owned(),
                req.path.unwrap_or("").to_owned(),
            );
            let target = header("x-amz-target").unwrap_or_default();
            while buf.len() < head + len {
                if s.read_buf(buf).await.ok()? == 0 {
                    return None;
                }
            }
            buf.advance(head);
            let body = buf.split_to(len).to_vec();
            return Some(HttpRequest {
                method,
                path,
                target,
                keep_alive,
                body,
            });
        }
        if buf.len() > 64 * 1024 || s.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

async fn connection(mut s: TcpStream, shared: Arc<Shared>) {
    let mut buf = BytesMut::with_capacity(8192);
    while let Some(req) = read_request(&mut s, &mut buf).await {
        let result = if req.method != "POST" || req.path != "/" {
            Err(ApiError {
                kind: "UnknownOperationException",
                message: "use POST / with X-Amz-Target".into(),
            })
        } else {
            match serde_json::from_slice::<Value>(if req.body.is_empty() {
                b"{}"
            } else {
                &req.body
            }) {
                Ok(body) if body.is_object() => dispatch(&shared, &req.target, &body).await,
                _ => Err(ApiError {
                    kind: "SerializationException",
                    message: "the body is not a JSON object".into(),
                }),
            }
        };
        let request_id = uuid::Uuid::new_v4().to_string();
        let (status, body, error_type) = match result {
            Ok(v) => ("200 OK", v, None),
            Err(e) => {
                info!(target = %req.target, error = e.kind, "control plane: {}", e.message);
                (
                    "400 Bad Request",
                    json!({"__type": e.kind, "message": e.message}),
                    Some(e.kind),
                )
            }
        };
        let body = body.to_string();
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nx-amzn-RequestId: {request_id}\r\n",
            body.len()
        );
        if let Some(t) = error_type {
            head.push_str(&format!("x-amzn-ErrorType: {t}\r\n"));
        }
        head.push_str("\r\n");
        if s.write_all(head.as_bytes()).await.is_err()
            || s.write_all(body.as_bytes()).await.is_err()
        {
            return;
        }
        if !req.keep_alive {
            return;
        }
    }
    debug!("control plane connection closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_patterns_follow_the_botocore_model() {
        assert!(is_tunnel_id("b2de92a3-b8ff-46c0-b0f2-afa28b00cecd"));
        assert!(!is_tunnel_id("bad id!"));
        assert!(is_name("thing:1_a-b"));
        assert!(!is_name("thing 1"));
        assert!(is_description("ssh to dev, caf\u{e9}"));
        assert!(!is_description(""));
        assert!(!is_description("tab\there"));
        assert!(!is_description("zero\u{200B}width"));
        assert!(is_tag_text("Owner: Admin@x/y=z+1"));
        assert!(!is_tag_text("semi;colon"));
    }

    #[test]
    fn destination_config_needs_one_to_three_valid_services() {
        let ok = json!({"destinationConfig": {"thingName": "t1", "services": ["SSH"]}});
        assert_eq!(
            destination_config(&ok).unwrap(),
            Some((Some("t1".into()), vec!["SSH".into()]))
        );
        for bad in [
            json!({"destinationConfig": {"thingName": "t1"}}),
            json!({"destinationConfig": {"services": []}}),
            json!({"destinationConfig": {"services": ["A", "B", "C", "D"]}}),
            json!({"destinationConfig": {"services": ["no space"]}}),
            json!({"destinationConfig": {"thingName": "bad thing", "services": ["A"]}}),
        ] {
            assert_eq!(
                destination_config(&bad).unwrap_err().kind,
                "ValidationException",
                "{bad}"
            );
        }
    }

    #[test]
    fn tags_are_bounded_and_patterned() {
        assert_eq!(
            tags(&json!({"tags": [{"key": "k", "value": ""}]}))
                .unwrap()
                .len(),
            1
        );
        assert!(tags(&json!({"tags": []})).is_err());
        assert!(tags(&json!({"tags": [{"key": "", "value": "v"}]})).is_err());
        assert!(tags(&json!({"tags": [{"key": "k"}]})).is_err());
        let many: Vec<Value> = (0..201)
            .map(|i| json!({"key": format!("k{i}"), "value": "v"}))
            .collect();
        assert!(tags(&json!({ "tags": many })).is_err());
    }
}

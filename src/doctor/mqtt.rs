//! Steps 4 and 5 of `doctor`: CONNECT with the client id, SUBSCRIBE to every notify topic
//! the agent follows, each refusal explained as the IoT policy statement to add; then
//! UNSUBSCRIBE and DISCONNECT. Or, while the agent runs, the same from its status.

use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{
    Codec, ConnectReturnCode, Packet, Subscribe, SubscribeReasonCode, Unsubscribe,
};
use rumqttc::mqttbytes::{Protocol, QoS};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

use super::handshake::{Side, failure};
use super::reach::STEP_TIMEOUT;
use super::report::{Check, Report, Status};
use crate::mqtt::{OWN_TOPIC_REFUSED, topic_statement};
use crate::status::Snapshot;

/// A notify topic to check and the thing it belongs to.
pub struct Topic {
    pub thing: String,
    pub topic: String,
}

/// Who connects: the agent's own client id (its persistent session, left as found) or
/// another one the operator chose (a clean session, nothing left).
pub struct Identity<'a> {
    pub client_id: &'a str,
    pub agents_own: bool,
}

type Link = Framed<TlsStream<TcpStream>, Codec>;

/// Why no awaited packet came.
enum Ended {
    Closed,
    Io(std::io::Error),
    Garbled(String),
    Timeout,
}

/// Rule (the policy statement for a client id): `iot:Connect` on the client resource.
pub fn connect_statement(client_id: &str) -> String {
    format!(
        r#"{{"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:REGION:ACCOUNT:client/{client_id}"}}"#
    )
}

/// Rule (CONNACK refusals): each return code in terms of the policy.
pub fn connack_refusal(code: ConnectReturnCode, client_id: &str) -> (String, String) {
    let policy = format!(
        "add to the certificate's IoT policy: {}",
        connect_statement(client_id)
    );
    match code {
        ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword => (
            format!("the broker refused client id {client_id:?}: not authorized"),
            policy,
        ),
        ConnectReturnCode::BadClientId => (
            format!("the broker refused client id {client_id:?} as an identifier"),
            format!("set mqtt.client_id to an id the policy allows, or {policy}"),
        ),
        ConnectReturnCode::ServiceUnavailable => (
            "the broker is unavailable (CONNACK 3)".into(),
            "try again later; AWS IoT's service health: https://health.aws.amazon.com".into(),
        ),
        ConnectReturnCode::RefusedProtocolVersion => (
            "the broker refused MQTT 3.1.1".into(),
            "check mqtt.endpoint and mqtt.port: AWS IoT speaks MQTT 3.1.1 there".into(),
        ),
        other => (format!("the broker refused the CONNECT: {other:?}"), policy),
    }
}

/// Rule (a connection closed instead of an answer): what AWS IoT does when the policy
/// refuses the request.
pub fn closed_instead_of(after: &str, client_id: &str) -> (String, String) {
    (
        format!(
            "the broker closed the connection instead of answering {after}: AWS IoT does this when the certificate's policy does not allow it (or the certificate is inactive)"
        ),
        format!(
            "make the certificate ACTIVE and attach a policy with {}",
            connect_statement(client_id)
        ),
    )
}

/// Rule (leave the session as found): the agent's own persistent session keeps the
/// subscriptions it had (a notify published before the agent starts is still queued);
/// any other session is cleaned up.
pub fn unsubscribe_after(id: &Identity<'_>, session_present: bool) -> bool {
    !(id.agents_own && session_present)
}

/// CONNECT, each SUBSCRIBE, then the clean-up; the checks go to `report`.
pub async fn check(
    report: &mut Report,
    tls: TlsStream<TcpStream>,
    target: &str,
    id: &Identity<'_>,
    topics: &[Topic],
) {
    let mut link = Framed::new(
        tls,
        Codec {
            max_incoming_size: crate::mqtt::MAX_INCOMING_PACKET,
            max_outgoing_size: 16 * 1024,
        },
    );
    let connect = rumqttc::mqttbytes::v4::Connect {
        protocol: Protocol::V4,
        keep_alive: 30,
        client_id: id.client_id.to_owned(),
        clean_session: !id.agents_own,
        last_will: None,
        login: None,
    };
    let Some(session_present) = connected(report, &mut link, target, id, connect).await else {
        return;
    };
    let granted = subscribe_each(report, &mut link, id.client_id, topics).await;
    if unsubscribe_after(id, session_present) && !granted.is_empty() {
        let mut unsub = Unsubscribe::new(granted[0].clone());
        unsub.topics = granted;
        unsub.pkid = u16::try_from(topics.len() + 1).unwrap_or(u16::MAX);
        if link.send(Packet::Unsubscribe(unsub)).await.is_ok() {
            let _ = await_packet(&mut link, |p| matches!(p, Packet::UnsubAck(_))).await;
        }
    }
    let _ = link.send(Packet::Disconnect).await;
    let _ = link.close().await;
}

async fn connected(
    report: &mut Report,
    link: &mut Link,
    target: &str,
    id: &Identity<'_>,
    connect: rumqttc::mqttbytes::v4::Connect,
) -> Option<bool> {
    if let Err(e) = link.send(Packet::Connect(connect)).await {
        let (saw, fix) = ended(Ended::Io(to_io(e)), "the CONNECT", id.client_id, target);
        report.add(Check::fail("mqtt-connect", id.client_id, saw, fix));
        return None;
    }
    match await_packet(link, |p| matches!(p, Packet::ConnAck(_))).await {
        Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
            let saw = format!(
                "CONNACK accepted (session present: {})",
                if ack.session_present { "yes" } else { "no" }
            );
            report.add(Check::pass("mqtt-connect", id.client_id, saw));
            Some(ack.session_present)
        }
        Ok(Packet::ConnAck(ack)) => {
            let (saw, fix) = connack_refusal(ack.code, id.client_id);
            report.add(Check::fail("mqtt-connect", id.client_id, saw, fix));
            None
        }
        Ok(_) => None,
        Err(e) => {
            let (saw, fix) = ended(e, "the CONNECT", id.client_id, target);
            report.add(Check::fail("mqtt-connect", id.client_id, saw, fix));
            None
        }
    }
}

/// One SUBSCRIBE per topic, so each answer (or a closed connection) names its topic.
/// Returns the topics granted.
async fn subscribe_each(
    report: &mut Report,
    link: &mut Link,
    client_id: &str,
    topics: &[Topic],
) -> Vec<String> {
    let mut granted = Vec::new();
    for (i, t) in topics.iter().enumerate() {
        let pkid = u16::try_from(i + 1).unwrap_or(u16::MAX);
        let (check, connected) =
            subscribe_verdict(t, subscribe_one(link, t, pkid).await, client_id);
        if check.status == Status::Pass {
            granted.push(t.topic.clone());
        }
        report.add(check);
        if !connected {
            for rest in &topics[i + 1..] {
                let why = "not checked: the broker closed the connection";
                report.add(Check::skip("mqtt-subscribe", &rest.thing, why));
            }
            break;
        }
    }
    granted
}

/// What came of one SUBSCRIBE.
enum Subscribed {
    Granted(QoS),
    /// 0x80; `closed`: the broker then closed the connection.
    Refused {
        closed: bool,
    },
    Ended(Ended),
}

async fn subscribe_one(link: &mut Link, t: &Topic, pkid: u16) -> Subscribed {
    let mut sub = Subscribe::new(t.topic.clone(), QoS::AtLeastOnce);
    sub.pkid = pkid;
    if let Err(e) = link.send(Packet::Subscribe(sub)).await {
        return Subscribed::Ended(Ended::Io(to_io(e)));
    }
    match await_packet(link, |p| matches!(p, Packet::SubAck(a) if a.pkid == pkid)).await {
        Ok(Packet::SubAck(ack)) => match ack.return_codes.first() {
            Some(SubscribeReasonCode::Success(qos)) => Subscribed::Granted(*qos),
            _ => Subscribed::Refused {
                closed: closed_after(link).await,
            },
        },
        Ok(_) => Subscribed::Ended(Ended::Garbled("an unexpected packet".into())),
        Err(e) => Subscribed::Ended(e),
    }
}

/// After a refusal, a PINGREQ: its answer says whether the broker kept the connection (AWS
/// IoT closes it on a policy failure), so the next topic is not blamed for it.
async fn closed_after(link: &mut Link) -> bool {
    if link.send(Packet::PingReq).await.is_err() {
        return true;
    }
    let answer = await_packet(link, |p| matches!(p, Packet::PingResp)).await;
    matches!(answer, Err(Ended::Closed | Ended::Io(_)))
}

/// Rule (a SUBSCRIBE's answer): the check, and whether the connection is still there.
fn subscribe_verdict(t: &Topic, outcome: Subscribed, client_id: &str) -> (Check, bool) {
    let statement = format!(
        "add to the certificate's IoT policy: {}",
        topic_statement(&t.topic)
    );
    let fail = |saw: String, fix: String| Check::fail("mqtt-subscribe", &t.thing, saw, fix);
    match outcome {
        Subscribed::Granted(qos) => {
            let saw = format!("{} granted ({qos:?})", t.topic);
            (Check::pass("mqtt-subscribe", &t.thing, saw), true)
        }
        Subscribed::Refused { closed: false } => {
            let saw = format!("the broker refused SUBSCRIBE {} (0x80)", t.topic);
            (fail(saw, statement), true)
        }
        Subscribed::Refused { closed: true } => {
            let saw = format!(
                "the broker refused SUBSCRIBE {} (0x80) and closed the connection, as AWS IoT does on a policy failure",
                t.topic
            );
            (fail(saw, statement), false)
        }
        Subscribed::Ended(e @ (Ended::Closed | Ended::Io(_))) => {
            let (saw, _) = ended(e, &format!("SUBSCRIBE {}", t.topic), client_id, "");
            (fail(saw, statement), false)
        }
        Subscribed::Ended(e) => {
            let (saw, fix) = ended(e, &format!("SUBSCRIBE {}", t.topic), client_id, "");
            (fail(saw, fix), false)
        }
    }
}

/// The next packet `wanted` accepts; anything else (a queued notify for the agent's
/// session, never acknowledged here, so the broker delivers it again) is passed over.
async fn await_packet(link: &mut Link, wanted: impl Fn(&Packet) -> bool) -> Result<Packet, Ended> {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, link.next()).await {
            Err(_) => return Err(Ended::Timeout),
            Ok(None) => return Err(Ended::Closed),
            Ok(Some(Err(e))) => return Err(Ended::Io(to_io(e))),
            Ok(Some(Ok(p))) if wanted(&p) => return Ok(p),
            Ok(Some(Ok(Packet::Disconnect))) => return Err(Ended::Closed),
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn to_io(e: rumqttc::mqttbytes::Error) -> std::io::Error {
    match e {
        rumqttc::mqttbytes::Error::Io(io) => io,
        other => std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// What a missing answer means; a TLS alert here is the broker refusing the device
/// certificate after the handshake (TLS 1.3).
fn ended(e: Ended, after: &str, client_id: &str, host: &str) -> (String, String) {
    match e {
        Ended::Io(io) if super::handshake::rustls_error(&io).is_some() => {
            failure(&io, Side::Broker { ca: None }, host)
        }
        Ended::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            let garbled = Ended::Garbled(io.to_string());
            ended(garbled, after, client_id, host)
        }
        Ended::Closed | Ended::Io(_) => closed_instead_of(after, client_id),
        Ended::Garbled(what) => (
            format!("the broker's answer to {after} is not MQTT 3.1.1: {what}"),
            "check mqtt.endpoint and mqtt.port: something other than an MQTT broker answers".into(),
        ),
        Ended::Timeout => (
            format!("no answer to {after} within {}s", STEP_TIMEOUT.as_secs()),
            "check mqtt.endpoint and mqtt.port, and any firewall that inspects TLS".into(),
        ),
    }
}

/// Steps 4 and 5 from the running agent's status, instead of a second connection that
/// would disconnect it (AWS IoT keeps one connection per client id). `topics[0]` is the
/// agent's own.
pub fn from_agent(report: &mut Report, snapshot: &Snapshot, client_id: &str, topics: &[Topic]) {
    report.add(agent_connect_verdict(snapshot, client_id));
    for (i, t) in topics.iter().enumerate() {
        report.add(agent_subscribe_verdict(snapshot, i == 0, t));
    }
}

fn own_topic_refused(snapshot: &Snapshot) -> bool {
    snapshot
        .mqtt_last_error
        .as_deref()
        .is_some_and(|e| e.starts_with(OWN_TOPIC_REFUSED))
}

/// Rule (the running agent's connection): connected or subscribed passes; connecting fails
/// with its last error, unless that error is its own topic refused (a subscription problem).
fn agent_connect_verdict(snapshot: &Snapshot, client_id: &str) -> Check {
    let since = super::times::utc(i64::try_from(snapshot.mqtt_since).unwrap_or(0));
    if snapshot.mqtt != "connecting" || own_topic_refused(snapshot) {
        let saw = format!("the running agent is {} since {since}", snapshot.mqtt);
        return Check::pass("mqtt-connect", client_id, saw);
    }
    let why = snapshot
        .mqtt_last_error
        .as_deref()
        .unwrap_or("no error recorded yet");
    let saw = format!("the running agent is not connected (since {since}): {why}");
    let fix = "see the checks above; to check the policy without stopping the agent, run doctor --client-id ID with another id the policy allows";
    Check::fail("mqtt-connect", client_id, saw, fix)
}

/// Rule (the running agent's subscriptions): a refusal fails with the statement; a
/// downstream thing the agent does not follow (the file changed since it started) fails
/// with the reload.
fn agent_subscribe_verdict(snapshot: &Snapshot, own: bool, t: &Topic) -> Check {
    let refused = if own {
        Some(own_topic_refused(snapshot))
    } else {
        snapshot
            .things
            .iter()
            .find(|s| s.name == t.thing)
            .map(|s| s.refused)
    };
    let statement = || {
        format!(
            "add to the certificate's IoT policy: {}",
            topic_statement(&t.topic)
        )
    };
    match refused {
        Some(true) => {
            let saw = format!("the running agent's SUBSCRIBE {} was refused", t.topic);
            Check::fail("mqtt-subscribe", &t.thing, saw, statement())
        }
        None => Check::fail(
            "mqtt-subscribe",
            &t.thing,
            "the running agent does not follow this thing: the configuration changed since it started",
            "reload it: systemctl reload securetunnel-agent (OpenWrt: /etc/init.d/securetunnel-agent reload)",
        ),
        Some(false) if snapshot.mqtt == "subscribed" => {
            let saw = format!("the running agent follows {}", t.topic);
            Check::pass("mqtt-subscribe", &t.thing, saw)
        }
        Some(false) => Check::skip(
            "mqtt-subscribe",
            &t.thing,
            "the running agent is not subscribed yet",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_client_id_prints_the_connect_statement() {
        let (saw, fix) = connack_refusal(ConnectReturnCode::NotAuthorized, "gw-1");
        assert!(saw.contains("\"gw-1\""), "{saw}");
        assert!(fix.ends_with(&connect_statement("gw-1")), "{fix}");
        assert!(connect_statement("gw-1").contains(r#""Action":"iot:Connect""#));
        assert!(connect_statement("gw-1").contains("client/gw-1"));
        let (_, fix) = connack_refusal(ConnectReturnCode::BadClientId, "gw-1");
        assert!(fix.starts_with("set mqtt.client_id"), "{fix}");
    }

    #[test]
    fn a_closed_connection_is_read_as_aws_iot_refusing_the_policy() {
        let (saw, fix) = ended(Ended::Closed, "SUBSCRIBE t", "gw", "h");
        assert!(saw.contains("instead of answering SUBSCRIBE t"), "{saw}");
        assert!(fix.contains("ACTIVE"), "{fix}");
        let (saw, _) = ended(Ended::Timeout, "the CONNECT", "gw", "h");
        assert!(saw.starts_with("no answer to the CONNECT"), "{saw}");
    }

    fn topic(thing: &str) -> Topic {
        Topic {
            thing: thing.into(),
            topic: crate::protocol::notify::notify_topic(thing),
        }
    }

    #[test]
    fn a_refusal_then_a_closed_connection_is_blamed_on_the_refused_topic_only() {
        let t = topic("plc-9");
        let (check, connected) = subscribe_verdict(&t, Subscribed::Refused { closed: true }, "gw");
        assert!(!connected);
        assert!(
            check.saw.contains("(0x80) and closed the connection"),
            "{}",
            check.saw
        );
        assert!(
            check
                .fix
                .unwrap()
                .contains("topicfilter/$aws/things/plc-9/tunnels/notify")
        );
        let (check, connected) = subscribe_verdict(&t, Subscribed::Refused { closed: false }, "gw");
        assert!(connected);
        assert_eq!(
            check.saw,
            "the broker refused SUBSCRIBE $aws/things/plc-9/tunnels/notify (0x80)"
        );
        // A timeout is no policy answer: no statement.
        let (check, connected) = subscribe_verdict(&t, Subscribed::Ended(Ended::Timeout), "gw");
        assert!(!connected);
        assert!(!check.fix.unwrap().contains("iot:Subscribe"));
    }

    #[test]
    fn a_remapped_notify_topic_gets_the_statement_for_that_topic() {
        let t = Topic {
            thing: "gw".into(),
            topic: "bridge/gw/notify".into(),
        };
        let (check, _) = subscribe_verdict(&t, Subscribed::Refused { closed: false }, "gw");
        assert!(check.fix.unwrap().contains("topicfilter/bridge/gw/notify"));
    }

    fn snapshot(mqtt: &str, last_error: Option<&str>, things: &[(&str, bool)]) -> Snapshot {
        let things: Vec<serde_json::Value> = things
            .iter()
            .map(|(name, refused)| serde_json::json!({"name": name, "refused": refused}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "mqtt": mqtt, "mqtt_since": 0, "mqtt_last_error": last_error,
            "things": things, "tunnels": [],
        }))
        .unwrap()
    }

    #[test]
    fn the_running_agents_state_answers_for_connect_and_each_subscription() {
        let s = snapshot("subscribed", None, &[("plc-1", false), ("plc-9", true)]);
        assert_eq!(agent_connect_verdict(&s, "gw").status, Status::Pass);
        assert_eq!(
            agent_subscribe_verdict(&s, true, &topic("gw")).status,
            Status::Pass
        );
        assert_eq!(
            agent_subscribe_verdict(&s, false, &topic("plc-1")).status,
            Status::Pass
        );
        let refused = agent_subscribe_verdict(&s, false, &topic("plc-9"));
        assert!(refused.fix.unwrap().contains("plc-9/tunnels/notify"));
        let unknown = agent_subscribe_verdict(&s, false, &topic("plc-new"));
        assert_eq!(unknown.status, Status::Fail);
        assert!(unknown.fix.unwrap().starts_with("reload it"));
    }

    #[test]
    fn the_running_agents_own_topic_refused_is_a_subscription_failure() {
        let err = format!("{OWN_TOPIC_REFUSED} $aws/things/gw/tunnels/notify: check ...");
        let s = snapshot("connecting", Some(&err), &[]);
        assert_eq!(agent_connect_verdict(&s, "gw").status, Status::Pass);
        let own = agent_subscribe_verdict(&s, true, &topic("gw"));
        assert_eq!(own.status, Status::Fail);
        assert!(
            own.fix
                .unwrap()
                .contains("topicfilter/$aws/things/gw/tunnels/notify")
        );
        let down = snapshot("connecting", Some("connection refused"), &[]);
        let c = agent_connect_verdict(&down, "gw");
        assert_eq!(c.status, Status::Fail);
        assert!(c.saw.ends_with("connection refused"), "{}", c.saw);
    }

    #[test]
    fn only_the_agents_own_session_keeps_its_subscriptions() {
        let own = Identity {
            client_id: "gw",
            agents_own: true,
        };
        let other = Identity {
            client_id: "doctor",
            agents_own: false,
        };
        assert!(!unsubscribe_after(&own, true));
        assert!(unsubscribe_after(&own, false));
        assert!(unsubscribe_after(&other, true));
        assert!(unsubscribe_after(&other, false));
    }
}

//! Every rule of the secure-tunneling wire protocol lives here, as a named constant or a
//! function with a unit test named after the rule (docs/protocol.md §1-§3). Nothing else in
//! the crate hard-codes a size, a subprotocol or a reset decision.

mod codec;
mod message;
pub mod notify;

use std::time::Duration;

pub use codec::{FrameCodec, FrameDecoder, FrameReader, RawFrameCodec};
pub use message::{Message, MessageType};

/// Bytes of the big-endian length prefix in front of every tunnel frame.
pub const LENGTH_PREFIX: usize = 2;
/// Largest `payload` of one message; outgoing data is chunked to this.
pub const MAX_PAYLOAD: usize = 64512;
/// Longest service id (API `Service` shape).
pub const MAX_SERVICE_ID: usize = 128;
/// Largest serialized message the u16 prefix can describe.
pub(crate) const MAX_MESSAGE: usize = u16::MAX as usize;
/// Largest websocket frame either side may send or accept (2 x 65538). The rule is about
/// frames: a message reassembled from fragments may be larger, and tunnel frames are
/// validated one by one (docs/protocol.md §1.4).
pub const MAX_WS_FRAME: usize = 131_076;
/// Largest websocket message this agent sends: 65538 bytes, the size of the largest
/// message the reference localproxy sends (a 64 KiB frame and its 2-byte prefix; a frame's
/// u16 prefix keeps ours at 65537). The protocol allows up to `MAX_WS_FRAME`, but localproxy
/// reads into a buffer of that size that still holds the unprocessed tail of the previous
/// message, and dies (`basic_multi_buffer too long`) on larger ones.
pub const MAX_SENT_MESSAGE: usize = 65_538;

/// Rule (sent message size): another frame of `frame` bytes joins a websocket message that
/// holds `batched` bytes only while the message stays within `MAX_SENT_MESSAGE`; a message
/// always takes its first frame.
pub fn joins_message(batched: usize, frame: usize) -> bool {
    batched == 0 || batched + frame <= MAX_SENT_MESSAGE
}

/// Largest websocket message accepted after reassembly: a memory bound, not a protocol rule.
pub const MAX_WS_MESSAGE: usize = 1 << 20;
/// The whole HTTP upgrade request must stay under this, or the service rejects it.
pub const MAX_HANDSHAKE_REQUEST: usize = 4096;
/// Client-side bound on an access token (reference localproxy).
pub(crate) const MAX_ACCESS_TOKEN: usize = 4096;
/// Reference clients ping every 20 s; the service never requires pongs.
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(20);
/// A websocket that receives nothing for this long is presumed dead. No source states the
/// service's own idle behaviour; a service that answers pings keeps the link alive, and one
/// that does not (docs/protocol.md §1.5) costs one reconnect per minute while the tunnel is idle.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Subprotocol of the V1 message format.
pub const SUBPROTOCOL_V1: &str = "aws.iot.securetunneling-1.0";
/// Subprotocol of the V2 message format.
pub const SUBPROTOCOL_V2: &str = "aws.iot.securetunneling-2.0";
/// Subprotocol of the V3 message format; the only one this client offers.
pub const SUBPROTOCOL_V3: &str = "aws.iot.securetunneling-3.0";

/// Which end of the tunnel this peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Listens locally and opens streams.
    Source,
    /// Connects streams to local services.
    Destination,
}

impl Mode {
    /// The value of the `local-proxy-mode` query parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Source => "source",
            Mode::Destination => "destination",
        }
    }

    /// The other end of the tunnel.
    pub fn peer(self) -> Mode {
        match self {
            Mode::Source => Mode::Destination,
            Mode::Destination => Mode::Source,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Message format a peer speaks; compatibility lives in the message fields, not the subprotocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Format {
    /// No service id, no connection id, one service.
    V1,
    /// Service ids, no connection ids.
    V2,
    /// Service ids and connection ids (simultaneous connections).
    V3,
}

/// A violation of the wire protocol by the peer or the service: the session cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A text frame arrived.
    #[error("text websocket frame received; the protocol only uses binary frames")]
    TextFrame,
    /// A payload above the limit.
    #[error("message payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge(usize),
    /// Bytes that are not a `Message`.
    #[error("malformed tunnel message: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// A type this schema does not know, not ignorable.
    #[error("message type {0} is not known and not marked ignorable")]
    UnknownType(i32),
    /// A type this end must never receive.
    #[error("{kind:?} is not valid toward a {mode} peer")]
    UnexpectedType {
        /// The type received.
        kind: MessageType,
        /// This end.
        mode: Mode,
    },
    /// A stream-opening message with stream id 0.
    #[error("{0:?} with stream id 0 is invalid")]
    ZeroStreamId(MessageType),
    /// A service id longer than the API allows.
    #[error("a service id of {0} bytes (at most {MAX_SERVICE_ID})")]
    ServiceIdTooLong(usize),
    /// CONNECTION_START on a stream started without connection ids (V1/V2).
    #[error(
        "CONNECTION_START on a stream started without connection ids: a V1/V2 stream carries one connection"
    )]
    ConnectionOnSingleStream,
    /// Required by the tokio-util `Decoder` trait; the frame reader never produces it.
    #[error("i/o error while framing: {0}")]
    Io(#[from] std::io::Error),
}

/// What the session should do with a decoded message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// Act on a message of this type.
    Handle(MessageType),
    /// Drop silently: an ignorable unknown type, or a stream-bound message for stream 0.
    Ignore,
}

/// Rule (docs/protocol.md §3.1, §3.3): which messages a peer in `mode` accepts. Type 0 and unknown
/// types not marked ignorable are errors; only the source opens streams and connections; only the
/// service sends SESSION_RESET and SERVICE_IDS, so those are always accepted from it.
pub(crate) fn admit(mode: Mode, msg: &Message) -> Result<Incoming, ProtocolError> {
    let kind = match msg.kind() {
        Some(MessageType::Unknown) | None if msg.ignorable => return Ok(Incoming::Ignore),
        Some(MessageType::Unknown) | None => return Err(ProtocolError::UnknownType(msg.r#type)),
        Some(kind) => kind,
    };
    if msg.payload.len() > MAX_PAYLOAD {
        return Err(ProtocolError::PayloadTooLarge(msg.payload.len()));
    }
    // Ids are at most 128 characters (the API's pattern); a longer one is not logged or kept.
    if let Some(long) = std::iter::once(&msg.service_id)
        .chain(&msg.available_service_ids)
        .find(|id| id.len() > MAX_SERVICE_ID)
    {
        return Err(ProtocolError::ServiceIdTooLong(long.len()));
    }
    let opens = matches!(
        kind,
        MessageType::StreamStart | MessageType::ConnectionStart
    );
    if opens && mode == Mode::Source {
        return Err(ProtocolError::UnexpectedType { kind, mode });
    }
    if msg.stream_id == 0 {
        if opens {
            return Err(ProtocolError::ZeroStreamId(kind));
        }
        if matches!(
            kind,
            MessageType::Data | MessageType::StreamReset | MessageType::ConnectionReset
        ) {
            return Ok(Incoming::Ignore);
        }
    }
    Ok(Incoming::Handle(kind))
}

/// Rule (docs/protocol.md §3.2): the message format implied by a STREAM_START.
pub(crate) fn format_of_stream_start(service_id: &str, connection_id: u32) -> Format {
    match (service_id.is_empty(), connection_id) {
        (_, c) if c > 0 => Format::V3,
        (false, _) => Format::V2,
        (true, _) => Format::V1,
    }
}

/// Rule (V3 guide, docs/protocol.md §3.1): a connection id of 0 (absent) on STREAM_START,
/// CONNECTION_START, DATA or CONNECTION_RESET means connection 1; the stream's peer then
/// speaks V1/V2 and gets no connection ids back.
pub(crate) fn connection_key(wire: u32) -> u32 {
    wire.max(1)
}

/// What a peer's bad message costs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    /// Drop the message, warn; the session goes on (framing is intact).
    Drop,
    /// Reset the message's stream; the tunnel's other streams go on.
    ResetStream,
    /// The session cannot go on.
    Session,
}

/// Rule (docs/protocol.md §2.1 "end the stream with STREAM_RESET"): a bad message ends only what it
/// belongs to. Its stream, when it names one; nothing when it cannot be attributed (the
/// length prefix still delimits the next frame); the session only when the websocket itself
/// breaks the protocol.
pub(crate) fn violation_scope(stream_id: Option<i32>, err: &ProtocolError) -> Violation {
    match (err, stream_id) {
        (ProtocolError::TextFrame | ProtocolError::Io(_), _) => Violation::Session,
        (_, Some(id)) if id != 0 => Violation::ResetStream,
        _ => Violation::Drop,
    }
}

/// Rule: SERVICE_IDS is read as a set in the peer's order: a repeated id counts once,
/// wherever it repeats.
pub(crate) fn distinct_services(mut ids: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.retain(|id| seen.insert(id.clone()));
    ids
}

/// Rule (docs/protocol.md §3.4): a local connection that ends on its own is reported with
/// CONNECTION_RESET to V3 peers and STREAM_RESET to V1/V2 peers (connection id 0), which ends their
/// stream.
pub(crate) fn reset_on_local_close(
    stream_id: i32,
    service_id: &str,
    connection_id: u32,
) -> Message {
    if connection_id == 0 {
        Message::stream_reset(stream_id, service_id)
    } else {
        Message::connection_reset(stream_id, service_id, connection_id)
    }
}

/// Rule (docs/protocol.md §3.4): a local connect that fails answers STREAM_RESET when it was asked
/// for by STREAM_START (the stream never came up) and CONNECTION_RESET for a CONNECTION_START.
pub(crate) fn reset_on_connect_failure(
    opened_by_stream_start: bool,
    stream_id: i32,
    service_id: &str,
    connection_id: u32,
) -> Message {
    if opened_by_stream_start {
        Message::stream_reset(stream_id, service_id)
    } else {
        reset_on_local_close(stream_id, service_id, connection_id)
    }
}

/// Rule (docs/protocol.md §1.2): a rejected upgrade is retried only for 5xx (service trouble)
/// and 429 (connection rate limit, our own choice); any other 4xx means the token or request
/// is wrong and retrying with the same token cannot help.
pub(crate) fn handshake_status_is_retryable(status: u16) -> bool {
    status == 429 || (500..=599).contains(&status)
}

/// Rule (docs/protocol.md §1.2): client tokens are 32-128 characters of `[a-zA-Z0-9-]`.
pub fn is_valid_client_token(token: &str) -> bool {
    (32..=128).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Rule (docs/protocol.md §1.1): the data-plane host for a region; China regions live under
/// `.com.cn`.
pub(crate) fn data_plane_host(region: &str) -> String {
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    format!("data.tunneling.iot.{region}.{suffix}")
}

/// Rule (API `Service` shape): service ids are 1-128 characters of `[a-zA-Z0-9:_-]`.
pub fn is_valid_service_id(id: &str) -> bool {
    (1..=MAX_SERVICE_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

/// A label of a DNS name: at most 63 bytes (RFC 1035, 2.3.4).
pub const MAX_DNS_LABEL: usize = 63;

/// Rule (docs/protocol.md §5): region names look like `us-east-1`, `cn-north-1`, `us-gov-west-1`:
/// two letters, one or more lowercase words, a number.
pub(crate) fn is_valid_region(region: &str) -> bool {
    // It becomes one label of the data plane's host name (`data_plane_host`).
    if region.len() > MAX_DNS_LABEL {
        return false;
    }
    let parts: Vec<&str> = region.split('-').collect();
    let Some((last, rest)) = parts.split_last() else {
        return false;
    };
    rest.len() >= 2
        && rest[0].len() == 2
        && rest
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && !last.is_empty()
        && last.bytes().all(|b| b.is_ascii_digit())
}

/// Rule (docs/protocol.md §4.1): the reference localproxy refuses an access token that is
/// empty, over 4096 characters or carries control characters before it reaches the wire;
/// so does this agent.
pub(crate) fn access_token_problem(token: &str) -> Option<&'static str> {
    if token.is_empty() {
        Some("the access token is empty")
    } else if token.len() > MAX_ACCESS_TOKEN {
        Some("the access token is longer than 4096 bytes")
    } else if token.chars().any(char::is_control) {
        Some("the access token contains control characters")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: MessageType, stream: i32) -> Message {
        Message {
            r#type: kind as i32,
            stream_id: stream,
            ..Default::default()
        }
    }

    #[test]
    fn type_zero_and_unknown_types_are_errors_unless_ignorable() {
        let mut m = msg(MessageType::Unknown, 1);
        assert!(matches!(
            admit(Mode::Destination, &m),
            Err(ProtocolError::UnknownType(0))
        ));
        m.r#type = 42;
        assert!(matches!(
            admit(Mode::Destination, &m),
            Err(ProtocolError::UnknownType(42))
        ));
        m.ignorable = true;
        assert_eq!(admit(Mode::Destination, &m).unwrap(), Incoming::Ignore);
    }

    #[test]
    fn only_a_destination_accepts_stream_and_connection_start() {
        for kind in [MessageType::StreamStart, MessageType::ConnectionStart] {
            let m = msg(kind, 1);
            assert_eq!(
                admit(Mode::Destination, &m).unwrap(),
                Incoming::Handle(kind)
            );
            assert!(admit(Mode::Source, &m).is_err());
        }
    }

    #[test]
    fn stream_bound_messages_for_stream_zero_are_dropped_or_refused() {
        for kind in [
            MessageType::Data,
            MessageType::StreamReset,
            MessageType::ConnectionReset,
        ] {
            assert_eq!(
                admit(Mode::Destination, &msg(kind, 0)).unwrap(),
                Incoming::Ignore
            );
        }
        assert!(matches!(
            admit(Mode::Destination, &msg(MessageType::StreamStart, 0)),
            Err(ProtocolError::ZeroStreamId(_))
        ));
        let session = msg(MessageType::SessionReset, 0);
        assert_eq!(
            admit(Mode::Source, &session).unwrap(),
            Incoming::Handle(MessageType::SessionReset)
        );
    }

    #[test]
    fn payload_above_64512_bytes_is_rejected() {
        let mut m = msg(MessageType::Data, 1);
        m.payload = vec![0; MAX_PAYLOAD].into();
        assert!(admit(Mode::Source, &m).is_ok());
        m.payload = vec![0; MAX_PAYLOAD + 1].into();
        assert!(matches!(
            admit(Mode::Source, &m),
            Err(ProtocolError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn stream_start_implies_the_peer_format() {
        assert_eq!(format_of_stream_start("", 0), Format::V1);
        assert_eq!(format_of_stream_start("SSH", 0), Format::V2);
        assert_eq!(format_of_stream_start("SSH", 3), Format::V3);
    }

    #[test]
    fn local_close_resets_the_connection_for_v3_and_the_stream_for_v1_v2() {
        let v3 = reset_on_local_close(4, "SSH", 2);
        assert_eq!(v3.kind(), Some(MessageType::ConnectionReset));
        assert_eq!((v3.stream_id, v3.connection_id), (4, 2));
        let v2 = reset_on_local_close(4, "SSH", 0);
        assert_eq!(v2.kind(), Some(MessageType::StreamReset));
        assert_eq!((v2.stream_id, v2.service_id.as_str()), (4, "SSH"));
    }

    #[test]
    fn failed_connect_resets_the_stream_for_stream_start_and_the_connection_otherwise() {
        let first = reset_on_connect_failure(true, 1, "SSH", 1);
        assert_eq!(first.kind(), Some(MessageType::StreamReset));
        let more = reset_on_connect_failure(false, 1, "SSH", 2);
        assert_eq!(more.kind(), Some(MessageType::ConnectionReset));
        assert_eq!(more.connection_id, 2);
    }

    #[test]
    fn handshake_retried_for_5xx_and_429_only() {
        for s in [500, 502, 503, 599, 429] {
            assert!(handshake_status_is_retryable(s), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 300, 200] {
            assert!(!handshake_status_is_retryable(s), "{s}");
        }
    }

    #[test]
    fn client_token_is_32_to_128_alphanumerics_or_dashes() {
        assert!(is_valid_client_token(&uuid::Uuid::new_v4().to_string()));
        assert!(!is_valid_client_token(&"a".repeat(31)));
        assert!(is_valid_client_token(&"a".repeat(128)));
        assert!(!is_valid_client_token(&"a".repeat(129)));
        assert!(!is_valid_client_token(&format!("{}_", "a".repeat(40))));
    }

    #[test]
    fn data_plane_host_uses_com_cn_for_china_regions() {
        assert_eq!(
            data_plane_host("us-east-1"),
            "data.tunneling.iot.us-east-1.amazonaws.com"
        );
        assert_eq!(
            data_plane_host("cn-north-1"),
            "data.tunneling.iot.cn-north-1.amazonaws.com.cn"
        );
    }

    #[test]
    fn service_ids_follow_the_api_pattern() {
        assert!(is_valid_service_id("SSH"));
        assert!(is_valid_service_id("a:b_c-9"));
        assert!(!is_valid_service_id(""));
        assert!(!is_valid_service_id("no space"));
        assert!(!is_valid_service_id(&"x".repeat(129)));
    }

    #[test]
    fn region_names_are_two_letters_words_and_a_number() {
        for r in ["us-east-1", "cn-north-1", "us-gov-west-1", "ap-southeast-2"] {
            assert!(is_valid_region(r), "{r}");
        }
        for r in [
            "",
            "us",
            "us-east",
            "US-EAST-1",
            "useast-1",
            "us-east-x",
            "us--1",
            "u-east-1",
        ] {
            assert!(!is_valid_region(r), "{r}");
        }
    }

    #[test]
    fn a_sent_message_holds_small_frames_up_to_one_largest_frame() {
        assert_eq!(MAX_SENT_MESSAGE, 65_538);
        assert!(joins_message(0, MAX_SENT_MESSAGE), "a largest frame alone");
        assert!(joins_message(100, MAX_SENT_MESSAGE - 100));
        assert!(!joins_message(100, MAX_SENT_MESSAGE - 99));
        assert!(!joins_message(1, MAX_SENT_MESSAGE));
    }

    #[test]
    fn a_region_is_at_most_one_dns_label_long() {
        let longest = format!("us-{}-1", "a".repeat(MAX_DNS_LABEL - 5));
        assert_eq!(longest.len(), MAX_DNS_LABEL);
        assert!(is_valid_region(&longest));
        let longer = format!("us-{}-1", "a".repeat(MAX_DNS_LABEL - 4));
        assert!(!is_valid_region(&longer), "64 bytes");
    }

    #[test]
    fn access_token_must_be_non_empty_bounded_and_printable() {
        assert!(access_token_problem("AQGA").is_none());
        assert!(access_token_problem("").is_some());
        assert!(access_token_problem(&"a".repeat(MAX_ACCESS_TOKEN)).is_none());
        assert!(access_token_problem(&"a".repeat(MAX_ACCESS_TOKEN + 1)).is_some());
        assert_eq!(MAX_ACCESS_TOKEN, 4096);
        assert!(access_token_problem("a\nb").is_some());
    }

    #[test]
    fn a_reassembled_message_holds_several_of_the_largest_frames_within_1_mib() {
        const { assert!(MAX_WS_MESSAGE >= 2 * MAX_WS_FRAME) };
        const { assert!(MAX_WS_MESSAGE <= 1 << 20) };
    }

    #[test]
    fn a_mode_is_shown_as_the_services_mode_name() {
        // The handshake's `local-proxy-mode` and the status file use these words.
        assert_eq!(Mode::Source.to_string(), "source");
        assert_eq!(Mode::Destination.to_string(), "destination");
        assert_eq!(Mode::Source.peer(), Mode::Destination);
    }

    #[test]
    fn connection_id_zero_is_read_as_one() {
        assert_eq!(connection_key(0), 1);
        assert_eq!(connection_key(1), 1);
        assert_eq!(connection_key(7), 7);
    }

    #[test]
    fn a_bad_message_resets_its_stream_not_the_tunnel() {
        let unknown = ProtocolError::UnknownType(42);
        assert_eq!(violation_scope(Some(3), &unknown), Violation::ResetStream);
        assert_eq!(violation_scope(Some(0), &unknown), Violation::Drop);
        let big = ProtocolError::PayloadTooLarge(70_000);
        assert_eq!(violation_scope(Some(3), &big), Violation::ResetStream);
        use prost::Message as _;
        let garbage = ProtocolError::Malformed(Message::decode(&[0xffu8, 0xff][..]).unwrap_err());
        assert_eq!(violation_scope(None, &garbage), Violation::Drop);
        assert_eq!(
            violation_scope(Some(3), &ProtocolError::TextFrame),
            Violation::Session
        );
    }

    #[test]
    fn a_service_id_above_128_bytes_is_refused_before_it_is_logged() {
        let mut m = msg(MessageType::StreamStart, 3);
        m.service_id = "S".repeat(129);
        assert!(matches!(
            admit(Mode::Destination, &m),
            Err(ProtocolError::ServiceIdTooLong(129))
        ));
        m.service_id = "S".repeat(128);
        assert!(admit(Mode::Destination, &m).is_ok());
        let mut ids = msg(MessageType::ServiceIds, 0);
        ids.available_service_ids = vec!["SSH".into(), "x".repeat(4000)];
        assert!(admit(Mode::Destination, &ids).is_err());
    }

    #[test]
    fn service_ids_are_a_set_in_the_peers_order() {
        let ids = ["b", "a", "b", "c", "a"].map(String::from).to_vec();
        assert_eq!(distinct_services(ids), ["b", "a", "c"]);
    }

    #[test]
    fn connection_start_on_a_single_connection_stream_resets_that_stream() {
        assert_eq!(
            violation_scope(Some(3), &ProtocolError::ConnectionOnSingleStream),
            Violation::ResetStream
        );
    }
}

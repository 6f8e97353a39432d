//! The tunnel `Message` (package `com.amazonaws.iot.securedtunneling`), exactly the seven
//! fields of the reference `Message.proto`: the service closes the websocket if the schema is
//! extended, so nothing may be added here.

use bytes::Bytes;

/// One tunnel message (protobuf, `Message.proto`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Message {
    /// `MessageType` as its wire value (unknown values are kept).
    #[prost(enumeration = "MessageType", tag = "1")]
    pub r#type: i32,
    /// Stream the message belongs to; chosen by the source.
    #[prost(int32, tag = "2")]
    pub stream_id: i32,
    /// An unknown type marked ignorable may be dropped.
    #[prost(bool, tag = "3")]
    pub ignorable: bool,
    /// DATA bytes, at most 64512.
    #[prost(bytes = "bytes", tag = "4")]
    pub payload: Bytes,
    /// Service the stream belongs to (V2+); empty for V1 peers.
    #[prost(string, tag = "5")]
    pub service_id: String,
    /// SERVICE_IDS: the tunnel's services.
    #[prost(string, repeated, tag = "6")]
    pub available_service_ids: Vec<String>,
    /// Connection within the stream (V3); 0 means absent.
    #[prost(uint32, tag = "7")]
    pub connection_id: u32,
}

/// `Message.Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MessageType {
    /// Invalid on the wire.
    Unknown = 0,
    /// Payload bytes of one connection.
    Data = 1,
    /// Source opens a stream (its first connection).
    StreamStart = 2,
    /// A stream ends, with all its connections.
    StreamReset = 3,
    /// The service resets every stream.
    SessionReset = 4,
    /// The service lists the tunnel's services (first message).
    ServiceIds = 5,
    /// Source opens another connection on a stream (V3).
    ConnectionStart = 6,
    /// One connection of a stream ends (V3).
    ConnectionReset = 7,
}

impl Message {
    fn control(kind: MessageType, stream_id: i32, service_id: &str, connection_id: u32) -> Self {
        Message {
            r#type: kind as i32,
            stream_id,
            service_id: service_id.to_owned(),
            connection_id,
            ..Default::default()
        }
    }

    /// DATA for one connection.
    pub fn data(stream_id: i32, service_id: &str, connection_id: u32, payload: Bytes) -> Self {
        Message {
            payload,
            ..Self::control(MessageType::Data, stream_id, service_id, connection_id)
        }
    }

    /// STREAM_START; `connection_id` 0 for V1/V2 destinations.
    pub fn stream_start(stream_id: i32, service_id: &str, connection_id: u32) -> Self {
        Self::control(
            MessageType::StreamStart,
            stream_id,
            service_id,
            connection_id,
        )
    }

    /// STREAM_RESET never carries a connection id: receivers must ignore it anyway.
    pub fn stream_reset(stream_id: i32, service_id: &str) -> Self {
        Self::control(MessageType::StreamReset, stream_id, service_id, 0)
    }

    /// CONNECTION_START for a further connection on an active stream.
    pub fn connection_start(stream_id: i32, service_id: &str, connection_id: u32) -> Self {
        Self::control(
            MessageType::ConnectionStart,
            stream_id,
            service_id,
            connection_id,
        )
    }

    /// CONNECTION_RESET for one connection.
    pub fn connection_reset(stream_id: i32, service_id: &str, connection_id: u32) -> Self {
        Self::control(
            MessageType::ConnectionReset,
            stream_id,
            service_id,
            connection_id,
        )
    }

    /// SESSION_RESET (sent only by the service).
    pub fn session_reset() -> Self {
        Self::control(MessageType::SessionReset, 0, "", 0)
    }

    /// SERVICE_IDS (sent only by the service).
    pub fn service_ids(ids: &[String]) -> Self {
        Message {
            r#type: MessageType::ServiceIds as i32,
            available_service_ids: ids.to_vec(),
            ..Default::default()
        }
    }

    /// The type, or `None` for a value this schema does not know.
    pub fn kind(&self) -> Option<MessageType> {
        MessageType::try_from(self.r#type).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn control_constructors_carry_their_type_and_ids() {
        let c = super::Message::connection_start(3, "SSH", 7);
        assert_eq!(c.kind(), Some(MessageType::ConnectionStart));
        assert_eq!(
            (c.stream_id, c.service_id.as_str(), c.connection_id),
            (3, "SSH", 7)
        );
        let ids = vec!["SSH".to_owned(), "HTTP".to_owned()];
        let s = super::Message::service_ids(&ids);
        assert_eq!(s.kind(), Some(MessageType::ServiceIds));
        assert_eq!(s.available_service_ids, ids);
    }

    #[test]
    fn stream_start_encodes_like_the_protocol_guide_example() {
        // docs/protocol.md §2.2: STREAM_START {streamId 1, serviceId "ssh1", connectionId 1}.
        let bytes = Message::stream_start(1, "ssh1", 1).encode_to_vec();
        assert_eq!(
            bytes,
            [
                0x08, 0x02, 0x10, 0x01, 0x2A, 0x04, b's', b's', b'h', b'1', 0x38, 0x01
            ]
        );
    }

    #[test]
    fn default_fields_are_not_on_the_wire() {
        let bytes = Message::session_reset().encode_to_vec();
        assert_eq!(bytes, [0x08, 0x04]);
    }
}

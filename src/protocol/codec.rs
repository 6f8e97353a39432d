//! Tunnel frames (u16 big-endian length + protobuf `Message`) over the byte stream that the
//! websocket binary messages form together. Frame and websocket-message boundaries are
//! unrelated: a frame may span messages and a message may hold several frames.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio_util::codec::{Decoder, Encoder};

use super::{LENGTH_PREFIX, MAX_MESSAGE, MAX_PAYLOAD, Message, ProtocolError};

/// Decodes `Message`s and encodes them with their length prefix.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

/// Splits whole frames (prefix included) without decoding them: the emulator relays verbatim.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawFrameCodec;

/// Rule (docs/protocol.md §2.1): the body length sits in a 2-byte big-endian prefix; the length of
/// the whole frame at the front of `src` (prefix included), or `Err(needed)` with the bytes a whole
/// frame needs while it is incomplete.
fn frame_len(src: &[u8]) -> Result<usize, usize> {
    match src {
        [hi, lo, ..] => Ok(LENGTH_PREFIX + u16::from_be_bytes([*hi, *lo]) as usize),
        _ => Err(LENGTH_PREFIX),
    }
    .and_then(|n| if src.len() >= n { Ok(n) } else { Err(n) })
}

/// A codec that also decodes a whole frame (prefix included) handed over as `Bytes`, so
/// frames sliced out of a websocket message need no copy.
pub trait FrameDecoder: Decoder<Error = ProtocolError> {
    /// Decodes `frame`, a whole frame with its length prefix.
    fn decode_frame(&mut self, frame: Bytes) -> Result<Self::Item, ProtocolError>;
}

/// The whole frame at the front of `src`, decoded, or nothing while it is incomplete (room
/// for the rest is reserved).
fn decode_front<D: FrameDecoder>(
    codec: &mut D,
    src: &mut BytesMut,
) -> Result<Option<D::Item>, ProtocolError> {
    match frame_len(src) {
        Ok(n) => codec.decode_frame(src.split_to(n).freeze()).map(Some),
        Err(needed) => {
            src.reserve(needed - src.len());
            Ok(None)
        }
    }
}

impl FrameDecoder for FrameCodec {
    fn decode_frame(&mut self, frame: Bytes) -> Result<Message, ProtocolError> {
        // Decoding from `Bytes` makes `payload` a slice of the received buffer: no copy.
        // Sizes are checked by `protocol::admit`, which knows the message's stream.
        Ok(Message::decode(frame.slice(LENGTH_PREFIX..))?)
    }
}

impl FrameDecoder for RawFrameCodec {
    fn decode_frame(&mut self, frame: Bytes) -> Result<Bytes, ProtocolError> {
        Ok(frame)
    }
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        decode_front(self, src)
    }
}

impl Decoder for RawFrameCodec {
    type Item = Bytes;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
        decode_front(self, src)
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = ProtocolError;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        if msg.payload.len() > MAX_PAYLOAD {
            return Err(ProtocolError::PayloadTooLarge(msg.payload.len()));
        }
        let len = msg.encoded_len();
        if len > MAX_MESSAGE {
            return Err(ProtocolError::PayloadTooLarge(len));
        }
        dst.reserve(LENGTH_PREFIX + len);
        dst.put_u16(len as u16);
        msg.encode_raw(dst);
        Ok(())
    }
}

/// Turns websocket binary messages into decoded frames. Frames are slices of the message
/// they came in (or of the reader's own buffer, for a frame spanning messages): whoever keeps
/// one beyond the message copies it (`bridge/local/downward.rs` `remainder_to_queue`).
#[derive(Debug, Default)]
pub struct FrameReader<D = FrameCodec> {
    /// The current message's unread part: its whole frames are sliced out of it, no copy.
    head: Bytes,
    /// A frame that goes on in the next message, and what follows it: copied.
    buf: BytesMut,
    codec: D,
}

impl<D: FrameDecoder> FrameReader<D> {
    /// A reader with nothing buffered.
    pub fn new(codec: D) -> Self {
        FrameReader {
            head: Bytes::new(),
            buf: BytesMut::new(),
            codec,
        }
    }

    /// Appends a websocket message. Message boundaries mean nothing to tunnel frames; the
    /// websocket layer bounds frame and message sizes (docs/protocol.md §1.4).
    pub fn push(&mut self, data: Bytes) {
        if self.buf.is_empty() && self.head.is_empty() {
            // Nothing pending: frames are sliced out of the message itself. The spill buffer
            // goes (once its frames do), so one large spill is not held for the session.
            self.buf = BytesMut::new();
            self.head = data;
        } else {
            self.spill_head();
            self.buf.extend_from_slice(&data);
        }
    }

    /// Moves the unread part of the current message behind any pending bytes (a copy).
    fn spill_head(&mut self) {
        if !self.head.is_empty() {
            self.buf.extend_from_slice(&self.head);
            self.head = Bytes::new();
        }
    }

    /// The next whole frame, or `None` until more bytes arrive.
    pub fn next_frame(&mut self) -> Result<Option<D::Item>, ProtocolError> {
        if !self.head.is_empty() {
            match frame_len(&self.head) {
                Ok(n) => return self.codec.decode_frame(self.head.split_to(n)).map(Some),
                // The frame goes on in the next message.
                Err(_) => self.spill_head(),
            }
        }
        if self.buf.is_empty() {
            // Nothing to decode: not even a reserve for a length prefix (an allocation).
            return Ok(None);
        }
        self.codec.decode(&mut self.buf)
    }

    /// Bytes held that do not yet form a whole frame.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.buf.len() + self.head.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageType;
    use proptest::prelude::*;

    fn encode_all(msgs: &[Message]) -> BytesMut {
        let mut out = BytesMut::new();
        for m in msgs {
            FrameCodec.encode(m, &mut out).unwrap();
        }
        out
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            1i32..8,
            any::<i32>(),
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..3000),
            "[a-zA-Z0-9:_-]{0,12}",
            prop::collection::vec("[A-Z]{1,5}", 0..3),
            any::<u32>(),
        )
            .prop_map(|(t, s, ig, p, svc, ids, c)| Message {
                r#type: t,
                stream_id: s,
                ignorable: ig,
                payload: p.into(),
                service_id: svc,
                available_service_ids: ids,
                connection_id: c,
            })
    }

    proptest! {
        #[test]
        fn any_split_of_a_frame_sequence_decodes_to_the_same_messages(
            msgs in prop::collection::vec(arb_message(), 1..12),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let wire = encode_all(&msgs).freeze();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            points.push(0);
            points.push(wire.len());
            points.sort_unstable();
            let mut reader = FrameReader::new(FrameCodec);
            let mut got = Vec::new();
            for w in points.windows(2) {
                reader.push(wire.slice(w[0]..w[1]));
                while let Some(m) = reader.next_frame().unwrap() {
                    got.push(m);
                }
            }
            prop_assert_eq!(got, msgs);
            prop_assert_eq!(reader.pending(), 0);
        }
    }

    #[test]
    fn frame_split_across_two_messages_and_two_frames_in_one() {
        let a = Message::data(1, "SSH", 1, Bytes::from_static(b"hello"));
        let b = Message::stream_reset(1, "SSH");
        let wire = encode_all(&[a.clone(), b.clone(), a.clone()]).freeze();
        let mut reader = FrameReader::new(FrameCodec);
        reader.push(wire.slice(..3));
        assert!(reader.next_frame().unwrap().is_none());
        reader.push(wire.slice(3..));
        let got: Vec<_> = std::iter::from_fn(|| reader.next_frame().unwrap()).collect();
        assert_eq!(got, vec![a.clone(), b, a]);
    }

    #[test]
    fn whole_frames_are_sliced_out_of_their_message_and_spanning_ones_copied() {
        let a = Message::data(1, "SSH", 1, vec![9u8; 1000].into());
        let b = Message::data(1, "SSH", 2, vec![8u8; 3000].into());
        let wire = encode_all(&[a.clone(), b.clone(), a.clone()]).freeze();
        // Shared, as a message sliced out of tungstenite's read buffer is.
        let message = wire.slice(..wire.len() - 100);
        let mut reader = FrameReader::new(FrameCodec);
        reader.push(message.clone());
        let inside = message.as_ptr_range();
        for want in [&a, &b] {
            let got = reader.next_frame().unwrap().unwrap();
            assert_eq!(&got, want);
            assert!(inside.contains(&got.payload.as_ptr()), "payload was copied");
        }
        // The third frame goes on in the next message: copied into the reader's own buffer.
        assert!(reader.next_frame().unwrap().is_none());
        reader.push(wire.slice(wire.len() - 100..));
        let got = reader.next_frame().unwrap().unwrap();
        assert_eq!(got, a);
        assert!(!inside.contains(&got.payload.as_ptr()));
        assert!(reader.next_frame().unwrap().is_none());
        assert_eq!(reader.pending(), 0);
    }

    #[test]
    fn a_message_pushed_before_the_last_is_read_queues_behind_it() {
        let a = Message::data(1, "SSH", 1, vec![1u8; 500].into());
        let b = Message::data(1, "SSH", 2, vec![2u8; 700].into());
        let wire = encode_all(&[a.clone(), b.clone(), a.clone()]).freeze();
        let mut reader = FrameReader::new(FrameCodec);
        reader.push(wire.slice(..600));
        reader.push(wire.slice(600..));
        let got: Vec<_> = std::iter::from_fn(|| reader.next_frame().unwrap()).collect();
        assert_eq!(got, vec![a.clone(), b, a]);
        assert_eq!(reader.pending(), 0);
    }

    #[test]
    fn the_spill_buffer_is_not_kept_once_nothing_spans_messages() {
        let big = Message::data(1, "SSH", 1, vec![3u8; 60_000].into());
        let wire = encode_all(std::slice::from_ref(&big)).freeze();
        let mut reader = FrameReader::new(FrameCodec);
        reader.push(wire.slice(..10));
        assert!(reader.next_frame().unwrap().is_none());
        reader.push(wire.slice(10..));
        let got = reader.next_frame().unwrap().unwrap();
        assert_eq!(got, big);
        assert!(reader.next_frame().unwrap().is_none());
        // The payload shares the spill buffer with the reader until a message starts clean;
        // then the payload alone holds it.
        assert!(!got.payload.is_unique());
        reader.push(encode_all(&[Message::stream_reset(1, "SSH")]).freeze());
        assert!(
            got.payload.is_unique(),
            "the reader still holds the spill buffer"
        );
    }

    #[test]
    fn oversize_payload_is_rejected_on_encode_and_decode() {
        let big = Message::data(1, "", 0, vec![7u8; MAX_PAYLOAD + 1].into());
        assert!(matches!(
            FrameCodec.encode(&big, &mut BytesMut::new()),
            Err(ProtocolError::PayloadTooLarge(_))
        ));
        // Hand-build the oversize frame a broken peer might send: it decodes, and
        // `protocol::admit` refuses it with its stream known.
        let body = big.encode_to_vec();
        let mut wire = BytesMut::new();
        wire.put_u16(body.len() as u16);
        wire.extend_from_slice(&body);
        let got = FrameCodec.decode(&mut wire).unwrap().unwrap();
        assert!(matches!(
            crate::protocol::admit(crate::protocol::Mode::Destination, &got),
            Err(ProtocolError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn largest_payload_fits_one_frame() {
        let max = Message::data(
            i32::MAX,
            "x".repeat(128).as_str(),
            u32::MAX,
            vec![1u8; MAX_PAYLOAD].into(),
        );
        let mut out = BytesMut::new();
        FrameCodec.encode(&max, &mut out).unwrap();
        assert!(out.len() <= LENGTH_PREFIX + MAX_MESSAGE);
        assert_eq!(LENGTH_PREFIX + max.encoded_len(), out.len());
    }

    #[test]
    fn a_frame_split_across_messages_of_any_size_decodes() {
        // A message reassembled from fragments may exceed one websocket frame (131076).
        let big = Message::data(1, "SSH", 1, vec![5u8; MAX_PAYLOAD].into());
        let wire = encode_all(&[big.clone(), big.clone(), big.clone()]).freeze();
        assert!(wire.len() > crate::protocol::MAX_WS_FRAME);
        let mut reader = FrameReader::new(FrameCodec);
        reader.push(wire);
        let got: Vec<_> = std::iter::from_fn(|| reader.next_frame().unwrap()).collect();
        assert_eq!(got, vec![big.clone(), big.clone(), big]);
    }

    #[test]
    fn garbage_body_is_a_malformed_error_not_a_panic() {
        let mut reader = FrameReader::new(FrameCodec);
        reader.push(Bytes::from_static(&[0, 3, 0xff, 0xff, 0xff]));
        assert!(matches!(
            reader.next_frame(),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn a_message_of_exactly_65535_bytes_encodes_and_one_more_is_refused() {
        // The longest service id that, with the largest payload, still fits the prefix.
        let sized = |n: usize| Message::data(1, &"s".repeat(n), 1, vec![0u8; MAX_PAYLOAD].into());
        let n = (0..2000)
            .find(|n| sized(*n).encoded_len() == MAX_MESSAGE)
            .unwrap();
        let mut out = BytesMut::new();
        FrameCodec.encode(&sized(n), &mut out).unwrap();
        assert_eq!(out.len(), LENGTH_PREFIX + MAX_MESSAGE);
        assert_eq!(sized(n + 1).encoded_len(), MAX_MESSAGE + 1);
        assert!(matches!(
            FrameCodec.encode(&sized(n + 1), &mut BytesMut::new()),
            Err(ProtocolError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn the_raw_codec_decodes_the_front_frame_and_leaves_the_rest() {
        let m = Message::stream_start(1, "SSH", 1);
        let wire = encode_all(&[m.clone(), m]);
        let mut src = BytesMut::from(&wire[..wire.len() - 1]);
        let first = RawFrameCodec.decode(&mut src).unwrap().unwrap();
        assert_eq!(first, wire[..wire.len() / 2]);
        assert_eq!(RawFrameCodec.decode(&mut src).unwrap(), None, "incomplete");
        assert_eq!(src.len(), wire.len() / 2 - 1);
    }

    #[test]
    fn raw_codec_returns_whole_frames() {
        let m = Message::stream_start(1, "SSH", 1);
        let wire = encode_all(&[m.clone(), m]).freeze();
        let mut reader = FrameReader::new(RawFrameCodec);
        reader.push(wire.clone());
        let first = reader.next_frame().unwrap().unwrap();
        assert_eq!(first, wire.slice(..wire.len() / 2));
        let decoded = FrameCodec
            .decode(&mut BytesMut::from(&first[..]))
            .unwrap()
            .unwrap();
        assert_eq!(decoded.kind(), Some(MessageType::StreamStart));
        assert!(reader.next_frame().unwrap().is_some());
        assert!(reader.next_frame().unwrap().is_none());
    }
}

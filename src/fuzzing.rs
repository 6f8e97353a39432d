//! Entry points for the fuzz targets (`fuzz/`), compiled only with `--cfg fuzzing`: every
//! parser that takes input from the network or a file, without making it public API.

use std::path::Path;

use bytes::Bytes;

use crate::protocol::{FrameCodec, FrameReader, Mode, admit, violation_scope};

/// Tunnel frames out of websocket messages: the reader, the decoder, the admission rules and
/// the violation scope. The first byte says where the rest is cut into messages.
pub fn frames(data: &[u8]) {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let mut reader = FrameReader::new(FrameCodec);
    for chunk in rest.chunks(usize::from(cut).max(1)) {
        reader.push(Bytes::copy_from_slice(chunk));
        loop {
            match reader.next_frame() {
                Ok(Some(msg)) => {
                    for mode in [Mode::Source, Mode::Destination] {
                        if let Err(e) = admit(mode, &msg) {
                            let _ = violation_scope(Some(msg.stream_id), &e);
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = violation_scope(None, &e);
                }
            }
        }
    }
}

/// The MQTT notify payload parser.
pub fn notify(data: &[u8]) {
    let _ = crate::protocol::notify::parse("fuzz-thing", data);
}

/// The agent's configuration parser and validation.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::parse(text, Path::new("fuzz.toml"));
    }
}

/// The client side of the websocket upgrade against a server's raw response.
pub fn handshake_response(data: &[u8]) {
    let _ = crate::bridge::handshake_against(data);
}

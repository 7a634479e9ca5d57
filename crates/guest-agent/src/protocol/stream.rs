//! Stream frames: process stdio carried as base64 chunks with credit-based flow control.
//!
//! A stream is one direction of one process's stdio, named by an id the agent assigns
//! (unique for the agent's lifetime). The sender of a stream may send data only while it
//! holds credit from the receiver; each data frame uses up its decoded length.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Most decoded bytes in one data frame.
pub const STREAM_CHUNK: usize = 32 * 1024;

/// Credit a receiver keeps outstanding per stream: the most bytes of one stream that can
/// be in flight or buffered by the receiver.
pub const STREAM_WINDOW: u64 = 256 * 1024;

/// One stream line: `{"stream":N,"data":"<base64>"}`, `{"stream":N,"eof":true}` or
/// `{"stream":N,"credit":BYTES}`. Exactly one of `data`, `eof` and `credit` is present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamFrame {
    /// The stream's id.
    pub stream: u64,
    /// A chunk of the stream, base64 (standard alphabet, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The sender will send no more data on this stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub eof: bool,
    /// The receiver accepts this many more bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit: Option<u64>,
}

/// What a [`StreamFrame`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameKind {
    /// Decoded bytes.
    Data(Vec<u8>),
    /// End of the stream.
    Eof,
    /// More credit for the sender.
    Credit(u64),
}

impl StreamFrame {
    /// A data frame carrying `bytes` (at most [`STREAM_CHUNK`] by convention).
    pub fn data(stream: u64, bytes: &[u8]) -> Self {
        StreamFrame {
            stream,
            data: Some(STANDARD.encode(bytes)),
            eof: false,
            credit: None,
        }
    }

    /// An end-of-stream frame.
    pub fn eof(stream: u64) -> Self {
        StreamFrame {
            stream,
            data: None,
            eof: true,
            credit: None,
        }
    }

    /// A credit frame granting `bytes`.
    pub fn credit(stream: u64, bytes: u64) -> Self {
        StreamFrame {
            stream,
            data: None,
            eof: false,
            credit: Some(bytes),
        }
    }

    /// Decodes the frame; a frame with none or several of its fields, or bad base64, is an
    /// error naming the stream.
    pub fn kind(self) -> Result<FrameKind, String> {
        match (self.data, self.eof, self.credit) {
            (Some(data), false, None) => STANDARD
                .decode(data)
                .map(FrameKind::Data)
                .map_err(|e| format!("Stream {} data is not base64: {e}", self.stream)),
            (None, true, None) => Ok(FrameKind::Eof),
            (None, false, Some(credit)) => Ok(FrameKind::Credit(credit)),
            _ => Err(format!(
                "Stream {} frame needs exactly one of data, eof and credit",
                self.stream
            )),
        }
    }

    /// Parses `line` as a stream frame, or `None` when it is not one (a request or response).
    pub fn parse(line: &[u8]) -> Option<Self> {
        // Frames start with their stream id; checking the key first keeps requests and
        // responses from paying for a failed parse.
        let start = line.iter().position(|b| !b.is_ascii_whitespace())?;
        if !line[start..].starts_with(b"{\"stream\"") {
            return None;
        }
        serde_json::from_slice(line).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::to_line;

    #[test]
    fn frames_are_one_field_beside_the_stream_id() {
        assert_eq!(
            to_line(&StreamFrame::data(3, b"hi\n")),
            "{\"stream\":3,\"data\":\"aGkK\"}\n"
        );
        assert_eq!(
            to_line(&StreamFrame::eof(3)),
            "{\"stream\":3,\"eof\":true}\n"
        );
        assert_eq!(
            to_line(&StreamFrame::credit(4, 65536)),
            "{\"stream\":4,\"credit\":65536}\n"
        );
    }

    #[test]
    fn frames_parse_and_decode_and_requests_are_not_frames() {
        let frame = StreamFrame::parse(b"{\"stream\":3,\"data\":\"aGkK\"}\n").unwrap();
        assert_eq!(frame.kind().unwrap(), FrameKind::Data(b"hi\n".to_vec()));
        let frame = StreamFrame::parse(b"{\"stream\":3,\"credit\":10}").unwrap();
        assert_eq!(frame.kind().unwrap(), FrameKind::Credit(10));
        assert!(StreamFrame::parse(b"{\"id\":1,\"type\":\"health\"}").is_none());
        assert!(StreamFrame::parse(b"{\"stream\":3,\"data\":\"x\",\"id\":1}").is_none());
        let both = StreamFrame::parse(b"{\"stream\":3,\"eof\":true,\"credit\":1}").unwrap();
        assert!(both.kind().unwrap_err().contains("exactly one"));
        let bad = StreamFrame::parse(b"{\"stream\":3,\"data\":\"***\"}").unwrap();
        assert!(bad.kind().unwrap_err().starts_with("Stream 3 data"));
    }
}

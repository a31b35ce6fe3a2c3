//! The yamux frame header: 12 bytes, big-endian (hashicorp/yamux `spec.md`).
//!
//! ```text
//! version:u8 = 0 | type:u8 | flags:u16 | stream_id:u32 | length:u32
//! ```
//! `length` is the body size of a Data frame, the window delta of a WindowUpdate, the opaque
//! value of a Ping and the error code of a GoAway; only Data frames carry a body.
//!
//! netchan adds one frame type of its own, [`FrameType::Fds`], sent only to a peer that
//! announced it can receive file descriptors (see docs/protocol.md, "File descriptors").

use super::Violation;

/// Size of every frame header.
pub const HEADER_LEN: usize = 12;

/// The only protocol version yamux defines.
pub(crate) const VERSION: u8 = 0;

/// The four frame types of yamux, and netchan's file-descriptor frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameType {
    /// Stream data; `length` bytes of body follow the header.
    Data = 0,
    /// Grants the peer `length` more bytes of send window on a stream.
    WindowUpdate = 1,
    /// Liveness and round-trip probe on stream 0; `length` is an opaque value echoed back.
    Ping = 2,
    /// The sender accepts no new streams; `length` is an error code ([`GoAwayCode`]).
    GoAway = 3,
    /// netchan's extension: `length` file descriptors travel with this frame as `SCM_RIGHTS`
    /// ancillary data, for the stream it names, ahead of that stream's next data byte. No
    /// body. Only ever sent to a peer that announced it takes them (its first frame, a Ping
    /// with the opaque value "NCFD").
    Fds = 4,
}

/// The opaque value of the Ping (with SYN) by which a side announces, as its first frame,
/// that it receives [`FrameType::Fds`] frames: ASCII "NCFD". Any peer answers it like any
/// ping; only a peer that sends it itself is sent fds.
pub(crate) const FD_ANNOUNCE: u32 = 0x4E43_4644;

/// The most file descriptors one frame carries: the kernel's own limit for one
/// `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const MAX_FDS_PER_FRAME: usize = 253;

/// SYN: opens a stream.
pub const SYN: u16 = 0x1;
/// ACK: acknowledges a stream's SYN, or answers a Ping.
pub const ACK: u16 = 0x2;
/// FIN: the sender will send no more data on the stream (half-close).
pub const FIN: u16 = 0x4;
/// RST: the stream is aborted in both directions.
pub const RST: u16 = 0x8;

/// The error codes a GoAway frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoAwayCode {
    /// A graceful end: no new streams, open ones finish.
    Normal = 0,
    /// The sender saw a protocol violation from the receiver. (The spec's third code,
    /// 2 = internal error, is one we never send; received, it ends the session like 1.)
    ProtocolError = 1,
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The frame's type.
    pub ty: FrameType,
    /// Its flags: [`SYN`], [`ACK`], [`FIN`], [`RST`] (others are ignored).
    pub flags: u16,
    /// The stream it is for; 0 for the session's own frames (Ping, GoAway).
    pub stream: u32,
    /// What the type makes of it: a Data frame's body length, a window update's credit, a
    /// Ping's opaque value, a GoAway's code, an Fds frame's descriptor count.
    pub length: u32,
}

impl Header {
    /// A header with these fields.
    #[inline]
    pub fn new(ty: FrameType, flags: u16, stream: u32, length: u32) -> Header {
        Header {
            ty,
            flags,
            stream,
            length,
        }
    }

    /// Whether all the bits of `flag` are set.
    #[inline]
    pub(crate) fn has(&self, flag: u16) -> bool {
        self.flags & flag == flag
    }

    /// The 12 bytes of this header on the wire.
    #[inline]
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = VERSION;
        b[1] = self.ty as u8;
        b[2..4].copy_from_slice(&self.flags.to_be_bytes());
        b[4..8].copy_from_slice(&self.stream.to_be_bytes());
        b[8..12].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes a header; rejects an unknown version or type. Flags outside SYN/ACK/FIN/RST
    /// are ignored, as the spec leaves them unassigned. (Whether an [`FrameType::Fds`] frame
    /// is acceptable depends on the session: the connection checks that.)
    #[inline]
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, Violation> {
        if b[0] != VERSION {
            return Err(Violation::BadVersion { version: b[0] });
        }
        let ty = match b[1] {
            0 => FrameType::Data,
            1 => FrameType::WindowUpdate,
            2 => FrameType::Ping,
            3 => FrameType::GoAway,
            4 => FrameType::Fds,
            other => return Err(Violation::BadType { ty: other }),
        };
        Ok(Header {
            ty,
            flags: u16::from_be_bytes([b[2], b[3]]),
            stream: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            length: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn data_header_bytes_match_the_spec() {
        let h = Header::new(FrameType::Data, SYN | FIN, 3, 0x0102_0304);
        assert_eq!(h.encode(), [0, 0, 0, 5, 0, 0, 0, 3, 0x01, 0x02, 0x03, 0x04]);
    }

    #[test]
    fn control_headers_bytes_match_the_spec() {
        assert_eq!(
            Header::new(FrameType::WindowUpdate, ACK, 2, 262_144).encode(),
            [0, 1, 0, 2, 0, 0, 0, 2, 0, 4, 0, 0]
        );
        assert_eq!(
            Header::new(FrameType::Ping, SYN, 0, 7).encode(),
            [0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        assert_eq!(
            Header::new(FrameType::GoAway, 0, 0, GoAwayCode::ProtocolError as u32).encode(),
            [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(
            Header::new(FrameType::WindowUpdate, RST, 0xffff_fffe, 0).encode(),
            [0, 1, 0, 8, 0xff, 0xff, 0xff, 0xfe, 0, 0, 0, 0]
        );
    }

    #[test]
    fn bad_version_and_type_are_violations() {
        let mut b = Header::new(FrameType::Data, 0, 1, 0).encode();
        b[0] = 1;
        assert_eq!(
            Header::decode(&b),
            Err(Violation::BadVersion { version: 1 })
        );
        b[0] = 0;
        b[1] = 5;
        assert_eq!(Header::decode(&b), Err(Violation::BadType { ty: 5 }));
    }

    proptest! {
        #[test]
        fn every_valid_header_round_trips(ty in 0u8..5, flags: u16, stream: u32, length: u32) {
            let mut b = [0u8; HEADER_LEN];
            b[1] = ty;
            b[2..4].copy_from_slice(&flags.to_be_bytes());
            b[4..8].copy_from_slice(&stream.to_be_bytes());
            b[8..12].copy_from_slice(&length.to_be_bytes());
            let h = Header::decode(&b).unwrap();
            prop_assert_eq!(h.encode(), b);
        }

        /// Fuzz target of the decoder: any 12 bytes decode or fail with a typed violation.
        #[test]
        fn any_bytes_decode_or_fail_with_a_violation(b in proptest::array::uniform12(any::<u8>())) {
            match Header::decode(&b) {
                Ok(h) => prop_assert_eq!(h.encode(), b),
                Err(Violation::BadVersion { version }) => prop_assert_eq!(version, b[0]),
                Err(Violation::BadType { ty }) => prop_assert!(ty > 4 && b[0] == 0),
                Err(other) => prop_assert!(false, "unexpected {other:?}"),
            }
        }
    }
}

//! The wire format: preamble, frames and envelope headers.
//!
//! A conn starts with each side sending [`PREAMBLE`] (`"NCRPC"` + version).
//! After it, each direction is a sequence of frames:
//!
//! ```text
//! frame    = length:u32 big-endian, body[length]
//! body     = header (codec-encoded Header), payload (rest of the body)
//! ```
//!
//! The payload is the codec encoding of the request, response or stream
//! item, and is empty for the other kinds. Byte-level details, with an
//! example, are in `docs/protocol.md`, Part 2.

use std::{borrow::Cow, time::Duration};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{
    codec::{self, CodecError},
    metadata::Metadata,
    status::Status,
};

/// Protocol version; bumped on any incompatible change.
pub(crate) const VERSION: u8 = 2;
/// The first bytes each side sends: magic then version.
pub(crate) const PREAMBLE: [u8; 6] = [b'N', b'C', b'R', b'P', b'C', VERSION];
/// Bytes in the length prefix of a frame.
pub(crate) const LEN_PREFIX: usize = 4;
/// Longest timeout honoured; longer ones (and deadlines that would overflow
/// `Instant`) are clamped to it, so any value on the wire is safe.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// The id no call uses (clients count theirs up from 1): frames with it
/// concern the conn itself. `Credit { id: CONN_ID, n }` announces the
/// sender's `max_message_size` (`n` bytes); each side sends it right after
/// its preamble. Peers that predate it ignore it, as any credit for an
/// unknown call.
pub(crate) const CONN_ID: u64 = 0;

/// The envelope header that starts every frame body.
///
/// Variant order is part of the wire format (the codec writes the variant
/// index): append new kinds at the end, never reorder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum Header<'a> {
    /// Starts call `id`. The payload is the request.
    Request {
        /// Caller-chosen id, unique among the caller's calls in flight.
        id: u64,
        /// `"Service.Method"` (borrowed from the frame when decoded).
        #[serde(borrow)]
        method: Cow<'a, str>,
        /// Time left until the deadline, nanoseconds; `None` = no deadline,
        /// `Some(0)` = already expired.
        timeout_ns: Option<u64>,
        /// `None` for a unary call; for a server-streaming call, the
        /// initial credit (items the server may send before more credit).
        stream_credit: Option<u32>,
        /// Request metadata.
        metadata: Cow<'a, Metadata>,
    },
    /// Ends unary call `id`. On success (`status` = `None`) the payload is
    /// the response; otherwise it is empty.
    Response {
        /// The call.
        id: u64,
        /// `None` = success.
        status: Option<Status>,
    },
    /// The caller abandoned call `id`; no answer is expected.
    Cancel {
        /// The call.
        id: u64,
    },
    /// One item of server-streaming call `id`; the payload is the item.
    StreamItem {
        /// The call.
        id: u64,
    },
    /// Ends server-streaming call `id` (`None` = finished normally).
    StreamEnd {
        /// The call.
        id: u64,
        /// `None` = success.
        status: Option<Status>,
    },
    /// Grants `n` more items to streaming call `id`: sent by the caller for
    /// the response stream, by the server for a bidirectional call's
    /// request stream.
    Credit {
        /// The call.
        id: u64,
        /// Additional items.
        n: u32,
    },
    /// Starts bidirectional-streaming call `id` (no payload). The caller
    /// then sends the requests as `StreamItem`s within the credit the
    /// server grants, and ends them with `StreamEnd`; the server answers as
    /// for a server-streaming call.
    Open {
        /// Caller-chosen id, unique among the caller's calls in flight.
        id: u64,
        /// `"Service.Method"` (borrowed from the frame when decoded).
        #[serde(borrow)]
        method: Cow<'a, str>,
        /// As in `Request`.
        timeout_ns: Option<u64>,
        /// Initial credit for the response stream.
        credit: u32,
        /// Request metadata.
        metadata: Cow<'a, Metadata>,
    },
    /// The handler of streaming call `id` accepted it (resolved to its
    /// stream); sent before any `StreamItem` of the call. A handler that
    /// refuses answers `StreamEnd` with its status instead. (Version 2.)
    Accept {
        /// The call.
        id: u64,
    },
    /// Response metadata (trailers) of call `id`, set by its handler; sent
    /// just before the call's `Response` or `StreamEnd`, only when there
    /// is some. (Version 2.)
    Trailers {
        /// The call.
        id: u64,
        /// The handler's trailers.
        metadata: Cow<'a, Metadata>,
    },
    /// `count` file descriptors go with the next `Request` or `Response` of
    /// call `id`. Sent only on a mux channel whose session passes them
    /// (`netchan_mux::Session::with_fds`): the descriptors travel as the
    /// mux's own fd frame placed right before this frame's first byte, so
    /// the reader has them once it has read this frame.
    Fds {
        /// The call.
        id: u64,
        /// How many (1..=253).
        count: u32,
    },
}

/// A decoded frame: its header (whose method name borrows from the frame's
/// body, so a call's name costs no allocation) and the (possibly empty)
/// payload.
#[derive(Debug)]
pub(crate) struct Frame<'a> {
    pub(crate) header: Header<'a>,
    pub(crate) payload: Bytes,
}

impl Frame<'_> {
    /// Decodes a frame body (without the length prefix).
    pub(crate) fn decode(body: &Bytes) -> Result<Frame<'_>, CodecError> {
        let (header, used) = codec::decode_prefix::<Header<'_>>(body, "frame header")?;
        let payload = body.slice(used..);
        Ok(Frame { header, payload })
    }
}

impl Header<'_> {
    /// Decodes the header at the start of `head`, the first bytes of a body
    /// whose payload may be cut short.
    pub(crate) fn decode_head(head: &[u8]) -> Result<Header<'_>, CodecError> {
        codec::decode_prefix::<Header<'_>>(head, "frame header").map(|(header, _)| header)
    }
}

/// Encodes a timeout for the wire: nanoseconds, clamped to [`MAX_TIMEOUT`].
pub(crate) fn timeout_to_wire(timeout: Duration) -> u64 {
    timeout.min(MAX_TIMEOUT).as_nanos() as u64
}

/// The local deadline for a timeout received from the wire.
pub(crate) fn deadline_from_wire(timeout_ns: u64, now: Instant) -> Instant {
    let timeout = Duration::from_nanos(timeout_ns).min(MAX_TIMEOUT);
    now.checked_add(timeout)
        .unwrap_or(now + Duration::from_secs(24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_header(h: &Header<'_>) -> Vec<u8> {
        let mut buf = Vec::new();
        codec::encode(&mut buf, h, "header").unwrap();
        buf
    }

    #[test]
    fn request_header_has_the_documented_bytes() {
        let mut md = Metadata::new();
        md.insert("k", "v");
        let h = Header::Request {
            id: 7,
            method: Cow::Borrowed("Echo.echo"),
            timeout_ns: Some(1_000_000_000),
            stream_credit: None,
            metadata: Cow::Owned(md),
        };
        let bytes = encode_header(&h);
        let mut want = vec![0x00, 0x07, 0x09];
        want.extend_from_slice(b"Echo.echo");
        // Some(1e9): 1, then varint u32 marker 252 + LE bytes.
        want.extend_from_slice(&[0x01, 0xfc, 0x00, 0xca, 0x9a, 0x3b]);
        want.extend_from_slice(&[0x00]); // stream_credit None
        want.extend_from_slice(&[0x01, 0x01, b'k', 0x01, b'v']);
        assert_eq!(bytes, want);
    }

    #[test]
    fn response_headers_have_the_documented_bytes() {
        let ok = Header::Response {
            id: 300,
            status: None,
        };
        assert_eq!(encode_header(&ok), vec![0x01, 0xfb, 0x2c, 0x01, 0x00]);
        let err = Header::Response {
            id: 1,
            status: Some(Status::not_found("x")),
        };
        assert_eq!(
            encode_header(&err),
            vec![0x01, 0x01, 0x01, 0x05, 0x01, b'x']
        );
        let credit = Header::Credit { id: 2, n: 8 };
        assert_eq!(encode_header(&credit), vec![0x05, 0x02, 0x08]);
    }

    /// The worked example in docs/protocol.md, Part 2.
    #[test]
    fn the_documented_example_frame_is_exact() {
        let mut md = Metadata::new();
        md.insert("token", "s3cret");
        let mut body = encode_header(&Header::Request {
            id: 1,
            method: Cow::Borrowed("Test.echo"),
            timeout_ns: Some(5_000_000_000),
            stream_credit: None,
            metadata: Cow::Owned(md),
        });
        codec::encode(&mut body, "hi", "payload").unwrap();
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let hex: Vec<String> = frame.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex.join(" "),
            "00 00 00 28 00 01 09 54 65 73 74 2e 65 63 68 6f 01 fd 00 f2 05 2a 01 00 00 00 \
             00 01 05 74 6f 6b 65 6e 06 73 33 63 72 65 74 02 68 69"
        );
    }

    #[test]
    fn a_decoded_requests_method_name_borrows_from_the_frame() {
        let mut body = encode_header(&Header::Request {
            id: 1,
            method: Cow::Borrowed("Svc.m"),
            timeout_ns: None,
            stream_credit: None,
            metadata: Cow::Owned(Metadata::new()),
        });
        body.extend_from_slice(b"req");
        let body = Bytes::from(body);
        let frame = Frame::decode(&body).unwrap();
        let Header::Request { method, .. } = frame.header else {
            panic!("not a request: {:?}", frame.header);
        };
        assert!(matches!(method, Cow::Borrowed("Svc.m")), "{method:?}");
        assert!(body.as_ptr_range().contains(&method.as_ptr()));
        assert_eq!(&frame.payload[..], b"req");
    }

    #[test]
    fn a_header_too_long_for_the_stack_encodes_as_a_short_one_does() {
        for len in [0, 10, 200, 5000] {
            let mut metadata = Metadata::new();
            metadata.insert("k", "v".repeat(len));
            let header = Header::Request {
                id: 7,
                method: Cow::Borrowed("Svc.m"),
                timeout_ns: Some(5),
                stream_credit: None,
                metadata: Cow::Owned(metadata),
            };
            let mut on_stack = Vec::new();
            codec::encode_header(&mut on_stack, &header, "header").unwrap();
            assert_eq!(on_stack, encode_header(&header), "metadata of {len} bytes");
        }
    }

    #[test]
    fn frames_split_header_and_payload() {
        let mut body = encode_header(&Header::StreamItem { id: 3 });
        body.extend_from_slice(b"payload");
        let body = Bytes::from(body);
        let frame = Frame::decode(&body).unwrap();
        assert_eq!(frame.header, Header::StreamItem { id: 3 });
        assert_eq!(&frame.payload[..], b"payload");
    }

    #[test]
    fn huge_timeouts_are_clamped_and_zero_is_now() {
        let now = Instant::now();
        assert_eq!(deadline_from_wire(0, now), now);
        assert_eq!(deadline_from_wire(u64::MAX, now), now + MAX_TIMEOUT);
        assert_eq!(
            timeout_to_wire(Duration::MAX),
            MAX_TIMEOUT.as_nanos() as u64
        );
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn arb_status() -> impl Strategy<Value = Option<Status>> {
        proptest::option::of(
            (0u32..20, ".{0,40}").prop_map(|(c, m)| Status::new(crate::Code::from(c), m)),
        )
    }

    fn arb_header() -> impl Strategy<Value = Header<'static>> {
        prop_oneof![
            (
                any::<u64>(),
                ".{0,30}",
                any::<Option<u64>>(),
                any::<Option<u32>>(),
                proptest::collection::vec((".{0,10}", ".{0,10}"), 0..4)
            )
                .prop_map(|(id, m, t, c, md)| Header::Request {
                    id,
                    method: Cow::Owned(m),
                    timeout_ns: t,
                    stream_credit: c,
                    metadata: Cow::Owned(md.into_iter().collect()),
                }),
            (any::<u64>(), arb_status()).prop_map(|(id, status)| Header::Response { id, status }),
            any::<u64>().prop_map(|id| Header::Cancel { id }),
            any::<u64>().prop_map(|id| Header::StreamItem { id }),
            (any::<u64>(), arb_status()).prop_map(|(id, status)| Header::StreamEnd { id, status }),
            (any::<u64>(), any::<u32>()).prop_map(|(id, n)| Header::Credit { id, n }),
            any::<u64>().prop_map(|id| Header::Accept { id }),
            (any::<u64>(), any::<u32>()).prop_map(|(id, count)| Header::Fds { id, count }),
            any::<u64>().prop_map(|id| Header::Trailers {
                id,
                metadata: Cow::Owned(Metadata::from_iter([("k", "v")])),
            }),
            (any::<u64>(), ".{0,30}", any::<Option<u64>>(), any::<u32>()).prop_map(
                |(id, m, t, credit)| Header::Open {
                    id,
                    method: Cow::Owned(m),
                    timeout_ns: t,
                    credit,
                    metadata: Cow::Owned(Metadata::new()),
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic_the_frame_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Frame::decode(&Bytes::from(bytes));
        }

        #[test]
        fn headers_encode_alike_on_the_stack_and_in_place(h in arb_header()) {
            let mut on_stack = Vec::new();
            codec::encode_header(&mut on_stack, &h, "header").unwrap();
            let mut in_place = Vec::new();
            codec::encode(&mut in_place, &h, "header").unwrap();
            prop_assert_eq!(on_stack, in_place);
        }

        #[test]
        fn headers_round_trip_and_keep_their_payload(h in arb_header(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut body = Vec::new();
            codec::encode(&mut body, &h, "header").unwrap();
            body.extend_from_slice(&payload);
            let body = Bytes::from(body);
            let frame = Frame::decode(&body).unwrap();
            prop_assert_eq!(frame.header, h);
            prop_assert_eq!(&frame.payload[..], &payload[..]);
        }

        #[test]
        fn mutated_frames_never_panic_the_decoder(h in arb_header(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>()) {
            let mut body = Vec::new();
            codec::encode(&mut body, &h, "header").unwrap();
            for (i, b) in flips {
                let i = i.index(body.len());
                body[i] = b;
            }
            let keep = cut.index(body.len() + 1);
            body.truncate(keep);
            let _ = Frame::decode(&Bytes::from(body));
        }
    }
}

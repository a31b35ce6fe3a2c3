//! [`Error`]: why an rpc conn failed (transport and protocol errors).

use std::{io, time::Duration};

use crate::{codec::CodecError, status::Status};

/// A transport or protocol failure of one conn.
///
/// [`Server::serve`](crate::Server::serve) returns it; a [`Client`](crate::Client)
/// reports it to its callers as a [`Status`] with code `Unavailable` (or
/// `ResourceExhausted` / `Internal` for a message it refused to send).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing the conn failed (the cause is in the message, so
    /// not also a `source`, as with [`Status`]).
    #[error("i/o error on rpc conn: {0}")]
    Io(io::Error),
    /// The peer's first bytes were not the netchan-rpc preamble.
    #[error("peer is not speaking netchan-rpc (preamble bytes {got:02x?})")]
    BadPreamble {
        /// The bytes received instead.
        got: Vec<u8>,
    },
    /// The peer speaks another version of the protocol.
    #[error("rpc protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u8,
        /// The peer's version.
        theirs: u8,
    },
    /// The peer sent no preamble in time.
    #[error("peer sent no rpc preamble within {after:?}")]
    HandshakeTimeout {
        /// The configured wait.
        after: Duration,
    },
    /// The peer announced a frame longer than the maximum message size; the
    /// conn ends before any buffer for it is allocated.
    #[error("peer announced a {len}-byte frame, over the {max}-byte limit")]
    FrameTooLarge {
        /// The announced length.
        len: u64,
        /// The configured maximum.
        max: usize,
    },
    /// A message we were asked to send is larger than the maximum message
    /// size, ours or the one the peer announced; nothing was written.
    #[error("message exceeds {} limit of {max} bytes; refused before sending", whose(*.by_peer))]
    MessageTooLarge {
        /// The limit it is over.
        max: usize,
        /// Whether that is the peer's announced `max_message_size` (else ours).
        by_peer: bool,
    },
    /// The peer began a frame but did not complete it within the frame
    /// deadline ([`Config::frame_timeout`](crate::Config::frame_timeout)).
    #[error("peer did not complete a frame within {after:?} ({received} bytes of it arrived)")]
    FrameTimeout {
        /// The configured deadline.
        after: Duration,
        /// Bytes of the frame (length prefix included) that did arrive.
        received: usize,
    },
    /// The peer accepted none of our bytes for
    /// [`Config::write_stall_timeout`](crate::Config::write_stall_timeout)
    /// while frames waited to be written: it stopped reading.
    #[error("peer read nothing for {after:?} ({pending} bytes waiting to be written)")]
    WriteStalled {
        /// The configured bound.
        after: Duration,
        /// Bytes the writer still had to write.
        pending: usize,
    },
    /// A reply was refused because replies already waiting for the peer to
    /// read them hold the conn's outbound budget
    /// ([`Config::max_outbound_bytes`](crate::Config::max_outbound_bytes)).
    #[error(
        "a {len}-byte reply would exceed the outbound budget: {waiting} bytes of replies \
         already wait for the peer to read (limit {limit})"
    )]
    OutboundFull {
        /// The encoded size of the refused reply.
        len: usize,
        /// Bytes of replies already waiting.
        waiting: usize,
        /// The configured budget.
        limit: usize,
    },
    /// The peer sent a frame that does not decode.
    #[error("malformed frame from peer: {0}")]
    Malformed(CodecError),
    /// A message could not be encoded.
    #[error("could not encode message: {0}")]
    Encode(CodecError),
    /// The peer sent a well-formed frame that breaks the protocol.
    #[error("protocol violation by peer: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// The conn is closed.
    #[error("rpc conn is closed")]
    Closed,
}

impl From<io::Error> for Error {
    fn from(error: io::Error) -> Error {
        Error::Io(error)
    }
}

impl Error {
    /// The status a caller sees when its call fails because of this error.
    pub(crate) fn to_status(&self) -> Status {
        match self {
            Error::MessageTooLarge { .. } | Error::OutboundFull { .. } => {
                Status::resource_exhausted(self.to_string())
            }
            Error::Encode(_) => Status::internal(self.to_string()),
            _ => Status::conn_lost(chain(self)),
        }
    }
}

fn whose(by_peer: bool) -> &'static str {
    if by_peer {
        "the peer's"
    } else {
        "our"
    }
}

/// `err` and its sources joined with ": " on one line (`outer: cause: root cause`), for a
/// message or a log line that shows every layer of an error. Bounded by the (finite) source
/// chain.
///
/// ```
/// let err = netchan_rpc::Error::from(std::io::Error::other("reset"));
/// assert_eq!(netchan_rpc::chain(&err), "i/o error on rpc conn: reset");
/// ```
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 24, item 10: the cause is in the message, as with `Status`,
    /// and not repeated as a source.
    #[test]
    fn an_io_error_shows_its_cause_once() {
        let err = Error::from(io::Error::other("connection reset by peer"));
        assert_eq!(
            err.to_string(),
            "i/o error on rpc conn: connection reset by peer"
        );
        assert!(std::error::Error::source(&err).is_none());
        assert_eq!(chain(&err), err.to_string());
    }
}

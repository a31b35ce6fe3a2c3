//! Errors of sessions and channels, and why a session ended.

use netchan_mux_proto::Violation;
use std::{fmt, io, sync::Arc, time::Duration};

/// What went wrong with a session or channel operation.
///
/// Each variant names what failed (the channel name, the limit…) so the message can be acted on.
/// Converts into [`io::Error`] with a matching [`io::ErrorKind`] for the `AsyncRead`/`AsyncWrite`
/// path of [`Conn`](crate::Conn).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The channel name breaks a naming rule (empty, longer than 255 bytes, control characters).
    #[error("invalid channel name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// [`Session::listen`](crate::Session::listen) on a name that already has a listener.
    #[error("channel name {name:?} already has a listener on this session")]
    NameInUse {
        /// The name in use.
        name: String,
    },
    /// The peer has nobody listening on this name.
    #[error("peer has no listener for channel {name:?}")]
    NoListener {
        /// The dialed name.
        name: String,
    },
    /// The peer refused the channel for another reason (its channel limit, it is closing, …).
    #[error("peer refused channel {name:?}: {reason}")]
    Refused {
        /// The dialed name.
        name: String,
        /// Why, as sent by the peer.
        reason: String,
    },
    /// The peer did not answer the channel-open handshake in time.
    #[error("channel {name:?}: no handshake answer within {after:?}")]
    HandshakeTimeout {
        /// The dialed name.
        name: String,
        /// The configured handshake timeout.
        after: Duration,
    },
    /// This session already has its maximum number of open channels (dials in flight included).
    #[error("too many open channels on this session (limit {limit})")]
    TooManyChannels {
        /// [`Config::max_channels`](crate::Config::max_channels).
        limit: usize,
    },
    /// The peer broke the channel-open handshake (bad bytes, unknown status, wrong version).
    #[error("channel {name:?}: handshake protocol violation: {detail}")]
    Handshake {
        /// The channel name, as far as known.
        name: String,
        /// What was wrong.
        detail: String,
    },
    /// File descriptors cannot go over this channel: its session's link is not a unix
    /// socket set up to carry them ([`Session::with_fds`](crate::Session::with_fds)), or
    /// the peer did not announce that it takes them. Nothing was sent.
    #[error("channel {name:?}: cannot send file descriptors: {reason}")]
    FdsUnsupported {
        /// The channel.
        name: String,
        /// Which of the two it is.
        reason: &'static str,
    },
    /// More file descriptors at once than one message carries (the kernel's `SCM_MAX_FD`).
    /// Nothing was sent.
    #[error("channel {name:?}: {count} file descriptors at once; at most {limit} travel together")]
    TooManyFds {
        /// The channel.
        name: String,
        /// How many were given.
        count: usize,
        /// The limit (253).
        limit: usize,
    },
    /// The session has ended (or is closing and refuses new work).
    #[error("session closed: {0}")]
    SessionClosed(CloseReason),
    /// An I/O error on a channel.
    #[error("channel i/o error: {0}")]
    Io(io::Error),
}

impl From<io::Error> for Error {
    fn from(error: io::Error) -> Error {
        Error::Io(error)
    }
}

impl Error {
    fn io_kind(&self) -> io::ErrorKind {
        match self {
            Error::InvalidName { .. } => io::ErrorKind::InvalidInput,
            Error::NameInUse { .. } => io::ErrorKind::AddrInUse,
            Error::NoListener { .. } | Error::Refused { .. } => io::ErrorKind::ConnectionRefused,
            Error::HandshakeTimeout { .. } => io::ErrorKind::TimedOut,
            Error::TooManyChannels { .. } => io::ErrorKind::WouldBlock,
            Error::Handshake { .. } => io::ErrorKind::InvalidData,
            Error::FdsUnsupported { .. } => io::ErrorKind::Unsupported,
            Error::TooManyFds { .. } => io::ErrorKind::InvalidInput,
            Error::SessionClosed(reason) => reason.io_kind(),
            Error::Io(e) => e.kind(),
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io(inner) => inner,
            other => io::Error::new(other.io_kind(), other),
        }
    }
}

/// Why a session ended. Cloned to every waiter of [`Session::closed`](crate::Session::closed).
#[non_exhaustive]
#[derive(Debug, Clone)]
pub enum CloseReason {
    /// This side closed it ([`Session::close`](crate::Session::close), or every handle dropped).
    Local,
    /// The peer closed it gracefully.
    Peer,
    /// The peer stopped answering: nothing arrived for `after` (keepalive interval + timeout).
    KeepaliveTimeout {
        /// How long the link had been silent when the session was closed.
        after: Duration,
    },
    /// The underlying byte stream failed, or ended without the peer closing the session.
    Io(Arc<io::Error>),
    /// The peer violated the yamux protocol; says how. We answered with a GoAway carrying
    /// the protocol-error code.
    ProtocolViolation(Violation),
    /// The peer ended the session with a GoAway carrying an error code (1: we violated the
    /// protocol, 2: it failed internally).
    PeerError {
        /// The GoAway error code.
        code: u32,
    },
    /// File descriptors from the peer were lost: the kernel truncated the control message
    /// that carried them (`MSG_CTRUNC`), most likely because this process ran out of file
    /// descriptors. The session cannot tell which channel later ones belong to, so it ends.
    FdsTruncated,
}

impl CloseReason {
    /// Whether the session ended because something went wrong (not a graceful close).
    pub fn is_error(&self) -> bool {
        !matches!(self, CloseReason::Local | CloseReason::Peer)
    }

    pub(crate) fn io_kind(&self) -> io::ErrorKind {
        match self {
            CloseReason::Local => io::ErrorKind::NotConnected,
            CloseReason::Peer => io::ErrorKind::ConnectionReset,
            CloseReason::KeepaliveTimeout { .. } => io::ErrorKind::TimedOut,
            CloseReason::Io(e) => match e.kind() {
                io::ErrorKind::UnexpectedEof => io::ErrorKind::ConnectionAborted,
                kind => kind,
            },
            CloseReason::ProtocolViolation(_) => io::ErrorKind::InvalidData,
            CloseReason::PeerError { .. } => io::ErrorKind::ConnectionAborted,
            CloseReason::FdsTruncated => io::ErrorKind::Other,
        }
    }

    pub(crate) fn to_io_error(&self) -> io::Error {
        io::Error::new(self.io_kind(), Error::SessionClosed(self.clone()))
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Local => f.write_str("closed by this side"),
            CloseReason::Peer => f.write_str("closed by the peer"),
            CloseReason::KeepaliveTimeout { after } => {
                write!(
                    f,
                    "keepalive timeout: nothing received from the peer for {after:?}"
                )
            }
            CloseReason::Io(e) => write!(f, "connection i/o error: {e}"),
            CloseReason::ProtocolViolation(v) => write!(f, "peer violated the protocol: {v}"),
            CloseReason::PeerError { code } => {
                write!(f, "peer ended the session with go-away error code {code}")
            }
            CloseReason::FdsTruncated => f.write_str(
                "file descriptors from the peer were lost: the kernel truncated their control \
                 message (is this process out of file descriptors?)",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_shows_its_cause_once() {
        let err = Error::from(io::Error::other("broken pipe"));
        assert_eq!(err.to_string(), "channel i/o error: broken pipe");
        assert!(std::error::Error::source(&err).is_none());
    }
}

//! The errors of [`connect`](crate::connect), [`bind`](crate::bind) and
//! [`Listener::accept`](crate::Listener::accept).

use std::{io, path::PathBuf, time::Duration};

use super::{Addr, AddrError};

/// Why [`connect`](crate::connect) gave no session.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address string did not parse.
    #[error(transparent)]
    Addr(#[from] AddrError),
    /// The connection did not complete within the connect timeout.
    #[error("connecting to {addr} timed out after {after:?}")]
    Timeout {
        /// Where to.
        addr: Addr,
        /// The timeout.
        after: Duration,
    },
    /// The connection failed (refused, unreachable, no such socket file...).
    #[error("cannot connect to {addr}: {error}")]
    Io {
        /// Where to.
        addr: Addr,
        /// Why (shown in the message, so not also a `source`).
        error: io::Error,
    },
    /// A `tls://` address with no [`TlsClient`](crate::net::TlsClient) in the options.
    #[error("{addr} needs TLS but no TLS client configuration was given")]
    TlsNotConfigured {
        /// The address.
        addr: Addr,
    },
    /// A TLS configuration was given for an address that is not `tls://`: refused rather than
    /// silently connecting in the clear.
    #[error("a TLS configuration was given but {addr} is not a tls:// address")]
    TlsForPlainAddr {
        /// The address.
        addr: Addr,
    },
    /// The TLS handshake failed: the error says which side did not trust whom.
    #[cfg(feature = "tls")]
    #[error("TLS with {addr} failed: {error}")]
    Tls {
        /// Where to.
        addr: Addr,
        /// What went wrong (shown in the message, so not also a `source`).
        error: super::TlsError,
    },
}

/// Why [`bind`](crate::bind) gave no listener.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The address string did not parse.
    #[error(transparent)]
    Addr(#[from] AddrError),
    /// The socket could not be bound (address in use, permission, no such directory...).
    #[error("cannot bind {addr}: {error}")]
    Io {
        /// Where.
        addr: Addr,
        /// Why (shown in the message, so not also a `source`).
        error: io::Error,
    },
    /// A Unix socket file at the path has a live listener behind it.
    #[error("unix socket {path} is in use: a listener answers on it")]
    UnixSocketInUse {
        /// The socket file.
        path: PathBuf,
    },
    /// Something that is not a socket exists at the path: never removed for you.
    #[error("refusing to replace {path}: it exists and is not a socket")]
    NotASocket {
        /// The file.
        path: PathBuf,
    },
    /// A `tls://` address with no [`TlsServer`](crate::net::TlsServer) in the options.
    #[error("{addr} needs TLS but no TLS server configuration was given")]
    TlsNotConfigured {
        /// The address.
        addr: Addr,
    },
    /// A TLS configuration was given for an address that is not `tls://`.
    #[error("a TLS configuration was given but {addr} is not a tls:// address")]
    TlsForPlainAddr {
        /// The address.
        addr: Addr,
    },
}

/// Why [`Listener::accept`](crate::Listener::accept) gave no session this time.
///
/// Each error is about one incoming connection (or one failed `accept(2)`): the listener
/// carries on, and the next call may well return a session.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// `accept(2)` failed (out of file descriptors, say); the listener backs off briefly.
    #[error("accepting a connection failed: {error}")]
    Io {
        /// Why (shown in the message, so not also a `source`).
        error: io::Error,
    },
    /// A connection came in but its TLS handshake failed: the error says which side did not
    /// trust whom.
    #[cfg(feature = "tls")]
    #[error("TLS with {peer} failed: {error}")]
    Tls {
        /// The peer's address.
        peer: String,
        /// What went wrong (shown in the message, so not also a `source`).
        error: super::TlsError,
    },
}

//! [`Status`]: the outcome of a failed call, a gRPC [`Code`] plus a message.

use std::{error::Error as StdError, fmt, io, sync::Arc};

use serde::{Deserialize, Serialize};

/// A gRPC status code (the failure codes; success is `Ok(..)` of the call).
///
/// The numeric values are gRPC's and are what travels on the wire; a number
/// this crate does not know decodes as [`Code::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u32", from = "u32")]
pub enum Code {
    /// The call was cancelled, typically by the caller.
    Cancelled = 1,
    /// An error with no better code.
    Unknown = 2,
    /// The request was malformed or could not be decoded.
    InvalidArgument = 3,
    /// The deadline passed before the call completed.
    DeadlineExceeded = 4,
    /// A requested entity was not found.
    NotFound = 5,
    /// The entity a call tried to create already exists.
    AlreadyExists = 6,
    /// The caller may not do this.
    PermissionDenied = 7,
    /// A limit was hit: in-flight calls, message size, quota.
    ResourceExhausted = 8,
    /// The system is not in the state the call requires.
    FailedPrecondition = 9,
    /// The call was aborted, typically by a concurrency conflict.
    Aborted = 10,
    /// An argument was outside its valid range.
    OutOfRange = 11,
    /// The method is not implemented or not registered.
    Unimplemented = 12,
    /// An invariant broke on the serving side (a handler panicked, say).
    Internal = 13,
    /// The service is unreachable: the connection is gone or never came up.
    Unavailable = 14,
    /// Unrecoverable data loss or corruption.
    DataLoss = 15,
    /// The caller did not present valid credentials.
    Unauthenticated = 16,
}

impl Code {
    /// The code's name as gRPC spells it, e.g. `"DEADLINE_EXCEEDED"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl From<Code> for u32 {
    fn from(code: Code) -> u32 {
        code as u32
    }
}

impl From<u32> for Code {
    /// Maps gRPC's numbers to codes; anything else (including 0, "OK", which
    /// is never a failure) becomes [`Code::Unknown`].
    fn from(n: u32) -> Code {
        match n {
            1 => Code::Cancelled,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            5 => Code::NotFound,
            6 => Code::AlreadyExists,
            7 => Code::PermissionDenied,
            8 => Code::ResourceExhausted,
            9 => Code::FailedPrecondition,
            10 => Code::Aborted,
            11 => Code::OutOfRange,
            12 => Code::Unimplemented,
            13 => Code::Internal,
            14 => Code::Unavailable,
            15 => Code::DataLoss,
            16 => Code::Unauthenticated,
            _ => Code::Unknown,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call failed: a [`Code`] and a human-readable message.
///
/// Handlers return it as their error; clients receive it for remote failures
/// and for local ones (deadline passed, connection lost, message too large).
///
/// Only the code and the message travel. Two things stay local to the
/// process that made the status: its [`source`](StdError::source) (the
/// `io::Error` behind a [`From<io::Error>`](#impl-From<Error>-for-Status)
/// status, the transport error behind a lost conn), and
/// [`is_conn_lost`](Status::is_conn_lost). Equality compares code and
/// message only.
///
/// ```
/// use netchan_rpc::{Code, Status};
///
/// fn read_config(path: &str) -> Result<String, Status> {
///     // `?` maps the I/O error: a missing file is `NotFound`.
///     Ok(std::fs::read_to_string(path)?)
/// }
/// let err = read_config("/no/such/file").unwrap_err();
/// assert_eq!(err.code(), Code::NotFound);
/// assert!(std::error::Error::source(&err).is_some());
/// ```
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    code: Code,
    message: String,
    /// The local cause; never sent.
    #[serde(skip)]
    source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
    /// Set on the statuses a client or server makes when its conn to the
    /// peer is gone; never sent (a status relayed from a peer that lost
    /// *its* peer is an ordinary `Unavailable` here).
    #[serde(skip)]
    conn_lost: bool,
}

impl PartialEq for Status {
    fn eq(&self, other: &Status) -> bool {
        self.code == other.code && self.message == other.message
    }
}

impl Eq for Status {}

macro_rules! status_ctors {
    ($($(#[$doc:meta])* $name:ident => $code:ident,)*) => {
        $(
            $(#[$doc])*
            pub fn $name(message: impl Into<String>) -> Status {
                Status::new(Code::$code, message)
            }
        )*
    };
}

impl Status {
    /// A status with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
            source: None,
            conn_lost: false,
        }
    }

    /// An `Unavailable` status saying the conn to the peer is gone (see
    /// [`Status::is_conn_lost`]).
    pub(crate) fn conn_lost(message: impl Into<String>) -> Status {
        Status {
            conn_lost: true,
            ..Status::unavailable(message)
        }
    }

    /// This status with `source` as its local cause (returned by
    /// [`Error::source`](StdError::source); not sent to the peer).
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Status {
        self.source = Some(Arc::new(source));
        self
    }

    /// True when the call failed because the conn to the peer is gone (it
    /// closed, failed, or this side shut it down): the machine-readable
    /// "peer gone", as opposed to an `Unavailable` status the peer sent.
    /// The code is then [`Code::Unavailable`]; the message says why.
    pub fn is_conn_lost(&self) -> bool {
        self.conn_lost
    }

    /// The status code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    status_ctors! {
        /// A [`Code::Cancelled`] status.
        cancelled => Cancelled,
        /// A [`Code::Unknown`] status.
        unknown => Unknown,
        /// A [`Code::InvalidArgument`] status.
        invalid_argument => InvalidArgument,
        /// A [`Code::DeadlineExceeded`] status.
        deadline_exceeded => DeadlineExceeded,
        /// A [`Code::NotFound`] status.
        not_found => NotFound,
        /// A [`Code::AlreadyExists`] status.
        already_exists => AlreadyExists,
        /// A [`Code::PermissionDenied`] status.
        permission_denied => PermissionDenied,
        /// A [`Code::ResourceExhausted`] status.
        resource_exhausted => ResourceExhausted,
        /// A [`Code::FailedPrecondition`] status.
        failed_precondition => FailedPrecondition,
        /// A [`Code::Aborted`] status.
        aborted => Aborted,
        /// A [`Code::OutOfRange`] status.
        out_of_range => OutOfRange,
        /// A [`Code::Unimplemented`] status.
        unimplemented => Unimplemented,
        /// A [`Code::Internal`] status.
        internal => Internal,
        /// A [`Code::Unavailable`] status.
        unavailable => Unavailable,
        /// A [`Code::DataLoss`] status.
        data_loss => DataLoss,
        /// A [`Code::Unauthenticated`] status.
        unauthenticated => Unauthenticated,
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl StdError for Status {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl From<io::Error> for Status {
    /// Maps the error's kind to the closest code (`NotFound` → `NotFound`,
    /// `PermissionDenied` → `PermissionDenied`, `TimedOut` →
    /// `DeadlineExceeded`, a refused or broken connection → `Unavailable`,
    /// bad input or data → `InvalidArgument`, a full disk → `ResourceExhausted`,
    /// anything else → `Unknown`), keeps its text as the message and the
    /// error itself as the local [`source`](StdError::source).
    fn from(err: io::Error) -> Status {
        use io::ErrorKind as K;
        let code = match err.kind() {
            K::NotFound => Code::NotFound,
            K::PermissionDenied | K::ReadOnlyFilesystem => Code::PermissionDenied,
            K::AlreadyExists => Code::AlreadyExists,
            K::InvalidInput | K::InvalidData | K::InvalidFilename => Code::InvalidArgument,
            K::TimedOut => Code::DeadlineExceeded,
            K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::NotConnected
            | K::BrokenPipe
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::NetworkDown
            | K::AddrNotAvailable => Code::Unavailable,
            K::WouldBlock | K::ResourceBusy | K::Interrupted => Code::Unavailable,
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge | K::OutOfMemory => {
                Code::ResourceExhausted
            }
            K::IsADirectory | K::NotADirectory | K::DirectoryNotEmpty => Code::FailedPrecondition,
            K::UnexpectedEof => Code::OutOfRange,
            K::Unsupported => Code::Unimplemented,
            _ => Code::Unknown,
        };
        Status::new(code, err.to_string()).with_source(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_their_grpc_numbers() {
        for n in 1..=16u32 {
            assert_eq!(u32::from(Code::from(n)), n);
        }
        assert_eq!(Code::from(0), Code::Unknown);
        assert_eq!(Code::from(9999), Code::Unknown);
    }

    #[test]
    fn io_errors_map_to_the_closest_code_and_keep_their_source() {
        let cases = [
            (io::ErrorKind::NotFound, Code::NotFound),
            (io::ErrorKind::PermissionDenied, Code::PermissionDenied),
            (io::ErrorKind::AlreadyExists, Code::AlreadyExists),
            (io::ErrorKind::InvalidData, Code::InvalidArgument),
            (io::ErrorKind::TimedOut, Code::DeadlineExceeded),
            (io::ErrorKind::ConnectionReset, Code::Unavailable),
            (io::ErrorKind::StorageFull, Code::ResourceExhausted),
            (io::ErrorKind::UnexpectedEof, Code::OutOfRange),
            (io::ErrorKind::Unsupported, Code::Unimplemented),
            (io::ErrorKind::Other, Code::Unknown),
        ];
        for (kind, code) in cases {
            let status = Status::from(io::Error::new(kind, "boom"));
            assert_eq!(status.code(), code, "{kind:?}");
            assert_eq!(status.message(), "boom");
            let source = status.source().expect("the io error is kept");
            let io = source.downcast_ref::<io::Error>().expect("an io::Error");
            assert_eq!(io.kind(), kind);
            assert!(!status.is_conn_lost());
        }
    }

    #[test]
    fn source_and_conn_lost_stay_local_and_do_not_affect_equality() {
        let lost = Status::conn_lost("gone").with_source(io::Error::other("reset"));
        assert!(lost.is_conn_lost());
        assert_eq!(lost.code(), Code::Unavailable);
        assert_eq!(lost, Status::unavailable("gone"));

        let mut wire = Vec::new();
        crate::codec::encode(&mut wire, &lost, "status").unwrap();
        let mut plain = Vec::new();
        crate::codec::encode(&mut plain, &Status::unavailable("gone"), "status").unwrap();
        assert_eq!(wire, plain, "only code and message travel");
        let back: Status =
            crate::codec::decode_payload(&bytes::Bytes::from(wire), "status").unwrap();
        assert!(!back.is_conn_lost());
        assert!(back.source().is_none());
    }

    #[test]
    fn status_displays_code_and_message() {
        let s = Status::not_found("no such file: a.txt");
        assert_eq!(s.to_string(), "NOT_FOUND: no such file: a.txt");
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "no such file: a.txt");
    }
}

//! Compile-time checks of the public API other crates code against: auto traits, conversions.

use netchan_mux::{CloseReason, Config, Conn, Error, Listener, Mode, Session};

fn send_sync<T: Send + Sync + 'static>() {}
fn send_unpin<T: Send + Unpin + 'static>() {}
fn io<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + std::fmt::Debug>() {}

#[test]
fn handles_and_errors_can_cross_threads() {
    send_sync::<Session>();
    send_sync::<Conn>();
    send_sync::<Error>();
    send_sync::<CloseReason>();
    send_sync::<Config>();
    send_unpin::<Listener>();
    io::<Conn>();
    let _ = Mode::Client;
}

#[test]
fn errors_convert_to_io_errors_with_sensible_kinds() {
    use std::io::ErrorKind;
    let cases = [
        (
            Error::NoListener { name: "x".into() },
            ErrorKind::ConnectionRefused,
        ),
        (
            Error::HandshakeTimeout {
                name: "x".into(),
                after: std::time::Duration::from_secs(1),
            },
            ErrorKind::TimedOut,
        ),
        (
            Error::SessionClosed(CloseReason::KeepaliveTimeout {
                after: std::time::Duration::from_secs(1),
            }),
            ErrorKind::TimedOut,
        ),
        (Error::NameInUse { name: "x".into() }, ErrorKind::AddrInUse),
    ];
    for (err, kind) in cases {
        let message = err.to_string();
        let io: std::io::Error = err.into();
        assert_eq!(io.kind(), kind, "{message}");
        assert!(io.to_string().contains("\"x\"") || io.to_string().contains("keepalive"));
    }
}

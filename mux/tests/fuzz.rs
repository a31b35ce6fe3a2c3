//! Random bytes fed as the peer never panic and end the session with a reason.

mod common;

use common::within;
use netchan_mux::{CloseReason, Config, Session};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A yamux data frame opening stream 1 (SYN) with `body`, so the random part reaches our
/// channel-open handshake instead of being rejected as a bad frame header.
fn syn_frame(body: &[u8]) -> Vec<u8> {
    let mut frame = vec![0, 0, 0, 1, 0, 0, 0, 1];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

fn feed(bytes: Vec<u8>) -> CloseReason {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let session = Session::server(ours, Config::default());
        let _listener = session.listen("x").unwrap();
        let (mut peer_read, mut peer_write) = tokio::io::split(theirs);
        // Drain whatever the session answers so it never blocks on writing.
        tokio::spawn(async move {
            let mut sink = vec![0u8; 4096];
            while matches!(peer_read.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let _ = peer_write.write_all(&bytes).await;
        let _ = peer_write.shutdown().await;
        within(10, "session ends after the random peer", session.closed()).await
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn random_bytes_as_the_peer_end_the_session_without_panicking(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048)
    ) {
        // A whole 12-byte frame header whose version byte is not 0 is a protocol violation.
        let starts_invalid = bytes.len() >= 12 && bytes[0] != 0;
        let reason = feed(bytes);
        if starts_invalid {
            prop_assert!(
                matches!(reason, CloseReason::ProtocolViolation(_)),
                "{reason:?}"
            );
        }
    }

    #[test]
    fn random_handshakes_on_a_valid_stream_end_the_session_without_panicking(
        body in proptest::collection::vec(any::<u8>(), 0..600),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = syn_frame(&body);
        bytes.extend_from_slice(&tail);
        let reason = feed(bytes);
        prop_assert!(reason.is_error() || matches!(reason, CloseReason::Peer), "{reason:?}");
    }
}

//! Property tests: arbitrary bytes after a valid preamble, fed to a server
//! and to a client, never panic and always end the conn with a result.

mod common;

use common::*;
use netchan_rpc::{Client, Config};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

const PREAMBLE: &[u8] = b"NCRPC\x02";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Frames with plausible prefixes and arbitrary bodies.
fn arb_stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Raw garbage.
        proptest::collection::vec(any::<u8>(), 0..512),
        // Well-delimited frames with arbitrary bodies (kinds 0..6 first).
        proptest::collection::vec(
            (0u8..8, proptest::collection::vec(any::<u8>(), 0..64)),
            1..8
        )
        .prop_map(|frames| {
            let mut out = Vec::new();
            for (kind, rest) in frames {
                out.extend_from_slice(&((rest.len() + 1) as u32).to_be_bytes());
                out.push(kind);
                out.extend_from_slice(&rest);
            }
            out
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_server_survives_arbitrary_frames(bytes in arb_stream()) {
        runtime().block_on(async {
            let server = test_server(Config::default().max_message_size(4096));
            let (mut a, b) = tokio::io::duplex(64 << 10);
            let serving = tokio::spawn(async move { server.serve(b).await });
            a.write_all(PREAMBLE).await.unwrap();
            a.write_all(&bytes).await.unwrap();
            a.shutdown().await.unwrap();
            // Whatever the bytes, serving ends (Ok at EOF or a typed error)
            // without panicking.
            let res = guard(serving).await;
            assert!(res.is_ok(), "serve panicked: {res:?}");
        });
    }

    #[test]
    fn a_client_survives_arbitrary_frames(bytes in arb_stream()) {
        runtime().block_on(async {
            let (a, mut b) = tokio::io::duplex(64 << 10);
            let client = Client::with_config(a, Config::default().max_message_size(4096));
            let c = client.clone();
            let call = tokio::spawn(async move { c.call::<_, String>("X.y", "z").await });
            b.write_all(PREAMBLE).await.unwrap();
            b.write_all(&bytes).await.unwrap();
            drop(b);
            // The call is answered (by a stray matching response, or by
            // the conn failing); it never hangs or panics.
            let _answer = guard(call).await.expect("call task panicked");
            // And the conn is torn down once the peer is gone.
            guard(client.closed()).await;
        });
    }
}

//! Bounded property-based fuzzing (proptest, run by `cargo test`) of what the hub and the
//! exporter decode from peers: the hello messages, the fileshare messages as the rpc codec
//! carries them (bincode 2, `standard()` with a decode limit, docs/protocol.md Part 2), and the
//! exporter's path resolver.

use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

use crate::auth;
use crate::export::{check_path, Root};
use crate::proto::{Chunk, Entry, Listing, PeerPath, PeerRead, PublishReq, ReadReq};

/// The codec's configuration, as in netchan-rpc's codec module.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 256 << 20 }>()
}

/// Decodes `T` from arbitrary bytes: must return, never panic.
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    bincode::serde::decode_from_slice::<T, _>(bytes, config())
        .ok()
        .map(|(v, _)| v)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fileshare_messages_decode_arbitrary_bytes_without_panicking(
        bytes in proptest::collection::vec(any::<u8>(), 0..512)
    ) {
        let _ = decode::<PublishReq>(&bytes);
        let _ = decode::<PeerPath>(&bytes);
        let _ = decode::<PeerRead>(&bytes);
        let _ = decode::<ReadReq>(&bytes);
        let _ = decode::<Chunk>(&bytes);
        let _ = decode::<Entry>(&bytes);
        let _ = decode::<Listing>(&bytes);
        let _ = decode::<Vec<String>>(&bytes);
    }

    #[test]
    fn fileshare_messages_round_trip(
        peer in ".{0,70}", path in ".{0,100}", offset in any::<u64>(),
        data in proptest::collection::vec(any::<u8>(), 0..300), eof in any::<bool>()
    ) {
        let read = PeerRead { peer: peer.clone(), path: path.clone(), offset };
        let bytes = bincode::serde::encode_to_vec(&read, config()).unwrap();
        let back: PeerRead = decode(&bytes).unwrap();
        prop_assert_eq!((back.peer, back.path, back.offset), (peer, path, offset));
        let chunk = Chunk { size: offset, offset, data: data.clone().into(), eof, ..Default::default() };
        let bytes = bincode::serde::encode_to_vec(&chunk, config()).unwrap();
        let back: Chunk = decode(&bytes).unwrap();
        prop_assert_eq!(&back.data[..], &data[..]);
        prop_assert_eq!(back.eof, eof);
        // Every strict prefix of an encoding is refused, never misread as a whole message.
        for cut in 0..bytes.len() {
            prop_assert!(decode::<Chunk>(&bytes[..cut]).is_none());
        }
    }

    #[test]
    fn the_hubs_hello_reader_survives_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048)
    ) {
        rt().block_on(async {
            let (mut client, mut hub) = tokio::io::duplex(8192);
            client.write_all(&bytes).await.unwrap();
            drop(client.shutdown().await);
            // Ends: the bytes run out (eof) or time (paused) runs out.
            let verdict = auth::server_hello(&mut hub, None, || Ok(())).await;
            let well_formed = bytes.len() >= 3
                && bytes[0] == auth::VERSION
                && bytes.len() >= 3 + u16::from_be_bytes([bytes[1], bytes[2]]) as usize
                && u16::from_be_bytes([bytes[1], bytes[2]]) as usize <= auth::MAX_TOKEN_LEN;
            assert_eq!(verdict.is_ok(), well_formed, "{verdict:?}");
        });
    }

    #[test]
    fn the_clients_hello_reader_survives_arbitrary_answers(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048)
    ) {
        rt().block_on(async {
            let (mut client, mut hub) = tokio::io::duplex(8192);
            hub.write_all(&bytes).await.unwrap();
            drop(hub.shutdown().await);
            let verdict = auth::client_hello(&mut client, None).await;
            if verdict.is_ok() {
                assert!(bytes.len() >= 3 && bytes[0] == 0);
            }
        });
    }

    #[test]
    fn the_path_resolver_never_serves_anything_outside_the_root(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("..".to_owned()), Just(".".to_owned()), Just("".to_owned()),
                Just("in".to_owned()), Just("secret.txt".to_owned()), Just("link".to_owned()),
                Just("hello.txt".to_owned()), "[a-z/.\\x00-\\x1f]{0,6}",
            ],
            0..8,
        ),
        absolute in any::<bool>(),
    ) {
        let (root, _outside) = fixture();
        let mut path = parts.join("/");
        if absolute {
            path.insert(0, '/');
        }
        // Lexical check: never panics; what it accepts is relative and never climbs out.
        if let Ok(rel) = check_path(&path) {
            prop_assert!(!rel.has_root());
        }
        // Whatever resolves, only files inside the root come back.
        if let Ok(f) = root.open_file(&path) {
            let data = f.read_at(0, 100).unwrap();
            prop_assert!(data == b"inside\n", "{path:?} served {:?}", data);
        }
        let _ = root.stat(&path);
        if let Ok(listing) = root.list(&path) {
            prop_assert!(listing.entries.iter().all(|e| e.name != "secret.txt"), "{path:?}");
        }
    }
}

/// A root `<tmp>/root` holding `hello.txt` ("inside\n"), `in/hello.txt`, and `link` pointing
/// at `../outside`, a sibling directory with `secret.txt`.
fn fixture() -> (Root, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(root.join("in")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("hello.txt"), b"inside\n").unwrap();
    std::fs::write(root.join("in/hello.txt"), b"inside\n").unwrap();
    std::fs::write(outside.join("secret.txt"), b"secret\n").unwrap();
    std::os::unix::fs::symlink("../outside", root.join("link")).unwrap();
    (Root::open(&root).unwrap(), tmp)
}

//! A 256 MiB transfer on one channel, checksummed, while small channels stay responsive.

mod common;

use common::{round_trip, spawn_echo, tcp_sessions, within};
use netchan_mux::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOTAL: usize = 256 * 1024 * 1024;
const BLOCK: usize = 1024 * 1024;

/// Order-sensitive checksum over 8-byte words (cheap enough for debug builds).
fn mix(mut sum: u64, bytes: &[u8]) -> u64 {
    for word in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..word.len()].copy_from_slice(word);
        sum = sum.rotate_left(5) ^ u64::from_le_bytes(w);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_transfer_arrives_intact_while_small_channels_stay_responsive() {
    let (client, server) = tcp_sessions(Config::default(), Config::default()).await;
    spawn_echo(server.listen("small").unwrap());
    let mut bulk_listener = server.listen("bulk").unwrap();

    let receiver = tokio::spawn(async move {
        let mut conn = bulk_listener.accept().await.unwrap();
        let mut buf = vec![0u8; BLOCK];
        let (mut total, mut sum) = (0usize, 0u64);
        loop {
            // Fill whole blocks so the checksum's word boundaries match the sender's.
            let mut filled = 0;
            while filled < BLOCK {
                let n = conn.read(&mut buf[filled..]).await.unwrap();
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            sum = mix(sum, &buf[..filled]);
            total += filled;
            if filled < BLOCK {
                break;
            }
        }
        (total, sum)
    });

    let mut bulk = within(5, "dial bulk", client.dial("bulk")).await.unwrap();
    let sender = tokio::spawn(async move {
        let mut block: Vec<u8> = (0..BLOCK).map(|i| (i % 253) as u8).collect();
        let mut sum = 0u64;
        for i in 0..TOTAL / BLOCK {
            block[..8].copy_from_slice(&(i as u64).to_le_bytes());
            sum = mix(sum, &block);
            bulk.write_all(&block).await.unwrap();
        }
        bulk.shutdown().await.unwrap();
        sum
    });

    // Small request/response channels on the same session, while the bulk runs.
    within(60, "small channels during bulk", async {
        for i in 0..50u32 {
            let payload = format!("small {i}").into_bytes();
            assert_eq!(round_trip(&client, "small", &payload).await, payload);
        }
    })
    .await;

    let sent = within(120, "bulk sender", sender).await.unwrap();
    let (total, received) = within(120, "bulk receiver", receiver).await.unwrap();
    assert_eq!(total, TOTAL);
    assert_eq!(received, sent, "checksum mismatch");
}

/// A writer that keeps the session's output queue full must not keep a small write on another
/// channel out of it: on one thread, a 64-byte round trip beside a flat-out bulk writer once
/// waited for ever (the bulk writer was woken with it whenever the link took a batch, ran
/// first and filled the queue again). Every round trip here must complete, on and off bulk.
#[tokio::test(flavor = "current_thread")]
async fn round_trips_beside_a_flat_out_writer_on_one_thread_all_complete() {
    let (a, b) = common::tcp_pair().await;
    netchan_mux::tune_tcp(&a).unwrap();
    netchan_mux::tune_tcp(&b).unwrap();
    let client = netchan_mux::Session::client(a, Config::default());
    let server = netchan_mux::Session::server(b, Config::default());
    spawn_echo(server.listen("small").unwrap());
    let mut bulk_listener = server.listen("bulk").unwrap();
    let mut small = within(5, "dial small", client.dial("small")).await.unwrap();
    let (bulk_out, bulk_in) = tokio::join!(client.dial("bulk"), bulk_listener.accept());
    let (mut bulk_out, mut bulk_in) = (bulk_out.unwrap(), bulk_in.unwrap());
    let busy = tokio::sync::watch::channel(false).0;
    let mut on = busy.subscribe();
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; BLOCK];
        while on.wait_for(|b| *b).await.is_ok() {
            bulk_out.write_all(&chunk).await.unwrap();
        }
    });
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; BLOCK];
        while bulk_in.read(&mut buf).await.unwrap() > 0 {}
    });
    let mut message = [7u8; 64];
    for round in 0..20 {
        busy.send_replace(round % 2 == 1);
        for i in 0..100 {
            within(5, &format!("round trip {i} of round {round}"), async {
                small.write_all(&message).await.unwrap();
                small.read_exact(&mut message).await.unwrap();
            })
            .await;
        }
    }
    writer.abort();
    reader.abort();
}

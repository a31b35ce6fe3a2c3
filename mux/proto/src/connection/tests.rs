//! Exact-bytes tests of the core: what it sends on each event, and how it treats the peer.

use super::*;
use crate::{
    flow::{BULK_MEMORY, INTERACTIVE_HOLD, PROBE_BIT, RTT_WINDOW},
    frame::HEADER_LEN,
};
use std::time::{Duration, Instant};

/// A core whose round trip is known to be long: any window drained counts as quick (window
/// tuning is then decided by the budget and the reader alone), and no probe is sent.
fn tuned(side: Side, limits: Limits) -> Connection {
    let mut c = Connection::new(side, limits);
    c.set_rtt(Duration::from_secs(3600), Instant::now());
    c
}

fn limits() -> Limits {
    Limits {
        initial_window: 256 * 1024,
        max_window: 1024 * 1024,
        growth_budget: 1024 * 1024,
        max_streams: 4,
        max_frame: 64 * 1024,
        out_limit: 1 << 20,
        fds: false,
        max_fds_held: 8,
        window_beside_interactive: 16 * 1024,
    }
}

/// The pending operations the core reports ready, in order.
fn ready(c: &mut Connection) -> Vec<Ready> {
    c.drain_ready().collect()
}

/// Everything the core wants sent, as bytes.
fn sent(c: &mut Connection) -> Vec<u8> {
    let mut q = VecDeque::new();
    c.take_output(usize::MAX, &mut q);
    let mut out = Vec::new();
    for f in q {
        out.extend_from_slice(&f.header);
        out.extend_from_slice(&f.body);
    }
    out
}

fn hdr(ty: FrameType, flags: u16, stream: u32, length: u32) -> Header {
    Header::new(ty, flags, stream, length)
}

fn feed(c: &mut Connection, h: Header, body: &[u8]) -> Result<(), Violation> {
    let len = c.on_header(&h)?;
    assert_eq!(len, body.len());
    c.on_frame(h, BytesMut::from(body), Instant::now())
}

fn read_all(c: &mut Connection, id: u32) -> Poll<Result<Vec<u8>, StreamError>> {
    let mut out = Vec::new();
    c.read(id, usize::MAX, Instant::now, |s| out.extend_from_slice(s))
        .map(|r| r.map(|_| out))
}

#[test]
fn first_write_carries_syn_and_the_body_follows_its_header() {
    let mut c = Connection::new(Side::Client, limits());
    let id = c.open().unwrap();
    assert_eq!(id, 1);
    assert_eq!(c.write(id, b"hi"), Poll::Ready(Ok(2)));
    assert_eq!(c.write(id, b"!"), Poll::Ready(Ok(1)));
    assert_eq!(
        sent(&mut c),
        [
            &[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, b'h', b'i'][..],
            &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, b'!'][..]
        ]
        .concat()
    );
    assert_eq!(c.open(), Ok(3));
}

#[test]
fn an_inbound_syn_is_acknowledged_and_accepted() {
    let mut c = Connection::new(Side::Server, limits());
    feed(&mut c, hdr(FrameType::Data, SYN, 1, 3), b"abc").unwrap();
    assert_eq!(c.next_accepted(), Some(1));
    assert_eq!(sent(&mut c), [0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0]);
    assert_eq!(read_all(&mut c, 1), Poll::Ready(Ok(b"abc".to_vec())));
}

#[test]
fn consumed_data_is_granted_back_once_a_quarter_window_is_read() {
    let mut c = tuned(Side::Server, limits());
    feed(&mut c, hdr(FrameType::WindowUpdate, SYN, 1, 0), b"").unwrap();
    sent(&mut c);
    let chunk = vec![1u8; 32 * 1024];
    feed(
        &mut c,
        hdr(FrameType::Data, 0, 1, chunk.len() as u32),
        &chunk,
    )
    .unwrap();
    let _ = read_all(&mut c, 1);
    assert!(sent(&mut c).is_empty(), "32 KiB is below a quarter window");
    for _ in 0..2 {
        feed(
            &mut c,
            hdr(FrameType::Data, 0, 1, chunk.len() as u32),
            &chunk,
        )
        .unwrap();
    }
    // Less than a window consumed: no tuning decision yet, just credit.
    let _ = read_all(&mut c, 1);
    assert_eq!(
        sent(&mut c),
        hdr(FrameType::WindowUpdate, 0, 1, 96 * 1024).encode()
    );
}

/// Feeds stream 1 `len` bytes (opening it with the first), reads them all at `at`, and
/// returns the credit the window update this earned grants back.
fn read_a_window_and_take_the_grant(c: &mut Connection, len: u32, first: bool, at: Instant) -> u32 {
    let flags = if first { SYN } else { 0 };
    feed(
        c,
        hdr(FrameType::Data, flags, 1, len),
        &vec![0u8; len as usize],
    )
    .unwrap();
    if first {
        sent(c);
    }
    let mut n = 0;
    let _ = c.read(1, usize::MAX, || at, |s| n += s.len());
    assert_eq!(n, len as usize);
    let update = sent(c);
    assert_eq!(update.len(), HEADER_LEN, "one window update: {update:?}");
    let h = Header::decode(update[..HEADER_LEN].try_into().unwrap()).unwrap();
    assert_eq!((h.ty, h.flags, h.stream), (FrameType::WindowUpdate, 0, 1));
    h.length
}

/// Opens stream 1 with a whole initial window of data, reads it all at `at`, and checks that
/// the grant gives it back doubled (the window grew by one initial window).
fn drain_first_window_and_see_it_double(c: &mut Connection, at: Instant) {
    let window = 256 * 1024u32;
    assert_eq!(
        read_a_window_and_take_the_grant(c, window, true, at),
        2 * window
    );
    assert_eq!(c.growth_used(), window as usize);
}

/// A server core whose smallest round trip is `rtt`.
fn with_rtt(rtt: Duration) -> Connection {
    let mut c = Connection::new(Side::Server, limits());
    c.set_rtt(rtt, Instant::now());
    c
}

#[test]
fn the_window_doubles_when_the_reader_drains_it_within_two_round_trips() {
    let mut c = tuned(Side::Server, limits());
    let window = 256 * 1024u32;
    // The whole window drained quickly (the round trip is long): granted back and as much
    // again.
    drain_first_window_and_see_it_double(&mut c, Instant::now());
    // Over the doubled window, the frame is accepted; one byte more is not.
    let body = vec![0u8; 2 * window as usize];
    feed(&mut c, hdr(FrameType::Data, 0, 1, 2 * window), &body).unwrap();
    assert_eq!(
        c.on_header(&hdr(FrameType::Data, 0, 1, 1)),
        Err(Violation::WindowExceeded {
            stream: 1,
            len: 1,
            window: 0
        })
    );
    // Dropping the stream returns its growth to the session's budget.
    c.drop_handle(1);
    assert_eq!(c.growth_used(), 0);
}

/// A 256 KiB window at a 50 µs round trip allows 5.2 GB/s, more than `flow::MAX_TUNED_RATE`:
/// drained however quickly, it is granted back as it was, not doubled. At 1 ms the same
/// window allows 262 MB/s, and drained quickly it doubles.
#[test]
fn a_window_that_already_allows_the_top_rate_does_not_grow() {
    let window = 256 * 1024u32;
    let mut c = with_rtt(Duration::from_micros(50));
    let grant = read_a_window_and_take_the_grant(&mut c, window, true, Instant::now());
    assert_eq!(grant, window);
    assert_eq!(c.growth_used(), 0);
    drain_first_window_and_see_it_double(&mut with_rtt(Duration::from_millis(1)), Instant::now());
}

#[test]
fn a_grown_window_whose_reader_is_slow_gives_half_its_growth_back() {
    let mut c = Connection::new(Side::Server, limits());
    let start = Instant::now();
    c.set_rtt(Duration::from_millis(1), start);
    let window = 256 * 1024u32;
    let read_at = |c: &mut Connection, at: Instant| {
        let mut n = 0;
        let _ = c.read(1, usize::MAX, || at, |s| n += s.len());
        n
    };
    // Drained within two round trips: the window doubles.
    drain_first_window_and_see_it_double(&mut c, start);
    // The next whole window takes the reader 2 s (over 16 round trips and 1 s): half the
    // growth goes back, withheld from the grant.
    let body = vec![0u8; 2 * window as usize];
    feed(&mut c, hdr(FrameType::Data, 0, 1, 2 * window), &body).unwrap();
    assert_eq!(
        read_at(&mut c, start + Duration::from_secs(2)),
        2 * window as usize
    );
    assert_eq!(
        sent(&mut c),
        hdr(FrameType::WindowUpdate, 0, 1, window).encode(),
        "granted back the consumed 512 KiB less the 256 KiB of growth returned"
    );
    assert_eq!(c.growth_used(), 0);
    // The peer may now send the initial window and no more.
    feed(
        &mut c,
        hdr(FrameType::Data, 0, 1, window),
        &vec![0u8; window as usize],
    )
    .unwrap();
    assert!(c.on_header(&hdr(FrameType::Data, 0, 1, 1)).is_err());
}

#[test]
fn growth_stops_at_the_session_budget() {
    let mut l = limits();
    l.growth_budget = 100 * 1024;
    let mut c = tuned(Side::Server, l);
    let window = 256 * 1024u32;
    for id in [1, 3] {
        let body = vec![0u8; window as usize];
        feed(&mut c, hdr(FrameType::Data, SYN, id, window), &body).unwrap();
        let _ = read_all(&mut c, id);
    }
    assert_eq!(c.growth_used(), 100 * 1024);
}

#[test]
fn dropping_a_handle_sends_fin_after_the_data_and_grants_back_unread_bytes() {
    let mut c = Connection::new(Side::Server, limits());
    feed(&mut c, hdr(FrameType::Data, SYN, 1, 5), b"hello").unwrap();
    sent(&mut c);
    assert_eq!(c.write(1, b"bye"), Poll::Ready(Ok(3)));
    c.drop_handle(1);
    let mut expected = hdr(FrameType::Data, 0, 1, 3).encode().to_vec();
    expected.extend_from_slice(b"bye");
    expected.extend_from_slice(&hdr(FrameType::WindowUpdate, FIN, 1, 5).encode());
    assert_eq!(sent(&mut c), expected);
    assert_eq!(c.stream_count(), 0);
    // The peer keeps writing to the dropped stream: it gets RST.
    feed(&mut c, hdr(FrameType::Data, 0, 1, 2), b"??").unwrap();
    assert_eq!(
        sent(&mut c),
        hdr(FrameType::WindowUpdate, RST, 1, 0).encode()
    );
    // Its FIN or window updates on the forgotten stream need no answer.
    feed(&mut c, hdr(FrameType::WindowUpdate, FIN, 1, 0), b"").unwrap();
    assert!(sent(&mut c).is_empty());
}

#[test]
fn a_stream_never_seen_by_the_peer_is_dropped_silently() {
    let mut c = Connection::new(Side::Client, limits());
    let id = c.open().unwrap();
    c.drop_handle(id);
    assert!(sent(&mut c).is_empty());
    assert_eq!(c.stream_count(), 0);
}

#[test]
fn streams_beyond_the_table_limit_are_reset_one_by_one() {
    let mut c = Connection::new(Side::Server, limits());
    for id in [1, 3, 5, 7] {
        feed(&mut c, hdr(FrameType::WindowUpdate, SYN, id, 0), b"").unwrap();
    }
    sent(&mut c);
    feed(&mut c, hdr(FrameType::Data, SYN, 9, 2), b"hi").unwrap();
    assert_eq!(
        sent(&mut c),
        hdr(FrameType::WindowUpdate, RST, 9, 0).encode()
    );
    assert_eq!(c.stream_count(), 4);
    // The others carry on.
    feed(&mut c, hdr(FrameType::Data, 0, 7, 2), b"ok").unwrap();
    assert_eq!(read_all(&mut c, 7), Poll::Ready(Ok(b"ok".to_vec())));
}

#[test]
fn a_peer_reset_fails_reads_and_writes_and_a_fin_ends_reads_after_the_data() {
    let mut c = Connection::new(Side::Server, limits());
    feed(&mut c, hdr(FrameType::Data, SYN | FIN, 1, 2), b"ab").unwrap();
    assert_eq!(read_all(&mut c, 1), Poll::Ready(Ok(b"ab".to_vec())));
    assert_eq!(read_all(&mut c, 1), Poll::Ready(Ok(Vec::new())));
    // Half-closed by the peer, we can still write.
    assert_eq!(c.write(1, b"x"), Poll::Ready(Ok(1)));

    feed(&mut c, hdr(FrameType::Data, SYN, 3, 2), b"cd").unwrap();
    feed(&mut c, hdr(FrameType::WindowUpdate, RST, 3, 0), b"").unwrap();
    assert_eq!(read_all(&mut c, 3), Poll::Ready(Err(StreamError::Reset)));
    assert_eq!(c.write(3, b"x"), Poll::Ready(Err(StreamError::Reset)));
}

#[test]
fn a_local_reset_sends_rst() {
    let mut c = Connection::new(Side::Client, limits());
    let id = c.open().unwrap();
    let _ = c.write(id, b"a");
    sent(&mut c);
    c.reset(id);
    assert_eq!(
        sent(&mut c),
        hdr(FrameType::WindowUpdate, RST, 1, 0).encode()
    );
    assert_eq!(c.stream_count(), 0);
}

#[test]
fn writes_wait_for_window_and_resume_on_an_update() {
    let mut c = Connection::new(Side::Client, limits());
    let id = c.open().unwrap();
    let big = vec![0u8; 64 * 1024];
    for _ in 0..4 {
        assert_eq!(c.write(id, &big), Poll::Ready(Ok(64 * 1024)));
    }
    assert_eq!(c.write(id, &big), Poll::Pending);
    feed(&mut c, hdr(FrameType::WindowUpdate, ACK, id, 10), b"").unwrap();
    assert_eq!(c.write(id, &big), Poll::Ready(Ok(10)));
}

#[test]
fn a_waiting_reader_or_writer_is_reported_ready_once_at_the_change_it_waits_for() {
    let mut c = Connection::new(Side::Client, limits());
    let id = c.open().unwrap();
    let big = vec![0u8; 64 * 1024];
    for _ in 0..4 {
        assert_eq!(c.write(id, &big), Poll::Ready(Ok(64 * 1024)));
    }
    assert_eq!(c.write(id, &big), Poll::Pending);
    assert_eq!(read_all(&mut c, id), Poll::Pending);
    assert_eq!(ready(&mut c), [], "nothing changed yet");
    // Data wakes the reader (once, however many frames), window the writer.
    feed(&mut c, hdr(FrameType::Data, ACK, id, 2), b"ab").unwrap();
    feed(&mut c, hdr(FrameType::Data, 0, id, 2), b"cd").unwrap();
    feed(&mut c, hdr(FrameType::WindowUpdate, 0, id, 10), b"").unwrap();
    assert_eq!(ready(&mut c), [Ready::Read(id), Ready::Write(id)]);
    assert_eq!(read_all(&mut c, id), Poll::Ready(Ok(b"abcd".to_vec())));
    // A reader that does not wait is not reported; one that waits is, at the session's end.
    feed(&mut c, hdr(FrameType::Data, 0, id, 1), b"e").unwrap();
    assert_eq!(ready(&mut c), []);
    assert_eq!(read_all(&mut c, id), Poll::Ready(Ok(b"e".to_vec())));
    assert_eq!(read_all(&mut c, id), Poll::Pending);
    c.terminate();
    assert_eq!(ready(&mut c), [Ready::Read(id)]);
    assert_eq!(
        read_all(&mut c, id),
        Poll::Ready(Err(StreamError::SessionEnded))
    );
}

#[test]
fn a_window_drained_slowly_is_not_grown_and_round_trips_are_probed_with_pings() {
    let mut c = Connection::new(Side::Server, limits());
    let t0 = Instant::now();
    let window = 256 * 1024u32;
    let body = vec![0u8; window as usize];
    c.on_header(&hdr(FrameType::Data, SYN, 1, window)).unwrap();
    c.on_frame(
        hdr(FrameType::Data, SYN, 1, window),
        BytesMut::from(&body[..]),
        t0,
    )
    .unwrap();
    sent(&mut c);
    let mut n = 0;
    let _ = c.read(1, 1024, || t0, |s| n += s.len());
    // No round-trip sample yet: the first grant also probes for one.
    let _ = c.read(1, usize::MAX, || t0, |s| n += s.len());
    let mut expected = hdr(FrameType::WindowUpdate, 0, 1, window).encode().to_vec();
    expected.extend_from_slice(&hdr(FrameType::Ping, SYN, 0, PROBE_BIT).encode());
    assert_eq!(sent(&mut c), expected);
    let t1 = t0 + Duration::from_millis(10);
    c.on_frame(hdr(FrameType::Ping, ACK, 0, PROBE_BIT), BytesMut::new(), t1)
        .unwrap();
    assert_eq!(c.rtt(), Some(Duration::from_millis(10)));
    // The next window takes a second (100 round trips) to drain: the reader or the sender
    // is slow, not the window. No growth.
    let t2 = t1 + Duration::from_secs(1);
    c.on_frame(
        hdr(FrameType::Data, 0, 1, window),
        BytesMut::from(&body[..]),
        t2,
    )
    .unwrap();
    let _ = c.read(1, usize::MAX, || t2, |s| n += s.len());
    assert_eq!(
        sent(&mut c),
        hdr(FrameType::WindowUpdate, 0, 1, window).encode()
    );
    assert_eq!(n, 2 * window as usize);
    assert_eq!(c.growth_used(), 0);
}

#[test]
fn pings_are_answered_with_the_same_opaque_value() {
    let mut c = Connection::new(Side::Client, limits());
    feed(&mut c, hdr(FrameType::Ping, SYN, 0, 0xdead_beef), b"").unwrap();
    assert_eq!(
        sent(&mut c),
        [0, 2, 0, 2, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef]
    );
    c.ping(5);
    assert_eq!(sent(&mut c), [0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5]);
    // The answer to our ping needs no answer.
    feed(&mut c, hdr(FrameType::Ping, ACK, 0, 5), b"").unwrap();
    assert!(sent(&mut c).is_empty());
}

#[test]
fn go_away_stops_new_streams_but_open_ones_carry_on() {
    let mut c = Connection::new(Side::Client, limits());
    let id = c.open().unwrap();
    feed(&mut c, hdr(FrameType::GoAway, 0, 0, 0), b"").unwrap();
    assert_eq!(c.goaway_received(), Some(0));
    assert_eq!(c.open(), Err(OpenError::GoAway));
    assert_eq!(c.write(id, b"still"), Poll::Ready(Ok(5)));

    let mut s = Connection::new(Side::Server, limits());
    s.go_away(GoAwayCode::Normal);
    assert_eq!(sent(&mut s), [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    feed(&mut s, hdr(FrameType::Data, SYN, 1, 1), b"x").unwrap();
    assert_eq!(
        sent(&mut s),
        hdr(FrameType::WindowUpdate, RST, 1, 0).encode()
    );
    assert_eq!(s.open(), Err(OpenError::Closing));
}

#[test]
fn close_sends_one_go_away_and_its_grace_is_a_deadline_of_the_core() {
    let second = Duration::from_secs(1);
    let t0 = Instant::now();
    let mut c = Connection::new(Side::Server, limits());
    c.start_keepalive(30 * second, 10 * second, t0);
    assert_eq!(c.poll_timeout(), Some(t0 + 30 * second));
    c.close(t0, 5 * second);
    c.close(t0 + second, 5 * second);
    assert_eq!(sent(&mut c), [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(c.open(), Err(OpenError::Closing));
    // One clock: the earliest deadline of all the core's timers.
    assert_eq!(c.poll_timeout(), Some(t0 + 5 * second));
    assert_eq!(c.handle_timeout(t0 + 4 * second, t0), None);
    assert_eq!(
        c.handle_timeout(t0 + 5 * second, t0),
        Some(Due::CloseGraceOver)
    );
    c.flush_by(t0 + 5 * second, 2 * second);
    assert_eq!(c.poll_timeout(), Some(t0 + 7 * second));
    // Both the flush and an earlier wait for a GoAway passed: the end first, one at a time.
    c.await_goaway(t0 + 5 * second, second);
    let late = t0 + 8 * second;
    assert_eq!(c.handle_timeout(late, t0), Some(Due::GoAwayWaitOver));
    assert_eq!(c.handle_timeout(late, t0), Some(Due::FlushOver));
    assert_eq!(c.handle_timeout(late, late), None);
    assert_eq!(
        c.poll_timeout(),
        Some(t0 + 30 * second),
        "keepalive is left"
    );
    assert!(sent(&mut c).is_empty(), "the end timers send nothing");
}

#[test]
fn hostile_frames_are_typed_violations() {
    let mut c = Connection::new(Side::Server, limits());
    assert_eq!(
        c.on_header(&hdr(FrameType::Data, 0, 0, 1)),
        Err(Violation::StreamZero { frame: "data" })
    );
    assert_eq!(
        feed(&mut c, hdr(FrameType::WindowUpdate, 0, 0, 1), b""),
        Err(Violation::StreamZero {
            frame: "window-update"
        })
    );
    assert_eq!(
        feed(&mut c, hdr(FrameType::WindowUpdate, SYN, 2, 0), b""),
        Err(Violation::WrongParity { stream: 2 })
    );
    feed(&mut c, hdr(FrameType::WindowUpdate, SYN, 5, 0), b"").unwrap();
    assert_eq!(
        feed(&mut c, hdr(FrameType::WindowUpdate, SYN, 5, 0), b""),
        Err(Violation::DuplicateSyn { stream: 5 })
    );
    // Ids may arrive out of order (lazy SYN on the first frame): 3 after 5 is fine.
    feed(&mut c, hdr(FrameType::WindowUpdate, SYN, 3, 0), b"").unwrap();
    assert_eq!(
        feed(&mut c, hdr(FrameType::WindowUpdate, 0, 5, u32::MAX), b""),
        Err(Violation::WindowOverflow { stream: 5 })
    );
    assert_eq!(
        c.on_header(&hdr(FrameType::Data, 0, 5, 256 * 1024 + 1)),
        Err(Violation::WindowExceeded {
            stream: 5,
            len: 256 * 1024 + 1,
            window: 256 * 1024
        })
    );
    // A stream we do not know cannot make us buffer more than the largest window.
    assert!(c
        .on_header(&hdr(FrameType::Data, 0, 99, 1024 * 1024 + 1))
        .is_err());
    assert_eq!(
        feed(&mut c, hdr(FrameType::Ping, SYN, 3, 0), b""),
        Err(Violation::ControlOnStream {
            frame: "ping",
            stream: 3
        })
    );
}

#[test]
fn floods_of_empty_frames_and_unread_ping_answers_are_violations() {
    let mut c = Connection::new(Side::Server, limits());
    feed(&mut c, hdr(FrameType::Data, SYN, 1, 1), b"x").unwrap();
    let flood = (0..2000).find_map(|_| feed(&mut c, hdr(FrameType::Data, 0, 1, 0), b"").err());
    assert!(matches!(flood, Some(Violation::Flood { .. })), "{flood:?}");

    let mut c = Connection::new(Side::Server, limits());
    let flood = (0..2000).find_map(|_| feed(&mut c, hdr(FrameType::Ping, SYN, 0, 1), b"").err());
    assert!(matches!(flood, Some(Violation::Flood { .. })), "{flood:?}");
    // Answers the peer takes do not count.
    let mut c = Connection::new(Side::Server, limits());
    for _ in 0..2000 {
        feed(&mut c, hdr(FrameType::Ping, SYN, 0, 1), b"").unwrap();
        sent(&mut c);
    }
}

#[test]
fn a_flood_of_one_byte_frames_is_held_in_bounded_memory() {
    let mut c = Connection::new(Side::Server, limits());
    feed(&mut c, hdr(FrameType::WindowUpdate, SYN, 1, 0), b"").unwrap();
    // The whole window in one-byte frames, never read: each is copied into shared tail
    // buffers rather than pinning a read chunk each.
    for _ in 0..256 * 1024 {
        feed(&mut c, hdr(FrameType::Data, 0, 1, 1), b"z").unwrap();
    }
    assert_eq!(c.buffered(), 256 * 1024);
    assert!(c.on_header(&hdr(FrameType::Data, 0, 1, 1)).is_err());
    let chunks = c.streams[&1].recv.chunk_count();
    assert!(chunks <= 16, "{chunks} chunks");
}

/// Property tests: two cores joined by an in-order link that delivers frames whenever the
/// random schedule says, with random write and read sizes.
mod interleavings {
    use super::*;
    use crate::frame::Header;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const STREAMS: usize = 3;

    fn byte(id: u32, dir: u8, offset: usize) -> u8 {
        (id as usize * 7 + offset * 13 + dir as usize) as u8
    }

    /// One direction of one stream: what was written, read, and whether it ended.
    #[derive(Default, Debug)]
    struct Flow {
        total: usize,
        written: usize,
        finished: bool,
        read: usize,
        eof: bool,
    }

    struct End {
        conn: Connection,
        /// Encoded frames in flight towards the other end, in order.
        wire: VecDeque<u8>,
        dropped: Vec<u32>,
    }

    struct World {
        ends: [End; 2],
        /// (stream id, direction 0 = client→server, 1 = server→client) → flow.
        flows: BTreeMap<(u32, u8), Flow>,
        budget: usize,
        max_window: u32,
        /// Streams the server has accepted (its SYN arrived).
        server_known: Vec<u32>,
    }

    impl World {
        fn new(sizes: &[(usize, usize)]) -> World {
            let mut l = limits();
            l.max_window = 512 * 1024;
            l.growth_budget = 300 * 1024;
            l.max_frame = 16 * 1024;
            l.max_streams = 8;
            let mut client = Connection::new(Side::Client, l.clone());
            let mut flows = BTreeMap::new();
            for &(up, down) in sizes {
                let id = client.open().unwrap();
                flows.insert(
                    (id, 0),
                    Flow {
                        total: up,
                        ..Flow::default()
                    },
                );
                flows.insert(
                    (id, 1),
                    Flow {
                        total: down,
                        ..Flow::default()
                    },
                );
            }
            World {
                ends: [
                    End {
                        conn: client,
                        wire: VecDeque::new(),
                        dropped: Vec::new(),
                    },
                    End {
                        conn: Connection::new(Side::Server, l.clone()),
                        wire: VecDeque::new(),
                        dropped: Vec::new(),
                    },
                ],
                flows,
                budget: l.growth_budget,
                max_window: l.max_window,
                server_known: Vec::new(),
            }
        }

        fn ids(&self) -> Vec<u32> {
            self.flows
                .keys()
                .map(|(id, _)| *id)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        }

        /// Side `side` writes up to `len` bytes on stream `id` (direction = side).
        fn write(&mut self, side: usize, id: u32, len: usize) {
            if self.ends[side].dropped.contains(&id) {
                return;
            }
            // The server only knows streams the client's SYN reached.
            if side == 1 && !self.accepted(id) {
                return;
            }
            let flow = self.flows.get_mut(&(id, side as u8)).unwrap();
            if flow.finished {
                return;
            }
            let n = len.min(flow.total - flow.written);
            if n == 0 {
                flow.finished = true;
                self.ends[side].conn.finish(id).unwrap();
                return;
            }
            let data: Vec<u8> = (flow.written..flow.written + n)
                .map(|o| byte(id, side as u8, o))
                .collect();
            if let Poll::Ready(r) = self.ends[side].conn.write(id, &data) {
                flow.written += r.unwrap();
            }
        }

        fn accepted(&self, id: u32) -> bool {
            self.server_known.contains(&id)
        }

        /// Side `side` reads up to `max` bytes of stream `id` (the other side's direction).
        fn read(&mut self, side: usize, id: u32, max: usize) {
            if self.ends[side].dropped.contains(&id) || (side == 1 && !self.accepted(id)) {
                return;
            }
            let dir = 1 - side as u8;
            let flow = self.flows.get_mut(&(id, dir)).unwrap();
            let mut got = Vec::new();
            match self.ends[side]
                .conn
                .read(id, max, Instant::now, |s| got.extend_from_slice(s))
            {
                Poll::Ready(Ok(0)) if max > 0 => {
                    assert_eq!(flow.read, flow.total, "stream {id} dir {dir}: EOF early");
                    flow.eof = true;
                }
                Poll::Ready(Ok(n)) => {
                    for (k, b) in got.iter().enumerate() {
                        assert_eq!(*b, byte(id, dir, flow.read + k), "stream {id} dir {dir}");
                    }
                    flow.read += n;
                    assert!(flow.read <= flow.total, "more bytes than written");
                }
                Poll::Ready(Err(e)) => panic!("stream {id}: {e:?}"),
                Poll::Pending => {}
            }
            // Done both ways on this side: drop the handle.
            let out = &self.flows[&(id, side as u8)];
            if flow_done(&self.flows[&(id, dir)]) && out.finished {
                self.ends[side].conn.drop_handle(id);
                self.ends[side].dropped.push(id);
            }
        }

        /// Moves up to `bytes` of side `from`'s output over the link and feeds whole frames;
        /// with `through`, a data body whose reader would wait is read through (as the I/O
        /// layer does for a reader with room: counted as received and read at once).
        fn deliver(&mut self, from: usize, bytes: usize, through: bool) {
            let mut q = VecDeque::new();
            self.ends[from].conn.take_output(usize::MAX, &mut q);
            for f in q {
                self.ends[from].wire.extend(f.header.iter());
                self.ends[from].wire.extend(f.body.iter());
            }
            let to = 1 - from;
            let mut moved = 0;
            while moved < bytes && self.ends[from].wire.len() >= HEADER_LEN {
                let raw: Vec<u8> = self.ends[from]
                    .wire
                    .iter()
                    .take(HEADER_LEN)
                    .copied()
                    .collect();
                let h = Header::decode(raw.as_slice().try_into().unwrap()).unwrap();
                let len = self.ends[to]
                    .conn
                    .on_header(&h)
                    .expect("no window overdraw");
                if self.ends[from].wire.len() < HEADER_LEN + len {
                    break;
                }
                self.ends[from].wire.drain(..HEADER_LEN);
                let body: Vec<u8> = self.ends[from].wire.drain(..len).collect();
                let id = h.stream;
                let reader = through
                    && h.ty == FrameType::Data
                    && len > 0
                    && !self.ends[to].dropped.contains(&id)
                    && self.ends[to].conn.wait_readable(id);
                if reader {
                    self.ends[to]
                        .conn
                        .on_read_through(h, Instant::now())
                        .expect("valid frame");
                    let flow = self.flows.get_mut(&(id, from as u8)).unwrap();
                    for (k, b) in body.iter().enumerate() {
                        assert_eq!(*b, byte(id, from as u8, flow.read + k), "stream {id}");
                    }
                    flow.read += len;
                    assert!(flow.read <= flow.total, "more bytes than written");
                } else {
                    self.ends[to]
                        .conn
                        .on_frame(h, BytesMut::from(&body[..]), Instant::now())
                        .expect("valid frame");
                }
                moved += HEADER_LEN + len;
                while let Some(id) = self.ends[to].conn.next_accepted() {
                    self.server_known.push(id);
                }
            }
            for end in &self.ends {
                assert!(end.conn.growth_used() <= self.budget);
                for s in end.conn.streams.values() {
                    assert!(s.window <= self.max_window);
                }
            }
        }
    }

    fn flow_done(f: &Flow) -> bool {
        f.eof
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_byte_arrives_once_in_order_and_every_stream_ends(
            sizes in proptest::collection::vec((0usize..300_000, 0usize..300_000), 1..=STREAMS),
            steps in proptest::collection::vec((0u8..4, 0usize..2, 0usize..STREAMS, 1usize..70_000), 0..300),
        ) {
            let mut w = World::new(&sizes);
            let ids = w.ids();
            for (op, side, k, n) in steps {
                let id = ids[k % ids.len()];
                match op {
                    0 => w.write(side, id, n),
                    1 => w.read(side, id, n),
                    2 => w.deliver(side, n, false),
                    _ => w.deliver(side, n, true),
                }
            }
            // Then run everything to its end, in a bounded number of rounds.
            for round in 0..10_000 {
                for &id in &ids {
                    for side in 0..2 {
                        w.write(side, id, 64 * 1024);
                        w.read(side, id, 64 * 1024);
                    }
                }
                // Mostly read through, so that more than a window goes that way.
                w.deliver(0, usize::MAX, round % 4 != 3);
                w.deliver(1, usize::MAX, round % 3 != 2);
                if w.ends.iter().all(|e| e.conn.stream_count() == 0) && w.ends.iter().all(|e| e.wire.is_empty()) {
                    break;
                }
            }
            for ((id, dir), f) in &w.flows {
                prop_assert!(f.eof && f.read == f.total, "stream {id} dir {dir}: {f:?}");
            }
            prop_assert_eq!(w.ends[0].conn.stream_count(), 0);
            prop_assert_eq!(w.ends[1].conn.stream_count(), 0);
            prop_assert_eq!(w.ends[0].conn.growth_used(), 0);
            prop_assert_eq!(w.ends[1].conn.growth_used(), 0);
        }
    }
}

/// Regression (issue 7, verified against the hub): each queued RST was counted at its 12 wire
/// bytes against the output limit while holding about four times that, so a peer that wrote to
/// unknown streams and never read could make a session queue about 4 MiB, not the 1 MiB limit.
#[test]
fn queued_control_frames_count_what_they_hold_in_memory_against_the_output_limit() {
    let mut c = Connection::new(Side::Server, limits());
    let n = 1000u32;
    for i in 0..n {
        // Data for a stream the peer never opened: each is answered with an RST.
        feed(&mut c, hdr(FrameType::Data, 0, 2 * i + 1, 1), b"x").unwrap();
    }
    let per_frame = std::mem::size_of::<Frame>();
    assert!(
        per_frame > HEADER_LEN,
        "a queued frame holds more than its header"
    );
    assert_eq!(c.out_bytes(), n as usize * per_frame);
    let wire = sent(&mut c);
    assert_eq!(wire.len(), n as usize * HEADER_LEN);
    assert_eq!(c.out_bytes(), 0);
}

/// (stream, flags, body length) of each frame taken, `max_bytes` at a time, as the I/O layer
/// takes them.
fn frames_taken(c: &mut Connection, max_bytes: usize) -> Vec<(u32, u16, usize)> {
    let mut q = VecDeque::new();
    c.take_output(max_bytes, &mut q);
    q.iter()
        .map(|f| {
            let h = Header::decode(&f.header).unwrap();
            (h.stream, h.flags, f.body.len())
        })
        .collect()
}

/// Issue 8's fairness target: a bulk channel's queued frames held a round trip's small frame
/// on another channel behind all of them (one FIFO for the session).
#[test]
fn a_small_frame_queued_behind_a_bulk_streams_frames_leaves_before_them() {
    let mut c = tuned(Side::Client, limits());
    let bulk = c.open().unwrap();
    let small = c.open().unwrap();
    let chunk = vec![7u8; 256 * 1024];
    // The whole 256 KiB window in four 64 KiB frames.
    assert_eq!(c.write(bulk, &chunk), Poll::Ready(Ok(64 * 1024)));
    for _ in 0..3 {
        assert_eq!(c.write(bulk, &chunk), Poll::Ready(Ok(64 * 1024)));
    }
    assert_eq!(c.write(small, b"ping"), Poll::Ready(Ok(4)));
    // Credit for the bulk stream's other direction, and a ping, go first of all.
    let inbound = vec![1u8; 64 * 1024];
    feed(
        &mut c,
        hdr(FrameType::Data, 0, bulk, inbound.len() as u32),
        &inbound,
    )
    .unwrap();
    assert_eq!(read_all(&mut c, bulk), Poll::Ready(Ok(inbound)));
    c.ping(42);
    assert_eq!(
        frames_taken(&mut c, usize::MAX),
        [
            (bulk, 0, 0),
            (0, SYN, 0),
            (bulk, SYN, 64 * 1024),
            (small, SYN, 4),
            (bulk, 0, 64 * 1024),
            (bulk, 0, 64 * 1024),
            (bulk, 0, 64 * 1024),
        ]
    );
}

#[test]
fn streams_take_turns_batch_by_batch_and_each_keeps_its_order() {
    let mut c = tuned(Side::Client, limits());
    let bulk = c.open().unwrap();
    let small = c.open().unwrap();
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..3 {
        assert_eq!(c.write(bulk, &chunk), Poll::Ready(Ok(64 * 1024)));
    }
    // One batch takes at least one frame, and stops once it holds `max_bytes`.
    assert_eq!(frames_taken(&mut c, 1), [(bulk, SYN, 64 * 1024)]);
    // Written after the bulk frames: leaves with the next batch, not after them.
    assert_eq!(c.write(small, b"a"), Poll::Ready(Ok(1)));
    assert_eq!(c.write(small, b"b"), Poll::Ready(Ok(1)));
    c.finish(small).unwrap();
    c.finish(bulk).unwrap();
    assert_eq!(
        frames_taken(&mut c, 1),
        [(bulk, 0, 64 * 1024)],
        "the bulk stream's turn came first"
    );
    assert_eq!(frames_taken(&mut c, 1), [(small, SYN, 1)]);
    assert_eq!(
        frames_taken(&mut c, usize::MAX),
        [
            (bulk, 0, 64 * 1024),
            (small, 0, 1),
            (bulk, FIN, 0),
            (small, FIN, 0)
        ]
    );
    assert_eq!(c.out_bytes(), 0);
}

/// A writer that keeps the output queue full (a bulk channel on a busy link) must not keep a
/// small write on another stream waiting: it was woken with the small writer each time the
/// link took a batch, queued first, and a 64-byte round trip beside it hung for ever.
#[test]
fn a_full_output_queue_still_takes_a_write_from_a_stream_with_nothing_queued() {
    let limits = Limits {
        out_limit: 128 * 1024,
        max_frame: 16 * 1024,
        ..limits()
    };
    let mut c = tuned(Side::Client, limits);
    let bulk = c.open().unwrap();
    let small = c.open().unwrap();
    let other = c.open().unwrap();
    let chunk = vec![7u8; 256 * 1024];
    // The bulk stream fills the queue to its limit, then waits.
    for _ in 0..8 {
        assert_eq!(c.write(bulk, &chunk), Poll::Ready(Ok(16 * 1024)));
    }
    assert_eq!(c.write(bulk, &chunk), Poll::Pending);
    // Streams with nothing queued are taken at once, within the reserve ...
    assert_eq!(c.write(small, b"ping"), Poll::Ready(Ok(4)));
    assert_eq!(c.write(other, &chunk), Poll::Ready(Ok(16 * 1024)));
    // ... but once they have something queued, they wait like the bulk stream.
    assert_eq!(c.write(other, &chunk), Poll::Pending);
    assert_eq!(c.write(small, b"more"), Poll::Pending);
    assert!(c.out_bytes() <= 128 * 1024 + OUT_RESERVE);
    // A bulk frame leaves; the queue is still over its limit: nobody is ready.
    assert_eq!(frames_taken(&mut c, 1), [(bulk, SYN, 16 * 1024)]);
    assert_eq!(ready(&mut c), []);
    // The small frame leaves at its stream's first turn; that stream may queue again, the
    // bulk stream not yet.
    assert_eq!(frames_taken(&mut c, 1), [(small, SYN, 4)]);
    assert_eq!(ready(&mut c), [Ready::Write(small)]);
    assert_eq!(c.write(small, b"more"), Poll::Ready(Ok(4)));
    // Below the limit every writer may queue again, each reported once.
    frames_taken(&mut c, usize::MAX);
    assert_eq!(ready(&mut c), [Ready::Write(bulk), Ready::Write(other)]);
    assert_eq!(ready(&mut c), []);
    assert_eq!(c.write(bulk, &chunk), Poll::Ready(Ok(16 * 1024)));
}

/// The reserve is room, not a frame per stream: a write from a stream with nothing queued
/// takes what is left of it, so the queue never holds more than the limit plus the reserve.
#[test]
fn writes_from_the_reserve_never_take_more_than_it_has_left() {
    let limits = Limits {
        out_limit: 128 * 1024,
        ..limits()
    };
    let mut c = tuned(Side::Client, limits);
    let bulk = c.open().unwrap();
    let other = c.open().unwrap();
    let chunk = vec![7u8; 256 * 1024];
    assert_eq!(c.write(bulk, &chunk), Poll::Ready(Ok(64 * 1024)));
    assert_eq!(c.write(bulk, &chunk), Poll::Ready(Ok(64 * 1024)));
    assert_eq!(c.write(bulk, &chunk), Poll::Pending);
    match c.write(other, &chunk) {
        Poll::Ready(Ok(n)) => assert!(0 < n && n < OUT_RESERVE, "took {n}"),
        pending => panic!("a stream with nothing queued waited: {pending:?}"),
    }
    assert!(c.out_bytes() <= 128 * 1024 + OUT_RESERVE);
}

#[cfg(unix)]
mod fds {
    use super::*;

    fn fd_limits() -> Limits {
        Limits {
            fds: true,
            ..limits()
        }
    }

    fn some_fds(n: usize) -> Vec<Fd> {
        (0..n)
            .map(|_| {
                std::fs::File::open("/dev/null")
                    .expect("open /dev/null")
                    .into()
            })
            .collect()
    }

    #[test]
    fn a_side_that_takes_fds_says_so_first_and_learns_it_from_the_peer() {
        let mut c = Connection::new(Side::Client, fd_limits());
        // Ping SYN with "NCFD" as the opaque value, before anything else.
        assert_eq!(
            sent(&mut c),
            [0, 2, 0, 1, 0, 0, 0, 0, b'N', b'C', b'F', b'D']
        );
        assert!(!c.peer_takes_fds());
        feed(&mut c, hdr(FrameType::Ping, SYN, 0, FD_ANNOUNCE), b"").unwrap();
        assert!(c.peer_takes_fds());
        // Answered like any ping.
        assert_eq!(
            sent(&mut c),
            [0, 2, 0, 2, 0, 0, 0, 0, b'N', b'C', b'F', b'D']
        );
        // A plain core announces nothing.
        let mut plain = Connection::new(Side::Client, limits());
        assert!(sent(&mut plain).is_empty());
    }

    #[test]
    fn fds_frames_are_checked_before_anything_is_taken() {
        let plain = Connection::new(Side::Server, limits());
        assert_eq!(
            plain.on_header(&hdr(FrameType::Fds, 0, 1, 1)),
            Err(Violation::UnexpectedFds { stream: 1 })
        );
        let c = Connection::new(Side::Server, fd_limits());
        for count in [0, 254] {
            assert_eq!(
                c.on_header(&hdr(FrameType::Fds, 0, 1, count)),
                Err(Violation::BadFdCount { stream: 1, count })
            );
        }
        assert_eq!(
            c.on_header(&hdr(FrameType::Fds, 0, 0, 1)),
            Err(Violation::StreamZero { frame: "fds" })
        );
        assert_eq!(c.on_header(&hdr(FrameType::Fds, 0, 1, 253)), Ok(0));
    }

    #[test]
    fn sent_fds_queue_as_one_frame_in_order_with_the_data() {
        let mut c = Connection::new(Side::Client, fd_limits());
        let _ = sent(&mut c);
        let id = c.open().unwrap();
        assert_eq!(
            c.send_fds(id, some_fds(1)),
            Err(StreamError::FdsUnsupported),
            "not before the peer announced"
        );
        feed(&mut c, hdr(FrameType::Ping, SYN, 0, FD_ANNOUNCE), b"").unwrap();
        let _ = sent(&mut c);
        assert_eq!(c.write(id, b"a"), Poll::Ready(Ok(1)));
        c.send_fds(id, some_fds(2)).unwrap();
        assert_eq!(c.write(id, b"b"), Poll::Ready(Ok(1)));
        let mut q = VecDeque::new();
        c.take_output(usize::MAX, &mut q);
        let frames: Vec<(u8, usize, usize)> = q
            .iter()
            .map(|f| (f.header[1], f.body.len(), f.fds.len()))
            .collect();
        assert_eq!(frames, [(0, 1, 0), (4, 0, 2), (0, 1, 0)]);
        assert_eq!(&q[1].header, &[0, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2]);
        assert_eq!(c.send_fds(id, some_fds(254)), Err(StreamError::TooManyFds));
    }

    #[test]
    fn received_fds_wait_at_their_place_in_the_stream() {
        let mut c = Connection::new(Side::Server, fd_limits());
        feed(&mut c, hdr(FrameType::Data, SYN, 1, 2), b"ab").unwrap();
        c.on_fds(1, some_fds(1), 0).unwrap();
        feed(&mut c, hdr(FrameType::Data, 0, 1, 2), b"cd").unwrap();
        assert!(c.take_fds(1).is_empty(), "not before \"ab\" is read");
        let mut out = Vec::new();
        let r = c.read(1, usize::MAX, Instant::now, |s| out.extend_from_slice(s));
        assert_eq!(r, Poll::Ready(Ok(2)));
        assert_eq!(out, b"ab", "the read stops where they arrived");
        assert_eq!(c.take_fds(1).len(), 1);
        assert_eq!(read_all(&mut c, 1), Poll::Ready(Ok(b"cd".to_vec())));
    }

    #[test]
    fn the_session_holds_at_most_max_fds_held_unclaimed() {
        let mut c = Connection::new(Side::Server, fd_limits());
        feed(&mut c, hdr(FrameType::Data, SYN, 1, 1), b"a").unwrap();
        c.on_fds(1, some_fds(5), 0).unwrap();
        // 5 held + 2 unframed + 2 new > 8.
        assert_eq!(
            c.on_fds(1, some_fds(2), 2),
            Err(Violation::TooManyFds { limit: 8 })
        );
        // Fds for a stream that is gone are closed, not held.
        c.on_fds(3, some_fds(3), 0).unwrap();
        assert_eq!(c.take_fds(3).len(), 0);
    }
}

#[test]
fn a_body_read_through_counts_as_received_and_read_and_its_fin_ends_the_stream() {
    let mut c = tuned(Side::Server, limits());
    feed(&mut c, hdr(FrameType::WindowUpdate, SYN, 1, 0), b"").unwrap();
    sent(&mut c);
    // Nothing buffered: a reader would wait, so it may read the body through.
    assert!(c.wait_readable(1));
    assert!(c.read_through_wanted(1), "its reader waits");
    let h = hdr(FrameType::Data, FIN, 1, 96 * 1024);
    c.on_header(&h).unwrap();
    // The I/O layer reads the body in two pieces straight into the reader's buffer.
    c.on_read_through(hdr(FrameType::Data, 0, 1, 40 * 1024), Instant::now())
        .unwrap();
    assert_eq!(c.buffered(), 0, "nothing is buffered for a read-through");
    assert!(sent(&mut c).is_empty(), "40 KiB is below a quarter window");
    c.on_read_through(hdr(FrameType::Data, FIN, 1, 56 * 1024), Instant::now())
        .unwrap();
    // Everything read-through counted as consumed: the credit goes back as for any read...
    assert_eq!(
        sent(&mut c),
        Vec::<u8>::new(),
        "no grant after the peer's FIN: it sends no more"
    );
    // ...and the FIN on the last piece ends the reader's stream.
    assert_eq!(read_all(&mut c, 1), Poll::Ready(Ok(Vec::new())));
    assert!(!c.wait_readable(1), "an ended stream is not read through");
    assert!(!c.read_through_wanted(1));
}

/// The reader reading a body through is the caller, running: neither its piece nor a frame
/// of its stream parsed after it reports it ready (a task woken while it runs is
/// rescheduled, and on a multi-thread runtime another worker unparked for it). A reader
/// that waits again is reported as before.
#[test]
fn a_read_through_does_not_report_its_own_reader_ready() {
    let mut c = tuned(Side::Server, limits());
    feed(&mut c, hdr(FrameType::WindowUpdate, SYN, 1, 0), b"").unwrap();
    sent(&mut c);
    ready(&mut c);
    assert!(c.wait_readable(1));
    let h = hdr(FrameType::Data, 0, 1, 32 * 1024);
    c.on_header(&h).unwrap();
    c.on_read_through(h, Instant::now()).unwrap();
    // The header read with the body's end, and the start of the next frame's body.
    feed(&mut c, hdr(FrameType::Data, 0, 1, 8), b"abcdefgh").unwrap();
    assert_eq!(ready(&mut c), [], "the reader runs: nobody to wake");
    // Its next read takes the buffered bytes; then it waits, and new data reports it.
    assert_eq!(read_all(&mut c, 1), Poll::Ready(Ok(b"abcdefgh".to_vec())));
    assert!(c.wait_readable(1));
    feed(&mut c, hdr(FrameType::Data, 0, 1, 1), b"i").unwrap();
    assert_eq!(ready(&mut c), [Ready::Read(1)]);
}

#[test]
fn read_through_is_granted_back_like_any_read_and_never_overdraws_the_window() {
    let mut c = tuned(Side::Server, limits());
    feed(&mut c, hdr(FrameType::WindowUpdate, SYN, 1, 0), b"").unwrap();
    sent(&mut c);
    for _ in 0..3 {
        let h = hdr(FrameType::Data, 0, 1, 32 * 1024);
        c.on_header(&h).unwrap();
        c.on_read_through(h, Instant::now()).unwrap();
    }
    assert_eq!(
        sent(&mut c),
        hdr(FrameType::WindowUpdate, 0, 1, 64 * 1024).encode(),
        "granted back at a quarter window, as reads out of the buffer are"
    );
    // The peer may now send at most one initial window: a frame beyond it is a violation
    // before anything is read through.
    let over = hdr(FrameType::Data, 0, 1, 256 * 1024 + 1);
    assert!(matches!(
        c.on_header(&over),
        Err(Violation::WindowExceeded { .. })
    ));
    // Data the peer sends on a stream with data buffered is not read through.
    feed(&mut c, hdr(FrameType::Data, 0, 1, 3), b"abc").unwrap();
    assert!(!c.wait_readable(1));
    assert_eq!(read_all(&mut c, 1), Poll::Ready(Ok(b"abc".to_vec())));
    assert!(c.wait_readable(1));
}

#[test]
fn windows_are_tuned_on_the_smallest_recent_round_trip() {
    let mut c = Connection::new(Side::Server, limits());
    let t0 = Instant::now();
    c.probe_answered(t0, t0 + Duration::from_millis(10));
    assert_eq!(c.rtt(), Some(Duration::from_millis(10)));
    // A later sample inflated by our own queue does not raise it...
    let t1 = t0 + Duration::from_secs(3);
    c.probe_answered(t1, t1 + Duration::from_millis(40));
    assert_eq!(c.rtt(), Some(Duration::from_millis(10)));
    // ...a smaller one lowers it...
    let t2 = t0 + Duration::from_secs(6);
    c.probe_answered(t2, t2 + Duration::from_millis(8));
    assert_eq!(c.rtt(), Some(Duration::from_millis(8)));
    // ...and once the smallest is older than the window, the latest sample stands (a path
    // that really got longer is followed).
    let t3 = t2 + RTT_WINDOW + Duration::from_secs(1);
    c.probe_answered(t3, t3 + Duration::from_millis(50));
    assert_eq!(c.rtt(), Some(Duration::from_millis(50)));
}

/// Feeds one data frame of `len` bytes on stream `id` as arriving at `at`.
fn feed_at(c: &mut Connection, flags: u16, id: u32, len: u32, at: Instant) {
    let h = hdr(FrameType::Data, flags, id, len);
    assert_eq!(c.on_header(&h), Ok(len as usize));
    c.on_frame(h, BytesMut::from(&vec![3u8; len as usize][..]), at)
        .unwrap();
}

/// Reads all of stream `id` at `at`; returns how many bytes.
fn read_all_at(c: &mut Connection, id: u32, at: Instant) -> usize {
    let mut n = 0;
    let _ = c.read(id, usize::MAX, || at, |s| n += s.len());
    n
}

/// The window updates the core wants sent, as (stream, credit).
fn grants(c: &mut Connection) -> Vec<(u32, u32)> {
    let mut q = VecDeque::new();
    c.take_output(usize::MAX, &mut q);
    q.iter()
        .map(|f| Header::decode(&f.header).unwrap())
        .filter(|h| h.ty == FrameType::WindowUpdate && h.flags == 0)
        .map(|h| (h.stream, h.length))
        .collect()
}

/// Opens streams 1 (bulk: its peer sends a whole window) and 3 (its peer sends `small`
/// bytes) at `at`, and reads both.
fn bulk_beside(c: &mut Connection, small: u32, at: Instant) {
    let window = 256 * 1024;
    for k in 0..4 {
        feed_at(c, if k == 0 { SYN } else { 0 }, 1, window / 4, at);
    }
    feed_at(c, SYN, 3, small, at);
    assert_eq!(read_all_at(c, 3, at), small as usize);
    assert_eq!(grants(c), []);
    assert_eq!(read_all_at(c, 1, at), window as usize);
}

/// While another stream exchanges small frames, a bulk stream's reader earns its peer only
/// `window_beside_interactive` in flight at a time; the rest of its window comes back once the small
/// frames have stopped for the hold time. Every byte is accepted throughout, and the peer
/// never has more than the window in flight.
#[test]
fn beside_an_interactive_stream_a_bulk_stream_keeps_only_the_window_beside_interactive_in_flight() {
    let window = 256 * 1024u32;
    let cap = 16 * 1024u32;
    let t0 = Instant::now();
    let mut c = with_rtt(Duration::from_micros(20));
    bulk_beside(&mut c, 64, t0);
    assert_eq!(grants(&mut c), [(1, cap)]);
    // The peer uses that; each read earns it the cap again, nothing more, while the small
    // frames go on.
    let mut t = t0;
    for _ in 0..8 {
        t += Duration::from_micros(100);
        feed_at(&mut c, 0, 3, 64, t);
        feed_at(&mut c, 0, 1, cap, t);
        assert_eq!(read_all_at(&mut c, 1, t), cap as usize);
        assert_eq!(grants(&mut c), [(1, cap)]);
    }
    // Half the cap still in flight: no update yet.
    feed_at(&mut c, 0, 1, cap / 2 - 1, t);
    assert_eq!(read_all_at(&mut c, 1, t), (cap / 2 - 1) as usize);
    assert_eq!(grants(&mut c), []);
    // The small frames stop; after the hold the whole window is granted back.
    t += INTERACTIVE_HOLD + Duration::from_micros(1);
    feed_at(&mut c, 0, 1, cap / 2 + 1, t);
    assert_eq!(read_all_at(&mut c, 1, t), (cap / 2 + 1) as usize);
    assert_eq!(grants(&mut c), [(1, window)]);
    assert_eq!(
        c.on_header(&hdr(FrameType::Data, 0, 1, window + 1)),
        Err(Violation::WindowExceeded {
            stream: 1,
            len: window + 1,
            window
        })
    );
}

/// Streams that run bulk (their peers use most of their windows, or their windows have
/// grown) are not interactive, whatever their frame sizes: the tail of a bulk write caps
/// nobody. Nor does anything cap a session with `window_beside_interactive` 0, or a stream whose only
/// neighbour is itself.
#[test]
fn small_frames_of_bulk_streams_and_a_zero_window_beside_interactive_cap_nobody() {
    let window = 256 * 1024u32;
    let t0 = Instant::now();
    // Stream 1's window grew (drained quickly at a 1 ms round trip); long after, on a fast
    // link, its peer sends a small frame while using little of it.
    let mut c = with_rtt(Duration::from_millis(1));
    drain_first_window_and_see_it_double(&mut c, t0);
    let later = t0 + 2 * BULK_MEMORY;
    c.set_rtt(Duration::from_micros(20), later);
    feed_at(&mut c, 0, 1, 436, later);
    for k in 0..4 {
        feed_at(&mut c, if k == 0 { SYN } else { 0 }, 3, window / 4, later);
    }
    assert_eq!(read_all_at(&mut c, 3, later), window as usize);
    assert_eq!(grants(&mut c), [(3, window)]);
    // Stream 3's small frame arrives when its peer has used most of its window.
    let mut c = with_rtt(Duration::from_micros(20));
    for k in 0..4 {
        feed_at(&mut c, if k == 0 { SYN } else { 0 }, 1, window / 4, t0);
    }
    feed_at(&mut c, SYN, 3, window - 100, t0);
    feed_at(&mut c, 0, 3, 64, t0);
    assert_eq!(read_all_at(&mut c, 1, t0), window as usize);
    assert_eq!(grants(&mut c), [(1, window)]);
    // The same small frame on a fresh stream, with the cap turned off.
    let mut c = Connection::new(
        Side::Server,
        Limits {
            window_beside_interactive: 0,
            ..limits()
        },
    );
    c.set_rtt(Duration::from_micros(20), t0);
    bulk_beside(&mut c, 64, t0);
    assert_eq!(grants(&mut c), [(1, window)]);
    // One stream alone, its own small frames before a bulk window.
    let mut c = with_rtt(Duration::from_micros(20));
    feed_at(&mut c, SYN, 1, 64, t0);
    feed_at(&mut c, 0, 1, window - 64, t0);
    assert_eq!(read_all_at(&mut c, 1, t0), window as usize);
    assert_eq!(grants(&mut c), [(1, window)]);
}

/// At a longer round trip the cap is what carries `flow::RATE_BESIDE_INTERACTIVE` there, and once that is
/// beyond the window, as across a WAN, nothing is capped: the window is granted back and
/// grows as it would without the interactive stream.
#[test]
fn the_window_beside_interactive_grows_with_the_round_trip() {
    let t0 = Instant::now();
    let mut c = with_rtt(Duration::from_micros(100));
    bulk_beside(&mut c, 64, t0);
    assert_eq!(grants(&mut c), [(1, 50_000)]);
    let mut c = with_rtt(Duration::from_millis(50));
    bulk_beside(&mut c, 64, t0);
    assert_eq!(grants(&mut c), [(1, 2 * 256 * 1024)]);
    assert_eq!(c.growth_used(), 256 * 1024);
}

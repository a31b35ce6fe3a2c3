//! A raw client of the hub that writes each layer by hand, hostile or not: yamux frame
//! headers, rpc preambles, frames and envelopes, the fileshare hello and fileshare requests. Shared by
//! tests/hub_limits.rs and benches/load.rs, which include it with `#[path]` next to the
//! crate's own `auth` and `proto` modules (the `share` crate has no library to link).

#![allow(dead_code)] // not every user needs every helper

use std::net::{IpAddr, SocketAddr};

use netchan_mux::{Conn, Session};
use netchan_rpc::{self as rpc, Context, ItemStream, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proto::{Chunk, Export, HubClient, PublishReq, ReadReq, EXPORT_CHANNEL};
use crate::proto::{Entry, Listing};

/// The rpc preamble: magic `NCRPC`, version 2 (docs/protocol.md, Part 2).
pub(crate) const RPC_PREAMBLE: [u8; 6] = *b"NCRPC\x02";

/// The 4-byte big-endian length prefix of an rpc frame whose body claims `len` bytes.
pub(crate) fn rpc_prefix(len: u32) -> [u8; 4] {
    len.to_be_bytes()
}

/// yamux frame types and flags (the yamux specification).
pub(crate) mod yamux {
    /// Data frame.
    pub(crate) const DATA: u8 = 0;
    /// Window update frame.
    pub(crate) const WINDOW_UPDATE: u8 = 1;
    /// Ping frame.
    pub(crate) const PING: u8 = 2;
    /// Go away frame.
    pub(crate) const GO_AWAY: u8 = 3;
    /// Opens a stream.
    pub(crate) const SYN: u16 = 1;
    /// Acknowledges a stream or answers a ping.
    pub(crate) const ACK: u16 = 2;
    /// Resets a stream.
    pub(crate) const RST: u16 = 8;
}

/// One yamux frame as read by [`read_yamux_frame`]: type, flags, stream, length, and the
/// body (Data frames only).
#[derive(Debug)]
pub(crate) struct RawFrame {
    pub(crate) ty: u8,
    pub(crate) flags: u16,
    pub(crate) stream: u32,
    pub(crate) len: u32,
    pub(crate) body: Vec<u8>,
}

/// Reads one yamux frame from `tcp`; `None` at the end of the connection (or on an error).
pub(crate) async fn read_yamux_frame(tcp: &mut TcpStream) -> Option<RawFrame> {
    let mut h = [0u8; 12];
    tcp.read_exact(&mut h).await.ok()?;
    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    let mut body = Vec::new();
    if h[1] == yamux::DATA {
        body = vec![0u8; len as usize];
        tcp.read_exact(&mut body).await.ok()?;
    }
    Some(RawFrame {
        ty: h[1],
        flags: u16::from_be_bytes([h[2], h[3]]),
        stream: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        len,
        body,
    })
}

/// Reads frames until the peer's GoAway and returns its code, then reads on to the end of the
/// connection. `None` if the connection ended without a GoAway. Callers bound it in time.
pub(crate) async fn go_away_then_eof(tcp: &mut TcpStream) -> Option<u32> {
    let mut code = None;
    while let Some(f) = read_yamux_frame(tcp).await {
        if f.ty == yamux::GO_AWAY && code.is_none() {
            code = Some(f.len);
        }
    }
    code
}

/// A 12-byte yamux header: version 0, `ty`, `flags`, `stream`, `len` (all big-endian).
pub(crate) fn yamux_header(ty: u8, flags: u16, stream: u32, len: u32) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[1] = ty;
    h[2..4].copy_from_slice(&flags.to_be_bytes());
    h[4..8].copy_from_slice(&stream.to_be_bytes());
    h[8..12].copy_from_slice(&len.to_be_bytes());
    h
}

/// The fileshare hello, written by hand: `version 3 | token_len u16 BE | token`.
pub(crate) fn hello_bytes(token: &[u8]) -> Vec<u8> {
    let mut m = vec![3u8]; // fileshare protocol version 3
    m.extend_from_slice(&(token.len() as u16).to_be_bytes());
    m.extend_from_slice(token);
    m
}

/// A TCP connection to `hub` from the loopback address `source` (each admission cap counts
/// per source address, so many clients spread over 127.0.0.0/8).
pub(crate) async fn tcp_from(source: IpAddr, hub: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind((source, 0).into())
        .expect("bind a loopback source");
    let tcp = sock.connect(hub).await.expect("connect to the hub");
    let _ = tcp.set_nodelay(true);
    tcp
}

/// The `i`-th loopback source address (127.0.1.1, 127.0.1.2, ...).
pub(crate) fn source(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8])
}

/// Says hello by hand on a new session over `io` (a TCP connection to the hub); panics unless
/// the hub answers OK.
pub(crate) async fn hello<T>(io: T) -> Session
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let session = Session::client(io, netchan_mux::Config::default());
    let mut ch = session
        .dial("fileshare.hello")
        .await
        .expect("hello channel");
    ch.write_all(&hello_bytes(b"")).await.expect("send hello");
    ch.flush().await.expect("flush hello");
    let mut head = [0u8; 3];
    ch.read_exact(&mut head).await.expect("hello answer");
    assert_eq!(head[0], 0, "the hub refused the hello");
    let mut text = vec![0u8; u16::from_be_bytes([head[1], head[2]]) as usize];
    ch.read_exact(&mut text).await.expect("hello text");
    session
}

/// Longest wait for the hub to listen on its end of the peer link after the hello.
const PEER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// After the hello, our end of the rpc peer link written by hand: answers the hub's dial of
/// [`rpc::PEER_CHANNEL`] (serving nothing on it), and returns the conn we dial to the hub's
/// end, preamble sent, for hand-made frames: the hub serves `Hub` there.
pub(crate) async fn raw_hub_channel(session: &Session) -> Conn {
    let mut listener = session.listen(rpc::PEER_CHANNEL).expect("peer listener");
    tokio::spawn(async move {
        // Ends with the session.
        if let Ok(ch) = listener.accept().await {
            let _ = rpc::Server::new().serve(ch).await;
        }
    });
    let mut ch = session
        .dial_waiting(rpc::PEER_CHANNEL, PEER_WAIT)
        .await
        .expect("peer channel");
    ch.write_all(&RPC_PREAMBLE).await.expect("preamble");
    ch
}

/// After the hello, our end of the peer link on a hand-written yamux connection: reads the
/// hub's frames until it opens the peer channel (a Data frame with SYN on an even stream),
/// and accepts it (WindowUpdate with ACK, then the channel handshake's reply `01 00`, Part
/// 1). Returns the stream id. Callers bound it in time.
pub(crate) async fn accept_hub_peer_dial(tcp: &mut TcpStream) -> u32 {
    loop {
        let f = read_yamux_frame(tcp).await.expect("the hub's peer dial");
        if f.ty == yamux::DATA && f.flags & yamux::SYN != 0 && f.stream % 2 == 0 {
            let mut reply = yamux_header(yamux::WINDOW_UPDATE, yamux::ACK, f.stream, 0).to_vec();
            reply.extend_from_slice(&yamux_header(yamux::DATA, 0, f.stream, 2));
            reply.extend_from_slice(&[1, 0]);
            tcp.write_all(&reply).await.expect("accept the peer dial");
            return f.stream;
        }
    }
}

/// The rpc peer link after the hello: serves `server` to the hub and returns the hub's client.
/// The link lives as long as `session`.
pub(crate) async fn peer_link(session: &Session, server: rpc::Server) -> HubClient {
    let link = rpc::Peer::connect(session, server)
        .await
        .expect("rpc peer link with the hub");
    let hub = HubClient::new(link.client().clone());
    let session = session.clone();
    tokio::spawn(async move {
        session.closed().await;
        drop(link);
    });
    hub
}

/// An export service with nothing in it: every client must serve one to publish.
pub(crate) struct NoFiles;

impl Export for NoFiles {
    async fn ls(&self, _ctx: Context, _req: String) -> Result<Listing, Status> {
        Err(Status::not_found("this client exports nothing"))
    }

    async fn stat(&self, _ctx: Context, _req: String) -> Result<Entry, Status> {
        Err(Status::not_found("this client exports nothing"))
    }

    async fn read(&self, _ctx: Context, _req: ReadReq) -> Result<ItemStream<Chunk>, Status> {
        Err(Status::not_found("this client exports nothing"))
    }
}

/// Connects from `source`, says hello, serves [`NoFiles`] and publishes `name`.
pub(crate) async fn join(hub: SocketAddr, source: IpAddr, name: String) -> (Session, HubClient) {
    let session = hello(tcp_from(source, hub).await).await;
    serve_no_files(&session);
    let hub = peer_link(&session, no_files_server()).await;
    hub.publish(PublishReq { name }).await.expect("publish");
    (session, hub)
}

/// bincode 2 `standard()` varint of `n` (docs/protocol.md, Part 2, "Codec").
pub(crate) fn varint(n: u64, out: &mut Vec<u8>) {
    match n {
        0..=250 => out.push(n as u8),
        251..=0xffff => {
            out.push(0xfb);
            out.extend_from_slice(&(n as u16).to_le_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0xfc);
            out.extend_from_slice(&(n as u32).to_le_bytes());
        }
        _ => {
            out.push(0xfd);
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
}

/// A string as bincode writes it: varint length, then the bytes (not checked as UTF-8, so a
/// hostile caller can send bad ones).
pub(crate) fn string(s: &[u8], out: &mut Vec<u8>) {
    varint(s.len() as u64, out);
    out.extend_from_slice(s);
}

/// A whole rpc `Request` frame written by hand: length prefix, envelope header (`00`, id,
/// method, no deadline, no stream credit, no metadata), then `payload` as given.
pub(crate) fn request_frame(id: u64, method: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8];
    varint(id, &mut body);
    string(method.as_bytes(), &mut body);
    body.extend_from_slice(&[0, 0, 0]);
    body.extend_from_slice(payload);
    let mut frame = rpc_prefix(body.len() as u32).to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// An rpc server of [`NoFiles`].
pub(crate) fn no_files_server() -> rpc::Server {
    let mut server = rpc::Server::new();
    server.add(NoFiles.into_service());
    server
}

/// Serves [`NoFiles`] on `session`'s export channel (the hub dials it back on publish).
pub(crate) fn serve_no_files(session: &Session) {
    let mut exports = session.listen(EXPORT_CHANNEL).expect("export listener");
    let server = no_files_server();
    tokio::spawn(async move {
        // Ends with the session.
        while let Ok(ch) = exports.accept().await {
            let server = server.clone();
            tokio::spawn(async move { server.serve(ch).await });
        }
    });
}

/// Reads one rpc frame body from `ch` (after the peer's preamble has been read).
pub(crate) async fn read_frame(ch: &mut Conn) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    ch.read_exact(&mut len).await?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    ch.read_exact(&mut body).await?;
    Ok(body)
}

//! Satellite imagery over netchan (seed 003, "Calling Go from Python via gRPC"): a unary
//! `GetImage` and a server-streaming `GetImages` over an 80x32 map, with gRPC-style status
//! codes (`OUT_OF_RANGE` off the map), a deadline that cancels a slow stream (the server sees
//! the cancellation), a metadata token (`UNAUTHENTICATED` without it) and mutual TLS.
//!
//! # Layout
//!
//! - this file: the messages, the [`Satellite`] service, [`SatelliteServer`], [`bind`] and
//!   [`connect`];
//! - `pki.rs`: throwaway certificates for the demo and the tests (rcgen);
//! - `main.rs`: the `satellite` binary (`serve`, `get-image`, `get-images`, `demo`).

pub mod pki;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use netchan::{
    net::{BindError, ConnectError, TlsClient, TlsServer},
    rpc::{self, rpc_service, CallOptions, Context, ItemStream, Status},
    Addr, BindOptions, ConnectOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The map's width: x runs from 0 to 79.
pub const WIDTH: i32 = 80;
/// The map's height: y runs from 0 to 31.
pub const HEIGHT: i32 = 32;
/// The channel the service is served on in every session.
pub const CHANNEL: &str = "satellite";
/// The metadata key carrying the token.
pub const TOKEN_KEY: &str = "authorization";

/// A point on the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// Column, 0 to [`WIDTH`] - 1.
    pub x: i32,
    /// Row, 0 to [`HEIGHT`] - 1.
    pub y: i32,
}

/// A rectangle given by its lower-left and upper-right corners (both included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Area {
    /// Lower-left corner.
    pub ll: Location,
    /// Upper-right corner.
    pub ur: Location,
}

/// The image of one location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Column.
    pub x: i32,
    /// Row.
    pub y: i32,
    /// The image bytes (here one character of terrain).
    pub img: Vec<u8>,
}

/// The satellite's imagery service.
#[rpc_service(crate = "netchan::rpc")]
pub trait Satellite {
    /// The image at a location; `OUT_OF_RANGE` off the map.
    async fn get_image(&self, ctx: Context, at: Location) -> Result<Image, Status>;
    /// The images of an area, row by row; `OUT_OF_RANGE` if it leaves the map.
    async fn get_images(&self, ctx: Context, area: Area) -> Result<ItemStream<Image>, Status>;
}

/// The terrain at a location: one of `~` (sea), `.` (plain), `^` (hills), `#` (city).
pub fn terrain(at: Location) -> u8 {
    b"~~.^~.#^"[((at.x * 7 + at.y * 13) % 8) as usize]
}

fn on_map(at: Location) -> bool {
    (0..WIDTH).contains(&at.x) && (0..HEIGHT).contains(&at.y)
}

/// What the server has seen, for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Images sent by `GetImages`.
    pub images_streamed: AtomicU64,
}

/// The [`Satellite`] implementation.
#[derive(Clone)]
pub struct SatelliteServer {
    token: Option<Arc<str>>,
    delay: Duration,
    stats: Arc<Stats>,
    cancelled: Arc<watch::Sender<u64>>,
}

impl SatelliteServer {
    /// A server that requires `token` (if any) and waits `delay` before each streamed image
    /// (a slow sensor).
    pub fn new(token: Option<String>, delay: Duration) -> SatelliteServer {
        SatelliteServer {
            token: token.map(Arc::from),
            delay,
            stats: Arc::default(),
            cancelled: Arc::new(watch::channel(0).0),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// How many `GetImages` streams were cancelled before their end, watched.
    pub fn cancelled(&self) -> watch::Receiver<u64> {
        self.cancelled.subscribe()
    }

    fn check_token(&self, ctx: &Context) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let expected = format!("Bearer {token}");
        match ctx.metadata().get(TOKEN_KEY) {
            Some(given) if given == expected => Ok(()),
            Some(_) => Err(Status::unauthenticated("wrong token")),
            None => Err(Status::unauthenticated(format!("no {TOKEN_KEY} token"))),
        }
    }
}

impl Satellite for SatelliteServer {
    async fn get_image(&self, ctx: Context, at: Location) -> Result<Image, Status> {
        self.check_token(&ctx)?;
        if !on_map(at) {
            return Err(Status::out_of_range(format!(
                "({}, {}) is off the {WIDTH}x{HEIGHT} map",
                at.x, at.y
            )));
        }
        Ok(Image {
            x: at.x,
            y: at.y,
            img: vec![terrain(at)],
        })
    }

    async fn get_images(&self, ctx: Context, area: Area) -> Result<ItemStream<Image>, Status> {
        self.check_token(&ctx)?;
        let Area { ll, ur } = area;
        if !on_map(ll) || !on_map(ur) {
            return Err(Status::out_of_range(format!(
                "area ({}, {})-({}, {}) leaves the {WIDTH}x{HEIGHT} map",
                ll.x, ll.y, ur.x, ur.y
            )));
        }
        if ll.x > ur.x || ll.y > ur.y {
            return Err(Status::invalid_argument(
                "the lower-left corner is above or right of the upper-right one",
            ));
        }
        let points: Vec<Location> = (ll.y..=ur.y)
            .flat_map(|y| (ll.x..=ur.x).map(move |x| Location { x, y }))
            .collect();
        let total = points.len();
        let guard = CancelGuard {
            sent: 0,
            total,
            cancelled: self.cancelled.clone(),
        };
        let (delay, stats) = (self.delay, self.stats.clone());
        let stream = futures::stream::unfold(
            (points.into_iter(), guard),
            move |(mut points, mut guard)| {
                let stats = stats.clone();
                async move {
                    let at = points.next()?;
                    tokio::time::sleep(delay).await;
                    guard.sent += 1;
                    stats.images_streamed.fetch_add(1, Ordering::Relaxed);
                    let image = Image {
                        x: at.x,
                        y: at.y,
                        img: vec![terrain(at)],
                    };
                    Some((Ok(image), (points, guard)))
                }
            },
        );
        Ok(Box::pin(stream))
    }
}

/// Counts a `GetImages` stream dropped before its last image: the call was cancelled (its
/// deadline passed, the client dropped it or vanished).
struct CancelGuard {
    sent: usize,
    total: usize,
    cancelled: Arc<watch::Sender<u64>>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.sent < self.total {
            tracing::info!(sent = self.sent, total = self.total, "GetImages cancelled");
            self.cancelled.send_modify(|n| *n += 1);
        }
    }
}

/// Binds `addr` (`tls://` with `tls`, or plain) and serves `server` on every session.
pub async fn bind(
    addr: &Addr,
    tls: Option<TlsServer>,
    server: SatelliteServer,
) -> Result<netchan::Listener, BindError> {
    let mut rpc_server = rpc::Server::new();
    rpc_server.add(server.into_service());
    let mut options = BindOptions::default().on_session(move |session| {
        let Ok(calls) = session.listen(CHANNEL) else {
            return;
        };
        let rpc_server = rpc_server.clone();
        tokio::spawn(async move { rpc_server.serve_all(calls).await });
    });
    if let Some(tls) = tls {
        options = options.tls(tls);
    }
    netchan::bind(addr, options).await
}

/// Accepts sessions until the task is dropped; they serve themselves (see [`bind`]).
pub async fn serve(mut listener: netchan::Listener) {
    loop {
        match listener.accept().await {
            Ok(_session) => tracing::debug!("session accepted"),
            Err(e) => tracing::warn!(error = %e, "a connection failed"),
        }
    }
}

/// Why a client could not reach the service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The connection (or its TLS handshake) failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The session came up but the service channel did not open.
    #[error("cannot open the {CHANNEL} channel")]
    Dial(#[from] netchan::mux::Error),
}

/// Connects to the service at `addr`, sending `token` (if any) with every call.
pub async fn connect(
    addr: &Addr,
    tls: Option<TlsClient>,
    token: Option<&str>,
) -> Result<SatelliteClient, ClientError> {
    let mut options = ConnectOptions::default();
    if let Some(tls) = tls {
        options = options.tls(tls);
    }
    let session = netchan::connect(addr, options).await?;
    let conn = session.dial(CHANNEL).await?;
    Ok(SatelliteClient::new(rpc::Client::new(conn))
        .with_options(call_options(token, Duration::from_secs(30))))
}

/// Call options carrying `token` (if any) and a `timeout`: pass them to
/// [`SatelliteClient::with_options`] (which replaces the client's options as a whole).
pub fn call_options(token: Option<&str>, timeout: Duration) -> CallOptions {
    let options = CallOptions::default().timeout(timeout);
    match token {
        Some(token) => options.metadata(TOKEN_KEY, format!("Bearer {token}")),
        None => options,
    }
}

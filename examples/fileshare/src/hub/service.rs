//! The [`Hub`] service as one connection sees it: publish, list, and the calls forwarded to
//! exporters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use netchan_rpc::{CallOptions, Context, ItemStream, Status};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::conn::{ConnState, Published, ReaderSlot};
use super::forward::{active_reads, from_peer, ActiveRead, PeerHandle, Pump};
use super::registry::{validate_name, ConnId, NameError};
use super::relay::RemoteHub;
use super::HubState;
use crate::directory::DirectoryError;
use crate::export::CHUNK_SIZE;
use crate::proto::{
    Chunk, Entry, ExportClient, Hub, ListReq, Listing, PeerPath, PeerRead, PublishReq, PublishResp,
    ReadReq, MAX_OFFSET, READER_KEY,
};

/// The [`Hub`] service as seen by one connection.
pub(super) struct HubService(pub(super) Arc<ConnState>);

/// Where a peer named in a call is published.
pub(super) enum Located {
    /// On this hub.
    Here(PeerHandle),
    /// On another hub of the fleet.
    There(RemoteHub),
}

impl HubState {
    /// Finds peer `name`: published here, else held by another hub of the fleet (as the
    /// fleet's [`Route`](super::relay::Route) says), else `NotFound`.
    pub(super) fn locate(&self, name: &str) -> Result<Located, Status> {
        if self.peers.get(name).is_none() {
            if let Some(remote) = self.remote_holder(name) {
                return Ok(Located::There(remote));
            }
        }
        self.peer(name).map(Located::Here)
    }

    /// Forwards one unary call from `reader` (on connection `conn`, holding `mine`, one of
    /// its places for this exporter) to the exporter `peer` published here as `name`: the
    /// call holds one of that peer's slots while it runs, is bounded by `peer_timeout`, and
    /// the peer's error comes back rewritten by [`from_peer`].
    pub(super) async fn forward_call<T, F, Fut>(
        &self,
        reader: String,
        conn: ConnId,
        mine: ReaderSlot,
        name: &str,
        peer: PeerHandle,
        call: F,
    ) -> Result<T, Status>
    where
        F: FnOnce(ExportClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let _mine = mine;
        let _slot = self.slot(name, &peer, conn).await?;
        let export = peer.export.with_options(
            CallOptions::default()
                .timeout(self.opts.peer_timeout)
                .metadata(READER_KEY, reader),
        );
        let result = call(export).await;
        if result.is_ok() {
            self.heard(&peer);
        }
        result.map_err(|s| from_peer(name, s))
    }

    /// Forwards `Hub.read` of `req` from `reader` (on connection `conn`, holding `mine`) to
    /// the exporter `peer` published here: one of its slots, a window sized from its round
    /// trip, and the stream of its chunks the reader's call pulls ([`Pump::into_stream`]).
    /// `ctx` is the reader's call, ended when the hub gives the read up.
    pub(super) async fn forward_read(
        self: &Arc<Self>,
        reader: String,
        conn: ConnId,
        mine: ReaderSlot,
        peer: PeerHandle,
        ctx: Context,
        req: PeerRead,
    ) -> Result<ItemStream<Chunk>, Status> {
        let hub = self;
        let name = req.peer;
        let slot = hub.slot(&name, &peer, conn).await?;
        let (client, wanted) = hub.reads_client(&name, &peer).await?;
        let (window, reserved) = hub.reserve_window(&peer, wanted);
        info!(%reader, peer = %name, path = %req.path, window, "read");
        let upstream = client
            .with_options(
                CallOptions::default()
                    .metadata(READER_KEY, reader.clone())
                    .stream_window(window),
            )
            .read(ReadReq {
                path: req.path,
                offset: req.offset,
            })
            .await
            .map_err(|s| from_peer(&name, s))?;
        hub.heard(&peer);
        // The reader's call pulls each chunk from the exporter's stream as its credit allows:
        // the exporter's window bounds what the hub holds.
        let id = hub.next_read.fetch_add(1, Ordering::Relaxed);
        let took = Arc::new(AtomicU64::new(hub.epoch.elapsed().as_millis() as u64));
        let stop = CancellationToken::new();
        let blocked = Arc::new(AtomicBool::new(false));
        active_reads(&peer).push(ActiveRead {
            id,
            conn,
            took: took.clone(),
            blocked: blocked.clone(),
            stop: stop.clone(),
        });
        let pump = Pump {
            hub: hub.clone(),
            name,
            peer,
            offset: req.offset,
            ctx,
            _slots: (slot, mine, reserved),
            id,
            took,
            blocked,
            stop,
        };
        Ok(pump.into_stream(upstream))
    }
}

/// Refuses a read from an offset no file can have.
pub(super) fn check_offset(offset: u64) -> Result<(), Status> {
    if offset > MAX_OFFSET {
        return Err(Status::out_of_range(format!(
            "offset {offset} is past the largest possible file offset ({MAX_OFFSET})"
        )));
    }
    Ok(())
}

impl Hub for HubService {
    async fn publish(&self, ctx: Context, req: PublishReq) -> Result<PublishResp, Status> {
        let conn = &self.0;
        // The caller's export service, over its own peer link: how the hub calls it back.
        let export = ExportClient::new(ctx.callback()?);
        let name = req.name;
        validate_name(&name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut published = conn.published.lock().await;
        match &*published {
            Published::No => {}
            Published::As(old) => {
                return Err(Status::failed_precondition(format!(
                    "this connection is already published as {old:?}"
                )))
            }
            Published::Gone => return Err(Status::unavailable("the connection is closing")),
        }
        let taken = || Status::already_exists(NameError::Taken { name: name.clone() }.to_string());
        // A live holder keeps its name: only the end of its session (quit, crash, keepalive)
        // frees it. Checked again atomically by the insert below.
        if conn.hub.peers.get(&name).is_some() {
            warn!(peer = %name, conn = conn.id, "refused: name already taken");
            return Err(taken());
        }
        // The client must serve its export channel (where reads go) before it is listed: open
        // one and let it go (the reads channel is opened on first use).
        drop(conn.dial_export().await?);
        // A seat among the published clients, or "the hub is full".
        let Ok(seat) = conn.hub.connections.clone().try_acquire_owned() else {
            let limit = conn.hub.opts.max_connections;
            if let Some(more) = conn.hub.refusal_log.allow() {
                warn!(peer = %name, conn = conn.id, limit, more_since_last_line = more, "refused: the hub is full");
            }
            return Err(Status::resource_exhausted(format!(
                "the hub is full: it serves {limit} clients, its limit; try again later"
            )));
        };
        let handle = PeerHandle {
            session: conn.session.clone(),
            export,
            reads: Arc::new(tokio::sync::Mutex::new(None)),
            window_budget: Arc::new(Semaphore::new(conn.hub.opts.forward_budget / CHUNK_SIZE)),
            heard: Arc::new(AtomicU64::new(0)),
            calls: Arc::new(Semaphore::new(conn.hub.opts.max_reads_per_peer.max(1))),
            active: Arc::new(Mutex::new(Vec::new())),
        };
        // Claimed fleet-wide first: another hub may hold the name, or the directory may be
        // out of reach (then nothing is claimed, and the client tries again later).
        if let Err(e) = conn.hub.directory.publish(&name).await {
            warn!(peer = %name, conn = conn.id, "refused: {e}");
            return Err(match e {
                DirectoryError::Taken { .. } => taken(),
                DirectoryError::Unreachable { .. } => Status::unavailable(e.to_string()),
                DirectoryError::Closed => Status::unavailable("the hub is shutting down"),
                other => Status::internal(other.to_string()),
            });
        }
        if let Err(e) = conn.hub.peers.insert(&name, conn.id, handle) {
            warn!(peer = %name, conn = conn.id, "refused: {e}");
            // The directory's claim was this connection's; give it back.
            if let Err(e) = conn.hub.directory.release(&name).await {
                warn!(peer = %name, "could not release the name in the fleet's directory: {e}");
            }
            return Err(match e {
                NameError::Taken { .. } => taken(),
                other => Status::invalid_argument(other.to_string()),
            });
        }
        *published = Published::As(name.clone());
        *conn
            .seat
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(seat);
        conn.is_published.store(true, Ordering::SeqCst);
        drop(
            conn.pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        conn.hub.changed();
        let peers = conn.hub.peers.len() as u32;
        info!(peer = %name, conn = conn.id, addr = %conn.label, peers, "joined");
        Ok(PublishResp { name, peers })
    }

    async fn list(&self, _ctx: Context, _req: ListReq) -> Result<Vec<String>, Status> {
        self.0.published_name().await?;
        Ok(self.0.hub.names())
    }

    async fn ls(&self, _ctx: Context, req: PeerPath) -> Result<Listing, Status> {
        let conn = &self.0;
        let reader = conn.published_name().await?;
        let PeerPath { peer: name, path } = req;
        match conn.hub.locate(&name)? {
            Located::Here(peer) => {
                let mine = conn.reader_slot(&name)?;
                let call = |export: ExportClient| async move { export.ls(path).await };
                (conn.hub)
                    .forward_call(reader, conn.id, mine, &name, peer, call)
                    .await
            }
            Located::There(remote) => {
                let mine = conn.reader_slot(&name)?;
                conn.hub.relay_ls(&remote, &reader, mine, name, path).await
            }
        }
    }

    async fn stat(&self, _ctx: Context, req: PeerPath) -> Result<Entry, Status> {
        let conn = &self.0;
        let reader = conn.published_name().await?;
        let PeerPath { peer: name, path } = req;
        match conn.hub.locate(&name)? {
            Located::Here(peer) => {
                let mine = conn.reader_slot(&name)?;
                let call = |export: ExportClient| async move { export.stat(path).await };
                (conn.hub)
                    .forward_call(reader, conn.id, mine, &name, peer, call)
                    .await
            }
            Located::There(remote) => {
                let mine = conn.reader_slot(&name)?;
                conn.hub
                    .relay_stat(&remote, &reader, mine, name, path)
                    .await
            }
        }
    }

    async fn read(&self, ctx: Context, req: PeerRead) -> Result<ItemStream<Chunk>, Status> {
        let conn = &self.0;
        let reader = conn.published_name().await?;
        check_offset(req.offset)?;
        match conn.hub.locate(&req.peer)? {
            Located::Here(peer) => {
                let mine = conn.reader_slot(&req.peer)?;
                (conn.hub)
                    .forward_read(reader, conn.id, mine, peer, ctx, req)
                    .await
            }
            Located::There(remote) => {
                let mine = conn.reader_slot(&req.peer)?;
                conn.hub.relay_read(&remote, &reader, mine, req).await
            }
        }
    }
}

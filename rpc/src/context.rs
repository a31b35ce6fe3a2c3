//! [`Context`]: what a handler knows about the call it serves.

use std::{
    pin::pin,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use crate::{
    client::CallOptions,
    client::Client,
    client::WeakClient,
    fds::{Fd, FdBatch, FdLink},
    metadata::Metadata,
    status::Status,
};

/// Where a call came from: the conn's label and, when the conn belongs to a
/// [`Peer`](crate::Peer), a way back to the caller.
#[derive(Clone, Debug, Default)]
pub(crate) struct Origin {
    pub(crate) label: Option<Arc<str>>,
    pub(crate) callback: Option<WeakClient>,
    /// The conn's descriptor handle (set by the server for each conn it serves).
    pub(crate) fds: FdLink,
}

// Defined here rather than beside the rest of `CallOptions`: a context
// knows the client (its way back to the caller), so the client must not
// know the context, or the two modules would depend on each other.
impl CallOptions {
    /// Options carrying `ctx`'s deadline, for a call made while serving
    /// another (the nested call gives up when the outer caller would).
    #[must_use]
    pub fn propagate(ctx: &Context) -> CallOptions {
        match ctx.deadline() {
            Some(deadline) => CallOptions::default().deadline(deadline),
            None => CallOptions::default(),
        }
    }
}

/// Why a call ended, as [`Context::end_reason`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// The handler finished (its answer, or its stream's end, was sent).
    Completed,
    /// The caller cancelled it: dropped the call or its response stream
    /// (the client sent `Cancel`).
    Cancelled,
    /// Its deadline passed before the handler finished.
    DeadlineExceeded,
    /// The server ended it for exceeding a limit of the conn (request
    /// bytes held, a request item over the message size).
    Refused,
    /// Its conn ended (lost, or cut at the end of a graceful shutdown).
    ConnClosed,
    /// Work of the handler ended it with a status ([`Context::abort`]).
    Aborted,
}

/// Per-call information handed to a handler: the caller's metadata, the
/// deadline, a cancellation signal, the peer's label and, for calls that
/// came in through a [`Peer`](crate::Peer), a client to call the caller
/// back ([`Context::callback`]).
///
/// Cheap to clone (an `Arc`); clones see the same cancellation.
#[derive(Clone, Debug)]
pub struct Context {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Shared with the server's registry.
    method: Arc<str>,
    metadata: Metadata,
    deadline: Option<Instant>,
    origin: Origin,
    /// Why the call ended, set once by whoever ends it: the call is over
    /// once it is set (after `abort`, if there is a status).
    end: OnceLock<EndReason>,
    /// Woken when `end` is set (a flag and a `Notify` in the context's one
    /// allocation: a call needs no token of its own).
    ended: Notify,
    /// Response metadata set by the handler; sent before the answer.
    trailers: Mutex<Metadata>,
    /// Descriptors the request carried, until the handler takes them.
    request_fds: Mutex<Vec<Fd>>,
    /// Descriptors for the response, set by the handler.
    reply_fds: Mutex<Option<FdBatch>>,
    /// The status the call ends with when it was ended by [`Context::abort`] or by a
    /// limit of its conn, set before `end`: what the server answers with.
    abort: OnceLock<Status>,
    /// Whether [`Context::abort`] may end the call (not for a detached context).
    abortable: bool,
}

impl Context {
    /// A call's context. It also keeps what the server needs to end the call (why it
    /// ended, its waiters, the status it was aborted with), so a call allocates one `Arc`
    /// for all of that.
    pub(crate) fn new(
        method: Arc<str>,
        metadata: Metadata,
        deadline: Option<Instant>,
        origin: Origin,
    ) -> Context {
        Context {
            inner: Arc::new(Inner {
                method,
                metadata,
                deadline,
                origin,
                end: OnceLock::new(),
                ended: Notify::new(),
                trailers: Mutex::new(Metadata::new()),
                request_fds: Mutex::new(Vec::new()),
                reply_fds: Mutex::new(None),
                abort: OnceLock::new(),
                abortable: false,
            }),
        }
    }

    /// Hands the request's descriptors to the context (the server, before the handler runs).
    pub(crate) fn with_request_fds(self, fds: Vec<Fd>) -> Context {
        *lock(&self.inner.request_fds) = fds;
        self
    }

    /// Lets [`Context::abort`] end the call (the server, before the handler runs; the
    /// context is not shared yet).
    pub(crate) fn abortable(mut self) -> Context {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.abortable = true;
        }
        self
    }

    /// Ends the call for `reason` (unless it already ended for another), with `status`
    /// as its answer if given (unless one was given before): the status is recorded
    /// before the reason, so whoever sees the call ended sees it.
    pub(crate) fn end_call(&self, reason: EndReason, status: Option<Status>) {
        if let Some(status) = status {
            let _ = self.inner.abort.set(status);
        }
        if self.inner.end.set(reason).is_ok() {
            self.inner.ended.notify_waiters();
        }
    }

    /// The status the call was aborted with (by the handler's work or by its conn), if it
    /// was.
    pub(crate) fn aborted(&self) -> Option<&Status> {
        self.inner.abort.get()
    }

    /// The descriptors the handler set for its response.
    pub(crate) fn take_reply_fds(&self) -> Option<FdBatch> {
        lock(&self.inner.reply_fds).take()
    }

    /// A context for calling a handler directly (in unit tests, say): no
    /// metadata, no deadline, no peer, never cancelled.
    pub fn detached(method: impl Into<String>) -> Context {
        Context::new(
            Arc::from(method.into()),
            Metadata::new(),
            None,
            Origin::default(),
        )
    }

    /// The method being served, `"Service.Method"`.
    pub fn method(&self) -> &str {
        &self.inner.method
    }

    /// The caller's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.inner.metadata
    }

    /// When the caller stops waiting; the handler is dropped then.
    pub fn deadline(&self) -> Option<Instant> {
        self.inner.deadline
    }

    /// Time left until the deadline (zero once passed); `None` without one.
    pub fn remaining(&self) -> Option<Duration> {
        self.inner
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Sets response metadata (a trailer) `key = value`, replacing an
    /// earlier value of `key`. Trailers are sent just before the call's
    /// answer, success or error; the caller reads them with
    /// [`Client::call_with_trailers`](crate::Client::call_with_trailers)
    /// or [`ResponseStream::trailers`](crate::ResponseStream::trailers).
    /// Their encoded size counts toward the message limit; trailers too
    /// large to send are dropped (the answer still goes out).
    pub fn set_trailer(&self, key: impl Into<String>, value: impl Into<String>) {
        self.inner
            .trailers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(key, value);
    }

    /// Takes the trailers set so far.
    pub(crate) fn take_trailers(&self) -> Metadata {
        std::mem::take(
            &mut *self
                .inner
                .trailers
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// The label the conn was served under
    /// ([`Server::serve_named`](crate::Server::serve_named)).
    pub fn peer(&self) -> Option<&str> {
        self.inner.origin.label.as_deref()
    }

    /// A client to the peer this call came in from, to call it back: wrap
    /// it in the typed client of a service that peer serves, in one line
    /// (`let back = NotesClient::new(ctx.callback()?);`).
    ///
    /// Fails with `FailedPrecondition` when the call did not come in
    /// through a [`Peer`](crate::Peer) (a plain [`Server::serve`](crate::Server::serve)
    /// conn only carries calls one way), and with `Unavailable`
    /// ([`Status::is_conn_lost`]) once that peer is gone.
    pub fn callback(&self) -> Result<Client, Status> {
        let Some(weak) = &self.inner.origin.callback else {
            return Err(Status::failed_precondition(format!(
                "{} was not called through a Peer: there is no way back to the caller",
                self.method()
            )));
        };
        weak.upgrade()
            .ok_or_else(|| Status::conn_lost("the calling peer is gone"))
    }

    /// Takes the file descriptors the request carried
    /// ([`CallOptions::fds`](crate::CallOptions::fds)): each a new descriptor (close-on-exec)
    /// for the caller's open file, socket or memfd. Empty if it carried none, and after the
    /// first take. Descriptors nobody takes are closed when the call ends.
    #[cfg(unix)]
    pub fn take_fds(&self) -> Vec<std::os::fd::OwnedFd> {
        std::mem::take(&mut *lock(&self.inner.request_fds))
    }

    /// Sends `fds` with the response (replacing any set before); the caller receives them
    /// with [`Client::call_with_fds`](crate::Client::call_with_fds). They go only with a
    /// successful response: if the handler then fails, they are closed.
    ///
    /// # Errors
    ///
    /// `FailedPrecondition` when the conn cannot carry descriptors (not a mux channel of a
    /// session made with `netchan_mux::Session::with_fds`, or a peer without fd support),
    /// `InvalidArgument` for more than [`MAX_FDS_PER_MESSAGE`](crate::MAX_FDS_PER_MESSAGE).
    /// A handler can return that status as it is.
    #[cfg(unix)]
    pub fn reply_fds(&self, fds: Vec<std::os::fd::OwnedFd>) -> Result<(), Status> {
        self.inner
            .origin
            .fds
            .check_send(fds.len(), &format!("the response of {}", self.method()))?;
        *lock(&self.inner.reply_fds) = (!fds.is_empty()).then(|| Arc::new(fds));
        Ok(())
    }

    /// Whether the response can carry descriptors ([`Context::reply_fds`]).
    #[cfg(unix)]
    pub fn can_send_fds(&self) -> bool {
        self.inner.origin.fds.check_send(1, "").is_ok()
    }

    /// True once the call is over, for any reason: cancelled by the
    /// caller, timed out, its conn lost, or answered ([`Context::end_reason`]
    /// tells which). The handler future itself is dropped when the call
    /// ends early; this is for work it spawned with a clone of the context.
    pub fn is_cancelled(&self) -> bool {
        self.inner.end.get().is_some()
    }

    /// Ends the call now with `status`, which the caller receives at once: also while a
    /// streaming call waits for the caller's credit (the server does not poll the handler's
    /// stream then, so an error item could not reach a caller that grants none). The handler
    /// future and its stream are dropped, as on cancellation. The first status given wins;
    /// on a call that is already over, or a detached context, nothing happens. For work the
    /// handler spawned (with a clone of the context) that finds the call must end.
    /// [`Context::end_reason`] then says [`EndReason::Aborted`].
    pub fn abort(&self, status: Status) {
        if self.inner.abortable && !self.is_cancelled() {
            self.end_call(EndReason::Aborted, Some(status));
        }
    }

    /// Resolves when the call is over, for any reason (see
    /// [`Context::is_cancelled`]); then [`Context::end_reason`] says why,
    /// so spawned work can tell a caller that gave up
    /// ([`EndReason::Cancelled`]) from a call that completed. Cancel-safe.
    pub async fn cancelled(&self) {
        let ended = self.inner.ended.notified();
        let mut ended = pin!(ended);
        // Registered before the look, so an end in between wakes it.
        ended.as_mut().enable();
        if !self.is_cancelled() {
            ended.await;
        }
    }

    /// Why the call ended, or `None` while it runs. Once `Some`, it never
    /// changes.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.inner.end.get().copied()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn call_ctx() -> Context {
        Context::new(Arc::from("T.m"), Metadata::new(), None, Origin::default()).abortable()
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_wakes_when_the_call_ends_and_sees_why() {
        let ctx = call_ctx();
        let waiter = tokio::spawn({
            let ctx = ctx.clone();
            async move {
                ctx.cancelled().await;
                ctx.end_reason()
            }
        });
        tokio::task::yield_now().await;
        assert!(!ctx.is_cancelled());
        assert_eq!(ctx.end_reason(), None);
        ctx.end_call(EndReason::Cancelled, None);
        let seen = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter woke")
            .unwrap();
        assert_eq!(seen, Some(EndReason::Cancelled));
        // The first reason stays; a later end wakes nobody and changes nothing.
        ctx.end_call(EndReason::Completed, None);
        assert_eq!(ctx.end_reason(), Some(EndReason::Cancelled));
        tokio::time::timeout(Duration::from_secs(5), ctx.cancelled())
            .await
            .expect("an ended call's cancelled() resolves at once");
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_records_its_status_before_the_call_is_seen_ended() {
        let ctx = call_ctx();
        let waiter = tokio::spawn({
            let ctx = ctx.clone();
            async move {
                ctx.cancelled().await;
                ctx.aborted().cloned()
            }
        });
        tokio::task::yield_now().await;
        ctx.abort(Status::internal("stop"));
        let status = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter woke")
            .unwrap()
            .expect("the status was there when the end was seen");
        assert_eq!(status.message(), "stop");
        assert_eq!(ctx.end_reason(), Some(EndReason::Aborted));
        // A detached context cannot be aborted.
        let detached = Context::detached("T.m");
        detached.abort(Status::internal("no"));
        assert!(!detached.is_cancelled());
    }
}

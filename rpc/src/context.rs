//! [`Context`]: what a handler knows about the call it serves.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::Metadata;

/// Per-call information handed to a handler: the caller's metadata, the
/// deadline, a cancellation signal and the peer's label.
///
/// Cheap to clone (an `Arc`); clones see the same cancellation.
#[derive(Clone, Debug)]
pub struct Context {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    method: String,
    metadata: Metadata,
    deadline: Option<Instant>,
    peer: Option<Arc<str>>,
    cancel: CancellationToken,
}

impl Context {
    pub(crate) fn new(
        method: String,
        metadata: Metadata,
        deadline: Option<Instant>,
        peer: Option<Arc<str>>,
        cancel: CancellationToken,
    ) -> Context {
        Context {
            inner: Arc::new(Inner {
                method,
                metadata,
                deadline,
                peer,
                cancel,
            }),
        }
    }

    /// A context for calling a handler directly (in unit tests, say): no
    /// metadata, no deadline, no peer, never cancelled.
    pub fn detached(method: impl Into<String>) -> Context {
        Context::new(
            method.into(),
            Metadata::new(),
            None,
            None,
            CancellationToken::new(),
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

    /// The label the conn was served under
    /// ([`Server::serve_named`](crate::Server::serve_named)).
    pub fn peer(&self) -> Option<&str> {
        self.inner.peer.as_deref()
    }

    /// True once the call is over: cancelled by the caller, timed out, its
    /// conn lost, or answered. The handler future itself is dropped when
    /// the call is cancelled; this is for work it spawned with a clone of
    /// the context.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Resolves when the call is cancelled (see [`Context::is_cancelled`]).
    /// Cancel-safe.
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await
    }
}

//! Handler erasure: a typed handler (any [`Handler`]) becomes a [`Method`],
//! a boxed function from bytes to encoded-on-demand payloads (for a unary
//! method: to the whole call's future), so the registry and the per-conn loop
//! know nothing of the handler's types.

use std::{future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;
use futures::{future::BoxFuture, stream::BoxStream, FutureExt, Stream, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::mpsc;

use tracing::Instrument;

use super::call::Call;
use crate::{
    codec::{self, CodecError},
    context::Context,
    error::chain,
    status::Status,
    stream::{GrantCredit, RequestStream, StreamEvent},
    transport::FrameWriter,
};

/// A function that serves one method: `Fn(Context, Arg) -> impl
/// Future<Output = Result<T, Status>>`, shareable across tasks.
///
/// Every such closure or `fn` implements it; it exists so that the
/// methods of [`ServiceDef`](crate::ServiceDef) spell the bound once. `Arg`
/// is the decoded request (or a [`RequestStream`] for bidi methods); `T`
/// is the response (or the stream of response items).
pub trait Handler<Arg, T>:
    Fn(Context, Arg) -> <Self as Handler<Arg, T>>::Future + Send + Sync + 'static
{
    /// The future the handler returns.
    type Future: Future<Output = Result<T, Status>> + Send + 'static;
}

impl<F, Fut, Arg, T> Handler<Arg, T> for F
where
    F: Fn(Context, Arg) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, Status>> + Send + 'static,
{
    type Future = Fut;
}

/// An encoded-on-demand payload: the typed value, captured, writing itself.
pub(crate) type Payload = Box<dyn FnOnce(&mut FrameWriter<'_>) -> Result<(), CodecError> + Send>;
/// A unary call's whole future: its handler raced against the call's end, then the answer.
pub(super) type CallFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
/// Starts a unary call: the call's future, in one allocation with the handler's future and
/// the typed response (no box for either), instrumented with the span.
type UnaryFn = dyn Fn(Call, Context, Bytes, tracing::Span) -> CallFuture + Send + Sync;
/// What a streaming handler resolves to: its encoded-on-demand items.
type ItemsFuture = BoxFuture<'static, Result<BoxStream<'static, Result<Payload, Status>>, Status>>;
type StreamFn = dyn Fn(Context, Bytes) -> ItemsFuture + Send + Sync;
type BidiFn = dyn Fn(Context, Inbound) -> ItemsFuture + Send + Sync;

/// A registered method, type-erased.
#[derive(Clone)]
pub(crate) enum Method {
    Unary(Arc<UnaryFn>),
    Stream(Arc<StreamFn>),
    Bidi(Arc<BidiFn>),
}

/// The shape of a call: what the caller sends and expects back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Unary,
    ServerStreaming,
    Bidi,
}

impl Kind {
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Unary => "unary",
            Kind::ServerStreaming => "server-streaming",
            Kind::Bidi => "bidi-streaming",
        }
    }
}

impl Method {
    pub(super) fn kind(&self) -> Kind {
        match self {
            Method::Unary(_) => Kind::Unary,
            Method::Stream(_) => Kind::ServerStreaming,
            Method::Bidi(_) => Kind::Bidi,
        }
    }
}

/// The request side of a bidi call, untyped.
pub(crate) struct Inbound {
    pub(super) rx: mpsc::Receiver<StreamEvent>,
    pub(super) grant: GrantCredit,
    pub(super) window: u32,
}

/// What a call starts from.
pub(super) enum Input {
    Payload(Bytes),
    Stream(Inbound),
}

fn encode_items<Item, S>(items: S) -> BoxStream<'static, Result<Payload, Status>>
where
    Item: Serialize + Send + 'static,
    S: Stream<Item = Result<Item, Status>> + Send + 'static,
{
    items
        .map(|item| {
            item.map(|item| {
                Box::new(move |w: &mut FrameWriter<'_>| codec::encode(w, &item, "stream item"))
                    as Payload
            })
        })
        .boxed()
}

fn decode_request<Req: DeserializeOwned>(payload: &Bytes, method: &str) -> Result<Req, Status> {
    codec::decode_payload(payload, "request").map_err(|e| {
        Status::invalid_argument(format!(
            "could not decode the request for {method}: {}",
            chain(&e)
        ))
    })
}

impl Method {
    pub(crate) fn unary<Req, Resp>(handler: impl Handler<Req, Resp>) -> Method
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
    {
        let handler = Arc::new(handler);
        Method::Unary(Arc::new(
            move |call: Call, ctx: Context, payload: Bytes, span: tracing::Span| {
                let handler = Arc::clone(&handler);
                // Decoded in the call's first poll (in its task, if it has one), where a
                // panic of the handler is caught.
                let work = async move {
                    let req = decode_request::<Req>(&payload, ctx.method());
                    // The handler gets the decoded request: a long call does not keep the
                    // received frame (often a slice of the conn's shared read buffer).
                    drop(payload);
                    handler(ctx, req?).await
                };
                Box::pin(call.run_unary(work).instrument(span)) as CallFuture
            },
        ))
    }

    pub(crate) fn stream<Req, Item, S>(handler: impl Handler<Req, S>) -> Method
    where
        Req: DeserializeOwned + Send + 'static,
        Item: Serialize + Send + 'static,
        S: Stream<Item = Result<Item, Status>> + Send + 'static,
    {
        Method::Stream(Arc::new(move |ctx: Context, payload: Bytes| {
            let fut = decode_request::<Req>(&payload, ctx.method()).map(|req| handler(ctx, req));
            async move { Ok(encode_items(fut?.await?)) }.boxed()
        }))
    }

    pub(crate) fn bidi<Req, Item, S>(handler: impl Handler<RequestStream<Req>, S>) -> Method
    where
        Req: DeserializeOwned + Send + 'static,
        Item: Serialize + Send + 'static,
        S: Stream<Item = Result<Item, Status>> + Send + 'static,
    {
        Method::Bidi(Arc::new(move |ctx: Context, inbound: Inbound| {
            let requests = RequestStream::new(inbound.rx, inbound.grant, inbound.window);
            let fut = handler(ctx, requests);
            async move { Ok(encode_items(fut.await?)) }.boxed()
        }))
    }
}

//! `#[rpc_service]`: unary methods with zero, one and several arguments,
//! server-, client- and bidi-streaming methods, an error type converted
//! into `Status`, and a client built from `Context::callback`.

mod common;

use common::*;
use futures::StreamExt;
use netchan_rpc::{
    rpc_service, CallOptions, Code, Config, Context, ItemStream, RequestStream, Server, Status,
};

/// The error type of a service that is not `Status`.
#[derive(Debug)]
pub enum CalcError {
    /// The sum does not fit.
    Overflow,
}

impl From<CalcError> for Status {
    fn from(e: CalcError) -> Status {
        match e {
            CalcError::Overflow => Status::out_of_range("overflow"),
        }
    }
}

/// A calculator.
#[rpc_service]
pub trait Calc {
    /// Always 42.
    async fn answer(&self, ctx: Context) -> Result<u64, Status>;
    /// `a + b`.
    async fn add(&self, ctx: Context, a: u64, b: u64) -> Result<u64, CalcError>;
    /// Greets `name` `times` times, with a separator.
    async fn greet(
        &self,
        ctx: Context,
        name: String,
        times: u8,
        sep: String,
    ) -> Result<String, Status>;
    /// `0..n`.
    async fn upto(&self, ctx: Context, n: u64) -> Result<ItemStream<u64>, Status>;
    /// The sum of the numbers sent.
    async fn sum(&self, ctx: Context, ns: RequestStream<u64>) -> Result<u64, Status>;
    /// Each number sent, doubled.
    async fn doubles(
        &self,
        ctx: Context,
        ns: RequestStream<u64>,
    ) -> Result<ItemStream<u64>, Status>;
}

struct MyCalc;

impl Calc for MyCalc {
    async fn answer(&self, _ctx: Context) -> Result<u64, Status> {
        Ok(42)
    }

    async fn add(&self, _ctx: Context, a: u64, b: u64) -> Result<u64, CalcError> {
        a.checked_add(b).ok_or(CalcError::Overflow)
    }

    async fn greet(
        &self,
        _ctx: Context,
        name: String,
        times: u8,
        sep: String,
    ) -> Result<String, Status> {
        Ok(vec![format!("hi {name}"); times.into()].join(&sep))
    }

    async fn upto(&self, _ctx: Context, n: u64) -> Result<ItemStream<u64>, Status> {
        if n > 1000 {
            return Err(Status::invalid_argument("too many"));
        }
        Ok(Box::pin(futures::stream::iter((0..n).map(Ok))))
    }

    async fn sum(&self, _ctx: Context, mut ns: RequestStream<u64>) -> Result<u64, Status> {
        let mut total = 0u64;
        while let Some(n) = ns.next().await {
            total += n?;
        }
        Ok(total)
    }

    async fn doubles(
        &self,
        ctx: Context,
        ns: RequestStream<u64>,
    ) -> Result<ItemStream<u64>, Status> {
        if ctx.metadata().get("refuse").is_some() {
            return Err(Status::permission_denied("refused before any item"));
        }
        Ok(Box::pin(ns.map(|n| n.map(|n| n * 2))))
    }
}

fn calc_client() -> (
    CalcClient,
    tokio::task::JoinHandle<Result<(), netchan_rpc::Error>>,
) {
    let mut server = Server::new();
    server.add(MyCalc.into_service());
    let (client, task) = duplex_pair(&server, Config::default());
    (CalcClient::new(client), task)
}

#[tokio::test]
async fn unary_methods_take_zero_one_or_several_arguments() {
    let (calc, _t) = calc_client();
    assert_eq!(guard(calc.answer()).await.unwrap(), 42);
    assert_eq!(guard(calc.add(2, 3)).await.unwrap(), 5);
    let greeting = guard(calc.greet("ada".into(), 2, ", ".into()))
        .await
        .unwrap();
    assert_eq!(greeting, "hi ada, hi ada");
}

#[tokio::test]
async fn a_method_error_converts_into_the_status_the_caller_sees() {
    let (calc, _t) = calc_client();
    let err = guard(calc.add(u64::MAX, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert_eq!(err.message(), "overflow");
}

#[tokio::test]
async fn server_streaming_methods_stream_and_refuse_from_the_call() {
    let (calc, _t) = calc_client();
    let all: Vec<u64> = guard(
        guard(calc.upto(4))
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect(),
    )
    .await;
    assert_eq!(all, [0, 1, 2, 3]);
    let err = guard(calc.upto(1_000_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn client_and_bidi_streaming_methods_take_a_request_stream() {
    let (calc, _t) = calc_client();
    let total = guard(calc.sum(futures::stream::iter([1, 2, 3]))).await;
    assert_eq!(total.unwrap(), 6);

    let doubled = guard(calc.doubles(futures::stream::iter([5, 6])))
        .await
        .unwrap();
    let got: Vec<u64> = guard(doubled.map(Result::unwrap).collect()).await;
    assert_eq!(got, [10, 12]);

    // A handler's early error is what the typed call returns.
    let refusing = calc.with_options(CallOptions::default().metadata("refuse", "yes"));
    let err = guard(refusing.doubles(futures::stream::pending()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
}

/// Issue 24, item 4: `BoxStream<'static, Result<T, Status>>` is the same
/// type as `ItemStream<T>` and is recognised as a server stream.
#[rpc_service]
pub trait Spelled {
    /// `0..n`, spelled with futures' alias.
    async fn upto(
        &self,
        ctx: Context,
        n: u64,
    ) -> Result<futures::stream::BoxStream<'static, Result<u64, Status>>, Status>;
}

struct SpelledImpl;

impl Spelled for SpelledImpl {
    async fn upto(
        &self,
        _ctx: Context,
        n: u64,
    ) -> Result<futures::stream::BoxStream<'static, Result<u64, Status>>, Status> {
        Ok(futures::stream::iter((0..n).map(Ok)).boxed())
    }
}

#[tokio::test]
async fn a_box_stream_return_type_is_a_server_stream() {
    let mut server = Server::new();
    server.add(SpelledImpl.into_service());
    let (client, _t) = duplex_pair(&server, Config::default());
    let client = SpelledClient::new(client);
    let items: Vec<u64> = guard(async {
        let stream = client.upto(4).await.unwrap();
        stream.map(Result::unwrap).collect().await
    })
    .await;
    assert_eq!(items, [0, 1, 2, 3]);
}

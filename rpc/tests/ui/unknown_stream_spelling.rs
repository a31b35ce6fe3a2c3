use netchan_rpc::{rpc_service, Context, Status};

pub type MyStream = std::pin::Pin<Box<dyn futures::Stream<Item = u64> + Send>>;

#[rpc_service]
pub trait Ticker {
    async fn ticks(&self, ctx: Context) -> Result<MyStream, Status>;
}

fn main() {}

use netchan_rpc::{rpc_service, Context, Status};

#[rpc_service]
pub trait Greeter {
    async fn hello(&self, ctx: Context, name: &str) -> Result<String, Status>;
}

fn main() {}

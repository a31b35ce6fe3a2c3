use netchan_rpc::{rpc_service, Context};

#[rpc_service]
pub trait Greeter {
    async fn hello(&self, ctx: Context, name: String) -> Result<String, String>;
}

fn main() {}

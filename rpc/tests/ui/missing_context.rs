use netchan_rpc::{rpc_service, Status};

#[rpc_service]
pub trait Counter {
    async fn add(&self, a: u32, b: u32) -> Result<u32, Status>;
}

fn main() {}

use netchan_rpc::{rpc_service, Context, Status};

pub struct Point {
    pub x: i32,
}

#[rpc_service]
pub trait Plot {
    async fn draw(&self, ctx: Context, at: Point) -> Result<(), Status>;
}

fn main() {}

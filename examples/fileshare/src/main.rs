//! `share`: the netchan file-share demo — a hub, and a REPL client that exports a directory.
//!
//! Work in progress: the pieces that do not need the network (confinement, CLI, hello
//! exchange, TLS configuration, REPL syntax, the hub's peer table) land first.

// The network half (hub and client) lands with netchan-mux and netchan-rpc; until then some
// of these items are only used by their tests.
#![allow(dead_code)]

mod auth;
mod cli;
mod command;
mod export;
mod registry;
mod tls;

fn main() {
    let _cli = cli::parse();
}

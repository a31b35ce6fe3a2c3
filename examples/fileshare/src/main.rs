//! `share`: the netchan file-share demo, after the 2011 article "Bidirectional RPC with netchan".
//!
//! `share hub` runs the hub; `share --name alice [--root DIR] [ADDR]` connects to it over one
//! TCP (optionally TLS) connection, publishes itself, exports DIR read-only, and opens a REPL
//! (`list`, `ls`, `read`, `get`). The hub calls back into each client over that same
//! connection; a read of bob's file by alice goes alice → hub → bob and back.
//!
//! # Layout
//!
//! - `cli` — command-line options (and the article's Go-style `-name` flags).
//! - `proto` — the `Hub` and `Export` services and their messages (`Entry`, `Listing`, `Chunk`).
//! - `hub` — the hub: admission, connection life, forwarding with per-peer limits, the `Hub`
//!   service, and its table of published names (`hub::registry`).
//! - `client` — connecting, reconnection with backoff, the reader's check of a transfer.
//! - `export` — file access confined to the exported root (cap-std), and the `Export` service
//!   over it.
//! - `directory` — the fleet's directory: names held fleet-wide, in process or on etcd.
//! - `command`, `repl` — REPL syntax and the terminal/scripted front ends.
//! - `auth`, `tls` — the token exchange and rustls configuration.

mod auth;
mod cli;
mod client;
mod command;
mod directory;
mod export;
mod hub;
mod proto;
mod repl;
mod tls;

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tracing::{info, warn};

use crate::cli::{ClientArgs, Command, HubArgs};
use crate::directory::Directory as _;

fn main() {
    let cli = cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("share: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = match cli.command {
        Some(Command::Hub(args)) => rt.block_on(run_hub(args)),
        None => rt.block_on(run_client(cli.client)),
    };
    let _ = std::io::stdout().flush();
    // Exit without waiting for the runtime: a blocking stdin read would keep it alive.
    match result {
        Ok(true) => std::process::exit(0),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("share: {e:#}");
            std::process::exit(1);
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Session settings for a keepalive bound of `k`: ping after `k/2` of silence, give up `k/2`
/// later, so a silent peer is dropped within `k`.
fn mux_config(k: Duration) -> netchan_mux::Config {
    netchan_mux::Config::default()
        .keepalive_interval(Some(k / 2))
        .keepalive_timeout(k / 2)
}

/// Channels one client session may have open at the hub.
const HUB_MAX_CHANNELS: usize = 8;

/// How long the hub's sessions get to finish open channels when it closes them (shutdown,
/// refused hello, eviction).
const HUB_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// SIGINT and SIGTERM, caught from creation on: a signal that arrives before anyone waits is
/// remembered instead of killing the process.
struct StopSignals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    /// Installs the handlers (a kind that cannot be installed is simply never reported).
    fn new() -> StopSignals {
        use tokio::signal::unix::{signal, SignalKind};
        StopSignals {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// Resolves at the next SIGINT or SIGTERM. Cancel-safe.
    async fn recv(&mut self) {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            let got = match s {
                Some(s) => s.recv().await.is_some(),
                None => false,
            };
            if !got {
                // No handler, or the driver is gone: never.
                std::future::pending::<()>().await;
            }
        }
        tokio::select! {
            () = one(&mut self.int) => {}
            () = one(&mut self.term) => {}
        }
    }
}

async fn run_hub(args: HubArgs) -> anyhow::Result<bool> {
    init_tracing("info");
    args.check_fleet().map_err(anyhow::Error::msg)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let config = tls::server_config(cert, key, args.tls_client_ca.as_deref())?;
            Some(tokio_rustls::TlsAcceptor::from(config))
        }
        _ => None,
    };
    let token = args
        .token
        .as_deref()
        .map(auth::Token::new)
        .transpose()
        .context("invalid --token")?;
    let listen = args.listen_addr();
    let listener = hub::bind_listener(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    // The fleet listener first: its address goes into this hub's records in the directory.
    let fleet_listener = match args.fleet_listen_addr().map_err(anyhow::Error::msg)? {
        None => None,
        Some(fleet_addr) => {
            let listener = hub::bind_listener(&fleet_addr)
                .await
                .with_context(|| format!("cannot listen on {fleet_addr} (--fleet-listen)"))?;
            let bound = listener.local_addr()?;
            Some((listener, bound))
        }
    };
    let directory = start_directory(
        &args,
        addr,
        fleet_listener.as_ref().map(|(_, b)| b.to_string()),
    )
    .await?;
    let fleet = match &fleet_listener {
        None => None,
        Some((_, bound)) => {
            let token = args
                .fleet_token
                .as_deref()
                .map(auth::Token::new)
                .transpose()
                .context("invalid --fleet-token")?;
            let fleet_tls = match (&args.fleet_ca, &args.tls_cert, &args.tls_key) {
                (Some(ca), Some(cert), Some(key)) => Some(
                    hub::relay::FleetTls::from_pem(cert, key, ca)
                        .context("cannot set up mutual TLS between the hubs (--fleet-ca)")?,
                ),
                _ => None,
            };
            if token.is_some() && fleet_tls.is_none() {
                warn!(
                    "the hub-to-hub link is plaintext: the fleet token and the files cross the \
                     network unencrypted; use --fleet-ca with --tls-cert/--tls-key"
                );
            }
            let (hub_id, route): (String, Arc<dyn hub::relay::Route>) = match &directory {
                Some(d) => (
                    d.hub_id().to_string(),
                    Arc::new(hub::relay::DirectoryRoute(d.clone())),
                ),
                // No directory of other hubs: this hub serves them, and routes nothing.
                None => (bound.to_string(), Arc::new(hub::relay::NoOtherHubs)),
            };
            Some(hub::relay::FleetOptions {
                hub_id,
                token,
                tls: fleet_tls,
                route,
            })
        }
    };
    match (&token, &tls, &args.tls_client_ca) {
        (None, None, _) => warn!(
            "the link is plaintext and unauthenticated: anyone who can reach {addr} can join \
             and read every peer's exported files; use --token and --tls-cert/--tls-key"
        ),
        (Some(_), None, _) => warn!(
            "the link is plaintext: the token and all files cross the network unencrypted; \
             use --tls-cert/--tls-key"
        ),
        (None, Some(_), None) => warn!(
            "the link is unauthenticated: any client can join; use --token or --tls-client-ca"
        ),
        _ => {}
    }
    let mut signals = StopSignals::new();
    info!(%addr, tls = tls.is_some(), token = token.is_some(), "hub listening");
    // A plain line on stdout, whatever the log level: scripts and tests read the address here.
    // Informational: a hub whose stdout is closed serves all the same.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "hub listening on {addr}").and_then(|()| stdout.flush());
    if let (Some((_, bound)), Some(options)) = (&fleet_listener, &fleet) {
        info!(
            addr = %bound,
            hub_id = %options.hub_id,
            mutual_tls = options.tls.is_some(),
            token = options.token.is_some(),
            "fleet listener: serving the other hubs"
        );
        let _ = writeln!(stdout, "fleet listener on {bound}").and_then(|()| stdout.flush());
    }
    let hub = hub::HubState::new(hub::HubOptions {
        token,
        tls,
        max_reads_per_peer: args.max_reads_per_peer as usize,
        mux: mux_config(args.keepalive)
            .close_grace(HUB_CLOSE_GRACE)
            // A client uses four channels (hello, hub, and two the hub dials to its export
            // service: ls/stat and reads); keep room for a reconnecting
            // export dial, and bound what a hostile client can make the hub's mux layer
            // buffer: (8 + 2 × 4 + 8) × 256 KiB + 8 MiB = 14 MiB per session at worst (docs in
            // netchan_mux::Config), instead of 42 MiB with the defaults. The rpc layer adds to
            // it: see docs/reliability.md, "The hub's bounds and timeouts".
            .max_channels(HUB_MAX_CHANNELS)
            .max_pending_handshakes(4),
        fleet,
        directory: directory.clone(),
        ..hub::HubOptions::default()
    });
    warn_if_few_descriptors(hub.descriptors_wanted());
    // Ends with the hub's shutdown, after its hub-to-hub sessions have closed.
    let fleet_task = fleet_listener.map(|(l, _)| tokio::spawn(hub.clone().serve_fleet(l)));
    let mut serve = tokio::spawn(hub.clone().serve(listener));
    tokio::select! {
        done = &mut serve => {
            // `serve` only returns after `shutdown`, which nothing else calls.
            done.context("the hub's accept loop failed")?;
            return Ok(false);
        }
        () = signals.recv() => {}
    }
    // Graceful: every client is told (yamux GoAway) and reconnects with its backoff.
    hub.shutdown();
    // Each session closes within HUB_CLOSE_GRACE (plus a flush); a second signal exits now.
    let limit = HUB_CLOSE_GRACE + Duration::from_secs(2);
    tokio::select! {
        done = tokio::time::timeout(limit, &mut serve) => match done {
            Ok(joined) => joined.context("the hub's shutdown failed")?,
            Err(_) => warn!("some sessions did not close within {limit:?}; exiting anyway"),
        },
        () = signals.recv() => warn!("second signal: exiting without waiting"),
    }
    if let Some(task) = fleet_task {
        if tokio::time::timeout(limit, task).await.is_err() {
            warn!("some hub-to-hub sessions did not close within {limit:?}; exiting anyway");
        }
    }
    if let Some(directory) = directory {
        // Revokes the lease: this hub's names are free at once (bounded by the directory's
        // call timeouts).
        directory.close().await;
    }
    info!("hub stopped");
    Ok(true)
}

/// The fleet's directory of `share hub --etcd`; `None` without --etcd (the hub then uses an
/// in-process one).
async fn start_directory(
    args: &HubArgs,
    addr: std::net::SocketAddr,
    fleet_addr: Option<String>,
) -> anyhow::Result<Option<Arc<dyn directory::Directory>>> {
    if args.etcd.is_empty() {
        return Ok(None);
    }
    let id = match &args.hub_id {
        Some(id) => id.clone(),
        None => default_hub_id(addr.port()),
    };
    let id = directory::HubId::new(id).context("invalid --hub-id")?;
    let mut config = directory::EtcdConfig::new(args.etcd.clone(), id.clone());
    config.lease_ttl = args.lease_ttl;
    // Where the other hubs reach this one for reads of its peers (none without a fleet token).
    config.hub_addr = fleet_addr.unwrap_or_default();
    config.keepalive_every = args.lease_ttl / 3;
    config.call_timeout = config.call_timeout.min(args.lease_ttl / 2);
    let etcd = directory::Etcd::start(config)
        .await
        .context("cannot use the fleet's directory (--etcd)")?;
    info!(hub_id = %id, endpoints = ?args.etcd, lease_ttl = ?args.lease_ttl, "fleet directory on etcd");
    // A moment for etcd to answer, so that the first clients are not refused at once. A hub
    // whose etcd is down serves all the same, and takes names once it is back.
    if tokio::time::timeout(Duration::from_secs(5), etcd.wait_up())
        .await
        .is_err()
    {
        if etcd.id_in_use() {
            anyhow::bail!("hub id {id} is in use by another live hub of the fleet: give --hub-id");
        }
        warn!("the fleet's directory is unreachable: new names are refused until it answers");
    } else {
        info!(
            hubs = etcd.hubs().len(),
            "the fleet's directory is reachable"
        );
    }
    Ok(Some(Arc::new(etcd)))
}

/// This machine's host name and `port`, as a hub id (characters a hub id cannot hold become
/// `-`).
fn default_hub_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .take(directory::MAX_HUB_ID_LEN - 6)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let host = if host.is_empty() { "hub".into() } else { host };
    format!("{host}:{port}")
}

/// A connect error as one sentence, with the layers below it only in `verbose` mode.
fn one_sentence(e: &client::ConnectError, verbose: bool) -> String {
    format!("{e}{}", client::detail_if(verbose, &netchan_rpc::chain(e)))
}

/// Joins the hub for `--serve`: a hub that is not up yet, full, or still holding our name
/// for a session that is ending is tried again with backoff (said on the first failure and
/// every 10th); anything the user must fix ends it. `None` if a signal came first.
async fn join_retrying(
    opts: client::ClientOptions,
    notify: client::Notify,
    signals: &mut StopSignals,
) -> anyhow::Result<Option<client::Peer>> {
    use rand::SeedableRng as _;
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut retry = client::Retry::default();
    // Bounded by the user: every failure waits its backoff, and a signal ends it.
    loop {
        let started = tokio::select! {
            started = client::Peer::start(opts.clone(), notify.clone()) => started,
            () = signals.recv() => return Ok(None),
        };
        let e = match started {
            Ok(peer) => return Ok(Some(peer)),
            Err(e) if e.is_transient() => e,
            Err(e) => anyhow::bail!(one_sentence(&e, opts.verbose)),
        };
        if retry.failures() % 10 == 0 {
            eprintln!(
                "share: {}; trying again in the background (every {}s at most)",
                one_sentence(&e, opts.verbose),
                client::BACKOFF_MAX.as_secs()
            );
        }
        let wait = retry.after(&e, &mut rng);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = signals.recv() => return Ok(None),
        }
    }
}

/// Warns when this process may open fewer files than the hub wants to hold (its published
/// clients, its pending connections and some to spare): it would then shed pending
/// connections early. Reads the soft limit from `/proc/self/limits` (Linux).
fn warn_if_few_descriptors(wanted: usize) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse::<usize>().ok());
    if let Some(soft) = soft.filter(|&soft| soft < wanted) {
        warn!(
            soft,
            wanted,
            "this process may open {soft} files, and the hub wants up to {wanted} at once; \
             raise the limit (ulimit -n {wanted}) or, when it is reached, the hub sheds \
             connections that have not joined yet"
        );
    }
}

/// The directory a client exports: `--root`, or the current directory unless that is the
/// home directory or `/` (sharing those by accident exposes dotfiles, keys and history).
fn export_dir(root: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    if let Some(r) = root {
        return Ok(repl::expand_tilde(r));
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let cwd = std::fs::canonicalize(&cwd).unwrap_or(cwd);
    let home = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .and_then(|h| std::fs::canonicalize(h).ok());
    if home.as_deref() == Some(cwd.as_path()) {
        anyhow::bail!(
            "refusing to share your home directory {} by default: pass --root DIR to choose \
             what to share (--root ~ if you really mean all of it)",
            cwd.display()
        );
    }
    if cwd == std::path::Path::new("/") {
        anyhow::bail!(
            "refusing to share / by default: pass --root DIR to choose what to share \
             (--root / if you really mean all of it)"
        );
    }
    Ok(cwd)
}

/// How the link is protected, in words, and the warning a client prints when it is not.
/// A client that sent no token and was accepted knows the hub admits anyone; whether a hub
/// checks a token it was sent, `whoami` says once the hub has answered.
fn link_safety(tls: bool, token: bool, client_cert: bool) -> (String, Option<&'static str>) {
    let transport = match (tls, client_cert) {
        (false, _) => "plaintext",
        (true, false) => "TLS (the hub's certificate checked; no client certificate)",
        (true, true) => "mutual TLS (the hub's certificate and ours checked)",
    };
    let warning = match (tls, token || client_cert) {
        (false, false) => Some(
            "warning: the link to the hub is plaintext and unauthenticated: anyone who can \
             reach the hub can join and read what you export, and the files cross the \
             network unencrypted (use --token and TLS)",
        ),
        (false, true) => Some(
            "warning: the link to the hub is plaintext: the token and the files cross the \
             network unencrypted (use TLS)",
        ),
        (true, false) => Some(
            "warning: the hub admits peers without a token: anyone who can reach it can join \
             and read what you export",
        ),
        (true, true) => None,
    };
    (transport.to_owned(), warning)
}

async fn run_client(args: ClientArgs) -> anyhow::Result<bool> {
    let verbose = args.verbose || std::env::var_os("RUST_LOG").is_some();
    init_tracing("error");
    let name = args.name.clone().unwrap_or_default();
    hub::registry::validate_name(&name).context("invalid --name")?;
    let dir = export_dir(args.root.as_deref())?;
    let notifier = Arc::new(repl::Notifier::default());
    let access: export::AccessLog = {
        let n = notifier.clone();
        export::AccessLog(Arc::new(move |msg: String| {
            info!(target: "share::access", "{msg}");
            n.notify(&msg);
        }))
    };
    let root = export::Root::open(&dir)
        .with_context(|| format!("cannot export {}", dir.display()))?
        .show_hidden(args.hidden)
        .access_log(access)
        .allow_hard_links(args.allow_hard_links);
    let hubs = args.hubs()?;
    let tls = match &args.tls_ca {
        None => None,
        Some(ca) => {
            let client_cert = match (&args.tls_cert, &args.tls_key) {
                (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                _ => None,
            };
            let config = tls::client_config(ca, client_cert)?;
            // A name given is what every hub's certificate must carry; otherwise each hub's
            // host, checked here for the first so that a bad one fails before connecting.
            let server_name = match args.tls_server_name.as_deref() {
                Some(name) => Some(tls::server_name("", Some(name))?),
                None => {
                    for hub in &hubs {
                        tls::server_name(hub, None)?;
                    }
                    None
                }
            };
            Some((config, server_name))
        }
    };
    let (link, warning) = link_safety(tls.is_some(), args.token.is_some(), args.tls_cert.is_some());
    let opts = client::ClientOptions {
        name: name.clone(),
        root,
        hubs: hubs.clone(),
        token: args.token.clone(),
        tls,
        verbose,
        // Quitting should not wait for the hub's idle channels to the export service.
        mux: mux_config(args.keepalive).close_grace(Duration::from_millis(300)),
    };
    let notify: client::Notify = {
        let n = notifier.clone();
        Arc::new(move |msg: String| n.notify(&msg))
    };
    let me = repl::Me {
        name: name.clone(),
        addr: hubs.join(","),
        root: opts.root.display_path().to_path_buf(),
        hidden: args.hidden,
        link,
    };
    let root_shown = format!(
        "{} ({})",
        me.root.display(),
        if args.hidden {
            "hidden files too"
        } else {
            "hidden files not shared"
        }
    );
    // Before connecting, so that a SIGTERM in --serve mode always ends in a graceful close.
    // (Only then: the REPL handles Ctrl-C itself.)
    let mut signals = args.serve.then(StopSignals::new);
    let peer = if let Some(s) = signals.as_mut() {
        match join_retrying(opts, notify, s).await? {
            Some(peer) => peer,
            // Stopped before the hub let us in.
            None => return Ok(true),
        }
    } else {
        client::Peer::start(opts, notify)
            .await
            .map_err(|e| anyhow::anyhow!(one_sentence(&e, verbose)))?
    };
    let peer = Arc::new(peer);
    let interactive = !args.serve && std::io::stdin().is_terminal();
    // The sharer (a server or a person at a terminal) must know; a script's stderr stays
    // clean unless it asks for details.
    if let Some(w) = warning {
        if args.serve || interactive || args.verbose {
            eprintln!("share: {w}");
        }
    }
    let ok = if args.serve {
        eprintln!(
            "share: connected to the hub at {} as {name}, exporting {root_shown}",
            peer.hub_addr().unwrap_or_else(|| hubs.join(","))
        );
        if let Some(s) = signals.as_mut() {
            s.recv().await;
        }
        true
    } else if interactive {
        eprintln!(
            "connected to the hub at {} as {name}, exporting {root_shown}; type help",
            peer.hub_addr().unwrap_or_else(|| hubs.join(","))
        );
        let rt = tokio::runtime::Handle::current();
        let (p, n) = (peer.clone(), notifier.clone());
        tokio::task::spawn_blocking(move || repl::run_terminal(p, me, rt, n, verbose))
            .await
            .context("the REPL failed")??;
        true
    } else {
        repl::run_script(&peer, &me, verbose).await
    };
    peer.close().await;
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_tells_server_only_tls_from_mutual_tls() {
        assert_eq!(link_safety(false, true, false).0, "plaintext");
        let (server_only, warning) = link_safety(true, false, false);
        assert!(server_only.starts_with("TLS (the hub's certificate checked; no client"));
        assert!(warning.is_some());
        let (mutual, warning) = link_safety(true, false, true);
        assert!(mutual.starts_with("mutual TLS"), "{mutual}");
        assert!(warning.is_none());
    }
}

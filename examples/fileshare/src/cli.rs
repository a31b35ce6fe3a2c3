//! Command-line interface: `share hub ...` runs the hub, `share --name NAME ...` runs a client.
//!
//! The article's Go-style single-dash long flags (`-name alice`, `-root=/tmp`) are accepted by
//! rewriting them to `--name` before clap parses (see [`normalize_args`]).

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// The default hub address, used by both `share hub` and clients.
pub(crate) const DEFAULT_ADDR: &str = "127.0.0.1:8765";

/// Share files between peers through a hub, over one connection per peer.
#[derive(Debug, Parser)]
#[command(
    name = "share",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  share hub                          start a hub on 127.0.0.1:8765\n  \
                  share --name alice --root ~/pub    join it as alice, exporting ~/pub\n  \
                  share --name alice --hidden        also share dotfiles (.git, .ssh...)\n  \
                  share -name bob 127.0.0.1:8765     the article's Go-style flags work too\n\n\
                  In the REPL type `help` for the commands."
)]
pub(crate) struct Cli {
    /// Run the hub instead of a client.
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    /// Client options (when no subcommand is given).
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the hub that peers connect to. SIGINT or SIGTERM stops it gracefully: every
    /// peer's session is closed (peers then reconnect with backoff) and it exits 0.
    ///
    /// With --etcd the hub joins a fleet of hubs sharing one etcd cluster: a name is held
    /// once in the whole fleet (a client publishing a name another hub holds is told it is
    /// taken), `list` shows every hub's peers, reads of a peer on another hub are routed to
    /// that hub, and a hub that dies frees its names within its lease TTL (--lease-ttl,
    /// 10 s). The hubs must authenticate each other: --fleet-token, --fleet-ca (mutual TLS),
    /// or both.
    ///
    /// While etcd is out of reach the hub keeps its clients, and reads between two of its own
    /// clients go on, but it refuses new names ("the fleet's directory is unreachable") and
    /// recovers by itself. Once a lease TTL has passed without a renewal it no longer serves
    /// the other hubs' reads of its clients (another hub may hold those names by then); when
    /// etcd answers again it claims each name again, and a client whose name another hub
    /// took meanwhile is disconnected.
    Hub(HubArgs),
}

/// Options of `share hub`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("fleet_auth").multiple(true)))]
pub(crate) struct HubArgs {
    /// Address to listen on. Use 0.0.0.0:8765 to accept peers on all interfaces (then also use
    /// --token and TLS: the link is otherwise plaintext and unauthenticated).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADDR)]
    pub(crate) listen: String,
    /// The same as --listen ADDR (`share hub 0.0.0.0:8765`).
    #[arg(value_name = "ADDR", conflicts_with = "listen")]
    pub(crate) addr: Option<String>,
    /// Shared secret every peer must present before anything else (prefer the environment
    /// variable: command lines are visible to other local users).
    #[arg(
        long,
        env = "SHARE_TOKEN",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub(crate) token: Option<String>,
    /// PEM certificate chain: serve TLS (needs --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// PEM CA certificates: require peers to present a client certificate signed by one of them
    /// (mutual TLS; needs --tls-cert).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// Most reads the hub forwards to one peer at a time; further reads wait briefly, then fail
    /// with a "busy" error.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) max_reads_per_peer: u32,
    /// Seconds of silence after which a peer's connection is declared dead.
    #[arg(long, value_name = "SECS", default_value = "15", value_parser = parse_secs)]
    pub(crate) keepalive: Duration,
    /// Secret the hubs of a fleet share: with it the hub serves the other hubs on its fleet
    /// listener (--fleet-listen) and presents it to them. Clients never use it.
    #[arg(
        long,
        env = "SHARE_FLEET_TOKEN",
        hide_env_values = true,
        value_name = "SECRET",
        group = "fleet_auth"
    )]
    pub(crate) fleet_token: Option<String>,
    /// PEM CA certificates that sign every hub's certificate: hubs authenticate each other
    /// with mutual TLS. The fleet listener then serves TLS with --tls-cert/--tls-key and
    /// requires a certificate signed by this CA; this hub presents its own to the hubs it
    /// dials and trusts theirs only if this CA signed it and it names the host of their fleet
    /// address. May be combined with --fleet-token.
    #[arg(
        long,
        env = "SHARE_FLEET_CA",
        value_name = "FILE",
        requires = "tls_cert",
        group = "fleet_auth"
    )]
    pub(crate) fleet_ca: Option<PathBuf>,
    /// Address the other hubs of the fleet dial (hub-to-hub reads); clients are refused there.
    /// Default: the --listen host, port + 1.
    #[arg(
        long,
        env = "SHARE_FLEET_LISTEN",
        value_name = "ADDR",
        requires = "fleet_auth"
    )]
    pub(crate) fleet_listen: Option<String>,
    /// Join a fleet of hubs: the etcd cluster's client URLs, comma-separated
    /// (http://10.0.0.5:2379,http://10.0.0.6:2379). Without it the hub is on its own.
    #[arg(
        long,
        env = "SHARE_ETCD",
        value_name = "URL[,URL]",
        value_delimiter = ','
    )]
    pub(crate) etcd: Vec<String>,
    /// This hub's id in the fleet: letters, digits and . _ - : [ ] (default: this machine's
    /// host name and the port the hub listens on).
    #[arg(long, env = "SHARE_HUB_ID", value_name = "ID", requires = "etcd")]
    pub(crate) hub_id: Option<String>,
    /// Seconds after a hub stops renewing its etcd lease (it died, or lost etcd) before the
    /// other hubs may take its names; renewed every third of that.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_lease_ttl, requires = "etcd")]
    pub(crate) lease_ttl: Duration,
}

/// A lease TTL: whole seconds, 2 to 3600 (etcd counts leases in seconds; renewing every
/// third of a second-long lease would leave no margin).
fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(n) if (2..=3600).contains(&n) => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "{s:?} is not a whole number of seconds from 2 to 3600"
        )),
    }
}

impl HubArgs {
    /// Where the hub listens: the positional ADDR, else --listen.
    pub(crate) fn listen_addr(&self) -> &str {
        self.addr.as_deref().unwrap_or(&self.listen)
    }

    /// Whether hubs authenticate each other (--fleet-token, --fleet-ca or both): only then
    /// does this hub serve and dial the other hubs.
    pub(crate) fn fleet_auth(&self) -> bool {
        self.fleet_token.is_some() || self.fleet_ca.is_some()
    }

    /// Refuses a fleet hub (--etcd) whose hubs do not authenticate each other: its clients
    /// would list the other hubs' peers and fail to read every one of them.
    pub(crate) fn check_fleet(&self) -> Result<(), String> {
        if !self.etcd.is_empty() && !self.fleet_auth() {
            return Err(
                "a hub of a fleet (--etcd) needs hub-to-hub authentication to route \
                        reads between the hubs: give --fleet-token SECRET (better: \
                        SHARE_FLEET_TOKEN), the same on every hub, or --fleet-ca FILE with \
                        --tls-cert/--tls-key (mutual TLS), or both"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// Where the fleet listener listens: --fleet-listen, else the client address's host with
    /// the next port. `None` for a hub without --fleet-token or --fleet-ca.
    pub(crate) fn fleet_listen_addr(&self) -> Result<Option<String>, String> {
        if !self.fleet_auth() {
            return Ok(None);
        }
        if let Some(addr) = &self.fleet_listen {
            return Ok(Some(addr.clone()));
        }
        let listen = self.listen_addr();
        let (host, port) = listen
            .rsplit_once(':')
            .ok_or_else(|| format!("--listen {listen:?} has no port: give --fleet-listen"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("--listen {listen:?} has no port number: give --fleet-listen"))?;
        match port {
            0 => Err("--listen uses port 0: give --fleet-listen too".to_owned()),
            u16::MAX => Err(format!(
                "--listen port {port} has no next port: give --fleet-listen"
            )),
            _ => Ok(Some(format!("{host}:{}", port + 1))),
        }
    }
}

impl ClientArgs {
    /// The hubs to try, in order: at most [`MAX_HUBS`](crate::client::MAX_HUBS), none empty.
    pub(crate) fn hubs(&self) -> anyhow::Result<Vec<String>> {
        let max = crate::client::MAX_HUBS;
        anyhow::ensure!(
            self.addr.len() <= max,
            "{} hub addresses given; at most {max} are taken",
            self.addr.len()
        );
        anyhow::ensure!(
            self.addr.iter().all(|a| !a.trim().is_empty()),
            "an empty hub address was given (two commas in a row?)"
        );
        Ok(self.addr.clone())
    }
}

/// Options of a client (`share --name NAME [ADDR]`).
#[derive(Debug, Args)]
pub(crate) struct ClientArgs {
    /// Name to publish under (unique among connected peers; at most 64 bytes, no whitespace or
    /// control characters).
    #[arg(long, required = true)]
    pub(crate) name: Option<String>,
    /// Directory to export read-only to the other peers (default: the current directory,
    /// unless that is your home directory or /: those must be named with --root).
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// Also share hidden files and directories (names starting with a dot: .git, .ssh,
    /// .bashrc...), which are otherwise neither listed nor served.
    #[arg(long)]
    pub(crate) hidden: bool,
    /// Show the details behind errors (as RUST_LOG=debug would, without the log).
    #[arg(short, long)]
    pub(crate) verbose: bool,
    /// Hub address (host:port). A fleet's hubs: several, separated by commas
    /// (a,b,c), tried in turn; a name with several addresses is tried at each.
    #[arg(value_name = "ADDR", default_value = DEFAULT_ADDR, value_delimiter = ',')]
    pub(crate) addr: Vec<String>,
    /// Shared secret the hub requires (prefer the environment variable: command lines are
    /// visible to other local users).
    #[arg(
        long,
        env = "SHARE_TOKEN",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub(crate) token: Option<String>,
    /// PEM file with the CA that signed the hub's certificate (or that certificate itself):
    /// connect over TLS and trust only a hub it vouches for.
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (needs --tls-ca and --tls-key).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Name to verify in the hub's certificate (default: the host part of ADDR).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub(crate) tls_server_name: Option<String>,
    /// No REPL: stay connected and export until killed.
    #[arg(long)]
    pub(crate) serve: bool,
    /// Also serve files with more than one hard link (refused by default: another name of the
    /// same file may be outside the exported directory).
    #[arg(long)]
    pub(crate) allow_hard_links: bool,
    /// Seconds of silence after which the hub connection is declared dead.
    #[arg(long, value_name = "SECS", default_value = "15", value_parser = parse_secs)]
    pub(crate) keepalive: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.1..=3600.0).contains(&secs) {
        return Err(format!("{s} seconds is out of range (0.1 to 3600)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Every long option name of the command and its subcommands (without the dashes).
fn long_names() -> HashSet<String> {
    fn walk(cmd: &clap::Command, out: &mut HashSet<String>) {
        for arg in cmd.get_arguments() {
            if let Some(l) = arg.get_long() {
                out.insert(l.to_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = HashSet::from(["help".to_owned(), "version".to_owned()]);
    walk(&Cli::command(), &mut out);
    out
}

/// Rewrites Go-style `-name value` / `-name=value` to `--name ...` for every known long option,
/// up to a `--` terminator. Short flags (`-h`, `-V`) and unknown words are left alone.
pub(crate) fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let longs = long_names();
    let mut out = Vec::new();
    let mut rewriting = true;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || !rewriting {
            out.push(arg);
            continue;
        }
        if arg == "--" {
            rewriting = false;
            out.push(arg);
            continue;
        }
        let rewritten = arg.to_str().and_then(|s| {
            let rest = s.strip_prefix('-')?;
            if rest.starts_with('-') || rest.len() < 2 {
                return None;
            }
            let key = rest.split('=').next().unwrap_or(rest);
            longs.contains(key).then(|| OsString::from(format!("-{s}")))
        });
        out.push(rewritten.unwrap_or(arg));
    }
    out
}

/// Parses the process arguments (after Go-style rewriting); exits with clap's message on error.
pub(crate) fn parse() -> Cli {
    Cli::parse_from(normalize_args(std::env::args_os()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(words: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(normalize_args(words.iter().map(OsString::from)))
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn go_style_flags_are_rewritten_to_double_dash() {
        let got = normalize_args(
            [
                "share",
                "-name",
                "alice",
                "-root=/tmp",
                "-h",
                "-x",
                "--",
                "-name",
            ]
            .into_iter()
            .map(OsString::from),
        );
        let want: Vec<OsString> = [
            "share",
            "--name",
            "alice",
            "--root=/tmp",
            "-h",
            "-x",
            "--",
            "-name",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_client_parses_the_articles_command_line() {
        let cli = parse_words(&["share", "-name", "second-client", "localhost:8765"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.client.name.as_deref(), Some("second-client"));
        assert_eq!(cli.client.addr, ["localhost:8765"]);
        assert_eq!(cli.client.root, None);
        assert!(!cli.client.hidden);
    }

    #[test]
    fn a_client_defaults_to_the_loopback_hub() {
        let cli = parse_words(&["share", "--name", "alice", "--root", "/srv"]).unwrap();
        assert_eq!(cli.client.addr, [DEFAULT_ADDR]);
        assert_eq!(cli.client.root, Some(PathBuf::from("/srv")));
        assert!(!cli.client.serve);
    }

    #[test]
    fn a_client_takes_a_fleets_hubs_with_commas_or_as_words() {
        let cli = parse_words(&["share", "-name", "alice", "a:1,b:2"]).unwrap();
        assert_eq!(cli.client.addr, ["a:1", "b:2"]);
        let cli = parse_words(&["share", "-name", "alice", "a:1", "b:2", "c:3"]).unwrap();
        assert_eq!(cli.client.addr, ["a:1", "b:2", "c:3"]);
        let many: Vec<String> = (0..=crate::client::MAX_HUBS)
            .map(|i| format!("h{i}:1"))
            .collect();
        let mut words = vec!["share".to_owned(), "-name".into(), "alice".into()];
        words.push(many.join(","));
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let err = parse_words(&words).unwrap().client.hubs().unwrap_err();
        assert!(err.to_string().contains("at most 16"), "{err}");
        let cli = parse_words(&["share", "-name", "alice", "a:1,,b:2"]).unwrap();
        assert!(cli.client.hubs().is_err());
    }

    #[test]
    fn a_client_without_a_name_is_an_error() {
        let err = parse_words(&["share"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn the_hub_defaults_to_loopback_and_accepts_tls_options() {
        let cli = parse_words(&["share", "hub"]).unwrap();
        let Some(Command::Hub(h)) = cli.command else {
            panic!("expected hub")
        };
        assert_eq!(h.listen, DEFAULT_ADDR);
        assert_eq!(h.max_reads_per_peer, 8);
        let cli = parse_words(&[
            "share",
            "hub",
            "-listen",
            "0.0.0.0:9000",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
            "--keepalive",
            "1.5",
        ])
        .unwrap();
        let Some(Command::Hub(h)) = cli.command else {
            panic!("expected hub")
        };
        assert_eq!(h.listen, "0.0.0.0:9000");
        assert_eq!(h.tls_client_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(h.keepalive, Duration::from_millis(1500));
    }

    #[test]
    fn the_hub_takes_its_address_as_a_word_too() {
        let hub = |words: &[&str]| match parse_words(words).unwrap().command {
            Some(Command::Hub(h)) => h.listen_addr().to_owned(),
            None => panic!("expected hub"),
        };
        assert_eq!(hub(&["share", "hub", "127.0.0.1:9000"]), "127.0.0.1:9000");
        assert_eq!(
            hub(&["share", "hub", "--listen", "127.0.0.1:9001"]),
            "127.0.0.1:9001"
        );
        assert_eq!(hub(&["share", "hub"]), DEFAULT_ADDR);
        assert!(parse_words(&["share", "hub", "--listen", "a:1", "b:2"]).is_err());
    }

    #[test]
    fn the_tls_ca_help_names_the_ca_that_signed_the_hubs_certificate() {
        let help = Cli::command().render_long_help().to_string();
        assert!(
            help.contains("the CA that signed the hub's certificate"),
            "{help}"
        );
    }

    #[test]
    fn a_tls_key_without_a_certificate_is_an_error() {
        assert!(parse_words(&["share", "hub", "--tls-key", "k.pem"]).is_err());
        assert!(parse_words(&["share", "--name", "a", "--tls-cert", "c.pem"]).is_err());
    }

    #[test]
    fn the_fleet_listener_defaults_to_the_next_port_and_needs_the_fleet_token() {
        let fleet = |words: &[&str]| match parse_words(words).unwrap().command {
            Some(Command::Hub(h)) => h.fleet_listen_addr(),
            _ => panic!("not a hub command"),
        };
        assert_eq!(fleet(&["share", "hub"]), Ok(None));
        assert_eq!(
            fleet(&["share", "hub", "--fleet-token", "s", "127.0.0.1:9000"]),
            Ok(Some("127.0.0.1:9001".to_owned()))
        );
        assert_eq!(
            fleet(&[
                "share",
                "hub",
                "--fleet-token",
                "s",
                "--listen",
                "[::1]:7000"
            ]),
            Ok(Some("[::1]:7001".to_owned()))
        );
        assert_eq!(
            fleet(&[
                "share",
                "hub",
                "--fleet-token",
                "s",
                "--fleet-listen",
                "0.0.0.0:7777"
            ]),
            Ok(Some("0.0.0.0:7777".to_owned()))
        );
        assert!(fleet(&["share", "hub", "--fleet-token", "s", "127.0.0.1:0"]).is_err());
        assert!(fleet(&["share", "hub", "--fleet-token", "s", "h:65535"]).is_err());
        assert!(parse_words(&["share", "hub", "--fleet-listen", "127.0.0.1:7"]).is_err());
    }

    #[test]
    fn a_fleet_hub_needs_a_fleet_token_or_a_fleet_ca() {
        let hub = |words: &[&str]| match parse_words(words).map(|c| c.command) {
            Ok(Some(Command::Hub(h))) => Ok(h),
            Ok(_) => panic!("not a hub command"),
            Err(e) => Err(e),
        };
        let err = hub(&["share", "hub", "--etcd", "http://e:1"])
            .unwrap()
            .check_fleet()
            .unwrap_err();
        assert!(
            err.contains("--fleet-token") && err.contains("--fleet-ca"),
            "{err}"
        );
        let h = hub(&["share", "hub", "--etcd", "http://e:1", "--fleet-token", "s"]).unwrap();
        assert_eq!(h.check_fleet(), Ok(()));
        let mtls = [
            "share",
            "hub",
            "--etcd",
            "http://e:1",
            "--fleet-ca",
            "ca.pem",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "127.0.0.1:9000",
        ];
        let h = hub(&mtls).unwrap();
        assert_eq!(h.check_fleet(), Ok(()));
        assert_eq!(h.fleet_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(h.fleet_listen_addr(), Ok(Some("127.0.0.1:9001".to_owned())));
        // The fleet CA checks certificates: this hub needs its own.
        assert!(hub(&["share", "hub", "--fleet-ca", "ca.pem"]).is_err());
        // A hub on its own needs neither.
        assert_eq!(hub(&["share", "hub"]).unwrap().check_fleet(), Ok(()));
    }

    #[test]
    fn the_hub_help_says_how_to_listen_on_all_interfaces() {
        let mut cmd = Cli::command();
        let hub = cmd.find_subcommand_mut("hub").unwrap();
        let help = hub.render_long_help().to_string();
        assert!(help.contains("0.0.0.0:8765"), "{help}");
    }

    #[test]
    fn a_hub_joins_a_fleet_with_etcd_urls_an_id_and_a_lease_ttl() {
        let hub = |words: &[&str]| match parse_words(words).map(|c| c.command) {
            Ok(Some(Command::Hub(h))) => Ok(h),
            Ok(_) => panic!("not a hub command"),
            Err(e) => Err(e),
        };
        let h = hub(&["share", "hub"]).unwrap();
        assert!(h.etcd.is_empty() && h.hub_id.is_none());
        assert_eq!(h.lease_ttl, Duration::from_secs(10));
        let h = hub(&[
            "share",
            "hub",
            "--etcd",
            "http://127.0.0.1:2379,http://127.0.0.1:2479",
            "--hub-id",
            "eu-1",
            "--lease-ttl",
            "4",
        ])
        .unwrap();
        assert_eq!(h.etcd, ["http://127.0.0.1:2379", "http://127.0.0.1:2479"]);
        assert_eq!(h.hub_id.as_deref(), Some("eu-1"));
        assert_eq!(h.lease_ttl, Duration::from_secs(4));
        assert!(
            hub(&["share", "hub", "--hub-id", "eu-1"]).is_err(),
            "needs --etcd"
        );
        for ttl in ["1", "0", "2.5", "3601"] {
            assert!(
                hub(&["share", "hub", "--etcd", "http://e:1", "--lease-ttl", ttl]).is_err(),
                "{ttl}"
            );
        }
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("hub")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("--etcd") && help.contains("fleet"), "{help}");
    }

    #[test]
    fn keepalive_out_of_range_is_refused() {
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("soon").is_err());
        assert_eq!(parse_secs("2").unwrap(), Duration::from_secs(2));
    }
}

//! `exec`: serve allowlisted commands, or run one remotely with its output streamed back.
//!
//! ```text
//! exec serve --addr unix:/tmp/exec.sock --allow echo --allow ls
//! exec run --addr unix:/tmp/exec.sock [--timeout 5s] -- ls -l /
//! exec demo
//! ```

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use exec::{bind, serve, CommandLine, ExecClient, ExecServer, Output, CHANNEL};
use futures::StreamExt;
use netchan::{
    rpc::{self, CallOptions, Code},
    Addr, ConnectOptions,
};

/// Writes one line to stdout; a closed stdout (`exec … | head`) ends the program quietly
/// with status 0, as it does a shell tool, instead of a panic.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("exec: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`say`].
macro_rules! say {
    ($($arg:tt)*) => {
        say(format_args!($($arg)*))
    };
}

#[derive(Parser)]
#[command(
    name = "exec",
    about = "An allowlisted remote command executor on netchan"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve commands from the allowlist on an address (host:port, unix:/path, unix:@name).
    Serve {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:7070")]
        addr: Addr,
        /// A program clients may run (repeat for more). Nothing else runs.
        #[arg(long = "allow", value_name = "PROGRAM", required = true)]
        allow: Vec<String>,
    },
    /// Run a command on a server; its stdout and stderr come back as they are written.
    /// Exits with the command's exit code; Ctrl-C kills the remote command.
    Run {
        /// The server.
        #[arg(long, default_value = "127.0.0.1:7070")]
        addr: Addr,
        /// Give up (and have the command killed) after this long, e.g. `5s`, `500ms`.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Start a server on a temporary unix socket and run a few commands against it.
    Demo,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 5s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

/// Runs `command` at `addr`, printing its output; returns the exit code to exit with.
async fn run(addr: &Addr, timeout: Option<Duration>, command: Vec<String>) -> anyhow::Result<i32> {
    let session = netchan::connect(addr, ConnectOptions::default()).await?;
    let conn = session
        .dial(CHANNEL)
        .await
        .context("opening the exec channel")?;
    let mut options = CallOptions::default();
    if let Some(timeout) = timeout {
        options = options.timeout(timeout);
    }
    let client = ExecClient::new(rpc::Client::new(conn)).with_options(options);
    let mut args = command.into_iter();
    let program = args.next().context("no command given")?;
    let cmd = CommandLine {
        program: program.clone(),
        args: args.collect(),
    };
    let outcome = tokio::select! {
        outcome = print_run(&client, cmd) => outcome,
        _ = tokio::signal::ctrl_c() => {
            // Dropping the call cancels it: the server kills the command's process group.
            eprintln!("exec: interrupted; {program} was killed on the server");
            Ok(130)
        }
    };
    // The client's channel is closed first: a session closed with a channel still open
    // waits for it up to its `close_grace` (5 s) before ending.
    drop(client);
    session.close().await;
    outcome
}

async fn print_run(client: &ExecClient, cmd: CommandLine) -> anyhow::Result<i32> {
    let program = cmd.program.clone();
    let fail = |status: rpc::Status| -> anyhow::Result<i32> {
        let code = match status.code() {
            Code::PermissionDenied => 126,
            Code::NotFound => 127,
            Code::DeadlineExceeded => 124,
            _ => 1,
        };
        eprintln!("exec: {status}");
        Ok(code)
    };
    let mut output = match client.run(cmd).await {
        Ok(output) => output,
        Err(status) => return fail(status),
    };
    while let Some(item) = output.next().await {
        match item {
            Ok(Output::Stdout(line)) => say!("{line}"),
            Ok(Output::Stderr(line)) => eprintln!("{line}"),
            Ok(Output::Exited(info)) => {
                eprintln!("exec: {program} ended with {info}");
                return Ok(info.code.unwrap_or_else(|| 128 + info.signal.unwrap_or(0)));
            }
            Err(status) => return fail(status),
        }
    }
    anyhow::bail!("the server ended the output of {program} without an exit status")
}

async fn demo() -> anyhow::Result<()> {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("netchan-exec-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let addr: Addr = format!("unix:{}", dir.join("exec.sock").display()).parse()?;
    let allow = ["echo", "sh"].map(String::from);
    let listener = bind(&addr, ExecServer::new(allow.clone())).await?;
    say!("server: listening on {addr}, allowing {allow:?}");
    tokio::spawn(serve(listener));

    let steps: [(&str, Option<Duration>, &[&str]); 4] = [
        ("a plain command", None, &["echo", "hello from the server"]),
        (
            "stdout and stderr as they come, then the exit status",
            None,
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
        ),
        (
            "a command not on the allowlist",
            None,
            &["rm", "-rf", "/tmp/x"],
        ),
        (
            "a deadline that kills a command that never ends",
            Some(Duration::from_millis(700)),
            &["sh", "-c", "while :; do echo tick; sleep 0.2; done"],
        ),
    ];
    for (what, timeout, command) in steps {
        let timeout_arg = match timeout {
            Some(t) => format!(" --timeout {}ms", t.as_millis()),
            None => String::new(),
        };
        let quoted: Vec<String> = command
            .iter()
            .map(|a| {
                if a.contains(' ') {
                    format!("'{a}'")
                } else {
                    a.to_string()
                }
            })
            .collect();
        say!(
            "\n$ exec run{timeout_arg} -- {}   # {what}",
            quoted.join(" ")
        );
        let code = run(
            &addr,
            timeout,
            command.iter().map(|s| s.to_string()).collect(),
        )
        .await?;
        say!("(exec exits with {code})");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // A server logs who ran what (at info) unless RUST_LOG says otherwise; clients stay quiet.
    let default = match cli.command {
        Cmd::Serve { .. } => "exec=info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Cmd::Serve { addr, allow } => {
            async {
                let listener = bind(&addr, ExecServer::new(allow.clone())).await?;
                say!(
                    "exec: listening on {}, allowing {allow:?}",
                    listener.local_addr()
                );
                serve(listener).await;
                Ok(0)
            }
            .await
        }
        Cmd::Run {
            addr,
            timeout,
            command,
        } => run(&addr, timeout, command).await,
        Cmd::Demo => demo().await.map(|()| 0),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("exec: error: {e:#}");
            std::process::exit(1);
        }
    }
}

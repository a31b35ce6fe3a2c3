//! The REPL: reading commands, running them against the hub, showing results.
//!
//! Two front ends share [`execute`]:
//! - on a terminal ([`run_terminal`]): rustyline line editing, history, tab completion of
//!   commands, peer names and remote paths; a progress bar for `get`; Ctrl-C cancels the
//!   running command, Ctrl-D or `quit` leaves; status lines (hub lost, reconnected) are
//!   printed above the prompt;
//! - otherwise ([`run_script`]): one command per line from stdin, no prompt or decoration,
//!   results on stdout, errors on stderr; the caller exits 0 only if every command succeeded.
//!
//! # Layout
//!
//! - this module: dispatch ([`execute`]: run a command, explain its error) and `read`;
//! - [`glob`]: shell-style patterns for remote names;
//! - [`download`]: `get` (planning, partial files kept for resume, install, progress);
//! - [`terminal`]: the rustyline front end, prompt, status notifier, and the scripted one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use netchan_rpc::Code;
use tokio::io::AsyncWriteExt;

use crate::client::{CallError, Peer};
use crate::command::{self, Cmd};
use crate::proto::Kind;

mod download;
mod glob;
mod terminal;

use download::get;

pub(crate) use terminal::{run_script, run_terminal, Notifier};

/// How long tab completion may wait for the hub.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(1);

/// Most bytes `read` prints on a terminal.
pub(crate) const READ_TERMINAL_CAP: usize = 64 * 1024;

/// Who this client is, for the prompt, `whoami` and `list`.
#[derive(Debug, Clone)]
pub(crate) struct Me {
    /// Published name.
    pub(crate) name: String,
    /// Hub address, or the hubs' addresses separated by commas.
    pub(crate) addr: String,
    /// Absolute exported root.
    pub(crate) root: PathBuf,
    /// Whether hidden files are shared.
    pub(crate) hidden: bool,
    /// How the link is protected, in words ("plaintext, no token" ...).
    pub(crate) link: String,
}

/// How results are shown.
#[derive(Debug, Clone)]
pub(crate) struct Ui {
    /// Show a progress bar for `get` (terminal only).
    pub(crate) progress: bool,
    /// stdout is a terminal: `read` escapes control characters, refuses binary content and
    /// caps what it prints; results end with a newline (keeps the prompt tidy).
    pub(crate) terminal: bool,
    /// Show error details (the layers below a message): `-v`, or `RUST_LOG` set.
    pub(crate) verbose: bool,
    /// What a cancelled `get` left behind, for the Ctrl-C message.
    pub(crate) partial: Arc<Mutex<Option<PathBuf>>>,
}

impl Ui {
    fn set_partial(&self, p: Option<PathBuf>) {
        *self
            .partial
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = p;
    }

    /// What to say when a command was cancelled: whether a partial file was kept.
    pub(crate) fn cancelled_message(&self) -> String {
        let p = self
            .partial
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match p.and_then(|p| std::fs::metadata(&p).ok()) {
            Some(m) if m.len() > 0 => format!(
                "cancelled; partial file kept for resume ({} received): run the same get again",
                command::human_size(m.len())
            ),
            _ => "cancelled; nothing saved".to_owned(),
        }
    }
}

/// What to do after a command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Read the next command.
    Continue,
    /// Leave.
    Quit,
}

/// Runs one command. Results go to stdout; the error (if any) is for the caller to print.
/// Cancel-safe: dropping it cancels the transfer; a `get` keeps what it received for resume
/// (or nothing, if nothing arrived).
pub(crate) async fn execute(peer: &Peer, me: &Me, cmd: Cmd, ui: &Ui) -> anyhow::Result<Flow> {
    let target = match &cmd {
        Cmd::Ls { peer, .. }
        | Cmd::Read { peer, .. }
        | Cmd::Get { peer, .. }
        | Cmd::Info { peer } => Some(peer.clone()),
        _ => None,
    };
    match run(peer, me, cmd, ui).await {
        Ok(flow) => Ok(flow),
        Err(e) => Err(explain(peer, target.as_deref(), e, ui.verbose).await),
    }
}

/// Adds what the user can do to an error: "did you mean" for an unknown peer; a peer that
/// left during the command is said as such, the hub's details and what the rpc layer said of a
/// lost hub link only with `-v`.
async fn explain(
    peer: &Peer,
    target: Option<&str>,
    e: anyhow::Error,
    verbose: bool,
) -> anyhow::Error {
    if let (true, Some(CallError::HubLost { detail })) = (verbose, e.downcast_ref::<CallError>()) {
        return anyhow::anyhow!("{e:#}{}", crate::client::detail_if(verbose, detail));
    }
    let peer_gone = e.downcast_ref::<CallError>().and_then(|c| match c {
        CallError::Status(s) if crate::proto::is_peer_gone(s) => Some(s.message().to_owned()),
        _ => None,
    });
    if let (Some(detail), Some(name)) = (peer_gone, target) {
        if detail.starts_with("peer gone: the hub holding") {
            return anyhow::anyhow!(
                "the hub holding {name} is gone, which cut the command short; run it again \
                 once {name} is back (list shows who is connected){}",
                crate::client::detail_if(verbose, &detail)
            );
        }
        return anyhow::anyhow!(
            "{name} went away during the command; run it again once {name} is back (list \
             shows who is connected){}",
            crate::client::detail_if(verbose, &detail)
        );
    }
    let unknown_peer = e.downcast_ref::<CallError>().is_some_and(|c| {
        matches!(c, CallError::Status(s) if s.code() == Code::NotFound
            && s.message().starts_with("unknown peer"))
    });
    if let (true, Some(name)) = (unknown_peer, target) {
        let names = tokio::time::timeout(COMPLETION_TIMEOUT, peer.list())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let hint = command::closest(name, names.iter().map(String::as_str));
        return anyhow::anyhow!(
            "unknown peer {name:?}{} (list shows who is connected)",
            command::did_you_mean(hint.as_deref())
        );
    }
    e
}

async fn run(peer: &Peer, me: &Me, cmd: Cmd, ui: &Ui) -> anyhow::Result<Flow> {
    let mut out = tokio::io::stdout();
    match cmd {
        Cmd::Quit => return Ok(Flow::Quit),
        Cmd::Help => out.write_all(command::help_text().as_bytes()).await?,
        Cmd::List => {
            let mut text = String::new();
            for name in peer.list().await? {
                text.push_str(&name);
                // Marked for a person; a script gets bare names.
                if name == me.name && ui.terminal {
                    text.push_str(" (you)");
                }
                text.push('\n');
            }
            out.write_all(text.as_bytes()).await?;
        }
        Cmd::Ls { peer: p, dir, long } => {
            let listing = peer.ls(&p, &dir).await?;
            out.write_all(command::format_listing(&listing, long).as_bytes())
                .await?;
        }
        Cmd::Whoami => {
            let state = if peer.is_connected() {
                "connected"
            } else {
                "not connected (reconnecting)"
            };
            let hidden = if me.hidden {
                "hidden files shared"
            } else {
                "hidden files not shared"
            };
            let token = match peer.hub_checks_token() {
                Some(true) => "; the hub checks the token",
                Some(false) => "; the hub checks no token: anyone who can reach it can join",
                None => "",
            };
            let text = format!(
                "{}@{}: {state}; {}{token}\nexporting {} ({hidden})\n",
                me.name,
                peer.hub_addr().unwrap_or_else(|| me.addr.clone()),
                me.link,
                me.root.display()
            );
            out.write_all(text.as_bytes()).await?;
        }
        Cmd::Info { peer: p } => {
            let names = peer.list().await?;
            if !names.contains(&p) {
                let hint = command::closest(&p, names.iter().map(String::as_str));
                bail!(
                    "{p:?} is not connected{} (list shows who is)",
                    command::did_you_mean(hint.as_deref())
                );
            }
            let listing = peer.ls(&p, "").await?;
            let (mut files, mut dirs, mut bytes) = (0u64, 0u64, 0u64);
            for e in &listing.entries {
                match e.kind {
                    Kind::File => {
                        files += 1;
                        bytes += e.size;
                    }
                    Kind::Dir => dirs += 1,
                    _ => {}
                }
            }
            let you = if p == me.name { " (you)" } else { "" };
            let text = format!(
                "{p}{you}: connected; its root holds {files} file{} ({} in all) and {dirs} \
                 director{}{}\n",
                if files == 1 { "" } else { "s" },
                command::human_bytes(bytes),
                if dirs == 1 { "y" } else { "ies" },
                if listing.truncated { ", and more" } else { "" }
            );
            out.write_all(text.as_bytes()).await?;
        }
        Cmd::Read { peer: p, path } => read(peer, &p, &path, ui).await?,
        Cmd::Get {
            peer: p,
            paths,
            local,
            flags,
        } => get(peer, &p, &paths, local, flags, ui).await?,
    }
    out.flush().await?;
    Ok(Flow::Continue)
}

/// `read`: exact bytes to a pipe or file; on a terminal, text only, escaped, capped.
async fn read(peer: &Peer, p: &str, path: &str, ui: &Ui) -> anyhow::Result<()> {
    let mut out = tokio::io::stdout();
    let mut file = peer.read(p, path).await?;
    if !ui.terminal {
        // Bounded by the file: each iteration consumes one chunk, the stream ends at eof.
        while let Some(chunk) = file.next().await? {
            out.write_all(&chunk.data).await?;
        }
        out.flush().await?;
        return Ok(());
    }
    let mut buf = Vec::new();
    let mut size = 0;
    let mut complete = false;
    // Bounded by the cap: stops once READ_TERMINAL_CAP bytes are in (or at eof).
    while buf.len() <= READ_TERMINAL_CAP {
        match file.next().await? {
            Some(chunk) => {
                size = chunk.size;
                buf.extend_from_slice(&chunk.data);
            }
            None => {
                complete = true;
                break;
            }
        }
    }
    // Dropping the stream cancels the rest of the transfer.
    drop(file);
    let shown = buf.len().min(READ_TERMINAL_CAP);
    let text = match terminal_text(&buf[..shown], !complete || shown < buf.len()) {
        Some(text) => text,
        None => bail!(
            "{path} looks like a binary file; not printed to the terminal (use: get {p} {})",
            command::quote_word(path, false)
        ),
    };
    let mut text = text;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    if !complete || shown < buf.len() {
        text.push_str(&format!(
            "(showing the first {} of {}; use get to save the whole file)\n",
            command::human_bytes(shown as u64),
            command::human_bytes(size)
        ));
    }
    out.write_all(text.as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

/// `bytes` made safe for a terminal: `None` if they are not text (a NUL byte, or invalid
/// UTF-8 other than a character cut at the end of a `truncated` buffer); otherwise control
/// characters other than newline and tab, and bidirectional overrides, are shown escaped
/// (`\x1b`, `\u{202e}`) so a file cannot drive the terminal.
pub(crate) fn terminal_text(bytes: &[u8], truncated: bool) -> Option<String> {
    if bytes.contains(&0) {
        return None;
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        // A multi-byte character cut by the cap is not a sign of binary content.
        Err(e) if truncated && e.error_len().is_none() => {
            std::str::from_utf8(&bytes[..e.valid_up_to()]).ok()?
        }
        Err(_) => return None,
    };
    Some(command::escape_controls(text, true))
}

/// `~` and `~/...` expanded to $HOME.
pub(crate) fn expand_tilde(p: &Path) -> PathBuf {
    let Some(s) = p.to_str() else {
        return p.to_path_buf();
    };
    let home = std::env::var_os("HOME").map(PathBuf::from);
    match (s, home) {
        ("~", Some(h)) => h,
        (s, Some(h)) if s.starts_with("~/") => h.join(&s[2..]),
        _ => p.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_text_escapes_controls_and_refuses_binary() {
        assert_eq!(
            terminal_text(b"red \x1b[31mX\x07\r\n\tok", false).unwrap(),
            "red \\x1b[31mX\\x07\\x0d\n\tok"
        );
        assert_eq!(
            terminal_text("a\u{202e}b".as_bytes(), false).unwrap(),
            "a\\u{202e}b"
        );
        assert_eq!(terminal_text(b"bin\0ary", false), None);
        assert_eq!(terminal_text(&[0xff, 0xfe, b'x'], false), None);
        // A character cut by the cap is not binary; a bad byte inside still is.
        let cut = &"zoë".as_bytes()[..3];
        assert_eq!(terminal_text(cut, true).unwrap(), "zo");
        assert_eq!(terminal_text(cut, false), None);
    }

    #[test]
    fn tilde_expands_to_home() {
        let Some(home) = std::env::var_os("HOME").map(PathBuf::from) else {
            return;
        };
        assert_eq!(expand_tilde(Path::new("~")), home);
        assert_eq!(expand_tilde(Path::new("~/x/y")), home.join("x/y"));
        assert_eq!(expand_tilde(Path::new("a/~")), PathBuf::from("a/~"));
    }
}

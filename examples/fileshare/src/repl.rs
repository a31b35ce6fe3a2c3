//! The REPL: reading commands, running them against the hub, showing results.
//!
//! Two front ends share [`execute`]:
//! - on a terminal ([`run_terminal`]): rustyline line editing, history, tab completion of
//!   commands, peer names and remote paths; a progress bar for `get`; Ctrl-C cancels the
//!   running command, Ctrl-D or `quit` leaves; status lines (hub lost, reconnected) are
//!   printed above the prompt;
//! - otherwise ([`run_script`]): one command per line from stdin, no prompt or decoration,
//!   results on stdout, errors on stderr; the caller exits 0 only if every command succeeded.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Editor, ExternalPrinter, Helper};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, LinesCodec};

use crate::client::Peer;
use crate::command::{self, Cmd, COMMANDS};
use crate::export::Kind;

/// Longest command line read from a non-terminal stdin.
const MAX_LINE: usize = 64 * 1024;

/// How long tab completion may wait for the hub.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(1);

/// How results are shown.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ui {
    /// Show a progress bar for `get` (terminal only).
    pub(crate) progress: bool,
    /// End `read` output with a newline if the file did not (keeps the prompt tidy).
    pub(crate) tidy: bool,
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
/// Cancel-safe in the sense that dropping it cancels the transfer and removes a partial `get`.
pub(crate) async fn execute(peer: &Peer, cmd: Cmd, ui: Ui) -> anyhow::Result<Flow> {
    let mut out = tokio::io::stdout();
    match cmd {
        Cmd::Quit => return Ok(Flow::Quit),
        Cmd::Help => out.write_all(command::help_text().as_bytes()).await?,
        Cmd::List => {
            let mut text = String::new();
            for name in peer.list().await? {
                text.push_str(&name);
                text.push('\n');
            }
            out.write_all(text.as_bytes()).await?;
        }
        Cmd::Ls { peer: p, dir } => {
            let listing = peer.ls(&p, &dir).await?;
            out.write_all(command::format_listing(&listing).as_bytes())
                .await?;
        }
        Cmd::Read { peer: p, path } => {
            let mut file = peer.read(&p, &path).await?;
            let mut last = None;
            // Bounded by the file: each iteration consumes one chunk, the stream ends at eof.
            while let Some(chunk) = file.next().await? {
                if let Some(&b) = chunk.data.last() {
                    last = Some(b);
                }
                out.write_all(&chunk.data).await?;
            }
            if ui.tidy && last.is_some_and(|b| b != b'\n') {
                out.write_all(b"\n").await?;
            }
        }
        Cmd::Get {
            peer: p,
            path,
            local,
        } => {
            // Into an existing directory: keep the remote file name, like cp.
            let local = if local.is_dir() {
                let name = Path::new(&path)
                    .file_name()
                    .with_context(|| format!("{path:?} has no file name; give LOCAL"))?;
                local.join(name)
            } else {
                local
            };
            let n = get(peer, &p, &path, &local, ui).await?;
            let line = format!("saved {n} bytes to {}\n", local.display());
            out.write_all(line.as_bytes()).await?;
        }
    }
    out.flush().await?;
    Ok(Flow::Continue)
}

/// Removes a partial download unless disarmed.
struct PartialFile(Option<PathBuf>);

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Streams PEER's PATH into LOCAL through a temporary file next to it; LOCAL appears only
/// when complete, and an existing LOCAL is never overwritten. Returns the byte count.
async fn get(peer: &Peer, p: &str, path: &str, local: &Path, ui: Ui) -> anyhow::Result<u64> {
    if std::fs::symlink_metadata(local).is_ok() {
        bail!(
            "local file {} already exists; give another LOCAL name",
            local.display()
        );
    }
    let mut stream = peer.read(p, path).await?;
    // The first chunk proves the remote file is readable before anything is created here.
    let first = stream
        .next()
        .await?
        .context("the hub sent an empty stream")?;
    let file_name = local
        .file_name()
        .with_context(|| format!("{} is not a file name", local.display()))?;
    let dir = match local.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temp = dir.join(format!(
        ".{}.share-{}.part",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let mut out = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .await
        .with_context(|| format!("cannot create {}", temp.display()))?;
    let mut guard = PartialFile(Some(temp.clone()));
    let bar = ui.progress.then(|| progress_bar(first.size));
    let mut total: u64 = 0;
    let mut next = Some(first);
    // Bounded by the file: one chunk per iteration until the eof chunk.
    while let Some(chunk) = next {
        out.write_all(&chunk.data)
            .await
            .with_context(|| format!("cannot write {}", temp.display()))?;
        total += chunk.data.len() as u64;
        if let Some(bar) = &bar {
            bar.set_position(total);
        }
        next = stream.next().await?;
    }
    out.flush().await?;
    drop(out);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // hard_link refuses to replace a LOCAL created meanwhile; rename is the fallback for file
    // systems without links.
    match std::fs::hard_link(&temp, local) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!(
                "local file {} appeared meanwhile; not overwritten",
                local.display()
            )
        }
        Err(_) => {
            std::fs::rename(&temp, local)
                .with_context(|| format!("cannot create {}", local.display()))?;
            guard.0 = None;
        }
    }
    drop(guard);
    Ok(total)
}

fn progress_bar(size: u64) -> ProgressBar {
    let bar = ProgressBar::new(size);
    if let Ok(style) = ProgressStyle::with_template(
        "{bytes:>10}/{total_bytes} {binary_bytes_per_sec:>12} ETA {eta:>4} [{wide_bar}]",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Reads commands from a non-terminal stdin until EOF or `quit`. Returns whether every
/// command succeeded.
pub(crate) async fn run_script(peer: &Peer) -> bool {
    let ui = Ui {
        progress: false,
        tidy: false,
    };
    let mut lines = FramedRead::new(
        tokio::io::stdin(),
        LinesCodec::new_with_max_length(MAX_LINE),
    );
    let mut ok = true;
    // Bounded by the input: one iteration per line.
    while let Some(line) = lines.next().await {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                eprintln!("error: reading stdin: {e}");
                ok = false;
                if matches!(e, tokio_util::codec::LinesCodecError::Io(_)) {
                    break;
                }
                continue;
            }
        };
        let cmd = match command::parse(&line) {
            Ok(Some(cmd)) => cmd,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("error: {e}");
                ok = false;
                continue;
            }
        };
        match execute(peer, cmd, ui).await {
            Ok(Flow::Quit) => break,
            Ok(Flow::Continue) => {}
            Err(e) => {
                eprintln!("error: {e:#}");
                ok = false;
            }
        }
    }
    ok
}

/// Prints status lines: above the prompt while the terminal REPL runs, else on stderr.
#[derive(Default)]
pub(crate) struct Notifier {
    // std mutex: `print` only writes to a pipe, never awaits.
    printer: Mutex<Option<Box<dyn ExternalPrinter + Send>>>,
}

impl Notifier {
    /// Shows `msg` to the user.
    pub(crate) fn notify(&self, msg: &str) {
        let mut printer = self
            .printer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = printer.as_mut() {
            if p.print(format!("share: {msg}\n")).is_ok() {
                return;
            }
        }
        eprintln!("share: {msg}");
    }

    fn set(&self, p: Option<Box<dyn ExternalPrinter + Send>>) {
        *self
            .printer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = p;
    }
}

/// Tab completion of commands, peer names and remote paths.
struct ShareHelper {
    peer: Arc<Peer>,
    rt: tokio::runtime::Handle,
}

impl ShareHelper {
    fn peer_names(&self) -> Vec<String> {
        self.rt
            .block_on(tokio::time::timeout(COMPLETION_TIMEOUT, self.peer.list()))
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    fn remote_paths(&self, peer: &str, partial: &str) -> Vec<String> {
        let (dir, prefix) = match partial.rfind('/') {
            Some(i) => (&partial[..=i], &partial[i + 1..]),
            None => ("", partial),
        };
        let listing = self
            .rt
            .block_on(tokio::time::timeout(
                COMPLETION_TIMEOUT,
                self.peer.ls(peer, dir),
            ))
            .ok()
            .and_then(Result::ok);
        let Some(listing) = listing else {
            return Vec::new();
        };
        listing
            .entries
            .into_iter()
            .filter(|e| e.name.starts_with(prefix))
            .map(|e| {
                let end = if e.kind == Kind::Dir { "/" } else { " " };
                format!("{dir}{}{end}", e.name)
            })
            .collect()
    }
}

/// What the word under the cursor is, for completion.
#[derive(Debug, PartialEq, Eq)]
enum Slot<'a> {
    /// The command word.
    Command,
    /// A peer name (second word of ls/read/get).
    Peer,
    /// A remote path (third word of ls/read/get) on this peer.
    Path {
        /// The peer named in the second word.
        peer: &'a str,
    },
    /// Nothing to complete.
    Nothing,
}

/// Splits `line[..pos]` into the start of the word under the cursor, that word, and its slot.
fn completion_slot(line: &str, pos: usize) -> (usize, &str, Slot<'_>) {
    let Some(before) = line.get(..pos) else {
        return (pos.min(line.len()), "", Slot::Nothing);
    };
    let start = before
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map_or(0, |(i, c)| i + c.len_utf8());
    let word = &before[start..];
    let prior: Vec<&str> = before[..start].split_whitespace().collect();
    let takes_peer = matches!(prior.first(), Some(&("ls" | "read" | "get")));
    let slot = match prior.len() {
        0 => Slot::Command,
        1 if takes_peer => Slot::Peer,
        2 if takes_peer => Slot::Path { peer: prior[1] },
        _ => Slot::Nothing,
    };
    (start, word, slot)
}

impl Completer for ShareHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let (start, word, slot) = completion_slot(line, pos);
        let candidates = match slot {
            Slot::Command => COMMANDS
                .iter()
                .filter(|(name, _, _)| name.starts_with(word))
                .map(|(name, _, _)| format!("{name} "))
                .collect(),
            Slot::Peer => self
                .peer_names()
                .into_iter()
                .filter(|n| n.starts_with(word))
                .map(|n| format!("{n} "))
                .collect(),
            Slot::Path { peer } => self.remote_paths(peer, word),
            Slot::Nothing => Vec::new(),
        };
        Ok((start, candidates))
    }
}

impl Hinter for ShareHelper {
    type Hint = String;
}
impl Highlighter for ShareHelper {}
impl Validator for ShareHelper {}
impl Helper for ShareHelper {}

fn history_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".share_history"))
}

/// The interactive REPL. Blocking: run it on a blocking thread; commands run on `rt`.
pub(crate) fn run_terminal(
    peer: Arc<Peer>,
    rt: tokio::runtime::Handle,
    notifier: Arc<Notifier>,
) -> anyhow::Result<()> {
    let config = rustyline::Config::builder()
        .auto_add_history(true)
        .max_history_size(1000)?
        .completion_type(rustyline::CompletionType::List)
        .build();
    let mut editor: Editor<ShareHelper, DefaultHistory> = Editor::with_config(config)?;
    editor.set_helper(Some(ShareHelper {
        peer: peer.clone(),
        rt: rt.clone(),
    }));
    let history = history_file();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    if let Ok(p) = editor.create_external_printer() {
        notifier.set(Some(Box::new(p)));
    }
    let ui = Ui {
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        tidy: true,
    };
    // Bounded by the user: one iteration per line typed, ends on quit or Ctrl-D.
    loop {
        let line = match editor.readline("> ") {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                notifier.set(None);
                return Err(e).context("reading the terminal");
            }
        };
        let cmd = match command::parse(&line) {
            Ok(Some(cmd)) => cmd,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        let result = rt.block_on(async {
            tokio::select! {
                r = execute(&peer, cmd, ui) => r,
                _ = tokio::signal::ctrl_c() => {
                    let _ = std::io::stdout().flush();
                    Err(anyhow::anyhow!("interrupted"))
                }
            }
        });
        match result {
            Ok(Flow::Quit) => break,
            Ok(Flow::Continue) => {}
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
    notifier.set(None);
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_knows_which_word_is_under_the_cursor() {
        assert_eq!(completion_slot("", 0), (0, "", Slot::Command));
        assert_eq!(completion_slot("li", 2), (0, "li", Slot::Command));
        assert_eq!(completion_slot("read b", 6), (5, "b", Slot::Peer));
        assert_eq!(completion_slot("ls ", 3), (3, "", Slot::Peer));
        assert_eq!(
            completion_slot("get bob sub/he", 14),
            (8, "sub/he", Slot::Path { peer: "bob" })
        );
        assert_eq!(completion_slot("list x", 6), (5, "x", Slot::Nothing));
        assert_eq!(
            completion_slot("get bob a.txt lo", 16),
            (14, "lo", Slot::Nothing)
        );
        // The cursor in the middle of the line counts only what is before it.
        assert_eq!(completion_slot("read bob x", 6), (5, "b", Slot::Peer));
        // Non-ASCII whitespace and names do not split characters.
        assert_eq!(completion_slot("ls\u{3000}zoë", 9), (5, "zoë", Slot::Peer));
        // A position inside a character (never sent by rustyline) completes nothing.
        assert_eq!(completion_slot("zoë", 3), (3, "", Slot::Nothing));
    }
}

//! The front ends: rustyline on a terminal (completion, history, a prompt that says whether
//! the hub is connected, status lines printed above it) and commands read from a script.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use rustyline::completion::{Completer, FilenameCompleter};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Editor, ExternalPrinter, Helper};
use tokio_util::codec::{FramedRead, LinesCodec};

use super::{execute, Flow, Me, Ui, COMPLETION_TIMEOUT};
use crate::client::Peer;
use crate::command::{self, Cmd, COMMANDS};
use crate::proto::Kind;

/// Longest command line read from a non-terminal stdin.
const MAX_LINE: usize = 64 * 1024;

/// How often the terminal REPL asks the hub who is connected, to announce joins and leaves.
const PEER_WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Reads commands from a non-terminal stdin until EOF or `quit`. Returns whether every
/// command succeeded.
pub(crate) async fn run_script(peer: &Peer, me: &Me, verbose: bool) -> bool {
    let ui = Ui {
        verbose,
        progress: false,
        terminal: std::io::IsTerminal::is_terminal(&std::io::stdout()),
        partial: Arc::default(),
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
        match execute(peer, me, cmd, &ui).await {
            Ok(Flow::Quit) => break,
            Ok(Flow::Continue) => {}
            // Whoever read our output stopped (`share … | head`): nobody is left to tell.
            Err(e) if stdout_closed(&e) => break,
            Err(e) => {
                eprintln!("error: {e:#}");
                ok = false;
            }
        }
    }
    ok
}

/// Whether `e` is a write to a closed pipe (the reader of our output went away).
fn stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
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

/// Tab completion of commands, peer names, remote paths and local paths.
struct ShareHelper {
    peer: Arc<Peer>,
    rt: tokio::runtime::Handle,
    files: FilenameCompleter,
}

impl ShareHelper {
    fn peer_names(&self) -> Vec<String> {
        self.rt
            .block_on(tokio::time::timeout(COMPLETION_TIMEOUT, self.peer.list()))
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// Completions of the remote path `partial` on `peer`, each quoted as needed; a directory
    /// is left open (no closing quote, no space) so that completion can go on inside it.
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
                if e.kind == Kind::Dir {
                    command::quote_word(&format!("{dir}{}/", e.name), true)
                } else {
                    format!(
                        "{} ",
                        command::quote_word(&format!("{dir}{}", e.name), false)
                    )
                }
            })
            .collect()
    }
}

/// What the word under the cursor is, for completion.
#[derive(Debug, PartialEq, Eq)]
enum Slot {
    /// The command word.
    Command,
    /// A peer name.
    Peer,
    /// A remote path on this peer.
    Path {
        /// The peer named before it.
        peer: String,
    },
    /// A local path (get's LOCAL).
    Local,
    /// Nothing to complete.
    Nothing,
}

/// The words of `line[..pos]` as the parser reads them (quotes removed): the finished ones,
/// then the byte offset where the word under the cursor starts and its text so far.
fn words_before(line: &str, pos: usize) -> Option<(Vec<String>, usize, String)> {
    let before = line.get(..pos)?;
    let mut done = Vec::new();
    let (mut cur, mut start, mut in_word) = (String::new(), 0, false);
    let mut quote: Option<char> = None;
    let mut chars = before.char_indices();
    // Bounded by the line.
    while let Some((i, c)) = chars.next() {
        if !in_word && !c.is_whitespace() {
            in_word = true;
            start = i;
        }
        match (quote, c) {
            (Some('\''), '\'') | (Some('"'), '"') => quote = None,
            (Some('"') | None, '\\') => {
                if let Some((_, next)) = chars.next() {
                    cur.push(next);
                }
            }
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => quote = Some(c),
            (None, c) if c.is_whitespace() => {
                if in_word {
                    done.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if !in_word {
        start = pos;
    }
    Some((done, start, cur))
}

/// Splits `line[..pos]` into the start of the word under the cursor, that word (unquoted),
/// and its slot.
fn completion_slot(line: &str, pos: usize) -> (usize, String, Slot) {
    let Some((prior, start, word)) = words_before(line, pos) else {
        return (pos.min(line.len()), String::new(), Slot::Nothing);
    };
    let Some((cmd, args)) = prior.split_first() else {
        return (start, word, Slot::Command);
    };
    let args: Vec<&String> = args
        .iter()
        .filter(|a| !(a.starts_with('-') && a.len() > 1))
        .collect();
    if word.starts_with('-') && cmd != "read" && args.len() < 2 {
        return (start, word, Slot::Nothing);
    }
    let slot = match (cmd.as_str(), args.len()) {
        ("ls" | "read" | "get" | "info", 0) => Slot::Peer,
        ("ls" | "read" | "get", 1) => Slot::Path {
            peer: args[0].clone(),
        },
        ("get", _) => Slot::Local,
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
        ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let (start, word, slot) = completion_slot(line, pos);
        let candidates = match slot {
            Slot::Command => COMMANDS
                .iter()
                .filter(|(name, _, _)| name.starts_with(word.as_str()))
                .map(|(name, _, _)| format!("{name} "))
                .collect(),
            Slot::Peer => self
                .peer_names()
                .into_iter()
                .filter(|n| n.starts_with(word.as_str()))
                .map(|n| format!("{} ", command::quote_word(&n, false)))
                .collect(),
            Slot::Path { peer } => self.remote_paths(&peer, &word),
            Slot::Local => {
                let (at, pairs) = self.files.complete(line, pos, ctx)?;
                return Ok((at, pairs.into_iter().map(|p| p.replacement).collect()));
            }
            Slot::Nothing => Vec::new(),
        };
        Ok((start, candidates))
    }
}

impl Hinter for ShareHelper {
    type Hint = String;
}
/// The prompt follows the link as it changes: rustyline redraws the line whenever a notice
/// is printed above it (the link lost, back again), and the prompt shown then says so.
impl Highlighter for ShareHelper {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(
        &'s self,
        prompt: &'p str,
        _default: bool,
    ) -> std::borrow::Cow<'b, str> {
        std::borrow::Cow::Owned(live_prompt(prompt, self.peer.is_connected()))
    }
}
impl Validator for ShareHelper {}
impl Helper for ShareHelper {}

fn history_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".share_history"))
}

/// The prompt: who and where you are, and whether the link is up.
/// The end of the prompt while connected, and while not: the same width, so that the prompt
/// shown can change while a line is being edited (rustyline lays the line out by the width of
/// the prompt it was given).
const ONLINE: &str = " (online)> ";
const OFFLINE: &str = " (offline)>";

pub(super) fn prompt(me: &Me, connected: bool) -> String {
    format!(
        "{}@{}{}",
        me.name,
        me.addr,
        if connected { ONLINE } else { OFFLINE }
    )
}

/// `prompt` (made by [`prompt`]) saying `connected` as it is now.
fn live_prompt(prompt: &str, connected: bool) -> String {
    let base = prompt
        .strip_suffix(ONLINE)
        .or_else(|| prompt.strip_suffix(OFFLINE))
        .unwrap_or(prompt);
    if base.len() == prompt.len() {
        return prompt.to_owned();
    }
    format!("{base}{}", if connected { ONLINE } else { OFFLINE })
}

/// Announces peers joining and leaving, by asking the hub every [`PEER_WATCH_INTERVAL`].
async fn watch_peers(peer: Arc<Peer>, me: String, notifier: Arc<Notifier>) {
    let mut known: Option<Vec<String>> = None;
    // Runs until aborted when the REPL ends; one list call per interval, the first at once
    // (what is there at the start is the baseline, not news).
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::time::sleep(PEER_WATCH_INTERVAL).await;
        }
        let Ok(Ok(now)) = tokio::time::timeout(COMPLETION_TIMEOUT * 5, peer.list()).await else {
            // Not connected: announced by the reconnect messages; start afresh after.
            known = None;
            continue;
        };
        if let Some(before) = &known {
            for name in now.iter().filter(|n| !before.contains(n) && **n != me) {
                notifier.notify(&format!("{name} joined"));
            }
            for name in before.iter().filter(|n| !now.contains(n) && **n != me) {
                notifier.notify(&format!("{name} left"));
            }
        }
        known = Some(now);
    }
}

/// The interactive REPL. Blocking: run it on a blocking thread; commands run on `rt`.
pub(crate) fn run_terminal(
    peer: Arc<Peer>,
    me: Me,
    rt: tokio::runtime::Handle,
    notifier: Arc<Notifier>,
    verbose: bool,
) -> anyhow::Result<()> {
    let config = rustyline::Config::builder()
        .auto_add_history(true)
        .max_history_size(1000)?
        .completion_type(rustyline::CompletionType::List)
        // The highlighter is what redraws the prompt as the link changes; it adds no colour,
        // so it runs under NO_COLOR too.
        .color_mode(rustyline::ColorMode::Forced)
        .build();
    let mut editor: Editor<ShareHelper, DefaultHistory> = Editor::with_config(config)?;
    editor.set_helper(Some(ShareHelper {
        peer: peer.clone(),
        rt: rt.clone(),
        files: FilenameCompleter::new(),
    }));
    let history = history_file();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    if let Ok(p) = editor.create_external_printer() {
        notifier.set(Some(Box::new(p)));
    }
    let watcher = rt.spawn(watch_peers(peer.clone(), me.name.clone(), notifier.clone()));
    let ui = Ui {
        verbose,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        terminal: std::io::IsTerminal::is_terminal(&std::io::stdout()),
        partial: Arc::default(),
    };
    // Bounded by the user: one iteration per line typed, ends on quit or Ctrl-D.
    let result = loop {
        let line = match editor.readline(&prompt(&me, peer.is_connected())) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break Ok(()),
            Err(e) => break Err(e).context("reading the terminal"),
        };
        let cmd = match command::parse(&line) {
            Ok(Some(cmd)) => cmd,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        let is_get = matches!(cmd, Cmd::Get { .. });
        ui.set_partial(None);
        let result = rt.block_on(async {
            tokio::select! {
                r = execute(&peer, &me, cmd, &ui) => r.map(Some),
                _ = tokio::signal::ctrl_c() => Ok(None),
            }
        });
        match result {
            Ok(Some(Flow::Quit)) => break Ok(()),
            Ok(Some(Flow::Continue)) => {}
            // The command's future is dropped by now: its bar is cleared, its transfer
            // cancelled.
            Ok(None) => {
                let _ = std::io::stdout().flush();
                if is_get {
                    eprintln!("{}", ui.cancelled_message());
                } else {
                    eprintln!("cancelled");
                }
            }
            Err(e) => eprintln!("error: {e:#}"),
        }
    };
    watcher.abort();
    notifier.set(None);
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(line: &str) -> (usize, String, Slot) {
        completion_slot(line, line.len())
    }
    #[test]
    fn completion_knows_which_word_is_under_the_cursor() {
        assert_eq!(slot(""), (0, "".into(), Slot::Command));
        assert_eq!(slot("li"), (0, "li".into(), Slot::Command));
        assert_eq!(slot("read b"), (5, "b".into(), Slot::Peer));
        assert_eq!(slot("ls "), (3, "".into(), Slot::Peer));
        assert_eq!(slot("ls -l "), (6, "".into(), Slot::Peer));
        let bob = || Slot::Path { peer: "bob".into() };
        assert_eq!(slot("get bob sub/he"), (8, "sub/he".into(), bob()));
        assert_eq!(slot("get -f bob sub/he"), (11, "sub/he".into(), bob()));
        assert_eq!(slot("list x"), (5, "x".into(), Slot::Nothing));
        assert_eq!(slot("get bob a.txt lo"), (14, "lo".into(), Slot::Local));
        assert_eq!(slot("info b"), (5, "b".into(), Slot::Peer));
        // The cursor in the middle of the line counts only what is before it.
        assert_eq!(
            completion_slot("read bob x", 6),
            (5, "b".into(), Slot::Peer)
        );
        // Non-ASCII whitespace and names do not split characters.
        assert_eq!(slot("ls\u{3000}zoë"), (5, "zoë".into(), Slot::Peer));
        // A position inside a character (never sent by rustyline) completes nothing.
        assert_eq!(completion_slot("zoë", 3), (3, "".into(), Slot::Nothing));
    }

    #[test]
    fn completion_reads_quoted_words_as_the_parser_does() {
        assert_eq!(
            slot("read bob 'with sp"),
            (9, "with sp".into(), Slot::Path { peer: "bob".into() })
        );
        assert_eq!(
            slot("read bob \"it's"),
            (9, "it's".into(), Slot::Path { peer: "bob".into() })
        );
        assert_eq!(
            slot("ls bob 'my dir/'x"),
            (7, "my dir/x".into(), Slot::Path { peer: "bob".into() })
        );
        assert_eq!(
            slot("get 'bob' 'my dir/"),
            (10, "my dir/".into(), Slot::Path { peer: "bob".into() })
        );
    }

    #[test]
    fn the_prompt_says_who_where_and_whether_connected() {
        let me = Me {
            name: "alice".into(),
            addr: "127.0.0.1:8765".into(),
            root: PathBuf::from("/x"),
            hidden: false,
            link: String::new(),
        };
        let (on, off) = (prompt(&me, true), prompt(&me, false));
        assert_eq!(on, "alice@127.0.0.1:8765 (online)> ");
        assert_eq!(off, "alice@127.0.0.1:8765 (offline)>");
        // Redrawn as the link changes, at the same width.
        assert_eq!(live_prompt(&on, false), off);
        assert_eq!(live_prompt(&off, true), on);
        assert_eq!(on.chars().count(), off.chars().count());
        assert_eq!(live_prompt("other> ", true), "other> ");
    }
}

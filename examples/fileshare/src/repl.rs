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
use indicatif::{ProgressBar, ProgressFinish, ProgressStyle};
use netchan_rpc::Code;
use rustyline::completion::{Completer, FilenameCompleter};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Editor, ExternalPrinter, Helper};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, LinesCodec};

use crate::client::{CallError, Peer};
use crate::command::{self, Cmd, GetFlags, Local, COMMANDS};
use crate::proto::{Entry, Kind};

/// Longest command line read from a non-terminal stdin.
const MAX_LINE: usize = 64 * 1024;

/// How long a `get` on a terminal waits for the next chunk before its progress bar says it is
/// waiting for the peer.
const STALL_NOTICE: Duration = Duration::from_secs(2);

/// How long tab completion may wait for the hub.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(1);

/// Most bytes `read` prints on a terminal.
pub(crate) const READ_TERMINAL_CAP: usize = 64 * 1024;

/// Most files one `get -r` or glob copies, and deepest directory it descends into.
const MAX_TREE_FILES: usize = 100_000;
const MAX_TREE_DEPTH: usize = 64;

/// How often the terminal REPL asks the hub who is connected, to announce joins and leaves.
const PEER_WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Who this client is, for the prompt, `whoami` and `list`.
#[derive(Debug, Clone)]
pub(crate) struct Me {
    /// Published name.
    pub(crate) name: String,
    /// Hub address.
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
        Err(e) => Err(explain(peer, target.as_deref(), e).await),
    }
}

/// Adds what the user can do to an error: "did you mean" for an unknown peer; a peer that
/// left during the command is said as such, the hub's details only with `-v`.
async fn explain(peer: &Peer, target: Option<&str>, e: anyhow::Error) -> anyhow::Error {
    let peer_gone = e.downcast_ref::<CallError>().and_then(|c| match c {
        CallError::Status(s)
            if s.code() == Code::Unavailable && s.message().starts_with("peer gone") =>
        {
            Some(s.message().to_owned())
        }
        _ => None,
    });
    if let (Some(detail), Some(name)) = (peer_gone, target) {
        return anyhow::anyhow!(
            "{name} went away during the command; run it again once {name} is back (list \
             shows who is connected){}",
            crate::client::detail_if_verbose(&detail)
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
                me.addr,
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

/// Whether `s` has glob characters.
fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Shell-style match of one name: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`. A leading `.` must be
/// matched literally.
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    if name.starts_with('.') && !pattern.starts_with('.') {
        return false;
    }
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matcher with one backtrack point for the last `*` (linear in practice).
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    // Bounded: each iteration advances `ni`, or `pi` past a `*`, or backtracks with a larger
    // `ni` than before.
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class_match(&p, pi, n[ni]) {
                        if matched {
                            pi = next;
                            ni += 1;
                            continue;
                        }
                    } else if n[ni] == '[' {
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the class starting at `p[start] == '['`: `(matched, index after ']')`,
/// or `None` if the class is not closed.
fn class_match(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    // Bounded by the pattern's length.
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            matched |= p[i] <= c && c <= p[i + 2];
            i += 3;
        } else {
            matched |= p[i] == c;
            i += 1;
        }
        first = false;
    }
    None
}

/// `dir/name` for remote paths (`name` alone at the root).
fn remote_join(dir: &str, name: &str) -> String {
    let dir = dir.trim_end_matches('/');
    if dir.is_empty() || dir == "." {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// The last component of a remote path, if it has one usable as a local name.
fn remote_name(path: &str) -> Option<&str> {
    let name = path.trim_end_matches('/').rsplit('/').next()?;
    (!name.is_empty() && name != "." && name != "..").then_some(name)
}

/// One file to copy: remote path, where it goes (relative to the destination), its size.
#[derive(Debug)]
struct Item {
    remote: String,
    rel: PathBuf,
    size: u64,
    /// Modification time as listed (seconds since the Unix epoch): with the peer, the path
    /// and the size, what ties a partial download to the file it is part of.
    mtime: i64,
}

/// What one `get` copies: files, and the directories to create first (relative).
#[derive(Debug, Default)]
struct Plan {
    files: Vec<Item>,
    dirs: Vec<PathBuf>,
    notes: Vec<String>,
    /// Whether a directory or several files are copied (LOCAL must then be a directory).
    many: bool,
}

impl Plan {
    fn add_file(&mut self, remote: String, rel: PathBuf, entry: &Entry) -> anyhow::Result<()> {
        if self.files.len() >= MAX_TREE_FILES {
            bail!("more than {MAX_TREE_FILES} files; copy a smaller directory");
        }
        self.files.push(Item {
            remote,
            rel,
            size: entry.size,
            mtime: entry.mtime,
        });
        Ok(())
    }

    /// Adds `remote` (described by `entry`) under the local relative path `rel`.
    #[allow(clippy::too_many_arguments)] // the walk's context; a struct would only rename it
    async fn add(
        &mut self,
        peer: &Peer,
        p: &str,
        remote: String,
        entry: &Entry,
        rel: PathBuf,
        flags: GetFlags,
        depth: usize,
    ) -> anyhow::Result<()> {
        match entry.kind {
            Kind::File => self.add_file(remote, rel, entry),
            Kind::Dir if !flags.recursive => {
                bail!("{p}:{remote} is a directory; use get -r to copy it with its content")
            }
            Kind::Dir => {
                if depth >= MAX_TREE_DEPTH {
                    bail!("{p}:{remote} is more than {MAX_TREE_DEPTH} directories deep");
                }
                self.many = true;
                self.dirs.push(rel.clone());
                let listing = peer.ls(p, &remote).await?;
                if listing.truncated {
                    self.notes.push(format!(
                        "{remote}: more entries than one listing holds; copied the first ones"
                    ));
                }
                for e in &listing.entries {
                    let child = remote_join(&remote, &e.name);
                    let child_rel = rel.join(&e.name);
                    match e.kind {
                        Kind::File | Kind::Dir => {
                            Box::pin(self.add(peer, p, child, e, child_rel, flags, depth + 1))
                                .await?
                        }
                        Kind::Symlink => {
                            // Follow links to files; never links to directories (no loops).
                            match peer.stat(p, &child).await {
                                Ok(t) if t.kind == Kind::File => {
                                    self.add_file(child, child_rel, &t)?
                                }
                                _ => self.notes.push(format!(
                                    "skipped {child}: a link to something other than a file"
                                )),
                            }
                        }
                        other => self
                            .notes
                            .push(format!("skipped {child}: a {}", other.describe())),
                    }
                }
                Ok(())
            }
            other => bail!(
                "{p}:{remote} is a {}; only regular files can be copied",
                other.describe()
            ),
        }
    }
}

/// Expands the paths (globs, directories with -r) into a [`Plan`].
async fn plan(peer: &Peer, p: &str, paths: &[String], flags: GetFlags) -> anyhow::Result<Plan> {
    let mut plan = Plan {
        many: paths.len() > 1,
        ..Plan::default()
    };
    for path in paths {
        let (dir, last) = match path.trim_end_matches('/').rsplit_once('/') {
            Some((d, l)) => (d, l),
            None => ("", path.as_str()),
        };
        if is_glob(last) && !is_glob(dir) {
            plan.many = true;
            let listing = peer.ls(p, dir).await?;
            let matches: Vec<&Entry> = listing
                .entries
                .iter()
                .filter(|e| glob_match(last, &e.name))
                .collect();
            if matches.is_empty() {
                bail!("nothing on {p} matches {path}");
            }
            for e in matches {
                let remote = remote_join(dir, &e.name);
                // Like scp: a directory among the matches is skipped (with a word), not fatal.
                if e.kind == Kind::Dir && !flags.recursive {
                    plan.notes
                        .push(format!("skipped {remote}: a directory (use get -r)"));
                    continue;
                }
                let e = if e.kind == Kind::Symlink {
                    peer.stat(p, &remote).await?
                } else {
                    e.clone()
                };
                let rel = PathBuf::from(&e.name.rsplit('/').next().unwrap_or(&e.name));
                let rel = if rel.as_os_str().is_empty() {
                    PathBuf::from(remote_name(&remote).unwrap_or("file"))
                } else {
                    rel
                };
                plan.add(peer, p, remote, &e, rel, flags, 0).await?;
            }
        } else if is_glob(path) {
            bail!("{path}: a pattern may only be in the last part of the path");
        } else {
            let entry = peer.stat(p, path).await?;
            let name = remote_name(path)
                .with_context(|| format!("cannot name a local copy of {path:?}; give LOCAL"))?;
            plan.add(peer, p, path.clone(), &entry, PathBuf::from(name), flags, 0)
                .await?;
        }
    }
    if plan.files.is_empty() && plan.dirs.is_empty() {
        bail!("nothing to copy: {} names no file on {p}", paths.join(" "));
    }
    Ok(plan)
}

/// `get`: copies what `paths` name on `p` to `local`, verified, resumable.
async fn get(
    peer: &Peer,
    p: &str,
    paths: &[String],
    local: Local,
    flags: GetFlags,
    ui: &Ui,
) -> anyhow::Result<()> {
    let plan = plan(peer, p, paths, flags).await?;
    for note in &plan.notes {
        eprintln!("note: {note}");
    }
    let local = match local {
        // Raw bytes would drive the terminal (escape sequences): read is the safe viewer.
        Local::Stdout if ui.terminal => bail!(
            "get ... - writes raw bytes; not to a terminal (use read to view a text file, or \
             run share with its output redirected)"
        ),
        Local::Stdout => {
            let mut out = tokio::io::stdout();
            // Bounded by the plan.
            for item in &plan.files {
                let mut s = peer.read(p, &item.remote).await?;
                while let Some(chunk) = s.next().await? {
                    out.write_all(&chunk.data).await?;
                }
            }
            out.flush().await?;
            return Ok(());
        }
        Local::Default => None,
        Local::Path(l) => Some(expand_tilde(&l)),
    };
    // Where each file goes: into an existing directory under the remote names, or (one file,
    // or `get -r bob sub newdir`) as LOCAL itself. Checked before the first byte moves.
    let (base, single_target) = match local {
        // Relative names as typed: "saved 12 bytes to hello.txt".
        None => (PathBuf::new(), false),
        Some(l) if l.is_dir() => (l, false),
        // `downloads/dir/` names a directory: one that does not exist, or a file, is an
        // error, never a file called `dir`.
        // (Its components, so that the trailing slash does not make a file an error.)
        Some(l) if names_a_directory(&l) => match std::fs::metadata(l.components().as_path()) {
            Ok(_) => bail!("cannot save into {}: not a directory", l.display()),
            Err(_) => bail!(
                "cannot save into {}: no such directory (create it first)",
                l.display()
            ),
        },
        Some(l) if !plan.many => (l, true),
        Some(l) if paths.len() == 1 && !plan.dirs.is_empty() && !is_glob(&paths[0]) => (l, true),
        Some(l) => bail!(
            "{} is not a directory; copying several files needs an existing directory",
            l.display()
        ),
    };
    // For `get -r bob sub newdir`, strip the first component (sub) from every relative path.
    let target_of = |rel: &Path| -> PathBuf {
        if !single_target {
            return base.join(rel);
        }
        let mut c = rel.components();
        c.next();
        if c.as_path().as_os_str().is_empty() {
            base.clone()
        } else {
            base.join(c.as_path())
        }
    };
    let parent_check = |target: &Path| -> anyhow::Result<()> {
        let parent = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        match std::fs::metadata(&parent) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => bail!(
                "cannot save to {}: {} is not a directory",
                target.display(),
                parent.display()
            ),
            Err(_) => bail!(
                "cannot save to {}: directory {} does not exist",
                target.display(),
                parent.display()
            ),
        }
    };
    let created_dirs: Vec<PathBuf> = plan.dirs.iter().map(|d| target_of(d)).collect();
    let mut targets = Vec::with_capacity(plan.files.len());
    for item in &plan.files {
        let target = target_of(&item.rel);
        if !created_dirs
            .iter()
            .any(|d| Some(d.as_path()) == target.parent())
        {
            parent_check(&target)?;
        }
        if !flags.force && std::fs::symlink_metadata(&target).is_ok() {
            bail!(
                "{} already exists; use get -f to overwrite it",
                target.display()
            );
        }
        if std::fs::metadata(&target).is_ok_and(|m| m.is_dir()) {
            bail!("{} is a directory; not overwritten", target.display());
        }
        targets.push(target);
    }
    if let Some(first) = created_dirs.first() {
        parent_check(first)?;
    }
    for d in &created_dirs {
        std::fs::create_dir_all(d)
            .with_context(|| format!("cannot create directory {}", d.display()))?;
    }
    let total: u64 = plan.files.iter().map(|i| i.size).sum();
    let bar = ui.progress.then(|| progress_bar(total));
    let started = std::time::Instant::now();
    let mut done: u64 = 0;
    let mut saved = Vec::new();
    for (item, target) in plan.files.iter().zip(&targets) {
        let n = get_one(peer, p, item, target, flags.force, ui, bar.as_ref(), done).await?;
        done += n;
        saved.push((n, target.clone()));
    }
    if let Some(bar) = bar {
        let took = started.elapsed().as_secs_f64();
        bar.println(format!(
            "{} in {took:.1} s ({}/s)",
            command::human_size(done),
            command::human_size((done as f64 / took.max(1e-3)) as u64)
        ));
        bar.finish_and_clear();
    }
    let mut text = String::new();
    if saved.len() == 1 && plan.dirs.is_empty() {
        text.push_str(&format!(
            "saved {} bytes to {} (verified)\n",
            saved[0].0,
            saved[0].1.display()
        ));
    } else {
        text.push_str(&format!(
            "saved {} file{}, {} bytes, to {} (verified)\n",
            saved.len(),
            if saved.len() == 1 { "" } else { "s" },
            done,
            if base.as_os_str().is_empty() {
                Path::new(".").display()
            } else {
                base.display()
            }
        ));
    }
    let mut out = tokio::io::stdout();
    out.write_all(text.as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

/// Whether the local path as typed can only mean a directory (`dir/`, `.`, `..`).
fn names_a_directory(l: &Path) -> bool {
    let text = l.as_os_str().as_encoded_bytes();
    text.ends_with(b"/")
        || matches!(
            l.components().next_back(),
            Some(std::path::Component::CurDir | std::path::Component::ParentDir)
        )
}

/// The partial file of a download into `target`: hidden, next to it, stable across runs (so
/// that running the same get again resumes).
fn partial_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map_or_else(|| "download".into(), |n| n.to_string_lossy().into_owned());
    target.with_file_name(format!(".{name}.share-part"))
}

/// The file next to a partial download that says what it is part of (see [`identity`]).
fn identity_path(part: &Path) -> PathBuf {
    let mut name = part.as_os_str().to_owned();
    name.push(".id");
    PathBuf::from(name)
}

/// What a partial download is part of: the peer, the remote path, and the file's size and
/// modification time as listed. A partial is resumed only for the same identity.
fn identity(peer: &str, item: &Item) -> String {
    format!(
        "share partial download\npeer {peer:?}\npath {:?}\nsize {}\nmtime {}\n",
        item.remote, item.size, item.mtime
    )
}

/// Removes a partial download and its identity file.
fn remove_partial(part: &Path) {
    let _ = std::fs::remove_file(part);
    let _ = std::fs::remove_file(identity_path(part));
}

/// Removes the partial file (and its identity) on drop if nothing was received (so a cancel
/// right away leaves nothing behind); a partial with content stays for resume.
struct EmptyPartial(PathBuf);

impl Drop for EmptyPartial {
    fn drop(&mut self) {
        if std::fs::metadata(&self.0).map_or(true, |m| m.len() == 0) {
            remove_partial(&self.0);
        }
    }
}

/// Appends `data` to a partial download. On the calling worker thread (tokio's
/// `block_in_place`, the runtime moves other tasks away): one `write` per chunk straight from
/// the received buffer, which is then free for the next frame. Buffered or queued writes
/// would copy each chunk or keep its frame buffer alive, so that every frame needs fresh
/// pages the kernel must zero (measured: twice the system time of the whole get).
fn append(file: &mut std::fs::File, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
            tokio::task::block_in_place(|| file.write_all(data))
        }
        _ => file.write_all(data),
    }
}

/// Hashes an existing partial file (blocking pool): its length and SHA-256 context.
async fn hash_partial(part: &Path) -> std::io::Result<(u64, ring::digest::Context)> {
    let part = part.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut f = std::fs::File::open(&part)?;
        let mut ctx = crate::proto::new_hasher();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        // Bounded by the file's length.
        loop {
            let got = f.read(&mut buf)?;
            if got == 0 {
                return Ok((n, ctx));
            }
            ctx.update(&buf[..got]);
            n += got as u64;
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Copies one file into `target` through its partial file; returns the bytes in the copy.
#[allow(clippy::too_many_arguments)]
async fn get_one(
    peer: &Peer,
    p: &str,
    item: &Item,
    target: &Path,
    force: bool,
    ui: &Ui,
    bar: Option<&ProgressBar>,
    before: u64,
) -> anyhow::Result<u64> {
    let remote = item.remote.as_str();
    let part = partial_path(target);
    let id_file = identity_path(&part);
    let id = identity(p, item);
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let say = |msg: String| match bar {
        Some(bar) => bar.println(msg),
        None => eprintln!("{msg}"),
    };
    let had_partial = std::fs::symlink_metadata(&part).is_ok_and(|m| m.is_file() && m.len() > 0);
    let same_file = std::fs::read_to_string(&id_file).is_ok_and(|text| text == id);
    if had_partial && !same_file {
        // Never resume from bytes of another file, or of another version of this one.
        remove_partial(&part);
        say(format!(
            "discarded the partial download of {}: it was of another file or version of \
             {p}:{remote}; starting over",
            target.display()
        ));
    }
    let (offset, prefix) = if had_partial && same_file {
        hash_partial(&part)
            .await
            .with_context(|| format!("cannot read the partial download of {}", target.display()))?
    } else {
        (0, crate::proto::new_hasher())
    };
    let resumed = offset > 0;
    std::fs::write(&id_file, &id).with_context(|| format!("cannot save into {}", dir.display()))?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&part)
        .with_context(|| format!("cannot save into {}", dir.display()))?;
    let _empty = EmptyPartial(part.clone());
    ui.set_partial(Some(part.clone()));
    if resumed {
        say(format!(
            "resuming {} at {} (already received)",
            target.display(),
            command::human_size(offset)
        ));
    }
    let name = target
        .file_name()
        .map_or_else(|| remote.to_owned(), |n| n.to_string_lossy().into_owned());
    if let Some(bar) = bar {
        bar.set_message(name.clone());
    }
    let result = async {
        let mut stream = peer.read_from(p, remote, offset, prefix).await?;
        let mut total = offset;
        let mut meta = None;
        let mut waiting = false;
        // Bounded by the file: one chunk per iteration until the eof chunk (the stream
        // itself gives up on a silence longer than its chunk timeout).
        loop {
            let next = match bar {
                Some(bar) => {
                    let next = stream.next();
                    tokio::pin!(next);
                    // Bounded: the stream gives up on a silence of its chunk timeout.
                    loop {
                        tokio::select! {
                            next = &mut next => break next,
                            () = tokio::time::sleep(STALL_NOTICE), if !waiting => {
                                waiting = true;
                                bar.set_message(format!("{name}: waiting for {p}"));
                            }
                        }
                    }
                }
                None => stream.next().await,
            };
            let Some(chunk) = next? else { break };
            if std::mem::take(&mut waiting) {
                if let Some(bar) = bar {
                    bar.set_message(name.clone());
                }
            }
            total += chunk.data.len() as u64;
            meta = Some((chunk.mode, chunk.mtime, chunk.mtime_nanos));
            append(&mut file, &chunk.data)
                .with_context(|| format!("cannot write {}", target.display()))?;
            if let Some(bar) = bar {
                bar.set_position(before + total);
            }
        }
        anyhow::Ok((total, meta))
    }
    .await;
    let (total, meta) = match result {
        Ok(r) => r,
        Err(e) => {
            let bad_copy = e.downcast_ref::<CallError>().is_some_and(|c| match c {
                CallError::Corrupt { .. } => true,
                CallError::Status(s) => s.code() == Code::Aborted,
                _ => false,
            });
            if bad_copy {
                drop(file);
                remove_partial(&part);
                ui.set_partial(None);
                let also = if resumed {
                    " (the partial download was of an older version)"
                } else {
                    ""
                };
                return Err(e.context(format!(
                    "nothing saved{also}; run get again for a fresh copy"
                )));
            }
            let kept = std::fs::metadata(&part).map_or(0, |m| m.len());
            if kept > 0 {
                return Err(e.context(format!(
                    "{} of {} kept for resume: run the same get again",
                    command::human_size(kept),
                    target.display()
                )));
            }
            return Err(e.context("nothing saved"));
        }
    };
    if let Some((mode, secs, nanos)) = meta {
        // Permission bits without set-id and sticky bits; the modification time as sent.
        use std::os::unix::fs::PermissionsExt;
        let _ = file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777));
        let t = if secs >= 0 {
            std::time::UNIX_EPOCH + Duration::new(secs as u64, nanos)
        } else {
            std::time::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        };
        let _ = file.set_modified(t);
    }
    drop(file);
    install(&part, target, force)?;
    let _ = std::fs::remove_file(&id_file);
    ui.set_partial(None);
    Ok(total)
}

/// Gives the verified partial file its final name: atomically replacing with `force`, else
/// never over a file that appeared meanwhile.
fn install(part: &Path, target: &Path, force: bool) -> anyhow::Result<()> {
    if force {
        return std::fs::rename(part, target)
            .with_context(|| format!("cannot create {}", target.display()));
    }
    match std::fs::hard_link(part, target) {
        Ok(()) => {
            let _ = std::fs::remove_file(part);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!(
                "{} appeared meanwhile; not overwritten (the copy is kept for resume: use get -f)",
                target.display()
            )
        }
        // File systems without hard links: rename (which would replace a file created in
        // the last instant; checked just before).
        Err(_) => {
            if std::fs::symlink_metadata(target).is_ok() {
                bail!("{} appeared meanwhile; not overwritten", target.display());
            }
            std::fs::rename(part, target)
                .with_context(|| format!("cannot create {}", target.display()))
        }
    }
}

fn progress_bar(size: u64) -> ProgressBar {
    // Cleared when dropped, so a cancelled get leaves no frozen half bar.
    let bar = ProgressBar::new(size).with_finish(ProgressFinish::AndClear);
    // Redrawn every second even when no byte arrives, so that a stalled transfer's rate
    // is seen falling.
    bar.enable_steady_tick(Duration::from_secs(1));
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} {bytes:>10}/{total_bytes} {binary_bytes_per_sec:>12} ETA {eta:>4} [{wide_bar}]",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Reads commands from a non-terminal stdin until EOF or `quit`. Returns whether every
/// command succeeded.
pub(crate) async fn run_script(peer: &Peer, me: &Me) -> bool {
    let ui = Ui {
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

fn prompt(me: &Me, connected: bool) -> String {
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
    fn globs_match_like_a_shell() {
        assert!(glob_match("*.txt", "a.txt"));
        assert!(!glob_match("*.txt", "a.txt.bak"));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("[ab]*", "bob"));
        assert!(!glob_match("[!ab]*", "bob"));
        assert!(glob_match("[a-c]x", "bx"));
        assert!(glob_match("*", "with space.txt"));
        assert!(!glob_match("*", ".hidden"));
        assert!(glob_match(".*", ".hidden"));
        assert!(glob_match("**a*b*", "xxaxxbxx"));
        assert!(!glob_match("*a*b", "xxaxxbxx"));
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

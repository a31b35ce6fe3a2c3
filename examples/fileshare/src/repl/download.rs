//! `get`: what to copy (files, globs, trees), partial files kept for resume, the checked
//! copy itself, installing the result, and the progress bar.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use indicatif::{ProgressBar, ProgressFinish, ProgressStyle};
use netchan_rpc::Code;
use tokio::io::AsyncWriteExt;

use super::glob::{glob_match, is_glob};
use super::{expand_tilde, Ui};
use crate::client::{CallError, Peer};
use crate::command::{self, GetFlags, Local};
use crate::proto::{Entry, Kind};

/// How long a `get` on a terminal waits for the next chunk before its progress bar says it is
/// waiting for the peer.
const STALL_NOTICE: Duration = Duration::from_secs(2);

/// Most files one `get -r` or glob copies, and deepest directory it descends into.
const MAX_TREE_FILES: usize = 100_000;
const MAX_TREE_DEPTH: usize = 64;

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
pub(super) async fn get(
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
            // What the REPL printed before stays before the file's bytes.
            std::io::Write::flush(&mut std::io::stdout())?;
            let mut direct = direct_stdout();
            let mut out = tokio::io::stdout();
            // Bounded by the plan.
            for item in &plan.files {
                let mut s = peer.read(p, &item.remote).await?;
                while let Some(chunk) = s.next().await? {
                    match direct.as_mut() {
                        Some(file) => append(file, &chunk.data)?,
                        None => out.write_all(&chunk.data).await?,
                    }
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
        bar.println(summary(done, started.elapsed()));
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

/// stdout for `get -`, written like a download's file (one `write` per chunk straight from
/// the received buffer, see [`append`]) when it is a file or a device such as `/dev/null`,
/// where a write never waits for a reader. `None` for a pipe or a socket, whose reader may
/// stall: those go through tokio's stdout, so that Ctrl-C can still cancel the `get`. Saves
/// tokio's copy of every chunk and its hand-off to a blocking thread (and std's line buffer
/// splitting each chunk in two writes at its last newline).
fn direct_stdout() -> Option<std::fs::File> {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::FileTypeExt as _;
    let file = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned().ok()?);
    let kind = file.metadata().ok()?.file_type();
    (kind.is_file() || kind.is_char_device()).then_some(file)
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

/// Reserves the disk blocks of the `len` bytes still to come after `offset`, keeping the
/// file's length (so a partial file's length is still exactly what was received). ext4 then
/// writes each chunk into blocks already allocated instead of reserving them page by page
/// (delayed allocation's per-page bookkeeping): measured, the client's `write` time per GiB
/// fell from 0.21–0.29 to 0.10–0.17 core-s.
/// Only a hint: a file system that cannot preallocate (or a full disk, which the writes then
/// report) is written as before.
fn preallocate(file: &std::fs::File, offset: u64, len: u64) {
    use rustix::fs::{fallocate, FallocateFlags};
    if len == 0 {
        return;
    }
    if let Err(e) = fallocate(file, FallocateFlags::KEEP_SIZE, offset, len) {
        tracing::debug!(offset, len, error = %e, "could not preallocate the download");
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
        bar.set_message(bar_message(&name, p, false));
    }
    let result = async {
        let mut stream = peer.read_from(p, remote, offset, prefix).await?;
        let mut total = offset;
        let mut meta = None;
        // Bounded by the file: one chunk per iteration until the eof chunk (the stream
        // itself gives up on a silence longer than its chunk timeout).
        loop {
            let next = match bar {
                Some(bar) => {
                    let mut stalled = false;
                    let next = noting_stall(stream.next(), || {
                        stalled = true;
                        bar.set_message(bar_message(&name, p, true));
                    })
                    .await;
                    if stalled {
                        bar.set_message(bar_message(&name, p, false));
                    }
                    next
                }
                None => stream.next().await,
            };
            let Some(chunk) = next? else { break };
            if meta.is_none() {
                // The first chunk announces the file's size as the exporter opened it.
                preallocate(&file, total, chunk.size.saturating_sub(total));
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
pub(super) fn install(part: &Path, target: &Path, force: bool) -> anyhow::Result<()> {
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

/// What the progress bar says while `name` is copied from `peer`: the file's name, and once
/// nothing has arrived for [`STALL_NOTICE`] (`stalled`), that the copy waits for the peer.
/// Meanwhile the bar's steady tick shows the rate falling.
fn bar_message(name: &str, peer: &str, stalled: bool) -> String {
    if stalled {
        format!("{name}: waiting for {peer}")
    } else {
        name.to_owned()
    }
}

/// The last line of a `get` shown with a progress bar: how much, in how long, at what rate.
fn summary(bytes: u64, took: Duration) -> String {
    let secs = took.as_secs_f64();
    format!(
        "{} in {secs:.1} s ({}/s)",
        command::human_size(bytes),
        command::human_size((bytes as f64 / secs.max(1e-3)) as u64)
    )
}

/// Awaits `next`; if it has not resolved within [`STALL_NOTICE`], calls `stalled` once and
/// keeps waiting (the caller's own bound, the stream's chunk timeout, ends the wait).
async fn noting_stall<T>(next: impl std::future::Future<Output = T>, stalled: impl FnOnce()) -> T {
    tokio::pin!(next);
    tokio::select! {
        item = &mut next => return item,
        () = tokio::time::sleep(STALL_NOTICE) => stalled(),
    }
    next.await
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 22: a stalled transfer says so (naming the file and the peer) after
    /// [`STALL_NOTICE`] of silence, once, and not before.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_copy_says_it_waits_for_the_peer_after_the_notice_and_only_then() {
        let mut said = Vec::new();
        // A chunk that comes in time: nothing said.
        let quick = noting_stall(
            async {
                tokio::time::sleep(STALL_NOTICE / 2).await;
                1
            },
            || said.push(bar_message("big.iso", "bob", true)),
        )
        .await;
        assert_eq!(quick, 1);
        assert!(said.is_empty(), "{said:?}");
        // A chunk that takes 10 s: said once, at the notice, and the chunk still arrives.
        let start = tokio::time::Instant::now();
        let mut at = None;
        let slow = noting_stall(
            async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                2
            },
            || {
                at = Some(start.elapsed());
                said.push(bar_message("big.iso", "bob", true));
            },
        )
        .await;
        assert_eq!(slow, 2);
        assert_eq!(at, Some(STALL_NOTICE));
        assert_eq!(said, vec!["big.iso: waiting for bob".to_owned()]);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        // Once data flows again the bar names the file alone.
        assert_eq!(bar_message("big.iso", "bob", false), "big.iso");
    }

    /// A partial download's length is what was received, also with the rest of the file's
    /// blocks reserved ahead (resume and "kept for resume" read that length).
    #[test]
    fn preallocating_a_download_keeps_its_length_to_the_bytes_received() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        append(&mut file, b"hello").unwrap();
        preallocate(&file, 5, 1 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 5);
        append(&mut file, b" world").unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        // Nothing to reserve is no call at all.
        preallocate(&std::fs::File::open(&path).unwrap(), 11, 0);
    }

    #[test]
    fn the_last_line_gives_size_time_and_rate() {
        let line = summary(10 << 20, Duration::from_secs(4));
        assert!(line.contains("in 4.0 s"), "{line}");
        assert!(line.ends_with("/s)"), "{line}");
        assert!(
            line.contains(&format!("({}/s)", command::human_size(10 << 20 >> 2))),
            "{line}"
        );
        // No time at all is no division by zero.
        assert!(summary(5, Duration::ZERO).contains("in 0.0 s"));
    }
}

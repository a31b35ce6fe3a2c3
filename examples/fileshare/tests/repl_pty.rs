//! The terminal REPL, driven through a pseudo-terminal made by util-linux `script`: the prompt,
//! tab completion (commands, peers, quoted remote paths, local paths), `list`, safe `read`,
//! peers joining and leaving, Ctrl-C during `get`, and Ctrl-D or `exit` leaving with 0.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Everything the terminal showed, gathered from `script`'s stdout by a thread.
struct Screen {
    rx: Receiver<Vec<u8>>,
    seen: Vec<u8>,
    /// Where the next search starts: each expectation is met by output after the previous one.
    cursor: usize,
}

impl Screen {
    fn new(mut r: impl Read + Send + 'static) -> Screen {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends when the pty closes (the REPL exited) or the test is gone.
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Screen {
            rx,
            seen: Vec::new(),
            cursor: 0,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// The last lines the terminal showed, one per line and escaped, for a failure message
    /// that stays readable when a log viewer folds long lines.
    fn tail(&self) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.split('\n').collect();
        let from = lines.len().saturating_sub(24);
        lines[from..]
            .iter()
            .map(|l| format!("  | {:?}", l.trim_end_matches('\r')))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits up to `limit` for `needle` to appear after the cursor; moves the cursor past it.
    fn expect(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = find(&self.seen[self.cursor..], needle.as_bytes()) {
                self.cursor += i + needle.len();
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(bytes) => self.seen.extend_from_slice(&bytes),
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no {needle:?} on the terminal within {limit:?}; it showed last:\n{}",
                        self.tail()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "the terminal closed before {needle:?}; it showed last:\n{}",
                        self.tail()
                    )
                }
            }
        }
    }

    /// Waits up to `limit` for the terminal to close (the REPL exited).
    fn expect_end(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(bytes) => self.seen.extend_from_slice(&bytes),
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "the REPL is still running after {limit:?}; it showed last:\n{}",
                        self.tail()
                    )
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `s` quoted for `sh -c`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn have_script() -> bool {
    Command::new("sh")
        .args(["-c", "command -v script"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What the shell around the REPL prints when it ends: share's own exit status.
const EXITED_0: &str = "[share exited with 0]";

/// Starts alice's REPL on a pseudo-terminal, exporting `root`, with `home` as $HOME.
///
/// `script` runs a shell that runs share and then prints share's exit status on the terminal
/// (see [`EXITED_0`]), so a test reads the status of share itself, whatever `script` makes of
/// it, next to anything share printed before it ended. The shell ignores the Ctrl-C meant for
/// share (`trap`; share itself starts with the default disposition, as from a user's shell).
fn spawn_repl(addr: &str, root: &std::path::Path, home: &std::path::Path) -> Proc {
    let share_cmd = [
        env!("CARGO_BIN_EXE_share"),
        "--name",
        "alice",
        "--root",
        s(root),
        addr,
    ]
    .map(sh_quote)
    .join(" ");
    let shell_cmd = format!("trap : INT; {share_cmd}; echo \"[share exited with $?]\"");
    // -q quiet, -f flush at once, -e exit with the command's status, -c the command; the
    // typescript goes to /dev/null, the terminal's output to our stdout.
    let child = Command::new("script")
        .args(["-qfec", &shell_cmd, "/dev/null"])
        .env("SHELL", "/bin/sh")
        .env_remove("SHARE_TOKEN")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        // A terminal rustyline supports (with TERM=dumb it falls back to plain reads).
        .env("TERM", "xterm")
        // History goes to a scratch home, not the user's.
        .env("HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn script");
    Proc {
        child,
        name: "script".into(),
    }
}

#[test]
fn the_terminal_repl_prompts_completes_commands_and_peers_lists_and_exits_on_ctrl_d() {
    if !have_script() {
        eprintln!(
            "skipping the_terminal_repl_...: util-linux `script` is not installed, so no \
             pseudo-terminal can be made"
        );
        return;
    }
    let hub = start_hub(&[]);
    let (rb, ra, home) = (demo_root(), tempdir(), tempdir());
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let mut repl = spawn_repl(&hub.addr, ra.path(), home.path());
    let mut keys = stdin_of(&mut repl);
    let mut screen = Screen::new(repl.child.stdout.take().unwrap());
    let mut type_keys = |k: &str| {
        keys.write_all(k.as_bytes()).unwrap();
        keys.flush().unwrap();
    };
    // Keys typed before rustyline takes the terminal would be echoed by the line discipline
    // and read by nobody: wait for the prompt first.
    screen.expect("as alice", WAIT);
    screen.expect("> ", WAIT);
    // `li<TAB>` completes to `list ` (the line is redrawn with it); Enter runs it.
    type_keys("li\t");
    screen.expect("> list ", WAIT);
    type_keys("\r");
    screen.expect("alice (you)\r\nbob\r\n", WAIT);
    screen.expect("> ", WAIT);
    // `read b<TAB>` completes the peer name (asked from the hub).
    type_keys("read b\t");
    screen.expect("> read bob ", WAIT);
    type_keys("hello.txt\r");
    screen.expect("hello world\r\n", WAIT);
    screen.expect("> ", WAIT);
    // Ctrl-D on an empty line leaves with status 0.
    type_keys("\x04");
    screen.expect(EXITED_0, WAIT);
    screen.expect_end(WAIT);
    repl.reap();
    assert!(
        !screen.text().contains("error"),
        "no command failed; it showed last:\n{}",
        screen.tail()
    );
}

#[test]
fn the_terminal_repl_is_safe_and_aware_and_cancels_a_get_cleanly() {
    if !have_script() {
        eprintln!("skipping: util-linux `script` is not installed, so no pseudo-terminal");
        return;
    }
    let hub = start_hub(&[]);
    let (rb, ra, home) = (demo_root(), tempdir(), tempdir());
    std::fs::write(rb.path().join("with space.txt"), "spaced\n").unwrap();
    std::fs::write(rb.path().join("it's.txt"), "quoted\n").unwrap();
    std::fs::write(rb.path().join("esc.txt"), b"\x1b[31mred\x07 text\n").unwrap();
    std::fs::write(rb.path().join("bin.dat"), b"\x7fELF\x02\x01\x01\0\0\0").unwrap();
    // Sparse: large without using disk; the get is cancelled long before the end.
    std::fs::File::create(rb.path().join("big.bin"))
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    std::fs::write(rb.path().join("long.txt"), "line\n".repeat(20 * 1024)).unwrap();
    std::fs::create_dir(ra.path().join("downloads")).unwrap();
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let mut repl = spawn_repl(&hub.addr, ra.path(), home.path());
    let mut keys = stdin_of(&mut repl);
    let mut screen = Screen::new(repl.child.stdout.take().unwrap());
    let mut type_keys = |k: &str| {
        keys.write_all(k.as_bytes()).unwrap();
        keys.flush().unwrap();
    };
    // The person at the terminal is warned, and the prompt says who and where.
    screen.expect("plaintext and unauthenticated", WAIT);
    let prompt = format!("alice@{} (online)> ", hub.addr);
    screen.expect(&prompt, WAIT);
    // Completion quotes what it completes, so the command then works.
    type_keys("read bob wi\t");
    screen.expect("read bob 'with space.txt' ", WAIT);
    type_keys("\r");
    screen.expect("spaced\r\n", WAIT);
    screen.expect(&prompt, WAIT);
    type_keys("read bob it\t");
    screen.expect("read bob \"it's.txt\" ", WAIT);
    type_keys("\r");
    screen.expect("quoted\r\n", WAIT);
    screen.expect(&prompt, WAIT);
    // Escape sequences from a file are shown, not obeyed; binary content is refused.
    type_keys("read bob esc.txt\r");
    screen.expect("\\x1b[31mred\\x07 text\r\n", WAIT);
    screen.expect(&prompt, WAIT);
    type_keys("read bob bin.dat\r");
    screen.expect(
        "looks like a binary file; not printed to the terminal (use: get bob bin.dat)",
        WAIT,
    );
    screen.expect(&prompt, WAIT);
    assert!(
        !screen.text().contains("\u{1b}[31mred"),
        "the escape sequence reached the terminal; it showed last:\n{}",
        screen.tail()
    );
    // At most 64 KiB of a long file, and a pointer to the rest.
    type_keys("read bob long.txt\r");
    screen.expect(
        "(showing the first 64 KiB of 100 KiB; use get to save the whole file)",
        WAIT,
    );
    screen.expect(&prompt, WAIT);
    type_keys("get bob esc.txt -\r");
    screen.expect("writes raw bytes; not to a terminal", WAIT);
    screen.expect(&prompt, WAIT);
    // get's LOCAL completes local paths.
    let local_dir = ra.path().join("downloads");
    type_keys(&format!("get bob hello.txt {}/dow\t", s(ra.path())));
    screen.expect(&format!("{}/", s(&local_dir)), WAIT);
    type_keys("\r");
    screen.expect(
        &format!("saved 12 bytes to {}/hello.txt (verified)", s(&local_dir)),
        WAIT,
    );
    screen.expect(&prompt, WAIT);
    // Peers joining and leaving are announced between commands.
    let rc = demo_root();
    let mut carol = start_server(&hub.addr, "carol", rc.path(), &[]);
    screen.expect("share: carol joined", WAIT);
    carol.proc.kill();
    screen.expect("share: carol left", WAIT);
    // Who reads what is shown on the sharer's terminal.
    std::fs::write(ra.path().join("note.txt"), "from alice\n").unwrap();
    let rd = tempdir();
    let out = run_script(&hub.addr, "dave", rd.path(), "read alice note.txt\n");
    assert_eq!(out.out(), "from alice\n", "{out:?}");
    screen.expect("share: \"dave\" reads note.txt (11 bytes)", WAIT);
    // Ctrl-C during a get: cancelled, the bar cleared, and a clear word on what is left.
    type_keys(&format!("get bob big.bin {}\r", s(ra.path())));
    screen.expect("ETA", WAIT);
    type_keys("\x03");
    screen.expect("cancelled; ", WAIT);
    screen.expect(&prompt, WAIT);
    let part = ra.path().join(".big.bin.share-part");
    let text = screen.text();
    if text.contains("partial file kept for resume") {
        assert!(std::fs::metadata(&part).unwrap().len() > 0);
    } else {
        assert!(
            text.contains("cancelled; nothing saved"),
            "{}",
            screen.tail()
        );
        assert!(!part.exists());
    }
    assert!(!ra.path().join("big.bin").exists());
    assert!(!text.contains("error: interrupted"), "{}", screen.tail());
    // `exit` is in help, and leaves with 0.
    type_keys("help\r");
    screen.expect("  exit ", WAIT);
    screen.expect(&prompt, WAIT);
    type_keys("exit\r");
    screen.expect(EXITED_0, WAIT);
    screen.expect_end(WAIT);
    repl.reap();
}

#[test]
fn the_prompt_shows_offline_and_online_as_the_link_changes_without_a_key_pressed() {
    if !have_script() {
        eprintln!("skipping: util-linux `script` is not installed, so no pseudo-terminal");
        return;
    }
    let addr = format!("127.0.0.1:{}", free_fixed_port());
    let mut hub = start_hub_at(&addr, &[]);
    let (ra, home) = (tempdir(), tempdir());
    let mut repl = spawn_repl(&addr, ra.path(), home.path());
    let mut keys = stdin_of(&mut repl);
    let mut screen = Screen::new(repl.child.stdout.take().unwrap());
    screen.expect(&format!("alice@{addr} (online)> "), WAIT);
    // The hub goes: the prompt says so at once, with nothing typed.
    hub.proc.kill();
    screen.expect(&format!("alice@{addr} (offline)>"), WAIT);
    // It comes back: so does the prompt.
    let _hub = start_hub_at(&addr, &[]);
    screen.expect(&format!("alice@{addr} (online)> "), WAIT);
    keys.write_all(b"\x04").unwrap();
    keys.flush().unwrap();
    screen.expect(EXITED_0, WAIT);
    screen.expect_end(WAIT);
    repl.reap();
}

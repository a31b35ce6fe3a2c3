//! The terminal REPL, driven through a pseudo-terminal made by util-linux `script`: the prompt,
//! tab completion of a command and of a peer name, `list`, and Ctrl-D exiting 0.

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
                        "no {needle:?} on the terminal within {limit:?}; saw {:?}",
                        self.text()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "the terminal closed before {needle:?}; saw {:?}",
                        self.text()
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
                        "the REPL is still running after {limit:?}; saw {:?}",
                        self.text()
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
    let share_cmd = [
        env!("CARGO_BIN_EXE_share"),
        "--name",
        "alice",
        "--root",
        s(ra.path()),
        &hub.addr,
    ]
    .map(sh_quote)
    .join(" ");
    // -q quiet, -f flush at once, -e exit with the REPL's status, -c the command; the
    // typescript goes to /dev/null, the terminal's output to our stdout.
    let child = Command::new("script")
        .args(["-qfec", &share_cmd, "/dev/null"])
        .env_remove("SHARE_TOKEN")
        .env("NO_COLOR", "1")
        // A terminal rustyline supports (with TERM=dumb it falls back to plain reads).
        .env("TERM", "xterm")
        // History goes to a scratch home, not the user's.
        .env("HOME", home.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn script");
    let mut repl = Proc {
        child,
        name: "script".into(),
    };
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
    screen.expect_end(WAIT);
    let status = repl.reap();
    assert!(status.success(), "{status:?}; saw {:?}", screen.text());
    assert!(
        !screen.text().contains("error"),
        "no command failed: {:?}",
        screen.text()
    );
}

//! Runs the example as a user would and checks what each case printed: the child read a file
//! it could not open, the parent read the child's memfd, the child served on the parent's
//! socket (the parent's connections got the child's answers), the child's fd table is the same
//! after the calls as before, fds over TCP are refused, and both processes exit cleanly.

use std::time::Duration;

/// The text after `prefix` on the first line of `out` that has it.
fn after<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no line with {prefix:?} in:\n{out}"))
}

#[tokio::test]
async fn the_child_reads_an_unlinked_file_answers_with_a_memfd_and_serves_the_parents_socket() {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fdpass"));
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the example finished within 120 s")
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let pid = after(&stdout, "parent: spawned child pid ")
        .split_whitespace()
        .next()
        .unwrap();

    // 1. An unlinked file: no path reaches it, the fd does.
    let unlinked = after(&stdout, "parent: 1. the child could not open ");
    assert!(
        unlinked.contains("(No such file or directory"),
        "{unlinked}"
    );
    assert!(
        unlinked.ends_with(
            "through the fd (close-on-exec) it read 3 lines, 118 bytes, the first \
             \"netchan fdpass: the child reads this through an fd\""
        ),
        "{unlinked}"
    );
    // A mode-000 path: denied to the child, unless permissions deny nothing here (root).
    let denied = stdout.contains("parent: 1. the child is denied ")
        && after(&stdout, "parent: 1. the child is denied ").contains("(Permission denied");
    let skipped = stdout.contains("parent: 1. skipped the denied path: ");
    assert!(denied || skipped, "{stdout}");

    // 2. The child's result, read from its memfd.
    assert!(
        stdout.contains(
            "parent: 2. the child answered primes(1000) with a memfd \
             (/memfd:fdpass-primes (deleted), sealed against writes: true): \
             168 primes in 643 bytes, the last 997"
        ),
        "{stdout}"
    );

    // 3. The child serves on the socket the parent bound, and every answer is the child's.
    let addr = after(&stdout, "parent: 3. bound ")
        .split_whitespace()
        .next()
        .unwrap();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert!(
        stderr.contains(&format!("child: serving on the parent's socket {addr}\n")),
        "{stderr}"
    );
    for n in 1..=3 {
        let line = format!(
            "parent: 3. connection {n} to {addr}: \
             \"hello from the child (pid {pid}), connection {n}\""
        );
        assert!(stdout.contains(&line), "no {line:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains("parent: 3. the child answered 3 connections and closed the socket"),
        "{stdout}"
    );

    // No fd leaked in the child: its fd table, asked over rpc, is the same after the calls.
    let before = after(&stdout, "parent: the child's fds before the calls: ");
    let after_calls = after(&stdout, "parent: the child's fds after the calls: ");
    assert!(before.starts_with("[0, 1, 2, "), "{before}");
    assert_eq!(before, after_calls);

    // 4. A link that cannot carry fds refuses them both ways, at once.
    for what in ["a call", "a response"] {
        let refused = after(
            &stdout,
            &format!("parent: 4. over TCP, {what} with an fd is refused: "),
        );
        assert!(refused.starts_with("FAILED_PRECONDITION: "), "{refused}");
    }

    assert!(
        stdout.contains("parent: child exited (exit status: 0)"),
        "{stdout}"
    );
    assert!(
        stderr.contains("child: session ended (closed by the peer), exiting"),
        "{stderr}"
    );
}

/// `fdpass | head`: a reader that goes away ends the example quietly (status 0, no panic).
#[tokio::test]
async fn a_closed_stdout_ends_the_example_quietly() {
    let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fdpass"));
    netchan_testkit::ends_quietly_without_stdout(cmd, 120).await;
}

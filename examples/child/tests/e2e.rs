//! Runs the example as a user would and checks what it prints: the child's fds, the nested
//! callback, an error status, and a clean exit.

use std::process::Command;

#[test]
fn the_parent_and_its_child_call_each_other_and_the_child_inherits_only_the_link() {
    let out = Command::new(env!("CARGO_BIN_EXE_child"))
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("parent: the child was born with fds [0, 1, 2, 3]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("child.greet(\"ada\") = \"hello, dear ada (pid "),
        "{stdout}"
    );
    assert!(stdout.contains("child.sum(1..=100) = 5050"), "{stdout}");
    assert!(
        stdout.contains("failed: OUT_OF_RANGE: the sum overflows u64"),
        "{stdout}"
    );
    assert!(
        stdout.contains("parent: child exited (exit status: 0)"),
        "{stdout}"
    );
    assert!(stderr.contains("child: session ended"), "{stderr}");
}

/// `child | head`: a reader that goes away ends the example quietly (status 0, no panic).
#[tokio::test]
async fn a_closed_stdout_ends_the_example_quietly() {
    let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_child"));
    netchan_testkit::ends_quietly_without_stdout(cmd, 60).await;
}

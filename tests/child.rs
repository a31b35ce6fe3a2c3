//! The child-process link: the parent spawns this very test binary as its child (running the
//! ignored `child_role` test), over a socket pair inherited at fd 3. Both sides serve and call
//! RPCs; the child reports the fds it was born with; the child's exit ends the parent's
//! session with its exit status.

use netchan::{
    mux::{self, CloseReason},
    net::child::{self, ChildError, ChildLink},
    rpc::{Client, Server, ServiceDef, Status},
};
use netchan_testkit::{fds::open_fd_list as open_fds, within};

/// Tells the re-executed test binary which child to be.
const ROLE_ENV: &str = "NETCHAN_TEST_CHILD_ROLE";

/// Not a test: the body of the child process. The parent runs this binary with
/// `child_role --exact --ignored` and `NETCHAN_TEST_CHILD_ROLE` set.
#[test]
#[ignore = "runs only as the child process of the tests below"]
fn child_role() {
    // Before anything opens an fd of its own: what the child was born with.
    let born_with = open_fds();
    let role = std::env::var(ROLE_ENV).expect("run by a parent test");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        if role == "middle" {
            // Started through a shell that left fd 7 open and inheritable: spawn a child of
            // our own and report what it was born with.
            let ours: Vec<i32> = born_with.iter().map(|(fd, _)| *fd).collect();
            println!("middle: {ours:?}");
            let link = spawn_child("serve");
            let to_child = dial_child(&link).await;
            let fds: Vec<(i32, String)> = to_child.call("Child.fds", &()).await.unwrap();
            let theirs: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
            println!("grandchild: {theirs:?}");
            std::process::exit(0);
        }
        if role == "report-env-error" {
            // Started by hand with a bad NETCHAN_CHILD_FD: report what from_env says.
            let err = child::from_env(mux::Config::default()).unwrap_err();
            eprintln!("from_env: {err}");
            std::process::exit(9);
        }
        if role == "exit-3" {
            let _session = child::from_env(mux::Config::default()).expect("session from fd 3");
            std::process::exit(3);
        }
        // Listen in the setup, before the session reads the parent's first dial.
        let session = child::from_env_with(mux::Config::default(), move |session| {
            let mut calls = session.listen("child").expect("listen child");
            let (session, fds) = (session.clone(), born_with.clone());
            tokio::spawn(async move {
                let parent = Client::new(session.dial("parent").await.expect("dial parent"));
                let mut server = Server::new();
                server.add(ServiceDef::new("Child").unary("fds", move |_ctx, (): ()| {
                    let fds = fds.clone();
                    async move { Ok::<_, Status>(fds) }
                }));
                server.add(
                    ServiceDef::new("Child").unary("greet", move |_ctx, name: String| {
                        let parent = parent.clone();
                        async move {
                            // Calls the parent back while the parent's call to us is open.
                            let title: String = parent.call("Parent.title", &name).await?;
                            Ok::<_, Status>(format!(
                                "hello, {title}, from pid {}",
                                std::process::id()
                            ))
                        }
                    }),
                );
                server.add(
                    ServiceDef::new("Child").unary("exit", |_ctx, code: i32| async move {
                        std::process::exit(code);
                        #[allow(unreachable_code)]
                        Ok::<(), Status>(())
                    }),
                );
                while let Ok(conn) = calls.accept().await {
                    let server = server.clone();
                    tokio::spawn(async move { server.serve(conn).await });
                }
            });
        })
        .expect("session from fd 3");
        session.closed().await;
    });
}

/// Spawns this test binary as the child in `role`; the parent serves `Parent.title` from the
/// session's start.
fn spawn_child(role: &str) -> ChildLink {
    let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "child_role",
        "--exact",
        "--ignored",
        "--quiet",
        "--test-threads=1",
    ])
    .env(ROLE_ENV, role)
    .stdout(std::process::Stdio::null())
    .kill_on_drop(true);
    child::spawn_with(cmd, mux::Config::default(), |session| {
        let mut calls = session.listen("parent").expect("listen parent");
        let mut server = Server::new();
        server.add(
            ServiceDef::new("Parent").unary("title", |_ctx, name: String| async move {
                Ok::<_, Status>(format!("dear {name}"))
            }),
        );
        tokio::spawn(async move {
            while let Ok(conn) = calls.accept().await {
                let server = server.clone();
                tokio::spawn(async move { server.serve(conn).await });
            }
        });
    })
    .expect("spawn the child")
}

/// A client of the child's service.
async fn dial_child(link: &ChildLink) -> Client {
    Client::new(
        within(30, "dial the child", link.session().dial("child"))
            .await
            .unwrap(),
    )
}

#[tokio::test]
async fn the_child_is_born_with_stdio_and_the_link_only_and_both_sides_call_each_other() {
    let mut link = spawn_child("serve");
    let to_child = dial_child(&link).await;

    let fds: Vec<(i32, String)> = within(30, "Child.fds", to_child.call("Child.fds", &()))
        .await
        .unwrap();
    let numbers: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(numbers, [0, 1, 2, 3], "the child's fds: {fds:?}");
    let link_inode = &fds[3].1;
    assert!(link_inode.starts_with("socket:["), "{fds:?}");

    // Nothing of the child's end stays open in the parent.
    let ours = open_fds();
    assert!(
        ours.iter().all(|(_, target)| target != link_inode),
        "the parent still holds the child's end {link_inode}: {ours:?}"
    );

    let greeting: String = within(30, "nested callback", to_child.call("Child.greet", "ada"))
        .await
        .unwrap();
    assert_eq!(greeting, format!("hello, dear ada, from pid {}", link.id()));

    link.kill();
    let status = within(30, "the killed child exits", link.wait())
        .await
        .expect("an exit status");
    assert!(!status.success());
}

#[tokio::test]
async fn a_child_that_exits_ends_the_parents_session_with_its_exit_status() {
    let link = spawn_child("exit-3");
    let reason = within(30, "the session ends", link.session().closed()).await;
    assert!(matches!(reason, CloseReason::Io(_)), "{reason:?}");
    let text = reason.to_string();
    assert!(
        text.contains(&format!("child process {}", link.id())) && text.contains("exit status: 3"),
        "{text}"
    );
    let status = within(30, "exit status", link.wait()).await.unwrap();
    assert_eq!(status.code(), Some(3));
}

#[tokio::test]
async fn a_child_exiting_mid_call_fails_the_call_and_names_the_exit() {
    let link = spawn_child("serve");
    let to_child = dial_child(&link).await;
    let err = within(30, "Child.exit", to_child.call::<_, ()>("Child.exit", &7))
        .await
        .unwrap_err();
    assert_eq!(err.code(), netchan::rpc::Code::Unavailable, "{err:?}");
    let reason = within(30, "the session ends", link.session().closed()).await;
    assert!(reason.to_string().contains("exit status: 7"), "{reason}");
    let dial = within(30, "dial after exit", link.session().dial("child")).await;
    assert!(dial.is_err());
}

#[tokio::test]
async fn spawning_a_missing_program_names_it() {
    let cmd = tokio::process::Command::new("/nonexistent/netchan-child");
    let err = child::spawn(cmd, mux::Config::default()).unwrap_err();
    assert!(matches!(err, ChildError::Spawn { .. }), "{err:?}");
    // The cause is in the message, once: not also a source.
    assert!(
        err.to_string()
            .starts_with("cannot spawn /nonexistent/netchan-child: "),
        "{err}"
    );
    assert!(err.to_string().contains("No such file"), "{err}");
    assert!(std::error::Error::source(&err).is_none(), "{err:?}");
}

#[test]
fn from_env_in_a_process_that_is_no_child_says_so() {
    // The test binary itself was not spawned by child::spawn (the variable is set only in the
    // children above).
    if std::env::var_os(child::FD_ENV).is_none() {
        let err = child::stream_from_env().unwrap_err();
        assert!(matches!(err, ChildError::NotAChild), "{err:?}");
        assert!(err.to_string().contains("NETCHAN_CHILD_FD"), "{err}");
    }
}

/// Runs the child role `report-env-error` with `NETCHAN_CHILD_FD` set to `value` by hand (no
/// link) and returns what `from_env` said.
async fn from_env_error_with(value: &str) -> String {
    let out = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_role",
            "--exact",
            "--ignored",
            "--quiet",
            "--test-threads=1",
        ])
        .arg("--nocapture")
        .env(ROLE_ENV, "report-env-error")
        .env(child::FD_ENV, value)
        .stdin(std::process::Stdio::null())
        .output();
    let out = within(30, "the child reports", out).await.unwrap();
    assert_eq!(out.status.code(), Some(9), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn from_env_names_a_bad_variable_or_an_fd_that_is_no_socket() {
    let said = from_env_error_with("three").await;
    assert!(
        said.contains("from_env: NETCHAN_CHILD_FD=\"three\" is not a file descriptor number"),
        "{said}"
    );
    // fd 0 is /dev/null here: open, but not a socket.
    let said = from_env_error_with("0").await;
    assert!(
        said.contains("from_env: fd 0 named by NETCHAN_CHILD_FD is not an open unix socket"),
        "{said}"
    );
    // fd 57 is not open at all.
    let said = from_env_error_with("57").await;
    assert!(
        said.contains("from_env: fd 57 named by NETCHAN_CHILD_FD is not an open unix socket"),
        "{said}"
    );
}

#[tokio::test]
async fn an_fd_the_parent_left_inheritable_does_not_reach_the_child() {
    // A shell opens fd 7 without close-on-exec, then becomes this test binary ("middle"),
    // which spawns a child through child::spawn: fd 7 must stop at the middle.
    let exe = std::env::current_exe().unwrap();
    let script = r#"exec 7</dev/null; exec "$0" child_role --exact --ignored --quiet --nocapture --test-threads=1"#;
    let out = tokio::process::Command::new("sh")
        .args(["-c", script])
        .arg(&exe)
        .env(ROLE_ENV, "middle")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(60, "the middle process reports", out).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let middle = stdout
        .lines()
        .find_map(|l| l.strip_prefix("middle: "))
        .expect("the middle's fds");
    assert!(
        middle.contains(", 7"),
        "the middle inherited fd 7: {middle}"
    );
    assert!(
        stdout.contains("grandchild: [0, 1, 2, 3]"),
        "only stdio and the link reach the child: {stdout}"
    );
}

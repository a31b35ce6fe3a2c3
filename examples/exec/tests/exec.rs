//! The exec service end to end on real sockets: output and exit status over TCP, a unix
//! socket file and an abstract socket; the allowlist; cancellation (a dropped call, a
//! deadline, a client killed with SIGKILL or interrupted with Ctrl-C) killing the whole process
//! group; output bounded when the client stops reading.

use std::{process::Stdio, sync::atomic::Ordering, time::Duration};

use exec::{bind, serve, CommandLine, ExecClient, ExecServer, ExitInfo, Output, CHANNEL};
use futures::StreamExt;
use netchan::{
    rpc::{self, CallOptions, Code},
    Addr, ConnectOptions,
};
use netchan_testkit::within;
use tokio::io::{AsyncBufReadExt, BufReader};

fn allow() -> Vec<String> {
    ["sh", "echo", "yes"].map(String::from).to_vec()
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("netchan-exec-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A server on `addr` (run in the background) and a client connected to it.
async fn server_and_client(addr: &str, server: ExecServer) -> (ExecClient, Addr) {
    let listener = bind(&addr.parse().unwrap(), server).await.unwrap();
    let local = listener.local_addr().clone();
    tokio::spawn(serve(listener));
    let session = within(
        20,
        "connect",
        netchan::connect(&local, ConnectOptions::default()),
    )
    .await
    .unwrap();
    let conn = within(20, "dial exec", session.dial(CHANNEL))
        .await
        .unwrap();
    (ExecClient::new(rpc::Client::new(conn)), local)
}

fn sh(script: &str) -> CommandLine {
    CommandLine {
        program: "sh".into(),
        args: vec!["-c".into(), script.into()],
    }
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet: it runs no more).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// Waits (bounded) for `pid` to die: SIGKILL is delivered asynchronously.
async fn dies(pid: u32) {
    within(20, "the process dies", async {
        while !is_dead(pid) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn no_runs_left(server: &ExecServer) {
    let mut running = server.running();
    within(20, "every run ended", running.wait_for(|n| *n == 0))
        .await
        .unwrap();
}

#[tokio::test]
async fn lines_and_the_exit_status_stream_back_over_tcp_unix_files_and_abstract_sockets() {
    let dir = temp_dir("forms");
    let addrs = [
        "127.0.0.1:0".to_string(),
        format!("unix:{}", dir.join("exec.sock").display()),
        format!("unix:@netchan-exec-test-{}", std::process::id()),
    ];
    for addr in addrs {
        let (client, _) = server_and_client(&addr, ExecServer::new(allow())).await;
        let items: Vec<Output> = within(20, "the run", async {
            let stream = client
                .run(sh("echo out; echo err >&2; echo more; exit 3"))
                .await
                .unwrap();
            stream.map(|item| item.unwrap()).collect().await
        })
        .await;
        let stdout: Vec<&Output> = items
            .iter()
            .filter(|o| matches!(o, Output::Stdout(_)))
            .collect();
        assert_eq!(
            stdout,
            [
                &Output::Stdout("out".into()),
                &Output::Stdout("more".into())
            ],
            "over {addr}: {items:?}"
        );
        assert!(items.contains(&Output::Stderr("err".into())), "{items:?}");
        assert_eq!(
            items.last(),
            Some(&Output::Exited(ExitInfo {
                code: Some(3),
                signal: None
            })),
            "the exit status comes last over {addr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_program_not_on_the_allowlist_is_refused_by_name() {
    let (client, _) = server_and_client("127.0.0.1:0", ExecServer::new(allow())).await;
    let cmd = CommandLine {
        program: "rm".into(),
        args: vec!["-rf".into(), "/tmp/nothing".into()],
    };
    let err = match within(20, "run rm", client.run(cmd)).await {
        Err(status) => status,
        Ok(mut stream) => within(20, "the refusal", stream.next())
            .await
            .expect("an item")
            .unwrap_err(),
    };
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("\"rm\""), "{err}");
}

/// Starts a run whose shell leaves a `sleep` in the background and prints its pid.
async fn run_with_a_background_sleep(client: &ExecClient) -> (rpc::ResponseStream<Output>, u32) {
    let mut stream = within(20, "start", client.run(sh("sleep 1000 & echo $!; wait")))
        .await
        .unwrap();
    let pid = match within(20, "the pid line", stream.next()).await {
        Some(Ok(Output::Stdout(line))) => line.trim().parse().unwrap(),
        other => panic!("expected the sleep's pid, got {other:?}"),
    };
    (stream, pid)
}

#[tokio::test]
async fn dropping_the_call_kills_the_whole_process_group() {
    let server = ExecServer::new(allow());
    let (client, _) = server_and_client("127.0.0.1:0", server.clone()).await;
    let (stream, sleep_pid) = run_with_a_background_sleep(&client).await;
    assert!(!is_dead(sleep_pid));
    drop(stream);
    no_runs_left(&server).await;
    dies(sleep_pid).await;
    assert_eq!(server.stats().groups_killed.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_deadline_kills_the_whole_process_group() {
    let server = ExecServer::new(allow());
    let (client, _) = server_and_client("127.0.0.1:0", server.clone()).await;
    let client = client.with_options(CallOptions::default().timeout(Duration::from_secs(3)));
    let (mut stream, sleep_pid) = run_with_a_background_sleep(&client).await;
    let end = within(20, "the deadline", stream.next()).await;
    match end {
        Some(Err(status)) => assert_eq!(status.code(), Code::DeadlineExceeded),
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    no_runs_left(&server).await;
    dies(sleep_pid).await;
}

#[tokio::test]
async fn output_is_bounded_when_the_client_stops_reading() {
    let server = ExecServer::new(allow());
    let (client, _) = server_and_client("127.0.0.1:0", server.clone()).await;
    let mut stream = within(
        20,
        "start yes",
        client.run(CommandLine {
            program: "yes".into(),
            args: vec![],
        }),
    )
    .await
    .unwrap();
    for _ in 0..5 {
        let item = within(20, "a line", stream.next()).await;
        assert!(
            matches!(item, Some(Ok(Output::Stdout(ref l))) if l == "y"),
            "{item:?}"
        );
    }
    // `yes` writes millions of lines a second; with the client not reading, the count must
    // stop at the queue plus the stream window. Watch it until it stops moving.
    let queued = || server.stats().lines_queued.load(Ordering::Relaxed);
    let mut last = queued();
    within(20, "the producer stops", async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = queued();
            if now == last {
                break;
            }
            last = now;
        }
    })
    .await;
    // 5 read + 16 in the stream window + 16 in the queue, and a few in flight.
    assert!(
        last <= 5 + 16 + 16 + 8,
        "{last} lines queued for a client that stopped reading"
    );
    drop(stream);
    no_runs_left(&server).await;
}

/// The `exec` binary, serving on a unix socket in `dir`; returns it and the address.
async fn exec_server(dir: &std::path::Path) -> (tokio::process::Child, String) {
    let addr = format!("unix:{}", dir.join("exec.sock").display());
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_exec"))
        .args(["serve", "--addr", &addr, "--allow", "sh"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let first = within(20, "the server is up", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(first.starts_with("exec: listening on unix:"), "{first}");
    (server, addr)
}

/// `exec run` of a shell leaving a background sleep; returns the client and the sleep's pid.
async fn exec_client(addr: &str) -> (tokio::process::Child, u32) {
    let mut client = tokio::process::Command::new(env!("CARGO_BIN_EXE_exec"))
        .args([
            "run",
            "--addr",
            addr,
            "--",
            "sh",
            "-c",
            "sleep 1000 & echo $!; wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    let pid = within(20, "the pid line", lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (client, pid)
}

fn signal(child: &tokio::process::Child, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

#[tokio::test]
async fn ctrl_c_on_the_client_kills_the_remote_command() {
    let dir = temp_dir("ctrl-c");
    let (_server, addr) = exec_server(&dir).await;
    let (mut client, sleep_pid) = exec_client(&addr).await;
    signal(&client, rustix::process::Signal::INT);
    let status = within(20, "the client exits", client.wait()).await.unwrap();
    assert_eq!(status.code(), Some(130));
    dies(sleep_pid).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_client_that_vanishes_gets_its_remote_command_killed() {
    let dir = temp_dir("vanish");
    let (_server, addr) = exec_server(&dir).await;
    let (mut client, sleep_pid) = exec_client(&addr).await;
    signal(&client, rustix::process::Signal::KILL);
    within(20, "the client dies", client.wait()).await.unwrap();
    dies(sleep_pid).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_run_command_prints_output_and_exits_with_the_remote_code() {
    let dir = temp_dir("run");
    let (_server, addr) = exec_server(&dir).await;
    let out = within(
        30,
        "exec run",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_exec"))
            .args([
                "run",
                "--addr",
                &addr,
                "--",
                "sh",
                "-c",
                "echo hi; echo oops >&2; exit 4",
            ])
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("oops") && stderr.contains("sh ended with exit code 4"),
        "{stderr}"
    );

    let out = within(
        30,
        "exec run refused",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_exec"))
            .args(["run", "--addr", &addr, "--", "rm", "-rf", "/"])
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(126));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PERMISSION_DENIED: command \"rm\""),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `exec run … | head`: a reader that goes away ends the client quietly (status 0, no panic).
#[tokio::test]
async fn a_closed_stdout_ends_the_client_quietly() {
    let dir = temp_dir("closed-stdout");
    let (_server, addr) = exec_server(&dir).await;
    let mut client = tokio::process::Command::new(env!("CARGO_BIN_EXE_exec"));
    client.args(["run", "--addr", &addr, "--", "sh", "-c", "seq 1 100000"]);
    netchan_testkit::ends_quietly_without_stdout(client, 60).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `exec run` exits once its command has ended: closing its session does not wait out the
/// session's close grace (5 s) for a channel it still held. The bound starts after the client
/// reported the exit status, so it covers only the close.
#[tokio::test]
async fn the_run_command_exits_as_soon_as_its_command_has_ended() {
    let dir = temp_dir("prompt-exit");
    let (_server, addr) = exec_server(&dir).await;
    let mut client = tokio::process::Command::new(env!("CARGO_BIN_EXE_exec"))
        .args(["run", "--addr", &addr, "--", "sh", "-c", "exit 3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stderr.take().unwrap()).lines();
    let last = within(30, "the exit status line", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(last.contains("sh ended with exit code 3"), "{last}");
    let status = within(3, "the client exits after the command ended", client.wait())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(3));
    let _ = std::fs::remove_dir_all(&dir);
}

//! Interop with Go's hashicorp/yamux: a small Go peer (mux/tests/go/peer) built from Debian's
//! `golang-go` and `golang-github-hashicorp-yamux-dev` in GOPATH mode (no module downloads),
//! talking to our session across a delayed loopback link.
//!
//! Skipped when `go` is not installed, unless `CI=true`, where a missing Go fails the test.

mod common;

use common::{spawn_echo, within};
use netchan_mux::{CloseReason, Config, Mode, Session};
use netchan_testkit::proxy::{Link, Proxy};
use std::{path::PathBuf, process::Stdio, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// Builds the Go peer; `None` (skip) if Go is missing outside CI.
fn build_peer() -> Option<PathBuf> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let go_available = std::process::Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !go_available {
        assert!(!in_ci, "CI=true but `go` is not installed (see .ci/run)");
        eprintln!("skipping: `go` is not installed");
        return None;
    }
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let out = tmp.join("netchan-go-peer");
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/go/peer");
    let built = std::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(&source)
        .env("GOPATH", "/usr/share/gocode")
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOCACHE", tmp.join("go-cache"))
        .output()
        .expect("run go build");
    assert!(
        built.status.success(),
        "go build failed (are golang-go and golang-github-hashicorp-yamux-dev installed?): {}",
        String::from_utf8_lossy(&built.stderr)
    );
    Some(out)
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_yamux_dials_accepts_echoes_pings_and_closes_with_go_away() {
    let Some(peer) = build_peer() else { return };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // 20 ms each way: Go's one 3 MiB write leaves as window-sized frames across real delay.
    let proxy = Proxy::start(
        listener.local_addr().unwrap(),
        Link::delayed(Duration::from_millis(20)),
    )
    .await
    .unwrap();
    let child = tokio::process::Command::new(&peer)
        .arg(proxy.addr().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the go peer");
    let (tcp, _) = within(30, "go peer connects", listener.accept())
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();

    // Listeners first, then start: the Go peer's first dial can never see NoListener.
    let builder = Session::builder(tcp, Mode::Server, Config::default());
    spawn_echo(builder.listen("rust-echo").unwrap());
    let session = builder.start();

    // Our side: dial the Go peer's echo, 3 MiB there and back, in a task so that a failure
    // on either side is reported with the Go peer's own output.
    let dialer = session.clone();
    let ours = tokio::spawn(async move {
        let data: Vec<u8> = (0..3 << 20).map(|i: usize| (i * 13 % 251) as u8).collect();
        let mut conn = dialer.dial("go-echo").await?;
        let (mut r, mut w) = tokio::io::split(&mut conn);
        let write = async {
            w.write_all(&data).await?;
            w.shutdown().await
        };
        let read = async {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.map(|_| back)
        };
        let (written, back) = tokio::join!(write, read);
        written?;
        let back = back?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
            back.len(),
            checksum(&back),
            checksum(&data),
        ))
    });

    let output = within(60, "go peer finishes", child.wait_with_output())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "go peer failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (len, back, sent) = within(60, "our echo through go", ours)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((len, back), (3 << 20, sent));
    for line in ["rust-echo ok 3145728", "ping ok", "go-echo ok", "closed"] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    let reason = within(30, "go away ends our session", session.closed()).await;
    assert!(matches!(reason, CloseReason::Peer), "{reason:?}");
}

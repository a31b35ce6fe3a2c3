//! The satellite service under mutual TLS with certificates generated at test time: unary and
//! streaming calls, OUT_OF_RANGE, a deadline cancelling a slow stream (the server sees it), the
//! token check, and a client without a certificate refused; then the binary end to end.

use std::{process::Stdio, time::Duration};

use futures::StreamExt;
use netchan::{
    net::{TlsClient, TlsServer},
    rpc::Code,
    Addr,
};
use netchan_testkit::within;
use satellite::{
    bind, call_options, connect, pki, serve, Area, Image, Location, SatelliteClient,
    SatelliteServer,
};
use tokio::io::{AsyncBufReadExt, BufReader};

struct Setup {
    dir: std::path::PathBuf,
    files: pki::PemFiles,
    addr: Addr,
    server: SatelliteServer,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn setup(tag: &str, delay: Duration) -> Setup {
    let dir = std::env::temp_dir().join(format!("netchan-satellite-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let files = pki::generate(&dir, "test").unwrap();
    let tls =
        TlsServer::mutual_from_pem_files(&files.server.0, &files.server.1, &files.ca).unwrap();
    let server = SatelliteServer::new(Some("s3cret".into()), delay);
    let listener = bind(
        &"tls://127.0.0.1:0".parse().unwrap(),
        Some(tls),
        server.clone(),
    )
    .await
    .unwrap();
    let port = match listener.local_addr() {
        Addr::Tls { port, .. } => *port,
        other => panic!("{other}"),
    };
    tokio::spawn(serve(listener));
    let addr = format!("tls://localhost:{port}").parse().unwrap();
    Setup {
        dir,
        files,
        addr,
        server,
    }
}

impl Setup {
    fn mutual(&self) -> TlsClient {
        TlsClient::mutual_from_pem_files(&self.files.ca, &self.files.client.0, &self.files.client.1)
            .unwrap()
    }

    async fn client(&self, token: Option<&str>) -> SatelliteClient {
        within(
            20,
            "connect",
            connect(&self.addr, Some(self.mutual()), token),
        )
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn get_image_answers_on_the_map_and_is_out_of_range_off_it() {
    let s = setup("unary", Duration::ZERO).await;
    let client = s.client(Some("s3cret")).await;
    let image = within(20, "GetImage", client.get_image(Location { x: 3, y: 4 }))
        .await
        .unwrap();
    assert_eq!(
        image,
        Image {
            x: 3,
            y: 4,
            img: vec![satellite::terrain(Location { x: 3, y: 4 })]
        }
    );
    for (x, y) in [(80, 0), (-1, 0), (0, 32), (0, -5)] {
        let err = within(
            20,
            "GetImage off the map",
            client.get_image(Location { x, y }),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "({x}, {y}): {err}");
    }
}

#[tokio::test]
async fn get_images_streams_an_area_row_by_row() {
    let s = setup("stream", Duration::ZERO).await;
    let client = s.client(Some("s3cret")).await;
    let area = Area {
        ll: Location { x: 2, y: 1 },
        ur: Location { x: 5, y: 3 },
    };
    let images: Vec<Image> = within(20, "GetImages", async {
        let stream = client.get_images(area).await.unwrap();
        stream.map(|i| i.unwrap()).collect().await
    })
    .await;
    let coords: Vec<(i32, i32)> = images.iter().map(|i| (i.x, i.y)).collect();
    let expected: Vec<(i32, i32)> = (1..=3).flat_map(|y| (2..=5).map(move |x| (x, y))).collect();
    assert_eq!(coords, expected);

    let off = Area {
        ll: Location { x: 70, y: 0 },
        ur: Location { x: 80, y: 1 },
    };
    let err = match within(20, "GetImages off the map", client.get_images(off)).await {
        Err(status) => status,
        Ok(mut stream) => within(20, "the refusal", stream.next())
            .await
            .unwrap()
            .unwrap_err(),
    };
    assert_eq!(err.code(), Code::OutOfRange);
}

#[tokio::test]
async fn a_deadline_cancels_a_slow_stream_and_the_server_sees_it() {
    let s = setup("deadline", Duration::from_millis(100)).await;
    let client = s
        .client(Some("s3cret"))
        .await
        .with_options(call_options(Some("s3cret"), Duration::from_millis(1500)));
    let mut cancelled = s.server.cancelled();
    let whole_map = Area {
        ll: Location { x: 0, y: 0 },
        ur: Location { x: 79, y: 31 },
    };
    let mut stream = within(20, "GetImages", client.get_images(whole_map))
        .await
        .unwrap();
    let mut received = 0;
    let end = within(20, "the stream ends", async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => received += 1,
                other => break other,
            }
        }
    })
    .await;
    match end {
        Some(Err(status)) => assert_eq!(status.code(), Code::DeadlineExceeded, "{status}"),
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    assert!(
        received < 80 * 32,
        "the deadline cut the stream short ({received} images)"
    );
    within(
        20,
        "the server sees the cancellation",
        cancelled.wait_for(|n| *n == 1),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn calls_without_the_token_or_with_a_wrong_one_are_unauthenticated() {
    let s = setup("token", Duration::ZERO).await;
    for token in [None, Some("guess")] {
        let client = s.client(token).await;
        let err = within(20, "GetImage", client.get_image(Location { x: 1, y: 1 }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "token {token:?}: {err}");
        let err = match within(
            20,
            "GetImages",
            client.get_images(Area {
                ll: Location { x: 0, y: 0 },
                ur: Location { x: 1, y: 1 },
            }),
        )
        .await
        {
            Err(status) => status,
            Ok(mut stream) => within(20, "the refusal", stream.next())
                .await
                .unwrap()
                .unwrap_err(),
        };
        assert_eq!(err.code(), Code::Unauthenticated);
    }
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_and_told_why() {
    let s = setup("no-cert", Duration::ZERO).await;
    let server_only = TlsClient::from_pem_files(&s.files.ca).unwrap();
    let outcome: anyhow::Result<Image> = within(20, "connect without a certificate", async {
        let client = connect(&s.addr, Some(server_only), Some("s3cret")).await?;
        Ok(client.get_image(Location { x: 1, y: 1 }).await?)
    })
    .await;
    let err = outcome.expect_err("no certificate, no service");
    let chain = format!("{err:#}");
    assert!(
        chain.contains("the server requires a client certificate and this client sent none"),
        "{chain}"
    );
}

#[tokio::test]
async fn the_binary_serves_and_queries_with_pem_files() {
    let s = setup("binary", Duration::ZERO).await;
    let files = &s.files;
    let path = |p: &std::path::Path| p.display().to_string();
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_satellite"))
        .args(["serve", "--addr", "tls://127.0.0.1:0", "--token", "s3cret"])
        .args([
            "--cert",
            &path(&files.server.0),
            "--key",
            &path(&files.server.1),
        ])
        .args(["--client-ca", &path(&files.ca)])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let first = within(20, "the server is up", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    let port = first.rsplit(':').next().unwrap().to_string();
    assert!(
        first.starts_with("satellite: serving on tls://127.0.0.1:"),
        "{first}"
    );
    let client_args = |cmd: &str| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_satellite"));
        c.args([
            cmd,
            "--addr",
            &format!("tls://localhost:{port}"),
            "--ca",
            &path(&files.ca),
        ])
        .args([
            "--cert",
            &path(&files.client.0),
            "--key",
            &path(&files.client.1),
        ]);
        c
    };
    let out = within(
        30,
        "get-image",
        client_args("get-image")
            .args(["--token", "s3cret", "3", "4"])
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = format!(
        "(3, 4) {}\n",
        satellite::terrain(Location { x: 3, y: 4 }) as char
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);

    let out = within(
        30,
        "get-images",
        client_args("get-images")
            .args(["--token", "s3cret", "0", "0", "1", "1"])
            .output(),
    )
    .await
    .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4);

    let out = within(
        30,
        "get-image without token",
        client_args("get-image").args(["3", "4"]).output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNAUTHENTICATED"));
}

/// `satellite get-images … | head`: a reader that goes away ends the client quietly (status
/// 0, no panic).
#[tokio::test]
async fn a_closed_stdout_ends_the_client_quietly() {
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_satellite"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let first = within(20, "the server is up", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    let port = first.rsplit(':').next().unwrap().to_string();
    let mut client = tokio::process::Command::new(env!("CARGO_BIN_EXE_satellite"));
    client
        .args(["get-images", "--addr", &format!("127.0.0.1:{port}")])
        .args(["0", "0", "79", "31"]);
    netchan_testkit::ends_quietly_without_stdout(client, 60).await;
}

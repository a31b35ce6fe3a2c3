//! `satellite`: serve the imagery service, query it, or run the whole demo in one command.
//!
//! ```text
//! satellite demo
//! satellite serve --addr tls://127.0.0.1:50051 --cert server.pem --key server.key \
//!     --client-ca ca.pem --token s3cret [--delay-ms 200]
//! satellite get-image  --addr tls://localhost:50051 --ca ca.pem --cert client.pem \
//!     --key client.key --token s3cret 3 4
//! satellite get-images --addr ... --token s3cret [--timeout-ms 500] 0 0 3 1
//! ```

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use netchan::{
    net::{TlsClient, TlsServer},
    Addr,
};
use satellite::{
    bind, call_options, connect, pki, serve, Area, Location, SatelliteClient, SatelliteServer,
};

/// Writes one line to stdout; a closed stdout (`satellite … | head`) ends the program quietly
/// with status 0, as it does a shell tool, instead of a panic.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("satellite: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`say`].
macro_rules! say {
    ($($arg:tt)*) => {
        say(format_args!($($arg)*))
    };
}

#[derive(Parser)]
#[command(
    name = "satellite",
    about = "Satellite imagery over netchan RPC with mutual TLS"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the imagery service.
    Serve {
        /// Where to listen: tls://host:port (with --cert/--key), or a plain address.
        #[arg(long, default_value = "tls://127.0.0.1:50051")]
        addr: Addr,
        /// The server's certificate (PEM).
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// The server's private key (PEM).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Require client certificates signed by this CA (mutual TLS).
        #[arg(long, requires = "cert")]
        client_ca: Option<PathBuf>,
        /// Require this token (metadata `authorization: Bearer TOKEN`) on every call.
        #[arg(long)]
        token: Option<String>,
        /// Wait this long before each streamed image (a slow sensor).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Get the image at X Y.
    GetImage {
        #[command(flatten)]
        client: ClientArgs,
        /// Column.
        x: i32,
        /// Row.
        y: i32,
    },
    /// Stream the images of the area from (X1, Y1) to (X2, Y2).
    GetImages {
        #[command(flatten)]
        client: ClientArgs,
        /// Give up after this many milliseconds (the server sees the cancellation).
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Lower-left column.
        x1: i32,
        /// Lower-left row.
        y1: i32,
        /// Upper-right column.
        x2: i32,
        /// Upper-right row.
        y2: i32,
    },
    /// Generate throwaway certificates, start a server on them and show every feature.
    Demo,
}

#[derive(Args)]
struct ClientArgs {
    /// The server: tls://host:port (with --ca), or a plain address.
    #[arg(long, default_value = "tls://localhost:50051")]
    addr: Addr,
    /// The CA to verify the server with (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// This client's certificate (PEM), for mutual TLS.
    #[arg(long, requires_all = ["key", "ca"])]
    cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The token to send.
    #[arg(long)]
    token: Option<String>,
}

impl ClientArgs {
    async fn connect(&self) -> anyhow::Result<SatelliteClient> {
        let tls = match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => {
                Some(TlsClient::mutual_from_pem_files(ca, cert, key)?)
            }
            (Some(ca), None, None) => Some(TlsClient::from_pem_files(ca)?),
            _ => None,
        };
        Ok(connect(&self.addr, tls, self.token.as_deref()).await?)
    }
}

fn show(image: &satellite::Image) -> String {
    format!(
        "({}, {}) {}",
        image.x,
        image.y,
        String::from_utf8_lossy(&image.img)
    )
}

async fn get_image(client: &SatelliteClient, x: i32, y: i32) -> anyhow::Result<()> {
    let image = client.get_image(Location { x, y }).await?;
    say!("{}", show(&image));
    Ok(())
}

async fn get_images(
    client: &SatelliteClient,
    token: Option<&str>,
    timeout: Option<Duration>,
    area: Area,
) -> anyhow::Result<usize> {
    let client = match timeout {
        Some(t) => client.with_options(call_options(token, t)),
        None => client.clone(),
    };
    let mut images = client.get_images(area).await?;
    let mut count = 0;
    while let Some(image) = images.next().await {
        let image = image.with_context(|| format!("after {count} images"))?;
        say!("{}", show(&image));
        count += 1;
    }
    Ok(count)
}

async fn demo() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("netchan-satellite-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let files = pki::generate(&dir, "demo")?;
    say!(
        "generated a throwaway CA, server and client certificate in {}",
        dir.display()
    );
    let tls = TlsServer::mutual_from_pem_files(&files.server.0, &files.server.1, &files.ca)?;
    let server = SatelliteServer::new(Some("s3cret".into()), Duration::from_millis(100));
    let mut cancelled = server.cancelled();
    let listener = bind(&"tls://127.0.0.1:0".parse()?, Some(tls), server).await?;
    let port = match listener.local_addr() {
        Addr::Tls { port, .. } => *port,
        other => anyhow::bail!("unexpected address {other}"),
    };
    tokio::spawn(serve(listener));
    let addr: Addr = format!("tls://localhost:{port}").parse()?;
    say!("server: mutual TLS on {addr}, token required, 100 ms per streamed image\n");

    let mutual = || TlsClient::mutual_from_pem_files(&files.ca, &files.client.0, &files.client.1);
    let client = connect(&addr, Some(mutual()?), Some("s3cret")).await?;
    say!("> GetImage(3, 4)");
    get_image(&client, 3, 4).await?;
    say!("> GetImage(99, 4)");
    if let Err(e) = get_image(&client, 99, 4).await {
        say!("error: {e:#}");
    }
    say!("> GetImages((0, 0)-(3, 1))");
    let n = get_images(
        &client,
        Some("s3cret"),
        None,
        Area {
            ll: Location { x: 0, y: 0 },
            ur: Location { x: 3, y: 1 },
        },
    )
    .await?;
    say!("{n} images");
    say!("> GetImages((0, 0)-(79, 31)) with a 350 ms deadline");
    if let Err(e) = get_images(
        &client,
        Some("s3cret"),
        Some(Duration::from_millis(350)),
        Area {
            ll: Location { x: 0, y: 0 },
            ur: Location { x: 79, y: 31 },
        },
    )
    .await
    {
        say!("error: {e:#}");
    }
    tokio::time::timeout(Duration::from_secs(10), cancelled.wait_for(|n| *n > 0))
        .await
        .context("the server did not see the cancellation")??;
    say!("server: saw the stream cancelled");
    say!("> GetImage(3, 4) without the token");
    let anonymous = connect(&addr, Some(mutual()?), None).await?;
    if let Err(e) = get_image(&anonymous, 3, 4).await {
        say!("error: {e:#}");
    }
    say!("> GetImage(3, 4) with no client certificate");
    let outcome = async {
        let no_cert = connect(
            &addr,
            Some(TlsClient::from_pem_files(&files.ca)?),
            Some("s3cret"),
        )
        .await?;
        get_image(&no_cert, 3, 4).await
    };
    if let Err(e) = outcome.await {
        say!("error: {e:#}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Cmd::Serve {
            addr,
            cert,
            key,
            client_ca,
            token,
            delay_ms,
        } => {
            async {
                let tls = match (cert, key, client_ca) {
                    (Some(cert), Some(key), Some(ca)) => {
                        Some(TlsServer::mutual_from_pem_files(cert, key, ca)?)
                    }
                    (Some(cert), Some(key), None) => Some(TlsServer::from_pem_files(cert, key)?),
                    _ => None,
                };
                let server = SatelliteServer::new(token, Duration::from_millis(delay_ms));
                let listener = bind(&addr, tls, server).await?;
                say!("satellite: serving on {}", listener.local_addr());
                serve(listener).await;
                Ok(())
            }
            .await
        }
        Cmd::GetImage { client, x, y } => {
            async { get_image(&client.connect().await?, x, y).await }.await
        }
        Cmd::GetImages {
            client,
            timeout_ms,
            x1,
            y1,
            x2,
            y2,
        } => {
            async {
                let area = Area {
                    ll: Location { x: x1, y: y1 },
                    ur: Location { x: x2, y: y2 },
                };
                let n = get_images(
                    &client.connect().await?,
                    client.token.as_deref(),
                    timeout_ms.map(Duration::from_millis),
                    area,
                )
                .await?;
                eprintln!("satellite: {n} images");
                Ok(())
            }
            .await
        }
        Cmd::Demo => demo().await,
    };
    if let Err(e) = result {
        eprintln!("satellite: error: {e:#}");
        std::process::exit(1);
    }
}

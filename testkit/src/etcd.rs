//! Real etcd clusters for tests: N members on free loopback ports, each in its own
//! directory under a temporary directory that is removed when the cluster is dropped.
//!
//! Needs the `etcd` binary (Debian's `etcd-server`) on `PATH`, or named by `NETCHAN_ETCD`.
//! [`available`] says whether it is there; [`Cluster::start_or_skip`] starts a cluster or,
//! when etcd is missing, returns `None` (and panics instead when `CI=true`, so CI cannot
//! skip the tests by accident).
//!
//! A member counts as up when it printed "ready to serve client requests" (it has joined
//! the cluster and there is a leader) and answers `GET /health` with `"health":"true"`.
//! Leader and member ids come from `POST /v3/maintenance/status` (etcd's JSON gateway),
//! so this module needs no etcd client library.
//!
//! Timings are shortened for tests (heartbeat 50 ms, election timeout 500 ms), so a lost
//! leader is replaced within about a second.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// How long a member gets to become ready (start, join, elect a leader).
const READY_WITHIN: Duration = Duration::from_secs(30);

/// How long one HTTP exchange with a member may take.
const HTTP_WITHIN: Duration = Duration::from_secs(3);

/// How many of a member's last log lines are kept for failure messages.
const LOG_LINES_KEPT: usize = 40;

/// How many times a cluster start is retried with fresh ports when a member could not
/// bind (another process took a port between our probe and etcd's bind).
const START_ATTEMPTS: usize = 3;

/// The etcd binary: `NETCHAN_ETCD` if set, else `etcd` on `PATH`.
fn binary() -> PathBuf {
    std::env::var_os("NETCHAN_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// Whether the etcd binary can be run.
pub fn available() -> bool {
    std::process::Command::new(binary())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `n` distinct loopback ports that were free a moment ago (all bound to port 0 at once,
/// so none is handed out twice, then released for etcd to bind).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

/// A fresh, empty directory under the system's temporary directory.
fn temp_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "netchan-etcd-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create the cluster's temporary directory");
    dir
}

/// One member's fixed identity: its name, ports and data directory survive restarts.
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
}

impl Spec {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A running etcd process, with the tail of its log.
struct Running {
    child: Child,
    log: Arc<Mutex<VecDeque<String>>>,
    ready: watch::Receiver<bool>,
}

/// A cluster of real etcd members on loopback. Dropping it kills every member and removes
/// its directory.
pub struct Cluster {
    dir: PathBuf,
    token: String,
    specs: Vec<Spec>,
    running: Vec<Option<Running>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir)
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

impl Cluster {
    /// Starts `members` members and waits until every one is ready and healthy.
    ///
    /// Panics (naming the member and the tail of its log) when a member does not come up
    /// within 30 s.
    pub async fn start(members: usize) -> Cluster {
        assert!(members > 0, "a cluster has at least one member");
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut cluster = Cluster::configure(members);
            for i in 0..members {
                cluster.spawn(i, true);
            }
            let mut failed = None;
            for i in 0..members {
                if let Err(e) = cluster.wait_ready(i).await {
                    failed = Some(e);
                    break;
                }
            }
            match failed {
                None => return cluster,
                // A port taken between the probe and etcd's bind: try again with new ports.
                Some(e) if e.contains("address already in use") => last_failure = e,
                Some(e) => panic!("{e}"),
            }
        }
        panic!("etcd did not start in {START_ATTEMPTS} attempts: {last_failure}");
    }

    /// [`Cluster::start`] when etcd is installed. Without it: `None` after a note on stderr,
    /// or a panic when the environment variable `CI` is `true` (CI must run these tests).
    pub async fn start_or_skip(members: usize) -> Option<Cluster> {
        if available() {
            return Some(Cluster::start(members).await);
        }
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "etcd is not installed (CI=true: the etcd tests must run); \
                 install Debian's etcd-server or set NETCHAN_ETCD"
            );
        }
        eprintln!("etcd is not installed: test skipped (install Debian's etcd-server)");
        None
    }

    fn configure(members: usize) -> Cluster {
        let dir = temp_dir();
        let ports = free_ports(2 * members);
        let specs = (0..members)
            .map(|i| Spec {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.join(format!("m{i}")),
            })
            .collect();
        let token = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Cluster {
            dir,
            token,
            specs,
            running: (0..members).map(|_| None).collect(),
        }
    }

    fn spawn(&mut self, i: usize, first_start: bool) {
        let spec = &self.specs[i];
        let initial_cluster = self
            .specs
            .iter()
            .map(|s| format!("{}={}", s.name, s.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(binary());
        cmd.arg("--name")
            .arg(&spec.name)
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .arg("--listen-client-urls")
            .arg(spec.client_url())
            .arg("--advertise-client-urls")
            .arg(spec.client_url())
            .arg("--listen-peer-urls")
            .arg(spec.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(spec.peer_url())
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg(if first_start { "new" } else { "existing" })
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", binary()));
        let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_LINES_KEPT)));
        let (ready_tx, ready) = watch::channel(false);
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            // Ends when the process closes stderr (it exits), so it outlives no member.
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("ready to serve client requests") {
                        let _ = ready_tx.send(true);
                    }
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    if log.len() == LOG_LINES_KEPT {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            });
        }
        self.running[i] = Some(Running { child, log, ready });
    }

    fn log_tail(&self, i: usize) -> String {
        match &self.running[i] {
            Some(r) => r
                .log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            None => String::from("(not running)"),
        }
    }

    /// Waits until member `i` printed that it is ready and its `/health` says true.
    async fn wait_ready(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        let name = self.specs[i].name.clone();
        let mut ready = match &self.running[i] {
            Some(r) => r.ready.clone(),
            None => return Err(format!("etcd member {name} is not running")),
        };
        let became_ready = tokio::time::timeout_at(deadline.into(), ready.wait_for(|r| *r)).await;
        if !matches!(became_ready, Ok(Ok(_))) {
            // Dead (its stderr closed) or too slow: say which, with its log.
            let exited = self.running[i]
                .as_mut()
                .and_then(|r| r.child.try_wait().ok().flatten());
            return Err(format!(
                "etcd member {name} did not become ready ({}):\n{}",
                match exited {
                    Some(status) => format!("exited with {status}"),
                    None => format!("not within {READY_WITHIN:?}"),
                },
                self.log_tail(i)
            ));
        }
        // Ready means joined with a leader; /health confirms it serves. Bounded retries: a
        // member may say ready a moment before its health endpoint agrees.
        let url = self.specs[i].client_port;
        loop {
            match http(url, "GET", "/health", None).await {
                Ok(body) if body.contains("\"health\":\"true\"") => return Ok(()),
                _ if Instant::now() >= deadline => {
                    return Err(format!(
                        "etcd member {name} is ready but not healthy within {READY_WITHIN:?}:\n{}",
                        self.log_tail(i)
                    ))
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The client URLs of all members (`http://127.0.0.1:PORT`), running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.specs.iter().map(Spec::client_url).collect()
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.specs[i].client_url()
    }

    /// How many members the cluster has, running or not.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Whether the cluster has no members (never: [`Cluster::start`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The directory that holds every member's data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills member `i` with SIGKILL and waits until it is gone. Its data is kept, so
    /// [`Cluster::restart`] brings it back with the same identity.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut r) = self.running[i].take() {
            let _ = r.child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), r.child.wait()).await;
        }
    }

    /// Starts member `i` again (after [`Cluster::kill`]) on the same ports with the same
    /// data, and waits until it is ready and healthy (so a lone member has a leader again).
    pub async fn restart(&mut self, i: usize) {
        assert!(
            self.running[i].is_none(),
            "member {i} is still running; kill it first"
        );
        self.spawn(i, false);
        if let Err(e) = self.wait_ready(i).await {
            panic!("{e}");
        }
    }

    /// Whether member `i` is running (started and not killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.running[i].is_some()
    }

    /// The index of the member that is the leader now, asked of the running members in
    /// turn; waits (bounded, 10 s) while an election is under way. Panics if no leader
    /// emerges.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for (i, spec) in self.specs.iter().enumerate() {
                if self.running[i].is_none() {
                    continue;
                }
                let Ok(body) = http(
                    spec.client_port,
                    "POST",
                    "/v3/maintenance/status",
                    Some("{}"),
                )
                .await
                else {
                    continue;
                };
                let (Some(leader), Some(me)) =
                    (json_field(&body, "leader"), json_field(&body, "member_id"))
                else {
                    continue;
                };
                if leader == "0" {
                    continue;
                }
                if leader == me {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no etcd member is the leader after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for r in self.running.iter_mut().flatten() {
            let _ = r.child.start_kill();
        }
        // The processes may hold files open a moment longer; the removal is best effort
        // and only tidies the temporary directory.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The string or number value of the first `"key":` in a flat reading of JSON `body`.
/// Enough for etcd's status answer, whose ids are 64-bit numbers written as strings.
fn json_field(body: &str, key: &str) -> Option<String> {
    let at = body.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = body[at..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        return Some(s[..s.find('"')?].to_owned());
    }
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    (end > 0).then(|| rest[..end].to_owned())
}

/// One HTTP/1.1 exchange with `127.0.0.1:port` (connection closed after it): the body of a
/// 200 answer, or what went wrong.
async fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> Result<String, String> {
    let exchange = async {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        // Bounded: a status or health answer is a few hundred bytes.
        s.take(1 << 20)
            .read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("malformed answer: {answer:?}"))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("answer {head:?}"));
        }
        Ok(body.to_owned())
    };
    tokio::time::timeout(HTTP_WITHIN, exchange)
        .await
        .map_err(|_| format!("no answer within {HTTP_WITHIN:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields_are_read_as_strings_or_numbers() {
        let body = r#"{"header":{"cluster_id":"1","member_id":"42","revision":"7"},"leader":"42","raftTerm": 3}"#;
        assert_eq!(json_field(body, "member_id").as_deref(), Some("42"));
        assert_eq!(json_field(body, "leader").as_deref(), Some("42"));
        assert_eq!(json_field(body, "raftTerm").as_deref(), Some("3"));
        assert_eq!(json_field(body, "absent"), None);
    }

    #[tokio::test]
    async fn a_three_member_cluster_elects_a_new_leader_when_the_leader_is_killed() {
        let Some(mut cluster) = Cluster::start_or_skip(3).await else {
            return;
        };
        let first = cluster.leader().await;
        cluster.kill(first).await;
        assert!(!cluster.is_running(first));
        let second = crate::within(15, "a new leader", cluster.leader()).await;
        assert_ne!(first, second);
        cluster.restart(first).await;
        assert!(cluster.is_running(first));
    }
}

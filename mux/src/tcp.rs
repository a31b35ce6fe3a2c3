//! The socket options a TCP connection under a session should have.
//!
//! A session shares one connection between all its channels, so whatever the kernel holds in
//! that connection's send queue is ahead of every channel's next frame. On loopback and fast
//! links Linux lets the unsent part of that queue grow to megabytes; a 64-byte round trip on
//! one channel then waits behind a bulk channel's megabytes (docs/performance.md,
//! "Fairness"). Capping the unsent bytes (`TCP_NOTSENT_LOWAT`) keeps bulk data in the
//! session's own queue instead, where channels take turns.

use std::io;
use tokio::net::TcpStream;

/// The unsent bytes the kernel holds per TCP link under a session, at most (plus about one
/// write), when set by [`tune_tcp`] on Linux: 128 KiB, the middle of the usual range. On
/// loopback, 32 KiB, 128 KiB, 512 KiB and no cap measured the same within noise, in
/// throughput and in a round trip beside a bulk channel; one channel across 50 and 100 ms
/// links kept raw TCP's throughput (docs/performance.md, "Fairness"). Bytes sent and not yet
/// acknowledged are not counted, so the window a WAN link needs is untouched; what the cap
/// bounds is how much a small frame can wait behind in the sender's kernel when the link is
/// slower than the session's writers.
pub const TCP_UNSENT_LIMIT: u32 = 128 * 1024;

/// Prepares a TCP connection to carry a session: disables Nagle's algorithm (`TCP_NODELAY`:
/// frames leave at once) and, on Linux, caps the bytes queued in the kernel but not yet sent
/// at [`TCP_UNSENT_LIMIT`] (`TCP_NOTSENT_LOWAT`; elsewhere only the first is set).
///
/// [`Session::client`](crate::Session::client) and [`Session::server`](crate::Session::server)
/// take any byte stream and leave its options alone: call this on a `TcpStream` before
/// handing it over. `netchan::connect` and `netchan::bind` do, for TCP and TLS links.
///
/// # Errors
///
/// The error of the failed `setsockopt` call.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let tcp = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
/// netchan_mux::tune_tcp(&tcp)?;
/// assert!(tcp.nodelay()?);
/// let session = netchan_mux::Session::client(tcp, netchan_mux::Config::default());
/// # drop(session);
/// # Ok(())
/// # }
/// ```
pub fn tune_tcp(tcp: &TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket2::SockRef::from(tcp).set_tcp_notsent_lowat(TCP_UNSENT_LIMIT)?;
    Ok(())
}

#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_ends_of_a_tuned_connection_cap_their_unsent_bytes() {
        let (a, b) = netchan_testkit::tcp_pair().await;
        for tcp in [&a, &b] {
            tune_tcp(tcp).unwrap();
            assert!(tcp.nodelay().unwrap());
            assert_eq!(
                socket2::SockRef::from(tcp).tcp_notsent_lowat().unwrap(),
                TCP_UNSENT_LIMIT
            );
        }
    }
}

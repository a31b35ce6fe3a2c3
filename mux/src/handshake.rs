//! The channel-open handshake spoken at the start of every yamux stream (docs/protocol.md).
//!
//! ```text
//! request (dialer → listener): version:u8 = 1 | name_len:u8 (1..=255) | name (UTF-8)
//! reply   (listener → dialer): version:u8 = 1 | status:u8 | [reason_len:u8 | reason (UTF-8)]
//! ```
//! The reason is present only when status ≠ 0 (refused). Nothing else is read or written on
//! the stream before the handshake is complete, so application bytes are never mixed in.

use crate::error::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The handshake version this implementation speaks.
pub(crate) const VERSION: u8 = 1;

/// Longest channel name, in bytes (it is sent with a one-byte length).
pub(crate) const MAX_NAME_LEN: usize = 255;

/// The listener's answer to a channel-open request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Status {
    Accepted = 0,
    NoListener = 1,
    TooManyChannels = 2,
    SessionClosing = 3,
    InvalidName = 4,
    UnsupportedVersion = 5,
    Busy = 6,
}

impl Status {
    fn from_byte(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Accepted,
            1 => Status::NoListener,
            2 => Status::TooManyChannels,
            3 => Status::SessionClosing,
            4 => Status::InvalidName,
            5 => Status::UnsupportedVersion,
            6 => Status::Busy,
            _ => return None,
        })
    }
}

/// Checks the naming rules: non-empty, at most 255 bytes of UTF-8, no control characters.
pub(crate) fn validate_name(name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        "name is empty"
    } else if name.len() > MAX_NAME_LEN {
        "name is longer than 255 bytes"
    } else if name.chars().any(char::is_control) {
        "name contains a control character"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

/// Encodes a request for `name`, which must be at most 255 bytes (callers validate first).
pub(crate) fn encode_request(name: &str) -> Vec<u8> {
    debug_assert!(!name.is_empty() && name.len() <= MAX_NAME_LEN);
    let mut buf = Vec::with_capacity(2 + name.len());
    buf.push(VERSION);
    buf.push(name.len() as u8);
    buf.extend_from_slice(name.as_bytes());
    buf
}

/// Encodes a reply; the reason is cut at 255 bytes (on a character boundary).
pub(crate) fn encode_reply(status: Status, reason: &str) -> Vec<u8> {
    let mut buf = vec![VERSION, status as u8];
    if status != Status::Accepted {
        let mut end = reason.len().min(255);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        buf.push(end as u8);
        buf.extend_from_slice(&reason.as_bytes()[..end]);
    }
    buf
}

/// Why an inbound request cannot be served, and what to answer (if anything).
#[derive(Debug)]
pub(crate) enum RequestError {
    /// The peer speaks another version; answer `UnsupportedVersion`.
    Version(u8),
    /// The name breaks the rules; answer `InvalidName`.
    Name(Error),
    /// The stream failed or ended mid-request; nobody to answer.
    Io(std::io::Error),
}

/// Reads one request. Reads exactly the request's bytes, never more.
pub(crate) async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, RequestError> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).await.map_err(RequestError::Io)?;
    if head[0] != VERSION {
        return Err(RequestError::Version(head[0]));
    }
    let mut name = vec![0u8; usize::from(head[1])];
    r.read_exact(&mut name).await.map_err(RequestError::Io)?;
    let name = String::from_utf8(name).map_err(|e| {
        RequestError::Name(Error::InvalidName {
            name: String::from_utf8_lossy(e.as_bytes()).into_owned(),
            reason: "name is not valid UTF-8",
        })
    })?;
    validate_name(&name).map_err(RequestError::Name)?;
    Ok(name)
}

/// Reads the reply to a request for `name`: `Ok(())` if accepted, else the refusal as an error.
pub(crate) async fn read_reply<R: AsyncRead + Unpin>(r: &mut R, name: &str) -> Result<(), Error> {
    let violation = |detail: String| Error::Handshake {
        name: name.to_owned(),
        detail,
    };
    let mut head = [0u8; 2];
    // An end of stream here is reported as i/o (`UnexpectedEof`): the caller knows whether
    // the session went down meanwhile or the peer just dropped the stream.
    r.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(violation(format!(
            "peer answered with handshake version {}, we speak {VERSION}",
            head[0]
        )));
    }
    let status = Status::from_byte(head[1])
        .ok_or_else(|| violation(format!("unknown status {}", head[1])))?;
    if status == Status::Accepted {
        return Ok(());
    }
    let mut len = [0u8; 1];
    r.read_exact(&mut len)
        .await
        .map_err(|e| violation(format!("truncated refusal: {e}")))?;
    let mut reason = vec![0u8; usize::from(len[0])];
    r.read_exact(&mut reason)
        .await
        .map_err(|e| violation(format!("truncated refusal: {e}")))?;
    let reason = String::from_utf8_lossy(&reason).into_owned();
    Err(match status {
        Status::NoListener => Error::NoListener {
            name: name.to_owned(),
        },
        _ => Error::Refused {
            name: name.to_owned(),
            reason,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_are_version_length_name() {
        assert_eq!(encode_request("rpc"), [1, 3, b'r', b'p', b'c']);
    }

    #[test]
    fn accepted_reply_is_two_bytes() {
        assert_eq!(encode_reply(Status::Accepted, "ignored"), [1, 0]);
    }

    #[test]
    fn refusal_carries_its_reason() {
        assert_eq!(
            encode_reply(Status::NoListener, "no"),
            [1, 1, 2, b'n', b'o']
        );
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let reason = "é".repeat(200); // 400 bytes
        let buf = encode_reply(Status::Busy, &reason);
        assert_eq!(buf[2], 254);
        assert!(std::str::from_utf8(&buf[3..]).is_ok());
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("files/alice").is_ok());
        assert!(validate_name(&"x".repeat(255)).is_ok());
        for bad in ["", "a\nb", "\u{0}x", "tab\t"] {
            assert!(matches!(validate_name(bad), Err(Error::InvalidName { .. })));
        }
        assert!(validate_name(&"x".repeat(256)).is_err());
        assert!(validate_name("\u{0}keepalive").is_err());
    }

    #[tokio::test]
    async fn request_round_trips_and_reads_nothing_more() {
        let mut bytes = encode_request("chat");
        bytes.extend_from_slice(b"payload");
        let mut r = &bytes[..];
        assert_eq!(read_request(&mut r).await.unwrap(), "chat");
        assert_eq!(r, b"payload");
    }

    #[tokio::test]
    async fn bad_requests_are_classified() {
        let mut r: &[u8] = &[2, 1, b'x'];
        assert!(matches!(
            read_request(&mut r).await,
            Err(RequestError::Version(2))
        ));
        let mut r: &[u8] = &[1, 0];
        assert!(matches!(
            read_request(&mut r).await,
            Err(RequestError::Name(_))
        ));
        let mut r: &[u8] = &[1, 2, 0xff, 0xfe];
        assert!(matches!(
            read_request(&mut r).await,
            Err(RequestError::Name(_))
        ));
        let mut r: &[u8] = &[1, 5, b'a'];
        assert!(matches!(
            read_request(&mut r).await,
            Err(RequestError::Io(_))
        ));
    }

    #[tokio::test]
    async fn replies_map_to_errors() {
        let mut r: &[u8] = &[1, 0, 9];
        assert!(read_reply(&mut r, "a").await.is_ok());
        assert_eq!(r, [9]);
        let bytes = encode_reply(Status::NoListener, "nobody");
        assert!(matches!(
            read_reply(&mut &bytes[..], "a").await,
            Err(Error::NoListener { name }) if name == "a"
        ));
        let bytes = encode_reply(Status::TooManyChannels, "limit 4");
        assert!(matches!(
            read_reply(&mut &bytes[..], "a").await,
            Err(Error::Refused { reason, .. }) if reason == "limit 4"
        ));
        let mut r: &[u8] = &[1, 77];
        assert!(matches!(
            read_reply(&mut r, "a").await,
            Err(Error::Handshake { .. })
        ));
        let mut r: &[u8] = &[];
        assert!(matches!(
            read_reply(&mut r, "a").await,
            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof
        ));
    }
}

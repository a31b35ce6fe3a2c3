//! The hello exchange: the first thing on every session, on the dedicated channel [`CHANNEL`].
//!
//! The hub listens on nothing but this channel until the exchange succeeds, so a peer that
//! skips it cannot reach any service. The client sends
//! `version: u8 | token_len: u16 BE | token bytes` (an empty token when it has none), the hub
//! answers `code: u8 | msg_len: u16 BE | msg (UTF-8)`. Tokens are compared in constant time
//! and never logged.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Mux channel name of the hello exchange.
pub(crate) const CHANNEL: &str = "fileshare.hello";

/// The only protocol version spoken. 2: `Chunk` carries mtime, mode and the SHA-256 of the
/// file, `Entry` its mtime. 3: after the hello both sides set up an rpc `Peer` link instead of
/// the `hub` channel (docs/protocol.md, Part 3).
pub(crate) const VERSION: u8 = 3;

/// Longest token accepted, in bytes.
pub(crate) const MAX_TOKEN_LEN: usize = 1024;

/// Longest reply message accepted, in bytes.
const MAX_MSG_LEN: usize = 1024;

/// How long each side waits for the other's half of the exchange.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

/// What a client refused at the per-address cap is told.
pub(crate) const TOO_MANY_FROM_ADDRESS: &str = "the hub refused the connection: too many \
     connections from your address are still joining; try again in a moment";

/// The hub's verdict codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Code {
    Ok = 0,
    BadToken = 1,
    TokenRequired = 2,
    BadVersion = 3,
    TlsRequired = 4,
    /// Refused at admission (a cap); the text says which, for the user.
    Refused = 5,
}

/// A refusal the hub sends without looking at the hello's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The hub speaks TLS and the client connected in plaintext.
    TlsRequired,
    /// Too many connections from the client's address are still saying hello.
    TooManyFromAddress,
    /// The client dialed a hub's hub-to-hub listener, which serves only the fleet's hubs.
    HubToHubOnly,
    /// A hub dialed another hub's fleet listener in plaintext, and that listener requires
    /// mutual TLS.
    FleetTlsRequired,
}

/// What a hub that dials a fleet listener requiring mutual TLS in plaintext is told.
pub(crate) const FLEET_TLS_REQUIRED: &str = "this hub-to-hub listener requires mutual TLS: \
     give every hub of the fleet --fleet-ca and a --tls-cert signed by that CA";

/// What a client that dials a hub's hub-to-hub listener is told.
pub(crate) const HUB_TO_HUB_ONLY: &str = "this address is a hub's hub-to-hub listener, for the \
     other hubs of its fleet: connect to the hub's client address (its --listen) instead";

/// Why the hello exchange failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    /// The hub requires a token and none was given.
    #[error("the hub requires a token: pass --token or set SHARE_TOKEN")]
    TokenRequired,
    /// The token did not match the hub's.
    #[error("the hub refused the token")]
    BadToken,
    /// The two sides speak different protocol versions.
    #[error("protocol version mismatch: {detail}")]
    BadVersion {
        /// What each side speaks.
        detail: String,
    },
    /// The hub requires TLS and the client connected in plaintext.
    #[error("the hub requires TLS: connect with --tls-ca CERT (the hub's certificate or its CA)")]
    TlsRequired,
    /// The hub turned the connection away at one of its caps; worth retrying later.
    #[error("{reason}")]
    Refused {
        /// The hub's sentence.
        reason: String,
    },
    /// An empty token was configured.
    #[error("the token is empty")]
    EmptyToken,
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("token of {len} bytes is longer than the limit of {MAX_TOKEN_LEN}")]
    TokenTooLong {
        /// Its length.
        len: usize,
    },
    /// The other side sent something that is not a hello message.
    #[error("malformed hello message: {detail}")]
    Malformed {
        /// What was wrong.
        detail: String,
    },
    /// The other side did not answer within [`TIMEOUT`].
    #[error("no hello answer within {after:?}")]
    Timeout {
        /// How long we waited.
        after: Duration,
    },
    /// The channel failed.
    #[error("hello exchange failed")]
    Io(#[from] std::io::Error),
}

/// The hub's secret, compared in constant time. `Debug` does not show it.
#[derive(Clone)]
pub(crate) struct Token(Vec<u8>);

impl Token {
    /// Wraps a secret. Errors if it is empty or too long.
    pub(crate) fn new(secret: &str) -> Result<Token, AuthError> {
        if secret.len() > MAX_TOKEN_LEN {
            return Err(AuthError::TokenTooLong { len: secret.len() });
        }
        if secret.is_empty() {
            return Err(AuthError::EmptyToken);
        }
        Ok(Token(secret.as_bytes().to_vec()))
    }

    /// The secret, to present it in a hello.
    pub(crate) fn secret(&self) -> &str {
        // Made from a `&str` by `Token::new`.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Constant-time comparison: the time taken depends only on the secret's length, never on
    /// where `given` first differs or how long it is.
    pub(crate) fn matches(&self, given: &[u8]) -> bool {
        let mut diff = u8::from(given.len() != self.0.len());
        for (i, &b) in self.0.iter().enumerate() {
            diff |= b ^ given.get(i).copied().unwrap_or(!b);
        }
        // Keep the fold from being short-circuited.
        std::hint::black_box(diff) == 0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

async fn with_timeout<T>(
    fut: impl std::future::Future<Output = Result<T, AuthError>>,
) -> Result<T, AuthError> {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .map_err(|_| AuthError::Timeout { after: TIMEOUT })?
}

/// The hub's OK answer from a hub that checks tokens (a hub without one says [`WELCOME`]).
pub(crate) const WELCOME_TOKEN_CHECKED: &str = "welcome; token checked";

/// The hub's OK answer from a hub that admits anyone.
pub(crate) const WELCOME: &str = "welcome";

/// What a client learns from an accepted hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Welcome {
    /// The hub checked the client's token (it has one of its own).
    pub(crate) token_checked: bool,
}

/// Client side: presents `token` (if any) and waits for the hub's verdict.
///
/// Not cancel-safe (a partial exchange leaves the channel unusable; drop it).
pub(crate) async fn client_hello<S>(io: &mut S, token: Option<&str>) -> Result<Welcome, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let token = token.unwrap_or("").as_bytes();
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::TokenTooLong { len: token.len() });
    }
    let mut msg = Vec::with_capacity(3 + token.len());
    msg.push(VERSION);
    msg.extend_from_slice(&(token.len() as u16).to_be_bytes());
    msg.extend_from_slice(token);
    io.write_all(&msg).await?;
    io.flush().await?;
    with_timeout(async {
        let code = io.read_u8().await?;
        let len = io.read_u16().await? as usize;
        if len > MAX_MSG_LEN {
            return Err(AuthError::Malformed {
                detail: format!("reply of {len} bytes"),
            });
        }
        let mut text = vec![0; len];
        io.read_exact(&mut text).await?;
        let text = String::from_utf8_lossy(&text).into_owned();
        match code {
            c if c == Code::Ok as u8 => Ok(Welcome {
                token_checked: text == WELCOME_TOKEN_CHECKED,
            }),
            c if c == Code::BadToken as u8 => Err(AuthError::BadToken),
            c if c == Code::TokenRequired as u8 => Err(AuthError::TokenRequired),
            c if c == Code::BadVersion as u8 => Err(AuthError::BadVersion { detail: text }),
            c if c == Code::TlsRequired as u8 => Err(AuthError::TlsRequired),
            c if c == Code::Refused as u8 => Err(AuthError::Refused { reason: text }),
            other => Err(AuthError::Malformed {
                detail: format!("unknown reply code {other}: {text}"),
            }),
        }
    })
    .await
}

/// Hub side: reads the client's hello, checks it against `expected`, and answers.
///
/// `on_accept` runs after the check succeeded and before the OK answer is sent, so whatever it
/// sets up (the hub's service listener) exists by the time the client hears OK. Not cancel-safe.
pub(crate) async fn server_hello<S>(
    io: &mut S,
    expected: Option<&Token>,
    on_accept: impl FnOnce() -> Result<(), String>,
) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (version, given) = with_timeout(async {
        let version = io.read_u8().await?;
        let len = io.read_u16().await? as usize;
        if len > MAX_TOKEN_LEN {
            return Err(AuthError::TokenTooLong { len });
        }
        let mut given = vec![0; len];
        io.read_exact(&mut given).await?;
        Ok((version, given))
    })
    .await?;
    let verdict = if version != VERSION {
        Err((
            Code::BadVersion,
            AuthError::BadVersion {
                detail: format!(
                    "the hub speaks version {VERSION}, this client {version}: run the same \
                     version of share on both sides"
                ),
            },
        ))
    } else {
        match expected {
            None => Ok(()),
            Some(_) if given.is_empty() => Err((Code::TokenRequired, AuthError::TokenRequired)),
            Some(t) if t.matches(&given) => Ok(()),
            Some(_) => Err((Code::BadToken, AuthError::BadToken)),
        }
    };
    let verdict = verdict.and_then(|()| {
        on_accept().map_err(|detail| {
            (
                Code::BadVersion,
                AuthError::Malformed {
                    detail: format!("hub could not accept the session: {detail}"),
                },
            )
        })
    });
    let (code, text, result) = match verdict {
        Ok(()) if expected.is_some() => (Code::Ok, WELCOME_TOKEN_CHECKED.to_owned(), Ok(())),
        Ok(()) => (Code::Ok, WELCOME.to_owned(), Ok(())),
        Err((code, err)) => (code, err.to_string(), Err(err)),
    };
    answer(io, code, &text).await?;
    result
}

/// Hub side: reads the client's hello (bounded by [`TIMEOUT`]) and answers with `refusal`
/// whatever it said.
pub(crate) async fn server_refuse<S>(io: &mut S, refusal: Refusal) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    with_timeout(async {
        let _version = io.read_u8().await?;
        let len = io.read_u16().await? as usize;
        if len > MAX_TOKEN_LEN {
            return Err(AuthError::TokenTooLong { len });
        }
        let mut given = vec![0; len];
        io.read_exact(&mut given).await?;
        Ok(())
    })
    .await?;
    let (code, err) = match refusal {
        Refusal::TlsRequired => (Code::TlsRequired, AuthError::TlsRequired),
        Refusal::TooManyFromAddress => (
            Code::Refused,
            AuthError::Refused {
                reason: TOO_MANY_FROM_ADDRESS.to_owned(),
            },
        ),
        Refusal::HubToHubOnly => (
            Code::Refused,
            AuthError::Refused {
                reason: HUB_TO_HUB_ONLY.to_owned(),
            },
        ),
        Refusal::FleetTlsRequired => (
            Code::Refused,
            AuthError::Refused {
                reason: FLEET_TLS_REQUIRED.to_owned(),
            },
        ),
    };
    answer(io, code, &err.to_string()).await
}

/// Writes the hub's answer: `code | len: u16 BE | text` (text cut to [`MAX_MSG_LEN`]).
async fn answer<S>(io: &mut S, code: Code, text: &str) -> Result<(), AuthError>
where
    S: AsyncWrite + Unpin,
{
    let mut msg = vec![code as u8];
    let text = &text.as_bytes()[..text.len().min(MAX_MSG_LEN)];
    msg.extend_from_slice(&(text.len() as u16).to_be_bytes());
    msg.extend_from_slice(text);
    io.write_all(&msg).await?;
    io.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exchange(
        hub_token: Option<&str>,
        client_token: Option<&str>,
    ) -> (Result<Welcome, AuthError>, Result<(), AuthError>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let expected = hub_token.map(|t| Token::new(t).unwrap());
        let client = async { client_hello(&mut a, client_token).await };
        let hub = async { server_hello(&mut b, expected.as_ref(), || Ok(())).await };
        tokio::join!(client, hub)
    }

    /// Pins the bytes documented in docs/protocol.md, Part 3.
    #[tokio::test]
    async fn the_hello_bytes_are_the_documented_ones() {
        // Client: version 3, token length 6 (u16 BE), "s3cret".
        let (mut a, mut b) = tokio::io::duplex(4096);
        let hub = async {
            let mut got = [0u8; 9];
            b.read_exact(&mut got).await.unwrap();
            b.write_all(b"\x00\x00\x07welcome").await.unwrap();
            got
        };
        let (client, got) = tokio::join!(client_hello(&mut a, Some("s3cret")), hub);
        client.unwrap();
        assert_eq!(&got, b"\x03\x00\x06s3cret");
        // Hub: a refused token is code 1 with the reason as text.
        let (mut a, mut b) = tokio::io::duplex(4096);
        let expected = Token::new("right").unwrap();
        let hub = server_hello(&mut b, Some(&expected), || Ok(()));
        let client = async {
            a.write_all(b"\x03\x00\x05wrong").await.unwrap();
            let mut reply = [0u8; 28];
            a.read_exact(&mut reply).await.unwrap();
            reply
        };
        let (verdict, reply) = tokio::join!(hub, client);
        assert!(matches!(verdict, Err(AuthError::BadToken)));
        assert_eq!(&reply, b"\x01\x00\x19the hub refused the token");
    }

    #[tokio::test]
    async fn no_token_on_either_side_is_accepted() {
        let (c, h) = exchange(None, None).await;
        c.unwrap();
        h.unwrap();
    }

    #[tokio::test]
    async fn the_right_token_is_accepted_and_the_client_learns_it_was_checked() {
        let (c, h) = exchange(Some("s3cret"), Some("s3cret")).await;
        assert!(c.unwrap().token_checked);
        h.unwrap();
        // A hub without a token admits anyone, and says so.
        let (c, _) = exchange(None, Some("s3cret")).await;
        assert!(!c.unwrap().token_checked);
    }

    #[tokio::test]
    async fn a_wrong_token_is_refused_on_both_sides() {
        let (c, h) = exchange(Some("s3cret"), Some("guess")).await;
        assert!(matches!(c, Err(AuthError::BadToken)), "{c:?}");
        assert!(matches!(h, Err(AuthError::BadToken)), "{h:?}");
    }

    #[tokio::test]
    async fn a_missing_token_is_reported_as_required() {
        let (c, _) = exchange(Some("s3cret"), None).await;
        let err = c.unwrap_err();
        assert!(matches!(err, AuthError::TokenRequired));
        assert!(err.to_string().contains("SHARE_TOKEN"));
    }

    #[tokio::test]
    async fn a_token_sent_to_a_hub_without_one_is_accepted() {
        let (c, h) = exchange(None, Some("extra")).await;
        c.unwrap();
        h.unwrap();
    }

    #[tokio::test]
    async fn a_failing_accept_hook_is_reported_to_the_client() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (c, h) = tokio::join!(
            client_hello(&mut a, None),
            server_hello(&mut b, None, || Err("listener busy".into()))
        );
        assert!(c.unwrap_err().to_string().contains("listener busy"));
        assert!(h.is_err());
    }

    #[tokio::test]
    async fn a_plaintext_client_of_a_tls_hub_is_told_the_hub_requires_tls() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (c, h) = tokio::join!(
            client_hello(&mut a, Some("s3cret")),
            server_refuse(&mut b, Refusal::TlsRequired)
        );
        h.unwrap();
        let err = c.unwrap_err();
        assert!(matches!(err, AuthError::TlsRequired), "{err:?}");
        assert!(err.to_string().contains("requires TLS"), "{err}");
    }

    #[tokio::test]
    async fn a_client_refused_at_admission_is_told_why_in_a_sentence() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (c, h) = tokio::join!(
            client_hello(&mut a, None),
            server_refuse(&mut b, Refusal::TooManyFromAddress)
        );
        h.unwrap();
        let err = c.unwrap_err();
        assert!(matches!(err, AuthError::Refused { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("too many connections from your address"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_wrong_version_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let client = async {
            a.write_all(&[9, 0, 0]).await.unwrap();
            let code = a.read_u8().await.unwrap();
            code
        };
        let (code, h) = tokio::join!(client, server_hello(&mut b, None, || Ok(())));
        assert_eq!(code, Code::BadVersion as u8);
        assert!(matches!(h, Err(AuthError::BadVersion { .. })));
    }

    /// A client of the previous protocol (version 2, with the `hub` channel) is told what is
    /// wrong, in its own hello, instead of failing later on a channel it does not know.
    #[tokio::test]
    async fn a_version_2_client_is_told_the_versions() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let client = async {
            a.write_all(&[2, 0, 0]).await.unwrap();
            let code = a.read_u8().await.unwrap();
            let len = a.read_u16().await.unwrap();
            let mut text = vec![0; len.into()];
            a.read_exact(&mut text).await.unwrap();
            (code, String::from_utf8(text).unwrap())
        };
        let ((code, text), h) = tokio::join!(client, server_hello(&mut b, None, || Ok(())));
        assert_eq!(code, Code::BadVersion as u8);
        assert!(matches!(h, Err(AuthError::BadVersion { .. })));
        assert!(
            text.contains("version 3") && text.contains("client 2"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_oversized_token_length_is_refused_without_reading_it() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&[VERSION, 0xff, 0xff]).await.unwrap();
        let h = server_hello(&mut b, None, || Ok(())).await;
        assert!(matches!(h, Err(AuthError::TokenTooLong { len: 65535 })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_times_out() {
        let (_a, mut b) = tokio::io::duplex(4096);
        let h = server_hello(&mut b, None, || Ok(())).await;
        assert!(matches!(h, Err(AuthError::Timeout { .. })), "{h:?}");
    }

    #[test]
    fn token_comparison_checks_every_byte_and_the_length() {
        let t = Token::new("abcdef").unwrap();
        assert!(t.matches(b"abcdef"));
        assert!(!t.matches(b"abcdeg"));
        assert!(!t.matches(b"abcde"));
        assert!(!t.matches(b"abcdefg"));
        assert!(!t.matches(b""));
        assert!(!t.matches(b"\0bcdef"));
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        assert!(matches!(Token::new(""), Err(AuthError::EmptyToken)));
    }
}

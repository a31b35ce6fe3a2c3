//! [`Addr`]: where a link goes, parsed from the strings users type.

use std::{fmt, path::PathBuf, str::FromStr};

/// Where to [`connect`](crate::connect) or [`bind`](crate::bind), parsed from a string.
///
/// | string | meaning |
/// |---|---|
/// | `host:port`, `tcp://host:port` | TCP (host: a name, an IPv4 address or `[v6]`) |
/// | `tls://host:port` | TCP under TLS (feature `tls`) |
/// | `unix:/path/to.sock` | a Unix socket at a path (relative paths are allowed) |
/// | `unix:@name` | a Linux abstract Unix socket (no file; gone with its last fd) |
///
/// [`Display`](fmt::Display) gives back a string that parses to the same address, with the
/// scheme spelled out (`tcp://` for TCP).
///
/// ```
/// use netchan::Addr;
///
/// let addr: Addr = "127.0.0.1:8765".parse()?;
/// assert_eq!(addr, Addr::Tcp { host: "127.0.0.1".into(), port: 8765 });
/// assert_eq!(addr.to_string(), "tcp://127.0.0.1:8765");
/// assert_eq!("unix:@hub".parse::<Addr>()?.to_string(), "unix:@hub");
/// assert_eq!("tls://[::1]:443".parse::<Addr>()?, Addr::Tls { host: "::1".into(), port: 443 });
///
/// let err = "unix:".parse::<Addr>().unwrap_err();
/// assert_eq!(err.to_string(), "invalid address \"unix:\": unix: needs a path or an @name");
/// # Ok::<(), netchan::net::AddrError>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    /// TCP to `host:port`.
    Tcp {
        /// A DNS name or an IP address (IPv6 without brackets).
        host: String,
        /// The port (0 when binding: any free port).
        port: u16,
    },
    /// TCP under TLS to `host:port`; the client verifies the server's certificate for `host`
    /// unless told another name.
    Tls {
        /// A DNS name or an IP address (IPv6 without brackets).
        host: String,
        /// The port (0 when binding: any free port).
        port: u16,
    },
    /// A Unix socket at a filesystem path.
    Unix(PathBuf),
    /// A Linux abstract Unix socket: a name with no file behind it.
    AbstractUnix(String),
}

/// Why a string is not an [`Addr`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {input:?}: {problem}")]
pub struct AddrError {
    /// The string as given.
    pub input: String,
    /// What is wrong with it.
    pub problem: AddrProblem,
}

/// What is wrong with an address string (see [`AddrError`]).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrProblem {
    /// The string is empty.
    #[error("the address is empty")]
    Empty,
    /// A scheme we do not know (`udp://...`).
    #[error("unknown scheme {scheme:?} (expected tcp://, tls:// or unix:)")]
    UnknownScheme {
        /// The scheme as given, without `://`.
        scheme: String,
    },
    /// `unix:` with nothing after it.
    #[error("unix: needs a path or an @name")]
    MissingUnixPath,
    /// `unix:@` with no name after the `@`.
    #[error("unix:@ needs a name after the @")]
    MissingAbstractName,
    /// A host with no `:port`.
    #[error("missing :port")]
    MissingPort,
    /// A port with nothing before it.
    #[error("missing host before :{port}")]
    MissingHost {
        /// The port part.
        port: String,
    },
    /// A port that is not a number from 0 to 65535.
    #[error("port {port:?} is not a number from 0 to 65535")]
    BadPort {
        /// The port part as given.
        port: String,
    },
    /// A bare IPv6 address without brackets (`::1:80` is ambiguous).
    #[error("an IPv6 host needs brackets: [{host}]:port")]
    UnbracketedIpv6 {
        /// The host part as given.
        host: String,
    },
}

impl Addr {
    /// Whether the link runs under TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Addr::Tls { .. })
    }
}

impl FromStr for Addr {
    type Err = AddrError;

    fn from_str(input: &str) -> Result<Addr, AddrError> {
        parse(input).map_err(|problem| AddrError {
            input: input.to_owned(),
            problem,
        })
    }
}

fn parse(input: &str) -> Result<Addr, AddrProblem> {
    if input.is_empty() {
        return Err(AddrProblem::Empty);
    }
    if let Some(rest) = input.strip_prefix("unix:") {
        // `unix://path` is a common slip for `unix:/path`: take the path as written after `//`
        // only when it stays absolute, which `unix:///tmp/x` does.
        let rest = rest
            .strip_prefix("//")
            .filter(|r| r.starts_with('/'))
            .unwrap_or(rest);
        return match rest.strip_prefix('@') {
            Some("") => Err(AddrProblem::MissingAbstractName),
            Some(name) => Ok(Addr::AbstractUnix(name.to_owned())),
            None if rest.is_empty() => Err(AddrProblem::MissingUnixPath),
            None => Ok(Addr::Unix(PathBuf::from(rest))),
        };
    }
    let (tls, hostport) = match input.split_once("://") {
        Some(("tcp", rest)) => (false, rest),
        Some(("tls", rest)) => (true, rest),
        Some((scheme, _)) => {
            return Err(AddrProblem::UnknownScheme {
                scheme: scheme.to_owned(),
            })
        }
        None => (false, input),
    };
    let (host, port) = host_port(hostport)?;
    Ok(if tls {
        Addr::Tls { host, port }
    } else {
        Addr::Tcp { host, port }
    })
}

fn host_port(s: &str) -> Result<(String, u16), AddrProblem> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(AddrProblem::MissingPort)?;
        let port = after.strip_prefix(':').ok_or(AddrProblem::MissingPort)?;
        (host, port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or(AddrProblem::MissingPort)?;
        if host.contains(':') {
            return Err(AddrProblem::UnbracketedIpv6 {
                host: host.to_owned(),
            });
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(AddrProblem::MissingHost {
            port: port.to_owned(),
        });
    }
    let port = match port.parse::<u16>() {
        Ok(p) if port.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => {
            return Err(AddrProblem::BadPort {
                port: port.to_owned(),
            })
        }
    };
    Ok((host.to_owned(), port))
}

struct HostPort<'a>(&'a str, u16);

impl fmt::Display for HostPort<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.contains(':') {
            write!(f, "[{}]:{}", self.0, self.1)
        } else {
            write!(f, "{}:{}", self.0, self.1)
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp { host, port } => write!(f, "tcp://{}", HostPort(host, *port)),
            Addr::Tls { host, port } => write!(f, "tls://{}", HostPort(host, *port)),
            Addr::Unix(path) => write!(f, "unix:{}", path.display()),
            Addr::AbstractUnix(name) => write!(f, "unix:@{name}"),
        }
    }
}

/// Anything [`connect`](crate::connect) and [`bind`](crate::bind) take as an address: an
/// [`Addr`], or a string parsed as one.
pub trait IntoAddr {
    /// The address, or why the string is not one.
    fn into_addr(self) -> Result<Addr, AddrError>;
}

impl IntoAddr for Addr {
    fn into_addr(self) -> Result<Addr, AddrError> {
        Ok(self)
    }
}

impl IntoAddr for &Addr {
    fn into_addr(self) -> Result<Addr, AddrError> {
        Ok(self.clone())
    }
}

impl IntoAddr for &str {
    fn into_addr(self) -> Result<Addr, AddrError> {
        self.parse()
    }
}

impl IntoAddr for String {
    fn into_addr(self) -> Result<Addr, AddrError> {
        self.parse()
    }
}

impl IntoAddr for &String {
    fn into_addr(self) -> Result<Addr, AddrError> {
        self.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(s: &str) -> AddrProblem {
        s.parse::<Addr>().unwrap_err().problem
    }

    #[test]
    fn every_form_parses_and_displays_back_to_itself() {
        for s in [
            "tcp://127.0.0.1:8765",
            "tcp://localhost:0",
            "tcp://[::1]:80",
            "tls://hub.example:443",
            "tls://[::1]:443",
            "unix:/tmp/hub.sock",
            "unix:relative/hub.sock",
            "unix:@hub",
        ] {
            let addr: Addr = s.parse().unwrap();
            assert_eq!(addr.to_string(), s);
            assert_eq!(addr.to_string().parse::<Addr>().unwrap(), addr);
        }
    }

    #[test]
    fn a_bare_host_port_is_tcp() {
        assert_eq!(
            "127.0.0.1:1".parse::<Addr>().unwrap(),
            Addr::Tcp {
                host: "127.0.0.1".into(),
                port: 1
            }
        );
        assert_eq!(
            "[::1]:2".parse::<Addr>().unwrap(),
            Addr::Tcp {
                host: "::1".into(),
                port: 2
            }
        );
        assert_eq!(
            "unix:///tmp/x".parse::<Addr>().unwrap(),
            Addr::Unix("/tmp/x".into())
        );
    }

    #[test]
    fn malformed_addresses_name_the_problem() {
        assert_eq!(problem(""), AddrProblem::Empty);
        assert_eq!(problem("unix:"), AddrProblem::MissingUnixPath);
        assert_eq!(problem("unix:@"), AddrProblem::MissingAbstractName);
        assert_eq!(problem("localhost"), AddrProblem::MissingPort);
        assert_eq!(problem("[::1]"), AddrProblem::MissingPort);
        assert_eq!(
            problem(":80"),
            AddrProblem::MissingHost { port: "80".into() }
        );
        assert_eq!(
            problem("host:65536"),
            AddrProblem::BadPort {
                port: "65536".into()
            }
        );
        assert_eq!(
            problem("host:+1"),
            AddrProblem::BadPort { port: "+1".into() }
        );
        assert_eq!(
            problem("tcp://host:"),
            AddrProblem::BadPort { port: "".into() }
        );
        assert_eq!(
            problem("udp://host:1"),
            AddrProblem::UnknownScheme {
                scheme: "udp".into()
            }
        );
        assert_eq!(
            problem("::1:80"),
            AddrProblem::UnbracketedIpv6 { host: "::1".into() }
        );
        let err = "host:99999".parse::<Addr>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid address \"host:99999\": port \"99999\" is not a number from 0 to 65535"
        );
    }
}

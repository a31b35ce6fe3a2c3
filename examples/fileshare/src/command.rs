//! REPL command syntax: splitting a line into words and parsing it into a [`Cmd`].
//!
//! Words are separated by whitespace; `'...'` and `"..."` quote (so paths may contain spaces)
//! and a backslash escapes the next character outside single quotes. A line starting with `#`
//! is a comment.

use std::path::{Path, PathBuf};

use crate::export::{Entry, Kind, Listing};

/// The commands, their arguments and one line of help each (also drives tab completion).
pub(crate) const COMMANDS: &[(&str, &str, &str)] = &[
    ("list", "", "names of the connected peers, one per line"),
    (
        "ls",
        "PEER [DIR]",
        "entries of PEER's directory DIR (default: its root); directories end in /",
    ),
    ("read", "PEER PATH", "print PEER's file PATH to stdout"),
    (
        "get",
        "PEER PATH [LOCAL]",
        "save PEER's file PATH as LOCAL (a new file, or into a directory; default: .)",
    ),
    ("help", "", "this help"),
    ("quit", "", "leave (Ctrl-D too)"),
];

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cmd {
    /// `list`
    List,
    /// `ls PEER [DIR]`
    Ls {
        /// Peer name.
        peer: String,
        /// Directory relative to the peer's root ("" for the root).
        dir: String,
    },
    /// `read PEER PATH`
    Read {
        /// Peer name.
        peer: String,
        /// File path relative to the peer's root.
        path: String,
    },
    /// `get PEER PATH [LOCAL]`
    Get {
        /// Peer name.
        peer: String,
        /// File path relative to the peer's root.
        path: String,
        /// Local file to create.
        local: PathBuf,
    },
    /// `help`
    Help,
    /// `quit` / `exit`
    Quit,
}

/// Why a line is not a valid command.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    /// The first word is not a command.
    #[error("unknown command {word:?} (type help)")]
    Unknown {
        /// The word.
        word: String,
    },
    /// Wrong number of arguments.
    #[error("usage: {usage}")]
    Usage {
        /// The command's synopsis.
        usage: String,
    },
    /// A quote was opened and never closed.
    #[error("unterminated {quote} quote")]
    Unterminated {
        /// The quote character.
        quote: char,
    },
    /// `get` without LOCAL and a PATH with no file name to reuse.
    #[error("cannot derive a local file name from {path:?}; give LOCAL")]
    NoLocalName {
        /// The remote path.
        path: String,
    },
}

/// Splits a line into words, honouring quotes and backslash escapes.
pub(crate) fn split_words(line: &str) -> Result<Vec<String>, ParseError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some('\''), '\'') | (Some('"'), '"') => quote = None,
            (Some('"') | None, '\\') => {
                if let Some(next) = chars.next() {
                    cur.push(next);
                }
                in_word = true;
            }
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if let Some(q) = quote {
        return Err(ParseError::Unterminated { quote: q });
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

fn usage(cmd: &str) -> ParseError {
    let synopsis = COMMANDS
        .iter()
        .find(|(name, _, _)| *name == cmd)
        .map(|(name, args, _)| format!("{name} {args}").trim_end().to_owned())
        .unwrap_or_else(|| cmd.to_owned());
    ParseError::Usage { usage: synopsis }
}

/// The local file name `get` uses when none is given: the last component of `path`.
fn default_local(path: &str) -> Result<PathBuf, ParseError> {
    match Path::new(path).file_name() {
        Some(name) if !path.ends_with('/') => Ok(PathBuf::from(name)),
        _ => Err(ParseError::NoLocalName {
            path: path.to_owned(),
        }),
    }
}

/// Parses one line. `Ok(None)` for an empty line or a comment.
pub(crate) fn parse(line: &str) -> Result<Option<Cmd>, ParseError> {
    if line.trim_start().starts_with('#') {
        return Ok(None);
    }
    let words = split_words(line)?;
    let Some((first, args)) = words.split_first() else {
        return Ok(None);
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cmd = match (first.as_str(), args.as_slice()) {
        ("list", []) => Cmd::List,
        ("ls", [peer]) => Cmd::Ls {
            peer: (*peer).into(),
            dir: String::new(),
        },
        ("ls", [peer, dir]) => Cmd::Ls {
            peer: (*peer).into(),
            dir: (*dir).into(),
        },
        ("read", [peer, path]) => Cmd::Read {
            peer: (*peer).into(),
            path: (*path).into(),
        },
        ("get", [peer, path]) => Cmd::Get {
            peer: (*peer).into(),
            path: (*path).into(),
            local: default_local(path)?,
        },
        ("get", [peer, path, local]) => Cmd::Get {
            peer: (*peer).into(),
            path: (*path).into(),
            local: PathBuf::from(local),
        },
        ("help" | "?", []) => Cmd::Help,
        ("quit" | "exit", []) => Cmd::Quit,
        (w @ ("list" | "ls" | "read" | "get" | "help" | "quit"), _) => return Err(usage(w)),
        (w, _) => return Err(ParseError::Unknown { word: w.to_owned() }),
    };
    Ok(Some(cmd))
}

/// The help text.
pub(crate) fn help_text() -> String {
    let mut out = String::from("commands:\n");
    for (name, args, what) in COMMANDS {
        let synopsis = format!("{name} {args}");
        out.push_str(&format!("  {synopsis:<24}{what}\n"));
    }
    out.push_str("quote paths with spaces: read bob \"my file.txt\"\n");
    out
}

/// One line per entry: size (or `<dir>` and such) right-aligned, then the name; directories
/// end in `/`, symlinks in `@`.
pub(crate) fn format_listing(listing: &Listing) -> String {
    let mut out = String::new();
    for Entry { name, kind, size } in &listing.entries {
        let (col, suffix) = match kind {
            Kind::File => (size.to_string(), ""),
            Kind::Dir => ("<dir>".to_owned(), "/"),
            Kind::Symlink => ("<link>".to_owned(), "@"),
            other => (format!("<{}>", other.describe()), ""),
        };
        out.push_str(&format!("{col:>12}  {}{suffix}\n", name.escape_debug()));
    }
    if listing.truncated {
        out.push_str(&format!(
            "(listing truncated after {} entries)\n",
            listing.entries.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_on_whitespace_and_honour_quotes() {
        assert_eq!(split_words("  ls   bob  ").unwrap(), vec!["ls", "bob"]);
        assert_eq!(
            split_words(r#"read bob "my file.txt""#).unwrap(),
            vec!["read", "bob", "my file.txt"]
        );
        assert_eq!(
            split_words(r#"a 'b "c"' "d \"e\"" f\ g ''"#).unwrap(),
            vec!["a", "b \"c\"", "d \"e\"", "f g", ""]
        );
        assert_eq!(
            split_words("read 'x"),
            Err(ParseError::Unterminated { quote: '\'' })
        );
    }

    #[test]
    fn every_command_parses() {
        assert_eq!(parse("list").unwrap(), Some(Cmd::List));
        assert_eq!(
            parse("ls bob").unwrap(),
            Some(Cmd::Ls {
                peer: "bob".into(),
                dir: "".into()
            })
        );
        assert_eq!(
            parse("ls bob sub/dir").unwrap(),
            Some(Cmd::Ls {
                peer: "bob".into(),
                dir: "sub/dir".into()
            })
        );
        assert_eq!(
            parse("read first-client /tmp/x").unwrap(),
            Some(Cmd::Read {
                peer: "first-client".into(),
                path: "/tmp/x".into()
            })
        );
        assert_eq!(
            parse("get bob dir/big.bin").unwrap(),
            Some(Cmd::Get {
                peer: "bob".into(),
                path: "dir/big.bin".into(),
                local: PathBuf::from("big.bin")
            })
        );
        assert_eq!(
            parse("get bob a.txt /tmp/b.txt").unwrap(),
            Some(Cmd::Get {
                peer: "bob".into(),
                path: "a.txt".into(),
                local: PathBuf::from("/tmp/b.txt")
            })
        );
        assert_eq!(parse("help").unwrap(), Some(Cmd::Help));
        assert_eq!(parse("quit").unwrap(), Some(Cmd::Quit));
        assert_eq!(parse("exit").unwrap(), Some(Cmd::Quit));
    }

    #[test]
    fn blank_lines_and_comments_are_no_commands() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("   ").unwrap(), None);
        assert_eq!(parse("# list").unwrap(), None);
    }

    #[test]
    fn wrong_arguments_give_the_usage() {
        assert_eq!(
            parse("read bob").unwrap_err().to_string(),
            "usage: read PEER PATH"
        );
        assert_eq!(parse("list x").unwrap_err().to_string(), "usage: list");
        assert_eq!(parse("ls").unwrap_err().to_string(), "usage: ls PEER [DIR]");
        assert!(matches!(
            parse("fetch bob x"),
            Err(ParseError::Unknown { .. })
        ));
    }

    #[test]
    fn get_without_a_file_name_needs_local() {
        assert!(matches!(
            parse("get bob sub/"),
            Err(ParseError::NoLocalName { .. })
        ));
        assert!(matches!(
            parse("get bob .."),
            Err(ParseError::NoLocalName { .. })
        ));
    }

    #[test]
    fn listings_mark_directories_and_show_sizes() {
        let listing = Listing {
            entries: vec![
                Entry {
                    name: "a.txt".into(),
                    kind: Kind::File,
                    size: 12,
                },
                Entry {
                    name: "sub".into(),
                    kind: Kind::Dir,
                    size: 0,
                },
                Entry {
                    name: "p".into(),
                    kind: Kind::Fifo,
                    size: 0,
                },
            ],
            truncated: false,
        };
        assert_eq!(
            format_listing(&listing),
            "          12  a.txt\n       <dir>  sub/\n      <fifo>  p\n"
        );
    }

    #[test]
    fn help_lists_every_command() {
        let help = help_text();
        for (name, _, _) in COMMANDS {
            assert!(help.contains(name));
        }
    }
}

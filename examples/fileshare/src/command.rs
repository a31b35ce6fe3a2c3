//! REPL command syntax: splitting a line into words and parsing it into a [`Cmd`].
//!
//! Words are separated by whitespace; `'...'` and `"..."` quote (so paths may contain spaces)
//! and a backslash escapes the next character outside single quotes. A line starting with `#`
//! is a comment.

use std::path::PathBuf;

use crate::proto::{Entry, Kind, Listing};

/// The commands, their arguments and one line of help each (also drives tab completion).
pub(crate) const COMMANDS: &[(&str, &str, &str)] = &[
    (
        "list",
        "",
        "names of the connected peers, one per line; yours is marked (you) on a terminal",
    ),
    (
        "ls",
        "[-l] PEER [DIR]",
        "entries of PEER's directory DIR (default: its root) with sizes; -l adds the \
         exact size, modification time (UTC) and type",
    ),
    (
        "read",
        "PEER PATH",
        "print PEER's file PATH (on a terminal: text only, control characters shown \
         escaped, at most 64 KiB; use get for the rest)",
    ),
    (
        "get",
        "[-f] [-r] PEER PATH... [LOCAL]",
        "save PEER's files: LOCAL is a new file, a directory (default: .) or - for \
         stdout; PATH may be a glob ('*.txt'); -r copies directories; -f overwrites; \
         every copy is checked (size and SHA-256); an interrupted get resumes when run again",
    ),
    (
        "whoami",
        "",
        "your name, the hub, whether you are connected, and what you export",
    ),
    (
        "info",
        "PEER",
        "whether PEER is connected and what its root holds",
    ),
    ("help", "", "this help"),
    ("quit", "", "leave (Ctrl-D too)"),
    ("exit", "", "leave, like quit"),
];

/// Where `get` puts what it copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Local {
    /// Not given: into the current directory, under the remote names.
    Default,
    /// A path as typed (`~` not yet expanded).
    Path(PathBuf),
    /// `-`: standard output.
    Stdout,
}

/// Options of `get`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GetFlags {
    /// `-f`: replace an existing local file.
    pub(crate) force: bool,
    /// `-r`: copy directories with everything in them.
    pub(crate) recursive: bool,
}

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cmd {
    /// `list`
    List,
    /// `ls [-l] PEER [DIR]`
    Ls {
        /// Peer name.
        peer: String,
        /// Directory relative to the peer's root ("" for the root).
        dir: String,
        /// `-l`: the long form.
        long: bool,
    },
    /// `read PEER PATH`
    Read {
        /// Peer name.
        peer: String,
        /// File path relative to the peer's root.
        path: String,
    },
    /// `get [-f] [-r] PEER PATH... [LOCAL]`
    Get {
        /// Peer name.
        peer: String,
        /// Remote paths (or globs), relative to the peer's root.
        paths: Vec<String>,
        /// Where to put them.
        local: Local,
        /// Options.
        flags: GetFlags,
    },
    /// `whoami`
    Whoami,
    /// `info PEER`
    Info {
        /// Peer name.
        peer: String,
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
    #[error("unknown command {word:?}{} (type help)", did_you_mean(.suggestion.as_deref()))]
    Unknown {
        /// The word.
        word: String,
        /// The closest command, if one is close.
        suggestion: Option<String>,
    },
    /// Wrong number of arguments.
    #[error("usage: {usage}")]
    Usage {
        /// The command's synopsis.
        usage: String,
    },
    /// More words than the command takes: most likely a path with spaces, unquoted.
    #[error("{cmd} takes one PATH; quote a path with spaces: {quoted}")]
    Unquoted {
        /// The command.
        cmd: String,
        /// The line as it was probably meant, quoted.
        quoted: String,
    },
    /// An option the command does not have.
    #[error("{cmd} has no option {flag}; usage: {usage}")]
    UnknownFlag {
        /// The command.
        cmd: String,
        /// The option as typed.
        flag: String,
        /// The command's synopsis.
        usage: String,
    },
    /// A quote was opened and never closed.
    #[error("unterminated {quote} quote")]
    Unterminated {
        /// The quote character.
        quote: char,
    },
}

/// `; did you mean X?` or nothing.
pub(crate) fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion.map_or_else(String::new, |s| format!("; did you mean {s}?"))
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a typo (at
/// most 2 edits, and fewer than the word's length).
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|&(d, _)| d <= 2 && d < word.chars().count().max(1))
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c.to_owned())
}

/// Levenshtein distance (by characters).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
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

/// `word` written so that [`split_words`] reads it back as exactly `word`: as is when it has
/// nothing special, else in single quotes, else (it contains `'`) in double quotes with `"`
/// and `\` escaped. `open` leaves the closing quote off (to complete a directory further).
pub(crate) fn quote_word(word: &str, open: bool) -> String {
    let plain = !word.is_empty()
        && !word
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '\'' | '"' | '\\' | '#'));
    if plain {
        return word.to_owned();
    }
    let (q, body) = if word.contains('\'') {
        let mut body = String::new();
        for c in word.chars() {
            if matches!(c, '"' | '\\') {
                body.push('\\');
            }
            body.push(c);
        }
        ('"', body)
    } else {
        ('\'', word.to_owned())
    };
    if open {
        format!("{q}{body}")
    } else {
        format!("{q}{body}{q}")
    }
}

fn synopsis(cmd: &str) -> String {
    COMMANDS
        .iter()
        .find(|(name, _, _)| *name == cmd)
        .map(|(name, args, _)| format!("{name} {args}").trim_end().to_owned())
        .unwrap_or_else(|| cmd.to_owned())
}

fn usage(cmd: &str) -> ParseError {
    ParseError::Usage {
        usage: synopsis(cmd),
    }
}

/// Splits leading `-x` options off `args` (a lone `-` is not one: it is the stdout LOCAL);
/// every option must be in `known`. Combined short options (`-rf`) are accepted.
fn take_flags<'a>(
    cmd: &str,
    args: &'a [&'a str],
    known: &str,
) -> Result<(Vec<char>, &'a [&'a str]), ParseError> {
    let mut flags = Vec::new();
    let mut rest = args;
    while let Some((first, tail)) = rest.split_first() {
        if *first == "--" {
            rest = tail;
            break;
        }
        let Some(letters) = first.strip_prefix('-').filter(|l| !l.is_empty()) else {
            break;
        };
        for c in letters.chars() {
            if !known.contains(c) {
                return Err(ParseError::UnknownFlag {
                    cmd: cmd.to_owned(),
                    flag: format!("-{c}"),
                    usage: synopsis(cmd),
                });
            }
            flags.push(c);
        }
        rest = tail;
    }
    Ok((flags, rest))
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
        ("ls", args) => {
            let (flags, rest) = take_flags("ls", args, "l")?;
            let long = flags.contains(&'l');
            match rest {
                [peer] => Cmd::Ls {
                    peer: (*peer).into(),
                    dir: String::new(),
                    long,
                },
                [peer, dir] => Cmd::Ls {
                    peer: (*peer).into(),
                    dir: (*dir).into(),
                    long,
                },
                _ => return Err(usage("ls")),
            }
        }
        ("read", [peer, path]) => Cmd::Read {
            peer: (*peer).into(),
            path: (*path).into(),
        },
        ("get", args) => {
            let (letters, rest) = take_flags("get", args, "fr")?;
            let flags = GetFlags {
                force: letters.contains(&'f'),
                recursive: letters.contains(&'r'),
            };
            let (peer, paths, local) = match rest {
                [peer, path] => (peer, vec![(*path).to_owned()], Local::Default),
                [peer, paths @ .., local] if !paths.is_empty() => (
                    peer,
                    paths.iter().map(|p| (*p).to_owned()).collect(),
                    if *local == "-" {
                        Local::Stdout
                    } else {
                        Local::Path(PathBuf::from(local))
                    },
                ),
                _ => return Err(usage("get")),
            };
            Cmd::Get {
                peer: (*peer).into(),
                paths,
                local,
                flags,
            }
        }
        // `read bob my file.txt`: a path with spaces the user did not quote.
        ("read", [peer, path @ ..]) if path.len() > 1 => {
            return Err(ParseError::Unquoted {
                cmd: "read".into(),
                quoted: format!(
                    "read {} {}",
                    quote_word(peer, false),
                    quote_word(&path.join(" "), false)
                ),
            })
        }
        ("whoami", []) => Cmd::Whoami,
        ("info", [peer]) => Cmd::Info {
            peer: (*peer).into(),
        },
        ("help" | "?", []) => Cmd::Help,
        ("quit" | "exit", []) => Cmd::Quit,
        (w, _) if COMMANDS.iter().any(|(name, _, _)| *name == w) => return Err(usage(w)),
        (w, _) => {
            return Err(ParseError::Unknown {
                word: w.to_owned(),
                suggestion: closest(w, COMMANDS.iter().map(|(name, _, _)| *name)),
            })
        }
    };
    Ok(Some(cmd))
}

/// The help text.
pub(crate) fn help_text() -> String {
    /// Width of the help text, in columns.
    const WIDTH: usize = 80;
    let synopses: Vec<String> = COMMANDS
        .iter()
        .map(|(name, args, _)| format!("{name} {args}").trim_end().to_owned())
        .collect();
    // Every description starts in one column, two spaces after the longest synopsis.
    let col = 2
        + synopses
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0)
        + 2;
    let mut out = String::from("commands:\n");
    for (synopsis, (_, _, what)) in synopses.iter().zip(COMMANDS) {
        let mut line = format!("  {synopsis:<w$}", w = col - 2);
        // Wrapped at WIDTH, continuation lines indented to the column.
        for word in what.split_whitespace() {
            let at_start = line.chars().count() == col;
            if !at_start && line.chars().count() + 1 + word.chars().count() > WIDTH {
                out.push_str(line.trim_end());
                out.push('\n');
                line = " ".repeat(col);
            } else if !at_start {
                line.push(' ');
            }
            line.push_str(word);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(
        "quote paths with spaces: read bob \"my file.txt\"; LOCAL may start with ~\n\
         Tab completes commands, peers, remote paths and get's LOCAL\n\
         Ctrl-C cancels a command\n",
    );
    out
}

/// `n` bytes in a short human form: `512`, `1.5K`, `12M`, `3.0G` (powers of 1024).
pub(crate) fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    if n < 1024 {
        return n.to_string();
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v < 10.0 {
        format!("{v:.1}{}", UNITS[unit])
    } else {
        format!("{}{}", v.round() as u64, UNITS[unit])
    }
}

/// `text` safe to print on a terminal, in the one escape style `ls` and `read` share:
/// control characters and bidirectional overrides are shown as `\x1b` (below U+0080) or
/// `\u{202e}`, so a name or a file cannot drive the terminal. `keep_lines` keeps newline
/// and tab as they are (file contents); names escape them too (`\x0a`), one entry a line.
pub(crate) fn escape_controls(text: &str, keep_lines: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        let kept = keep_lines && matches!(c, '\n' | '\t');
        if (c.is_control() && !kept) || bidi {
            if (c as u32) < 0x80 {
                out.push_str(&format!("\\x{:02x}", c as u32));
            } else {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `n` bytes in words for a sentence: `1 byte`, `512 bytes`, `1.5 KiB`, `12 MiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    match n {
        1 => "1 byte".to_owned(),
        0..1024 => format!("{n} bytes"),
        _ => {
            let short = human_size(n);
            let (number, unit) = short.split_at(short.len() - 1);
            format!("{number} {unit}iB")
        }
    }
}

/// `secs` since the Unix epoch as `YYYY-MM-DD HH:MM` in UTC.
pub(crate) fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from a day count (proleptic Gregorian; H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// The one-letter type of the long form: `-` file, `d` directory, `l` symlink, `p` fifo,
/// `s` socket, `c`/`b` devices, `?` other.
fn type_letter(kind: Kind) -> char {
    match kind {
        Kind::File => '-',
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::Fifo => 'p',
        Kind::Socket => 's',
        Kind::CharDevice => 'c',
        Kind::BlockDevice => 'b',
        Kind::Other => '?',
    }
}

/// One line per entry: the size (human-readable; `-l`: exact, with the modification time and
/// a type letter), then the name; directories end in `/`, symlinks in `@`, other special
/// files show their type.
pub(crate) fn format_listing(listing: &Listing, long: bool) -> String {
    let mut out = String::new();
    for Entry {
        name,
        kind,
        size,
        mtime,
    } in &listing.entries
    {
        let suffix = match kind {
            Kind::Dir => "/",
            Kind::Symlink => "@",
            _ => "",
        };
        let name = escape_controls(name, false);
        if long {
            let size = if *kind == Kind::File {
                size.to_string()
            } else {
                "-".to_owned()
            };
            out.push_str(&format!(
                "{} {size:>14}  {}  {name}{suffix}\n",
                type_letter(*kind),
                format_utc(*mtime)
            ));
        } else {
            let col = match kind {
                Kind::File => human_size(*size),
                Kind::Dir => "<dir>".to_owned(),
                Kind::Symlink => "<link>".to_owned(),
                other => format!("<{}>", other.describe()),
            };
            out.push_str(&format!("{col:>8}  {name}{suffix}\n"));
        }
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
    fn quoted_words_read_back_as_themselves() {
        for w in [
            "plain.txt",
            "with space.txt",
            "it's.txt",
            "say \"hi\" it's",
            "back\\slash",
            "#hash",
            "",
        ] {
            let q = quote_word(w, false);
            assert_eq!(split_words(&q).unwrap(), vec![w.to_owned()], "{w:?} as {q}");
        }
        assert_eq!(quote_word("with space.txt", false), "'with space.txt'");
        assert_eq!(quote_word("it's.txt", false), "\"it's.txt\"");
        assert_eq!(quote_word("my dir/", true), "'my dir/");
    }

    #[test]
    fn every_command_parses() {
        assert_eq!(parse("list").unwrap(), Some(Cmd::List));
        assert_eq!(
            parse("ls bob").unwrap(),
            Some(Cmd::Ls {
                peer: "bob".into(),
                dir: "".into(),
                long: false,
            })
        );
        assert_eq!(
            parse("ls -l bob sub/dir").unwrap(),
            Some(Cmd::Ls {
                peer: "bob".into(),
                dir: "sub/dir".into(),
                long: true,
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
                paths: vec!["dir/big.bin".into()],
                local: Local::Default,
                flags: GetFlags::default(),
            })
        );
        assert_eq!(
            parse("get -f bob a.txt ~/b.txt").unwrap(),
            Some(Cmd::Get {
                peer: "bob".into(),
                paths: vec!["a.txt".into()],
                local: Local::Path(PathBuf::from("~/b.txt")),
                flags: GetFlags {
                    force: true,
                    recursive: false
                },
            })
        );
        assert_eq!(
            parse("get -rf bob a b '*.txt' -").unwrap(),
            Some(Cmd::Get {
                peer: "bob".into(),
                paths: vec!["a".into(), "b".into(), "*.txt".into()],
                local: Local::Stdout,
                flags: GetFlags {
                    force: true,
                    recursive: true
                },
            })
        );
        assert_eq!(parse("whoami").unwrap(), Some(Cmd::Whoami));
        assert_eq!(
            parse("info bob").unwrap(),
            Some(Cmd::Info { peer: "bob".into() })
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
        assert_eq!(
            parse("ls").unwrap_err().to_string(),
            "usage: ls [-l] PEER [DIR]"
        );
        assert_eq!(
            parse("get -x bob a").unwrap_err().to_string(),
            "get has no option -x; usage: get [-f] [-r] PEER PATH... [LOCAL]"
        );
    }

    #[test]
    fn an_unquoted_path_with_spaces_gets_the_quoted_line() {
        assert_eq!(
            parse("read bob my file.txt").unwrap_err().to_string(),
            "read takes one PATH; quote a path with spaces: read bob 'my file.txt'"
        );
    }

    #[test]
    fn a_typo_gets_a_did_you_mean() {
        assert_eq!(
            parse("lsit").unwrap_err().to_string(),
            "unknown command \"lsit\"; did you mean list? (type help)"
        );
        assert_eq!(
            parse("gte bob x").unwrap_err().to_string(),
            "unknown command \"gte\"; did you mean get? (type help)"
        );
        assert_eq!(
            parse("frobnicate").unwrap_err().to_string(),
            "unknown command \"frobnicate\" (type help)"
        );
        assert_eq!(closest("bbo", ["alice", "bob"]).as_deref(), Some("bob"));
        assert_eq!(closest("zed", ["alice", "bob"]), None);
    }

    fn entry(name: &str, kind: Kind, size: u64) -> Entry {
        Entry {
            name: name.into(),
            kind,
            size,
            mtime: 1_700_000_000,
        }
    }

    #[test]
    fn listings_show_human_sizes_and_mark_types() {
        let listing = Listing {
            entries: vec![
                entry("a.txt", Kind::File, 12),
                entry("big.bin", Kind::File, 5 << 20),
                entry("sub", Kind::Dir, 0),
                entry("l", Kind::Symlink, 0),
                entry("p", Kind::Fifo, 0),
            ],
            truncated: false,
        };
        assert_eq!(
            format_listing(&listing, false),
            "      12  a.txt\n    5.0M  big.bin\n   <dir>  sub/\n  <link>  l@\n  <fifo>  p\n"
        );
        assert_eq!(
            format_listing(&listing, true),
            "-             12  2023-11-14 22:13  a.txt\n\
             -        5242880  2023-11-14 22:13  big.bin\n\
             d              -  2023-11-14 22:13  sub/\n\
             l              -  2023-11-14 22:13  l@\n\
             p              -  2023-11-14 22:13  p\n"
        );
    }

    #[test]
    fn ls_escapes_names_in_the_same_style_as_read() {
        let listing = Listing {
            entries: vec![entry("a\u{1b}[31m\nb\u{202e}c\"d", Kind::File, 1)],
            truncated: false,
        };
        assert_eq!(
            format_listing(&listing, false),
            "       1  a\\x1b[31m\\x0ab\\u{202e}c\"d\n"
        );
        // File contents keep their lines; the escapes are the same.
        assert_eq!(
            escape_controls("a\u{1b}\nb\u{202e}", true),
            "a\\x1b\nb\\u{202e}"
        );
    }

    #[test]
    fn sizes_and_times_read_like_ls() {
        assert_eq!(human_size(0), "0");
        assert_eq!(human_size(1023), "1023");
        assert_eq!(human_size(1536), "1.5K");
        assert_eq!(human_size(200 << 20), "200M");
        assert_eq!(human_size(3 << 30), "3.0G");
        assert_eq!(human_bytes(0), "0 bytes");
        assert_eq!(human_bytes(1), "1 byte");
        assert_eq!(human_bytes(1023), "1023 bytes");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(200 << 20), "200 MiB");
        assert_eq!(format_utc(0), "1970-01-01 00:00");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00");
        assert_eq!(format_utc(-86_400), "1969-12-31 00:00");
    }

    #[test]
    fn help_lists_every_command_exit_included() {
        let help = help_text();
        for (name, _, _) in COMMANDS {
            assert!(help.contains(name));
        }
        assert!(help.contains("  exit "), "{help}");
    }

    #[test]
    fn help_puts_every_description_in_one_column_within_80_columns() {
        let help = help_text();
        let col = help
            .lines()
            .find_map(|l| l.strip_prefix("  get "))
            .map(|rest| 2 + "get ".len() + rest.find("  ").unwrap() + 2)
            .unwrap();
        for line in help.lines().skip(1) {
            assert!(line.chars().count() <= 80, "{line:?}");
            if line.starts_with("  ") && !line.starts_with("   ") {
                // A command line: its description starts at the column, after 2+ spaces.
                let (left, right) = line.split_at(col);
                assert!(left.ends_with("  "), "{line:?}");
                assert!(!right.starts_with(' '), "{line:?}");
            }
        }
    }
}

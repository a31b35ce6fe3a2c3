//! End-to-end tests of `get` and the habits people bring from scp and rsync: verified copies,
//! a file changing mid-read, the destination checked first, `-f`, resume, `-r`, globs,
//! several files, `-` for stdout, mode and mtime kept, and `~`.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use common::*;

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The identity file `get` keeps beside a partial download of `path` on `peer` (`src` is the
/// exporter's file).
fn partial_identity(peer: &str, path: &str, src: &std::path::Path) -> String {
    let meta = std::fs::metadata(src).unwrap();
    let mtime = meta
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!(
        "share partial download\npeer {peer:?}\npath {path:?}\nsize {}\nmtime {mtime}\n",
        meta.len()
    )
}

#[test]
fn a_directory_destination_that_is_missing_or_a_file_fails_before_any_byte_moves() {
    let hub = start_hub(&[]);
    let (rb, ra) = (demo_root(), tempdir());
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    std::fs::create_dir(ra.path().join("downloads")).unwrap();
    std::fs::write(ra.path().join("downloads/file"), "mine\n").unwrap();
    for (dest, says) in [
        ("downloads/dir/", "no such directory"),
        ("downloads/file/", "not a directory"),
    ] {
        let local = ra.path().join(dest);
        let out = run_script(
            &hub.addr,
            "alice",
            ra.path(),
            &format!("get bob hello.txt {}\n", s(&local)),
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            out.stderr
                .contains(&format!("cannot save into {}: {says}", s(&local))),
            "{}",
            out.stderr
        );
        // Nothing was written: no file named like the directory, no partial.
        assert_eq!(names_in(&ra.path().join("downloads")), ["file"]);
        assert_eq!(
            std::fs::read(ra.path().join("downloads/file")).unwrap(),
            b"mine\n"
        );
    }
}

#[test]
fn a_partial_download_of_another_file_is_never_resumed_from() {
    let hub = start_hub(&[]);
    let (rb, ra) = (tempdir(), tempdir());
    let big = rb.path().join("big.bin");
    write_pattern(&big, 2 << 20, 5);
    std::fs::write(rb.path().join("hello.txt"), "hello world\n").unwrap();
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    // A partial left by a get of hello.txt into big.bin's place.
    let part = ra.path().join(".big.bin.share-part");
    std::fs::write(&part, "hello world\n").unwrap();
    std::fs::write(
        ra.path().join(".big.bin.share-part.id"),
        partial_identity("bob", "hello.txt", &rb.path().join("hello.txt")),
    )
    .unwrap();
    let local = ra.path().join("big.bin");
    let out = run_script(
        &hub.addr,
        "alice",
        ra.path(),
        &format!("get bob big.bin {}\n", s(&local)),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("discarded the partial download") && !out.stderr.contains("resuming"),
        "{}",
        out.stderr
    );
    assert!(same_bytes(&local, &big));
    // A partial with no identity at all is not trusted either.
    std::fs::remove_file(&local).unwrap();
    std::fs::write(&part, vec![0x55; 1000]).unwrap();
    let out = run_script(
        &hub.addr,
        "alice",
        ra.path(),
        &format!("get bob big.bin {}\n", s(&local)),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.contains("starting over"), "{}", out.stderr);
    assert!(same_bytes(&local, &big));
    assert_eq!(names_in(ra.path()), ["big.bin"]);
}

#[test]
fn a_file_that_shrinks_during_a_get_is_an_error_not_a_short_copy() {
    let hub = start_hub(&[]);
    let (rb, ra) = (tempdir(), tempdir());
    let src = rb.path().join("big.bin");
    write_pattern(&src, 64 << 20, 3);
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let mut alice = spawn_script(&hub.addr, "alice", ra.path(), &[], &[]);
    let mut stdin = stdin_of(&mut alice);
    stdin.write_all(b"get bob big.bin -\n").unwrap();
    drop(stdin);
    let mut stdout = alice.child.stdout.take().unwrap();
    let stderr = reader(alice.child.stderr.take().unwrap());
    // The transfer is under way (and stalls while we do not read): now truncate the source.
    let mut first = vec![0u8; 1 << 20];
    stdout.read_exact(&mut first).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let rest = reader(stdout)
        .recv_timeout(WAIT)
        .expect("alice's output ends");
    let stderr = String::from_utf8(stderr.recv_timeout(WAIT).unwrap()).unwrap();
    assert_eq!(alice.reap().code(), Some(1), "{stderr}");
    assert!(first.len() + rest.len() < 64 << 20);
    assert!(
        stderr.contains("big.bin\" changed while it was being read"),
        "{stderr}"
    );
}

#[test]
fn the_destination_is_checked_before_any_byte_moves_and_errors_name_no_internal_files() {
    let hub = start_hub(&[]);
    let (rb, ra, home) = (demo_root(), tempdir(), tempdir());
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let nodir = ra.path().join("nodir/x");
    let out = run_script(
        &hub.addr,
        "alice",
        ra.path(),
        &format!("get bob hello.txt {}\n", s(&nodir)),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains(&format!(
            "cannot save to {}: directory {} does not exist",
            s(&nodir),
            s(&ra.path().join("nodir"))
        )),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("part"), "{}", out.stderr);
    assert!(names_in(ra.path()).is_empty());
    // `~` is the home directory.
    let out = run_script_with(
        &hub.addr,
        "alice",
        ra.path(),
        "get bob hello.txt ~/h.txt\n",
        &[],
        &[("HOME", s(home.path()))],
        WAIT,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read(home.path().join("h.txt")).unwrap(),
        b"hello world\n"
    );
}

#[test]
fn get_refuses_to_overwrite_without_f_and_replaces_with_it() {
    let hub = start_hub(&[]);
    let (rb, ra) = (demo_root(), tempdir());
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let local = ra.path().join("h.txt");
    std::fs::write(&local, "old\n").unwrap();
    let out = run_script(
        &hub.addr,
        "alice",
        ra.path(),
        &format!("get bob hello.txt {}\n", s(&local)),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr
            .contains("already exists; use get -f to overwrite it"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read(&local).unwrap(), b"old\n");
    let out = run_script(
        &hub.addr,
        "alice",
        ra.path(),
        &format!("get -f bob hello.txt {}\n", s(&local)),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&local).unwrap(), b"hello world\n");
    assert_eq!(names_in(ra.path()), ["h.txt"]);
}

#[test]
fn an_interrupted_get_resumes_verified_and_a_stale_partial_is_never_taken_for_good() {
    let hub = start_hub(&[]);
    let (rb, ra) = (tempdir(), tempdir());
    let src = rb.path().join("data.bin");
    write_pattern(&src, 3 << 20, 11);
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let bytes = std::fs::read(&src).unwrap();
    // What an interrupted get leaves: the first bytes, in the hidden partial file, and what
    // they are part of beside it.
    let part = ra.path().join(".data.bin.share-part");
    std::fs::write(&part, &bytes[..(1 << 20) + 123]).unwrap();
    let identity = partial_identity("bob", "data.bin", &src);
    let id_file = ra.path().join(".data.bin.share-part.id");
    std::fs::write(&id_file, &identity).unwrap();
    let local = ra.path().join("data.bin");
    let out = run_script(
        &hub.addr,
        "alice",
        ra.path(),
        &format!("get bob data.bin {}\n", s(ra.path())),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.contains("resuming"), "{}", out.stderr);
    assert!(same_bytes(&local, &src));
    assert_eq!(names_in(ra.path()), ["data.bin"]);
    // A partial from another version of the file: the digest catches it, nothing is saved,
    // the stale partial is gone, and the next get makes a good copy.
    std::fs::remove_file(&local).unwrap();
    std::fs::write(&part, vec![0x55; 1 << 20]).unwrap();
    std::fs::write(&id_file, &identity).unwrap();
    let script = format!(
        "get bob data.bin {d}\nget bob data.bin {d}\n",
        d = s(ra.path())
    );
    let out = run_script(&hub.addr, "alice", ra.path(), &script);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("SHA-256 mismatch"), "{}", out.stderr);
    assert!(out.stderr.contains("nothing saved"), "{}", out.stderr);
    assert_eq!(
        out.out(),
        format!("saved {} bytes to {} (verified)\n", 3 << 20, s(&local))
    );
    assert!(same_bytes(&local, &src));
    assert_eq!(names_in(ra.path()), ["data.bin"]);
}

#[test]
fn recursive_globbed_and_multiple_gets_keep_mode_and_mtime() {
    let hub = start_hub(&[]);
    let (rb, ra) = (demo_root(), tempdir());
    std::fs::create_dir_all(rb.path().join("sub/deeper")).unwrap();
    std::fs::write(rb.path().join("sub/deeper/d.txt"), "deep\n").unwrap();
    std::fs::write(rb.path().join("a.txt"), "a\n").unwrap();
    std::fs::write(rb.path().join("with space.txt"), "spaced\n").unwrap();
    let script_sh = rb.path().join("run.sh");
    std::fs::write(&script_sh, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&script_sh, std::fs::Permissions::from_mode(0o750)).unwrap();
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(&script_sh)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let (tree, globbed, several) = (
        ra.path().join("tree"),
        ra.path().join("g"),
        ra.path().join("m"),
    );
    std::fs::create_dir(&globbed).unwrap();
    std::fs::create_dir(&several).unwrap();
    let script = format!(
        "get -r bob sub {}\nget bob '*' {}\nget bob run.sh a.txt {}\nget bob sub {}\n",
        s(&tree),
        s(&globbed),
        s(&several),
        s(&several),
    );
    let out = run_script(&hub.addr, "alice", ra.path(), &script);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        out.out(),
        format!(
            "saved 2 files, 11 bytes, to {} (verified)\n\
             saved 4 files, 31 bytes, to {} (verified)\n\
             saved 2 files, 12 bytes, to {} (verified)\n",
            s(&tree),
            s(&globbed),
            s(&several)
        )
    );
    assert!(
        out.stderr.contains("sub is a directory; use get -r"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read(tree.join("inner.txt")).unwrap(), b"inner\n");
    assert_eq!(std::fs::read(tree.join("deeper/d.txt")).unwrap(), b"deep\n");
    assert!(
        out.stderr
            .contains("note: skipped sub: a directory (use get -r)"),
        "{}",
        out.stderr
    );
    assert_eq!(
        names_in(&globbed),
        ["a.txt", "hello.txt", "run.sh", "with space.txt"]
    );
    assert_eq!(names_in(&several), ["a.txt", "run.sh"]);
    let meta = std::fs::metadata(several.join("run.sh")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o750);
    assert_eq!(meta.modified().unwrap(), old);
}

/// `get -` with stdout redirected into a file writes the chunks straight into it: byte-exact,
/// and after what the script printed before it and before what it prints after.
#[test]
fn get_to_stdout_redirected_into_a_file_is_byte_exact_and_in_order_with_other_output() {
    let hub = start_hub(&[]);
    let (rb, ra, out_dir) = (demo_root(), tempdir(), tempdir());
    let data_path = rb.path().join("data.bin");
    write_pattern(&data_path, (3 << 20) + 5, 7);
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let out_path = out_dir.path().join("out");
    let mut cmd = share();
    cmd.args(["--name", "alice", "--root"])
        .arg(ra.path())
        .arg(&hub.addr)
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::process::Stdio::piped());
    let mut alice = Proc {
        child: cmd.spawn().unwrap(),
        name: "alice".into(),
    };
    let mut stdin = stdin_of(&mut alice);
    stdin
        .write_all(b"whoami\nget bob data.bin -\nwhoami\n")
        .unwrap();
    drop(stdin);
    let stderr = reader(alice.child.stderr.take().unwrap())
        .recv_timeout(WAIT)
        .expect("alice finishes");
    assert!(
        alice.reap().success(),
        "{}",
        String::from_utf8_lossy(&stderr)
    );
    let data = std::fs::read(&data_path).unwrap();
    let out = std::fs::read(&out_path).unwrap();
    // whoami's lines, the file, whoami's lines again.
    let around = out.len() - data.len();
    assert!(around > 0 && around % 2 == 0, "{} bytes around", around);
    let (before, rest) = out.split_at(around / 2);
    let (middle, after) = rest.split_at(data.len());
    assert!(middle == &data[..], "the file's bytes differ");
    assert_eq!(before, after);
    assert!(String::from_utf8_lossy(before).contains("alice"));
}

#[test]
fn get_to_stdout_is_byte_exact_and_ls_l_whoami_and_info_describe() {
    let hub = start_hub(&[]);
    let (rb, ra) = (demo_root(), tempdir());
    write_pattern(&rb.path().join("data.bin"), (1 << 20) + 5, 9);
    std::fs::File::options()
        .write(true)
        .open(rb.path().join("hello.txt"))
        .unwrap()
        .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .unwrap();
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let out = run_script(&hub.addr, "alice", ra.path(), "get bob data.bin -\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        out.stdout,
        std::fs::read(rb.path().join("data.bin")).unwrap()
    );
    let out = run_script(
        &hub.addr,
        "alice",
        ra.path(),
        "ls -l bob\nwhoami\ninfo bob\n",
    );
    assert!(out.status.success(), "{out:?}");
    let text = out.out();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("-        1048581  ") && lines[0].ends_with("  data.bin"),
        "{text}"
    );
    assert_eq!(lines[1], "-             12  2023-11-14 22:13  hello.txt");
    assert!(
        lines[2].starts_with("d              -  ") && lines[2].ends_with("  sub/"),
        "{text}"
    );
    let abs = std::fs::canonicalize(ra.path()).unwrap();
    assert_eq!(
        lines[3],
        format!(
            "alice@{}: connected; plaintext; the hub checks no token: anyone who can reach it \
             can join",
            hub.addr
        )
    );
    assert_eq!(
        lines[4],
        format!("exporting {} (hidden files not shared)", abs.display())
    );
    assert_eq!(
        lines[5],
        "bob: connected; its root holds 2 files (1.0 MiB in all) and 1 directory"
    );
}

#[test]
fn typos_get_a_did_you_mean() {
    let hub = start_hub(&[]);
    let (rb, ra) = (demo_root(), tempdir());
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let out = run_script(
        &hub.addr,
        "alice",
        ra.path(),
        "lsit\nread bbo hello.txt\ninfo bbo\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let errors: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        errors,
        [
            "error: unknown command \"lsit\"; did you mean list? (type help)",
            "error: unknown peer \"bbo\"; did you mean bob? (list shows who is connected)",
            "error: \"bbo\" is not connected; did you mean bob? (list shows who is)",
        ]
    );
}

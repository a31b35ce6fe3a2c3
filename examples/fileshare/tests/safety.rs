//! End-to-end tests of what keeps a sharer safe: hidden files stay private unless shared, the
//! exported root is named absolutely, the home directory is never shared by accident, every
//! access is shown to the sharer, both ends see the plaintext warning, and `read` output
//! stays byte-exact when piped.

mod common;

use std::process::Stdio;

use common::*;

#[test]
fn hidden_files_are_neither_listed_nor_served_unless_the_sharer_opts_in() {
    let hub = start_hub(&[]);
    let (rb, rc, ra) = (demo_root(), demo_root(), tempdir());
    for r in [&rb, &rc] {
        std::fs::write(r.path().join(".bashrc"), "alias secret=1\n").unwrap();
        std::fs::create_dir(r.path().join(".git")).unwrap();
        std::fs::write(r.path().join(".git/config"), "[core]\n").unwrap();
    }
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let _carol = start_server(&hub.addr, "carol", rc.path(), &["--hidden"]);
    let out = run_script(&hub.addr, "alice", ra.path(), "ls bob\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.out(), "      12  hello.txt\n   <dir>  sub/\n");
    for cmd in ["read bob .bashrc", "read bob .git/config", "ls bob .git"] {
        let out = run_script(&hub.addr, "alice", ra.path(), &format!("{cmd}\n"));
        assert_eq!(out.status.code(), Some(1), "{cmd}: {out:?}");
        assert!(out.stdout.is_empty(), "{cmd}: {out:?}");
        assert!(
            out.stderr
                .contains("is hidden; the sharer does not share hidden files"),
            "{cmd}: {}",
            out.stderr
        );
    }
    // carol opted in.
    let out = run_script(
        &hub.addr,
        "alice",
        ra.path(),
        "ls carol\nread carol .bashrc\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.out().contains(".bashrc\n") && out.out().contains(".git/\n"),
        "{}",
        out.out()
    );
    assert!(out.out().ends_with("alias secret=1\n"), "{}", out.out());
}

#[test]
fn the_sharer_sees_the_absolute_root_and_every_access_and_both_ends_see_the_warning() {
    let mut hub = start_hub(&[]);
    let (rb, ra) = (demo_root(), tempdir());
    // Started from inside its directory, without --root: the log names it absolutely.
    let mut child = share()
        .args(["--name", "bob", "--serve"])
        .arg(&hub.addr)
        .current_dir(rb.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = Lines::new(child.stderr.take().unwrap());
    let _bob = Proc {
        child,
        name: "bob".into(),
    };
    log.wait_for("plaintext and unauthenticated", WAIT);
    let abs = std::fs::canonicalize(rb.path()).unwrap();
    let line = log.wait_for("connected to the hub", WAIT);
    assert!(
        line.contains(&format!(
            "exporting {} (hidden files not shared)",
            abs.display()
        )),
        "{line}"
    );
    let out = run_script(
        &hub.addr,
        "alice",
        ra.path(),
        "ls bob\nread bob hello.txt\nread bob nope.txt\n",
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    log.wait_for("\"alice\" listed /", WAIT);
    log.wait_for("\"alice\" reads hello.txt (12 bytes)", WAIT);
    log.wait_for("\"alice\" was refused nope.txt: no such file", WAIT);
    hub.log.wait_for("plaintext and unauthenticated", WAIT);
    // A person at a terminal is warned too (the pty test); a script asks with -v.
    let out = run_script_with(&hub.addr, "dave", ra.path(), "list\n", &["-v"], &[], WAIT);
    assert!(
        out.stderr.contains("plaintext and unauthenticated"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_home_directory_and_root_are_never_shared_by_accident() {
    let hub = start_hub(&[]);
    let home = tempdir();
    let run_in = |dir: &std::path::Path, args: &[&str]| {
        let out = share()
            .args(["--name", "bob"])
            .args(args)
            .arg(&hub.addr)
            .current_dir(dir)
            .env("HOME", home.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run_in(home.path(), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("refusing to share your home directory"),
        "{err}"
    );
    assert!(err.contains("--root"), "{err}");
    let (code, err) = run_in(std::path::Path::new("/"), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("refusing to share / by default"), "{err}");
    // Named explicitly, it is the sharer's choice.
    let (code, err) = run_in(home.path(), &["--root", "~"]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn piped_read_output_is_byte_exact_even_for_escapes_and_binary() {
    let hub = start_hub(&[]);
    let (rb, ra) = (tempdir(), tempdir());
    let nasty: Vec<u8> = b"\x1b[31mred\x07\r\0\xff\xfe"
        .iter()
        .copied()
        .chain(0..=255u8)
        .collect();
    std::fs::write(rb.path().join("nasty.bin"), &nasty).unwrap();
    let _bob = start_server(&hub.addr, "bob", rb.path(), &[]);
    let out = run_script(&hub.addr, "alice", ra.path(), "read bob nasty.bin\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, nasty);
}

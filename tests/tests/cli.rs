//! The `pgiam` command line: bad configuration is refused with a message that names the problem.

use std::process::Command;

use pgiam_tests::{pgiam_bin, write_file};

fn pgiam(args: &[&str]) -> (bool, String) {
    let out = Command::new(pgiam_bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn bad_configs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let base = "state_dir = \"/tmp/x\"\n[listen]\ntcp = \"127.0.0.1:6432\"\n[upstream]\nhost = \"127.0.0.1\"\n[roles.app]\n";
    let cases = [
        ("missing.toml", None, "cannot read"),
        (
            "syntax.toml",
            Some("state_dir = ".to_string()),
            "syntax.toml",
        ),
        (
            "remote.toml",
            Some(base.replace("127.0.0.1:6432", "0.0.0.0:6432")),
            "only loopback",
        ),
        (
            "norole.toml",
            Some(format!(
                "{base}[[mapping]]\nprincipal = \"uid:1\"\ndatabase = \"*\"\nrole = \"ghost\"\n"
            )),
            "no [roles.ghost]",
        ),
        (
            "typo.toml",
            Some(format!("{base}[listen2]\n")),
            "unknown field",
        ),
    ];
    for (name, contents, needle) in cases {
        let path = match contents {
            Some(c) => write_file(dir.path(), name, &c, 0o600),
            None => dir.path().join(name),
        };
        for cmd in [vec!["run", "--config"], vec!["check-config"]] {
            let mut args = cmd.clone();
            args.push(path.to_str().unwrap());
            let (ok, out) = pgiam(&args);
            assert!(!ok, "{args:?} must fail");
            assert!(
                out.contains(needle),
                "{args:?}: {out:?} should mention {needle:?}"
            );
            assert!(!out.contains("panicked"), "{out}");
        }
    }
    let good = write_file(
        dir.path(),
        "good.toml",
        &format!(
            "{base}[[mapping]]\nprincipal = \"unit:x.service\"\ndatabase = \"*\"\nrole = \"app\"\n"
        ),
        0o600,
    );
    let (ok, out) = pgiam(&["check-config", good.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("ok (1 mappings, 1 roles)"), "{out}");
}

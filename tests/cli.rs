//! The command line, as an operator uses it. No privileges needed.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn portcullis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .unwrap()
}

fn list_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portcullis-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn check_accepts_the_shipped_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/allowlist.txt");
    let out = portcullis(&["check", "--strict", example]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stderr_lines(&out).is_empty(), "{:?}", stderr_lines(&out));
}

#[test]
fn check_warns_of_entries_anyone_can_create_names_under_and_strict_refuses_them() {
    let path = list_file(
        "shared.txt",
        "# buckets\n.s3.amazonaws.com\nmy-bucket.s3.amazonaws.com\n.github.io\n.example.com\n",
    );
    let path = path.to_str().unwrap();
    let out = portcullis(&["check", path]);
    assert_eq!(out.status.code(), Some(0), "loading still works");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 2, "one warning per entry: {lines:?}");
    for (line, (number, suffix)) in lines
        .iter()
        .zip([(2, "s3.amazonaws.com"), (4, "github.io")])
    {
        assert!(
            line.contains(&format!("{path}: line {number}: "))
                && line.contains(&format!("covers {suffix}"))
                && line.contains("list the hosts you use instead"),
            "{line}"
        );
    }
    let strict = portcullis(&["check", "--strict", path]);
    assert_eq!(strict.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&strict).len(),
        3,
        "{:?}",
        stderr_lines(&strict)
    );

    // Running with --strict refuses such a list at start, naming the line.
    let run = portcullis(&["run", "--strict", "--allowlist", path]);
    assert_eq!(run.status.code(), Some(1));
    let lines = stderr_lines(&run);
    let last = lines.last().unwrap();
    assert!(
        last.contains(&format!("{path}: line 2: ")) && last.contains("strict"),
        "{lines:?}"
    );
}

#[test]
fn check_names_file_and_line_of_a_bad_entry() {
    let path = list_file("bad-check.txt", "# ok\ngood.example.com\n\n.co.uk\n");
    let out = portcullis(&["check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    assert!(
        lines[0].contains("bad-check.txt") && lines[0].contains("line 4"),
        "{lines:?}"
    );
}

#[test]
fn check_reports_a_missing_file() {
    let out = portcullis(&["check", "/nonexistent/list.txt"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_lines(&out)[0].contains("/nonexistent/list.txt"));
}

#[test]
fn match_prints_the_deciding_rule_and_fails_if_any_name_is_denied() {
    let path = list_file(
        "match.txt",
        ".example.com\napi.example.com\n*.cdn.example.net\n",
    );
    let path = path.to_str().unwrap();
    let out = portcullis(&[
        "match",
        path,
        "WWW.example.com",
        "api.example.com",
        "x.cdn.example.net",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "WWW.example.com allow .example.com\napi.example.com allow api.example.com\nx.cdn.example.net allow *.cdn.example.net\n"
    );
    let out = portcullis(&[
        "match",
        path,
        "example.com",
        "cdn.example.net",
        "notexample.com",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "example.com allow .example.com\ncdn.example.net deny\nnotexample.com deny\n"
    );
}

#[test]
fn a_bad_flag_is_one_line_and_non_zero() {
    for args in [
        &["run", "--allowlist", "x", "--bogus"][..],
        &["run", "--allowlist", "x", "--hello-timeout", "5"],
        &["run", "--allowlist", "x", "--max-connections", "0"],
        &[
            "run",
            "--allowlist",
            "x",
            "--max-connections",
            "10",
            "--max-connections-per-source",
            "11",
        ],
        &["run", "--allowlist", "x", "--audit-interval", "100ms"],
        &["run", "--allowlist", "x", "--tls-listen", "not-an-address"],
    ] {
        let out = portcullis(args);
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "{args:?}: {:?}",
            out.status
        );
        assert_eq!(
            stderr_lines(&out).len(),
            1,
            "{args:?}: {:?}",
            stderr_lines(&out)
        );
    }
}

#[test]
fn run_refuses_to_start_on_a_bad_list() {
    let path = list_file("bad-run.txt", "ok.example.com\n192.0.2.1\n");
    let out = portcullis(&[
        "run",
        "--allowlist",
        path.to_str().unwrap(),
        "--tls-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("bad-run.txt: line 2"), "{lines:?}");
}

#[test]
fn check_takes_the_allowlist_from_a_config_file() {
    let list = list_file("from-config.txt", "a.example.com\n.b.example.com\n");
    let config = list_file(
        "config.toml",
        &format!(
            "allowlist = {:?}\nrefresh = \"30s\"\n",
            list.to_str().unwrap()
        ),
    );
    let out = portcullis(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok, 2 entries"));
    let bad = list_file("bad-config.toml", "allowlist = 42\n");
    let out = portcullis(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("bad-config.toml: line 1"), "{lines:?}");
}

#[test]
fn check_with_a_config_checks_every_policys_list_and_names_the_bad_one() {
    let default = list_file("policy-default.txt", "a.example.com\n");
    let ci = list_file("policy-ci.txt", "ci.example.com\n.ci.example.org\n");
    let config = |ci: &PathBuf| {
        format!(
            "allowlist = {:?}\n\n[policy.ci]\nsources = [\"192.0.2.128/25\"]\nallowlist = {:?}\n",
            default.to_str().unwrap(),
            ci.to_str().unwrap()
        )
    };
    let good = list_file("policies.toml", &config(&ci));
    let out = portcullis(&["check", "--config", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{:?}", stderr_lines(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok, 1 entries (policy default)"),
        "{stdout}"
    );
    assert!(stdout.contains("ok, 2 entries (policy ci)"), "{stdout}");

    let bad_ci = list_file("policy-ci-bad.txt", "ci.example.com\n192.0.2.1\n");
    let bad = list_file("policies-bad.toml", &config(&bad_ci));
    let out = portcullis(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("policy-ci-bad.txt: line 2"), "{lines:?}");
}

#[test]
fn discover_proposes_a_list_for_one_policy() {
    let log = list_file(
        "audit-policies.jsonl",
        concat!(
            "{\"name\":\"pypi.org\",\"policy\":\"build-agents\",\"verdict\":\"allow\"}\n",
            "{\"name\":\"api.payments.test\",\"policy\":\"payments\",\"verdict\":\"allow\"}\n",
        ),
    );
    let out = portcullis(&[
        "discover",
        "--policy",
        "build-agents",
        log.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{:?}", stderr_lines(&out));
    let proposed = String::from_utf8_lossy(&out.stdout);
    assert!(proposed.contains("\npypi.org\n"), "{proposed}");
    assert!(!proposed.contains("payments"), "{proposed}");
    let out = portcullis(&["discover", "--policy", "nobody", log.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&out),
        ["portcullis: no audit record of policy nobody with a name in 1 file(s)"]
    );
}

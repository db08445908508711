//! Root: the quick start works as root (one warning naming the risk), and `--refuse-root`
//! (what the packaged unit passes) turns root into a one-line error.

use std::process::{Command, Stdio};

use ipevent_core::stats::ReceiverStats;
use ipevent_core::DataDir;
use ipevent_testkit::{bin, wait_for};

fn as_root() -> bool {
    ipevent_core::sys::effective_uid() == 0
}

#[test]
fn root_runs_with_one_warning_naming_the_risk_and_the_packaged_user() {
    let dir = tempfile::tempdir().unwrap();
    // No --allow-root: the README's first command, as a fresh machine's root runs it.
    let child = Command::new(bin("ipevent-receiver"))
        .args(["--listen", "127.0.0.1:0", "--writer-id", "test"])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("IPEVENT_REFUSE_ROOT")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data = DataDir::new(dir.path());
    let pid = child.id();
    wait_for("the receiver to start", || {
        ReceiverStats::read(&data, "test")
            .ok()
            .filter(|s| s.pid == pid)
    });
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("running as root"))
        .collect();
    if as_root() {
        assert_eq!(warnings.len(), 1, "{stderr}");
        assert!(
            warnings[0].contains("WARN")
                && warnings[0].contains("the `ipevent` user")
                && warnings[0].contains("--refuse-root"),
            "{stderr}"
        );
    } else {
        assert!(warnings.is_empty(), "{stderr}");
    }
}

#[test]
fn refuse_root_is_a_one_line_error_as_root() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, env) in [(Some("--refuse-root"), None), (None, Some("true"))] {
        let mut command = Command::new(bin("ipevent-receiver"));
        command
            .args(["--listen", "127.0.0.1:0", "--writer-id", "test"])
            .arg("--data-dir")
            .arg(dir.path())
            .args(flag)
            // The old flag changes nothing.
            .arg("--allow-root")
            .stdin(Stdio::null());
        match env {
            Some(value) => command.env("IPEVENT_REFUSE_ROOT", value),
            None => command.env_remove("IPEVENT_REFUSE_ROOT"),
        };
        if !as_root() {
            // Not root: the option changes nothing, and the receiver starts as usual.
            let child = command.stderr(Stdio::null()).spawn().unwrap();
            let data = DataDir::new(dir.path());
            let pid = child.id();
            wait_for("the receiver to start", || {
                ReceiverStats::read(&data, "test")
                    .ok()
                    .filter(|s| s.pid == pid)
            });
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            assert!(child.wait_with_output().unwrap().status.success());
            continue;
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr.trim_end(),
            "ipevent-receiver: refusing to run as root (--refuse-root): run ipevent-receiver \
             as an unprivileged user, such as the packaged `ipevent` user"
        );
    }
}

//! The RPM and the cloud-init user-data, end to end: `rpm/build.sh` builds the release
//! binaries and the package once, then `rpm/check.sh` checks it (files, modes and owners,
//! `%config(noreplace)`, scriptlets, an install into a scratch root and the installed
//! binaries, `systemd-analyze verify` of the units, `cloud-init schema` of the user-data).
//!
//! Without rpmbuild, cloud-init or systemd's tools the test says why and passes, except under
//! CI (`CI` set), which must have them (Debian: `apt-get install rpm systemd cloud-init curl`).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Programs the build and the checks run.
const TOOLS: [&str; 7] = [
    "rpmbuild",
    "rpm",
    "cloud-init",
    "systemd-analyze",
    "systemd-sysusers",
    "python3",
    "curl",
];

/// Checks `rpm/check.sh` must report as passed: each one the packaging must satisfy.
const REQUIRED_CHECKS: [&str; 12] = [
    "name is ipevent-<Cargo.toml version>-<git count>.g<hash>.<arch>.rpm",
    "rpm -qlvp: every file, its mode and owner",
    "rpm -qcp: the env files are %config(noreplace), nothing else is config",
    "%pre creates the ipevent group and user only when missing",
    "%post reloads units, presets them on install only, applies the sysctl",
    "%preun stops and disables both units on erase, not on upgrade",
    "%postun reloads units, and restarts running ones on upgrade",
    "every scriptlet exits 0 when every tool it calls fails",
    "rpm --root --noscripts -i installs; sysusers.d user matches %pre; rpm -V clean",
    "installed binaries answer --version with the package version, and --help",
    "systemd-analyze verify: both units, no warning",
    "cloud-init schema --config-file cloud-init/user-data.yaml",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives in the workspace")
        .to_path_buf()
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

fn run(script: &Path, args: &[&Path]) -> Output {
    let mut command = Command::new("bash");
    command.arg(script).args(args).current_dir(workspace_root());
    // The cargo running this test builds the release binaries too.
    if let Some(cargo) = std::env::var_os("CARGO") {
        command.env("CARGO", cargo);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()))
}

#[test]
fn rpm_builds_installs_and_passes_every_check() {
    let missing: Vec<&str> = TOOLS.into_iter().filter(|tool| !on_path(tool)).collect();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have {missing:?}: apt-get install rpm systemd cloud-init curl"
        );
        eprintln!(
            "packaging test skipped: {missing:?} not installed (apt-get install rpm systemd cloud-init curl)"
        );
        return;
    }
    let root = workspace_root();

    let build = run(&root.join("rpm/build.sh"), &[]);
    let build_out = String::from_utf8_lossy(&build.stdout);
    assert!(
        build.status.success(),
        "rpm/build.sh failed ({}):\n{}{}",
        build.status,
        build_out,
        String::from_utf8_lossy(&build.stderr)
    );
    let package = PathBuf::from(build_out.lines().last().unwrap_or_default());
    let name = package
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    assert!(
        package.is_file() && name.starts_with("ipevent-") && name.ends_with(".rpm"),
        "rpm/build.sh did not print the package's path last: {build_out:?}"
    );

    let check = run(&root.join("rpm/check.sh"), &[&package]);
    let report = String::from_utf8_lossy(&check.stdout);
    println!("{report}");
    assert!(
        check.status.success(),
        "rpm/check.sh failed ({}):\n{report}{}",
        check.status,
        String::from_utf8_lossy(&check.stderr)
    );
    let passed: Vec<&str> = report
        .lines()
        .filter_map(|line| line.strip_prefix("ok   "))
        .collect();
    for want in REQUIRED_CHECKS {
        assert!(
            passed.contains(&want),
            "check {want:?} did not pass:\n{report}"
        );
    }
    assert!(!report.contains("FAIL"), "{report}");
    assert_eq!(
        report.lines().last(),
        Some(format!("{} passed, 0 failed", passed.len()).as_str()),
        "{report}"
    );
}

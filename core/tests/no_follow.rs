//! Every file the product opens in a data dir is opened through the store's no-follow helpers
//! (`store::fsio`), so a symlink planted in the tree is never followed. This test reads the
//! product's sources and fails on any other way of opening a file.

use std::path::{Path, PathBuf};

/// Ways of opening a file that do not pass `O_NOFOLLOW`.
const FORBIDDEN: &[&str] = &[
    "OpenOptions::new(",
    "File::open(",
    "File::create(",
    "fs::read(",
    "fs::read_to_string(",
    "fs::write(",
];

/// The modules allowed to open files: the store's helpers, and the hashing of an operator's
/// app package (a path given on the command line, outside any data dir, where following a
/// link is what the operator asks for); and system files outside any data dir.
const ALLOWED_FILES: &[&str] = &["core/src/store/fsio.rs", "core/src/apk.rs"];
const ALLOWED_LINE: &str = "\"/proc/";

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_open_goes_through_the_no_follow_helpers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for krate in [
        "core",
        "store-s3",
        "receiver",
        "query-cli",
        "api",
        "test-client",
    ] {
        rust_files(&root.join(krate).join("src"), &mut files);
    }
    assert!(files.len() > 10, "found the sources: {files:?}");
    let mut offences = Vec::new();
    for file in files {
        let relative = file.strip_prefix(root).unwrap();
        if ALLOWED_FILES.iter().any(|f| relative == Path::new(f)) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests build their fixtures however they like.
        let product = text.split("#[cfg(test)]").next().unwrap();
        for (n, line) in product.lines().enumerate() {
            if line.contains(ALLOWED_LINE) {
                continue;
            }
            if FORBIDDEN.iter().any(|f| line.contains(f)) {
                offences.push(format!("{}:{}: {}", relative.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "open these through ipevent_core::store's no-follow helpers:\n{}",
        offences.join("\n")
    );
}

//! The SHA-256 of an app package file, for operators who hold the file and not its hash.
//!
//! The file is read in fixed-size chunks into one buffer, so hashing a multi-gigabyte package
//! takes [`APK_CHUNK_BYTES`] of memory, whatever its size.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::wire::AppSha;

/// Bytes read per call while hashing: large enough that the syscalls cost little next to the
/// hashing, small enough to be the only memory the hash needs.
pub const APK_CHUNK_BYTES: usize = 256 * 1024;

/// Why an app file could not be hashed.
#[derive(Debug, thiserror::Error)]
#[error("hashing app file {}: {source}", path.display())]
pub struct ApkError {
    /// The file given.
    pub path: PathBuf,
    /// What the file system said.
    #[source]
    pub source: std::io::Error,
}

/// The SHA-256 of the file at `path`, read in chunks of [`APK_CHUNK_BYTES`]. A directory, a
/// missing or an unreadable file is an error naming the path.
pub fn sha256_file(path: &Path) -> Result<AppSha, ApkError> {
    let fail = |source| ApkError {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(fail)?;
    if file.metadata().map_err(fail)?.is_dir() {
        return Err(fail(std::io::Error::new(
            ErrorKind::InvalidInput,
            "is a directory",
        )));
    }
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; APK_CHUNK_BYTES];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => hasher.update(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(fail(e)),
        }
    }
    Ok(AppSha(hasher.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn hashes_the_known_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(
            sha256_file(&empty).unwrap().to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let abc = dir.path().join("abc");
        std::fs::write(&abc, b"abc").unwrap();
        assert_eq!(
            sha256_file(&abc).unwrap().to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_file_of_several_chunks_hashes_as_one_piece() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let bytes: Vec<u8> = (0..APK_CHUNK_BYTES * 3 + 17)
            .map(|i| (i * 7) as u8)
            .collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let want: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(sha256_file(&path).unwrap(), AppSha(want));
    }

    #[test]
    fn missing_files_and_directories_are_errors_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.apk");
        let e = sha256_file(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.apk"), "{e}");
        let e = sha256_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
    }
}

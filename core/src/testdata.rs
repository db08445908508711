//! The conformance vectors in `testdata/` (a copy of the shared vectors): every datagram with the
//! verdict a receiver must reach (`ipevent.json`, contract 1) and the classify cases
//! (`classify.json`, contract 2). One loader for every test, benchmark and fuzz seed that checks
//! itself against them.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{hex, store};

/// A vector file that cannot be read or does not have the expected shape.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TestdataError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

/// The repository's `testdata/` directory.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

/// `testdata/<name>`, parsed as JSON.
pub fn read_json(name: &str) -> Result<serde_json::Value, TestdataError> {
    read_json_at(&dir().join(name))
}

fn read_json_at(path: &Path) -> Result<serde_json::Value, TestdataError> {
    let fail = |message: String| TestdataError {
        path: path.to_path_buf(),
        message,
    };
    let mut file = store::open_read(path)
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| fail("no such file".to_string()))?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| fail(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| fail(e.to_string()))
}

/// One datagram of `ipevent.json` and its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireVector {
    /// Its name in the file (letters, digits and `_`).
    pub name: String,
    /// The datagram.
    pub bytes: Vec<u8>,
    /// `Ok((app_sha256 as stored, dotted ip))` for a valid datagram, `Err(reason)` otherwise.
    pub verdict: Result<(String, String), String>,
    /// A valid datagram's address as the integer on the wire.
    pub ip_int: Option<u64>,
}

/// Every vector of `testdata/ipevent.json`.
pub fn wire_vectors() -> Result<Vec<WireVector>, TestdataError> {
    wire_vectors_at(&dir().join("ipevent.json"))
}

/// Every vector of the wire vector file at `path`.
pub fn wire_vectors_at(path: &Path) -> Result<Vec<WireVector>, TestdataError> {
    let json = read_json_at(path)?;
    let fail = |message: String| TestdataError {
        path: path.to_path_buf(),
        message,
    };
    let list = json["vectors"]
        .as_array()
        .ok_or_else(|| fail("no \"vectors\" array".to_string()))?;
    list.iter()
        .map(|v| {
            let text = |key: &str| {
                v[key]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| fail(format!("a vector lacks {key:?}: {v}")))
            };
            let name = text("name")?;
            let bytes = hex::decode(text("hex")?.as_bytes())
                .map_err(|e| fail(format!("vector {name}: {e}")))?;
            let valid = v["valid"]
                .as_bool()
                .ok_or_else(|| fail(format!("vector {name} lacks \"valid\"")))?;
            let verdict = if valid {
                Ok((text("app_sha256")?, text("ip")?))
            } else {
                Err(text("reason")?)
            };
            Ok(WireVector {
                name,
                bytes,
                verdict,
                ip_int: v["ip_int"].as_u64(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_every_wire_vector() {
        let vectors = wire_vectors().unwrap();
        assert!(vectors.len() >= 29);
        assert!(vectors.iter().any(|v| v.verdict.is_ok()));
        assert!(vectors
            .iter()
            .all(|v| v.verdict.is_ok() == v.ip_int.is_some()));
        assert!(read_json("classify.json").unwrap()["cases"].is_array());
    }
}

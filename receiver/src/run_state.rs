//! What a receiver leaves behind about its run (`state.json`: the last flush epoch, whether it
//! stopped cleanly), and the clock its timestamps come from.

use std::time::{SystemTime, UNIX_EPOCH};

use ipevent_core::store::{self, DataDir};
use serde_json::json;

/// Seconds since the unix epoch (0 if the clock is before it). Record timestamps are `u32`;
/// callers convert with `u32::try_from(..).unwrap_or(u32::MAX)`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a receiver leaves behind about its run: the last flush epoch and whether it stopped
/// cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunState {
    pub epoch: u64,
    pub clean: bool,
}

/// Reads the state a previous run of `writer_id` left (none: a first start, counted clean).
pub fn read_state(data: &DataDir, writer_id: &str) -> RunState {
    let fresh = RunState {
        epoch: 0,
        clean: true,
    };
    let bytes = match store::read_file(&data.state_path(writer_id)) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return fresh,
        Err(e) => {
            log::warn!("{e}");
            return RunState {
                clean: false,
                ..fresh
            };
        }
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return RunState {
            clean: false,
            ..fresh
        };
    };
    RunState {
        epoch: value["epoch"].as_u64().unwrap_or(0),
        clean: value["clean"].as_bool().unwrap_or(false),
    }
}

/// Records the epoch and whether this run has stopped cleanly.
pub fn write_state(
    data: &DataDir,
    writer_id: &str,
    epoch: u64,
    clean: bool,
) -> Result<(), store::StoreError> {
    let body = json!({"epoch": epoch, "clean": clean, "pid": std::process::id(), "updated_unix": unix_now()});
    store::write_atomic(&data.state_path(writer_id), body.to_string().as_bytes())
}

//! `ipevent-query watch [--since TIME]`: follows the store and prints one JSON line per
//! transition ([`ipevent_core::watch`]) until SIGINT or SIGTERM, which end it with exit 0.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use ipevent_core::store::Store;
use ipevent_core::watch::{self, Since, Watcher, POLL_INTERVAL};

use crate::Failure;

/// Follows `store` (named `name` in messages) and prints its transitions.
pub fn run(store: &dyn Store, name: &str, since: Option<&str>) -> Result<(), Failure> {
    let since = match since {
        None => Since::Now,
        Some(text) => watch::parse_since(text, SystemTime::now())
            .map_err(|e| Failure::new(2, e.to_string()))?,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .map_err(|e| Failure::new(3, format!("handling signal {signal}: {e}")))?;
    }
    let mut watcher = Watcher::start(store, since).map_err(|e| match e {
        ipevent_core::store::StoreError::Unsupported(why) => Failure::new(2, why),
        e => Failure::new(3, format!("reading the store: {e}")),
    })?;
    // Scripts and tests wait for this line: from here on every finished flush is seen.
    eprintln!(
        "ipevent-query: watching {name} for addresses first seen from {}",
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(watcher.since()))
        )
    );
    let mut lines = Vec::new();
    let mut last_error = None;
    while !stop.load(Ordering::Relaxed) {
        lines.clear();
        match watcher.poll(store, &mut lines) {
            Ok(()) => last_error = None,
            Err(e) => {
                // Say it once, and keep trying: the store may come back (a reset moves it).
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    log::warn!("following the store: {message}; retrying");
                    last_error = Some(message);
                }
            }
        }
        if !lines.is_empty() {
            let mut stdout = std::io::stdout().lock();
            let written = lines
                .iter()
                .try_for_each(|line| writeln!(stdout, "{}", line.to_json()))
                .and_then(|()| stdout.flush());
            match written {
                Ok(()) => {}
                // The reader went away (`| head -1`): the end.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(Failure::new(3, format!("writing to stdout: {e}"))),
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    Ok(())
}

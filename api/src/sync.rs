//! Read-after-write (contract 4): before a report is read, every running receiver drains its
//! sockets and flushes. Concurrent reads share these syncs. With `--store`, the sync goes
//! through the bucket to every receiver that ships there, on any host
//! ([`ipevent_store_s3::Bucket::sync_all`]).
//!
//! A read may only rely on a sync that *started* after the read arrived: a sync already in
//! flight may have drained the sockets before the read's events reached them. So a read that
//! finds no sync running starts one; a read that finds one running waits for the next one,
//! which starts when the running one ends and serves every read that queued meanwhile. Under
//! load there is at most one sync running and one queued, whatever the number of readers.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipevent_core::control;
use ipevent_core::DataDir;
use ipevent_store_s3::Bucket;
use tokio::sync::watch;

/// What a sync achieved; its name is the value of the `X-Ipevent-Sync` response header.
pub use ipevent_core::control::SyncOutcome;

/// One sync round's result, `None` until it has run.
type Round = watch::Sender<Option<SyncOutcome>>;

#[derive(Default)]
struct State {
    /// A sync is running.
    running: bool,
    /// The round that starts when the running one ends, with its waiters subscribed.
    queued: Option<Round>,
}

/// Runs syncs against every receiver of a data dir and shares them among concurrent readers.
#[derive(Clone)]
pub struct Syncer {
    data: DataDir,
    /// With `--store`: sync every receiver shipping to this bucket instead.
    bucket: Option<Arc<Bucket>>,
    timeout: Duration,
    state: Arc<Mutex<State>>,
    /// Called with each finished round's outcome (metrics).
    on_round: Arc<dyn Fn(SyncOutcome) + Send + Sync>,
}

impl Syncer {
    /// A syncer for `data` (or, with a bucket, for every receiver shipping to it) that gives
    /// each receiver `timeout` to answer.
    pub fn new(
        data: DataDir,
        bucket: Option<Arc<Bucket>>,
        timeout: Duration,
        on_round: impl Fn(SyncOutcome) + Send + Sync + 'static,
    ) -> Syncer {
        Syncer {
            data,
            bucket,
            timeout,
            state: Arc::default(),
            on_round: Arc::new(on_round),
        }
    }

    /// Waits for a sync that started after this call and returns its outcome.
    pub async fn sync(&self) -> SyncOutcome {
        let mut rx = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(round) = &state.queued {
                round.subscribe()
            } else {
                let (tx, rx) = watch::channel(None);
                if state.running {
                    state.queued = Some(tx);
                } else {
                    state.running = true;
                    tokio::spawn(self.clone().run_rounds(tx));
                }
                rx
            }
        };
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.unwrap_or(SyncOutcome::Failed),
            // The round was dropped without an answer; it cannot vouch for anything.
            Err(_) => SyncOutcome::Failed,
        };
        outcome
    }

    /// Runs the given round, then every round that queued while it ran.
    async fn run_rounds(self, mut round: Round) {
        loop {
            let data = self.data.clone();
            let bucket = self.bucket.clone();
            let timeout = self.timeout;
            let outcome = tokio::task::spawn_blocking(move || match bucket {
                Some(bucket) => sync_cluster(&bucket, timeout),
                None => sync_all(&data, timeout),
            })
            .await
            .unwrap_or_else(|e| {
                log::error!("sync task failed: {e}");
                SyncOutcome::Failed
            });
            (self.on_round)(outcome);
            round.send_replace(Some(outcome));
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            match state.queued.take() {
                Some(next) => round = next,
                None => {
                    state.running = false;
                    return;
                }
            }
        }
    }
}

/// One round of [`control::sync_all`], with what went wrong logged.
fn sync_all(data: &DataDir, timeout: Duration) -> SyncOutcome {
    match control::sync_all(data, timeout) {
        Ok(summary) => {
            for (writer_id, e) in &summary.failed {
                log::warn!(
                    "sync: receiver {writer_id} did not flush ({e}); serving what is on disk"
                );
            }
            summary.outcome()
        }
        Err(e) => {
            log::warn!(
                "sync: listing the receivers of {}: {e}",
                data.root().display()
            );
            SyncOutcome::Failed
        }
    }
}

/// One round of [`Bucket::sync_all`]: `ok` when every live receiver answered, `none` when no
/// receiver ships to the bucket, `failed` (naming who did not answer) otherwise.
fn sync_cluster(bucket: &Bucket, timeout: Duration) -> SyncOutcome {
    match bucket.sync_all(timeout) {
        Ok(outcome) if !outcome.missing.is_empty() => {
            log::warn!(
                "sync: receivers {} did not answer through {} within {timeout:?}; serving what \
                 the bucket holds",
                outcome.missing.join(", "),
                bucket.url()
            );
            SyncOutcome::Failed
        }
        Ok(outcome) if outcome.answered.is_empty() => SyncOutcome::None,
        Ok(_) => SyncOutcome::Ok,
        Err(e) => {
            log::warn!("sync through {}: {e}", bucket.url());
            SyncOutcome::Failed
        }
    }
}

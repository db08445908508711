//! Requests between the hosts of a cluster, through the bucket itself: read after write
//! (sync) and reset (generations).
//!
//! ```text
//! PREFIX/leases/<writer-id>          a live receiver (taken at start, given back at a clean stop)
//! PREFIX/sync/requests/<id>          one per waiting reader, empty; deleted when it is done
//! PREFIX/sync/answers/<writer-id>    the request ids that receiver has served, one per line
//! PREFIX/generations/<N, 20 digits>  one per reset; the highest is the current generation
//! PREFIX/following/<writer-id>       the generation that receiver ships to
//! PREFIX/writers/<writer-id>/        the databases of generation 0
//! PREFIX/g<N>/writers/<writer-id>/   the databases of generation N
//! ```
//!
//! A reader ([`Bucket::sync_all`]) lists the live receivers, puts its request and waits until
//! each of them names the request in its answer, or until its timeout, and then names those
//! that did not answer. A receiver's shipper lists the requests every second (or every ship
//! interval, if shorter); for ids it has not served it asks its own writer to drain its
//! sockets and flush (the local sync), ships and publishes every outbox entry up to that
//! flush, and only then rewrites its answer with
//! every id it has served that is still listed. So an answer that names a request vouches for
//! every datagram that was in that receiver's sockets when the request was put, and an answer
//! rewritten for a later request still names the earlier ones its writer's reader waits for.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::{Bucket, S3Error};

// Resets (`DELETE /events`): a reset creates `generations/<N+1>` with a conditional PUT (create
// only if absent: of two resets at once one creates it, the other finds it), so from then on
// readers read the databases of generation N+1, which start empty. Each receiver's shipper
// looks at the generation every second; when it has moved on, it holds its writer
// (drops what is pending, as a local reset does), closes its database, drops its outbox and
// moves its local tree away, releases the writer, opens a database in the new generation,
// says so in `following/<writer-id>` and deletes its own old database (never one another
// writer may still have open). The API waits for every live receiver to follow before it
// answers.

/// A request older than this is abandoned (its reader gave up or died); shippers delete it.
pub const ABANDONED_REQUEST: Duration = Duration::from_secs(120);

/// Longest pause between two looks at the answers while a reader waits.
const MAX_POLL_PAUSE: Duration = Duration::from_millis(50);

/// What a cluster-wide sync achieved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClusterSync {
    /// Receivers that answered: everything their sockets held when the request was put is
    /// now visible in the bucket.
    pub answered: Vec<String>,
    /// Live receivers (with a lease) that did not answer within the timeout.
    pub missing: Vec<String>,
}

/// A sync request a shipper found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRequest {
    /// The request's id.
    pub id: String,
    /// How long ago it was put, by the bucket's clock against ours (zero if ahead).
    pub age: Duration,
}

pub(crate) fn os_err(
    action: &'static str,
    location: &ObjectPath,
) -> impl FnOnce(object_store::Error) -> S3Error {
    let location = location.to_string();
    move |source| S3Error::ObjectStore {
        action,
        location,
        source,
    }
}

/// A request id: unique across hosts and processes, and safe as an object name.
pub(crate) fn new_request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(nanos);
    format!("{nanos:016x}-{:016x}", h.finish())
}

fn valid_request_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl Bucket {
    fn requests_dir(&self) -> ObjectPath {
        self.path("sync/requests")
    }

    fn answer_path(&self, writer_id: &str) -> ObjectPath {
        self.path(&format!("sync/answers/{writer_id}"))
    }

    /// The writer ids that hold a lease: receivers that are running, or that stopped without
    /// giving their lease back (a crash), sorted.
    pub fn live_writers(&self) -> Result<Vec<String>, S3Error> {
        self.runtime.block_on(async {
            let leases = self.path("leases");
            let mut ids: Vec<String> = self
                .store
                .list_with_delimiter(Some(&leases))
                .await
                .map_err(os_err("listing", &leases))?
                .objects
                .into_iter()
                .filter_map(|meta| meta.location.filename().map(str::to_string))
                .filter(|id| ipevent_core::store::validate_writer_id(id).is_ok())
                .collect();
            ids.sort();
            ids.dedup();
            Ok(ids)
        })
    }

    /// Asks every live receiver to make what its sockets hold visible in the bucket, and waits
    /// up to `timeout` for their answers. Receivers that do not answer are named in
    /// [`ClusterSync::missing`]; what they hold may be missing from a read that follows.
    pub fn sync_all(&self, timeout: Duration) -> Result<ClusterSync, S3Error> {
        let start = Instant::now();
        let waiting = self.live_writers()?;
        let mut outcome = ClusterSync::default();
        if waiting.is_empty() {
            return Ok(outcome);
        }
        let id = new_request_id();
        let request = self.requests_dir().join(id.as_str());
        self.runtime.block_on(async {
            self.store
                .put(&request, PutPayload::default())
                .await
                .map_err(os_err("putting the sync request", &request))
        })?;
        let (answered, missing) =
            wait_for_writers(waiting, start, timeout, |w| self.answered(w, &id))?;
        outcome.answered = answered;
        outcome.missing = missing;
        outcome.answered.sort();
        let deleted = self
            .runtime
            .block_on(self.store.delete(&request))
            .map_err(os_err("deleting the sync request", &request));
        if let Err(e) = deleted {
            // Shippers delete it once it is old; until then they only keep naming it.
            log::debug!("{e}");
        }
        Ok(outcome)
    }

    /// Whether `writer_id`'s answer names request `id`.
    fn answered(&self, writer_id: &str, id: &str) -> Result<bool, S3Error> {
        let path = self.answer_path(writer_id);
        self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(found) => {
                    let body = found.bytes().await.map_err(os_err("reading", &path))?;
                    Ok(String::from_utf8_lossy(&body)
                        .lines()
                        .any(|line| line == id))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(os_err("reading", &path)(e)),
            }
        })
    }

    /// The sync requests waiting in the bucket (for a shipper), oldest first. Requests older
    /// than [`ABANDONED_REQUEST`] are deleted instead of returned.
    pub fn sync_requests(&self) -> Result<Vec<SyncRequest>, S3Error> {
        let dir = self.requests_dir();
        self.runtime.block_on(async {
            let listed = self
                .store
                .list_with_delimiter(Some(&dir))
                .await
                .map_err(os_err("listing", &dir))?
                .objects;
            let now = SystemTime::now();
            let mut out = Vec::new();
            for meta in listed {
                let Some(id) = meta.location.filename().filter(|id| valid_request_id(id)) else {
                    continue;
                };
                let age = now
                    .duration_since(SystemTime::from(meta.last_modified))
                    .unwrap_or_default();
                if age > ABANDONED_REQUEST {
                    let _ = self.store.delete(&meta.location).await;
                    continue;
                }
                out.push(SyncRequest {
                    id: id.to_string(),
                    age,
                });
            }
            out.sort_by(|a, b| b.age.cmp(&a.age).then(a.id.cmp(&b.id)));
            Ok(out)
        })
    }

    /// Writes `writer_id`'s answer: every request id it has served that is still waiting.
    pub fn answer_syncs(&self, writer_id: &str, served: &BTreeSet<String>) -> Result<(), S3Error> {
        let path = self.answer_path(writer_id);
        let mut body = String::new();
        for id in served {
            body.push_str(id);
            body.push('\n');
        }
        self.runtime.block_on(async {
            self.store
                .put(&path, PutPayload::from(body))
                .await
                .map(|_| ())
                .map_err(os_err("writing", &path))
        })
    }
}

/// Polls `done` for each writer of `waiting` (with a growing pause) until all are done or
/// `timeout` has passed since `start`; returns the writers done and those still waiting.
pub(crate) fn wait_for_writers(
    mut waiting: Vec<String>,
    start: Instant,
    timeout: Duration,
    mut done: impl FnMut(&str) -> Result<bool, S3Error>,
) -> Result<(Vec<String>, Vec<String>), S3Error> {
    let mut finished = Vec::new();
    let mut pause = Duration::from_millis(5);
    loop {
        let mut still = Vec::new();
        for writer_id in waiting {
            if done(&writer_id)? {
                finished.push(writer_id);
            } else {
                still.push(writer_id);
            }
        }
        waiting = still;
        if waiting.is_empty() || start.elapsed() >= timeout {
            return Ok((finished, waiting));
        }
        std::thread::sleep(pause.min(timeout.saturating_sub(start.elapsed())));
        pause = (pause * 2).min(MAX_POLL_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_and_valid() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert!(valid_request_id(&a) && valid_request_id(&b));
        assert!(!valid_request_id("../x") && !valid_request_id(""));
    }
}

impl Bucket {
    fn generations_dir(&self) -> ObjectPath {
        self.path("generations")
    }

    fn following_path(&self, writer_id: &str) -> ObjectPath {
        self.path(&format!("following/{writer_id}"))
    }

    /// The current generation: the highest marker in `generations/`, 0 before any reset.
    pub fn generation(&self) -> Result<u64, S3Error> {
        self.runtime.block_on(self.generation_async())
    }

    pub(crate) async fn generation_async(&self) -> Result<u64, S3Error> {
        let dir = self.generations_dir();
        let listed = self
            .store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(os_err("listing", &dir))?;
        Ok(listed
            .objects
            .iter()
            .filter_map(|meta| meta.location.filename())
            .filter(|name| name.len() == 20)
            .filter_map(|name| name.parse::<u64>().ok())
            .max()
            .unwrap_or(0))
    }

    /// Starts generation `from + 1` (a reset): creates its marker unless another reset did
    /// first. Returns the current generation afterwards (at least `from + 1`).
    pub fn advance_generation(&self, from: u64) -> Result<u64, S3Error> {
        let next = from + 1;
        let marker = self.generations_dir().join(format!("{next:020}").as_str());
        let created = self.runtime.block_on(self.store.put_opts(
            &marker,
            PutPayload::default(),
            PutOptions::from(PutMode::Create),
        ));
        match created {
            Ok(_)
            | Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {}
            Err(e) => return Err(os_err("creating", &marker)(e)),
        }
        Ok(self.generation()?.max(next))
    }

    /// Records that `writer_id` now ships to `generation`.
    pub fn set_following(&self, writer_id: &str, generation: u64) -> Result<(), S3Error> {
        self.put_line(&self.following_path(writer_id), format!("{generation}\n"))
    }

    /// Writes `line` as the whole object at `path` (a writer's note to the others).
    pub(crate) fn put_line(&self, path: &ObjectPath, line: String) -> Result<(), S3Error> {
        self.runtime.block_on(async {
            self.store
                .put(path, PutPayload::from(line))
                .await
                .map(|_| ())
                .map_err(os_err("writing", path))
        })
    }

    /// The generation `writer_id` said it ships to (0 if it never said).
    pub fn following(&self, writer_id: &str) -> Result<u64, S3Error> {
        let path = self.following_path(writer_id);
        self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(found) => {
                    let body = found.bytes().await.map_err(os_err("reading", &path))?;
                    Ok(String::from_utf8_lossy(&body).trim().parse().unwrap_or(0))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(0),
                Err(e) => Err(os_err("reading", &path)(e)),
            }
        })
    }

    /// Resets the cluster: starts a new generation and waits up to `timeout` until every live
    /// receiver ships to it (having dropped everything it held from before). Returns the new
    /// generation and the receivers that followed and that did not.
    pub fn reset(&self, timeout: Duration) -> Result<ClusterReset, S3Error> {
        let start = Instant::now();
        let generation = self.advance_generation(self.generation()?)?;
        let waiting = self.live_writers()?;
        let mut out = ClusterReset {
            generation,
            ..ClusterReset::default()
        };
        let (following, not_following) = wait_for_writers(waiting, start, timeout, |w| {
            Ok(self.following(w)? >= generation)
        })?;
        out.following = following;
        out.not_following = not_following;
        out.following.sort();
        Ok(out)
    }

    /// Deletes the database of `writer_id` in `generation` (object by object). Only its own
    /// writer calls this, after closing it: a database is never deleted under a live writer.
    pub fn delete_database(&self, generation: u64, writer_id: &str) -> Result<usize, S3Error> {
        let root = self.writer_path(generation, writer_id);
        self.runtime.block_on(async {
            let mut dirs = vec![root];
            let mut deleted = 0;
            while let Some(dir) = dirs.pop() {
                let listed = self
                    .store
                    .list_with_delimiter(Some(&dir))
                    .await
                    .map_err(os_err("listing", &dir))?;
                dirs.extend(listed.common_prefixes);
                for meta in listed.objects {
                    match self.store.delete(&meta.location).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                        Err(e) => return Err(os_err("deleting", &meta.location)(e)),
                    }
                }
            }
            Ok(deleted)
        })
    }
}

/// What a cluster reset achieved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClusterReset {
    /// The generation readers now read.
    pub generation: u64,
    /// Live receivers that moved to it.
    pub following: Vec<String>,
    /// Live receivers (with a lease) that had not moved to it when the wait ended: down, or
    /// slow. They follow when they next look (at start, or within a second), dropping
    /// what they held from before.
    pub not_following: Vec<String>,
}

//! Forgetting one app across the cluster (`ipevent-query --store … forget`, `DELETE
//! /events/:sha` and `--retain-days` with `--store`), with the guarantee of the single-host
//! forget: once [`Bucket::forget`] reports every writer done, no reader of the bucket reports
//! anything of the app that reached a receiver before the call.
//!
//! ```text
//! PREFIX/forgets/<seq, 20 digits>        one per forget of generation 0, body: the SHA of each
//!                                        app it removes, one a line
//! PREFIX/g<N>/forgets/<seq, 20 digits>   the same for generation N (a reset starts a new log)
//! PREFIX/forgotten/<writer-id>           "<generation> <seq>": the last forget it applied
//! ```
//!
//! A forget takes the next sequence number of its generation's log with a conditional PUT
//! (create only if absent, as a reset takes its generation), so the log is dense and ordered.
//! Every live receiver's shipper looks for the entry after the last one it applied every ship
//! interval, and applies new ones in order, before it ships anything more: its data dir's
//! receivers are held and flushed (their journals no longer hold the app), its outbox entries
//! lose the app's records and its local tree the app's directory; then its database loses the
//! app's keys in a write batch that also records the sequence, durable and published; then it
//! says so in `forgotten/<writer-id>`. The database of a writer that holds no lease (stopped
//! cleanly) is changed by the forget itself, under that writer's lease, taken for the moment;
//! the writer applies the forget to its local state when it starts, before it ships. A writer
//! that holds a lease but does not answer (down without giving its lease back, or slow) is
//! named, and the forget is not reported done.

use std::time::{Duration, Instant};

use std::sync::Arc;

use ipevent_core::AppSha;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use rustc_hash::FxHashMap;

use crate::bucket::{bulk_scan, close_all, corrupt_entry, has_manifest, key_records};
use crate::cluster::{new_request_id, os_err, wait_for_writers};
use crate::codec;
use crate::ship::FORGET_INSTANCE_PREFIX;
use crate::{Bucket, S3Error, ShipDb};

/// Most apps one forget names (one entry of the log): bounds the entry (65 bytes an app) and
/// the work a writer does before it answers. Retention forgets its expired apps in batches of
/// this size.
pub const MAX_APPS_PER_FORGET: usize = 1024;

/// Longest pause between two tries to take a stopped writer's lease held by another forget.
const MAX_LEASE_PAUSE: Duration = Duration::from_millis(200);

/// What a cluster-wide forget achieved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClusterForget {
    /// The generation the forget applies to (the current one when it began).
    pub generation: u64,
    /// Its sequence number in that generation's forget log.
    pub seq: u64,
    /// Live receivers that applied it (or followed a later reset), sorted.
    pub answered: Vec<String>,
    /// Stopped writers whose databases this call changed itself, sorted.
    pub stopped: Vec<String>,
    /// Writers that had not applied it when the wait ended: the app may still be reported
    /// from their databases until they do (at their next look, or their next start).
    pub missing: Vec<String>,
}

impl ClusterForget {
    /// Whether every writer of the bucket applied the forget.
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }

    /// The answer of a complete forget of `app`, as `ipevent-query --store … forget` prints
    /// it and `DELETE /events/:sha` returns it (`found`: a database held something of it).
    pub fn answer(&self, app: &AppSha, found: bool) -> serde_json::Value {
        serde_json::json!({
            "forgotten": app.to_hex(),
            "found": found,
            "receivers": self.answered,
            "stopped_writers": self.stopped,
            "generation": self.generation,
            "sequence": self.seq,
        })
    }
}

impl Bucket {
    fn forgets_dir(&self, generation: u64) -> ObjectPath {
        if generation == 0 {
            self.path("forgets")
        } else {
            self.path(&format!("g{generation}/forgets"))
        }
    }

    fn forget_entry(&self, generation: u64, seq: u64) -> ObjectPath {
        self.forgets_dir(generation)
            .join(format!("{seq:020}").as_str())
    }

    fn forgotten_path(&self, writer_id: &str) -> ObjectPath {
        self.path(&format!("forgotten/{writer_id}"))
    }

    /// Appends a forget of `apps` (one entry, at most [`MAX_APPS_PER_FORGET`]) to the log of
    /// `generation`; returns its sequence number.
    pub fn log_forget(&self, generation: u64, apps: &[AppSha]) -> Result<u64, S3Error> {
        assert!(
            !apps.is_empty() && apps.len() <= MAX_APPS_PER_FORGET,
            "{} apps in one forget",
            apps.len()
        );
        let body: String = apps.iter().map(|app| format!("{app}\n")).collect();
        let dir = self.forgets_dir(generation);
        let mut last = self.runtime.block_on(async {
            let listed = self
                .store
                .list_with_delimiter(Some(&dir))
                .await
                .map_err(os_err("listing", &dir))?;
            Ok::<u64, S3Error>(
                listed
                    .objects
                    .iter()
                    .filter_map(|meta| meta.location.filename())
                    .filter(|name| name.len() == 20)
                    .filter_map(|name| name.parse::<u64>().ok())
                    .max()
                    .unwrap_or(0),
            )
        })?;
        loop {
            let next = last + 1;
            let entry = self.forget_entry(generation, next);
            let created = self.runtime.block_on(self.store.put_opts(
                &entry,
                PutPayload::from(body.clone()),
                PutOptions::from(PutMode::Create),
            ));
            match created {
                Ok(_) => return Ok(next),
                // Another forget took it: the next one.
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => last = next,
                Err(e) => return Err(os_err("creating", &entry)(e)),
            }
        }
    }

    /// The apps of forget `seq` of `generation`'s log; `None` when the log has no such entry
    /// (yet).
    pub fn logged_forget(&self, generation: u64, seq: u64) -> Result<Option<Vec<AppSha>>, S3Error> {
        let entry = self.forget_entry(generation, seq);
        self.runtime.block_on(async {
            match self.store.get(&entry).await {
                Ok(found) => {
                    let body = found.bytes().await.map_err(os_err("reading", &entry))?;
                    let apps: Result<Vec<AppSha>, _> = String::from_utf8_lossy(&body)
                        .lines()
                        .map(|line| line.trim().parse::<AppSha>())
                        .collect();
                    match apps {
                        Ok(apps) if !apps.is_empty() => Ok(Some(apps)),
                        Ok(_) => Err(S3Error::Corrupt {
                            location: entry.to_string(),
                            what: "a forget naming no app".into(),
                        }),
                        Err(e) => Err(S3Error::Corrupt {
                            location: entry.to_string(),
                            what: format!("not an app SHA-256: {e}"),
                        }),
                    }
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(os_err("reading", &entry)(e)),
            }
        })
    }

    /// The forgets of `generation`'s log after `after`, in order, as far as the log goes.
    pub fn forgets_after(
        &self,
        generation: u64,
        after: u64,
    ) -> Result<Vec<(u64, Vec<AppSha>)>, S3Error> {
        let mut out = Vec::new();
        let mut seq = after + 1;
        while let Some(apps) = self.logged_forget(generation, seq)? {
            out.push((seq, apps));
            seq += 1;
        }
        Ok(out)
    }

    /// Records that `writer_id` applied every forget of `generation`'s log up to `seq`.
    pub fn set_forgotten(&self, writer_id: &str, generation: u64, seq: u64) -> Result<(), S3Error> {
        self.put_line(
            &self.forgotten_path(writer_id),
            format!("{generation} {seq}\n"),
        )
    }

    /// The generation and forget sequence `writer_id` last said it applied ((0, 0): never).
    pub fn forgotten(&self, writer_id: &str) -> Result<(u64, u64), S3Error> {
        let path = self.forgotten_path(writer_id);
        self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(found) => {
                    let body = found.bytes().await.map_err(os_err("reading", &path))?;
                    let text = String::from_utf8_lossy(&body);
                    let mut words = text.split_whitespace().map(|w| w.parse::<u64>().ok());
                    match (words.next().flatten(), words.next().flatten()) {
                        (Some(generation), Some(seq)) => Ok((generation, seq)),
                        _ => Ok((0, 0)),
                    }
                }
                Err(object_store::Error::NotFound { .. }) => Ok((0, 0)),
                Err(e) => Err(os_err("reading", &path)(e)),
            }
        })
    }

    /// Forgets `app` on every writer of the bucket (see the module's documentation) and waits
    /// up to `timeout` for the live ones. The result names the writers that had not applied
    /// it by then ([`ClusterForget::missing`]); only when none is missing is the app gone from
    /// every database.
    pub fn forget(
        self: &Arc<Self>,
        app: &AppSha,
        timeout: Duration,
    ) -> Result<ClusterForget, S3Error> {
        self.forget_apps(std::slice::from_ref(app), timeout)
    }

    /// [`Bucket::forget`] for several apps at once (retention): one entry of the forget log,
    /// applied by each writer in one go. At most [`MAX_APPS_PER_FORGET`] apps.
    pub fn forget_apps(
        self: &Arc<Self>,
        apps: &[AppSha],
        timeout: Duration,
    ) -> Result<ClusterForget, S3Error> {
        let start = Instant::now();
        let generation = self.generation()?;
        let seq = self.log_forget(generation, apps)?;
        // Listed after the entry exists: a writer that takes its lease later reads the log
        // after that, and applies the forget itself before it ships.
        let mut waiting = self.live_writers()?;
        let databases = self.runtime.block_on(self.writer_ids_async(generation))?;
        let mut out = ClusterForget {
            generation,
            seq,
            ..ClusterForget::default()
        };
        for writer_id in databases {
            if waiting.contains(&writer_id) {
                continue;
            }
            match self.forget_stopped(generation, &writer_id, seq, start, timeout) {
                Ok(true) => out.stopped.push(writer_id),
                // It started meanwhile: it applies the forget itself.
                Ok(false) => waiting.push(writer_id),
                Err(S3Error::LeaseBusy { .. }) => out.missing.push(writer_id),
                Err(e) => return Err(e),
            }
        }
        let (answered, missing) = wait_for_writers(waiting, start, timeout, |w| {
            if self.following(w)? > generation {
                // It followed a later reset: nothing of before is left in it.
                return Ok(true);
            }
            let (their_generation, their_seq) = self.forgotten(w)?;
            Ok(their_generation > generation
                || (their_generation == generation && their_seq >= seq))
        })?;
        out.answered = answered;
        out.answered.sort();
        out.missing.extend(missing);
        out.missing.sort();
        out.stopped.sort();
        Ok(out)
    }

    /// Applies every forget of `generation`'s log up to `seq` to the database of `writer_id`,
    /// which holds no lease: takes its lease for the moment (a receiver starting meanwhile
    /// waits for it), removes the apps' keys, records `seq`, publishes and gives the lease
    /// back. `Ok(false)` when the writer took its lease first (it is live after all).
    fn forget_stopped(
        self: &Arc<Self>,
        generation: u64,
        writer_id: &str,
        seq: u64,
        start: Instant,
        timeout: Duration,
    ) -> Result<bool, S3Error> {
        let path = self.writer_path(generation, writer_id);
        if !self.runtime.block_on(has_manifest(&*self.store, &path))? {
            // A listing can still show a deleted database: nothing to forget there.
            return Ok(true);
        }
        let instance = format!("{FORGET_INSTANCE_PREFIX}{}", new_request_id());
        let holder = format!(
            "a forget of the cluster, from host {}",
            ipevent_core::store::host_writer_id("")
        );
        let mut pause = Duration::from_millis(5);
        let db = loop {
            match ShipDb::open_in(Arc::clone(self), generation, writer_id, &instance, &holder) {
                Ok(db) => break db,
                Err(S3Error::LeaseHeld { .. }) => return Ok(false),
                Err(e @ S3Error::LeaseBusy { .. }) if start.elapsed() >= timeout => return Err(e),
                Err(S3Error::LeaseBusy { .. }) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(MAX_LEASE_PAUSE);
                }
                Err(e) => return Err(e),
            }
        };
        let applied = (|| -> Result<(), S3Error> {
            let done = db.forgotten_seq()?;
            if done < seq {
                let apps: Vec<AppSha> = self
                    .forgets_after(generation, done)?
                    .into_iter()
                    .take_while(|(s, _)| *s <= seq)
                    .flat_map(|(_, apps)| apps)
                    .collect();
                let removed = db.forget(seq, &apps)?;
                db.publish()?;
                log::info!(
                    "forget {}..={seq}: removed {removed} addresses from the database of stopped \
                     writer {writer_id}",
                    done + 1
                );
            }
            Ok(())
        })();
        let closed = db.close();
        applied.and(closed).map(|()| true)
    }
}

impl Bucket {
    /// The apps whose newest event over every writer's database of the current generation
    /// (the latest `last_seen` of any of their addresses) is before `cutoff_unix`, at most
    /// `max` of them, in SHA order (`--retain-days` with `--store`). Reads every address key
    /// of every database, and keeps one newest arrival per app in memory.
    pub fn expired_apps(&self, cutoff_unix: u32, max: usize) -> Result<Vec<AppSha>, S3Error> {
        self.runtime.block_on(async {
            let readers = self.open_readers().await?;
            let mut newest: FxHashMap<AppSha, u32> = FxHashMap::default();
            for (generation, id, reader) in &readers {
                let location = || self.writer_path(*generation, id).to_string();
                let db_err = |source| S3Error::Db {
                    action: "scanning",
                    location: location(),
                    source,
                };
                let mut iter = reader
                    .scan_prefix_with_options([codec::ADDR_TAG], .., &bulk_scan())
                    .await
                    .map_err(db_err)?;
                while let Some(kv) = iter.next().await.map_err(db_err)? {
                    let (_, records) =
                        key_records(location(), &kv.key, &kv.value, codec::parse_addr_key)?;
                    for (app, payload) in records {
                        let addrs = codec::decode_addrs(payload)
                            .ok_or_else(|| corrupt_entry(location(), &kv.key, &kv.value))?;
                        let last = newest.entry(app).or_insert(0);
                        for (_, stats) in addrs {
                            *last = (*last).max(stats.last_seen);
                        }
                    }
                }
            }
            close_all(readers).await;
            let mut out: Vec<AppSha> = newest
                .into_iter()
                .filter(|(_, last)| *last < cutoff_unix)
                .map(|(app, _)| app)
                .collect();
            out.sort_unstable();
            out.truncate(max);
            Ok(out)
        })
    }
}

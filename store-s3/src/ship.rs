//! One writer's database: the receiver's shipper applies each flush to it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipevent_core::{AddrStats, AppSha};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use rustc_hash::{FxHashMap, FxHashSet};
use slatedb::config::{FlushOptions, FlushType, PutOptions as KeyOptions, Settings, Ttl};
use slatedb::{CloseReason, CompactorBuilder, Db, ErrorKind, WriteBatch};
use std::collections::BTreeSet;

use crate::codec::{self, StatsMerge};
use crate::{Bucket, S3Error};

/// Longest instance token: it identifies the data dir a writer id ships from.
pub const MAX_INSTANCE_BYTES: usize = 64;

/// Prefix of the instance tokens of forgets that open a stopped writer's database
/// ([`crate::Bucket::forget`]): a receiver that finds its lease held by one waits for it.
pub const FORGET_INSTANCE_PREFIX: &str = "forget-";

/// A lease held by a forget longer than this is left over from a forget that died: it is
/// taken over. A forget holds it for a few requests.
pub const FORGET_LEASE_STALE: std::time::Duration = std::time::Duration::from_secs(60);

/// Most keys one write batch of [`ShipDb::forget`] rewrites: a forget of many apps is written
/// in several batches, so memory stays bounded (the forget is applied again, whole, if it
/// stops half way: its sequence is recorded only with the last batch).
const FORGET_BATCH_KEYS: usize = 1024;

/// How long a flush's change keys (the apps it changed, read by `watch`) stay in the
/// database before they expire: a watch that could not read the bucket for longer than this
/// re-reads every app once instead (see [`crate::changes`]). Ten minutes of flushes keep the
/// keys a small share of the data (one per app and flush, against one per address and app)
/// while no watch that is merely slow or briefly cut off from the bucket ever falls behind.
pub const CHANGE_HISTORY: Duration = Duration::from_secs(600);

/// The database of one writer, opened for writing.
///
/// A writer id is held in the bucket by one data dir at a time: `PREFIX/leases/<writer-id>`
/// names the instance (a token kept in the data dir) that holds it. A receiver that restarts
/// on the same data dir takes its lease back; one on another data dir is refused with
/// [`S3Error::LeaseHeld`]. Behind the lease, SlateDB fences an older writer of the same
/// database when a newer one opens it, so two processes never both write it.
pub struct ShipDb {
    bucket: Arc<Bucket>,
    db: Db,
    generation: u64,
    writer_id: String,
    instance: String,
    location: String,
    /// The last epoch this instance applied or read back: the previous flush named by the
    /// next flush's change key.
    previous: AtomicU64,
    /// Addresses whose index entries this instance made durable in the database.
    indexed: Mutex<Indexed>,
    /// The runtime the database's compaction runs on; dropped after the database.
    _compaction: tokio::runtime::Runtime,
}

/// Most (app, address) pairs [`Indexed`] remembers (about 4 bytes each, plus 40 per app)
/// before it starts over.
const INDEXED_PAIRS: usize = 4 << 20;

/// The (app, address) pairs whose index entries this instance has made durable in its
/// database, so that a flush writes index keys only for addresses new to it: most flushes
/// repeat addresses, and each key costs the database as much as an address chunk. Index
/// entries leave the database only by a forget (which drops the app here too) or a reset
/// (another database, another `ShipDb`), so a pair remembered here is in the database. When
/// full it starts over, and the index keys of the addresses that come again are written
/// again (a merge that changes nothing).
#[derive(Default)]
struct Indexed {
    apps: FxHashMap<AppSha, Vec<u32>>,
    pairs: usize,
}

impl Indexed {
    /// The addresses of `app` indexed so far, in order.
    fn known(&self, app: &AppSha) -> &[u32] {
        self.apps.get(app).map_or(&[], Vec::as_slice)
    }

    /// Remembers what a durable batch indexed: pairs grouped by app, each app's addresses
    /// in order.
    fn learn(&mut self, learned: &[(AppSha, u32)]) {
        if self.pairs + learned.len() > INDEXED_PAIRS {
            *self = Indexed::default();
        }
        for run in learned.chunk_by(|a, b| a.0 == b.0) {
            let ips = self.apps.entry(run[0].0).or_default();
            let before = ips.len();
            ips.extend(run.iter().map(|(_, ip)| *ip));
            ips.sort_unstable();
            ips.dedup();
            self.pairs += ips.len() - before;
        }
    }

    fn forget(&mut self, app: &AppSha) {
        if let Some(ips) = self.apps.remove(app) {
            self.pairs -= ips.len();
        }
    }
}

impl ShipDb {
    /// Takes the lease on `writer_id` for `instance` (a stable token of the local data dir,
    /// at most [`MAX_INSTANCE_BYTES`] of `[0-9a-zA-Z-]`) and opens its database in the first
    /// generation. `holder` describes this receiver (host, data dir) for the error another
    /// one would see.
    pub fn open(
        bucket: Arc<Bucket>,
        writer_id: &str,
        instance: &str,
        holder: &str,
    ) -> Result<ShipDb, S3Error> {
        ShipDb::open_in(bucket, 0, writer_id, instance, holder)
    }

    /// [`ShipDb::open`] in `generation` (see [`Bucket::generation`]).
    pub fn open_in(
        bucket: Arc<Bucket>,
        generation: u64,
        writer_id: &str,
        instance: &str,
        holder: &str,
    ) -> Result<ShipDb, S3Error> {
        ipevent_core::store::validate_writer_id(writer_id)?;
        assert!(
            !instance.is_empty()
                && instance.len() <= MAX_INSTANCE_BYTES
                && instance
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "instance token {instance:?}"
        );
        let path = bucket.writer_path(generation, writer_id);
        let location = format!("s3://{}/{path}", bucket.url.bucket);
        let rt = bucket.runtime.handle().clone();
        rt.block_on(take_lease(&bucket, writer_id, instance, holder))?;
        let settings = Settings {
            // No WAL: the outbox is this database's log. A batch becomes durable, and
            // visible to readers, when the memtable holding it is written as a table
            // ([`ShipDb::publish`]), and the shipper removes outbox entries only then. A WAL
            // would write every key to the bucket a second time and cost about a tenth of
            // the database's CPU.
            wal_enabled: false,
            ..Settings::default()
        };
        // Compaction (merging tables in the background) gets a thread of its own, so that a
        // long compaction never holds up the publish of a round or a request.
        let compaction = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ipevent-s3-compact")
            .enable_all()
            .build()
            .map_err(|e| S3Error::Config(format!("starting the compaction runtime: {e}")))?;
        let compactor = {
            let _runtime = compaction.enter();
            CompactorBuilder::new(path.clone(), Arc::clone(&bucket.store))
                .with_runtime(compaction.handle().clone())
        };
        let db = rt
            .block_on(
                Db::builder(path.clone(), Arc::clone(&bucket.store))
                    .with_settings(settings)
                    .with_merge_operator(Arc::new(StatsMerge))
                    .with_compactor_builder(compactor)
                    .build(),
            )
            .map_err(|source| db_error("opening", &location, source))?;
        if let Err(e) = rt.block_on(check_format(&db, &location)) {
            let _ = rt.block_on(db.close());
            return Err(e);
        }
        Ok(ShipDb {
            bucket,
            db,
            generation,
            writer_id: writer_id.to_string(),
            instance: instance.to_string(),
            location,
            previous: AtomicU64::new(0),
            indexed: Mutex::new(Indexed::default()),
            _compaction: compaction,
        })
    }

    /// The generation the database belongs to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The database's location, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The last flush epoch of this instance the database holds (0: none). An epoch written
    /// by another instance (a data dir that held the writer id before) does not count.
    pub fn shipped_epoch(&self) -> Result<u64, S3Error> {
        let value = self
            .bucket
            .runtime
            .block_on(self.db.get(codec::SHIPPED_EPOCH_KEY))
            .map_err(|source| db_error("reading the shipped epoch of", &self.location, source))?;
        let epoch = match value.as_deref().and_then(codec::decode_shipped) {
            Some((epoch, instance)) if instance == self.instance.as_bytes() => epoch,
            _ => 0,
        };
        self.previous.store(epoch, Relaxed);
        Ok(epoch)
    }

    /// Applies one flush: every app's addresses (a record in its bucket's address key, and
    /// one in the index key of each /12 with addresses not indexed yet) and total, the
    /// flush's change keys (for `watch`, expiring after [`CHANGE_HISTORY`]) and `epoch` as
    /// the shipped epoch, in one atomic write batch, durable in the bucket and visible to
    /// readers with the next [`ShipDb::publish`]. An app may come more than once.
    pub fn apply(
        &self,
        epoch: u64,
        apps: &[(AppSha, Vec<(u32, AddrStats)>)],
    ) -> Result<(), S3Error> {
        let mut batch = WriteBatch::new();
        let expiring = KeyOptions {
            ttl: Ttl::ExpireAfterMillis(CHANGE_HISTORY.as_millis() as u64),
        };
        let previous = self.previous.load(Relaxed);
        batch.put_with_options(codec::flush_key(epoch), previous.to_le_bytes(), &expiring);
        // Records go into each value in SHA order.
        let mut order: Vec<usize> = (0..apps.len()).collect();
        order.sort_unstable_by_key(|&i| apps[i].0);
        let mut changed: Vec<AppSha> = order.iter().map(|&i| apps[i].0).collect();
        changed.dedup();
        for (part, apps) in changed.chunks(codec::CHANGE_PART_APPS).enumerate() {
            let names: Vec<u8> = apps.iter().flat_map(|app| app.0).collect();
            batch.put_with_options(codec::change_key(epoch, part as u32), names, &expiring);
        }
        let mut indexed = self.indexed.lock().unwrap_or_else(PoisonError::into_inner);
        let mut learned = Vec::new();
        let mut addr_values: Vec<(u16, Vec<u8>)> = Vec::new();
        let mut count_values: Vec<(u16, Vec<u8>)> = Vec::new();
        let mut index_values: FxHashMap<u16, Vec<u8>> = FxHashMap::default();
        let mut merged = Vec::new();
        for same in order.chunk_by(|&i, &j| apps[i].0 == apps[j].0) {
            let app = &apps[same[0]].0;
            // An app that came more than once, or with its addresses out of order, is merged
            // into one sorted run first.
            let addrs: &[(u32, AddrStats)] = match same {
                [one] if apps[*one].1.is_sorted_by(|a, b| a.0 < b.0) => &apps[*one].1,
                _ => {
                    merged.clear();
                    merged.extend(same.iter().flat_map(|&i| apps[i].1.iter().copied()));
                    merged.sort_unstable_by_key(|(ip, _)| *ip);
                    merged.dedup_by(|later, kept| {
                        let same = later.0 == kept.0;
                        if same {
                            kept.1.merge(&later.1);
                        }
                        same
                    });
                    &merged
                }
            };
            let bucket = codec::bucket(app);
            let value = |values: &mut Vec<(u16, Vec<u8>)>| -> usize {
                if values.last().is_none_or(|(b, _)| *b != bucket) {
                    values.push((bucket, Vec::new()));
                }
                values.len() - 1
            };
            let at = value(&mut addr_values);
            codec::push_record(&mut addr_values[at].1, app, |out| {
                codec::encode_addrs(out, addrs)
            });
            let total: u64 = addrs.iter().map(|(_, stats)| stats.count).sum();
            let at = value(&mut count_values);
            codec::push_record(&mut count_values[at].1, app, |out| {
                out.extend_from_slice(&total.to_le_bytes())
            });
            let known = indexed.known(app);
            for (block, run) in codec::chunks(addrs) {
                let first_new = learned.len();
                learned.extend(
                    run.iter()
                        .filter(|(ip, _)| known.binary_search(ip).is_err())
                        .map(|(ip, _)| (*app, *ip)),
                );
                if learned.len() > first_new {
                    let new = learned[first_new..].iter().map(|(_, ip)| *ip);
                    let value = index_values.entry(block).or_default();
                    codec::push_record(value, app, |out| codec::encode_lows(out, new));
                }
            }
        }
        for (bucket, value) in addr_values {
            batch.merge(codec::addr_key(bucket), value);
        }
        for (bucket, value) in count_values {
            batch.merge(codec::count_key(bucket), value);
        }
        for (block, value) in index_values {
            batch.merge(codec::addr_index_key(block), value);
        }
        let mut marker = epoch.to_le_bytes().to_vec();
        marker.extend_from_slice(self.instance.as_bytes());
        batch.put(codec::SHIPPED_EPOCH_KEY, marker);
        self.bucket
            .runtime
            .block_on(self.db.write(batch))
            .map_err(|source| db_error("writing to", &self.location, source))?;
        indexed.learn(&learned);
        self.previous.store(epoch, Relaxed);
        Ok(())
    }

    /// The sequence number of the last forget of the bucket's log (of this database's
    /// generation) applied to this database (0: none).
    pub fn forgotten_seq(&self) -> Result<u64, S3Error> {
        let value = self
            .bucket
            .runtime
            .block_on(self.db.get(codec::FORGOTTEN_SEQ_KEY))
            .map_err(|source| db_error("reading the forget sequence of", &self.location, source))?;
        Ok(value.and_then(|v| codec::decode_u64(&v)).unwrap_or(0))
    }

    /// Removes `apps` (their records in the address and totals keys of their buckets and in
    /// the index keys of their /12s, each value read, rewritten without them and put back)
    /// and records `seq` as the last forget applied; returns once that is durable and
    /// visible (published with whatever was applied before it), with the number of
    /// addresses removed.
    pub fn forget(&self, seq: u64, apps: &[AppSha]) -> Result<u64, S3Error> {
        let mut indexed = self.indexed.lock().unwrap_or_else(PoisonError::into_inner);
        for app in apps {
            indexed.forget(app);
        }
        let gone: FxHashSet<AppSha> = apps.iter().copied().collect();
        let buckets: BTreeSet<u16> = apps.iter().map(codec::bucket).collect();
        let db = &self.db;
        let location = &self.location;
        let db_err = |source| db_error("forgetting apps in", location, source);
        self.bucket.runtime.block_on(async {
            let mut removed = 0u64;
            let mut blocks = BTreeSet::new();
            let mut batch = WriteBatch::new();
            let mut in_batch = 0usize;
            // Each value is read after the batches before it are written: a forget of many
            // apps rewrites every key once, in bounded batches.
            let rewrite = async |key: [u8; codec::KEY_BYTES],
                                 batch: &mut WriteBatch,
                                 in_batch: &mut usize,
                                 dropped: &mut dyn FnMut(&[u8]) -> Option<()>|
                   -> Result<(), S3Error> {
                let Some(value) = db.get(key).await.map_err(db_err)? else {
                    return Ok(());
                };
                let unreadable = || S3Error::Corrupt {
                    location: location.clone(),
                    what: format!("unreadable value of {} bytes under {key:?}", value.len()),
                };
                let (kept, out) =
                    codec::without_apps(&value, |app| gone.contains(app)).ok_or_else(unreadable)?;
                if out.is_empty() {
                    return Ok(());
                }
                for (_, payload) in out {
                    dropped(payload).ok_or_else(unreadable)?;
                }
                if kept.is_empty() {
                    batch.delete(key);
                } else {
                    batch.put(key, kept);
                }
                *in_batch += 1;
                if *in_batch >= FORGET_BATCH_KEYS {
                    db.write(std::mem::replace(batch, WriteBatch::new()))
                        .await
                        .map_err(db_err)?;
                    *in_batch = 0;
                }
                Ok(())
            };
            for &bucket in &buckets {
                rewrite(
                    codec::addr_key(bucket),
                    &mut batch,
                    &mut in_batch,
                    &mut |payload| {
                        for (ip, _) in codec::decode_addrs(payload)? {
                            blocks.insert(codec::block(ip));
                            removed += 1;
                        }
                        Some(())
                    },
                )
                .await?;
                rewrite(
                    codec::count_key(bucket),
                    &mut batch,
                    &mut in_batch,
                    &mut |_| Some(()),
                )
                .await?;
            }
            for &block in &blocks {
                rewrite(
                    codec::addr_index_key(block),
                    &mut batch,
                    &mut in_batch,
                    &mut |_| Some(()),
                )
                .await?;
            }
            batch.put(codec::FORGOTTEN_SEQ_KEY, seq.to_le_bytes());
            db.write(batch).await.map_err(db_err)?;
            db.flush_with_options(FlushOptions {
                flush_type: FlushType::MemTable,
            })
            .await
            .map_err(db_err)?;
            Ok(removed)
        })
    }

    /// Makes everything applied so far durable and visible to readers: freezes the memtable
    /// and writes it to L0, in the order the batches were applied.
    pub fn publish(&self) -> Result<(), S3Error> {
        self.bucket
            .runtime
            .block_on(self.db.flush_with_options(FlushOptions {
                flush_type: FlushType::MemTable,
            }))
            .map_err(|source| db_error("publishing", &self.location, source))
    }

    /// Closes the database and gives the lease back (a clean stop).
    pub fn close(self) -> Result<(), S3Error> {
        let (bucket, writer_id, instance) = (
            Arc::clone(&self.bucket),
            self.writer_id.clone(),
            self.instance.clone(),
        );
        self.close_keeping_lease()?;
        bucket
            .runtime
            .block_on(release_lease(&bucket, &writer_id, &instance))
    }

    /// Closes the database and keeps the lease (to open the next generation's).
    pub fn close_keeping_lease(self) -> Result<(), S3Error> {
        let rt = self.bucket.runtime.handle().clone();
        rt.block_on(self.db.close())
            .map_err(|source| db_error("closing", &self.location, source))
    }
}

/// Writes [`codec::FORMAT`] into a new database; refuses one written in another key layout
/// (an older build's), which this build would misread.
async fn check_format(db: &Db, location: &str) -> Result<(), S3Error> {
    let db_err = |source| db_error("reading the format of", location, source);
    match db.get(codec::FORMAT_KEY).await.map_err(db_err)? {
        Some(format) if codec::decode_u64(&format) == Some(codec::FORMAT) => Ok(()),
        found => {
            let empty = found.is_none()
                && db
                    .scan(..)
                    .await
                    .map_err(db_err)?
                    .next()
                    .await
                    .map_err(db_err)?
                    .is_none();
            if !empty {
                return Err(S3Error::Corrupt {
                    location: location.to_string(),
                    what: format!(
                        "written in key layout {} by another version of ipevent, not layout {}; \
                         reset the bucket (DELETE /events) or use another --store prefix",
                        found.as_deref().and_then(codec::decode_u64).unwrap_or(1),
                        codec::FORMAT
                    ),
                });
            }
            let written = async {
                db.put(codec::FORMAT_KEY, codec::FORMAT.to_le_bytes())
                    .await?;
                db.flush_with_options(FlushOptions {
                    flush_type: FlushType::MemTable,
                })
                .await
            };
            written
                .await
                .map_err(|source| db_error("writing the format of", location, source))
        }
    }
}

fn db_error(action: &'static str, location: &str, source: slatedb::Error) -> S3Error {
    if source.kind() == ErrorKind::Closed(CloseReason::Fenced) {
        return S3Error::Fenced {
            location: location.to_string(),
        };
    }
    S3Error::Db {
        action,
        location: location.to_string(),
        source,
    }
}

fn lease_path(bucket: &Bucket, writer_id: &str) -> ObjectPath {
    bucket.path(&format!("leases/{writer_id}"))
}

/// The lease's content: the instance token on the first line, then who holds it.
fn lease_body(instance: &str, holder: &str) -> String {
    format!("{instance}\n{holder}\n")
}

async fn take_lease(
    bucket: &Bucket,
    writer_id: &str,
    instance: &str,
    holder: &str,
) -> Result<(), S3Error> {
    let path = lease_path(bucket, writer_id);
    let os_err = |action, source| S3Error::ObjectStore {
        action,
        location: path.to_string(),
        source,
    };
    loop {
        match bucket.store.get(&path).await {
            Ok(found) => {
                let taken_at = found.meta.last_modified;
                let body = found.bytes().await.map_err(|e| os_err("reading", e))?;
                let body = String::from_utf8_lossy(&body);
                let mut lines = body.lines();
                let holder_instance = lines.next();
                if holder_instance == Some(instance) {
                    return Ok(());
                }
                if holder_instance.is_some_and(|h| h.starts_with(FORGET_INSTANCE_PREFIX)) {
                    let age = std::time::SystemTime::now()
                        .duration_since(std::time::SystemTime::from(taken_at))
                        .unwrap_or_default();
                    if age <= FORGET_LEASE_STALE {
                        return Err(S3Error::LeaseBusy {
                            writer_id: writer_id.to_string(),
                        });
                    }
                    // Left over by a forget that died: taken over.
                    match bucket.store.delete(&path).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => continue,
                        Err(e) => return Err(os_err("deleting", e)),
                    }
                }
                return Err(S3Error::LeaseHeld {
                    writer_id: writer_id.to_string(),
                    holder: lines.next().unwrap_or("unknown").to_string(),
                    lease: format!("s3://{}/{path}", bucket.url.bucket),
                });
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(os_err("reading", e)),
        }
        let put = bucket
            .store
            .put_opts(
                &path,
                PutPayload::from(lease_body(instance, holder)),
                PutOptions::from(PutMode::Create),
            )
            .await;
        match put {
            Ok(_) => return Ok(()),
            // Someone created it between our read and our write: read who.
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => continue,
            Err(e) => return Err(os_err("creating", e)),
        }
    }
}

async fn release_lease(bucket: &Bucket, writer_id: &str, instance: &str) -> Result<(), S3Error> {
    let path = lease_path(bucket, writer_id);
    let os_err = |action, source| S3Error::ObjectStore {
        action,
        location: path.to_string(),
        source,
    };
    match bucket.store.get(&path).await {
        Ok(found) => {
            let body = found.bytes().await.map_err(|e| os_err("reading", e))?;
            if String::from_utf8_lossy(&body).lines().next() == Some(instance) {
                bucket
                    .store
                    .delete(&path)
                    .await
                    .map_err(|e| os_err("deleting", e))?;
            }
            Ok(())
        }
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(os_err("reading", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexed_pairs_are_learned_per_app_in_order_once_each() {
        let (a, b) = (AppSha([1; 32]), AppSha([2; 32]));
        let mut indexed = Indexed::default();
        indexed.learn(&[(a, 5), (a, 9), (b, 1)]);
        indexed.learn(&[(a, 2), (a, 9), (a, 12), (b, 1)]);
        assert_eq!(indexed.known(&a), [2, 5, 9, 12]);
        assert_eq!(indexed.known(&b), [1]);
        assert_eq!(indexed.known(&AppSha([3; 32])), [] as [u32; 0]);
        assert_eq!(indexed.pairs, 5);
        indexed.forget(&a);
        assert_eq!(indexed.known(&a), [] as [u32; 0]);
        assert_eq!(indexed.pairs, 1);
        // Full: it starts over with what it learns.
        indexed.pairs = INDEXED_PAIRS;
        indexed.learn(&[(a, 7)]);
        assert_eq!(indexed.known(&a), [7]);
        assert_eq!(indexed.known(&b), [] as [u32; 0]);
        assert_eq!(indexed.pairs, 1);
    }
}

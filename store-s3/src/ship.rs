//! One writer's database: the receiver's shipper applies each flush to it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use ipevent_core::{AddrStats, AppSha};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use slatedb::config::{FlushOptions, FlushType, PutOptions as KeyOptions, Settings, Ttl};
use slatedb::{CloseReason, Db, ErrorKind, WriteBatch};

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

/// Most keys one write batch of [`ShipDb::forget`] deletes: an app with millions of addresses
/// is removed in several batches, so memory stays bounded (the forget is applied again, whole,
/// if it stops half way: its sequence is recorded only with the last batch).
const FORGET_BATCH_KEYS: usize = 65_536;

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
            // The shipper waits for each batch to be durable; a short WAL interval keeps that
            // wait short without a request per batch when batches come fast.
            flush_interval: Some(std::time::Duration::from_millis(50)),
            ..Settings::default()
        };
        let db = rt
            .block_on(
                Db::builder(path.clone(), Arc::clone(&bucket.store))
                    .with_settings(settings)
                    .with_merge_operator(Arc::new(StatsMerge))
                    .build(),
            )
            .map_err(|source| db_error("opening", &location, source))?;
        rt.block_on(index_addresses(&db))
            .map_err(|source| db_error("indexing the addresses of", &location, source))?;
        Ok(ShipDb {
            bucket,
            db,
            generation,
            writer_id: writer_id.to_string(),
            instance: instance.to_string(),
            location,
            previous: AtomicU64::new(0),
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

    /// Applies one flush: every app's addresses and total, the flush's change keys (for
    /// `watch`, expiring after [`CHANGE_HISTORY`]) and `epoch` as the shipped epoch, in one
    /// atomic write batch; returns once the batch is durable in the bucket.
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
        for (app, _) in apps {
            batch.put_with_options(codec::change_key(epoch, app), b"", &expiring);
        }
        for (app, addrs) in apps {
            let mut total = 0u64;
            for (ip, stats) in addrs {
                batch.merge(codec::addr_key(app, *ip), codec::encode_stats(stats));
                batch.put(codec::addr_index_key(*ip, app), b"");
                total += stats.count;
            }
            batch.merge(codec::count_key(app), total.to_le_bytes());
        }
        let mut marker = epoch.to_le_bytes().to_vec();
        marker.extend_from_slice(self.instance.as_bytes());
        batch.put(codec::SHIPPED_EPOCH_KEY, marker);
        self.bucket
            .runtime
            .block_on(async {
                let handle = self.db.write(batch).await?;
                handle.await_durable().await
            })
            .map_err(|source| db_error("writing to", &self.location, source))?;
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

    /// Removes every key of `apps` (each address with its index key, and the total, found by a
    /// prefix scan) and
    /// records `seq` as the last forget applied; returns once that is durable, with the number
    /// of address keys removed. Not yet visible to readers that skip the WAL: see
    /// [`ShipDb::publish`].
    pub fn forget(&self, seq: u64, apps: &[AppSha]) -> Result<u64, S3Error> {
        let db = &self.db;
        self.bucket
            .runtime
            .block_on(async {
                let mut removed = 0u64;
                let mut batch = WriteBatch::new();
                let mut in_batch = 0usize;
                for app in apps {
                    let mut iter = db.scan_prefix(codec::addr_prefix(app), ..).await?;
                    while let Some(kv) = iter.next().await? {
                        if let Some((_, ip)) = codec::parse_addr_key(&kv.key) {
                            batch.delete(codec::addr_index_key(ip, app));
                        }
                        batch.delete(kv.key);
                        removed += 1;
                        in_batch += 2;
                        if in_batch >= FORGET_BATCH_KEYS {
                            let full = std::mem::replace(&mut batch, WriteBatch::new());
                            db.write(full).await?.await_durable().await?;
                            in_batch = 0;
                        }
                    }
                    batch.delete(codec::count_key(app));
                }
                batch.put(codec::FORGOTTEN_SEQ_KEY, seq.to_le_bytes());
                db.write(batch).await?.await_durable().await?;
                Ok::<u64, slatedb::Error>(removed)
            })
            .map_err(|source| db_error("forgetting apps in", &self.location, source))
    }

    /// Makes everything applied so far visible to readers that skip the WAL: freezes the
    /// memtable and writes it to L0.
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

/// Index keys written per batch when a database from before the address index gets them.
const INDEX_BATCH_KEYS: usize = 4096;

/// Gives every address key of a database written before the address index its index key,
/// then writes the marker that lets readers trust the index (for a new database: the marker
/// alone). From then on every batch writes both keys together.
async fn index_addresses(db: &Db) -> Result<(), slatedb::Error> {
    if db.get(codec::ADDR_INDEX_MARKER_KEY).await?.is_some() {
        return Ok(());
    }
    let mut iter = db.scan_prefix([codec::ADDR_TAG], ..).await?;
    let mut batch = WriteBatch::new();
    let mut in_batch = 0;
    while let Some(kv) = iter.next().await? {
        if let Some((app, ip)) = codec::parse_addr_key(&kv.key) {
            batch.put(codec::addr_index_key(ip, &app), b"");
            in_batch += 1;
        }
        if in_batch == INDEX_BATCH_KEYS {
            db.write(std::mem::replace(&mut batch, WriteBatch::new()))
                .await?;
            in_batch = 0;
        }
    }
    batch.put(codec::ADDR_INDEX_MARKER_KEY, b"");
    db.write(batch).await?.await_durable().await
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

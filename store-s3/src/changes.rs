//! The bucket's [`ChangeFeed`]: which apps each shipped flush changed, read from the change
//! keys every shipper writes in the flush's own write batch ([`crate::codec`]), so that
//! `watch --store` re-reads only those apps.
//!
//! A flush of epoch `E` is shipped as one batch holding, beside its addresses and totals,
//! `w ‖ E` (valued with the epoch shipped before it) and `w ‖ E ‖ sha` for each app it
//! changed, with the shipped epoch `E`. The feed remembers, per writer, the last epoch it
//! read and the instance (data dir) that wrote it, and on each look scans that writer's
//! change keys past that epoch up to the shipped epoch: the apps in flush order, and
//! atomically with the data the apps are then read from. Writers are looked at in writer-id
//! order; a writer whose database appears later is read from its first change key.
//!
//! Change keys expire after [`CHANGE_HISTORY`](crate::ship::CHANGE_HISTORY). Each flush key
//! names the flush before it, so a feed that finds its chain broken (keys it never read
//! expired), a database that another instance took over (its epochs are not comparable), or
//! a database whose early keys are gone names every app of that writer instead (its totals'
//! keys): costlier, never missing a change. (After a takeover, the new instance's flushes
//! at epochs the old one also used name the old one's apps of those epochs as well: a read
//! more, no line more.) A reset moves readers to a new generation,
//! whose databases start empty: the feed follows it and reads the new databases from their
//! start.
//!
//! Readers skip the WAL, so the feed sees a flush once its shipper published it (at most
//! one ship interval after the flush, plus the round itself) and looks at most every
//! [`LOOK_INTERVAL`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipevent_core::store::{ChangeFeed, StoreError};
use ipevent_core::AppSha;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use rustc_hash::FxHashSet;

use crate::bucket::{bulk_scan, has_manifest, open_reader};
use crate::codec;
use crate::{Bucket, S3Error};

/// Shortest time between two looks at the bucket: each look lists the generation and the
/// writers and opens every writer's database, so a watch polled more often (every 100 ms)
/// asks the bucket at most this often.
pub const LOOK_INTERVAL: Duration = Duration::from_millis(250);

/// Follows every writer's change keys in the bucket's current generation.
#[derive(Debug)]
pub(crate) struct ChangeKeyFeed {
    bucket: Bucket,
    generation: u64,
    /// Per writer id, where its change keys were read up to.
    tails: BTreeMap<String, Tail>,
    /// Apps named in the current call (each once).
    named: FxHashSet<AppSha>,
    next_look: Instant,
}

/// One writer's change keys as far as the feed has read them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Tail {
    /// The last epoch read; `None` before the first.
    epoch: Option<u64>,
    /// The instance that shipped it.
    instance: Vec<u8>,
}

/// What one look at one writer's database found.
struct Look {
    writer_id: String,
    tail: Tail,
    apps: Vec<AppSha>,
}

impl ChangeKeyFeed {
    /// Starts at every writer's current shipped epoch: only flushes shipped from now on are
    /// reported. A database that appears later (a new writer) is read from its start.
    pub(crate) fn start(bucket: Bucket) -> Result<ChangeKeyFeed, S3Error> {
        let (generation, looks) = bucket.runtime.block_on(async {
            let generation = bucket.generation_async().await?;
            let looks =
                look_at_writers(&bucket, generation, &BTreeMap::new(), Scan::Position).await?;
            Ok::<_, S3Error>((generation, looks))
        })?;
        let tails = looks
            .into_iter()
            .map(|look| (look.writer_id, look.tail))
            .collect();
        Ok(ChangeKeyFeed {
            bucket,
            generation,
            tails,
            named: FxHashSet::default(),
            next_look: Instant::now(),
        })
    }
}

impl ChangeFeed for ChangeKeyFeed {
    fn changed(&mut self, out: &mut Vec<AppSha>) -> Result<(), StoreError> {
        let now = Instant::now();
        if now < self.next_look {
            return Ok(());
        }
        self.next_look = now + LOOK_INTERVAL;
        let backend = |e: S3Error| StoreError::Backend(e.to_string());
        let (generation, looks) = self
            .bucket
            .runtime
            .block_on(async {
                let generation = self.bucket.generation_async().await?;
                // A reset: the new generation's databases are read from their start.
                let empty = BTreeMap::new();
                let tails = if generation == self.generation {
                    &self.tails
                } else {
                    &empty
                };
                let looks = look_at_writers(&self.bucket, generation, tails, Scan::Changes).await?;
                Ok::<_, S3Error>((generation, looks))
            })
            .map_err(backend)?;
        // Every writer was read: only now does the feed move on, so an error loses nothing.
        if generation != self.generation {
            log::info!("watch: the bucket was reset (generation {generation}): following");
            self.generation = generation;
            self.tails.clear();
        }
        self.named.clear();
        for look in looks {
            for app in look.apps {
                if self.named.insert(app) {
                    out.push(app);
                }
            }
            self.tails.insert(look.writer_id, look.tail);
        }
        Ok(())
    }
}

/// What a look at a writer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scan {
    /// Only where its change keys end (the feed's start).
    Position,
    /// The apps changed past the writer's tail.
    Changes,
}

/// Looks at every writer of `generation` at once; the looks in writer-id order. A writer
/// whose prefix holds no database (deleted, still listed) or that shipped nothing is left
/// out.
async fn look_at_writers(
    bucket: &Bucket,
    generation: u64,
    tails: &BTreeMap<String, Tail>,
    scan: Scan,
) -> Result<Vec<Look>, S3Error> {
    let ids = bucket.writer_ids_async(generation).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids {
        let store = Arc::clone(&bucket.store);
        let path = bucket.writer_path(generation, &id);
        let tail = tails.get(&id).cloned().unwrap_or_default();
        tasks.spawn(async move {
            let looked = look_at_writer(store, path, tail, scan).await;
            looked.map(|found| {
                found.map(|(tail, apps)| Look {
                    writer_id: id,
                    tail,
                    apps,
                })
            })
        });
    }
    let mut looks = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Some(look) = joined.expect("look task does not panic")? {
            looks.push(look);
        }
    }
    looks.sort_by(|a, b| a.writer_id.cmp(&b.writer_id));
    Ok(looks)
}

/// Reads one writer's database: its new tail, and the apps changed past `tail` (every app
/// it holds when the change keys cannot say). `None` when it holds no database or shipped
/// nothing yet.
async fn look_at_writer(
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    tail: Tail,
    scan: Scan,
) -> Result<Option<(Tail, Vec<AppSha>)>, S3Error> {
    let location = || path.to_string();
    let db_err = |action, source| S3Error::Db {
        action,
        location: location(),
        source,
    };
    let corrupt = |what: String| S3Error::Corrupt {
        location: location(),
        what,
    };
    let reader = match open_reader(path.clone(), Arc::clone(&store)).await {
        Ok(reader) => reader,
        Err(source) => {
            if has_manifest(&*store, &path).await? {
                return Err(db_err("opening", source));
            }
            return Ok(None);
        }
    };
    let found = async {
        let Some(marker) = reader
            .get(codec::SHIPPED_EPOCH_KEY)
            .await
            .map_err(|e| db_err("reading the shipped epoch of", e))?
        else {
            return Ok(None);
        };
        let (shipped, instance) = codec::decode_shipped(&marker)
            .ok_or_else(|| corrupt(format!("shipped epoch of {} bytes", marker.len())))?;
        let now = Tail {
            epoch: Some(shipped),
            instance: instance.to_vec(),
        };
        if scan == Scan::Position || now == tail {
            return Ok(Some((now, Vec::new())));
        }
        let mut apps = Vec::new();
        // Another instance's epochs say nothing about this one's: every app, then.
        let mut complete = tail.epoch.is_none() || tail.instance == now.instance;
        if complete {
            let from = match tail.epoch {
                None => 0,
                Some(epoch) if epoch < shipped => epoch + 1,
                // Nothing past the tail (an epoch never goes back within one instance).
                Some(_) => return Ok(Some((now, apps))),
            };
            let last = codec::change_key(shipped, u32::MAX);
            let mut iter = reader
                .scan_with_options(
                    codec::flush_key(from).to_vec()..=last.to_vec(),
                    &bulk_scan(),
                )
                .await
                .map_err(|e| db_err("scanning", e))?;
            let mut expected = tail.epoch.unwrap_or(0);
            while let Some(kv) = iter.next().await.map_err(|e| db_err("scanning", e))? {
                match codec::parse_change_key(&kv.key) {
                    Some((epoch, None)) => {
                        let previous = codec::decode_u64(&kv.value).ok_or_else(|| {
                            corrupt(format!("flush key value of {} bytes", kv.value.len()))
                        })?;
                        if previous > expected {
                            // Flushes between them expired unread.
                            complete = false;
                            break;
                        }
                        expected = epoch;
                    }
                    Some((_, Some(_))) => {
                        apps.extend(codec::decode_changed(&kv.value).ok_or_else(|| {
                            corrupt(format!("change key value of {} bytes", kv.value.len()))
                        })?)
                    }
                    None => return Err(corrupt(format!("key of {} bytes", kv.key.len()))),
                }
            }
            // The shipped epoch's own keys expired.
            complete &= expected >= shipped;
        }
        if !complete {
            log::info!(
                "watch: {} holds no complete record of the flushes since epoch {:?}; \
                 re-reading every app it holds",
                location(),
                tail.epoch
            );
            apps.clear();
            let mut iter = reader
                .scan_prefix_with_options([codec::COUNT_TAG], .., &bulk_scan())
                .await
                .map_err(|e| db_err("scanning", e))?;
            while let Some(kv) = iter.next().await.map_err(|e| db_err("scanning", e))? {
                let records = codec::parse_count_key(&kv.key)
                    .and(codec::records(&kv.value))
                    .ok_or_else(|| corrupt(format!("totals key of {} bytes", kv.key.len())))?;
                apps.extend(records.into_iter().map(|(app, _)| app));
            }
        }
        Ok::<_, S3Error>(Some((now, apps)))
    }
    .await;
    if let Err(e) = reader.close().await {
        log::debug!("closing the reader of {}: {e}", location());
    }
    found
}

//! The connection to the bucket and the read path.

use std::sync::Arc;
use std::time::Duration;

use ipevent_core::lookup::Cidr;
use ipevent_core::store::backend::EachApp;
use ipevent_core::store::{AppCount, AppData, ChangeFeed, Store, StoreError};
use ipevent_core::{AddrStats, AppSha};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use rustc_hash::FxHashMap;
use slatedb::config::{DbReaderOptions, ScanOptions};
use slatedb::{DbReader, DbReaderMode};

use crate::codec::{self, StatsMerge};
use crate::S3Error;

/// What reading one app from the bucket gave.
pub type AppRead = Result<Option<AppData>, S3Error>;

/// The environment variables the connection is made from, and the only ones read. Nothing
/// else (no command-line flag, no config file) carries an endpoint or a credential, and none
/// of their values is ever logged.
pub const ENV_VARS: [&str; 5] = [
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_ALLOW_HTTP",
];

/// Where the store lives: `s3://BUCKET/PREFIX` (the prefix may be empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// The bucket.
    pub bucket: String,
    /// The prefix inside it, without leading or trailing `/`.
    pub prefix: String,
}

impl std::str::FromStr for StoreUrl {
    type Err = S3Error;

    fn from_str(url: &str) -> Result<StoreUrl, S3Error> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| S3Error::Url(url.to_string()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        let prefix_ok = prefix.split('/').all(|part| {
            prefix.is_empty()
                || (!part.is_empty()
                    && part != "."
                    && part != ".."
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        });
        if !bucket_ok || !prefix_ok {
            return Err(S3Error::Url(url.to_string()));
        }
        Ok(StoreUrl {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// Worker threads of the runtime that drives object store requests: requests are I/O bound,
/// two let a slow request not hold up the others without competing with ingest for cores.
const RUNTIME_THREADS: usize = 2;

/// The HTTP client's own retries: short, because SlateDB retries the operations of a database
/// again on top of them (without end for a writer). A request during an outage fails after a
/// few seconds and is tried again; once the store returns, the next try is at most
/// [`MAX_RETRY_BACKOFF`] away, not the client's default of 15 s.
fn client_retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: MAX_RETRY_BACKOFF,
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(10),
    }
}

/// Longest pause between two tries of one request.
const MAX_RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// A connection to the bucket, with its own small async runtime so that the callers (threads
/// of the receiver, the CLI, the API's blocking tasks) stay synchronous.
pub struct Bucket {
    pub(crate) url: StoreUrl,
    pub(crate) store: Arc<dyn ObjectStore>,
    /// Shared with what follows the bucket ([`crate::changes`]), which may outlive a borrow.
    pub(crate) runtime: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket").field("url", &self.url).finish()
    }
}

impl Bucket {
    /// Connects to `url` with the settings of [`ENV_VARS`] from the environment. Makes no
    /// request yet.
    pub fn from_env(url: StoreUrl) -> Result<Bucket, S3Error> {
        Bucket::from_vars(url, |name| std::env::var(name).ok())
    }

    /// Connects to `url` with the settings of [`ENV_VARS`] as `lookup` gives them (tests pass
    /// their server's).
    pub fn from_vars(
        url: StoreUrl,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Bucket, S3Error> {
        let var = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let mut builder = AmazonS3Builder::new().with_bucket_name(&url.bucket);
        if let Some(endpoint) = var("AWS_ENDPOINT_URL") {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(key) = var("AWS_ACCESS_KEY_ID") {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = var("AWS_SECRET_ACCESS_KEY") {
            builder = builder.with_secret_access_key(secret);
        }
        builder = builder.with_region(var("AWS_REGION").unwrap_or_else(|| "us-east-1".into()));
        builder = builder.with_retry(client_retry());
        if let Some(allow) = var("AWS_ALLOW_HTTP") {
            builder = builder.with_allow_http(allow.eq_ignore_ascii_case("true"));
        }
        let store = builder.build().map_err(|e| {
            // The builder's messages name settings, not their values.
            S3Error::Config(format!("{e} (set {})", ENV_VARS.join(", ")))
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("ipevent-s3")
            .enable_all()
            .build()
            .map_err(|e| S3Error::Config(format!("starting the I/O runtime: {e}")))?;
        Ok(Bucket {
            url,
            store: Arc::new(store),
            runtime: Arc::new(runtime),
        })
    }

    /// Another handle on the same connection and runtime.
    pub(crate) fn share(&self) -> Bucket {
        Bucket {
            url: self.url.clone(),
            store: Arc::clone(&self.store),
            runtime: Arc::clone(&self.runtime),
        }
    }

    /// The store's URL.
    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    /// A path under the store's prefix.
    pub(crate) fn path(&self, rest: &str) -> ObjectPath {
        if self.url.prefix.is_empty() {
            ObjectPath::from(rest)
        } else {
            ObjectPath::from(format!("{}/{rest}", self.url.prefix))
        }
    }

    /// The directory of the databases of `generation` (see [`Bucket::generation`]): the
    /// first generation is `PREFIX/writers/`, a later one `PREFIX/g<N>/writers/`.
    pub(crate) fn writers_dir(&self, generation: u64) -> ObjectPath {
        if generation == 0 {
            self.path("writers")
        } else {
            self.path(&format!("g{generation}/writers"))
        }
    }

    /// The database path of `writer_id` in `generation`.
    pub(crate) fn writer_path(&self, generation: u64, writer_id: &str) -> ObjectPath {
        self.writers_dir(generation).join(writer_id)
    }

    /// Every writer that has a database in the current generation, sorted.
    pub fn writer_ids(&self) -> Result<Vec<String>, S3Error> {
        self.runtime.block_on(async {
            let generation = self.generation_async().await?;
            self.writer_ids_async(generation).await
        })
    }

    pub(crate) async fn writer_ids_async(&self, generation: u64) -> Result<Vec<String>, S3Error> {
        let writers = self.writers_dir(generation);
        let listing = self
            .store
            .list_with_delimiter(Some(&writers))
            .await
            .map_err(|source| S3Error::ObjectStore {
                action: "listing",
                location: writers.to_string(),
                source,
            })?;
        let mut ids: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|id| ipevent_core::store::validate_writer_id(id).is_ok())
            .collect();
        // Listings come in the server's order, which need not be byte order.
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Opens every writer's database read-only. A prefix that holds no database (a listing
    /// can still show a deleted one) is skipped.
    pub(crate) async fn open_readers(&self) -> Result<Vec<(u64, String, DbReader)>, S3Error> {
        let generation = self.generation_async().await?;
        let ids = self.writer_ids_async(generation).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for id in ids {
            let store = Arc::clone(&self.store);
            let path = self.writer_path(generation, &id);
            tasks.spawn(async move {
                let opened = open_reader(path.clone(), Arc::clone(&store)).await;
                (id, path, store, opened)
            });
        }
        let mut readers = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (id, path, store, opened) = joined.expect("reader task does not panic");
            match opened {
                Ok(reader) => readers.push((generation, id, reader)),
                Err(source) => {
                    if has_manifest(&*store, &path).await? {
                        return Err(S3Error::Db {
                            action: "opening",
                            location: path.to_string(),
                            source,
                        });
                    }
                    log::debug!("{path}: no database (deleted); skipped");
                }
            }
        }
        readers.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(readers)
    }

    /// Reads `app` from every writer's database and merges it: the same [`AppData`] the local
    /// tree's reader returns for the same events (`logs` counts the databases that hold the
    /// app; there are no blocks or torn tails). `Ok(None)` when no writer has seen the app.
    pub fn read_app(&self, app: &AppSha) -> Result<Option<AppData>, S3Error> {
        let mut out = None;
        self.read_apps(std::slice::from_ref(app), &mut |_, read| out = Some(read))?;
        out.expect("one app read")
    }

    /// [`Bucket::read_app`] for each of `apps`, in order, with the databases opened once.
    pub fn read_apps(
        &self,
        apps: &[AppSha],
        each: &mut dyn FnMut(&AppSha, AppRead),
    ) -> Result<(), S3Error> {
        self.runtime.block_on(async {
            let readers = self.open_readers().await?;
            for app in apps {
                each(app, self.read_app_from(&readers, app).await);
            }
            close_all(readers).await;
            Ok(())
        })
    }

    async fn read_app_from(
        &self,
        readers: &[(u64, String, DbReader)],
        app: &AppSha,
    ) -> Result<Option<AppData>, S3Error> {
        let mut merged: FxHashMap<u32, AddrStats> = FxHashMap::default();
        let mut out = AppData::default();
        for (generation, id, reader) in readers {
            let location = || self.writer_path(*generation, id).to_string();
            let db_err = |action, source| S3Error::Db {
                action,
                location: location(),
                source,
            };
            let key = codec::addr_key(codec::bucket(app));
            let value = reader.get(key).await.map_err(|e| db_err("reading", e))?;
            let mut seen = false;
            if let Some(value) = value {
                let payload = codec::find_record(&value, app)
                    .ok_or_else(|| corrupt_entry(location(), &key, &value))?;
                if let Some(payload) = payload {
                    let addrs = codec::decode_addrs(payload)
                        .ok_or_else(|| corrupt_entry(location(), &key, &value))?;
                    for (ip, stats) in addrs {
                        merged.entry(ip).or_default().merge(&stats);
                    }
                    seen = true;
                }
            }
            out.logs += usize::from(seen);
        }
        if out.logs == 0 {
            return Ok(None);
        }
        out.addrs = merged.into_iter().collect();
        out.addrs.sort_unstable_by_key(|(ip, _)| *ip);
        Ok(Some(out))
    }

    /// The apps that had an address in `cidr`, from every writer's address index keys: one
    /// range scan per database over the index blocks (/12s) the CIDR touches. `Ok(None)` when
    /// some database has no [`codec::FORMAT_KEY`] (written by another version): the caller
    /// reads every app.
    pub fn apps_with_address(&self, cidr: Cidr) -> Result<Option<Vec<AppSha>>, S3Error> {
        let (lo, hi) = cidr.range();
        let start = codec::addr_index_key(codec::block(lo));
        let end = codec::addr_index_key(codec::block(hi));
        self.runtime.block_on(async {
            let readers = self.open_readers().await?;
            let mut out = Vec::new();
            let mut indexed = true;
            for (generation, id, reader) in &readers {
                let location = || self.writer_path(*generation, id).to_string();
                let db_err = |action, source| S3Error::Db {
                    action,
                    location: location(),
                    source,
                };
                let format = reader
                    .get(codec::FORMAT_KEY)
                    .await
                    .map_err(|e| db_err("reading", e))?;
                if format.is_none() {
                    indexed = false;
                    break;
                }
                let mut iter = reader
                    .scan_with_options(start.as_slice()..=end.as_slice(), &bulk_scan())
                    .await
                    .map_err(|e| db_err("scanning", e))?;
                while let Some(kv) = iter.next().await.map_err(|e| db_err("scanning", e))? {
                    let (block, records) =
                        key_records(location(), &kv.key, &kv.value, codec::parse_addr_index_key)?;
                    for (app, payload) in records {
                        let mut ips = codec::decode_lows(block, payload)
                            .ok_or_else(|| corrupt_entry(location(), &kv.key, &kv.value))?;
                        if ips.any(|ip| (lo..=hi).contains(&ip)) {
                            out.push(app);
                        }
                    }
                }
            }
            close_all(readers).await;
            Ok(indexed.then_some(out))
        })
    }

    /// Every app in the bucket with its count over all writers, most events first (ties by
    /// SHA), as [`ipevent_core::store::list_apps`] orders them. Reads one total key per app
    /// and writer, not the addresses.
    pub fn list_apps(&self) -> Result<Vec<AppCount>, S3Error> {
        self.runtime.block_on(async {
            let readers = self.open_readers().await?;
            let mut totals: FxHashMap<AppSha, u64> = FxHashMap::default();
            for (generation, id, reader) in &readers {
                let location = || self.writer_path(*generation, id).to_string();
                let mut iter = reader
                    .scan_prefix_with_options([codec::COUNT_TAG], .., &bulk_scan())
                    .await
                    .map_err(|source| S3Error::Db {
                        action: "scanning",
                        location: location(),
                        source,
                    })?;
                while let Some(kv) = iter.next().await.map_err(|source| S3Error::Db {
                    action: "scanning",
                    location: location(),
                    source,
                })? {
                    let (_, records) =
                        key_records(location(), &kv.key, &kv.value, codec::parse_count_key)?;
                    for (app, payload) in records {
                        let count = codec::decode_u64(payload)
                            .ok_or_else(|| corrupt_entry(location(), &kv.key, &kv.value))?;
                        *totals.entry(app).or_default() += count;
                    }
                }
            }
            close_all(readers).await;
            let mut out: Vec<AppCount> = totals
                .into_iter()
                .map(|(app, count)| AppCount {
                    app,
                    count,
                    unreadable: None,
                })
                .collect();
            out.sort_unstable_by(|a, b| b.count.cmp(&a.count).then(a.app.cmp(&b.app)));
            Ok(out)
        })
    }
}

/// Bytes of a table one request of a [`bulk_scan`] fetches at least.
const SCAN_READ_AHEAD: usize = 512 << 10;
/// Requests one iterator of a [`bulk_scan`] keeps in flight.
const SCAN_FETCH_TASKS: usize = 2;

/// Options of a scan that reads many keys (`list`, the address lookup, the retention sweep,
/// a watch's reads): each request fetches [`SCAN_READ_AHEAD`] of a table, not one 4 KiB block
/// (SlateDB's default), so a scan costs a few requests per table instead of one per block.
pub(crate) fn bulk_scan() -> ScanOptions {
    ScanOptions::default()
        .with_read_ahead_bytes(SCAN_READ_AHEAD)
        .with_max_fetch_tasks(SCAN_FETCH_TASKS)
}

/// The error for an entry this build did not write.
pub(crate) fn corrupt_entry(location: String, key: &[u8], value: &[u8]) -> S3Error {
    S3Error::Corrupt {
        location,
        what: format!(
            "unexpected entry (key of {} bytes, value of {} bytes)",
            key.len(),
            value.len()
        ),
    }
}

/// The records under a key of the kind `parse` reads (its bucket or index block, then the
/// records), or an error naming the entry as corrupt.
pub(crate) fn key_records<'a>(
    location: String,
    key: &[u8],
    value: &'a [u8],
    parse: fn(&[u8]) -> Option<u16>,
) -> Result<(u16, codec::Records<'a>), S3Error> {
    parse(key)
        .zip(codec::records(value))
        .ok_or_else(|| corrupt_entry(location, key, value))
}

/// How a one-shot reader opens a database: it follows the latest manifest without creating a
/// checkpoint (no writes to the bucket) and skips the WAL, reading only what the writer has
/// flushed to L0 and below. The writer flushes its memtable after every ship round, so a
/// reader is at most about one ship interval and one round behind, and opening costs a manifest read instead of a
/// WAL replay.
pub(crate) async fn open_reader(
    path: ObjectPath,
    store: Arc<dyn ObjectStore>,
) -> Result<DbReader, slatedb::Error> {
    let options = DbReaderOptions {
        // A one-shot reader is closed long before it would poll.
        manifest_poll_interval: Duration::from_secs(60),
        checkpoint_lifetime: Duration::from_secs(600),
        skip_wal_replay: skip_wal_replay(),
        ..DbReaderOptions::default()
    };
    DbReader::builder(path, store)
        .with_reader_mode(DbReaderMode::FollowLatest)
        .with_options(options)
        .with_merge_operator(Arc::new(StatsMerge))
        .build()
        .await
}

/// Readers skip the WAL unless `IPEVENT_S3_REPLAY_WAL=1` (for measuring the difference).
fn skip_wal_replay() -> bool {
    std::env::var("IPEVENT_S3_REPLAY_WAL").map_or(true, |v| v != "1")
}

pub(crate) async fn close_all(readers: Vec<(u64, String, DbReader)>) {
    for (_, id, reader) in readers {
        if let Err(e) = reader.close().await {
            log::debug!("closing the reader of {id}: {e}");
        }
    }
}

/// Whether `path` holds a database manifest.
pub(crate) async fn has_manifest(
    store: &dyn ObjectStore,
    path: &ObjectPath,
) -> Result<bool, S3Error> {
    let manifest = path.clone().join("manifest");
    let listing = store
        .list_with_delimiter(Some(&manifest))
        .await
        .map_err(|source| S3Error::ObjectStore {
            action: "listing",
            location: manifest.to_string(),
            source,
        })?;
    Ok(!listing.objects.is_empty())
}

impl Store for Bucket {
    fn read_app(&self, app: &AppSha) -> Result<Option<AppData>, StoreError> {
        Bucket::read_app(self, app).map_err(|e| StoreError::Backend(e.to_string()))
    }

    fn list_apps(&self) -> Result<Vec<AppCount>, StoreError> {
        Bucket::list_apps(self).map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// Opens every writer's database once for all of `apps`.
    fn read_apps(&self, apps: &[AppSha], each: &mut EachApp<'_>) -> Result<(), StoreError> {
        Bucket::read_apps(self, apps, &mut |app, read| {
            each(app, read.map_err(|e| StoreError::Backend(e.to_string())))
        })
        .map_err(|e| StoreError::Backend(e.to_string()))
    }

    fn apps_with_address(&self, cidr: Cidr) -> Result<Option<Vec<AppSha>>, StoreError> {
        Bucket::apps_with_address(self, cidr).map_err(|e| StoreError::Backend(e.to_string()))
    }

    fn follow_changes(&self) -> Result<Box<dyn ChangeFeed>, StoreError> {
        let feed = crate::changes::ChangeKeyFeed::start(self.share())
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(Box::new(feed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        let url: StoreUrl = "s3://ipevent/prod/eu".parse().unwrap();
        assert_eq!(url.bucket, "ipevent");
        assert_eq!(url.prefix, "prod/eu");
        assert_eq!(url.to_string(), "s3://ipevent/prod/eu");
        let url: StoreUrl = "s3://ipevent".parse().unwrap();
        assert_eq!(url.prefix, "");
        for bad in [
            "ipevent",
            "s3://",
            "s3://UP/x",
            "s3://b/../x",
            "http://ipevent/x",
            "s3://ab/x",
        ] {
            assert!(bad.parse::<StoreUrl>().is_err(), "{bad}");
        }
    }
}

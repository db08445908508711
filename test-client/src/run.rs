//! One run: send the stream, tally what the kernel took, ask the service, summarise.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use ipevent_core::wire::Reject;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::corrupt::CorruptKind;
use crate::generate::{Batch, Generator, StreamConfig, Tally, TrackedApp, BATCH_MAX_DATAGRAMS};
use crate::scenario::{splitmix64, AddrSet, Apps, Scenario, MAX_ADDRS_PER_APP};
use crate::send::{Sender, TokenBucket};
pub use crate::summary::{AppSummary, Summary};
use crate::verify::{self, Expected, Source};

/// Most apps a run verifies one by one (each costs one query).
pub const MAX_VERIFY_APPS: usize = 10_000;

/// How often the progress bar is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Batches hold about this long a share of a second at a set rate, so that a rate-limited
/// run sends small bursts often rather than large bursts seldom.
const RATE_BATCHES_PER_SEC: u64 = 1000;

/// The token bucket holds at least a hundredth of a second of the rate.
const RATE_CATCH_UP_PER_SEC: u64 = 100;

/// How long a windowed run waits for the receivers' counters to move before it gives up.
pub const WINDOW_STALL_LIMIT: Duration = Duration::from_secs(60);

/// Longest pause between two reads of the receivers' counters while a window waits.
const WINDOW_POLL_MAX: Duration = Duration::from_millis(20);

/// When the run stops sending.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    /// After this many datagrams (valid and corrupted together).
    Count(u64),
    /// After this long.
    Duration(Duration),
}

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Which apps.
    pub scenario: Scenario,
    /// The seed everything is derived from.
    pub seed: u64,
    /// Where datagrams go (resolved, at least one).
    pub targets: Vec<SocketAddr>,
    /// Share of corrupted datagrams, 0 to 100.
    pub corrupt_pct: f64,
    /// Share of valid datagrams in a non-canonical valid encoding, 0 to 100.
    pub valid_variant_pct: f64,
    /// Datagrams per second; 0 for as fast as possible.
    pub rate_per_sec: u64,
    /// When to stop.
    pub limit: Limit,
    /// Datagrams per `sendmmsg`; `None` picks one from the rate.
    pub batch: Option<usize>,
    /// Apps to verify in a random scenario (all when there are no more).
    pub verify_apps: usize,
    /// Where to get reports; `None` skips verification.
    pub source: Option<Source>,
    /// Allowed share of dropped events, in percent.
    pub max_drop_pct: f64,
    /// Most datagrams sent that the receivers behind `source` have not yet read (0: no
    /// limit). Needs a source.
    pub window: u64,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Set (by a signal) to stop sending early; the run still summarises and verifies.
    pub stop: Arc<AtomicBool>,
}

impl RunConfig {
    /// Datagrams per batch: the configured size, or at most a millisecond of the rate.
    pub fn batch_size(&self) -> usize {
        let size = match (self.batch, self.rate_per_sec) {
            (Some(size), _) => size,
            (None, 0) => 256,
            (None, rate) => (rate / RATE_BATCHES_PER_SEC) as usize,
        };
        let size = match self.window {
            0 => size,
            window => size.min(usize::try_from(window).unwrap_or(usize::MAX)),
        };
        size.clamp(1, BATCH_MAX_DATAGRAMS)
    }
}

/// On-CPU and run-queue wait time of this thread so far, in nanoseconds, from
/// `/proc/thread-self/schedstat` (Linux); `None` where that is not available.
fn schedstat() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some((fields.next()??, fields.next()??))
}

/// The app indices a run tracks and verifies: every lookout app; in a random scenario
/// `verify_apps` of them chosen by the seed, or all when there are no more.
pub fn tracked_indices(apps: &Apps, verify_apps: usize, seed: u64) -> Vec<u64> {
    let count = apps.count();
    if apps.scenario() == Scenario::Lookout || count <= verify_apps as u64 {
        return (0..count).collect();
    }
    // A separate generator, so the sample does not shift the datagram stream.
    let mut rng = StdRng::seed_from_u64(splitmix64(seed ^ 0x7472_6163_6b65_6421));
    let mut sample: Vec<u64> = rand::seq::index::sample(&mut rng, count as usize, verify_apps)
        .into_iter()
        .map(|i| i as u64)
        .collect();
    sample.sort_unstable();
    sample
}

/// What a tracked app should show, from what was sent to it.
fn expected(
    app: ipevent_core::AppSha,
    addrs: &AddrSet,
    sent: &[u64; MAX_ADDRS_PER_APP],
) -> Expected {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (j, &n) in sent.iter().enumerate().take(addrs.len()) {
        if n > 0 {
            if AddrSet::is_host(j) {
                good.push(addrs.addr(j));
            } else {
                bad.push(addrs.addr(j));
            }
        }
    }
    good.sort_unstable();
    bad.sort_unstable();
    Expected {
        app,
        count: sent.iter().sum(),
        good,
        bad,
    }
}

fn progress_bar(limit: Limit) -> indicatif::ProgressBar {
    let bar = match limit {
        Limit::Count(n) => indicatif::ProgressBar::new(n).with_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} datagrams, {msg}, ETA {eta}",
            )
            .expect("progress template"),
        ),
        Limit::Duration(d) => indicatif::ProgressBar::new(d.as_millis() as u64).with_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {msg}").expect("progress template"),
        ),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar
}

/// Sends the run's stream, verifies, and summarises.
pub fn run(config: &RunConfig) -> anyhow::Result<Summary> {
    let apps = Apps::new(config.scenario, config.seed);
    let apps_total = apps.count();
    let tracked = tracked_indices(&apps, config.verify_apps, config.seed);
    let stream = StreamConfig {
        seed: config.seed,
        corrupt_pct: config.corrupt_pct,
        valid_variant_pct: config.valid_variant_pct,
    };
    let mut generator = Generator::new(apps, stream, &tracked);
    let batch_size = config.batch_size();
    let mut sender = Sender::new(config.targets.clone(), batch_size)?;
    let mut window = match (config.window, config.source.as_ref()) {
        (0, _) => None,
        (size, Some(source)) => Some(Window::start(size, source)?),
        (_, None) => anyhow::bail!("a window needs a source of the receivers' counters"),
    };
    let sent = send_stream(
        config,
        &mut generator,
        &mut sender,
        batch_size,
        window.as_mut(),
    )?;
    let interrupted = config.stop.load(Ordering::Relaxed);
    if interrupted {
        log::warn!(
            "interrupted after {} datagrams; verifying what was sent",
            sent.tally.sent
        );
    }
    let expectations = expectations(generator.tracked(), &sent.tally);
    let verification = config
        .source
        .as_ref()
        .map(|source| verify::verify(source, &expectations, config.max_drop_pct));
    let ok = sender.errors.total == 0 && verification.as_ref().is_none_or(|v| v.ok);
    Ok(Summary {
        interrupted,
        apps: app_summaries(generator.tracked(), &expectations),
        verification,
        ok,
        ..summarise(config, apps_total, &sender, &sent, batch_size)
    })
}

/// What the sending loop did.
struct Sent {
    tally: Tally,
    elapsed: Duration,
    /// On-CPU and run-queue wait seconds of the sending thread, when known.
    sched: Option<(f64, f64)>,
}

/// Holds a run to at most `size` datagrams the receivers have not read (`--window`).
struct Window<'a> {
    size: u64,
    source: &'a Source,
    /// The receivers' counter when the run began.
    base: u64,
    /// Datagrams of this run the counters showed taken.
    confirmed: u64,
}

impl<'a> Window<'a> {
    fn start(size: u64, source: &'a Source) -> anyhow::Result<Window<'a>> {
        let base = source
            .datagrams_taken()
            .context("reading the receivers' counters for --window")?;
        Ok(Window {
            size,
            source,
            base,
            confirmed: 0,
        })
    }

    /// Before `n` more datagrams go out after `sent`: when they would not fit in the window,
    /// waits until the receivers' counters show all `sent` taken. Gives up when the counters
    /// stand still for [`WINDOW_STALL_LIMIT`]; returns early on a stop.
    fn make_room(&mut self, sent: u64, n: u64, stop: &AtomicBool) -> anyhow::Result<()> {
        if sent + n - self.confirmed <= self.size {
            return Ok(());
        }
        let target = self.base + sent;
        let mut last: Option<anyhow::Result<u64>> = None;
        let mut moved = Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            let taken = self.source.datagrams_taken();
            match &taken {
                Ok(n) if *n >= target => break,
                Ok(n) if !matches!(last, Some(Ok(before)) if before == *n) => {
                    moved = Instant::now()
                }
                _ => {}
            }
            last = Some(taken);
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if moved.elapsed() >= WINDOW_STALL_LIMIT {
                let got = match last {
                    Some(Ok(n)) => {
                        format!("they have taken {} of them", n.saturating_sub(self.base))
                    }
                    Some(Err(e)) => format!("their counters could not be read: {e:#}"),
                    None => String::new(),
                };
                anyhow::bail!(
                    "waited {WINDOW_STALL_LIMIT:?} for the receivers behind {} to read the {sent} \
                     datagrams sent; {got} (--window needs every target to be one of them)",
                    self.source.describe()
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(WINDOW_POLL_MAX);
        }
        self.confirmed = sent;
        Ok(())
    }
}

/// Sends batches until the limit or a stop, at the configured rate (and window), tallying
/// what the kernel took.
fn send_stream(
    config: &RunConfig,
    generator: &mut Generator,
    sender: &mut Sender,
    batch_size: usize,
    mut window: Option<&mut Window>,
) -> anyhow::Result<Sent> {
    let mut batch = Batch::new(batch_size);
    let mut tally = Tally::new(generator.tracked().len());
    let mut bucket = (config.rate_per_sec > 0).then(|| {
        // Room for 10 ms of the rate, so that oversleeping one pause is made up by the
        // next batches instead of lowering the average.
        let burst = (2 * batch_size).max((config.rate_per_sec / RATE_CATCH_UP_PER_SEC) as usize);
        TokenBucket::new(config.rate_per_sec, burst)
    });
    let mut progress = config.progress.then(|| Progress::new(config.limit));
    let mut generated = 0u64;
    let sched_start = schedstat();
    let start = Instant::now();
    loop {
        if config.stop.load(Ordering::Relaxed) {
            break;
        }
        let n = match config.limit {
            Limit::Count(total) => (total - generated).min(batch_size as u64) as usize,
            Limit::Duration(d) if start.elapsed() >= d => 0,
            Limit::Duration(_) => batch_size,
        };
        if n == 0 {
            break;
        }
        if let Some(window) = window.as_mut() {
            window.make_room(tally.sent, n as u64, &config.stop)?;
            if config.stop.load(Ordering::Relaxed) {
                break;
            }
        }
        generator.fill(&mut batch, n);
        generated += n as u64;
        if let Some(bucket) = bucket.as_mut() {
            bucket.take(n);
        }
        let mut refs: [&[u8]; BATCH_MAX_DATAGRAMS] = [&[]; BATCH_MAX_DATAGRAMS];
        let datagrams = batch.refs(&mut refs);
        sender.send(datagrams, |i| {
            tally.record(batch.slot(i), datagrams[i].len())
        });
        if let Some(progress) = progress.as_mut() {
            progress.update(start, tally.sent);
        }
    }
    let elapsed = start.elapsed();
    let sched = match (sched_start, schedstat()) {
        (Some(a), Some(b)) => Some(((b.0 - a.0) as f64 / 1e9, (b.1 - a.1) as f64 / 1e9)),
        _ => None,
    };
    if let Some(progress) = progress {
        progress.bar.finish_and_clear();
    }
    Ok(Sent {
        tally,
        elapsed,
        sched,
    })
}

/// The progress bar on stderr, redrawn at most every [`PROGRESS_INTERVAL`].
struct Progress {
    bar: indicatif::ProgressBar,
    limit: Limit,
    next_draw: Instant,
}

impl Progress {
    fn new(limit: Limit) -> Progress {
        Progress {
            bar: progress_bar(limit),
            limit,
            next_draw: Instant::now(),
        }
    }

    /// Shows `sent` datagrams since `start`, when the bar is due.
    fn update(&mut self, start: Instant, sent: u64) {
        let now = Instant::now();
        if now < self.next_draw {
            return;
        }
        self.next_draw = now + PROGRESS_INTERVAL;
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        let rate = sent as f64 / secs;
        match self.limit {
            Limit::Count(_) => {
                self.bar.set_position(sent);
                self.bar.set_message(format!("{rate:.0}/s"));
            }
            Limit::Duration(_) => {
                self.bar.set_position(start.elapsed().as_millis() as u64);
                self.bar
                    .set_message(format!("{sent} datagrams, {rate:.0}/s"));
            }
        }
    }
}

/// What each tracked app should show, from what was sent to it.
fn expectations(tracked: &[TrackedApp], tally: &Tally) -> Vec<Expected> {
    tracked
        .iter()
        .zip(&tally.tracked_sent)
        .map(|(t, sent)| expected(t.app, &t.addrs, sent))
        .collect()
}

/// The tracked apps as the summary lists them.
fn app_summaries(tracked: &[TrackedApp], expectations: &[Expected]) -> Vec<AppSummary> {
    let dotted = |ips: &[u32]| -> Vec<String> {
        ips.iter()
            .map(|&ip| Ipv4Addr::from(ip).to_string())
            .collect()
    };
    tracked
        .iter()
        .zip(expectations)
        .map(|(t, e)| AppSummary {
            sha: t.app.to_hex(),
            index: t.index,
            block: t.addrs.block_cidr(),
            count: e.count,
            good: dotted(&e.good),
            bad: dotted(&e.bad),
        })
        .collect()
}

/// The summary of what was sent; the caller fills in the tracked apps, the verification and
/// the verdict.
fn summarise(
    config: &RunConfig,
    apps_total: u64,
    sender: &Sender,
    sent: &Sent,
    batch_size: usize,
) -> Summary {
    let tally = &sent.tally;
    let secs = sent.elapsed.as_secs_f64();
    let sched = sent.sched;
    Summary {
        scenario: config.scenario.to_string(),
        seed: config.seed,
        targets: sender.targets().iter().map(SocketAddr::to_string).collect(),
        apps_total,
        sent: tally.sent,
        bytes: tally.bytes,
        valid: tally.valid,
        corrupted: tally.corrupted,
        corrupted_by_kind: CorruptKind::ALL
            .iter()
            .map(|k| (k.name(), tally.by_kind[k.index()]))
            .collect(),
        rejected_by_reason: Reject::ALL
            .iter()
            .map(|r| (r.name(), tally.by_reason[r.index()]))
            .collect(),
        elapsed_secs: secs,
        rate_per_sec: if secs > 0.0 {
            tally.sent as f64 / secs
        } else {
            0.0
        },
        cpu_secs: sched.map(|s| s.0),
        cpu_wait_secs: sched.map(|s| s.1),
        rate_per_sec_unshared: sched
            .map(|s| secs - s.1)
            .filter(|&busy| busy > 0.0)
            .map(|busy| tally.sent as f64 / busy),
        target_rate_per_sec: config.rate_per_sec,
        batch: batch_size,
        send_errors: sender.errors.total,
        send_errors_by_kind: sender.errors.by_error.clone(),
        send_retries: sender.errors.retries,
        interrupted: false,
        apps: Vec::new(),
        verification: None,
        ok: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracked_sample_is_small_sorted_and_seeded() {
        let apps = Apps::new(Scenario::Random { apps: 1_000_000 }, 1);
        let a = tracked_indices(&apps, 5, 1);
        assert_eq!(a.len(), 5);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a, tracked_indices(&apps, 5, 1));
        assert_ne!(a, tracked_indices(&apps, 5, 2));
        let few = Apps::new(Scenario::Random { apps: 4 }, 1);
        assert_eq!(tracked_indices(&few, 5, 1), vec![0, 1, 2, 3]);
        assert_eq!(
            tracked_indices(&Apps::new(Scenario::Lookout, 9), 1, 9),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn batch_size_follows_the_rate() {
        let mut config = RunConfig {
            scenario: Scenario::Lookout,
            seed: 0,
            targets: vec!["127.0.0.1:9".parse().unwrap()],
            corrupt_pct: 0.0,
            valid_variant_pct: 0.0,
            rate_per_sec: 0,
            limit: Limit::Count(1),
            batch: None,
            verify_apps: 3,
            source: None,
            max_drop_pct: 0.0,
            window: 0,
            progress: false,
            stop: Arc::default(),
        };
        assert_eq!(config.batch_size(), 256);
        config.rate_per_sec = 20_000;
        assert_eq!(config.batch_size(), 20);
        config.rate_per_sec = 10;
        assert_eq!(config.batch_size(), 1);
        config.batch = Some(5000);
        assert_eq!(config.batch_size(), BATCH_MAX_DATAGRAMS);
        config.window = 300;
        assert_eq!(config.batch_size(), 300);
    }
}

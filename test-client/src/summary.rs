//! The result of a run: the JSON `--json` prints, and the text for a person.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::verify::{AppCheck, Verification};

/// One tracked app in the summary.
#[derive(Clone, Debug, Serialize)]
pub struct AppSummary {
    /// The app's SHA.
    pub sha: String,
    /// Its index in the run.
    pub index: u64,
    /// Its /28.
    pub block: String,
    /// Valid events sent.
    pub count: u64,
    /// Hosts that got events.
    pub good: Vec<String>,
    /// Outsiders that got events.
    pub bad: Vec<String>,
}

/// The result of a run, printed as JSON with `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// `lookout` or `random`.
    pub scenario: String,
    /// The seed; the same seed and settings send the same datagrams.
    pub seed: u64,
    /// The addresses datagrams went to.
    pub targets: Vec<String>,
    /// Apps in the run.
    pub apps_total: u64,
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Valid events among them.
    pub valid: u64,
    /// Corrupted datagrams among them.
    pub corrupted: u64,
    /// Corrupted datagrams per kind.
    pub corrupted_by_kind: BTreeMap<&'static str, u64>,
    /// What the receiver should count as rejected, per reason.
    pub rejected_by_reason: BTreeMap<&'static str, u64>,
    /// Time spent sending.
    pub elapsed_secs: f64,
    /// Datagrams per second achieved.
    pub rate_per_sec: f64,
    /// On-CPU time of the sending thread while sending (Linux schedstat), when known.
    pub cpu_secs: Option<f64>,
    /// Time the sending thread was ready but waited for a CPU, when known: high on a busy
    /// machine, where `rate_per_sec` then understates what one core can do.
    pub cpu_wait_secs: Option<f64>,
    /// Datagrams per second of the time the sender was not kept from a CPU
    /// (`elapsed_secs - cpu_wait_secs`): what one unshared core sustains. It counts interrupt
    /// work done on the sender's core, which `cpu_secs` may leave out.
    pub rate_per_sec_unshared: Option<f64>,
    /// Datagrams per second asked for (0: as fast as possible).
    pub target_rate_per_sec: u64,
    /// Datagrams per `sendmmsg` call.
    pub batch: usize,
    /// Datagrams given up on.
    pub send_errors: u64,
    /// Datagrams given up on, per error.
    pub send_errors_by_kind: BTreeMap<String, u64>,
    /// Sends retried after a transient refusal.
    pub send_retries: u64,
    /// Sending stopped early on a signal.
    pub interrupted: bool,
    /// The tracked apps and what each was sent.
    pub apps: Vec<AppSummary>,
    /// The service's answer, when a source was given.
    pub verification: Option<Verification>,
    /// Nothing failed to send, and the verification (if any) passed.
    pub ok: bool,
}

fn counts(map: &BTreeMap<&'static str, u64>) -> String {
    let parts: Vec<String> = map
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

impl Summary {
    /// The summary for a person.
    pub fn human(&self) -> String {
        let mut s = String::new();
        self.write_sending(&mut s);
        self.write_send_errors(&mut s);
        self.write_apps(&mut s);
        self.write_verdict(&mut s);
        s
    }

    /// What was sent, how fast, and what the receiver should make of it.
    fn write_sending(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "scenario {}, seed {}: {} apps ({} checked), to {}",
            self.scenario,
            self.seed,
            self.apps_total,
            self.apps.len(),
            self.targets.join(", ")
        );
        let limit = match self.target_rate_per_sec {
            0 => "as fast as possible".to_string(),
            rate => format!("limit {rate}/s"),
        };
        let _ = writeln!(
            s,
            "sent {} datagrams ({} bytes) in {:.2} s: {:.0}/s ({limit}, batches of {}){}",
            self.sent,
            self.bytes,
            self.elapsed_secs,
            self.rate_per_sec,
            self.batch,
            if self.interrupted {
                ", interrupted"
            } else {
                ""
            }
        );
        if let (Some(cpu), Some(wait), Some(unshared)) = (
            self.cpu_secs,
            self.cpu_wait_secs,
            self.rate_per_sec_unshared,
        ) {
            let _ = writeln!(
                s,
                "  sender: {cpu:.2} s on a CPU, {wait:.2} s waiting for one: {unshared:.0}/s on an unshared core"
            );
        }
        let _ = writeln!(s, "  valid      {}", self.valid);
        let _ = writeln!(
            s,
            "  corrupted  {}: {}",
            self.corrupted,
            counts(&self.corrupted_by_kind)
        );
        let _ = writeln!(
            s,
            "  the receiver should reject: {}",
            counts(&self.rejected_by_reason)
        );
    }

    /// Datagrams given up on, per error.
    fn write_send_errors(&self, s: &mut String) {
        if self.send_errors == 0 {
            let _ = writeln!(s, "  send errors: none ({} retries)", self.send_retries);
            return;
        }
        let _ = writeln!(
            s,
            "  send errors: {} ({} retries)",
            self.send_errors, self.send_retries
        );
        for (error, n) in &self.send_errors_by_kind {
            let _ = writeln!(s, "    {n} x {error}");
        }
    }

    /// Each tracked app: what was sent, and what the service answered.
    fn write_apps(&self, s: &mut String) {
        let checks = self.verification.as_ref().map(|v| &v.apps);
        for (i, app) in self.apps.iter().enumerate() {
            let _ = writeln!(
                s,
                "app {} {} ({}): {} events sent, {} good, {} bad",
                app.index,
                app.sha,
                app.block,
                app.count,
                app.good.len(),
                app.bad.len()
            );
            if let Some(check) = checks.and_then(|c| c.get(i)) {
                write_check(s, check);
            }
        }
    }

    /// The verification over all apps, and the run's verdict.
    fn write_verdict(&self, s: &mut String) {
        match &self.verification {
            None => {
                let _ = writeln!(
                    s,
                    "not verified: give --data-dir DIR or --api URL to check the service"
                );
            }
            Some(v) => {
                let _ = writeln!(
                    s,
                    "verification via {}: {} sent, {} counted, {} dropped, {:.2}% handled: {}",
                    v.source,
                    v.expected,
                    v.reported,
                    v.dropped,
                    v.handled_pct,
                    if v.ok { "OK" } else { "FAILED" }
                );
            }
        }
        let _ = writeln!(s, "{}", if self.ok { "OK" } else { "FAILED" });
    }
}

/// The service's answer for one app, and every address it got wrong.
fn write_check(s: &mut String, check: &AppCheck) {
    if let Some(error) = &check.error {
        let _ = writeln!(s, "  service: error: {error}");
        return;
    }
    let _ = writeln!(
        s,
        "  service: {} counted, {} dropped, {} extra, {:.2}% handled; good {}, bad {}: {}",
        check.reported_count,
        check.dropped,
        check.extra,
        check.handled_pct,
        if check.good_ok { "ok" } else { "WRONG" },
        if check.bad_ok { "ok" } else { "WRONG" },
        if check.ok { "ok" } else { "FAILED" }
    );
    for (what, list) in [
        ("missing good", &check.missing_good),
        ("unexpected good", &check.unexpected_good),
        ("missing bad", &check.missing_bad),
        ("unexpected bad", &check.unexpected_bad),
    ] {
        if !list.is_empty() {
            let _ = writeln!(s, "    {what}: {}", list.join(", "));
        }
    }
}

//! The table `ipevent-query capacity` prints: [`CapacityEstimate`]'s `Display`.

use std::fmt;

use super::figures::CapacityEstimate;

/// `bytes` in binary units with three significant digits: `512 B`, `1.50 KiB`, `12.3 GiB`.
pub(super) fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{} {}", three_digits(value), UNITS[unit])
    }
}

/// `value` in decimal units with three significant digits: `950`, `12.5 k`, `1.20 M`.
pub(super) fn human_count(value: f64) -> String {
    const UNITS: [&str; 6] = ["", " k", " M", " G", " T", " P"];
    let mut value = value;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 && value == value.trunc() {
        format!("{value:.0}")
    } else {
        format!("{}{}", three_digits(value), UNITS[unit])
    }
}

fn three_digits(value: f64) -> String {
    if value >= 99.95 {
        format!("{value:.0}")
    } else if value >= 9.995 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// Name column width of the table.
const NAME_CHARS: usize = 36;

/// One row of the table: a name, one or two right-aligned values and a note.
fn row(f: &mut fmt::Formatter<'_>, name: &str, values: &[String], note: &str) -> fmt::Result {
    write!(f, "  {name:<NAME_CHARS$}")?;
    for value in values {
        write!(f, "  {value:>10}")?;
    }
    if note.is_empty() {
        writeln!(f)
    } else {
        writeln!(f, "  {note}")
    }
}

/// Rows of the table, each a name, its values and a note ([`row`]).
fn rows(f: &mut fmt::Formatter<'_>, rows: &[(&str, Vec<String>, &str)]) -> fmt::Result {
    for (name, values, note) in rows {
        row(f, name, values, note)?;
    }
    Ok(())
}

impl fmt::Display for CapacityEstimate {
    /// A table for operators: the input, then the store, one writer, and all writers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_input(f)?;
        writeln!(f)?;
        self.fmt_store(f)?;
        writeln!(f)?;
        self.fmt_per_writer(f)?;
        writeln!(f)?;
        self.fmt_all_writers(f)
    }
}

/// Bytes in binary units, for the table.
fn bytes(n: u64) -> String {
    human_bytes(n as f64)
}

/// A count in decimal units, for the table.
fn count(n: u64) -> String {
    human_count(n as f64)
}

impl CapacityEstimate {
    /// The first line: what was sized.
    fn fmt_input(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.input;
        writeln!(
            f,
            "{} apps x {} addresses, {} events/s for {} day(s) ({} events), \
             {} writer(s) flushing every {} ms",
            count(i.apps),
            i.addresses_per_app,
            human_count(i.events_per_sec),
            i.days,
            human_count(self.events_total),
            i.writers,
            i.flush_interval_ms
        )
    }

    /// The data dir, steady and worst case.
    fn fmt_store(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<width$}  {:>10}  {:>10}",
            "store (one data dir)",
            "steady",
            "worst case",
            width = NAME_CHARS + 2
        )?;
        let both = |a: u64, b: u64, show: fn(u64) -> String| vec![show(a), show(b)];
        let logs_note = format!(
            "in {} app dirs; {:.1} addresses per log, {:.1} records per appended block",
            count(self.apps_seen),
            self.addresses_per_log,
            self.records_per_append
        );
        rows(
            f,
            &[
                (
                    "disk space",
                    both(self.disk_bytes_steady, self.disk_bytes_worst, bytes),
                    "and each receiver's --journal-bytes",
                ),
                (
                    "log data (apparent size)",
                    both(self.data_bytes_steady, self.data_bytes_worst, bytes),
                    "",
                ),
                ("inodes", both(self.inodes, self.inodes_worst, count), ""),
                (
                    "one log",
                    both(self.log_bytes_steady, self.log_bytes_worst, bytes),
                    "",
                ),
                ("logs", vec![count(self.logs)], &logs_note),
            ],
        )
    }

    /// One writer: memory, journal, traffic in, appends and compactions.
    fn fmt_per_writer(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "per writer")?;
        let memory_note = format!(
            "{} apps, {} app/address pairs per flush",
            count(self.pending_apps_per_writer),
            count(self.pending_entries_per_writer)
        );
        let network_note = format!(
            "bit/s IP, {} bit/s on Ethernet",
            human_count(self.wire_bits_per_sec_per_writer)
        );
        rows(
            f,
            &[
                (
                    "memory for pending events",
                    vec![bytes(self.memory_bytes_per_writer)],
                    &memory_note,
                ),
                (
                    "journal filled per flush",
                    vec![bytes(self.journal_bytes_per_flush_per_writer)],
                    "--journal-bytes must be larger; also resident memory",
                ),
                (
                    "datagrams in",
                    vec![human_count(self.packets_per_sec_per_writer)],
                    "per second",
                ),
                (
                    "network in",
                    vec![human_count(self.ip_bits_per_sec_per_writer)],
                    &network_note,
                ),
                (
                    "appends per flush",
                    vec![count(self.appends_per_flush_per_writer)],
                    "",
                ),
                (
                    "compactions in one flush, worst case",
                    vec![count(self.compactions_per_flush_worst)],
                    "each ends with an fdatasync",
                ),
            ],
        )
    }

    /// All writers together: network and disk writes.
    fn fmt_all_writers(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "all writers")?;
        let disk_note = format!(
            "per second ({} appends/s, {} compactions/s)",
            human_count(self.appends_per_sec),
            human_count(self.compactions_per_sec)
        );
        rows(
            f,
            &[
                (
                    "network in",
                    vec![human_count(self.ip_bits_per_sec_total)],
                    "bit/s IP",
                ),
                (
                    "disk writes",
                    vec![human_bytes(self.disk_write_bytes_per_sec)],
                    &disk_note,
                ),
                (
                    "journal writes",
                    vec![human_bytes(self.journal_write_bytes_per_sec)],
                    "per second at most",
                ),
            ],
        )
    }
}

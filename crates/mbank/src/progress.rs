//! Progress bars on standard error, shown only when it is a terminal.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use mbank_bank::{Progress, Unit};

pub struct Bar {
    enabled: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bar {
    pub fn new(quiet: bool) -> Self {
        Bar {
            enabled: !quiet && std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
        }
    }

    /// True when bars are drawn (standard error is a terminal and not --quiet).
    pub fn enabled(&self) -> bool {
        self.enabled
    }
}

impl Progress for Bar {
    fn start(&self, what: &str, total: u64, unit: Unit) {
        if !self.enabled {
            return;
        }
        let template = match (unit, total) {
            (_, 0) => "{spinner} {msg} {elapsed}",
            (Unit::Bytes, _) => "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            (Unit::Chunks, _) => "{msg} [{bar:30}] {pos}/{len} chunks {per_sec} eta {eta}",
        };
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_message(what.to_string());
        *self.bar.lock().expect("progress lock") = Some(pb);
    }

    fn advance(&self, n: u64) {
        if let Some(pb) = &*self.bar.lock().expect("progress lock") {
            pb.inc(n);
        }
    }

    fn finish(&self) {
        if let Some(pb) = self.bar.lock().expect("progress lock").take() {
            pb.finish_and_clear();
        }
    }
}

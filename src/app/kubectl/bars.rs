//! Progress bars for transfers on a terminal (indicatif); plain lines anywhere else, so logs
//! and pipes get one readable line per change and no control characters.

use std::{collections::BTreeMap, io::IsTerminal};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::{api::TransferProgress, plugin};

pub struct Bars {
    /// None when stdout is not a terminal.
    multi: Option<MultiProgress>,
    bars: BTreeMap<String, ProgressBar>,
}

impl Bars {
    pub fn new() -> Self {
        let multi = std::io::stdout()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        Self {
            multi,
            bars: BTreeMap::new(),
        }
    }

    /// Print a line above the bars (or just print it).
    pub fn println(&self, line: &str) {
        match &self.multi {
            Some(multi) => {
                if multi.println(line).is_err() {
                    println!("{line}");
                }
            }
            None => println!("{line}"),
        }
    }

    /// Show `key`'s transfer as a bar, or take its bar away when `progress` is None. Returns
    /// whether a bar shows it (false when not on a terminal: the caller prints a line).
    pub fn transfer(&mut self, key: &str, progress: Option<&TransferProgress>) -> bool {
        let Some(multi) = &self.multi else {
            return false;
        };
        let Some(p) = progress else {
            if let Some(bar) = self.bars.remove(key) {
                bar.finish_and_clear();
                multi.remove(&bar);
            }
            return false;
        };
        let bar = self.bars.entry(key.to_string()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(p.total_bytes));
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(key.to_string());
            bar
        });
        bar.set_length(p.total_bytes);
        bar.set_position(p.bytes.min(p.total_bytes));
        // The agent's own figures: indicatif's would be computed from our 1 s polls.
        bar.set_message(plugin::TransferFigures::of(p).summary());
        true
    }

    /// Take every bar away (before the final lines).
    pub fn clear(&mut self) {
        let keys: Vec<String> = self.bars.keys().cloned().collect();
        for key in keys {
            self.transfer(&key, None);
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.clear();
    }
}

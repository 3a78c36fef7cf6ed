//! What a copy shows while it runs, on stderr: a progress bar on a terminal, one plain line
//! per blob and manifest elsewhere (CI logs, pipes).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `--progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, plain lines otherwise.
    Auto,
    Bar,
    Plain,
}

/// Cheap to clone: the bar is shared.
#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(mode: ProgressMode, total_bytes: u64) -> Progress {
        let bar = match mode {
            ProgressMode::Plain => false,
            ProgressMode::Bar => true,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
        };
        if !bar {
            return Progress { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .expect("the template is valid"),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar: Some(bar) }
    }

    /// Bytes that moved (or that need not move).
    pub fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    /// What is being done now: the bar's message, or nothing in plain mode.
    pub fn working_on(&self, what: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(what.to_owned());
        }
    }

    /// One thing done: a line in plain mode; the bar shows bytes only.
    pub fn done(&self, line: &str) {
        if self.bar.is_none() {
            eprintln!("{line}");
        }
    }

    /// Something to say in either mode (above the bar).
    pub fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

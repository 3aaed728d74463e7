//! Training progress: an indicatif bar (steps, elapsed, ETA, a short message such as the loss)
//! when stderr is a terminal, and plain timestamped log lines at a fixed interval otherwise, so
//! logs redirected to a file or a CI console stay readable instead of filling with redraws.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

enum Sink {
    Bar(ProgressBar),
    /// Plain lines to a writer (stderr, or a buffer in tests), at most one per `every`.
    Lines {
        out: Mutex<Box<dyn Write + Send>>,
        every: Duration,
        last: Mutex<Option<Instant>>,
    },
}

pub struct Progress {
    sink: Sink,
    label: String,
    total: u64,
    start: Instant,
}

impl Progress {
    /// A bar on a terminal, else a log line at most every 10 seconds (and at the last step).
    pub fn new(total: u64, label: &str) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style =
                ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta}) {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            Progress { sink: Sink::Bar(bar), label: label.to_string(), total, start: Instant::now() }
        } else {
            Self::plain(total, label, Duration::from_secs(10), Box::new(std::io::stderr()))
        }
    }

    /// Plain log lines to `out`, at most one per `every` (`Duration::ZERO`: every update).
    pub fn plain(total: u64, label: &str, every: Duration, out: Box<dyn Write + Send>) -> Progress {
        Progress {
            sink: Sink::Lines { out: Mutex::new(out), every, last: Mutex::new(None) },
            label: label.to_string(),
            total,
            start: Instant::now(),
        }
    }

    pub fn is_bar(&self) -> bool {
        matches!(self.sink, Sink::Bar(_))
    }

    /// Reports that `done` steps are complete, with a short status message.
    pub fn update(&self, done: u64, msg: &str) {
        match &self.sink {
            Sink::Bar(bar) => {
                bar.set_position(done);
                bar.set_message(msg.to_string());
            }
            Sink::Lines { every, last, .. } => {
                let now = Instant::now();
                let due = {
                    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                    let due = done >= self.total || last.is_none_or(|t| now.duration_since(t) >= *every);
                    if due {
                        *last = Some(now);
                    }
                    due
                };
                if due {
                    self.line(&self.status_line(done, msg));
                }
            }
        }
    }

    /// A message that must not be lost or garbled by the bar (warnings, evaluation results).
    pub fn println(&self, msg: &str) {
        match &self.sink {
            Sink::Bar(bar) => bar.println(msg),
            Sink::Lines { .. } => self.line(msg),
        }
    }

    /// Ends the bar (leaving it on screen) or prints a final line.
    pub fn finish(&self, msg: &str) {
        match &self.sink {
            Sink::Bar(bar) => bar.finish_with_message(msg.to_string()),
            Sink::Lines { .. } => {
                self.line(&format!("{}: done in {} {msg}", self.label, fmt_dur(self.start.elapsed())))
            }
        }
    }

    fn status_line(&self, done: u64, msg: &str) -> String {
        let el = self.start.elapsed();
        let pct = if self.total == 0 { 100.0 } else { 100.0 * done as f64 / self.total as f64 };
        let eta = if done == 0 || done >= self.total {
            String::new()
        } else {
            let rest = el.as_secs_f64() * (self.total - done) as f64 / done as f64;
            format!(" eta {}", fmt_dur(Duration::from_secs_f64(rest)))
        };
        format!("{} {done}/{} ({pct:.0}%) elapsed {}{eta} {msg}", self.label, self.total, fmt_dur(el))
            .trim_end()
            .to_string()
    }

    fn line(&self, s: &str) {
        if let Sink::Lines { out, .. } = &self.sink {
            let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
            // A closed stderr must not stop training.
            let _ = writeln!(out, "{s}");
            let _ = out.flush();
        }
    }
}

/// `1h02m03s`, `4m05s`, `6s`.
fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

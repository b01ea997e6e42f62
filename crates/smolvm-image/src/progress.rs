//! Build steps: a spinner per step on standard error (when asked for), a log line per step,
//! and the time each step took.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::error::ImageError;

/// How long one build step took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    /// The step's label, e.g. `"root filesystem (mmdebstrap)"`.
    pub step: String,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Runs build steps one after the other and records their timings.
pub(crate) struct Steps {
    show: bool,
    timings: Vec<StepTiming>,
}

/// Handle a running step uses to show what it is doing right now.
pub(crate) struct Step {
    bar: ProgressBar,
}

impl Step {
    /// Shows `detail` after the step's label (e.g. the last line mmdebstrap printed).
    pub(crate) fn detail(&self, detail: &str) {
        let mut detail = detail.trim().to_string();
        if detail.chars().count() > 60 {
            detail = detail.chars().take(59).chain(['…']).collect();
        }
        self.bar.set_message(detail);
    }
}

impl Steps {
    /// `show`: draw spinners on standard error (only drawn when it is a terminal).
    pub(crate) fn new(show: bool) -> Self {
        Steps {
            show,
            timings: Vec::new(),
        }
    }

    /// Runs one step under a spinner labelled `label`.
    pub(crate) fn run<T>(
        &mut self,
        label: &str,
        f: impl FnOnce(&Step) -> Result<T, ImageError>,
    ) -> Result<T, ImageError> {
        let bar = if self.show {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner:.cyan} {prefix} [{elapsed}] {msg:.dim}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        tracing::info!(step = label, "started");
        let start = Instant::now();
        let step = Step { bar };
        let result = f(&step);
        let seconds = start.elapsed().as_secs_f64();
        let (mark, outcome) = if result.is_ok() {
            ("✓", "done")
        } else {
            ("✗", "failed")
        };
        step.bar.set_style(
            ProgressStyle::with_template("{prefix}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        step.bar
            .set_prefix(format!("{mark} {label} ({seconds:.1}s)"));
        step.bar.finish();
        tracing::info!(step = label, seconds, "{outcome}");
        if result.is_ok() {
            self.timings.push(StepTiming {
                step: label.to_string(),
                seconds: (seconds * 1000.0).round() / 1000.0,
            });
        }
        result
    }

    /// The timings of the steps that succeeded, in order.
    pub(crate) fn timings(&self) -> &[StepTiming] {
        &self.timings
    }
}

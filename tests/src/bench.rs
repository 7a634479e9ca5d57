//! What the benchmarks in `tests/benches` share.

use std::time::Duration;

/// Named samples of one side of a benchmark, in milliseconds or any unit the name implies.
#[derive(Debug, Default)]
pub struct Samples(Vec<(&'static str, f64)>);

impl Samples {
    /// A duration, in milliseconds.
    pub fn add(&mut self, name: &'static str, d: Duration) {
        self.0.push((name, d.as_secs_f64() * 1e3));
    }

    /// A value in the unit `name` implies (MB/s, MiB, ...).
    pub fn add_value(&mut self, name: &'static str, v: f64) {
        self.0.push((name, v));
    }

    /// The names of the samples, in the order they were first added.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.iter().map(|s| s.0)
    }

    /// The median, minimum, maximum and count of `name`'s samples; `None` without any.
    pub fn p50(&self, name: &str) -> Option<(f64, f64, f64, usize)> {
        let mut v: Vec<f64> = self
            .0
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|s| s.1)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        Some((v[v.len() / 2], v[0], v[v.len() - 1], v.len()))
    }
}

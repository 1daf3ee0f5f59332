//! Several seeds per run on one chart: each run's mean curve over the seeds, inside the band from
//! the seeds' lowest to their highest value (min-max, not +- sd: with 3 seeds an sd says little),
//! for the validation and the training loss.

use super::plot::{curves_chart, ema, finite, Series, TRAIN_LOSS_EMA};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;

/// One step of a band.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BandPoint {
    pub x: f64,
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
}

/// The band of `seeds` (each a curve of (x, y)), at the x of every non-empty curve (so a seed that
/// stopped early ends the band there); empty when no curve has a point.
pub fn band(seeds: &[Vec<(f64, f64)>]) -> Vec<BandPoint> {
    let curves: Vec<&Vec<(f64, f64)>> = seeds.iter().filter(|c| !c.is_empty()).collect();
    let mut at: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for c in &curves {
        for &(x, y) in c.iter() {
            at.entry(x.to_bits()).or_default().push(y);
        }
    }
    let mut out: Vec<BandPoint> = at
        .into_iter()
        .filter(|(_, ys)| ys.len() == curves.len())
        .map(|(x, ys)| {
            let mean = ys.iter().sum::<f64>() / ys.len() as f64;
            let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            BandPoint { x: f64::from_bits(x), mean, lo, hi }
        })
        .collect();
    out.sort_by(|a, b| a.x.total_cmp(&b.x));
    out
}

/// A run's name and one curve of (step, value) per seed.
pub type SeedCurves = (String, Vec<Vec<(u64, f64)>>);

/// As [`super::plot::val_loss_chart`] with several seeds per run: `(name, [seed][(step, val_loss)])`, the mean
/// over the seeds with markers, in a min-max band.
pub fn val_loss_band_chart(path: &Path, runs: &[SeedCurves]) -> Result<()> {
    let series: Vec<Series> = runs
        .iter()
        .map(|(n, seeds)| {
            let b = band(&seeds.iter().map(|p| finite(p)).collect::<Vec<_>>());
            let raw = b.iter().map(|p| (p.x, p.mean)).collect();
            Series { name: n, raw, smooth: None, band: Some(b) }
        })
        .collect();
    curves_chart(path, "validation loss (mean, band: min-max over seeds)", "val loss", &series)
}

/// As [`super::plot::train_loss_chart`] with several seeds per run: the mean over the seeds of every log line
/// (faint), its EMA, and the min-max band of the seeds' own EMAs.
pub fn train_loss_band_chart(path: &Path, runs: &[SeedCurves]) -> Result<()> {
    let series: Vec<Series> = runs
        .iter()
        .map(|(n, seeds)| {
            let raw: Vec<(f64, f64)> =
                band(&seeds.iter().map(|p| finite(p)).collect::<Vec<_>>()).iter().map(|p| (p.x, p.mean)).collect();
            let smooth = Some(ema(&raw, TRAIN_LOSS_EMA));
            let b = band(&seeds.iter().map(|p| ema(&finite(p), TRAIN_LOSS_EMA)).collect::<Vec<_>>());
            Series { name: n, raw, smooth, band: Some(b) }
        })
        .collect();
    curves_chart(path, "training loss (mean, band: min-max of the seeds' EMAs)", "train loss", &series)
}

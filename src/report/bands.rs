//! The band of a run's curves over several seeds: at each step every seed's curve has, the mean,
//! the lowest and the highest value.

use std::collections::BTreeMap;

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

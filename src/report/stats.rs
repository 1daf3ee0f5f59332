//! Statistics over seeds: mean, sample standard deviation (n - 1) and the 95% Student-t interval of
//! one run's figures ([`Spread`]), and the difference of two runs paired by seed ([`paired`]),
//! significant when its interval excludes 0.

use serde::Serialize;

/// t(0.975, df) for df = 1..=30 (two-sided 95%), to 9 decimals.
const T975: [f64; 30] = [
    12.706204736,
    4.302652730,
    3.182446305,
    2.776445105,
    2.570581836,
    2.446911851,
    2.364624252,
    2.306004135,
    2.262157163,
    2.228138852,
    2.200985160,
    2.178812830,
    2.160368656,
    2.144786688,
    2.131449546,
    2.119905299,
    2.109815578,
    2.100922040,
    2.093024054,
    2.085963447,
    2.079613845,
    2.073873068,
    2.068657610,
    2.063898562,
    2.059538553,
    2.055529439,
    2.051830516,
    2.048407142,
    2.045229642,
    2.042272456,
];

/// The 0.975 quantile of Student's t with `df` degrees of freedom (the half-width factor of a
/// two-sided 95% interval): the table for df <= 30, the Cornish-Fisher expansion around the
/// normal quantile above (error under 1e-6 there). NaN for df = 0.
pub fn t975(df: usize) -> f64 {
    if df == 0 {
        return f64::NAN;
    }
    if df <= T975.len() {
        return T975[df - 1];
    }
    let z = 1.959963984540054_f64;
    let v = df as f64;
    let (z3, z5, z7, z9) = (z.powi(3), z.powi(5), z.powi(7), z.powi(9));
    z + (z3 + z) / (4.0 * v)
        + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * v * v)
        + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * v.powi(3))
        + (79.0 * z9 + 776.0 * z7 + 1482.0 * z5 - 1920.0 * z3 - 945.0 * z) / (92160.0 * v.powi(4))
}

/// Mean, sample standard deviation and 95% interval of n values. With n = 1, sd and the interval
/// are None (nothing to estimate them from).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (divides by n - 1).
    pub sd: Option<f64>,
    /// mean -+ t(0.975, n - 1) sd / sqrt(n).
    pub ci95: Option<[f64; 2]>,
}

impl Spread {
    /// None when `xs` is empty or holds a non-finite value.
    pub fn of(xs: &[f64]) -> Option<Self> {
        if xs.is_empty() || xs.iter().any(|x| !x.is_finite()) {
            return None;
        }
        let n = xs.len();
        let mean = xs.iter().sum::<f64>() / n as f64;
        if n == 1 {
            return Some(Spread { n, mean, sd: None, ci95: None });
        }
        let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        let half = t975(n - 1) * sd / (n as f64).sqrt();
        Some(Spread { n, mean, sd: Some(sd), ci95: Some([mean - half, mean + half]) })
    }

    /// Whether the interval lies wholly above or below 0 (false without an interval).
    pub fn excludes_zero(&self) -> bool {
        self.ci95.is_some_and(|[lo, hi]| lo > 0.0 || hi < 0.0)
    }
}

/// A run minus the baseline, paired by seed: the spread of the per-seed differences.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Paired {
    #[serde(flatten)]
    pub diff: Spread,
    /// The 95% interval excludes 0.
    pub significant: bool,
}

/// The differences `a[k] - b[k]` over the seeds where both are Some; None when there is none.
pub fn paired(a: &[Option<f64>], b: &[Option<f64>]) -> Option<Paired> {
    let d: Vec<f64> = a.iter().zip(b).filter_map(|(x, y)| Some((*x)? - (*y)?)).collect();
    let diff = Spread::of(&d)?;
    Some(Paired { significant: diff.excludes_zero(), diff })
}

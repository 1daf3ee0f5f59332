//! PNG plots with plotters' bitmap backend: validation-loss curves of several runs on one chart (a
//! point per evaluation), their training loss (every log line, faint, under an exponential moving
//! average) on another, and a run's expert load over time as a heat map (one panel per MoE layer).
//! Each run has its own colour ([`series_colours`]). Several seeds per run: [`super::bands`].
//!
//! Text is drawn with DejaVu Sans Mono, embedded in the binary (assets/fonts, Bitstream Vera
//! license beside it) and registered with plotters' `ab_glyph` backend, so plotting needs no
//! system fonts, fontconfig or C library.

use super::bands::BandPoint;
use super::colours::series_colours;
use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";

/// Registers the embedded font under "sans-serif" (once per process).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            panic!("the embedded font assets/fonts/DejaVuSansMono.ttf does not parse");
        }
    });
}

/// plotters' errors are generic over the backend; this keeps their message.
fn err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {}: {e}", path.display())
}

/// Weight of the past in the training-loss EMA: light smoothing, about 5 log lines.
pub const TRAIN_LOSS_EMA: f64 = 0.8;

/// One curve per run: `(name, [(step, val_loss)])`, a marker on each evaluation, drawn into `path`
/// with a legend. Runs without points are left out; at least one point is needed.
pub fn val_loss_chart(path: &Path, runs: &[(String, Vec<(u64, f64)>)]) -> Result<()> {
    let series: Vec<Series> =
        runs.iter().map(|(n, p)| Series { name: n, raw: finite(p), smooth: None, band: None }).collect();
    curves_chart(path, "validation loss", "val loss", &series)
}

/// The training loss of each run: `(name, [(step, train_loss)])` of every log line, drawn faint,
/// with its bias-corrected EMA ([`TRAIN_LOSS_EMA`]) on top. Runs without points are left out; at
/// least one point is needed.
pub fn train_loss_chart(path: &Path, runs: &[(String, Vec<(u64, f64)>)]) -> Result<()> {
    let series: Vec<Series> = runs
        .iter()
        .map(|(n, p)| {
            let raw = finite(p);
            let smooth = Some(ema(&raw, TRAIN_LOSS_EMA));
            Series { name: n, raw, smooth, band: None }
        })
        .collect();
    curves_chart(path, "training loss", "train loss", &series)
}

/// Exponential moving average with the start-up bias removed (as TensorBoard's smoothing):
/// s_k = beta s_(k-1) + (1 - beta) x_k, reported as s_k / (1 - beta^k).
pub fn ema(points: &[(f64, f64)], beta: f64) -> Vec<(f64, f64)> {
    let (mut s, mut w) = (0.0, 0.0);
    points
        .iter()
        .map(|&(x, y)| {
            s = beta * s + (1.0 - beta) * y;
            w = beta * w + (1.0 - beta);
            (x, s / w)
        })
        .collect()
}

pub(super) fn finite(p: &[(u64, f64)]) -> Vec<(f64, f64)> {
    p.iter().filter(|(_, v)| v.is_finite()).map(|&(s, v)| (s as f64, v)).collect()
}

/// One run on a chart: its points, and a smoothed line drawn over them (then the points are faint
/// lines without markers).
pub(super) struct Series<'a> {
    pub name: &'a str,
    pub raw: Vec<(f64, f64)>,
    pub smooth: Option<Vec<(f64, f64)>>,
    /// Several seeds: the band drawn under the curve.
    pub band: Option<Vec<BandPoint>>,
}

pub(super) fn curves_chart(path: &Path, title: &str, y_desc: &str, runs: &[Series]) -> Result<()> {
    register_font();
    let (mut x1, mut y0, mut y1) = (1f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(s, v) in runs.iter().flat_map(|r| r.raw.iter()) {
        (x1, y0, y1) = (x1.max(s), y0.min(v), y1.max(v));
    }
    for p in runs.iter().flat_map(|r| r.band.iter().flatten()) {
        (y0, y1) = (y0.min(p.lo), y1.max(p.hi));
    }
    if !y0.is_finite() {
        bail!("no {title} to plot for {}", path.display());
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let e = err(path);
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(&e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x1, (y0 - pad)..(y1 + pad))
        .map_err(&e)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_desc)
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(&e)?;
    let colours = series_colours(runs.len());
    for (r, &colour) in runs.iter().zip(&colours) {
        if r.raw.is_empty() {
            continue;
        }
        if let Some(b) = r.band.as_ref().filter(|b| b.len() > 1) {
            let outline: Vec<(f64, f64)> =
                b.iter().map(|p| (p.x, p.lo)).chain(b.iter().rev().map(|p| (p.x, p.hi))).collect();
            chart.draw_series(std::iter::once(Polygon::new(outline, colour.mix(0.18).filled()))).map_err(&e)?;
        }
        let line = match &r.smooth {
            Some(smooth) => {
                let faint = colour.mix(0.25).stroke_width(1);
                chart.draw_series(LineSeries::new(r.raw.iter().copied(), faint)).map_err(&e)?;
                smooth
            }
            None => &r.raw,
        };
        chart
            .draw_series(LineSeries::new(line.iter().copied(), colour.stroke_width(2)))
            .map_err(&e)?
            .label(r.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(2)));
        if r.smooth.is_none() {
            chart.draw_series(r.raw.iter().map(|&q| Circle::new(q, 3, colour.filled()))).map_err(&e)?;
        }
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(&e)?;
    root.present().map_err(&e)?;
    Ok(())
}

/// Viridis, from 5 stops: t in [0, 1] -> colour.
pub fn viridis(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] =
        [(68.0, 1.0, 84.0), (59.0, 82.0, 139.0), (33.0, 145.0, 140.0), (94.0, 201.0, 98.0), (253.0, 231.0, 37.0)];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 } * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Expert load over time: `steps[i]` is the step of log line i and `load[i][layer][expert]` the
/// tokens each expert got since the previous line. One panel per layer: x = step, y = expert,
/// colour = the expert's share of the layer's tokens in that interval (scale on the right).
pub fn load_heatmap(path: &Path, title: &str, steps: &[u64], load: &[Vec<Vec<u64>>]) -> Result<()> {
    register_font();
    let layers = load.iter().map(Vec::len).max().unwrap_or(0);
    let experts = load.iter().flatten().map(Vec::len).max().unwrap_or(0);
    if steps.is_empty() || layers == 0 || experts == 0 {
        bail!("no expert load to plot for {} (a model without MoE layers, or no log line yet)", path.display());
    }
    if steps.len() != load.len() {
        bail!("load_heatmap: {} steps for {} log lines", steps.len(), load.len());
    }
    // Shares, and the top of the colour scale (the largest share seen, at least uniform).
    let share = |t: &[u64], e: usize| {
        let sum: u64 = t.iter().sum();
        if sum == 0 {
            0.0
        } else {
            t.get(e).copied().unwrap_or(0) as f64 / sum as f64
        }
    };
    let mut vmax = 1.0 / experts as f64;
    for t in load.iter().flatten() {
        for e in 0..t.len() {
            vmax = vmax.max(share(t, e));
        }
    }
    let x1 = *steps.last().expect("non-empty") as f64;
    let e = err(path);
    let height = (60 + 50 * layers as u32 + layers as u32 * (24 * experts as u32).clamp(120, 400)).min(4000);
    let root = BitMapBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(&e)?;
    let root = root.titled(title, (FAMILY, 22)).map_err(&e)?;
    let (main, bar) = root.split_horizontally(900);
    for (l, panel) in main.split_evenly((layers, 1)).iter().enumerate() {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("MoE layer {l}"), (FAMILY, 16))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..x1.max(1.0), -0.5f64..experts as f64 - 0.5)
            .map_err(&e)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("expert")
            .y_labels(experts.min(16))
            .y_label_formatter(&|y| {
                if (y - y.round()).abs() < 1e-6 {
                    format!("{}", y.round() as i64)
                } else {
                    String::new()
                }
            })
            .label_style((FAMILY, 12))
            .axis_desc_style((FAMILY, 13))
            .draw()
            .map_err(&e)?;
        let mut rects = Vec::new();
        for (i, t) in load.iter().enumerate() {
            let Some(t) = t.get(l) else { continue };
            let x0 = if i == 0 { 0.0 } else { steps[i - 1] as f64 };
            for ex in 0..experts {
                let c = viridis(share(t, ex) / vmax);
                let y = ex as f64; // expert ex is the band [ex - 0.5, ex + 0.5], labelled at its centre
                rects.push(Rectangle::new([(x0, y - 0.5), (steps[i] as f64, y + 0.5)], c.filled()));
            }
        }
        chart.draw_series(rects).map_err(&e)?;
    }
    // The colour scale.
    let mut cb = ChartBuilder::on(&bar)
        .caption("share", (FAMILY, 14))
        .margin_top(40)
        .margin_bottom(40)
        .margin_right(8)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..1.0, 0f64..vmax)
        .map_err(&e)?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(6)
        .y_label_formatter(&|y| format!("{y:.2}"))
        .label_style((FAMILY, 12))
        .draw()
        .map_err(&e)?;
    let n = 64;
    cb.draw_series((0..n).map(|i| {
        let (a, b) = (vmax * i as f64 / n as f64, vmax * (i + 1) as f64 / n as f64);
        Rectangle::new([(0.0, a), (1.0, b)], viridis((i as f64 + 0.5) / n as f64).filled())
    }))
    .map_err(&e)?;
    root.present().map_err(&e)?;
    Ok(())
}

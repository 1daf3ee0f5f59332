//! Series colours for the plots: every run of a chart gets its own colour.
//!
//! Up to 10 series take the Tableau 10 palette (distinct and readable on white). More take evenly
//! spaced hues, alternating two lightness levels so that neighbours differ in lightness too.

use plotters::style::RGBColor;

/// Tableau 10.
const TABLEAU10: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// `n` distinct colours, one per series, in order.
pub fn series_colours(n: usize) -> Vec<RGBColor> {
    if n <= TABLEAU10.len() {
        return TABLEAU10[..n].iter().map(|&(r, g, b)| RGBColor(r, g, b)).collect();
    }
    (0..n).map(|i| hsl(360.0 * i as f64 / n as f64, 0.7, if i % 2 == 0 { 0.40 } else { 0.55 })).collect()
}

/// HSL (hue in degrees, saturation and lightness in [0, 1]) to RGB.
fn hsl(h: f64, s: f64, l: f64) -> RGBColor {
    let c = (1.0 - (2.0 * l - 1.0).abs()) * s;
    let hp = (h.rem_euclid(360.0)) / 60.0;
    let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = l - c / 2.0;
    let u = |v: f64| ((v + m) * 255.0).round().clamp(0.0, 255.0) as u8;
    RGBColor(u(r), u(g), u(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsl_primaries() {
        assert_eq!(hsl(0.0, 1.0, 0.5), RGBColor(255, 0, 0));
        assert_eq!(hsl(120.0, 1.0, 0.5), RGBColor(0, 255, 0));
        assert_eq!(hsl(240.0, 1.0, 0.5), RGBColor(0, 0, 255));
        assert_eq!(hsl(0.0, 0.0, 1.0), RGBColor(255, 255, 255));
    }
}

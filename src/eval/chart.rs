//! The per-turn chart of `am3 eval`: mean safety s (left panel) and mean helpfulness h (right
//! panel) at each turn index over all dialogues, the model against the baseline, with the
//! bootstrap intervals as shaded bands. Written by hand as SVG (no plotting dependency: the
//! chart is two panels of lines, and a hand-written file keeps the build small).

use super::bootstrap::Figure;
use super::metrics::Metrics;
use crate::train::atomic;
use anyhow::Result;
use std::fmt::Write;
use std::path::Path;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 430.0;
const PANEL_W: f64 = 380.0;
const PANEL_H: f64 = 260.0;
const PANEL_TOP: f64 = 100.0;
const COLORS: [&str; 2] = ["#1f77b4", "#d62728"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

/// A plotted point: x, y and the interval's (y_low, y_high) where there is one.
type Point = (f64, f64, Option<(f64, f64)>);

/// Splits the points at turns without a value: each run is drawn as one line.
fn runs(points: &[Option<Point>]) -> Vec<Vec<Point>> {
    let mut out: Vec<Vec<_>> = vec![];
    let mut cur = vec![];
    for p in points {
        match p {
            Some(p) => cur.push(*p),
            None if !cur.is_empty() => out.push(std::mem::take(&mut cur)),
            None => {}
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

struct Panel {
    x0: f64,
    turns: usize,
}

impl Panel {
    fn x(&self, t: usize) -> f64 {
        self.x0 + (t as f64 + 0.5) / self.turns.max(1) as f64 * PANEL_W
    }
    fn y(&self, v: f64) -> f64 {
        PANEL_TOP + (1.0 - v.clamp(0.0, 1.0)) * PANEL_H
    }

    fn frame(&self, svg: &mut String, title: &str, ylabel: &str) {
        let (x0, x1, y1) = (self.x0, self.x0 + PANEL_W, PANEL_TOP + PANEL_H);
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="15">{}</text>"#,
            x0 + PANEL_W / 2.0,
            PANEL_TOP - 12.0,
            esc(title)
        );
        for i in 0..=4 {
            let v = i as f64 / 4.0;
            let y = self.y(v);
            let _ = writeln!(svg, r##"<line x1="{x0:.1}" y1="{y:.1}" x2="{x1:.1}" y2="{y:.1}" stroke="#dddddd"/>"##);
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{v:.2}</text>"#,
                x0 - 6.0,
                y + 4.0
            );
        }
        for t in 0..self.turns {
            let x = self.x(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{y1:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333333"/>"##,
                y1 + 5.0
            );
            let _ = writeln!(
                svg,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"#,
                y1 + 18.0,
                t + 1
            );
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{x0:.1}" y="{PANEL_TOP:.1}" width="{PANEL_W:.1}" height="{PANEL_H:.1}" fill="none" stroke="#333333"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">turn</text>"#,
            x0 + PANEL_W / 2.0,
            y1 + 38.0
        );
        let (lx, ly) = (x0 - 44.0, PANEL_TOP + PANEL_H / 2.0);
        let _ = writeln!(
            svg,
            r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="middle" font-size="13" transform="rotate(-90 {lx:.1} {ly:.1})">{}</text>"#,
            esc(ylabel)
        );
    }

    fn series(&self, svg: &mut String, figs: &[&Figure], color: &str, dashed: bool, square: bool) {
        let points: Vec<_> = figs
            .iter()
            .enumerate()
            .map(|(t, f)| {
                f.value
                    .map(|v| (self.x(t), self.y(v), f.ci_low.zip(f.ci_high).map(|(lo, hi)| (self.y(lo), self.y(hi)))))
            })
            .collect();
        for run in runs(&points) {
            let band: Vec<_> = run.iter().filter_map(|p| p.2.map(|(lo, hi)| (p.0, lo, hi))).collect();
            if band.len() == run.len() && run.len() > 1 {
                let mut pts: Vec<String> = band.iter().map(|(x, _, hi)| format!("{x:.1},{hi:.1}")).collect();
                pts.extend(band.iter().rev().map(|(x, lo, _)| format!("{x:.1},{lo:.1}")));
                let _ = writeln!(
                    svg,
                    r#"<polygon points="{}" fill="{color}" fill-opacity="0.15" stroke="none"/>"#,
                    pts.join(" ")
                );
            }
            for &(x, lo, hi) in &band {
                let _ = writeln!(
                    svg,
                    r#"<line x1="{x:.1}" y1="{lo:.1}" x2="{x:.1}" y2="{hi:.1}" stroke="{color}" stroke-opacity="0.5"/>"#
                );
            }
            let pts: Vec<String> = run.iter().map(|(x, y, _)| format!("{x:.1},{y:.1}")).collect();
            let dash = if dashed { r#" stroke-dasharray="6 4""# } else { "" };
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                pts.join(" ")
            );
            for (x, y, _) in &run {
                marker(svg, *x, *y, color, square);
            }
        }
    }
}

fn marker(svg: &mut String, x: f64, y: f64, color: &str, square: bool) {
    if square {
        let _ = writeln!(svg, r#"<rect x="{:.1}" y="{:.1}" width="8" height="8" fill="{color}"/>"#, x - 4.0, y - 4.0);
    } else {
        let _ = writeln!(svg, r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{color}"/>"#);
    }
}

/// The chart as an SVG document. `model` and `baseline` are (legend name, metrics).
pub fn turn_chart_svg(model: (&str, &Metrics), baseline: Option<(&str, &Metrics)>) -> String {
    let series: Vec<(&str, &Metrics)> = std::iter::once(model).chain(baseline).collect();
    let turns = series.iter().map(|s| s.1.per_turn.len()).max().unwrap_or(0);
    let mut svg = String::new();
    let _ = writeln!(svg, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="28" text-anchor="middle" font-size="17">Mean safety and helpfulness per turn</text>"#,
        WIDTH / 2.0
    );
    // Legend: one entry per series, centred under the title.
    let mut lx = WIDTH / 2.0 - 150.0 * series.len() as f64 / 2.0;
    for (i, (name, _)) in series.iter().enumerate() {
        let dash = if i == 1 { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = writeln!(
            svg,
            r#"<line x1="{lx:.1}" y1="52" x2="{:.1}" y2="52" stroke="{}" stroke-width="2"{dash}/>"#,
            lx + 28.0,
            COLORS[i]
        );
        marker(&mut svg, lx + 14.0, 52.0, COLORS[i], i == 1);
        let _ = writeln!(svg, r#"<text x="{:.1}" y="56" font-size="13">{}</text>"#, lx + 34.0, esc(name));
        lx += 150.0;
    }
    let note = format!("all dialogues; bands: {:.0}% bootstrap CI", 100.0 * model.1.config.level);
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="76" text-anchor="middle" font-size="11" fill="#555555">{note}</text>"##,
        WIDTH / 2.0
    );
    if turns == 0 {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14">no scored turns</text>"#,
            WIDTH / 2.0,
            HEIGHT / 2.0
        );
    }
    let panels = [("mean safety s", "Safety", 0usize), ("mean helpfulness h", "Helpfulness", 1)];
    for (p, (ylabel, title, which)) in panels.into_iter().enumerate() {
        let panel = Panel { x0: 80.0 + p as f64 * 470.0, turns };
        panel.frame(&mut svg, title, ylabel);
        for (i, (_, m)) in series.iter().enumerate() {
            let figs: Vec<&Figure> =
                m.per_turn.iter().map(|t| if which == 0 { &t.safety.all } else { &t.help.all }).collect();
            panel.series(&mut svg, &figs, COLORS[i], i == 1, i == 1);
        }
    }
    svg += "</svg>\n";
    svg
}

/// Writes [`turn_chart_svg`] to `path`, atomically.
pub fn write_turn_chart(
    path: impl AsRef<Path>, model: (&str, &Metrics), baseline: Option<(&str, &Metrics)>,
) -> Result<()> {
    atomic::write_file(path, turn_chart_svg(model, baseline).as_bytes())
}

//! The plot of a run, as SVG and PNG (plotters): on the left throughput per round per
//! target, on the right latency percentiles per target on a log scale.
//!
//! Text is rendered with plotters' `ab_glyph` feature and DejaVu Sans embedded from
//! the `dejavu` crate, so no system font, fontconfig or freetype is needed (ADR 0012).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::Report;

const SIZE: (u32, u32) = (1200, 520);
const FONT: &str = "sans-serif";
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// Registers the embedded font once per process.
fn fonts() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded DejaVu Sans font could not be loaded"))
    }
}

/// Draws the plot into both files.
pub fn draw(report: &Report, svg: &Path, png: &Path) -> anyhow::Result<()> {
    fonts()?;
    {
        let root = SVGBackend::new(svg, SIZE).into_drawing_area();
        draw_on(&root, report).map_err(|e| anyhow!("drawing {}: {e}", svg.display()))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", svg.display()))?;
    }
    let root = BitMapBackend::new(png, SIZE).into_drawing_area();
    draw_on(&root, report).map_err(|e| anyhow!("drawing {}: {e}", png.display()))?;
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", png.display()))?;
    Ok(())
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw_on<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, r: &Report) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let title = format!(
        "spillway-loadtest {}: {} protocol, {} clients, {} × {}s rounds",
        r.scenario.name,
        r.settings.mode.as_str(),
        r.settings.clients,
        r.settings.rounds,
        r.settings.duration_seconds
    );
    let root = root.titled(&title, (FONT, 22).into_font().style(FontStyle::Bold))?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    throughput(&left, r)?;
    latency(&right, r)?;
    Ok(())
}

fn throughput<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, r: &Report) -> DrawResult<DB> {
    let rounds = r.settings.rounds.max(1);
    let top = r
        .targets
        .iter()
        .flat_map(|t| t.rounds.iter().map(|x| x.tps))
        .fold(0.0f64, f64::max);
    // Headroom above the highest point for the legend, so it never hides a line.
    let top = if top > 0.0 { top * 1.4 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption("Throughput per round", (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5f64..(f64::from(rounds) + 0.5), 0.0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("transactions per second")
        .x_labels(rounds as usize + 1)
        .x_label_formatter(&|x| {
            if (x.fract()).abs() < 1e-9 && *x >= 1.0 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style((FONT, 13))
        .draw()?;
    for (i, t) in r.targets.iter().enumerate() {
        let c = color(i);
        let points: Vec<(f64, f64)> = t.rounds.iter().map(|x| (x.round as f64, x.tps)).collect();
        let name = match r.ratios.iter().find(|x| x.target == t.name) {
            Some(x) => match x.ratios.median_of_rounds {
                Some(v) => format!("{} ({v:.2}× {})", t.name, x.baseline),
                None => t.name.clone(),
            },
            None => t.name.clone(),
        };
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}

fn latency<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, r: &Report) -> DrawResult<DB> {
    let labels = ["p50", "p95", "p99", "p99.9", "max"];
    let values: Vec<Vec<(usize, f64)>> = r
        .targets
        .iter()
        .map(|t| {
            t.latency_ms
                .points()
                .iter()
                .enumerate()
                .filter_map(|(i, (_, v))| v.filter(|v| *v > 0.0).map(|v| (i, v)))
                .collect()
        })
        .collect();
    let all = values.iter().flatten().map(|(_, v)| *v);
    let lo = all.clone().fold(f64::INFINITY, f64::min);
    let hi = all.fold(0.0f64, f64::max);
    let (lo, hi) = if hi > 0.0 && lo.is_finite() {
        (lo / 1.5, hi * 1.5)
    } else {
        (0.01, 10.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption("Latency percentiles (all rounds)", (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..4.5f64, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("milliseconds (log scale)")
        .x_labels(5)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-9 && (0.0..=4.0).contains(&i) {
                labels[i as usize].to_owned()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            if *y >= 10.0 {
                format!("{y:.0}")
            } else if *y >= 0.1 {
                format!("{y:.2}")
            } else {
                format!("{y:.3}")
            }
        })
        .label_style((FONT, 13))
        .draw()?;
    if values.iter().all(Vec::is_empty) {
        let style = (FONT, 16).into_font().color(&BLACK);
        area.draw_text(
            &format!("fewer than {} samples per target", crate::plan::MIN_SAMPLES),
            &style,
            (SIZE.0 as i32 / 6, SIZE.1 as i32 / 2),
        )?;
        return Ok(());
    }
    for (i, (t, pts)) in r.targets.iter().zip(&values).enumerate() {
        let c = color(i);
        let points: Vec<(f64, f64)> = pts.iter().map(|(x, v)| (*x as f64, *v)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
            .label(t.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}

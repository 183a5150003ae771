//! The picture of a run: throughput, p99 TTFT and errors per second, one
//! panel each over the same time axis, with vertical marks where a fault was
//! injected or a load step began, so an overload or a fault is visible at a
//! glance.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::Mark;
use super::stats::Second;

#[derive(Debug, thiserror::Error)]
#[error("drawing {path}: {reason}")]
pub struct PlotError {
    path: String,
    reason: String,
}

/// One line of a panel: a name, a colour, and its runs of points (a gap in
/// the data, such as a second without any TTFT, splits the line).
struct Line {
    name: &'static str,
    color: RGBColor,
    runs: Vec<Vec<(f64, f64)>>,
}

/// Writes the SVG to `path`.
pub fn write_svg(path: &Path, title: &str, timeline: &[Second], marks: &[Mark]) -> Result<(), PlotError> {
    draw(path, title, timeline, marks)
        .map_err(|e| PlotError { path: path.display().to_string(), reason: e.to_string() })
}

fn draw(
    path: &Path,
    title: &str,
    timeline: &[Second],
    marks: &[Mark],
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let root = SVGBackend::new(path, (1100, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let panels = root.split_evenly((3, 1));
    let x_max = timeline.len().max(1) as f64;
    // Each second's value is drawn at its middle.
    let series = |f: &dyn Fn(&Second) -> Option<f64>| -> Vec<Vec<(f64, f64)>> {
        let mut runs = vec![Vec::new()];
        for s in timeline {
            match f(s) {
                Some(y) => runs.last_mut().map_or((), |r| r.push((s.t as f64 + 0.5, y))),
                None => runs.push(Vec::new()),
            }
        }
        runs.retain(|r| !r.is_empty());
        runs
    };
    let throughput = [Line { name: "tokens/s", color: BLUE, runs: series(&|s| Some(s.tokens as f64)) }];
    panel(&panels[0], "throughput (tokens received per second)", x_max, &throughput, marks)?;
    let ttft = [Line { name: "p99 TTFT ms", color: MAGENTA, runs: series(&|s| s.ttft_p99_ms) }];
    panel(&panels[1], "p99 time to first token (ms), by second of first token", x_max, &ttft, marks)?;
    let requests = [
        Line { name: "sent/s", color: RGBColor(120, 120, 120), runs: series(&|s| Some(s.sent as f64)) },
        Line { name: "good/s", color: GREEN, runs: series(&|s| Some(s.good as f64)) },
        Line { name: "errors/s", color: RED, runs: series(&|s| Some(s.errors as f64)) },
    ];
    panel(&panels[2], "requests per second: sent, good (OK within deadline), errors", x_max, &requests, marks)?;
    root.present()
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    x_max: f64,
    lines: &[Line],
    marks: &[Mark],
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let y_max = lines.iter().flat_map(|l| l.runs.iter().flatten().map(|p| p.1)).fold(0.0, f64::max).max(1.0) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart.configure_mesh().x_desc("seconds").max_light_lines(2).draw()?;
    for line in lines {
        let color = line.color;
        for (i, run) in line.runs.iter().enumerate() {
            let drawn = chart.draw_series(LineSeries::new(run.iter().copied(), color.stroke_width(2)))?;
            if i == 0 {
                drawn.label(line.name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            }
        }
    }
    for m in marks {
        let style = RGBColor(200, 0, 0).stroke_width(1);
        chart.draw_series(std::iter::once(PathElement::new(vec![(m.at_s, 0.0), (m.at_s, y_max)], style)))?;
        chart.draw_series(std::iter::once(Text::new(m.label.clone(), (m.at_s, y_max * 0.97), ("sans-serif", 12))))?;
    }
    chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).border_style(BLACK).draw()?;
    Ok(())
}

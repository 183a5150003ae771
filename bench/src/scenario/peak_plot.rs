//! `peak`'s picture: one row per arm, goodput (good tokens/s) on the left
//! and who answered each second's requests (primary, overflow, cache,
//! refused, as shares of that second's sends) on the right, over the same
//! time axis, with the phases marked and, for the standby arm, the
//! controller's activations (green) and returns to standby (orange).

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::peak_load::Class;
use super::peak_report::SecondShares;

/// What one row draws.
pub struct Row<'a> {
    pub arm: &'a str,
    pub seconds: &'a [SecondShares],
    /// Each phase's start (s) and label.
    pub phases: Vec<(f64, String)>,
    /// Controller actions: time (s) and whether it was an activation.
    pub actions: Vec<(f64, bool)>,
}

const CLASS_COLORS: [RGBColor; 4] = [BLUE, RGBColor(230, 120, 0), GREEN, RED];

pub fn write_svg(path: &Path, title: &str, rows: &[Row]) -> anyhow::Result<()> {
    draw(path, title, rows).map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Drawn = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw(path: &Path, title: &str, rows: &[Row]) -> Drawn {
    let root = SVGBackend::new(path, (1400, 330 * rows.len().max(1) as u32 + 40)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 18))?;
    let x_max = rows.iter().map(|r| r.seconds.len()).max().unwrap_or(1).max(1) as f64;
    let cells = root.split_evenly((rows.len().max(1), 2));
    for (i, row) in rows.iter().enumerate() {
        goodput(&cells[2 * i], row, x_max)?;
        shares(&cells[2 * i + 1], row, x_max)?;
    }
    root.present()
}

fn goodput(area: &Area, row: &Row, x_max: f64) -> Drawn {
    let points: Vec<(f64, f64)> = row.seconds.iter().map(|s| (s.t as f64 + 0.5, s.good_tokens as f64)).collect();
    let y_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    let caption = format!("{}: goodput (good tokens/s)", row.arm);
    let mut chart = chart(area, &caption, x_max, y_max)?;
    let drawn = chart.draw_series(LineSeries::new(points, BLACK.stroke_width(2)))?;
    drawn.label("good tokens/s").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
    marks(&mut chart, row, y_max)?;
    chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).border_style(BLACK).draw()
}

fn shares(area: &Area, row: &Row, x_max: f64) -> Drawn {
    let caption = format!("{}: share of each second's requests", row.arm);
    let mut chart = chart(area, &caption, x_max, 1.15)?;
    for (k, class) in Class::ALL.iter().enumerate() {
        let points =
            row.seconds.iter().filter(|s| s.sent > 0).map(|s| (s.t as f64 + 0.5, s.by_class[k] as f64 / s.sent as f64));
        let color = CLASS_COLORS[k];
        let drawn = chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
        drawn.label(class.name()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    marks(&mut chart, row, 1.15)?;
    chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).border_style(BLACK).draw()
}

type Axis = plotters::coord::types::RangedCoordf64;
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<Axis, Axis>>;

fn chart<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    x_max: f64,
    y_max: f64,
) -> Result<Chart<'a, 'b>, DrawingAreaErrorKind<std::io::Error>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 14))
        .margin(8)
        .x_label_area_size(26)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart.configure_mesh().x_desc("seconds").max_light_lines(2).draw()?;
    Ok(chart)
}

/// Phase starts as grey lines with their label; controller actions as
/// coloured lines.
fn marks(chart: &mut Chart<'_, '_>, row: &Row, y_max: f64) -> Drawn {
    let grey = RGBColor(120, 120, 120).stroke_width(1);
    for (at, label) in &row.phases {
        chart.draw_series(std::iter::once(PathElement::new(vec![(*at, 0.0), (*at, y_max)], grey)))?;
        let text = Text::new(label.clone(), (*at + 0.5, y_max * 0.96), ("sans-serif", 12));
        chart.draw_series(std::iter::once(text))?;
    }
    for &(at, activated) in &row.actions {
        let color = if activated { GREEN } else { RGBColor(230, 120, 0) };
        let style = color.stroke_width(2);
        chart.draw_series(std::iter::once(PathElement::new(vec![(at, 0.0), (at, y_max * 0.9)], style)))?;
    }
    Ok(())
}

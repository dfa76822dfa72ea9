//! `loss.png`: training and validation loss over steps, drawn with plotters.
//!
//! The font is compiled in (Ubuntu Light from `epaint_default_fonts`), so plotting needs
//! no system fonts or fontconfig.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One point of the loss curve.
#[derive(Clone, Copy, Debug)]
pub struct LossPoint {
    /// Optimizer step.
    pub step: u64,
    /// Training loss at that step.
    pub loss: f64,
    /// Validation loss, when evaluated.
    pub val_loss: Option<f64>,
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        );
    });
}

/// Draw `points` to a PNG at `path`.
pub fn plot_loss(path: &Path, title: &str, points: &[LossPoint]) -> Result<()> {
    register_font();
    let finite: Vec<&LossPoint> = points.iter().filter(|p| p.loss.is_finite()).collect();
    if finite.is_empty() {
        return Err(anyhow!("no finite loss to plot"));
    }
    let x_max = finite.iter().map(|p| p.step).max().unwrap_or(1).max(1);
    let x_min = finite
        .iter()
        .map(|p| p.step)
        .min()
        .unwrap_or(0)
        .min(x_max - 1);
    let ys = finite
        .iter()
        .map(|p| p.loss)
        .chain(finite.iter().filter_map(|p| p.val_loss));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let err =
        |e: &dyn std::fmt::Display| anyhow!("{}: cannot draw the loss plot: {e}", path.display());
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x_min..x_max, (lo - pad)..(hi + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (nats/token)")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            finite.iter().map(|p| (p.step, p.loss)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    let val: Vec<(u64, f64)> = finite
        .iter()
        .filter_map(|p| p.val_loss.map(|v| (p.step, v)))
        .collect();
    if !val.is_empty() {
        chart
            .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .draw_series(
                val.iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, RED.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

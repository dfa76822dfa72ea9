//! `loss.png`: training and validation loss over steps, and `timeline.png`: loss over wall
//! time with injected faults and generation changes, drawn with plotters.
//!
//! The font is compiled in (Ubuntu Light from `epaint_default_fonts`), so plotting needs
//! no system fonts or fontconfig.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::element::DashedPathElement;
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

/// Most points a [`LossCurve`] holds of each kind, before it thins them.
pub const CURVE_POINTS: usize = 8192;

/// A loss curve of bounded size for a run of any length (a daemon lives for months): it
/// holds every step's point until it has 2 x [`CURVE_POINTS`], then drops every other one
/// and from then on keeps every second step, and so on (the stride doubles each time).
/// Points with a validation loss are held apart, thinned the same way. A point at or
/// before the newest one (a step redone after a restart) replaces what was held from
/// its step on: the curve keeps the last run of each step. Memory stays below 4 x
/// [`CURVE_POINTS`] points whatever the run's length; the plot is as wide as ever.
#[derive(Clone, Debug, Default)]
pub struct LossCurve {
    train: Thinned,
    val: Thinned,
}

/// One kind of point, thinned by a doubling stride.
#[derive(Clone, Debug, Default)]
struct Thinned {
    points: Vec<LossPoint>,
    /// Only every `stride`-th point offered is kept (1 until the first thinning).
    stride: u64,
    /// Points offered since the last kept one.
    skipped: u64,
}

impl Thinned {
    fn push(&mut self, p: LossPoint) {
        if self.points.last().is_some_and(|l| p.step <= l.step) {
            let keep = self.points.partition_point(|q| q.step < p.step);
            self.points.truncate(keep);
        } else if self.skipped + 1 < self.stride.max(1) {
            self.skipped += 1;
            return;
        }
        self.skipped = 0;
        self.points.push(p);
        if self.points.len() >= 2 * CURVE_POINTS {
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.stride = self.stride.max(1) * 2;
        }
    }
}

impl LossCurve {
    /// An empty curve.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one step's point (see the type's documentation for what is kept).
    pub fn push(&mut self, p: LossPoint) {
        if p.val_loss.is_some() {
            self.val.push(p);
        }
        self.train.push(LossPoint {
            val_loss: None,
            ..p
        });
    }

    /// The points held, in step order (a step with a validation loss once, with it).
    pub fn points(&self) -> Vec<LossPoint> {
        let mut out: Vec<LossPoint> = self.train.points.clone();
        out.extend(self.val.points.iter().copied());
        out.sort_by_key(|p| (p.step, p.val_loss.is_some()));
        // A step held in both lists: its validation point only.
        let mut merged: Vec<LossPoint> = Vec::with_capacity(out.len());
        for p in out {
            match merged.last_mut() {
                Some(last) if last.step == p.step => *last = p,
                _ => merged.push(p),
            }
        }
        merged
    }

    /// How many points are held (both kinds).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.train.points.len() + self.val.points.len()
    }
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

/// One loss sample of the chaos timeline.
#[derive(Clone, Copy, Debug)]
pub struct TimelineLoss {
    /// Seconds since the run started.
    pub t_s: f64,
    /// Training loss reported at that time.
    pub loss: f64,
    /// The node that reported it (one colour per node).
    pub node: usize,
}

/// One injected fault: a span (or an instant when end == start) on the time axis.
#[derive(Clone, Debug)]
pub struct TimelineFault {
    /// Seconds since the run started when the fault began.
    pub start_s: f64,
    /// Seconds since the run started when the fault ended (== `start_s` for an instant).
    pub end_s: f64,
    /// Short text written at the top of the span.
    pub label: String,
}

/// A generation change: a new plan written at t_s.
#[derive(Clone, Copy, Debug)]
pub struct TimelineGeneration {
    /// Seconds since the run started when the plan was written.
    pub t_s: f64,
    /// The new generation number.
    pub generation: u64,
}

/// Colours for the nodes' losses; red is kept for faults, grey for generations.
const NODE_COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
];

/// Rows of fault labels at the top and of generation labels at the bottom of the plot.
const FAULT_ROWS: usize = 3;
const GENERATION_ROWS: usize = 2;
/// Height in pixels of one label row.
const ROW_PX: i32 = 15;

/// Greedy row assignment for labels laid out left to right: the first row whose last label
/// ends before `left` (with a small gap), else the row that frees up first.
fn pick_row(row_ends: &mut [i32], left: i32, right: i32) -> usize {
    let row = row_ends
        .iter()
        .position(|&end| end + 6 <= left)
        .unwrap_or_else(|| {
            (0..row_ends.len())
                .min_by_key(|&r| row_ends[r])
                .unwrap_or(0)
        });
    row_ends[row] = right;
    row
}

/// Draws `timeline.png`: training loss over wall time (seconds since the run started), one
/// colour per node (points joined by thin lines), faults as translucent red spans with their
/// label written at the top, generation changes as thin dashed grey vertical lines labelled
/// "g<N>" at the bottom.
///
/// Faults and generations may be empty; it fails only when no finite loss exists (or when
/// the file cannot be drawn).
pub fn plot_timeline(
    path: &Path,
    title: &str,
    losses: &[TimelineLoss],
    faults: &[TimelineFault],
    generations: &[TimelineGeneration],
) -> Result<()> {
    register_font();
    let finite: Vec<&TimelineLoss> = losses
        .iter()
        .filter(|p| p.loss.is_finite() && p.t_s.is_finite())
        .collect();
    if finite.is_empty() {
        return Err(anyhow!(
            "{}: no finite loss to plot on the timeline",
            path.display()
        ));
    }
    let faults: Vec<(f64, f64, &str)> = faults
        .iter()
        .filter(|f| f.start_s.is_finite() && f.end_s.is_finite())
        .map(|f| {
            (
                f.start_s.min(f.end_s),
                f.start_s.max(f.end_s),
                f.label.as_str(),
            )
        })
        .collect();
    let generations: Vec<&TimelineGeneration> =
        generations.iter().filter(|g| g.t_s.is_finite()).collect();

    // x: from the start of the run (or earlier, if something is) to the last event.
    let times = finite
        .iter()
        .map(|p| p.t_s)
        .chain(faults.iter().flat_map(|&(s, e, _)| [s, e]))
        .chain(generations.iter().map(|g| g.t_s));
    let (t_lo, t_hi) = times.fold((0.0f64, f64::NEG_INFINITY), |(lo, hi), t| {
        (lo.min(t), hi.max(t))
    });
    let x_min = t_lo;
    let x_max = if t_hi > t_lo {
        t_hi + (t_hi - t_lo) * 0.01
    } else {
        t_lo + 1.0
    };

    // y: the losses, with room above for the fault labels and below for the generation labels.
    let (lo, hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.loss), hi.max(p.loss))
        });
    let span = (hi - lo).max(1e-3);
    let top_frac = if faults.is_empty() { 0.05 } else { 0.16 };
    let bottom_frac = if generations.is_empty() { 0.05 } else { 0.10 };
    let scale = span / (1.0 - top_frac - bottom_frac);
    let (y_min, y_max) = (lo - scale * bottom_frac, hi + scale * top_frac);

    let err = |e: &dyn std::fmt::Display| {
        anyhow!("{}: cannot draw the timeline plot: {e}", path.display())
    };
    let root = BitMapBackend::new(path, (1200, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("time since the run started (s)")
        .y_desc("loss (nats/token)")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;

    // Faults behind everything else: a translucent span, or a line for an instant (or a span
    // too short to see).
    let px_per_s = {
        let (x_px, _) = chart.plotting_area().get_pixel_range();
        f64::from(x_px.end - x_px.start) / (x_max - x_min)
    };
    for &(start, end, _) in &faults {
        if (end - start) * px_per_s >= 2.0 {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(start, y_max), (end, y_min)],
                    RED.mix(0.15).filled(),
                )))
                .map_err(|e| err(&e))?;
        } else {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(start, y_max), (start, y_min)],
                    RED.mix(0.5).stroke_width(2),
                )))
                .map_err(|e| err(&e))?;
        }
    }
    for g in &generations {
        chart
            .draw_series(std::iter::once(DashedPathElement::new(
                vec![(g.t_s, y_max), (g.t_s, y_min)],
                5,
                4,
                RGBColor(110, 110, 110).stroke_width(1),
            )))
            .map_err(|e| err(&e))?;
    }

    // Losses: one colour per node, in time order.
    let mut nodes: Vec<usize> = finite.iter().map(|p| p.node).collect();
    nodes.sort_unstable();
    nodes.dedup();
    for (i, &node) in nodes.iter().enumerate() {
        let colour = NODE_COLOURS[i % NODE_COLOURS.len()];
        let mut pts: Vec<(f64, f64)> = finite
            .iter()
            .filter(|p| p.node == node)
            .map(|p| (p.t_s, p.loss))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(1)))
            .map_err(|e| err(&e))?
            .label(format!("node {node}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(
                pts.iter()
                    .map(|&(x, y)| Circle::new((x, y), 2, colour.filled())),
            )
            .map_err(|e| err(&e))?;
    }

    // Labels, in pixels: fault labels in rows at the top, generation labels in rows at the
    // bottom, each row filled left to right so that neighbours do not overlap.
    let (x_px, y_px) = chart.plotting_area().get_pixel_range();
    let place = |text: &str, x: f64, style: &TextStyle| -> Result<(i32, i32)> {
        let (w, _) = root.estimate_text_size(text, style).map_err(|e| err(&e))?;
        let w = i32::try_from(w).unwrap_or(i32::MAX);
        let (anchor, _) = chart.backend_coord(&(x, y_min));
        let left = (anchor + 3).min(x_px.end - w - 2).max(x_px.start + 2);
        Ok((left, left + w))
    };
    let fault_style = ("sans-serif", 13).into_font().color(&RGBColor(170, 0, 0));
    let mut fault_rows = [i32::MIN / 2; FAULT_ROWS];
    let mut order: Vec<usize> = (0..faults.len()).collect();
    order.sort_by(|&a, &b| faults[a].0.total_cmp(&faults[b].0));
    for i in order {
        let (start, _, label) = faults[i];
        if label.is_empty() {
            continue;
        }
        let (left, right) = place(label, start, &fault_style)?;
        let row = pick_row(&mut fault_rows, left, right) as i32;
        root.draw(&Text::new(
            label.to_string(),
            (left, y_px.start + 3 + row * ROW_PX),
            fault_style.clone(),
        ))
        .map_err(|e| err(&e))?;
    }
    let generation_style = ("sans-serif", 13).into_font().color(&RGBColor(80, 80, 80));
    let mut generation_rows = [i32::MIN / 2; GENERATION_ROWS];
    let mut order: Vec<&TimelineGeneration> = generations.clone();
    order.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    for g in order {
        let label = format!("g{}", g.generation);
        let (left, right) = place(&label, g.t_s, &generation_style)?;
        let row = pick_row(&mut generation_rows, left, right) as i32;
        root.draw(&Text::new(
            label,
            (left, y_px.end - 3 - (row + 1) * ROW_PX),
            generation_style.clone(),
        ))
        .map_err(|e| err(&e))?;
    }

    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_draws_nodes_faults_and_generations() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("timeline.png");
        let losses: Vec<TimelineLoss> = (0..3)
            .flat_map(|node| {
                (0..60).map(move |i| TimelineLoss {
                    t_s: f64::from(i) * 0.5 + node as f64 * 0.1,
                    loss: 6.0 / (1.0 + f64::from(i) * 0.1) + node as f64 * 0.05,
                    node,
                })
            })
            .chain(std::iter::once(TimelineLoss {
                t_s: 3.0,
                loss: f64::NAN,
                node: 1,
            }))
            .collect();
        let faults = vec![
            TimelineFault {
                start_s: 5.0,
                end_s: 9.0,
                label: "partition node 1".into(),
            },
            TimelineFault {
                start_s: 9.5,
                end_s: 9.5,
                label: "kill node 2".into(),
            },
        ];
        let generations = [1u64, 2, 3].map(|g| TimelineGeneration {
            t_s: g as f64 * 6.0,
            generation: g,
        });
        plot_timeline(&png, "chaos timeline", &losses, &faults, &generations).unwrap();
        let len = std::fs::metadata(&png).unwrap().len();
        assert!(len > 10_000, "timeline.png is only {len} bytes");

        // Empty faults and generations are fine.
        let bare = dir.path().join("bare.png");
        plot_timeline(&bare, "bare", &losses, &[], &[]).unwrap();
        assert!(std::fs::metadata(&bare).unwrap().len() > 5_000);
    }

    #[test]
    fn timeline_without_finite_loss_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("timeline.png");
        let e = plot_timeline(&png, "empty", &[], &[], &[]).unwrap_err();
        assert!(e.to_string().contains("timeline.png"), "{e}");
        let nan = [TimelineLoss {
            t_s: 1.0,
            loss: f64::NAN,
            node: 0,
        }];
        assert!(plot_timeline(&png, "nan", &nan, &[], &[]).is_err());
        assert!(!png.exists());
    }
}

#[cfg(test)]
mod curve_tests {
    use super::*;

    fn pt(step: u64, val: bool) -> LossPoint {
        LossPoint {
            step,
            loss: step as f64,
            val_loss: val.then_some(step as f64 / 2.0),
        }
    }

    #[test]
    fn a_curve_keeps_every_point_until_it_thins_and_stays_bounded() {
        let mut c = LossCurve::new();
        for s in 1..=100 {
            c.push(pt(s, s % 10 == 0));
        }
        let p = c.points();
        assert_eq!(p.len(), 100);
        assert_eq!(p.iter().filter(|p| p.val_loss.is_some()).count(), 10);
        // A month of steps at 3 a second, with an evaluation every 1000: bounded.
        let mut c = LossCurve::new();
        let n = 8_000_000u64;
        for s in 1..=n {
            c.push(pt(s, s % 1000 == 0));
        }
        assert!(c.len() <= 4 * CURVE_POINTS, "{}", c.len());
        let p = c.points();
        assert!(p.len() >= CURVE_POINTS, "{}", p.len());
        assert!(p.windows(2).all(|w| w[0].step < w[1].step));
        // The whole run is still covered, ends included, evenly.
        assert!(
            p[0].step <= 1024 && p.last().unwrap().step > n - 1024,
            "{:?}",
            (p[0].step, p.last().unwrap().step)
        );
        assert!(p.iter().filter(|p| p.val_loss.is_some()).count() >= 4000);
    }

    #[test]
    fn a_redone_step_replaces_what_was_held_from_it_on() {
        let mut c = LossCurve::new();
        for s in 1..=10 {
            c.push(pt(s, false));
        }
        c.push(LossPoint {
            step: 6,
            loss: -1.0,
            val_loss: None,
        });
        let p = c.points();
        assert_eq!(p.len(), 6);
        assert_eq!((p[5].step, p[5].loss), (6, -1.0));
    }
}

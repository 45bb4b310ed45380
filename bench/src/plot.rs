//! Latency distributions you can look at: HdrHistogram's percentile
//! distribution (`.hgrm`, the text that HdrHistogram's plotter and
//! `HistogramLogProcessor` read) and an SVG of each run's percentile curve
//! on the usual log scale of `1/(1 - percentile)`, so that the tail from
//! 90 % to 99.999 % gets as much room as the median.
//!
//! Histograms hold nanoseconds; both outputs are in microseconds.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// One run's latencies, named as the bench names the run (`xdp`,
/// `remote xdp`, ...).
#[derive(Debug, Clone, Copy)]
pub struct Curve<'a> {
    pub label: &'a str,
    pub hist: &'a Histogram<u64>,
}

/// Ticks per half distance to 100 %: HdrHistogram's default for its
/// percentile output.
const TICKS: u32 = 5;

/// Where the percentile axis ends: 99.9999 %.
const MAX_X: f64 = 1e6;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("Cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("Cannot draw {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("No latencies to show: every run is empty")]
    Empty,
}

/// HdrHistogram's percentile distribution of `hist` (nanoseconds), values
/// in microseconds: what Java's `outputPercentileDistribution(out, 1000.0)`
/// prints, so HdrHistogram's own plotter reads it.
pub fn hgrm(hist: &Histogram<u64>) -> String {
    let us = |ns: u64| ns as f64 / 1000.0;
    let mut out = String::new();
    let _ = writeln!(out, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)");
    let mut total = 0u64;
    for v in hist.iter_quantiles(TICKS) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            let _ =
                writeln!(out, "{:12.3} {:14.12} {:10} {:14.2}", us(v.value_iterated_to()), q, total, 1.0 / (1.0 - q));
        } else {
            let _ = writeln!(out, "{:12.3} {:14.12} {:10}", us(v.value_iterated_to()), q, total);
        }
    }
    let sub_buckets = (2 * 10u64.pow(u32::from(hist.sigfig()))).next_power_of_two();
    let _ =
        writeln!(out, "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]", hist.mean() / 1000.0, hist.stdev() / 1000.0);
    let _ = writeln!(out, "#[Max     = {:12.3}, Total count    = {:12}]", us(hist.max()), hist.len());
    let _ = writeln!(out, "#[Buckets = {:12}, SubBuckets     = {:12}]", hist.buckets(), sub_buckets);
    out
}

/// The file for `label` when a bench writes several runs: `rtt.hgrm` with
/// runs `xdp` and `udp` gives `rtt-xdp.hgrm` and `rtt-udp.hgrm`; one run
/// writes `path` itself.
pub fn path_for(path: &Path, label: &str, runs: usize) -> PathBuf {
    if runs <= 1 {
        return path.to_path_buf();
    }
    let safe: String =
        label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect::<String>();
    let stem = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{safe}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{safe}"),
    };
    path.with_file_name(name)
}

/// Write each curve's `.hgrm` (see [`path_for`]); returns the files written.
pub fn write_hgrm(path: &Path, curves: &[Curve<'_>]) -> Result<Vec<PathBuf>, PlotError> {
    let mut written = Vec::new();
    for c in curves {
        let file = path_for(path, c.label, curves.len());
        std::fs::write(&file, hgrm(c.hist)).map_err(|source| PlotError::Write { path: file.clone(), source })?;
        written.push(file);
    }
    Ok(written)
}

/// The points of `hist`'s percentile curve: (1/(1-q), µs), up to [`MAX_X`].
fn points(hist: &Histogram<u64>) -> Vec<(f64, f64)> {
    hist.iter_quantiles(TICKS)
        .map(|v| (v.quantile_iterated_to(), v.value_iterated_to() as f64 / 1000.0))
        .filter(|&(q, _)| q < 1.0)
        .map(|(q, us)| ((1.0 / (1.0 - q)).min(MAX_X), us))
        .collect()
}

/// The percentile a position on the x axis stands for: 1 is 0 %, 10 is
/// 90 %, 1000 is 99.9 %.
fn percentile_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    let nines = x.log10().round() as usize;
    if nines == 0 {
        "0%".into()
    } else {
        format!("{p:.prec$}%", prec = nines.saturating_sub(2))
    }
}

/// Draw every curve's percentile distribution into an SVG at `path`:
/// latency (µs, log scale) against percentile (log scale of 1/(1-p)).
pub fn svg(path: &Path, title: &str, curves: &[Curve<'_>]) -> Result<(), PlotError> {
    let series: Vec<(&str, Vec<(f64, f64)>)> =
        curves.iter().map(|c| (c.label, points(c.hist))).filter(|(_, p)| !p.is_empty()).collect();
    if series.is_empty() {
        return Err(PlotError::Empty);
    }
    let draw_err = |e: &dyn std::fmt::Display| PlotError::Draw { path: path.to_path_buf(), message: e.to_string() };
    let max_x = series.iter().flat_map(|(_, p)| p.iter().map(|&(x, _)| x)).fold(10.0, f64::max);
    let (lo, hi) = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold((f64::MAX, 0.0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (lo, hi) = ((lo * 0.8).max(1e-3), (hi * 1.25).max(lo * 2.0));

    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((1.0..max_x).log_scale(), (lo..hi).log_scale())
        .map_err(|e| draw_err(&e))?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 14))
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_label_formatter(&percentile_label)
        .y_label_formatter(&|y| format!("{y:.1}"))
        .draw()
        .map_err(|e| draw_err(&e))?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| draw_err(&e))?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw_err(&e))?;
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(10, 60_000_000_000, 3).unwrap();
        // 1,000 values 1..=1000 µs.
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        h
    }

    #[test]
    fn hgrm_has_the_percentile_distribution_format() {
        let text = hgrm(&sample());
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        assert_eq!(lines.next().unwrap(), "");
        let rows: Vec<Vec<f64>> = text
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().map(|f| f.parse().unwrap()).collect())
            .collect();
        // Values and counts never go down; the last row is 100 % of 1,000.
        assert!(rows.windows(2).all(|w| w[1][0] >= w[0][0] && w[1][1] >= w[0][1] && w[1][2] >= w[0][2]));
        let last = rows.last().unwrap();
        assert_eq!((last[1], last[2]), (1.0, 1000.0));
        assert!((last[0] - 1000.0).abs() < 1.0, "max about 1000 µs, got {}", last[0]);
        // The median row: about 500 µs at 50 %.
        let median = rows.iter().find(|r| r[1] >= 0.5).unwrap();
        assert!((median[0] - 500.0).abs() < 2.0, "median {median:?}");
        assert!(text.contains("Total count    =         1000]"), "{text}");
        assert!(text.contains("SubBuckets     =         2048]"), "{text}");
    }

    #[test]
    fn several_runs_get_a_file_each() {
        let p = Path::new("/tmp/rtt.hgrm");
        assert_eq!(path_for(p, "xdp", 1), PathBuf::from("/tmp/rtt.hgrm"));
        assert_eq!(path_for(p, "remote xdp", 2), PathBuf::from("/tmp/rtt-remote-xdp.hgrm"));
        assert_eq!(path_for(Path::new("out"), "udp", 2), PathBuf::from("out-udp"));
    }

    #[test]
    fn percentile_labels_read_as_nines() {
        assert_eq!(percentile_label(&1.0), "0%");
        assert_eq!(percentile_label(&10.0), "90%");
        assert_eq!(percentile_label(&100.0), "99%");
        assert_eq!(percentile_label(&1000.0), "99.9%");
        assert_eq!(percentile_label(&100_000.0), "99.999%");
    }

    #[test]
    fn the_svg_holds_a_curve_per_run_and_empty_runs_are_an_error() {
        let dir = std::env::temp_dir().join(format!("dmfabric-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rtt.svg");
        let (a, b) = (sample(), {
            let mut h = sample();
            h.record(5_000_000).unwrap();
            h
        });
        svg(&file, "round trip", &[Curve { label: "xdp", hist: &a }, Curve { label: "udp", hist: &b }]).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(80)]);
        // Each run: its curve and its legend mark, 2 px wide (the mesh is 1 px).
        assert_eq!(text.matches(r#"stroke-width="2""#).count(), 2 + 2, "{text}");
        let words: Vec<&str> = text.split(['>', '<']).map(str::trim).collect();
        for label in ["xdp", "udp", "99.9%", "percentile", "latency (µs)"] {
            assert!(words.contains(&label), "no {label} in {text}");
        }
        let empty = Histogram::new_with_bounds(10, 60_000_000_000, 3).unwrap();
        assert!(matches!(svg(&file, "none", &[Curve { label: "x", hist: &empty }]), Err(PlotError::Empty)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! `fractos report DIR`: plots of the benchmark and demo results in a
//! results directory (`fractos --results DIR bench ...`), as SVG files, one
//! self-contained HTML page and a Markdown page.
//!
//! Which plots appear depends on which results are there; every file is
//! recognised by its name (`demo*.json`, `bench.json`,
//! `bench-appliance.json`, `bench-nvme.json`, `bench-boot.json`, as
//! `--results` names them). Series are taken from the keys present, so
//! figures added to a benchmark later show up without a change here.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

/// Options of `fractos report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Results directory (what `fractos --results DIR ...` wrote).
    pub dir: PathBuf,
    /// Where the page and the SVGs go [default: DIR/report].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The file name `--results DIR` gives each command's JSON.
pub fn results_file(dir: &Path, kind: &str) -> PathBuf {
    dir.join(format!("{kind}.json"))
}

/// One plot of the report.
struct Plot {
    /// File stem of the SVG.
    name: String,
    title: String,
    /// What the plot shows and where the numbers come from.
    caption: String,
    svg: String,
}

const WIDTH: u32 = 900;
const HEIGHT: u32 = 420;
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Runs `fractos report`.
pub fn run(a: ReportArgs) -> anyhow::Result<()> {
    let out = a.out.clone().unwrap_or_else(|| a.dir.join("report"));
    let plots = build(&a.dir)?;
    write(&out, &a.dir, &plots)?;
    eprintln!(
        "wrote {} plots, {} and {}",
        plots.len(),
        out.join("index.html").display(),
        out.join("report.md").display()
    );
    Ok(())
}

fn load(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Every plot the results in `dir` allow, in a fixed order.
fn build(dir: &Path) -> anyhow::Result<Vec<Plot>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the results directory {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    let mut plots = Vec::new();
    for name in &names {
        let v = load(&dir.join(name))?;
        let stem = name.trim_end_matches(".json");
        match stem {
            s if s.starts_with("demo") => plots.extend(demo_plots(s, &v)?),
            "bench" => plots.push(hosted_bench(&v)?),
            "bench-appliance" => plots.push(appliance_bench(&v)?),
            "bench-nvme" => plots.push(nvme_bench(&v)?),
            "bench-boot" => plots.push(boot_bench(&v)?),
            _ => eprintln!("report: skipping {name} (not a result file fractos knows)"),
        }
    }
    if plots.is_empty() {
        bail!(
            "no results in {}: run e.g. `fractos --results {} demo --hosted` or `fractos --results {} bench` first",
            dir.display(),
            dir.display(),
            dir.display()
        );
    }
    Ok(plots)
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

const MODES: [(&str, &str); 3] = [
    ("fractos", "FractOS (continuations)"),
    ("centralized", "centralised (via the client)"),
    ("remote_api", "remote API (a call per stage)"),
];

fn demo_plots(stem: &str, v: &Value) -> anyhow::Result<Vec<Plot>> {
    let controllers = v["controllers"].as_str().unwrap_or("?").to_string();
    let requests = v["requests"].as_u64().unwrap_or(0);
    let mut plots = Vec::new();
    let series: Vec<(&str, Vec<f64>)> = MODES
        .iter()
        .filter_map(|(key, label)| {
            let l: Vec<f64> = v[key]["latencies_us"]
                .as_array()?
                .iter()
                .filter_map(Value::as_f64)
                .collect();
            (!l.is_empty()).then_some((*label, l))
        })
        .collect();
    if !series.is_empty() {
        plots.push(Plot {
            name: format!("{stem}-latency-cdf"),
            title: format!("Pipeline latency per request ({controllers} controllers)"),
            caption: format!(
                "Cumulative distribution of the end-to-end latency of {requests} verifications per mode (`{stem}.json`, `latencies_us`); latency ratio {:.2}, remote-API latency ratio {:.2}.",
                num(v, "latency_ratio").unwrap_or(f64::NAN),
                num(v, "remote_api_latency_ratio").unwrap_or(f64::NAN)
            ),
            svg: cdf("latency (ms)", &series, 1e-3)?,
        });
    }
    let bars: Vec<(String, f64)> = MODES
        .iter()
        .filter_map(|(key, label)| {
            num(&v[key], "inter_node_bytes").map(|b| (label.to_string(), b / 1e6))
        })
        .collect();
    if !bars.is_empty() {
        plots.push(Plot {
            name: format!("{stem}-traffic"),
            title: format!("Bytes between controllers per mode ({controllers} controllers)"),
            caption: format!(
                "Inter-node bytes for {requests} verifications per mode (`{stem}.json`, `inter_node_bytes`); traffic ratio (centralised ÷ FractOS) {:.2}.",
                num(v, "traffic_ratio").unwrap_or(f64::NAN)
            ),
            svg: bars_svg(&[Panel::new("inter-node traffic", "MB", bars)])?,
        });
    }
    Ok(plots)
}

/// The keys of `v` ending in `suffix`, as (key, value) bars.
fn keyed(v: &Value, suffix: &str, scale: f64) -> Vec<(String, f64)> {
    let Some(obj) = v.as_object() else {
        return Vec::new();
    };
    // `invoke_rtt_us` and `invoke_rtt_us_secure` are both round trips;
    // bars are named by what is left of the key (`invoke rtt secure`).
    let secure = format!("{suffix}_secure");
    obj.iter()
        .filter(|(k, _)| k.ends_with(suffix) || k.ends_with(&secure))
        .filter_map(|(k, x)| {
            let label = k.replacen(suffix, "_", 1).replace('_', " ");
            let label = label.split_whitespace().collect::<Vec<_>>().join(" ");
            x.as_f64().map(|x| (label, x * scale))
        })
        .collect()
}

/// A bar figure: `caption` followed by the ratios named in `ratios`
/// (label, key of `v`).
fn bar_plot(
    name: &str,
    title: &str,
    caption: &str,
    v: &Value,
    ratios: &[(&str, &str)],
    panels: &[Panel],
) -> anyhow::Result<Plot> {
    let figures: Vec<String> = ratios
        .iter()
        .map(|(label, key)| format!("{label} {:.3}", num(v, key).unwrap_or(f64::NAN)))
        .collect();
    Ok(Plot {
        name: name.into(),
        title: title.into(),
        caption: format!("{caption}: {}.", figures.join(", ")),
        svg: bars_svg(panels)?,
    })
}

fn hosted_bench(v: &Value) -> anyhow::Result<Plot> {
    bar_plot(
        "bench-hosted",
        "Hosted controllers against raw TCP (same run)",
        "`fractos bench` (`bench.json`): invoke round trips and copy bandwidth through hosted controllers next to raw loopback TCP measured in the same run",
        v,
        &[("invoke RTT ratio", "invoke_rtt_ratio"), ("copy bandwidth ratio", "copy_bw_ratio")],
        &[
            Panel::new("round trip", "µs", keyed(v, "_us", 1.0)),
            Panel::new("bandwidth", "GB/s", keyed(v, "_gbps", 1.0)),
        ],
    )
}

fn appliance_bench(v: &Value) -> anyhow::Result<Plot> {
    bar_plot(
        "bench-appliance",
        "Appliance against the hosted controller in a Linux guest",
        "`fractos bench --appliance` (`bench-appliance.json`), same QEMU NIC configuration for both",
        v,
        &[("RTT ratio", "rtt_ratio"), ("copy ratio", "copy_ratio")],
        &[
            Panel::new("round trip", "µs", keyed(v, "_rtt_us", 1.0)),
            Panel::new("copy bandwidth", "MB/s", keyed(v, "_mbps", 1.0)),
        ],
    )
}

fn nvme_bench(v: &Value) -> anyhow::Result<Plot> {
    bar_plot(
        "bench-nvme",
        "Appliance storage service against NVMe reads in a Linux guest",
        "`fractos bench nvme` (`bench-nvme.json`)",
        v,
        &[
            ("read ratio (128 KiB)", "read_ratio_128k"),
            ("IOPS ratio (4 KiB)", "iops_ratio_4k"),
            ("IOPS ratio (4 KiB, 8 in flight)", "iops_ratio_4k_qd8"),
        ],
        &[
            Panel::new("128 KiB reads", "MB/s", keyed(v, "_read_mbps_128k", 1.0)),
            Panel::new("4 KiB reads", "IOPS", keyed(v, "_iops_4k", 1.0)),
            Panel::new(
                "4 KiB reads, 8 in flight",
                "IOPS",
                keyed(v, "_iops_4k_qd8", 1.0),
            ),
        ],
    )
}

fn boot_bench(v: &Value) -> anyhow::Result<Plot> {
    let pick = |keys: [(&str, &str); 2]| -> Vec<(String, f64)> {
        keys.iter()
            .filter_map(|(k, label)| num(v, k).map(|x| (label.to_string(), x)))
            .collect()
    };
    bar_plot(
        "bench-boot",
        "Boot: the appliance against Linux",
        "`fractos bench boot` (`bench-boot.json`), medians",
        v,
        &[
            ("ready ratio", "boot_ratio"),
            ("serving ratio", "serving_ratio"),
        ],
        &[
            Panel::new(
                "kernel ready",
                "ms",
                pick([("boot_ready_ms", "FractOS"), ("linux_boot_ms", "Linux")]),
            ),
            Panel::new(
                "serving a process",
                "ms",
                pick([
                    ("boot_serving_ms", "FractOS"),
                    ("linux_serving_ms", "Linux"),
                ]),
            ),
        ],
    )
}

/// One bar chart of a figure.
struct Panel {
    title: String,
    unit: String,
    bars: Vec<(String, f64)>,
}

impl Panel {
    fn new(title: &str, unit: &str, bars: Vec<(String, f64)>) -> Self {
        Panel {
            title: title.into(),
            unit: unit.into(),
            bars: bars.into_iter().filter(|(_, v)| v.is_finite()).collect(),
        }
    }
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot failed: {e:?}")
}

/// Side-by-side bar charts, one per panel, each bar labelled with its
/// value.
fn bars_svg(panels: &[Panel]) -> anyhow::Result<String> {
    let panels: Vec<&Panel> = panels.iter().filter(|p| !p.bars.is_empty()).collect();
    anyhow::ensure!(!panels.is_empty(), "no figures to plot");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let areas = root.split_evenly((1, panels.len()));
        for (area, p) in areas.iter().zip(&panels) {
            let max = p.bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9) * 1.2;
            let n = p.bars.len();
            let mut chart = ChartBuilder::on(area)
                .caption(&p.title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d((0..n - 1).into_segmented(), 0f64..max)
                .map_err(draw_err)?;
            let labels: Vec<String> = p.bars.iter().map(|b| b.0.clone()).collect();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .y_desc(p.unit.as_str())
                .x_labels(n)
                .x_label_formatter(&|x| match x {
                    SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                    _ => String::new(),
                })
                .x_label_style(("sans-serif", 12))
                .draw()
                .map_err(draw_err)?;
            chart
                .draw_series(p.bars.iter().enumerate().map(|(i, (_, v))| {
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(i), 0.0),
                            (SegmentValue::Exact(i + 1), *v),
                        ],
                        COLORS[i % COLORS.len()].filled(),
                    );
                    bar.set_margin(0, 0, 8, 8);
                    bar
                }))
                .map_err(draw_err)?;
            chart
                .draw_series(p.bars.iter().enumerate().map(|(i, (_, v))| {
                    Text::new(
                        format_value(*v),
                        (SegmentValue::CenterOf(i), *v + max * 0.03),
                        TextStyle::from(("sans-serif", 12).into_font())
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )
                }))
                .map_err(draw_err)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn format_value(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

/// Cumulative distributions of each series (values scaled by `scale`).
fn cdf(x_desc: &str, series: &[(&str, Vec<f64>)], scale: f64) -> anyhow::Result<String> {
    let max = series
        .iter()
        .flat_map(|s| s.1.iter())
        .fold(0.0f64, |m, &v| m.max(v * scale))
        .max(1e-9)
        * 1.05;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..max, 0f64..1.0)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("fraction of requests")
            .draw()
            .map_err(draw_err)?;
        for (i, (label, values)) in series.iter().enumerate() {
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let n = sorted.len() as f64;
            let color = COLORS[i % COLORS.len()];
            let points = sorted
                .iter()
                .enumerate()
                .map(|(k, v)| (v * scale, (k + 1) as f64 / n));
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(draw_err)?
                .label(*label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Escapes `s` for HTML and turns its `code` spans into `<code>`.
fn caption_html(s: &str) -> String {
    escape(s)
        .split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                format!("<code>{part}</code>")
            } else {
                part.to_string()
            }
        })
        .collect()
}

/// Writes the SVGs, `index.html` (SVGs inline: one self-contained file)
/// and `report.md` (SVGs by reference) into `out`.
fn write(out: &Path, dir: &Path, plots: &[Plot]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>FractOS benchmark report</title>\n<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}figure{margin:2em 0}figcaption{color:#555}</style>\n</head>\n<body>\n<h1>FractOS benchmark report</h1>\n",
    );
    let _ = writeln!(
        html,
        "<p>Results from <code>{}</code>; every ratio was measured against its baseline in the same run.</p>",
        escape(&dir.display().to_string())
    );
    let mut md = format!(
        "# FractOS benchmark report\n\nResults from `{}`; every ratio was measured against its baseline in the same run.\n",
        dir.display()
    );
    for p in plots {
        let file = format!("{}.svg", p.name);
        std::fs::write(out.join(&file), &p.svg)
            .with_context(|| format!("cannot write {}", out.join(&file).display()))?;
        let _ = writeln!(
            html,
            "<figure id=\"{}\">\n<h2>{}</h2>\n{}\n<figcaption>{}</figcaption>\n</figure>",
            p.name,
            escape(&p.title),
            p.svg.trim_start_matches(|c| c != '<'),
            caption_html(&p.caption)
        );
        let _ = write!(
            md,
            "\n## {}\n\n![{}]({file})\n\n{}\n",
            p.title, p.title, p.caption
        );
    }
    html.push_str("</body>\n</html>\n");
    std::fs::write(out.join("index.html"), html)
        .with_context(|| format!("cannot write {}", out.join("index.html").display()))?;
    std::fs::write(out.join("report.md"), md)
        .with_context(|| format!("cannot write {}", out.join("report.md").display()))?;
    Ok(())
}

//! The results folder: `report.md` (tables, the targets, what was skipped) and SVG plots.

use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;
use plotters::prelude::*;

use super::{BenchConfig, DataRow, Family, NodePortRow, Pair, Results};

/// Median and range of a set of figures.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

#[must_use]
pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { f64::midpoint(v[v.len() / 2 - 1], v[v.len() / 2]) };
    Some(Spread { median, min: v[0], max: v[v.len() - 1] })
}

/// The `p`th percentile (nearest rank).
#[must_use]
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within the slice"
    )]
    let rank = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied()
}

fn ratios(pairs: &[Pair]) -> Vec<f64> {
    pairs.iter().map(|p| p.ratio()).collect()
}

fn fmt_spread(s: Option<Spread>, digits: usize) -> String {
    s.map_or_else(|| "–".into(), |s| format!("{:.digits$} ({:.digits$}–{:.digits$})", s.median, s.min, s.max))
}

fn row_for<'a>(rows: &'a [DataRow], mode: &str, services: usize, family: Family) -> Option<&'a DataRow> {
    rows.iter().find(|r| r.mode == mode && r.services == services && r.family == family)
}

/// The median rate through the Service.
fn service_median(pairs: &[Pair]) -> Option<f64> {
    Some(spread(&pairs.iter().map(|p| p.service).collect::<Vec<_>>())?.median)
}

/// The IPv4 rows, which the plots and the targets are about.
fn ipv4_data(results: &Results) -> Vec<DataRow> {
    results.data.iter().filter(|r| r.family == Family::V4).cloned().collect()
}

fn ipv4_node_port(results: &Results) -> Vec<NodePortRow> {
    results.node_port.iter().filter(|r| r.family == Family::V4).cloned().collect()
}

/// Writes `report.md` and the plots into `dir`; returns the report's text.
///
/// # Errors
/// When a file cannot be written or a plot cannot be drawn.
pub fn write(dir: &Path, config: &BenchConfig, results: &Results) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = markdown(config, results);
    std::fs::write(dir.join("report.md"), &text)?;
    plot_ratios(&dir.join("clusterip-ratio.svg"), results)?;
    plot_sync(&dir.join("full-sync.svg"), results)?;
    plot_node_port(&dir.join("nodeport.svg"), results)?;
    Ok(text)
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    format!("Linux {}, {cores} cores", kernel.trim())
}

#[must_use]
pub fn markdown(config: &BenchConfig, results: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark results\n");
    let _ = writeln!(
        md,
        "{}; {} repeats of {:?} per figure; {} endpoints per Service. Ratios are medians (range) of figures \
         measured back to back in one run; absolute rates from this shared machine are context only.\n",
        machine(),
        config.repeats,
        config.duration,
        config.endpoints_per_service
    );

    data_section(&mut md, results);
    ipv6_section(&mut md, results);
    node_port_section(&mut md, results);
    control_section(&mut md, config, results);
    let _ = writeln!(md, "\n## Against the targets\n");
    for line in targets(results) {
        let _ = writeln!(md, "- {line}");
    }
    if !results.skipped.is_empty() {
        let _ = writeln!(md, "\n## Not measured\n");
        for s in &results.skipped {
            let _ = writeln!(md, "- {s}");
        }
    }
    let _ = writeln!(md, "\nPlots: `clusterip-ratio.svg`, `full-sync.svg`, `nodeport.svg`.");
    md
}

fn data_section(md: &mut String, results: &Results) {
    let _ = writeln!(md, "## ClusterIP data path: Service ÷ direct to the pod\n");
    let _ = writeln!(
        md,
        "A pod on node 1 to a ClusterIP whose one endpoint is a pod on node 2, against the same pod addressed by \
         its IP (the physical limit). Connections: connect, one request, close. Requests: one held connection.\n"
    );
    let _ = writeln!(
        md,
        "| mode | Services | connections ratio | requests ratio | direct conn/s | direct req/s | conn/s ÷ eBPF |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for row in results.data.iter().filter(|r| r.family == Family::V4) {
        let direct_c = spread(&row.connections.iter().map(|p| p.direct).collect::<Vec<_>>());
        let direct_q = spread(&row.requests.iter().map(|p| p.direct).collect::<Vec<_>>());
        let vs_ebpf = row_for(&results.data, "ebpf", row.services, Family::V4)
            .and_then(|e| Some(service_median(&row.connections)? / service_median(&e.connections)?));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {} |",
            row.mode,
            row.services,
            fmt_spread(spread(&ratios(&row.connections)), 3),
            fmt_spread(spread(&ratios(&row.requests)), 3),
            direct_c.map_or(0.0, |s| s.median),
            direct_q.map_or(0.0, |s| s.median),
            vs_ebpf.map_or_else(|| "–".into(), |r| format!("{r:.3}")),
        );
    }
}

/// The IPv6 figures beside the IPv4 ones of the same mode and scale.
fn ipv6_section(md: &mut String, results: &Results) {
    let rows: Vec<&DataRow> = results.data.iter().filter(|r| r.family == Family::V6).collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n### IPv6 beside IPv4\n");
    let _ = writeln!(
        md,
        "The same Service's IPv6 ClusterIP and the same pod's IPv6 address, measured in the same lab right after \
         the IPv4 figures (the filler Services are IPv4-only: the IPv6 table holds this one Service).\n"
    );
    let _ = writeln!(
        md,
        "| mode | Services | IPv6 connections ratio | IPv6 requests ratio | Service conn/s IPv6 ÷ IPv4 | Service req/s IPv6 ÷ IPv4 |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for row in rows {
        let v4 = row_for(&results.data, &row.mode, row.services, Family::V4);
        let over = |pick: fn(&DataRow) -> &[Pair]| {
            v4.and_then(|v4| Some(service_median(pick(row))? / service_median(pick(v4))?))
                .map_or_else(|| "–".into(), |r| format!("{r:.3}"))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            row.mode,
            row.services,
            fmt_spread(spread(&ratios(&row.connections)), 3),
            fmt_spread(spread(&ratios(&row.requests)), 3),
            over(|r| &r.connections),
            over(|r| &r.requests),
        );
    }
}

fn node_port_section(md: &mut String, results: &Results) {
    let _ = writeln!(md, "\n## NodePort from the external client\n");
    let _ = writeln!(
        md,
        "To a backend on the other node. UDP exchanges: request/answer pairs from one socket (latency-bound). \
         UDP flood: one client sends 16-byte datagrams as fast as it can; the backend counts what arrives \
         (the path's packet rate; the client's send rate in brackets). IPv6 rows: the same paths to the node's \
         IPv6 address, against the iptables mode's IPv6 figures.\n"
    );
    let _ = writeln!(
        md,
        "| path | TCP conn/s | ÷ iptables | UDP exchanges/s | ÷ iptables | UDP flood delivered/s (sent/s) | ÷ iptables |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    let over = |mine: Option<Spread>, base: Option<Spread>| match (mine, base) {
        (Some(m), Some(b)) => format!("{:.2}", m.median / b.median),
        _ => "–".into(),
    };
    for row in &results.node_port {
        let baseline = results.node_port.iter().find(|r| r.path == "iptables" && r.family == row.family);
        let path = match row.family {
            Family::V4 => row.path.clone(),
            Family::V6 => format!("{}, IPv6", row.path),
        };
        let c = spread(&row.connections);
        let u = spread(&row.udp_exchanges);
        let d = spread(&row.udp_delivered);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} ({}) | {} |",
            path,
            fmt_spread(c, 0),
            over(c, baseline.and_then(|b| spread(&b.connections))),
            fmt_spread(u, 0),
            over(u, baseline.and_then(|b| spread(&b.udp_exchanges))),
            fmt_spread(d, 0),
            spread(&row.udp_sent).map_or_else(|| "–".into(), |s| format!("{:.0}", s.median)),
            over(d, baseline.and_then(|b| spread(&b.udp_delivered))),
        );
    }
}

fn control_section(md: &mut String, config: &BenchConfig, results: &Results) {
    let _ = writeln!(md, "\n## Control plane\n");
    let _ = writeln!(
        md,
        "Full sync: the agent's first sync from cold (model and dataplane writes; reading the manifests is not \
         counted). One-endpoint change: the sync after one endpoint of one Service changed (model and dataplane, \
         from the store's change to the kernel's), up to {} times or for {} s (changes column).\n",
        config.endpoint_changes,
        config.change_budget.as_secs()
    );
    let _ = writeln!(
        md,
        "| mode | Services × endpoints | full sync ms | changes | change p50 ms | change p99 ms | peak RSS MiB | BPF maps MiB |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
    for row in &results.control {
        let _ = writeln!(
            md,
            "| {} | {} × {} | {:.1} | {} | {:.2} | {:.2} | {:.1} | {} |",
            row.mode,
            row.services,
            row.endpoints_per_service,
            row.full_sync_ms,
            row.change_ms.len(),
            percentile(&row.change_ms, 50.0).unwrap_or(f64::NAN),
            percentile(&row.change_ms, 99.0).unwrap_or(f64::NAN),
            kib_to_mib(row.peak_rss_kib),
            row.bpf_map_kib.map_or_else(|| "–".into(), |k| format!("{:.1}", kib_to_mib(k))),
        );
    }
}

#[expect(clippy::cast_precision_loss, reason = "memory sizes far below 2^52")]
fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The goals, each with what was measured and whether it was met.
/// "met", or how far off: `value` against a ceiling (`at_most`) or a floor.
fn judge(value: f64, target: f64, at_most: bool) -> String {
    let met = if at_most { value <= target } else { value >= target };
    if met {
        "met".into()
    } else if at_most {
        format!("missed: {:.1} × the target", value / target)
    } else {
        format!("missed: {:.1} % short", (1.0 - value / target) * 100.0)
    }
}

fn targets(results: &Results) -> Vec<String> {
    let mut out = Vec::new();
    for row in results.data.iter().filter(|r| r.mode == "ebpf" && r.family == Family::V4) {
        if let Some(s) = spread(&ratios(&row.connections)) {
            out.push(format!(
                "eBPF ClusterIP ≥ 0.97 × direct at {} Services: connections {:.3} ({})",
                row.services,
                s.median,
                judge(s.median, 0.97, false)
            ));
        }
    }
    if let Some(row) = results.control.iter().filter(|r| r.mode == "ebpf").max_by_key(|r| r.services) {
        let at_scale =
            |verdict: String| if row.services >= 100_000 { verdict } else { "not at that scale in this run".into() };
        out.push(format!(
            "full sync of 100k × 10 in ≤ 2 s: {:.0} ms at {} × {} ({})",
            row.full_sync_ms,
            row.services,
            row.endpoints_per_service,
            at_scale(judge(row.full_sync_ms, 2000.0, true))
        ));
        let p99 = percentile(&row.change_ms, 99.0).unwrap_or(f64::NAN);
        out.push(format!(
            "one-endpoint change p99 ≤ 5 ms: {p99:.2} ms at {} Services ({})",
            row.services,
            at_scale(judge(p99, 5.0, true))
        ));
        #[expect(clippy::cast_precision_loss, reason = "KiB counts far below 2^52")]
        let megabytes = row.peak_rss_kib as f64 * 1024.0 / 1e6;
        out.push(format!(
            "agent RSS ≤ 300 MB: {megabytes:.0} MB at {} Services ({})",
            row.services,
            at_scale(judge(megabytes, 300.0, true))
        ));
    }
    let node_port = ipv4_node_port(results);
    let xdp = node_port.iter().find(|r| r.path.contains("XDP")).and_then(|r| spread(&r.udp_delivered));
    let ipt = node_port.iter().find(|r| r.path == "iptables").and_then(|r| spread(&r.udp_delivered));
    if let (Some(x), Some(i)) = (xdp, ipt) {
        let ratio = x.median / i.median;
        out.push(format!(
            "XDP NodePort ≥ 4 × iptables-mode pps (UDP flood delivered to the backend): {ratio:.2} × ({})",
            judge(ratio, 4.0, false)
        ));
    }
    out
}

const COLORS: [RGBColor; 4] =
    [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xd6, 0x27, 0x28), RGBColor(0x2c, 0xa0, 0x2c), RGBColor(0x94, 0x67, 0xbd)];

/// Registers `DejaVuSans.ttf` (Debian's `fonts-dejavu-core`) as the plots' sans-serif font, once.
fn font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let path = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
        let bytes =
            std::fs::read(path).map_err(|e| format!("{path}: {e} (scripts/setup.sh installs fonts-dejavu-core)"))?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| format!("{path} is not a font plotters can read"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// One line with points per mode, and the legend.
fn draw_lines<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    series: Vec<(String, Vec<(f64, f64)>)>,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, (mode, points)) in series.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(mode)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    Ok(())
}

/// `(mode, points)` per mode, in the order the modes were measured.
fn per_mode<R>(
    rows: &[R],
    mode_of: impl Fn(&R) -> &str,
    point: impl Fn(&R) -> Option<(f64, f64)>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut modes: Vec<&str> = rows.iter().map(&mode_of).collect();
    modes.dedup();
    modes
        .into_iter()
        .map(|m| (m.to_owned(), rows.iter().filter(|r| mode_of(r) == m).filter_map(&point).collect()))
        .collect()
}

#[expect(clippy::cast_precision_loss, reason = "Service counts far below 2^52")]
fn services_axis(max: usize) -> LogCoord<f64> {
    (1f64..max.max(10) as f64 * 2.0).log_scale().into()
}

/// Service ÷ direct connection rate against the number of Services, one line per mode (IPv4).
fn plot_ratios(path: &Path, results: &Results) -> anyhow::Result<()> {
    font()?;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let data = ipv4_data(results);
    let max_n = data.iter().map(|r| r.services).max().unwrap_or(1);
    let mut chart = ChartBuilder::on(&root)
        .caption("ClusterIP new connections: Service ÷ direct", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(services_axis(max_n), 0f64..1.2f64)?;
    chart.configure_mesh().x_desc("Services in the table").y_desc("ratio").draw()?;
    #[expect(clippy::cast_precision_loss, reason = "Service counts far below 2^52")]
    let series = per_mode(&data, |r| &r.mode, |r| Some((r.services as f64, spread(&ratios(&r.connections))?.median)));
    draw_lines(&mut chart, series)?;
    root.present()?;
    Ok(())
}

/// Full-sync time against the number of Services, one line per mode, both axes logarithmic.
fn plot_sync(path: &Path, results: &Results) -> anyhow::Result<()> {
    font()?;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_n = results.control.iter().map(|r| r.services).max().unwrap_or(1);
    let max_ms = results.control.iter().map(|r| r.full_sync_ms).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("Full sync from cold", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(65)
        .build_cartesian_2d(services_axis(max_n), (0.01f64..max_ms * 2.0).log_scale())?;
    chart.configure_mesh().x_desc("Services in the table").y_desc("ms").draw()?;
    #[expect(clippy::cast_precision_loss, reason = "Service counts far below 2^52")]
    let series = per_mode(&results.control, |r| &r.mode, |r| Some((r.services as f64, r.full_sync_ms.max(0.01))));
    draw_lines(&mut chart, series)?;
    root.present()?;
    Ok(())
}

/// NodePort rates per path relative to the iptables path, three bars per path (IPv4).
fn plot_node_port(path: &Path, results: &Results) -> anyhow::Result<()> {
    font()?;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let median = |v: &[f64]| spread(v).map_or(0.0, |s| s.median);
    let node_port = ipv4_node_port(results);
    let baseline = node_port.iter().find(|r| r.path == "iptables");
    let base = |f: fn(&NodePortRow) -> &[f64]| baseline.map_or(0.0, |b| median(f(b)));
    let metrics: [fn(&NodePortRow) -> &[f64]; 3] = [|r| &r.connections, |r| &r.udp_exchanges, |r| &r.udp_delivered];
    let rows: Vec<(String, [f64; 3])> = node_port
        .iter()
        .map(|r| {
            let ratio = |i: usize| {
                let b = base(metrics[i]);
                if b > 0.0 { median(metrics[i](r)) / b } else { 0.0 }
            };
            (r.path.clone(), [ratio(0), ratio(1), ratio(2)])
        })
        .collect();
    let top = rows.iter().flat_map(|r| r.1).fold(1.0, f64::max);
    let n = i32::try_from(rows.len()).unwrap_or(0).max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption("NodePort from outside, ÷ iptables: TCP conn/s, UDP exchanges/s, UDP flood pps", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0..n * 4, 0f64..top * 1.15)?;
    let labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len() * 4)
        .x_label_formatter(&|x| {
            if x % 4 == 1 {
                labels.get(usize::try_from(x / 4).unwrap_or(0)).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("÷ iptables path")
        .draw()?;
    for (i, (_, ratios)) in rows.iter().enumerate() {
        let x = i32::try_from(i).unwrap_or(0) * 4;
        chart.draw_series(ratios.iter().zip(0..).map(|(r, k)| {
            Rectangle::new([(x + k, 0.0), (x + k + 1, *r)], COLORS[usize::try_from(k).unwrap_or(0)].filled())
        }))?;
    }
    root.present()?;
    Ok(())
}

//! `cargo xtask bench`: the benchmark on the lab, writing a results folder (report.md and SVG plots).
//! Needs root (the lab). Every load run is bounded in time and stays inside the lab's namespaces.

use std::path::PathBuf;

use clap::Parser;
use proxy_lab::bench::{self, BenchConfig};

#[derive(Parser)]
#[command(about = "Benchmark the dataplane modes on the namespace lab")]
struct Args {
    /// Where report.md and the plots go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// The suite's configuration: two tiny scales, one short repeat. Seconds, not minutes.
    #[arg(long)]
    tiny: bool,
    /// Numbers of Services, comma-separated (default 1,1000,10000,100000).
    #[arg(long, value_delimiter = ',')]
    scales: Option<Vec<usize>>,
    /// Modes, comma-separated (default ebpf,nftables,iptables).
    #[arg(long, value_delimiter = ',')]
    modes: Option<Vec<String>>,
    /// Repeats per figure.
    #[arg(long)]
    repeats: Option<usize>,
    /// Seconds per load run.
    #[arg(long)]
    seconds: Option<f64>,
    /// Only the connection table's capacity: open this many flows (comma-separated list) through the
    /// programs, each into a table sized for it, and report how many it held, lost and the memory taken.
    #[arg(long, value_delimiter = ',')]
    flows: Option<Vec<u32>>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // A signal ends the process without dropping the lab: tear it down here, then leave.
    ctrlc::set_handler(|| {
        eprintln!("bench: interrupted; tearing the lab down");
        proxy_lab::lab::sweep_own_labs();
        std::process::exit(130);
    })?;
    if let Some(flows) = args.flows {
        println!("| flows | held (entries) | lost | moved | CONNTRACK memory | bytes/flow | packets/s |");
        println!("|---|---|---|---|---|---|---|");
        for n in flows {
            let m = proxy_lab::flow_capacity::measure(n)?;
            #[expect(clippy::cast_precision_loss, reason = "figures for a report")]
            let (mib, per_flow) = (m.memlock_bytes as f64 / 1_048_576.0, m.memlock_bytes as f64 / f64::from(n));
            println!(
                "| {} | {} | {} | {} | {mib:.1} MiB | {per_flow:.0} | {:.0} |",
                m.flows, m.entries, m.lost, m.moved, m.packets_per_second
            );
        }
        return Ok(());
    }
    let mut config = if args.tiny { BenchConfig::tiny() } else { BenchConfig::full() };
    if let Some(scales) = args.scales {
        config.scales = scales;
    }
    if let Some(modes) = args.modes {
        config.modes = modes;
    }
    if let Some(repeats) = args.repeats {
        config.repeats = repeats;
    }
    if let Some(seconds) = args.seconds {
        config.duration = std::time::Duration::from_secs_f64(seconds);
    }
    eprintln!("bench: {config:?}");
    let results = bench::run(&config)?;
    let report = bench::report::write(&args.out, &config, &results)?;
    println!("{report}");
    eprintln!("bench: results in {}", args.out.display());
    Ok(())
}

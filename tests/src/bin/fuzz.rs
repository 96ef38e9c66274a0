//! `cargo xtask fuzz [--packets N] [--seed S]`: the fuzzer of `proxy_lab::fuzz` at any length. Prints the
//! report; exits non-zero on any mismatch, with the failing packets as hex.

use clap::Parser;

#[derive(Parser)]
#[command(about = "Generated packets through every packet program of the eBPF object, held to a reference")]
struct Args {
    /// How many packets to run.
    #[arg(long, default_value_t = 10_000_000)]
    packets: u64,
    /// The seed; the same seed replays the same packets.
    #[arg(long, default_value_t = 0x5eed_2026_1201)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = std::time::Instant::now();
    let report = proxy_lab::fuzz::fuzz(args.seed, args.packets)?;
    println!("seed {:#x}, {:.1} s: {report}", args.seed, started.elapsed().as_secs_f64());
    if report.mismatches > 0 {
        anyhow::bail!("{} packets differed from the reference", report.mismatches);
    }
    Ok(())
}

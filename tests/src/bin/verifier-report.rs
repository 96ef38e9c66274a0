//! Loads every program of the eBPF object into the kernel (maps pinned in a private bpffs, nothing
//! attached) and prints, per program, how many instructions the verifier processed of its 1,000,000
//! limit, or why it refused the program. The stack depth per function is in the object's disassembly
//! (`llvm-objdump -d`, deepest `r10 - N`); this is the other budget a change to the data path spends.
//!
//! `cargo run -p proxy-lab --bin verifier-report [OBJECT]` (default: the object `cargo xtask build-ebpf`
//! writes, or `PROXY_EBPF_OBJECT`); `VERIFIER_LOG=PROGRAM` prints that program's whole log if it is
//! refused.

use std::process::ExitCode;

use aya::{
    EbpfLoader,
    programs::{Program, ProgramError},
};
use proxy_lab::bpf::{PrivateBpffs, object};

/// The verifier's limit on processed instructions per program.
const LIMIT: u32 = 1_000_000;

fn load(program: &mut Program) -> Result<(), ProgramError> {
    match program {
        Program::SchedClassifier(p) => p.load(),
        Program::Xdp(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        Program::SockOps(p) => p.load(),
        _ => Err(ProgramError::UnexpectedProgramType),
    }
}

fn main() -> anyhow::Result<ExitCode> {
    let path = match std::env::args_os().nth(1) {
        Some(p) => p.into(),
        None => object()?,
    };
    let pins = PrivateBpffs::mount()?;
    let mut ebpf = EbpfLoader::new().default_map_pin_directory(pins.path()).load_file(&path)?;
    let mut refused = 0;
    let mut rows = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        match load(program) {
            Ok(()) => {
                let count = program.info()?.verified_instruction_count().unwrap_or(0);
                rows.push((
                    count,
                    format!("{count:>9}  {:>5.1} %  {name}", f64::from(count) * 100.0 / f64::from(LIMIT)),
                ));
            }
            Err(e) => {
                refused += 1;
                let text = format!("{e:#}");
                if std::env::var_os("VERIFIER_LOG").is_some_and(|want| want == name) {
                    eprintln!("{text}");
                }
                let tail: String = text.lines().rev().take(14).collect::<Vec<_>>().join(" | ");
                rows.push((u32::MAX, format!("  REFUSED          {name}: {tail}")));
            }
        }
    }
    rows.sort_by_key(|row| std::cmp::Reverse(row.0));
    println!("verified insns  of limit  program");
    for (_, row) in rows {
        println!("{row}");
    }
    Ok(if refused == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

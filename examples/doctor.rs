//! `cargo run --example doctor [-- --json]`: can this host run smolvm VMs, and what to fix.
//!
//! Prints one line per check (pass / warn / fail / skipped) with the fix for anything that
//! is not a pass, then a verdict. `--json` prints the report as one JSON object instead. The
//! exit status is 0 when VMs can run, 1 otherwise (booting Linux needs more: see the verdict).

fn main() {
    let json = std::env::args().skip(1).any(|a| a == "--json");
    let report = smolvm::probe();
    if json {
        println!("{}", report.to_json());
    } else {
        for c in &report.checks {
            println!("[{:>7}] {:<24} {}", c.status.as_str(), c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("          {:<24} fix: {fix}", "");
            }
        }
        println!();
        if report.can_boot_linux() {
            println!("verdict: this host can boot Linux microVMs");
        } else if report.can_run_vms() {
            println!(
                "verdict: VMs run, but an unmodified Linux kernel cannot boot here: {}",
                report.linux_blocker().unwrap_or_default()
            );
        } else {
            println!(
                "verdict: no VM can run here: {}",
                report.linux_blocker().unwrap_or_default()
            );
        }
    }
    std::process::exit(if report.can_run_vms() { 0 } else { 1 });
}

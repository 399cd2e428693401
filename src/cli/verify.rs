//! `chainvault verify [--deep]`: the repository's consistency (as `chain
//! verify`), and with `--deep` every stored block of every point read back
//! and compared with its recorded block digest.

use anyhow::Context;
use clap::Args;

use super::inspect::{Source, SourceArgs};
use crate::model::*;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Read every block each point holds and compare it with its digest.
    #[arg(long)]
    pub deep: bool,
    /// Only this VM.
    #[arg(long, value_name = "VM")]
    pub vm: Option<String>,
    /// With --deep: read at most this many MiB per second.
    #[arg(long, value_name = "MIB_PER_S", requires = "deep")]
    pub rate: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub source: SourceArgs,
}

pub fn run(a: VerifyArgs) -> anyhow::Result<u8> {
    if !a.deep {
        return super::inspect::run_chain(super::inspect::ChainCmd::Verify(
            super::inspect::VerifyArgs {
                vm: a.vm,
                json: a.json,
                source: a.source,
            },
        ));
    }
    let req = DeepVerifyRequest {
        vm_name: a.vm.clone(),
        rate_mib_s: a.rate,
    };
    let rep: DeepVerifyReport = match Source::open(&a.source)? {
        Source::Offline(e) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(e.deep_verify(req))?
        }
        Source::Http(h) => h.call(
            "POST",
            "/api/v1/verify/deep",
            &[],
            Some(&serde_json::to_value(&req)?),
        )?,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "deep verify: {} point(s) checked, {} bad, {} without block digests; {} blocks, {} read in {:.1} s",
            rep.points_checked,
            rep.points_bad,
            rep.points_without_digests,
            rep.blocks_checked,
            crate::units::human(rep.bytes_read),
            rep.seconds
        );
        for b in &rep.bad_blocks {
            println!(
                "bad block: {} disk {} point {} offset {} ({} bytes){}{}; read by later points: {}",
                b.vm_name,
                b.disk_id,
                b.backup_id,
                b.offset,
                b.length,
                b.image
                    .as_ref()
                    .map(|i| format!(", stored in {i}"))
                    .unwrap_or_default(),
                b.host_offset
                    .map(|h| format!(
                        " at host offset {h}{}",
                        if b.compressed { " (compressed)" } else { "" }
                    ))
                    .unwrap_or_default(),
                if b.affected.is_empty() {
                    "none".to_string()
                } else {
                    b.affected.join(", ")
                }
            );
        }
        for p in &rep.problems {
            println!("problem: {p}");
        }
    }
    Ok(if rep.points_bad == 0 && rep.problems.is_empty() {
        0
    } else {
        1
    })
}

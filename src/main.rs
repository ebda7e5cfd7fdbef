//! `gtar-logd`: parse the command line and run. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gtar-logd", version, about = "Keep every checkpoint of a training run in a GETAR archive", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the frame indices of an archive, one a line, in GETAR order.
    Frames {
        /// The archive file (.zip).
        archive: PathBuf,
        /// Only frames of records in this group (or below it), e.g. a keras_gtar group.
        #[arg(long)]
        group: Option<String>,
    },
    /// List the record types of an archive with their frame counts.
    Ls {
        /// The archive file (.zip).
        archive: PathBuf,
    },
    /// Repair an archive left without a valid central directory (crash, kill -9,
    /// full disk): keep every complete frame, drop the torn tail.
    Repair {
        /// The archive file (.zip).
        archive: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    let res = match cli.cmd {
        Cmd::Frames { archive, group } => {
            gtar_logd::cli::frames(&archive, group.as_deref(), &mut out)
        }
        Cmd::Ls { archive } => gtar_logd::cli::ls(&archive, &mut out),
        Cmd::Repair { archive } => gtar_logd::cli::repair(&archive, &mut out),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gtar-logd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

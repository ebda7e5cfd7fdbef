//! `gtar-logd compact`: apply keep policies to an archive file offline.
//!
//! Order, so that nothing is lost on bad input: take the writer's lock
//! (refused while a daemon or any writer has the archive open), judge every
//! frame, print the verdicts, and only then write the new file
//! ([`gtar::Exclusive::compact`]: temp file, fsync, rename, fsync the
//! directory). `--dry-run` stops after the verdicts.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use gtar::{CompactPlan, Decision, Exclusive, Policy};

use super::{facts, Progress};

/// What `compact` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct CompactArgs {
    /// Only frames of records in this group (or below it) are judged and may
    /// be dropped; other records are kept whole.
    pub group: Option<String>,
    pub policy: Policy,
    pub dry_run: bool,
}

/// What `compact` did (or, in a dry run, would do).
#[derive(Debug, Clone)]
pub struct CompactOutcome {
    pub decisions: Vec<Decision>,
    pub old_len: u64,
    pub new_len: u64,
    /// The file was rewritten.
    pub written: bool,
}

fn open(path: &Path) -> Result<Exclusive> {
    Exclusive::open(path).map_err(|e| match e {
        gtar::Error::Locked => anyhow::anyhow!(
            "{}: a writer has this archive open (a running gtar-logd serving it, or another \
             program): it cannot be compacted offline now. Stop that writer first, or compact \
             through the daemon",
            path.display()
        ),
        e => anyhow::Error::new(e).context(format!("{}: cannot open archive", path.display())),
    })
}

fn describe(d: &Decision) -> String {
    let mut why: Vec<String> = d.reasons.iter().map(|r| r.name().to_string()).collect();
    if let (Some(v), true) = (d.metric, d.reasons.contains(&gtar::Reason::Best)) {
        why.retain(|w| w != "best");
        why.push(format!("best={v}"));
    }
    why.join(",")
}

/// Run `gtar-logd compact` on `path`, printing verdicts and a summary to `out`.
pub fn compact(path: &Path, args: &CompactArgs, out: &mut dyn Write) -> Result<CompactOutcome> {
    let scope = args.group.as_deref().filter(|g| !g.is_empty());
    let ex = open(path)?;
    if let Some(g) = scope {
        if !ex
            .index()
            .record_types()
            .any(|rt| gtar::group_under(&rt.group, Some(g)))
        {
            bail!("{}: no group {g:?} in this archive", path.display());
        }
    }
    let reader = ex.reader()?;
    let best = facts::BestRecords::read(&reader, scope, args.policy.drop_best)
        .with_context(|| format!("{}", path.display()))?;
    let facts = facts::frame_facts(&reader, ex.file(), scope, &args.policy, &best)
        .with_context(|| format!("{}", path.display()))?;
    if facts.is_empty() {
        writeln!(
            out,
            "no frames{}: nothing to compact; {} left as it is",
            scope
                .map(|g| format!(" in group {g:?}"))
                .unwrap_or_default(),
            path.display()
        )?;
        return Ok(CompactOutcome {
            decisions: Vec::new(),
            old_len: ex.len(),
            new_len: ex.len(),
            written: false,
        });
    }
    if let Some(rep) = ex.recovered() {
        eprintln!(
            "warning: {}: {}; compacting the {} complete entries recovery finds (the torn tail, \
             {} bytes, is not kept)",
            path.display(),
            rep.reason,
            rep.entries.len(),
            rep.bytes_dropped
        );
    }
    let decisions = gtar::select(&facts, &args.policy, SystemTime::now())
        .with_context(|| format!("{}", path.display()))?;
    let keep: HashSet<&str> = decisions
        .iter()
        .filter(|d| d.keep())
        .map(|d| d.index.as_str())
        .collect();
    let gone = best.dropped_with(&facts::dropped(&decisions));
    let plan = CompactPlan::dropping_records(ex.index(), scope, &|f| keep.contains(f), &|r| {
        gone.contains(r)
    });
    let old_len = ex.len();
    let new_len = plan
        .new_len(ex.file())
        .with_context(|| format!("{}: reading entries", path.display()))?;
    let verb = |keep: bool| match (keep, args.dry_run) {
        (true, false) => "keep",
        (false, false) => "drop",
        (true, true) => "would keep",
        (false, true) => "would drop",
    };
    for d in &decisions {
        if d.keep() {
            writeln!(out, "{}\t{}\t{}", verb(true), d.index, describe(d))?;
        } else {
            writeln!(out, "{}\t{}", verb(false), d.index)?;
        }
    }
    for r in &gone {
        writeln!(
            out,
            "{}\t{r}\t(it names a dropped frame as the best: --drop-best)",
            verb(false)
        )?;
    }
    writeln!(
        out,
        "frames: {} kept, {} dropped ({} entries); {} superseded copies of rewritten records",
        plan.kept.len(),
        plan.dropped.len(),
        plan.entries_dropped,
        plan.entries_superseded
    )?;
    let unchanged =
        plan.dropped.is_empty() && plan.entries_superseded == 0 && ex.recovered().is_none();
    let mut outcome = CompactOutcome {
        decisions,
        old_len,
        new_len,
        written: false,
    };
    if unchanged {
        writeln!(
            out,
            "nothing to drop: {} left as it is ({old_len} bytes)",
            path.display()
        )?;
        return Ok(outcome);
    }
    if args.dry_run {
        writeln!(
            out,
            "dry run: size would go {old_len} -> {new_len} bytes ({} reclaimed); nothing written",
            old_len.saturating_sub(new_len)
        )?;
        return Ok(outcome);
    }
    let bar = Progress::bytes(plan.data_bytes, "compacting");
    let done = ex.compact(&plan, &mut |d, _| bar.set(d)).with_context(|| {
        format!(
            "{}: compaction failed; the archive is unchanged",
            path.display()
        )
    })?;
    bar.finish();
    outcome.new_len = done.new_len;
    outcome.written = true;
    writeln!(
        out,
        "size: {} -> {} bytes ({} reclaimed)",
        done.old_len,
        done.new_len,
        done.old_len.saturating_sub(done.new_len)
    )?;
    Ok(outcome)
}

//! The lifecycle on a live archive: the `Compact` and `Snapshot` RPCs.
//!
//! A live compaction runs in two steps so that streams keep writing:
//! 1. in the background (a blocking thread, not the writer thread): take the
//!    committed view at time T (the writer's index, which lists committed
//!    frames only), judge its frames by the policy, copy the kept ones into
//!    the new file ([`gtar::Rewriter`]) and fsync it;
//! 2. on the archive's writer thread between two frames
//!    ([`WriterHandle::between`]): copy whatever was committed after T (all
//!    of it kept: the newest frames), fsync, rename over the archive, fsync
//!    the directory; the writer then reopens the path. Only this short tail
//!    holds the writer.
//!
//! Invariants:
//! * the compaction holds a lease on the archive's writer from start to end:
//!   the writer cannot retire (so no other process can lock the file and no
//!   offline compaction can run), and `OpenMode::Create` is refused (the
//!   file is never truncated under the copy). One compaction per archive at
//!   a time ([`InFlight`]): the temporary file name is fixed;
//! * the old file is never modified; the new one is complete and durable
//!   before the rename (see `gtar::compact`): after a crash at any point the
//!   archive is the old or the new file, each complete;
//! * the newest frame is never dropped: the policy keeps the newest at T
//!   (`gtar::select`) and every frame committed after T is copied; records
//!   committed after T at a frame index dropped at T are dropped too, so no
//!   half frame reappears;
//! * a snapshot of a live archive is taken from the writer's reader: its
//!   file and index belong together (a compaction swaps both), and every
//!   frame acked before the request is in that index.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use gtar::{Archive, CommittedView, CompactPlan, Decision, Entry, Index, Policy, Rewriter};

use super::facts;
use crate::error::{Classify, Kind};
use crate::writer::{Lease, WriterError};

/// Why a live compaction or snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The policy cannot be judged on this archive (unknown metric, unknown
    /// write times, no keep policy): nothing was changed.
    #[error("{0}")]
    Policy(String),
    #[error("{0}: a compaction of this archive is already running")]
    Busy(String),
    #[error("{0}")]
    Format(#[from] gtar::Error),
    #[error(transparent)]
    Writer(#[from] WriterError),
}

impl Classify for LiveError {
    fn kind(&self) -> Kind {
        match self {
            LiveError::Policy(_) => Kind::BadInput,
            LiveError::Busy(_) => Kind::Conflict,
            LiveError::Format(e) => e.kind(),
            LiveError::Writer(e) => e.kind(),
        }
    }
}

/// Archives being compacted in this process.
static IN_FLIGHT: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// This process's claim on compacting one archive; released on drop.
struct InFlight(PathBuf);

impl InFlight {
    fn claim(path: &Path) -> Result<InFlight, LiveError> {
        let mut g = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        if !g
            .get_or_insert_with(HashSet::new)
            .insert(path.to_path_buf())
        {
            return Err(LiveError::Busy(path.display().to_string()));
        }
        Ok(InFlight(path.to_path_buf()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut g = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = g.as_mut() {
            s.remove(&self.0);
        }
    }
}

/// What a live compaction is asked to do.
#[derive(Debug, Clone, Default)]
pub struct LiveCompact {
    /// Only frames of records in this group (or below) are judged.
    pub group: Option<String>,
    pub policy: Policy,
    pub dry_run: bool,
}

/// What a live compaction did (or, dry, would do).
#[derive(Debug, Clone, Default)]
pub struct LiveOutcome {
    /// Frames kept, GETAR order (those committed during the run included).
    pub kept: Vec<String>,
    pub dropped: Vec<String>,
    /// The verdicts on the frames judged (those committed at T).
    pub decisions: Vec<Decision>,
    /// The archive's size (with its central directory) before and after.
    pub old_len: u64,
    pub new_len: u64,
    /// The file was rewritten.
    pub written: bool,
}

impl LiveOutcome {
    pub fn reclaimed(&self) -> u64 {
        self.old_len.saturating_sub(self.new_len)
    }
}

/// Compact the archive `lease` holds (module docs). Blocking.
pub fn compact(lease: &Lease, args: &LiveCompact) -> Result<LiveOutcome, LiveError> {
    let handle = &lease.handle;
    let path = handle.path().to_path_buf();
    let _claim = InFlight::claim(&path)?;
    let scope = args.group.as_deref().filter(|g| !g.is_empty());
    // T: the committed view. The lease keeps this file the archive's until
    // our own rename (module docs).
    let reader = handle.reader();
    let file = reader.file()?.try_clone().map_err(gtar::Error::from)?;
    let at_t: Index = reader.index().clone();
    drop(reader);
    let view = CommittedView::of_index(&file, &at_t)?;
    if let Some(g) = scope {
        if !at_t
            .record_types()
            .any(|rt| gtar::group_under(&rt.group, Some(g)))
        {
            return Err(LiveError::Policy(format!(
                "group: no group {g:?} in {}",
                path.display()
            )));
        }
    }
    let frozen = Archive::with_shared_index(&path, Arc::new(RwLock::new(at_t.clone())))?;
    let best = facts::BestRecords::read(&frozen, scope, args.policy.drop_best)
        .map_err(|e| LiveError::Policy(format!("{e:#}")))?;
    let facts = facts::frame_facts(&frozen, &file, scope, &args.policy, &best)
        .map_err(|e| LiveError::Policy(format!("{e:#}")))?;
    let mut out = LiveOutcome {
        old_len: view.closed_len(),
        new_len: view.closed_len(),
        ..LiveOutcome::default()
    };
    if facts.is_empty() {
        return Ok(out); // nothing to judge, nothing written
    }
    let decisions = gtar::select(&facts, &args.policy, SystemTime::now())
        .map_err(|e| LiveError::Policy(e.to_string()))?;
    let keep: HashSet<String> = decisions
        .iter()
        .filter(|d| d.keep())
        .map(|d| d.index.clone())
        .collect();
    let gone = best.dropped_with(&facts::dropped(&decisions));
    let plan =
        CompactPlan::dropping_records(&at_t, scope, &|f| keep.contains(f), &|r| gone.contains(r));
    out.kept = plan.kept.clone();
    out.dropped = plan.dropped.clone();
    out.decisions = decisions;
    if args.dry_run || (plan.dropped.is_empty() && plan.entries_superseded == 0) {
        if args.dry_run {
            out.new_len = plan.new_len(&file)?;
        }
        return Ok(out);
    }
    let mut w = Rewriter::create(&path)?;
    w.write_plan(&file, &plan, &mut |_, _| {})?;
    w.sync_data()?;
    tracing::info!(archive = %path.display(), kept = plan.kept.len(), dropped = plan.dropped.len(),
        bytes = w.len(), "compaction: kept frames copied; finishing on the writer thread");
    // Step 2, on the writer thread.
    let dropped: HashSet<String> = plan.dropped.iter().cloned().collect();
    let scope_owned = scope.map(str::to_string);
    let (tx, rx) = std::sync::mpsc::channel();
    let target = path.clone();
    let reopened = handle.between(Box::new(move |now: &Index| {
        let res = finish(
            w,
            &file,
            now,
            view.end,
            scope_owned.as_deref(),
            &dropped,
            &target,
        );
        // Whatever `finish` reports: once the rename happened (even if the
        // directory's fsync then failed) the writer must reopen the path,
        // or frames would go to the unlinked old file.
        let replaced = !same_file(&file, &target);
        let _ = tx.send(res);
        replaced
    }));
    // The work's own result first (it says why when it failed), then the
    // writer's (e.g. it could not reopen the new file).
    let tail = rx.try_recv().map_err(|_| {
        LiveError::Writer(WriterError::Failed {
            path: path.display().to_string(),
            why: "the writer stopped before the compaction could finish; the archive is unchanged"
                .into(),
        })
    })??;
    reopened?;
    for f in tail.kept {
        if !out.kept.contains(&f) {
            out.kept.push(f);
        }
    }
    out.old_len = tail.old_len;
    out.new_len = tail.new_len;
    out.written = true;
    Ok(out)
}

struct Tail {
    kept: Vec<String>,
    old_len: u64,
    new_len: u64,
}

/// Whether `path` still names the open file `file`.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Step 2 (on the writer thread): the frames committed after T, then the
/// swap.
fn finish(
    mut w: Rewriter,
    file: &File,
    now: &Index,
    t_end: u64,
    scope: Option<&str>,
    dropped: &HashSet<String>,
    path: &Path,
) -> Result<Tail, LiveError> {
    let old_len = CommittedView::of_index(file, now)?.closed_len();
    // Entries never move and every one committed after T starts at or past
    // T's end.
    let mut after = Index::new();
    for e in now.entries() {
        if e.cd.local_header_offset >= t_end {
            after.push(Entry::clone(e));
        }
    }
    let plan = CompactPlan::new(&after, scope, &|f| !dropped.contains(f));
    w.write_plan(file, &plan, &mut |_, _| {})?;
    w.finish(path)?;
    let new_len = std::fs::metadata(path).map_err(gtar::Error::from)?.len();
    Ok(Tail {
        kept: plan.kept,
        old_len,
        new_len,
    })
}

/// What a snapshot made.
#[derive(Debug, Clone)]
pub struct Snapped {
    pub entries: usize,
    pub bytes: u64,
    pub reflinked: u64,
    pub frames: usize,
}

/// Snapshot archive file `src` to the new file `dst` (module docs): from
/// the live writer's reader when there is one, else from the file as it is
/// on disk. Blocking.
pub fn snapshot(live: Option<Archive>, src: &Path, dst: &Path) -> Result<Snapped, LiveError> {
    let s = match live {
        Some(reader) => {
            let view = {
                let ix = reader.index();
                CommittedView::of_index(reader.file()?, &ix)?
            };
            gtar::snapshot(reader.file()?, &view, dst)?
        }
        None => gtar::snapshot_path(src, dst)?,
    };
    let frames = Archive::open(dst)?.index().frames_under(None).len();
    Ok(Snapped {
        entries: s.entries,
        bytes: std::fs::metadata(dst).map_err(gtar::Error::from)?.len(),
        reflinked: s.stats.reflinked,
        frames,
    })
}

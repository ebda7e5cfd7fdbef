//! What a keep policy judges frames by, read from an archive.
//!
//! * Frames: the frame indices of the discrete records in the compacted
//!   group (or the whole archive), as `gtar-logd frames` lists them.
//! * Metric values (`keep_best`): a continuous record
//!   `{group}/vars/{name}.{type}.uni/{step}` whose steps are frame indices —
//!   what `GTARLogger` writes as `metrics/epoch/vars/val_loss.f64.uni/{epoch}`
//!   next to its per-epoch frames. The metric is named by its record name
//!   (`val_loss`) or, when that is ambiguous, by group and name
//!   (`metrics/epoch/loss`).
//! * Write times (`keep_newer_than`): the `written_unix_ms` field of the
//!   frame's manifest (`{P/}gtar_logd/frames/{F}/manifest.json`) when the
//!   daemon recorded one, else the DOS time in the local headers of the
//!   frame's entries — set by libgetar (miniz stamps the time of writing) but
//!   not by gtar-logd's writer, which writes a fixed 1980 date so archives
//!   are reproducible. A frame with neither has no known time.
//! * Write order: the offset of the frame's last entry in the file.
//! * The recorded best frame: `{P/}gtar_logd/keras/best.json` records (what
//!   `GTARLogger(monitor=...)` writes) name a frame in their `frame` field.
//!   That frame is kept unless the policy says `drop_best`; then a record
//!   whose frame is dropped is dropped with it ([`BestRecords::dropped_with`]).

use std::fs::File;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use gtar::{group_under, Archive, Behavior, Format, FrameFacts, Policy, RecordType};

use crate::layout;

/// Name of the manifest field holding a frame's write time (ms since the
/// Unix epoch), when the daemon records it.
pub const MANIFEST_TIME_FIELD: &str = "written_unix_ms";

/// Where a best-frame record lives below a group.
pub const BEST_RECORD: &str = "gtar_logd/keras/best.json";

/// The best-frame records under a scope: (record name, the frame it names).
#[derive(Debug, Default)]
pub struct BestRecords(Vec<(String, Option<String>)>);

impl BestRecords {
    /// The best-frame records in `scope`. Without `drop_best`, a record whose
    /// frame cannot be read is an error (compaction must not guess which
    /// frame to keep).
    pub fn read(a: &Archive, scope: Option<&str>, drop_best: bool) -> Result<BestRecords> {
        let entries: Vec<gtar::Entry> = {
            let ix = a.index();
            ix.entries()
                .iter()
                .filter(|e| {
                    let n = e.name();
                    (n == BEST_RECORD || n.ends_with(&format!("/{BEST_RECORD}")))
                        && ix
                            .get(n)
                            .is_some_and(|v| v.cd.local_header_offset == e.cd.local_header_offset)
                        && group_under(&gtar::RecordPath::parse(n).rtype.group, scope)
                })
                .cloned()
                .collect()
        };
        let mut out = Vec::new();
        for e in entries {
            let frame = a
                .read_entry(&e)
                .map_err(anyhow::Error::new)
                .and_then(|b| Ok(serde_json::from_slice::<serde_json::Value>(&b)?))
                .and_then(|v| match v.get("frame").and_then(|f| f.as_str()) {
                    Some(f) => Ok(f.to_string()),
                    None => bail!("no string field \"frame\""),
                });
            match frame {
                Ok(f) => out.push((e.name().to_string(), Some(f))),
                Err(_) if drop_best => out.push((e.name().to_string(), None)),
                Err(err) => bail!(
                    "{}: cannot tell which frame it records as the best ({err:#}); compaction \
                     keeps that frame, so it stops here. Pass --drop-best (drop_best) to \
                     compact regardless: the record is then dropped",
                    e.name()
                ),
            }
        }
        Ok(BestRecords(out))
    }

    fn names(&self, frame: &str) -> bool {
        self.0.iter().any(|(_, f)| f.as_deref() == Some(frame))
    }

    /// The records to drop when `dropped` frames go: those naming one of
    /// them, or no readable frame at all.
    pub fn dropped_with(&self, dropped: &[String]) -> std::collections::HashSet<String> {
        self.0
            .iter()
            .filter(|(_, f)| f.as_ref().is_none_or(|f| dropped.contains(f)))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// The frames `decisions` drop.
pub fn dropped(decisions: &[gtar::Decision]) -> Vec<String> {
    decisions
        .iter()
        .filter(|d| !d.keep())
        .map(|d| d.index.clone())
        .collect()
}

/// The facts of every frame under `scope`, as much as `policy` needs. `file`
/// is the archive file (for local headers).
pub fn frame_facts(
    a: &Archive,
    file: &File,
    scope: Option<&str>,
    policy: &Policy,
    best: &BestRecords,
) -> Result<Vec<FrameFacts>> {
    let frames = a.index().frames_under(scope);
    let metric = match &policy.keep_best {
        Some(b) => Some(metric_type(a, scope, &b.metric)?),
        None => None,
    };
    let mut out = Vec::with_capacity(frames.len());
    for f in frames {
        let entries: Vec<gtar::Entry> = {
            let ix = a.index();
            ix.records_at(scope, &f).map(|(_, e)| e.clone()).collect()
        };
        let written = entries
            .iter()
            .map(|e| e.cd.local_header_offset)
            .max()
            .unwrap_or(0);
        let metric = match &metric {
            Some(rt) => metric_value(a, rt, &f)?,
            None => None,
        };
        let time = if policy.keep_newer_than.is_some() {
            frame_time(a, file, &f, &entries)?
        } else {
            None
        };
        out.push(FrameFacts {
            recorded_best: best.names(&f),
            index: f,
            metric,
            time,
            written,
        });
    }
    Ok(out)
}

/// The continuous record a `--keep-best` metric names (module docs).
pub fn metric_type(a: &Archive, scope: Option<&str>, metric: &str) -> Result<RecordType> {
    let ix = a.index();
    let all: Vec<&RecordType> = ix
        .record_types()
        .filter(|rt| rt.behavior == Behavior::Continuous && group_under(&rt.group, scope))
        .collect();
    let full = |rt: &RecordType| layout::join(&[&rt.group, &rt.name]);
    let relative = |rt: &RecordType| match scope {
        Some(s) if !s.is_empty() => full(rt)
            .strip_prefix(&format!("{s}/"))
            .map(str::to_string)
            .unwrap_or_else(|| full(rt)),
        _ => full(rt),
    };
    let hits: Vec<&RecordType> = all
        .iter()
        .copied()
        .filter(|rt| rt.name == metric || full(rt) == metric || relative(rt) == metric)
        .collect();
    match hits.as_slice() {
        [one] => Ok((*one).clone()),
        [] => {
            let names: Vec<String> = all.iter().map(|rt| relative(rt)).collect();
            bail!(
                "--keep-best: no metric {metric:?}{} (metrics are continuous `vars/` records){}",
                scope
                    .map(|s| format!(" in group {s:?}"))
                    .unwrap_or_default(),
                if names.is_empty() {
                    "; this archive has none".to_string()
                } else {
                    format!("; this archive has: {}", names.join(", "))
                }
            )
        }
        many => bail!(
            "--keep-best: metric {metric:?} is ambiguous: {}; name one of them",
            many.iter()
                .map(|rt| relative(rt))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The metric's value at step `index`, if it has one there.
fn metric_value(a: &Archive, rt: &RecordType, index: &str) -> Result<Option<f64>> {
    let Some(e) = a.index().record(rt, index).cloned() else {
        return Ok(None);
    };
    let bytes = a
        .read_entry(&e)
        .with_context(|| format!("reading metric {}", e.name()))?;
    let size = rt.format.size();
    if bytes.len() != size {
        bail!(
            "--keep-best: {} holds {} bytes, not one {} value",
            e.name(),
            bytes.len(),
            rt.format.suffix()
        );
    }
    let v = match rt.format {
        Format::F32 => f32::from_le_bytes(bytes[..4].try_into()?) as f64,
        Format::F64 => f64::from_le_bytes(bytes[..8].try_into()?),
        Format::I32 => i32::from_le_bytes(bytes[..4].try_into()?) as f64,
        Format::I64 => i64::from_le_bytes(bytes[..8].try_into()?) as f64,
        Format::U8 => bytes[0] as f64,
        Format::U32 => u32::from_le_bytes(bytes[..4].try_into()?) as f64,
        Format::U64 => u64::from_le_bytes(bytes[..8].try_into()?) as f64,
    };
    Ok(Some(v))
}

/// When frame `index` was written (module docs), if known.
fn frame_time(
    a: &Archive,
    file: &File,
    index: &str,
    entries: &[gtar::Entry],
) -> Result<Option<SystemTime>> {
    let manifests: Vec<gtar::Entry> = {
        let ix = a.index();
        ix.records_at(None, index)
            .filter(|(rt, _)| layout::is_manifest(rt))
            .map(|(_, e)| e.clone())
            .collect()
    };
    let mut best: Option<SystemTime> = None;
    for m in manifests {
        let bytes = a.read_entry(&m)?;
        let ms = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get(MANIFEST_TIME_FIELD).and_then(|t| t.as_u64()));
        if let Some(ms) = ms {
            let t = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
            best = Some(best.map_or(t, |b| b.max(t)));
        }
    }
    if best.is_some() {
        return Ok(best);
    }
    for e in entries {
        if let Some(t) = gtar::entry_time(file, e)? {
            best = Some(best.map_or(t, |b| b.max(t)));
        }
    }
    Ok(best)
}

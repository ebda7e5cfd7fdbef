//! Keep policies: which frames of a trajectory to keep (in the spirit of
//! Orbax's preservation policies). Pure logic over what is known of each
//! frame — its index, a metric value, the time it was written — so the
//! offline `compact` command and a live compaction in the daemon decide the
//! same way.
//!
//! Invariants:
//! * a frame kept by any policy is kept (the policies are a union);
//! * the newest frame is never dropped: the last in GETAR order (what
//!   `frame=-1` reads and resume restores) and the last written, if another;
//! * a frame that a record of the archive names as the best
//!   ([`FrameFacts::recorded_best`], e.g. `GTARLogger(monitor=...)`'s
//!   `best.json`) is kept unless the policy says `drop_best` — and then the
//!   caller drops that record with it, so no record points at a frame that
//!   is gone;
//! * a policy that cannot be evaluated is an error, never a silent drop: a
//!   `keep_best` metric that no frame has, or `keep_newer_than` over frames
//!   whose write time is unknown, refuses to decide;
//! * an empty policy (nothing asked to be kept) is an error: it would drop
//!   every frame but the newest.

use std::cmp::Ordering;
use std::time::{Duration, SystemTime};

use crate::error::Error;
use crate::path::index_cmp;

/// Which end of a metric is best.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Min,
    Max,
}

/// Keep the `n` frames with the best values of `metric`.
#[derive(Debug, Clone, PartialEq)]
pub struct Best {
    /// The metric as the user named it (used in messages only here).
    pub metric: String,
    pub direction: Direction,
    pub n: usize,
}

impl std::str::FromStr for Best {
    type Err = Error;

    /// `METRIC:min|max:N`, e.g. `val_loss:min:3` (the metric may itself hold
    /// ':'; the last two fields are the direction and the count).
    fn from_str(s: &str) -> Result<Best, Error> {
        let bad = |why: &str| {
            Error::Invalid(format!(
                "keep-best {s:?}: {why} (expected METRIC:min|max:N, e.g. val_loss:min:3)"
            ))
        };
        let mut it = s.rsplitn(3, ':');
        let (n, dir, metric) = match (it.next(), it.next(), it.next()) {
            (Some(n), Some(d), Some(m)) if !m.is_empty() => (n, d, m),
            _ => return Err(bad("three fields are needed")),
        };
        let direction = match dir {
            "min" => Direction::Min,
            "max" => Direction::Max,
            _ => return Err(bad(&format!("{dir:?} is neither min nor max"))),
        };
        let n = n
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| bad(&format!("{n:?} is not a count of at least 1")))?;
        Ok(Best {
            metric: metric.to_string(),
            direction,
            n,
        })
    }
}

/// What to keep. Every field that is set keeps frames; see the module docs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// The last N frames (GETAR order).
    pub keep_last: Option<usize>,
    /// Every K-th frame: those whose index is a multiple of K when every
    /// index is an integer (so the choice does not move as frames come and
    /// go), else every K-th by position, starting with the first.
    pub keep_every: Option<u64>,
    /// The best N by a metric stored with the frames.
    pub keep_best: Option<Best>,
    /// Frames written less than this long ago.
    pub keep_newer_than: Option<Duration>,
    /// Let the frame recorded as the best be dropped like any other (its
    /// record goes with it); by default it is kept.
    pub drop_best: bool,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_every.is_none()
            && self.keep_best.is_none()
            && self.keep_newer_than.is_none()
    }
}

/// What is known of one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameFacts {
    pub index: String,
    /// The `keep_best` metric's value at this frame, if it has one.
    pub metric: Option<f64>,
    /// When the frame was written, if known.
    pub time: Option<SystemTime>,
    /// Where the frame was written relative to the others (larger = later,
    /// e.g. the file offset of its last entry).
    pub written: u64,
    /// A record of the archive names this frame as the best one.
    pub recorded_best: bool,
}

/// Why a frame is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Newest,
    Last,
    Every,
    Best,
    Newer,
    /// Named by a record as the best frame.
    RecordedBest,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Newest => "newest",
            Reason::Last => "last",
            Reason::Every => "every",
            Reason::Best => "best",
            Reason::Newer => "newer",
            Reason::RecordedBest => "recorded-best",
        }
    }
}

/// The verdict on one frame; `reasons` is empty for a dropped frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub index: String,
    pub reasons: Vec<Reason>,
    pub metric: Option<f64>,
}

impl Decision {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Decide for every frame (returned in GETAR order). `now` is the time
/// `keep_newer_than` counts back from.
pub fn select(
    frames: &[FrameFacts],
    policy: &Policy,
    now: SystemTime,
) -> Result<Vec<Decision>, Error> {
    if policy.is_empty() {
        return Err(Error::Invalid(
            "no keep policy given: compaction would drop every frame but the newest; \
             give at least one of keep-last, keep-every, keep-best, keep-newer-than"
                .into(),
        ));
    }
    if policy.keep_every == Some(0) {
        return Err(Error::Invalid("keep-every must be at least 1".into()));
    }
    let mut frames: Vec<&FrameFacts> = frames.iter().collect();
    frames.sort_by(|a, b| index_cmp(&a.index, &b.index));
    frames.dedup_by(|a, b| a.index == b.index);
    let n = frames.len();
    let mut reasons: Vec<Vec<Reason>> = vec![Vec::new(); n];
    if n == 0 {
        return Ok(Vec::new());
    }
    reasons[n - 1].push(Reason::Newest);
    let last_written = (0..n).max_by_key(|&i| frames[i].written).expect("n > 0");
    if last_written != n - 1 {
        reasons[last_written].push(Reason::Newest);
    }
    if let Some(k) = policy.keep_last {
        for r in reasons.iter_mut().skip(n.saturating_sub(k)) {
            r.push(Reason::Last);
        }
    }
    if let Some(k) = policy.keep_every {
        let values: Option<Vec<i128>> = frames.iter().map(|f| f.index.parse().ok()).collect();
        for (i, r) in reasons.iter_mut().enumerate() {
            let hit = match &values {
                Some(v) => v[i].rem_euclid(k as i128) == 0,
                None => (i as u64).is_multiple_of(k),
            };
            if hit {
                r.push(Reason::Every);
            }
        }
    }
    if let Some(best) = &policy.keep_best {
        let mut cands: Vec<(usize, f64)> = frames
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.metric.filter(|v| !v.is_nan()).map(|v| (i, v)))
            .collect();
        if cands.is_empty() {
            return Err(Error::Invalid(format!(
                "keep-best: no frame has a value of {:?} (a metric's steps must be the \
                 frames' indices, e.g. epoch metrics with one frame per epoch)",
                best.metric
            )));
        }
        // Best first; among equal values the newer frame wins.
        cands.sort_by(|a, b| {
            let by = match best.direction {
                Direction::Min => a.1.partial_cmp(&b.1),
                Direction::Max => b.1.partial_cmp(&a.1),
            };
            by.unwrap_or(Ordering::Equal).then(b.0.cmp(&a.0))
        });
        for (i, _) in cands.into_iter().take(best.n) {
            reasons[i].push(Reason::Best);
        }
    }
    if !policy.drop_best {
        for (i, f) in frames.iter().enumerate() {
            if f.recorded_best {
                reasons[i].push(Reason::RecordedBest);
            }
        }
    }
    if let Some(d) = policy.keep_newer_than {
        let unknown: Vec<&str> = frames
            .iter()
            .filter(|f| f.time.is_none())
            .map(|f| f.index.as_str())
            .collect();
        if !unknown.is_empty() {
            return Err(Error::Invalid(format!(
                "keep-newer-than: the write time of {} of {} frames is unknown (first: {:?}); \
                 use another keep policy for this archive",
                unknown.len(),
                n,
                unknown[0]
            )));
        }
        let since = now.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH);
        for (i, f) in frames.iter().enumerate() {
            if f.time.is_some_and(|t| t >= since) {
                reasons[i].push(Reason::Newer);
            }
        }
    }
    Ok(frames
        .iter()
        .zip(reasons)
        .map(|(f, mut r)| {
            r.sort();
            r.dedup();
            Decision {
                index: f.index.clone(),
                reasons: r,
                metric: f.metric,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(indices: &[&str]) -> Vec<FrameFacts> {
        indices
            .iter()
            .enumerate()
            .map(|(k, i)| FrameFacts {
                index: i.to_string(),
                metric: None,
                time: None,
                written: k as u64,
                recorded_best: false,
            })
            .collect()
    }

    fn kept(d: &[Decision]) -> Vec<&str> {
        d.iter()
            .filter(|d| d.keep())
            .map(|d| d.index.as_str())
            .collect()
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    #[test]
    fn keep_last_counts_in_getar_order_not_string_order() {
        // "10" sorts after "9" (shorter first): transformers #27138's bug.
        let mut f = facts(&["10", "8", "9", "11", "2"]);
        for x in &mut f {
            x.written = x.index.parse().unwrap();
        }
        let p = Policy {
            keep_last: Some(2),
            ..Default::default()
        };
        let d = select(&f, &p, now()).unwrap();
        assert_eq!(
            d.iter().map(|d| d.index.as_str()).collect::<Vec<_>>(),
            ["2", "8", "9", "10", "11"]
        );
        assert_eq!(kept(&d), ["10", "11"]);
        assert_eq!(d[4].reasons, [Reason::Newest, Reason::Last]);
    }

    #[test]
    fn the_newest_is_kept_even_by_a_policy_that_keeps_nothing_else() {
        let mut f = facts(&["0", "1", "2", "3"]);
        let p = Policy {
            keep_last: Some(0),
            ..Default::default()
        };
        assert_eq!(kept(&select(&f, &p, now()).unwrap()), ["3"]);
        // Frame 1 was rewritten last: it is the newest written, kept too.
        f[1].written = 99;
        assert_eq!(kept(&select(&f, &p, now()).unwrap()), ["1", "3"]);
    }

    #[test]
    fn keep_every_uses_index_values_when_numeric_else_positions() {
        let f = facts(&["0", "5", "10", "15", "20", "25", "30"]);
        let p = Policy {
            keep_every: Some(10),
            ..Default::default()
        };
        assert_eq!(
            kept(&select(&f, &p, now()).unwrap()),
            ["0", "10", "20", "30"]
        );
        let f = facts(&["a", "b", "c", "d", "e"]);
        let p = Policy {
            keep_every: Some(2),
            ..Default::default()
        };
        assert_eq!(kept(&select(&f, &p, now()).unwrap()), ["a", "c", "e"]);
        let p = Policy {
            keep_every: Some(0),
            ..Default::default()
        };
        assert!(select(&f, &p, now()).is_err());
    }

    #[test]
    fn keep_best_picks_by_direction_skips_missing_and_nan_and_prefers_newer_ties() {
        let mut f = facts(&["1", "2", "3", "4", "5", "6"]);
        let vals = [
            Some(0.5),
            None,
            Some(0.1),
            Some(f64::NAN),
            Some(0.1),
            Some(0.9),
        ];
        for (x, v) in f.iter_mut().zip(vals) {
            x.metric = v;
        }
        let mut p = Policy {
            keep_best: Some("val_loss:min:2".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(kept(&select(&f, &p, now()).unwrap()), ["3", "5", "6"]);
        p.keep_best = Some("val_loss:min:1".parse().unwrap());
        // 3 and 5 tie: the newer (5) wins; 6 is the newest.
        assert_eq!(kept(&select(&f, &p, now()).unwrap()), ["5", "6"]);
        p.keep_best = Some("acc:max:1".parse().unwrap());
        assert_eq!(kept(&select(&f, &p, now()).unwrap()), ["6"]);
        for x in &mut f {
            x.metric = None;
        }
        let e = select(&f, &p, now()).unwrap_err();
        assert!(e.to_string().contains("no frame has a value"), "{e}");
    }

    #[test]
    fn keep_best_specs_parse_and_bad_ones_say_what_is_expected() {
        let b: Best = "metrics/epoch/val:loss:max:7".parse().unwrap();
        assert_eq!(b.metric, "metrics/epoch/val:loss");
        assert_eq!(b.direction, Direction::Max);
        assert_eq!(b.n, 7);
        for bad in [
            "val_loss",
            "val_loss:min",
            "val_loss:low:3",
            "x:min:0",
            ":min:3",
        ] {
            let e = bad.parse::<Best>().unwrap_err().to_string();
            assert!(e.contains("METRIC:min|max:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn keep_newer_than_needs_every_time_and_keeps_the_recent_ones() {
        let mut f = facts(&["1", "2", "3"]);
        let p = Policy {
            keep_newer_than: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        assert!(select(&f, &p, now()).is_err());
        for (x, age) in f.iter_mut().zip([3600u64, 59, 600]) {
            x.time = Some(now() - Duration::from_secs(age));
        }
        assert_eq!(kept(&select(&f, &p, now()).unwrap()), ["2", "3"]);
    }

    #[test]
    fn the_recorded_best_frame_is_kept_unless_drop_best() {
        let mut f = facts(&["0", "1", "2", "3", "4"]);
        f[1].recorded_best = true;
        let mut p = Policy {
            keep_last: Some(1),
            ..Policy::default()
        };
        let d = select(&f, &p, now()).unwrap();
        assert_eq!(kept(&d), ["1", "4"]);
        assert_eq!(d[1].reasons, [Reason::RecordedBest]);
        p.drop_best = true;
        assert_eq!(kept(&select(&f, &p, now()).unwrap()), ["4"]);
        // drop_best alone is no policy.
        let only = Policy {
            drop_best: true,
            ..Policy::default()
        };
        assert!(only.is_empty());
    }

    #[test]
    fn policies_are_a_union_and_an_empty_policy_is_refused() {
        let mut f = facts(&["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]);
        f[2].metric = Some(0.01);
        let p = Policy {
            keep_last: Some(2),
            keep_every: Some(4),
            keep_best: Some("loss:min:1".parse().unwrap()),
            keep_newer_than: None,
            drop_best: false,
        };
        let d = select(&f, &p, now()).unwrap();
        assert_eq!(kept(&d), ["0", "2", "4", "8", "9"]);
        assert_eq!(d[8].reasons, [Reason::Last, Reason::Every]);
        let e = select(&f, &Policy::default(), now()).unwrap_err();
        assert!(e.to_string().contains("no keep policy"), "{e}");
        assert!(select(&[], &p, now()).unwrap().is_empty());
    }
}

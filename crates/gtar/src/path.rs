//! GETAR record paths and frame-index ordering.
//!
//! A record is a file inside the archive. Its path encodes everything about it
//! (libgetar `doc/source/gtar.rst`):
//!
//! * constant:   `{group}/{name}.{type}.{res}`
//! * discrete:   `{group}/frames/{index}/{name}.{type}.{res}`
//! * continuous: `{group}/vars/{name}.{type}.{res}/{index}`
//!
//! where `{type}` is one of the seven libgetar formats and `{res}` is `uni` or
//! `ind`; a name without `.type.res` is a text record.
//!
//! Invariants:
//! * [`RecordPath::parse`] is a line-by-line port of libgetar's
//!   `Record::Record(const string&)` (Record.cpp), including its treatment of
//!   odd paths, so that we group records exactly as libgetar does.
//! * [`RecordType`]'s `Ord` is libgetar's `Record::operator<` with the index
//!   nulled (group, name, behavior, format, resolution), and [`index_cmp`] is
//!   libgetar's `IndexCompare`: shorter first, then bytewise.

use std::cmp::Ordering;
use std::fmt;

/// How a record varies over the trajectory. Order matches libgetar's enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Behavior {
    Constant,
    Discrete,
    Continuous,
}

impl Behavior {
    /// "constant", "discrete" or "continuous".
    pub fn name(self) -> &'static str {
        match self {
            Behavior::Constant => "constant",
            Behavior::Discrete => "discrete",
            Behavior::Continuous => "continuous",
        }
    }
}

/// Binary element formats libgetar knows. Order matches libgetar's enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Format {
    F32,
    F64,
    I32,
    I64,
    U8,
    U32,
    U64,
}

impl Format {
    pub const ALL: [Format; 7] = [
        Format::F32,
        Format::F64,
        Format::I32,
        Format::I64,
        Format::U8,
        Format::U32,
        Format::U64,
    ];

    /// The suffix used in paths (`f32`, `u8`, ...).
    pub fn suffix(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F64 => "f64",
            Format::I32 => "i32",
            Format::I64 => "i64",
            Format::U8 => "u8",
            Format::U32 => "u32",
            Format::U64 => "u64",
        }
    }

    pub fn from_suffix(s: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.suffix() == s)
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Format::U8 => 1,
            Format::F32 | Format::I32 | Format::U32 => 4,
            Format::F64 | Format::I64 | Format::U64 => 8,
        }
    }
}

/// Level of detail. Order matches libgetar's enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resolution {
    Text,
    Uniform,
    Individual,
}

/// A record without its index: what libgetar's `getRecordTypes()` lists.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordType {
    pub group: String,
    pub name: String,
    pub behavior: Behavior,
    pub format: Format,
    pub resolution: Resolution,
}

impl Ord for RecordType {
    fn cmp(&self, o: &Self) -> Ordering {
        // libgetar compares std::string with operator<, i.e. bytewise.
        self.group
            .as_bytes()
            .cmp(o.group.as_bytes())
            .then_with(|| self.name.as_bytes().cmp(o.name.as_bytes()))
            .then_with(|| self.behavior.cmp(&o.behavior))
            .then_with(|| self.format.cmp(&o.format))
            .then_with(|| self.resolution.cmp(&o.resolution))
    }
}

impl PartialOrd for RecordType {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl RecordType {
    /// The full file name part: `name.type.res`, or just `name` for text.
    pub fn file_name(&self) -> String {
        match self.resolution {
            Resolution::Text => self.name.clone(),
            Resolution::Uniform => format!("{}.{}.uni", self.name, self.format.suffix()),
            Resolution::Individual => format!("{}.{}.ind", self.name, self.format.suffix()),
        }
    }

    /// The path with `*` in place of the index (the plain path for constant
    /// records), as listings show it.
    pub fn pattern(&self) -> String {
        match self.behavior {
            Behavior::Constant => self.path_at(""),
            Behavior::Discrete | Behavior::Continuous => self.path_at("*"),
        }
    }

    /// The path of this record at `index` (ignored for constant records).
    pub fn path_at(&self, index: &str) -> String {
        let mut out = String::with_capacity(self.group.len() + self.name.len() + index.len() + 24);
        if !self.group.is_empty() {
            out.push_str(&self.group);
            out.push('/');
        }
        match self.behavior {
            Behavior::Constant => out.push_str(&self.file_name()),
            Behavior::Discrete => {
                out.push_str("frames/");
                out.push_str(index);
                out.push('/');
                out.push_str(&self.file_name());
            }
            Behavior::Continuous => {
                out.push_str("vars/");
                out.push_str(&self.file_name());
                out.push('/');
                out.push_str(index);
            }
        }
        out
    }
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.pattern(), self.behavior.name())
    }
}

/// A parsed record path: a record type plus its index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordPath {
    pub rtype: RecordType,
    /// Frame index for discrete/continuous records; empty for constant ones.
    pub index: String,
}

impl RecordPath {
    /// Parse a path exactly as libgetar's `Record(const string &path)` does.
    pub fn parse(path: &str) -> RecordPath {
        let dirs: Vec<&str> = path.split('/').collect();
        let n = dirs.len();
        let mut group = String::new();
        let push_group = |g: &mut String, d: &str| {
            if !g.is_empty() {
                g.push('/');
            }
            g.push_str(d);
        };
        // All but the last 3 segments of the path go into the group.
        for d in dirs.iter().take(n.saturating_sub(3)) {
            push_group(&mut group, d);
        }
        if n > 2 {
            if dirs[n - 3] == "frames" {
                let (name, format, resolution) = parse_name(dirs[n - 1]);
                return RecordPath {
                    rtype: RecordType {
                        group,
                        name,
                        behavior: Behavior::Discrete,
                        format,
                        resolution,
                    },
                    index: dirs[n - 2].to_string(),
                };
            } else if dirs[n - 3] == "vars" {
                let (name, format, resolution) = parse_name(dirs[n - 2]);
                return RecordPath {
                    rtype: RecordType {
                        group,
                        name,
                        behavior: Behavior::Continuous,
                        format,
                        resolution,
                    },
                    index: dirs[n - 1].to_string(),
                };
            }
        }
        // Neither frames/ nor vars/: everything but the last segment is group.
        for d in dirs
            .iter()
            .take(n.saturating_sub(1))
            .skip(n.saturating_sub(3))
        {
            push_group(&mut group, d);
        }
        let (name, format, resolution) = parse_name(dirs[n - 1]);
        RecordPath {
            rtype: RecordType {
                group,
                name,
                behavior: Behavior::Constant,
                format,
                resolution,
            },
            index: String::new(),
        }
    }

    /// Build the path string (libgetar's `Record::getPath`).
    pub fn to_path(&self) -> String {
        self.rtype.path_at(&self.index)
    }
}

/// Port of libgetar's `Record::processName`.
fn parse_name(name: &str) -> (String, Format, Resolution) {
    let pieces: Vec<&str> = name.split('.').collect();
    let n = pieces.len();
    let mut out = String::new();
    if n > 2 {
        for p in &pieces[..n - 3] {
            out.push_str(p);
            out.push('.');
        }
        out.push_str(pieces[n - 3]);
        let res = match pieces[n - 1] {
            "uni" => Some(Resolution::Uniform),
            "ind" => Some(Resolution::Individual),
            _ => None,
        };
        if let (Some(res), Some(fmt)) = (res, Format::from_suffix(pieces[n - 2])) {
            return (out, fmt, res);
        }
        out.push('.');
        out.push_str(pieces[n - 2]);
        out.push('.');
        out.push_str(pieces[n - 1]);
        (out, Format::U8, Resolution::Text)
    } else {
        (pieces.join("."), Format::U8, Resolution::Text)
    }
}

/// libgetar's `IndexCompare`: shorter strings first, then bytewise.
pub fn index_cmp(a: &str, b: &str) -> Ordering {
    a.len()
        .cmp(&b.len())
        .then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

/// A frame index string ordered by [`index_cmp`], for use as a map key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FrameIndex(pub String);

impl Ord for FrameIndex {
    fn cmp(&self, o: &Self) -> Ordering {
        index_cmp(&self.0, &o.0)
    }
}

impl PartialOrd for FrameIndex {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

// No `Borrow<str>`: `Borrow` requires the borrowed form to order like the
// key, and `str` orders bytewise while frame indices order shorter-first, so
// a `BTreeMap<FrameIndex, _>` looked up by `&str` misses keys ("10" vs "9").
// Look up with a `FrameIndex`.

/// Checks that `s` can be used as a frame index or a path component in a path
/// we build: non-empty, no `/`, no NUL, not `.` or `..`.
pub fn check_component(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if s == "." || s == ".." {
        return Err(format!("{what} {s:?} is not allowed"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| *c == '/' || *c == '\0' || c.is_control())
    {
        return Err(format!(
            "{what} {s:?} contains the forbidden character {c:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rp(path: &str) -> RecordPath {
        RecordPath::parse(path)
    }

    #[test]
    fn parses_the_three_behaviors() {
        let d = rp("keras/layer/0/weight/1/frames/12/weight.f32.uni");
        assert_eq!(d.rtype.group, "keras/layer/0/weight/1");
        assert_eq!(d.rtype.name, "weight");
        assert_eq!(d.rtype.behavior, Behavior::Discrete);
        assert_eq!(d.rtype.format, Format::F32);
        assert_eq!(d.rtype.resolution, Resolution::Uniform);
        assert_eq!(d.index, "12");

        let c = rp("metrics/vars/loss.f64.uni/100");
        assert_eq!(c.rtype.group, "metrics");
        assert_eq!(c.rtype.name, "loss");
        assert_eq!(c.rtype.behavior, Behavior::Continuous);
        assert_eq!(c.index, "100");

        let k = rp("keras/model.json");
        assert_eq!(k.rtype.group, "keras");
        assert_eq!(k.rtype.name, "model.json");
        assert_eq!(k.rtype.behavior, Behavior::Constant);
        assert_eq!(k.rtype.resolution, Resolution::Text);

        let s = rp("keras/layer/0/weight/1/shape.u32.uni");
        assert_eq!(s.rtype.group, "keras/layer/0/weight/1");
        assert_eq!(s.rtype.format, Format::U32);
        assert_eq!(s.rtype.behavior, Behavior::Constant);

        let top = rp("frames/0/position.f32.ind");
        assert_eq!(top.rtype.group, "");
        assert_eq!(top.rtype.resolution, Resolution::Individual);
    }

    #[test]
    fn odd_names_follow_libgetar() {
        // unknown type: whole name becomes a text record
        let r = rp("a.b.c.d");
        assert_eq!(r.rtype.name, "a.b.c.d");
        assert_eq!(r.rtype.resolution, Resolution::Text);
        let r = rp("x.f16.uni");
        assert_eq!(r.rtype.name, "x.f16.uni");
        assert_eq!(r.rtype.resolution, Resolution::Text);
        let r = rp("a.b.c.f32.uni");
        assert_eq!(r.rtype.name, "a.b.c");
        assert_eq!(r.rtype.format, Format::F32);
        // two segments: group is the first
        let r = rp("g/name.u8.ind");
        assert_eq!(r.rtype.group, "g");
        assert_eq!(r.to_path(), "g/name.u8.ind");
    }

    #[test]
    fn index_order_is_shorter_first() {
        let mut v = vec!["10", "9", "100", "a", "1", "09"];
        v.sort_by(|a, b| index_cmp(a, b));
        assert_eq!(v, vec!["1", "9", "a", "09", "10", "100"]);
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_\\-]{1,8}".prop_filter("reserved", |s| s != "frames" && s != "vars")
    }

    fn rtype() -> impl Strategy<Value = RecordType> {
        (
            prop::collection::vec(component(), 0..4),
            component(),
            0..3u8,
            0..7usize,
            0..3u8,
        )
            .prop_map(|(g, name, b, f, r)| RecordType {
                group: g.join("/"),
                name,
                behavior: [Behavior::Constant, Behavior::Discrete, Behavior::Continuous]
                    [b as usize],
                format: if r == 0 { Format::U8 } else { Format::ALL[f] },
                resolution: [
                    Resolution::Text,
                    Resolution::Uniform,
                    Resolution::Individual,
                ][r as usize],
            })
    }

    proptest! {
        #[test]
        fn build_then_parse_round_trips(rt in rtype(), idx in "[0-9a-z]{1,6}") {
            // A constant text record directly at top level with a one-segment
            // group is ambiguous in GETAR itself only when the name has no dot;
            // every well-formed record must round-trip.
            let index = if rt.behavior == Behavior::Constant { String::new() } else { idx };
            let p = RecordPath { rtype: rt, index };
            let parsed = RecordPath::parse(&p.to_path());
            prop_assert_eq!(parsed, p);
        }

        #[test]
        fn parse_then_build_is_a_fixed_point(s in "[a-z./0-9]{0,40}") {
            let once = RecordPath::parse(&s);
            let twice = RecordPath::parse(&once.to_path());
            prop_assert_eq!(once.to_path(), twice.to_path());
        }

        #[test]
        fn index_cmp_is_a_total_order_matching_the_rule(
            mut v in prop::collection::vec("[0-9a-c]{0,5}", 0..30)
        ) {
            v.sort_by(|a, b| index_cmp(a, b));
            for w in v.windows(2) {
                let (a, b) = (&w[0], &w[1]);
                prop_assert!(a.len() < b.len() || (a.len() == b.len() && a <= b));
            }
        }

        #[test]
        fn record_type_order_matches_field_order(a in rtype(), b in rtype()) {
            let key = |r: &RecordType| (r.group.clone(), r.name.clone(), r.behavior, r.format, r.resolution);
            prop_assert_eq!(a.cmp(&b), key(&a).cmp(&key(&b)));
        }
    }
}

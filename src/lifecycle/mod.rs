//! The lifecycle after the save, offline: compaction under keep policies,
//! snapshots, and exports of a frame to safetensors or npz.
//!
//! The format work (which entries to copy, how, the atomic replacement, the
//! committed prefix of a live archive) is in the `gtar` crate
//! ([`gtar::Exclusive`], [`gtar::CompactPlan`], [`gtar::Rewriter`],
//! [`gtar::snapshot`], [`gtar::select`]); this module adds what needs the
//! daemon's own layout: the facts a keep policy judges frames by (metric
//! values from `vars/` records, write times from manifests or DOS times),
//! the tensor names a user knows (dict keys, Keras layer and weight names),
//! and the command-line reports and progress bars.
//!
//! Invariants:
//! * nothing here modifies an archive except through `gtar` (compaction
//!   writes a new file and renames it over the old one, under the writer's
//!   lock); export and snapshot only read the source;
//! * a policy is judged before anything is written, and a policy that cannot
//!   be judged (unknown metric, unknown write times) is an error, not a drop;
//! * outputs (exports, snapshots) are written to a temporary file beside
//!   them, fsynced and renamed: a reader never sees half a file.

pub mod compact;
pub mod export;
pub mod facts;
pub mod live;
pub(crate) mod progress;
pub mod snapshot;

pub use progress::Progress;

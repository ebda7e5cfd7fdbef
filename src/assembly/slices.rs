//! Boxes inside row-major tensors: where a slice's bytes go in the global
//! tensor, whether two slices overlap, and which byte ranges of a stored
//! tensor a slice needs (for reading only those).
//!
//! Everything here counts in elements and is pure arithmetic: no I/O, no
//! allocation beyond the answer. All products are checked (a shape whose
//! element count overflows `u64` is refused before it gets here:
//! `layout::tensor_bytes`).

use std::fmt;

/// A box inside a tensor: `offsets` where it starts, `shape` its extent,
/// one entry per dimension. A scalar's only box has no dimensions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slice {
    pub offsets: Vec<u64>,
    pub shape: Vec<u64>,
}

impl fmt::Display for Slice {
    /// Python-style: `[0:4, 2:6]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (d, (o, n)) in self.offsets.iter().zip(&self.shape).enumerate() {
            if d > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{o}:{}", o + n)?;
        }
        write!(f, "]")
    }
}

/// One contiguous run of a slice's elements inside the global tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First element of the run in the global tensor (row-major).
    pub global: u64,
    /// First element of the run within the slice's own row-major order.
    pub local: u64,
    /// Elements in the run.
    pub len: u64,
}

impl Slice {
    /// The whole of a tensor of `shape`.
    pub fn whole(shape: &[u64]) -> Slice {
        Slice {
            offsets: vec![0; shape.len()],
            shape: shape.to_vec(),
        }
    }

    /// Elements in the box.
    pub fn elems(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Check that the box lies inside a tensor of `global` shape; the error
    /// says which dimension does not fit.
    pub fn check_in(&self, global: &[u64]) -> Result<(), String> {
        if self.offsets.len() != global.len() || self.shape.len() != global.len() {
            return Err(format!(
                "the slice has {} offsets and {} dimensions, the tensor {} dimensions",
                self.offsets.len(),
                self.shape.len(),
                global.len()
            ));
        }
        for (d, ((&o, &n), &g)) in self.offsets.iter().zip(&self.shape).zip(global).enumerate() {
            if o.checked_add(n).is_none_or(|end| end > g) {
                return Err(format!(
                    "dimension {d}: {o}:{} is outside 0:{g}",
                    o as u128 + n as u128
                ));
            }
        }
        Ok(())
    }

    /// Whether the two boxes (of one tensor) share an element.
    pub fn overlaps(&self, other: &Slice) -> bool {
        if self.elems() == 0 || other.elems() == 0 {
            return false;
        }
        self.offsets
            .iter()
            .zip(&self.shape)
            .zip(other.offsets.iter().zip(&other.shape))
            .all(|((&a, &n), (&b, &m))| a < b + m && b < a + n)
    }

    /// The box's elements as contiguous runs of a tensor of `global` shape,
    /// in the slice's own row-major order (which is also global order).
    /// The box must lie inside (see [`Slice::check_in`]).
    pub fn runs(&self, global: &[u64]) -> Runs {
        let nd = global.len();
        // `k`: the last dimension the box does not cover fully. Every
        // dimension after it is whole, so one run spans the box's extent
        // in `k` and everything after.
        let k = (0..nd)
            .rev()
            .find(|&d| self.offsets[d] != 0 || self.shape[d] != global[d])
            .unwrap_or(0);
        let mut strides = vec![1u64; nd];
        for d in (0..nd.saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * global[d + 1];
        }
        let len = if nd == 0 {
            1
        } else {
            self.shape[k..].iter().product()
        };
        let count = if self.elems() == 0 {
            0
        } else if nd == 0 {
            1
        } else {
            self.shape[..k].iter().product()
        };
        Runs {
            slice: self.clone(),
            strides,
            k,
            len,
            next: 0,
            count,
        }
    }
}

/// Iterator of [`Run`]s (see [`Slice::runs`]).
pub struct Runs {
    slice: Slice,
    strides: Vec<u64>,
    k: usize,
    len: u64,
    next: u64,
    count: u64,
}

#[cfg(test)]
impl Runs {
    /// Elements in each run.
    pub fn run_len(&self) -> u64 {
        self.len
    }

    /// Number of runs.
    pub fn runs_total(&self) -> u64 {
        self.count
    }
}

impl Iterator for Runs {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        if self.next >= self.count {
            return None;
        }
        let r = self.next;
        self.next += 1;
        let s = &self.slice;
        if s.shape.is_empty() {
            return Some(Run {
                global: 0,
                local: 0,
                len: 1,
            });
        }
        // Unravel `r` over the dimensions before `k` (row-major).
        let mut rest = r;
        let mut global = s.offsets[self.k] * self.strides[self.k];
        for d in (0..self.k).rev() {
            let i = rest % s.shape[d];
            rest /= s.shape[d];
            global += (s.offsets[d] + i) * self.strides[d];
        }
        Some(Run {
            global,
            local: r * self.len,
            len: self.len,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sl(offsets: &[u64], shape: &[u64]) -> Slice {
        Slice {
            offsets: offsets.to_vec(),
            shape: shape.to_vec(),
        }
    }

    /// The global indices of a box's elements, element by element.
    pub(crate) fn naive(s: &Slice, global: &[u64]) -> Vec<u64> {
        let mut out = Vec::new();
        let n = s.elems();
        for e in 0..n {
            let mut rest = e;
            let mut g = 0;
            let mut stride = 1;
            for d in (0..global.len()).rev() {
                let i = rest % s.shape[d];
                rest /= s.shape[d];
                g += (s.offsets[d] + i) * stride;
                stride *= global[d];
            }
            out.push(g);
        }
        out
    }

    fn expand(s: &Slice, global: &[u64]) -> Vec<u64> {
        let mut out = Vec::new();
        for r in s.runs(global) {
            assert_eq!(r.local, out.len() as u64, "runs come in the slice's order");
            out.extend(r.global..r.global + r.len);
        }
        out
    }

    #[test]
    fn runs_match_element_by_element_placement() {
        let global = [4u64, 6, 5];
        let cases = [
            sl(&[0, 0, 0], &[4, 6, 5]),
            sl(&[1, 0, 0], &[2, 6, 5]),
            sl(&[0, 2, 0], &[4, 3, 5]),
            sl(&[0, 0, 1], &[4, 6, 3]),
            sl(&[3, 5, 4], &[1, 1, 1]),
            sl(&[1, 1, 1], &[2, 4, 3]),
            sl(&[0, 0, 0], &[0, 6, 5]),
        ];
        for s in cases {
            s.check_in(&global).unwrap();
            assert_eq!(expand(&s, &global), naive(&s, &global), "{s}");
        }
        // Rows of a matrix are one run; a column block is a run per row.
        assert_eq!(sl(&[2, 0], &[3, 8]).runs(&[8, 8]).runs_total(), 1);
        let cols = sl(&[0, 4], &[8, 4]).runs(&[8, 8]);
        assert_eq!((cols.runs_total(), cols.run_len()), (8, 4));
        // A scalar is one run of one element.
        let sc = Slice::whole(&[]);
        assert_eq!(expand(&sc, &[]), vec![0]);
    }

    #[test]
    fn boxes_outside_or_of_the_wrong_rank_are_named() {
        let e = sl(&[0, 5], &[2, 4]).check_in(&[2, 8]).unwrap_err();
        assert!(e.contains("dimension 1: 5:9 is outside 0:8"), "{e}");
        let e = sl(&[0], &[2]).check_in(&[2, 8]).unwrap_err();
        assert!(e.contains("1 dimensions, the tensor 2"), "{e}");
        assert!(sl(&[u64::MAX], &[2]).check_in(&[4]).is_err());
    }

    #[test]
    fn overlap_needs_every_dimension_to_intersect() {
        let a = sl(&[0, 0], &[4, 4]);
        assert!(a.overlaps(&sl(&[3, 3], &[2, 2])));
        assert!(!a.overlaps(&sl(&[4, 0], &[2, 4])));
        assert!(!a.overlaps(&sl(&[0, 4], &[4, 4])));
        assert!(
            !a.overlaps(&sl(&[1, 1], &[0, 2])),
            "empty boxes overlap nothing"
        );
        assert_eq!(sl(&[0, 2], &[4, 2]).to_string(), "[0:4, 2:4]");
    }
}

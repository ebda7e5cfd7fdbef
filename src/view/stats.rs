//! Exact statistics of one tensor, and of two versions of one tensor.
//!
//! Definitions (the web page and its tests rely on them):
//! - Every element is converted to `f64` first (f16 and bf16 exactly through
//!   `half`, integers and bool as their values; i64/u64 beyond 2^53 round),
//!   and every sum is taken in `f64`.
//! - NaN, +Inf and -Inf are counted (`nan`, `pos_inf`, `neg_inf`) and left out
//!   of every other statistic, so one NaN does not blank a curve; `zeros` is
//!   the fraction of *all* elements equal to zero (`-0.0` included).
//! - `std` is the population standard deviation (numpy's default `ddof=0`),
//!   computed in two passes; `l2` is `sqrt(Σ x²)` of the finite elements.
//! - Percentiles at [`PERCENTILES`] use numpy's default method, `'linear'`
//!   (Hyndman & Fan type 7): with the finite values sorted, `h = (n-1)·p/100`,
//!   the answer is `lerp(v[⌊h⌋], v[⌊h⌋+1], h-⌊h⌋)` computed as numpy's
//!   `_lerp` does (from the upper end when the fraction is ≥ 0.5), so it equals
//!   `np.percentile(a[np.isfinite(a)].astype(np.float64), PERCENTILES)`.
//!   Found by selection, not a full sort: O(n) per percentile.
//! - The histogram has [`HIST_BINS`] equal bins over `[min, max]` of the
//!   finite values, the last bin closed, exactly as `np.histogram(x, bins=64)`
//!   bins them (its edge corrections included); when `min == max` the range
//!   is `[min - 0.5, max + 0.5]`, as numpy's.
//! - [`pair`] compares two versions of a tensor with the same dtype and
//!   element count, element by element: `‖a − b‖₂` and `max |a − b|` over the
//!   elements finite in both, the dot product (for cosines), and the fraction
//!   of elements whose stored bytes differ.

use serde::{Deserialize, Serialize};

use crate::layout::DType;

/// The percentiles kept per frame (TensorBoard's distribution bands).
pub const PERCENTILES: [f64; 9] = [0.0, 7.0, 16.0, 31.0, 50.0, 69.0, 84.0, 93.0, 100.0];
/// Bins of the per-frame histogram.
pub const HIST_BINS: usize = 64;

/// One tensor's statistics (module docs for the definitions). Options are
/// `None` when the tensor has no finite element.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorStats {
    pub count: u64,
    pub nan: u64,
    pub pos_inf: u64,
    pub neg_inf: u64,
    pub zeros: f64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
    pub std: Option<f64>,
    pub l2: f64,
    /// At [`PERCENTILES`]; empty without finite elements.
    pub percentiles: Vec<f64>,
    /// `[lo, hi]` of the histogram's range.
    pub hist_range: Option<[f64; 2]>,
    /// [`HIST_BINS`] counts; empty without finite elements.
    pub hist: Vec<u64>,
}

/// Two versions of one tensor compared (module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairStats {
    pub diff_l2: f64,
    pub max_abs_diff: Option<f64>,
    pub dot: f64,
    pub changed: f64,
}

/// Why bytes cannot be read as a tensor of a dtype.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{len} bytes are not a whole number of {dtype} elements ({item} bytes each)")]
pub struct BadLength {
    len: usize,
    dtype: &'static str,
    item: usize,
}

/// The elements of `bytes` (little-endian, as stored) as `f64`.
pub fn decode(dtype: DType, bytes: &[u8]) -> Result<Vec<f64>, BadLength> {
    let (item, _) = dtype.storage();
    if !bytes.len().is_multiple_of(item) {
        return Err(BadLength {
            len: bytes.len(),
            dtype: dtype.name(),
            item,
        });
    }
    macro_rules! conv {
        ($n:literal, $f:expr) => {
            bytes
                .chunks_exact($n)
                .map(|c| {
                    let a: [u8; $n] = c.try_into().unwrap();
                    #[allow(clippy::redundant_closure_call)]
                    $f(a)
                })
                .collect()
        };
    }
    Ok(match dtype {
        DType::F32 => conv!(4, |a| f32::from_le_bytes(a) as f64),
        DType::F64 => conv!(8, f64::from_le_bytes),
        DType::I32 => conv!(4, |a| i32::from_le_bytes(a) as f64),
        DType::I64 => conv!(8, |a| i64::from_le_bytes(a) as f64),
        DType::U32 => conv!(4, |a| u32::from_le_bytes(a) as f64),
        DType::U64 => conv!(8, |a| u64::from_le_bytes(a) as f64),
        DType::I16 => conv!(2, |a| i16::from_le_bytes(a) as f64),
        DType::U16 => conv!(2, |a| u16::from_le_bytes(a) as f64),
        DType::F16 => conv!(2, |a| half::f16::from_le_bytes(a).to_f64()),
        DType::BF16 => conv!(2, |a| half::bf16::from_le_bytes(a).to_f64()),
        DType::U8 => bytes.iter().map(|&b| b as f64).collect(),
        DType::I8 => bytes.iter().map(|&b| b as i8 as f64).collect(),
        // numpy's bool is one byte, any non-zero is True.
        DType::Bool => bytes.iter().map(|&b| (b != 0) as u8 as f64).collect(),
    })
}

/// numpy's `_lerp`: `a + (b-a)·t`, from the upper end when `t ≥ 0.5`.
fn lerp(a: f64, b: f64, t: f64) -> f64 {
    let d = b - a;
    if t >= 0.5 {
        b - d * (1.0 - t)
    } else {
        a + d * t
    }
}

/// numpy's 'linear' percentiles of `v` (finite, any order; reordered).
pub fn percentiles(v: &mut [f64], ps: &[f64]) -> Vec<f64> {
    let n = v.len();
    if n == 0 {
        return Vec::new();
    }
    let at: Vec<(usize, usize, f64)> = ps
        .iter()
        .map(|p| {
            let h = (p / 100.0) * (n - 1) as f64;
            let lo = (h.floor() as usize).min(n - 1);
            ((lo), (lo + 1).min(n - 1), h - lo as f64)
        })
        .collect();
    let mut ranks: Vec<usize> = at.iter().flat_map(|&(a, b, _)| [a, b]).collect();
    ranks.sort_unstable();
    ranks.dedup();
    // Select the ranks in increasing order, each among the elements right
    // of the last one selected (all of them larger or equal), which leaves
    // everything up to that one in place: afterwards v[r] is the r-th
    // smallest for every rank r selected.
    let mut start = 0;
    for &r in &ranks {
        v[start..].select_nth_unstable_by(r - start, f64::total_cmp);
        start = r + 1;
    }
    at.iter().map(|&(a, b, t)| lerp(v[a], v[b], t)).collect()
}

/// numpy's `histogram(x, bins, range=(lo, hi))` counts (`lo < hi`).
fn histogram(v: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<u64> {
    // np.linspace(lo, hi, bins + 1): i·step + lo, the last edge exactly hi.
    let step = (hi - lo) / bins as f64;
    let edge = |i: usize| {
        if i == bins {
            hi
        } else {
            i as f64 * step + lo
        }
    };
    let norm = bins as f64 / (hi - lo);
    let mut counts = vec![0u64; bins];
    for &x in v {
        let mut i = ((x - lo) * norm) as i64;
        if i >= bins as i64 {
            i = bins as i64 - 1;
        }
        let mut i = i.max(0) as usize;
        // numpy's corrections for rounding at the edges.
        if x < edge(i) {
            i = i.saturating_sub(1);
        } else if i != bins - 1 && x >= edge(i + 1) {
            i += 1;
        }
        counts[i] += 1;
    }
    counts
}

/// The statistics of a tensor of `dtype` stored as `bytes`.
pub fn tensor(dtype: DType, bytes: &[u8]) -> Result<TensorStats, BadLength> {
    let all = decode(dtype, bytes)?;
    Ok(of_values(all))
}

/// The statistics of these values (module docs).
pub fn of_values(mut v: Vec<f64>) -> TensorStats {
    let count = v.len() as u64;
    let (mut nan, mut pos_inf, mut neg_inf, mut zeros) = (0u64, 0u64, 0u64, 0u64);
    for &x in &v {
        if x.is_nan() {
            nan += 1;
        } else if x == f64::INFINITY {
            pos_inf += 1;
        } else if x == f64::NEG_INFINITY {
            neg_inf += 1;
        } else if x == 0.0 {
            zeros += 1;
        }
    }
    v.retain(|x| x.is_finite());
    let n = v.len();
    let zeros = if count == 0 {
        0.0
    } else {
        zeros as f64 / count as f64
    };
    if n == 0 {
        return TensorStats {
            count,
            nan,
            pos_inf,
            neg_inf,
            zeros,
            min: None,
            max: None,
            mean: None,
            std: None,
            l2: 0.0,
            percentiles: Vec::new(),
            hist_range: None,
            hist: Vec::new(),
        };
    }
    let (mut min, mut max, mut sum, mut sq) = (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0.0);
    for &x in &v {
        min = min.min(x);
        max = max.max(x);
        sum += x;
        sq += x * x;
    }
    let mean = sum / n as f64;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
    let (lo, hi) = if min == max {
        (min - 0.5, max + 0.5)
    } else {
        (min, max)
    };
    let hist = histogram(&v, lo, hi, HIST_BINS);
    let percentiles = percentiles(&mut v, &PERCENTILES);
    TensorStats {
        count,
        nan,
        pos_inf,
        neg_inf,
        zeros,
        min: Some(min),
        max: Some(max),
        mean: Some(mean),
        std: Some(var.sqrt()),
        l2: sq.sqrt(),
        percentiles,
        hist_range: Some([lo, hi]),
        hist,
    }
}

/// `a` (the newer) against `b`, both of `dtype`; `None` when their lengths
/// differ (a reshaped tensor has no element-wise difference).
pub fn pair(dtype: DType, a: &[u8], b: &[u8]) -> Result<Option<PairStats>, BadLength> {
    if a.len() != b.len() {
        return Ok(None);
    }
    let (item, _) = dtype.storage();
    let va = decode(dtype, a)?;
    let vb = decode(dtype, b)?;
    let changed = a
        .chunks_exact(item)
        .zip(b.chunks_exact(item))
        .filter(|(x, y)| x != y)
        .count();
    let (mut d2, mut dot, mut maxd) = (0.0f64, 0.0f64, None::<f64>);
    for (&x, &y) in va.iter().zip(&vb) {
        if x.is_finite() && y.is_finite() {
            let d = x - y;
            d2 += d * d;
            dot += x * y;
            maxd = Some(maxd.map_or(d.abs(), |m| m.max(d.abs())));
        }
    }
    Ok(Some(PairStats {
        diff_l2: d2.sqrt(),
        max_abs_diff: maxd,
        dot,
        changed: if va.is_empty() {
            0.0
        } else {
            changed as f64 / va.len() as f64
        },
    }))
}

/// `‖a − b‖ / ‖a‖` (None when `‖a‖` is 0).
pub fn update_ratio(p: &PairStats, newer: &TensorStats) -> Option<f64> {
    (newer.l2 > 0.0).then(|| p.diff_l2 / newer.l2)
}

/// `a·b / (‖a‖ ‖b‖)` (None when either norm is 0).
pub fn cosine(p: &PairStats, a: &TensorStats, b: &TensorStats) -> Option<f64> {
    (a.l2 > 0.0 && b.l2 > 0.0).then(|| p.dot / (a.l2 * b.l2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn percentiles_match_numpy_linear() {
        // np.percentile(np.arange(10.), [0,7,16,31,50,69,84,93,100])
        let mut v: Vec<f64> = (0..10).rev().map(|x| x as f64).collect();
        let p = percentiles(&mut v, &PERCENTILES);
        let want = [0.0, 0.63, 1.44, 2.79, 4.5, 6.21, 7.56, 8.37, 9.0];
        for (g, w) in p.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{p:?}");
        }
        // One element: every percentile is it.
        assert_eq!(percentiles(&mut [3.5], &[0.0, 50.0, 100.0]), [3.5; 3]);
        assert!(percentiles(&mut [], &[50.0]).is_empty());
    }

    #[test]
    fn percentiles_equal_a_full_sort() {
        // Pseudo-random values with ties; the percentiles by selection must
        // equal those of a full sort, for every length.
        let mut x = 0x9e3779b97f4a7c15u64;
        for n in 1..300 {
            let v: Vec<f64> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x % 1000) as f64 - 500.0) / 7.0
                })
                .collect();
            let mut sorted = v.clone();
            sorted.sort_by(f64::total_cmp);
            let want: Vec<f64> = PERCENTILES
                .iter()
                .map(|p| {
                    let h = (p / 100.0) * (n - 1) as f64;
                    let lo = h.floor() as usize;
                    lerp(sorted[lo], sorted[(lo + 1).min(n - 1)], h - lo as f64)
                })
                .collect();
            assert_eq!(percentiles(&mut v.clone(), &PERCENTILES), want, "n = {n}");
        }
    }

    #[test]
    fn basic_stats_and_non_finite() {
        let b = f32s(&[
            1.0,
            -2.0,
            0.0,
            f32::NAN,
            f32::INFINITY,
            3.0,
            -0.0,
            f32::NEG_INFINITY,
        ]);
        let s = tensor(DType::F32, &b).unwrap();
        assert_eq!((s.count, s.nan, s.pos_inf, s.neg_inf), (8, 1, 1, 1));
        assert_eq!(s.zeros, 2.0 / 8.0);
        assert_eq!(s.min, Some(-2.0));
        assert_eq!(s.max, Some(3.0));
        assert_eq!(s.mean, Some(2.0 / 5.0));
        let var = [1.0f64, -2.0, 0.0, 3.0, 0.0]
            .iter()
            .map(|x| (x - 0.4) * (x - 0.4))
            .sum::<f64>()
            / 5.0;
        assert_eq!(s.std, Some(var.sqrt()));
        assert_eq!(s.l2, 14f64.sqrt());
        assert_eq!(s.hist.iter().sum::<u64>(), 5);
        assert_eq!(s.hist[0], 1);
        assert_eq!(s.hist[HIST_BINS - 1], 1, "the last bin is closed");
    }

    #[test]
    fn all_nan_and_empty() {
        let s = tensor(DType::F32, &f32s(&[f32::NAN; 3])).unwrap();
        assert_eq!((s.nan, s.min, s.l2), (3, None, 0.0));
        assert!(s.hist.is_empty() && s.percentiles.is_empty());
        let e = tensor(DType::F64, &[]).unwrap();
        assert_eq!((e.count, e.zeros), (0, 0.0));
    }

    #[test]
    fn constant_tensor_histogram_like_numpy() {
        // np.histogram([2., 2.], bins=64): range (1.5, 2.5), both in bin 32.
        let s = of_values(vec![2.0, 2.0]);
        assert_eq!(s.hist_range, Some([1.5, 2.5]));
        assert_eq!(s.hist[32], 2);
        assert_eq!(s.std, Some(0.0));
    }

    #[test]
    fn dtypes_decode_exactly() {
        let h = [half::f16::from_f32(1.5), half::f16::from_f32(-0.25)];
        let hb: Vec<u8> = h.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(decode(DType::F16, &hb).unwrap(), [1.5, -0.25]);
        let bf = [half::bf16::from_f32(3.0), half::bf16::from_f32(f32::NAN)];
        let bb: Vec<u8> = bf.iter().flat_map(|x| x.to_le_bytes()).collect();
        let s = tensor(DType::BF16, &bb).unwrap();
        assert_eq!((s.min, s.nan), (Some(3.0), 1));
        assert_eq!(decode(DType::I8, &[255, 1]).unwrap(), [-1.0, 1.0]);
        assert_eq!(decode(DType::U8, &[255, 1]).unwrap(), [255.0, 1.0]);
        assert_eq!(decode(DType::Bool, &[0, 7]).unwrap(), [0.0, 1.0]);
        let i: Vec<u8> = [-3i64, 5].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(decode(DType::I64, &i).unwrap(), [-3.0, 5.0]);
        let u: Vec<u8> = [7u16, 9].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(decode(DType::U16, &u).unwrap(), [7.0, 9.0]);
        assert_eq!(
            decode(DType::F32, &[0, 0, 0]),
            Err(BadLength {
                len: 3,
                dtype: "float32",
                item: 4
            })
        );
    }

    #[test]
    fn pairs() {
        let a = f32s(&[1.0, 2.0, 3.0, f32::NAN]);
        let b = f32s(&[1.0, 0.0, 3.0, f32::NAN]);
        let p = pair(DType::F32, &a, &b).unwrap().unwrap();
        assert_eq!(p.diff_l2, 2.0);
        assert_eq!(p.max_abs_diff, Some(2.0));
        assert_eq!(p.dot, 10.0);
        // NaN with the same payload is unchanged bytes.
        assert_eq!(p.changed, 0.25);
        let sa = tensor(DType::F32, &a).unwrap();
        let sb = tensor(DType::F32, &b).unwrap();
        assert_eq!(update_ratio(&p, &sa), Some(2.0 / 14f64.sqrt()));
        let c = cosine(&p, &sa, &sb).unwrap();
        assert!((c - 10.0 / (14f64.sqrt() * 10f64.sqrt())).abs() < 1e-15);
        assert_eq!(pair(DType::F32, &a, &a[..8]).unwrap(), None);
    }
}

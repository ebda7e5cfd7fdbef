//! What every benchmark here prints with: its knobs from the environment,
//! the median of its rounds and the rounds themselves.

#![allow(dead_code)] // each bench uses what it needs

/// `k` from the environment as a number, else `default`.
pub fn env_u64(k: &str, default: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median (of an even count: the mean of the middle two).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The rounds, for the summary line: "0.91, 1.02, …".
pub fn list(xs: &[f64]) -> String {
    xs.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

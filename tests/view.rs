//! `gtar-logd view` end to end: the real binary against the real daemon on a
//! temp socket, and offline on the archive file it wrote. Checks the token
//! (401 without it, the cookie with it), that every statistic equals an
//! independent computation here (full sort for the percentiles, plain loops
//! for the rest), that statistics are kept across a restart of the view, that
//! a new frame appears while the view runs, that offline names are confined
//! to the files given, that each frame's state (durable, replicated) is the
//! daemon's, and that an archive fetched from S3 is viewed with no daemon.

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/s3.rs"]
mod s3;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use daemon::*;
use gtar_logd_client::blocking::Client;
use gtar_logd_client::half::f16;
use gtar_logd_client::ndarray::{Array1, Array2};
use gtar_logd_client::{NewFrame, OpenOptions};
use serde_json::Value;

/// `gtar-logd view ARGS` as a child, with its URL.
struct View {
    proc: Child,
    port: u16,
    token: String,
}

impl View {
    fn start(args: &[&str], env: &[(&str, &Path)]) -> View {
        let mut cmd = Command::new(daemon_bin());
        cmd.arg("view")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = cmd.spawn().expect("start gtar-logd view");
        let mut out = BufReader::new(proc.stdout.take().unwrap());
        let mut url = String::new();
        // The URL is the line with the token; the first names the source.
        for _ in 0..2 {
            url.clear();
            if out.read_line(&mut url).unwrap() == 0 {
                panic!("gtar-logd view exited: {:?}", proc.wait());
            }
        }
        let url = url.trim();
        let rest = url
            .strip_prefix("http://127.0.0.1:")
            .unwrap_or_else(|| panic!("not a loopback URL: {url}"));
        let (port, token) = rest.split_once("/?token=").unwrap();
        View {
            proc,
            port: port.parse().unwrap(),
            token: token.to_string(),
        }
    }

    /// GET `path` with optional extra headers: (status, headers, body).
    fn get_with(&self, path: &str, headers: &str) -> (u16, String, Vec<u8>) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&resp[..split]).to_string();
        let status = head[9..12].parse().unwrap();
        (status, head, resp[split + 4..].to_vec())
    }

    fn get(&self, path: &str) -> (u16, String, Vec<u8>) {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.get_with(&format!("{path}{sep}token={}", self.token), "")
    }

    fn json(&self, path: &str) -> Value {
        let (st, _, body) = self.get(path);
        let v: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("{path}: {st} {}", String::from_utf8_lossy(&body)));
        assert_eq!(st, 200, "{path}: {v}");
        v
    }
}

impl Drop for View {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

fn q(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The weights of frame `i`: deterministic, with zeros, a NaN in frame 2.
fn weights(i: usize) -> Array2<f32> {
    Array2::from_shape_fn((8, 16), |(r, c)| {
        let x = ((r * 16 + c) as f32 * 0.37 + i as f32 * 1.3).sin() * (1.0 + i as f32 * 0.1);
        if (r + c + i).is_multiple_of(7) {
            0.0
        } else if i == 2 && r == 3 && c == 3 {
            f32::NAN
        } else {
            x
        }
    })
}

fn write_frames(c: &Client, archive: &str, from: usize, to: usize) {
    let mut w = c.writer(archive, OpenOptions::append()).unwrap();
    for i in from..to {
        let wt = weights(i);
        let h = Array1::from_shape_fn(5, |k| f16::from_f32(k as f32 * 0.5 - i as f32));
        let frame = NewFrame::new(i.to_string())
            .tensor("dense", "kernel", &wt)
            .tensor("dense", "bias", &h)
            .scalar("metrics/epoch", "loss", 1.0 / (i as f64 + 1.0));
        w.write(frame).unwrap().durable().unwrap();
    }
    w.close().unwrap();
}

/// numpy's percentile, method 'linear', by a full sort.
fn np_percentile(sorted: &[f64], p: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * (p / 100.0);
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (h - lo as f64)
}

fn close(a: f64, b: &Value, what: &str) {
    let b = b
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: {b} is not a number"));
    assert!(
        (a - b).abs() <= 1e-9 * a.abs().max(1e-300) + 1e-12,
        "{what}: expected {a}, the view says {b}"
    );
}

/// Every statistic of `dense/kernel` the view reports, against this file's
/// own computation from the arrays written.
fn check_kernel_stats(v: &View, name: &str, frames: usize) {
    let t = v.json(&format!("/api/tensor?name={}&id=dense/kernel", q(name)));
    let got: Vec<&str> = t["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..frames).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    assert_eq!(t["dtype"], "float32");
    for i in 0..frames {
        let s = &t["stats"][i];
        let w: Vec<f64> = weights(i).iter().map(|&x| x as f64).collect();
        let fin: Vec<f64> = w.iter().copied().filter(|x| x.is_finite()).collect();
        let mut sorted = fin.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = fin.len() as f64;
        let mean = fin.iter().sum::<f64>() / n;
        let std = (fin.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        let l2 = fin.iter().map(|x| x * x).sum::<f64>().sqrt();
        let what = |k: &str| format!("frame {i} {k}");
        assert_eq!(s["count"], 128, "{}", what("count"));
        assert_eq!(s["nan"], if i == 2 { 1 } else { 0 }, "{}", what("nan"));
        let zeros = w.iter().filter(|&&x| x == 0.0).count() as f64 / 128.0;
        close(zeros, &s["zeros"], &what("zeros"));
        close(sorted[0], &s["min"], &what("min"));
        close(*sorted.last().unwrap(), &s["max"], &what("max"));
        close(mean, &s["mean"], &what("mean"));
        close(std, &s["std"], &what("std"));
        close(l2, &s["l2"], &what("l2"));
        for (k, p) in [0.0, 7.0, 16.0, 31.0, 50.0, 69.0, 84.0, 93.0, 100.0]
            .iter()
            .enumerate()
        {
            close(
                np_percentile(&sorted, *p),
                &s["percentiles"][k],
                &what(&format!("p{p}")),
            );
        }
        let hist: u64 = s["hist"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum();
        assert_eq!(hist, fin.len() as u64, "{}", what("histogram total"));
        if i == 0 {
            assert!(s["update_ratio"].is_null() && s["cos_first"].is_null());
            continue;
        }
        let prev: Vec<f64> = weights(i - 1).iter().map(|&x| x as f64).collect();
        let first: Vec<f64> = weights(0).iter().map(|&x| x as f64).collect();
        let both = |o: &[f64]| -> (f64, f64) {
            let (mut d2, mut dot) = (0.0, 0.0);
            for (a, b) in w.iter().zip(o) {
                if a.is_finite() && b.is_finite() {
                    d2 += (a - b) * (a - b);
                    dot += a * b;
                }
            }
            (d2.sqrt(), dot)
        };
        let norm = |o: &[f64]| {
            o.iter()
                .filter(|x| x.is_finite())
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt()
        };
        let (d_prev, dot_prev) = both(&prev);
        let (_, dot_first) = both(&first);
        close(d_prev / l2, &s["update_ratio"], &what("update ratio"));
        close(
            dot_prev / (l2 * norm(&prev)),
            &s["cos_prev"],
            &what("cos prev"),
        );
        close(
            dot_first / (l2 * norm(&first)),
            &s["cos_first"],
            &what("cos first"),
        );
    }
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn view_of_the_daemon_and_offline() {
    let root = temp_root("view");
    let data = root.path().join("data");
    let sock = root.path().join("d.sock");
    let cache = root.path().join("cache");
    let mut d = ChildDaemon::spawn(&data, &sock, None, &root.path().join("daemon.log"));
    let addr = format!("unix:{}", sock.display());
    let c = Client::connect(&addr).unwrap();
    let name = "runs/v.zip";
    write_frames(&c, name, 0, 4);

    // What the view keys its cache with over the daemon: GetFrame
    // `headers_only` gives each tensor's header with the CRC-32 of its
    // bytes (from the central directory), and sends no bytes.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (index, headers) = rt.block_on(async {
        let a = gtar_logd_client::Client::connect(&addr).await.unwrap();
        a.frame_headers(name, "1").await.unwrap()
    });
    drop(rt);
    assert_eq!(index, "1");
    let f = c.get_frame(name, "1").unwrap();
    assert_eq!(headers.len(), f.tensors.len());
    for (h, t) in headers.iter().zip(&f.tensors) {
        let bytes = t.array.to_le_bytes();
        assert_eq!(h.path, t.path);
        assert_eq!(h.size_bytes, bytes.len() as u64, "{}", h.path);
        assert_eq!(h.crc32, crc32fast::hash(&bytes), "{}", h.path);
    }

    let env = [("XDG_CACHE_HOME", cache.as_path())];
    let v = View::start(&["--address", &addr], &env);

    // The token: every route answers 401 without it or with a wrong one.
    for p in [
        "/",
        "/assets/app.js",
        "/api/archives",
        "/api/tensor?name=runs/v.zip&id=dense/kernel",
    ] {
        let (st, _, _) = v.get_with(p, "");
        assert_eq!(st, 401, "{p} without a token");
        let (st, _, _) = v.get_with(
            &format!("{p}{}token=0123", if p.contains('?') { '&' } else { '?' }),
            "",
        );
        assert_eq!(st, 401, "{p} with a wrong token");
        let (st, _, _) = v.get_with(p, &format!("Cookie: gtar_logd_view_{}=nope\r\n", v.port));
        assert_eq!(st, 401, "{p} with a wrong cookie");
    }
    let (st, head, body) = v.get("/");
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&body).contains("assets/app.js"));
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("the token sets a cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    let (st, _, _) = v.get_with("/api/archives", &format!("Cookie: {pair}\r\n"));
    assert_eq!(st, 200, "the cookie alone lets the page in");

    // Assets are embedded and the page stays small.
    let total: usize = [
        "/",
        "/assets/app.js",
        "/assets/app.css",
        "/assets/uPlot.iife.min.js",
        "/assets/uPlot.min.css",
    ]
    .iter()
    .map(|p| {
        let (st, _, b) = v.get(p);
        assert_eq!(st, 200, "{p}");
        b.len()
    })
    .sum();
    assert!(total < 300_000, "page weight {total} bytes");

    let list = v.json("/api/archives");
    let row = &list["archives"][0];
    assert_eq!(row["name"], name);
    assert_eq!(row["frames"], 4);
    assert_eq!(
        (row["first"].as_str(), row["last"].as_str()),
        (Some("0"), Some("3"))
    );

    // Every frame was acked durable; no remote, so replication is unset.
    assert_eq!(states(&v, name), [(Some(true), None); 4]);
    let a = v.json(&format!("/api/archive?name={}", q(name)));
    let loss = a["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "loss")
        .expect("the loss metric");
    assert_eq!(loss["group"], "metrics/epoch");
    assert_eq!(loss["steps"], serde_json::json!(["0", "1", "2", "3"]));
    for i in 0..4 {
        close(1.0 / (i as f64 + 1.0), &loss["values"][i], "loss");
    }
    check_kernel_stats(&v, name, 4);
    let t = v.json(&format!("/api/tensor?name={}&id=dense/bias", q(name)));
    assert_eq!(t["dtype"], "float16");
    close(-3.0, &t["stats"][3]["min"], "f16 min");
    close(-1.0, &t["stats"][3]["max"], "f16 max");

    // A frame: its tensors, a .npy download, a diff.
    let f = v.json(&format!("/api/frame?name={}&frame=1", q(name)));
    assert_eq!(f["tensors"].as_array().unwrap().len(), 2);
    let (st, head, npy) = v.get(&format!(
        "/api/npy?name={}&frame=1&id=dense/kernel",
        q(name)
    ));
    assert_eq!(st, 200);
    assert!(head.contains("attachment"));
    assert!(npy.starts_with(b"\x93NUMPY"));
    let raw: Vec<u8> = weights(1).iter().flat_map(|x| x.to_le_bytes()).collect();
    assert!(npy.ends_with(&raw), "the .npy holds the stored bytes");
    let df = v.json(&format!("/api/diff?name={}&a=3&b=1", q(name)));
    let k = df["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "dense/kernel")
        .unwrap();
    let (w3, w1) = (weights(3), weights(1));
    let mut mx = 0f64;
    let mut d2 = 0f64;
    for (a, b) in w3.iter().zip(w1.iter()) {
        let (a, b) = (*a as f64, *b as f64);
        mx = mx.max((a - b).abs());
        d2 += (a - b) * (a - b);
    }
    close(d2.sqrt(), &k["diff_l2"], "diff l2");
    close(mx, &k["max_abs_diff"], "max |diff|");

    let layers = v.json(&format!("/api/layers?name={}", q(name)));
    assert_eq!(layers["frames"].as_array().unwrap().len(), 4);
    assert!(layers["update_ratio"][0][0].is_null());

    // Live: a frame written now shows up within 2 s.
    let t0 = Instant::now();
    write_frames(&c, name, 4, 5);
    wait_for(
        "frame 4 on the archive page",
        Duration::from_secs(2),
        || {
            let a = v.json(&format!("/api/archive?name={}", q(name)));
            a["frames"].as_array().unwrap().len() == 5
        },
    );
    eprintln!("new frame visible after {:?}", t0.elapsed());
    check_kernel_stats(&v, name, 5);

    // Names are confined as for any RPC: outside the data dir is refused,
    // an unknown archive is not found.
    let (st, _, body) = v.get("/api/archive?name=..%2F..%2Fetc%2Fpasswd");
    assert!(
        st == 400 || st == 403,
        "{st} {}",
        String::from_utf8_lossy(&body)
    );
    let (st, _, _) = v.get("/api/archive?name=runs%2Fnone.zip");
    assert_eq!(st, 404);
    drop(v);

    // A restart of the view computes nothing again: the cache is kept.
    let v = View::start(&["--address", &addr], &env);
    let t = v.json(&format!("/api/tensor?name={}&id=dense/kernel", q(name)));
    assert_eq!(
        t["computed"], 0,
        "statistics computed again after a restart"
    );
    drop(v);

    // Offline, after the daemon stopped: the archive file itself.
    d.terminate(Duration::from_secs(20));
    let file = data.join(name);
    let dir = data.join("runs");
    let v = View::start(&[dir.to_str().unwrap()], &env);
    let list = v.json("/api/archives");
    let oname = list["archives"][0]["name"].as_str().unwrap().to_string();
    assert_eq!(oname, file.display().to_string());
    assert_eq!(list["archives"][0]["frames"], 5);
    assert_eq!(list["archives"][0]["live"], false);
    assert_eq!(states(&v, &oname), [(Some(true), None); 5]);
    check_kernel_stats(&v, &oname, 5);
    // Confined to the files given: another file is not served.
    let other = root.path().join("daemon.log");
    let (st, _, _) = v.get(&format!("/api/archive?name={}", q(other.to_str().unwrap())));
    assert_eq!(st, 404);
    let (st, _, _) = v.get("/api/archive?name=%2Fetc%2Fpasswd");
    assert_eq!(st, 404);
    drop(v);

    // Compaction keeps the statistics of the frames it keeps: the same bytes,
    // so the same keys; only the new neighbours' update ratios are new.
    let out = Command::new(daemon_bin())
        .args(["compact", file.to_str().unwrap(), "--keep-every", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = View::start(&[dir.to_str().unwrap()], &env);
    let t = v.json(&format!("/api/tensor?name={}&id=dense/kernel", q(&oname)));
    assert_eq!(t["frames"], serde_json::json!(["0", "2", "4"]));
    assert_eq!(
        t["computed"], 0,
        "statistics computed again after a compaction"
    );
    let fin = |i: usize| -> Vec<f64> { weights(i).iter().map(|&x| x as f64).collect() };
    let (w2, w0) = (fin(2), fin(0));
    let l2 = w2
        .iter()
        .filter(|x| x.is_finite())
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt();
    let d = w2
        .iter()
        .zip(&w0)
        .filter(|(a, b)| a.is_finite() && b.is_finite())
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    close(l2, &t["stats"][1]["l2"], "frame 2 L2 after compaction");
    close(
        d / l2,
        &t["stats"][1]["update_ratio"],
        "frame 2 against frame 0 after compaction",
    );
}

#[test]
fn view_refuses_what_it_cannot_serve() {
    let root = temp_root("view-err");
    let out = Command::new(daemon_bin())
        .args(["view", root.path().join("missing.zip").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing.zip") && err.contains("no such archive"),
        "{err}"
    );
    let sock = root.path().join("none.sock");
    let out = Command::new(daemon_bin())
        .args(["view", "--address", &format!("unix:{}", sock.display())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("none.sock"),
        "names the address it tried: {err}"
    );
}

/// `states` of `/api/archive` as (durable, replicated), JSON null as `None`.
fn states(v: &View, name: &str) -> Vec<(Option<bool>, Option<bool>)> {
    let a = v.json(&format!("/api/archive?name={}", q(name)));
    let frames = a["frames"].as_array().unwrap().len();
    let st = a["states"].as_array().expect("states");
    assert_eq!(st.len(), frames, "one state per frame: {a}");
    st.iter()
        .map(|s| (s["durable"].as_bool(), s["replicated"].as_bool()))
        .collect()
}

/// With `serve --remote` against a real S3 server (s3s-fs): the archive
/// page's states say which frames are replicated (frames written while the
/// store is down are durable, not replicated, until it is back); then, with
/// no daemon running, `gtar-logd fetch` materializes the remote archive and
/// `gtar-logd view` serves its frames and statistics offline.
#[test]
fn frame_states_with_a_remote_and_a_view_of_an_archive_fetched_from_s3() {
    let root = temp_root("view-s3");
    let mut s3 = s3::S3Server::start(&root.path().join("s3"));
    s3.bucket("ckpt");
    let data = root.path().join("data");
    let sock = root.path().join("d.sock");
    let cache = root.path().join("cache");
    let mut d = ChildDaemon::spawn_with(&data, &sock, None, &root.path().join("daemon.log"), |c| {
        s3.apply(c);
        c.arg("--remote").arg("s3://ckpt/team");
    });
    let addr = format!("unix:{}", sock.display());
    let c = Client::connect(&addr).unwrap();
    let name = "runs/s.zip";
    write_frames(&c, name, 0, 3);
    let env = [("XDG_CACHE_HOME", cache.as_path())];
    let v = View::start(&["--address", &addr], &env);
    let all = |want: (Option<bool>, Option<bool>), n: usize| {
        move |st: &[(Option<bool>, Option<bool>)]| st.len() == n && st.iter().all(|s| *s == want)
    };
    let replicated = (Some(true), Some(true));
    wait_for("frames 0..3 replicated", Duration::from_secs(30), || {
        all(replicated, 3)(&states(&v, name))
    });

    // The store goes away: new frames are durable (acked so), not replicated.
    s3.stop();
    write_frames(&c, name, 3, 5);
    let st = states(&v, name);
    assert_eq!(st[..3], [replicated; 3], "{st:?}");
    assert_eq!(st[3..], [(Some(true), Some(false)); 2], "{st:?}");
    // The timeline's legend says what the source can know.
    let a = v.json(&format!("/api/archive?name={}", q(name)));
    assert!(
        a["states_note"].as_str().unwrap().contains("durable"),
        "{a}"
    );

    // Back: they are replicated.
    s3.restart();
    wait_for("frames 3, 4 replicated", Duration::from_secs(30), || {
        all(replicated, 5)(&states(&v, name))
    });
    drop(v);
    d.terminate(Duration::from_secs(20));

    // No daemon: fetch the remote archive and view the file.
    let local = root.path().join("fetched.zip");
    let mut fetch = Command::new(daemon_bin());
    s3.apply(&mut fetch);
    let out = fetch
        .args([
            "fetch",
            &format!("s3://ckpt/team/{name}"),
            local.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fetch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = View::start(&[local.to_str().unwrap()], &env);
    let list = v.json("/api/archives");
    let oname = local.display().to_string();
    assert_eq!(list["archives"][0]["name"], oname.as_str());
    assert_eq!(list["archives"][0]["frames"], 5);
    // Offline: in the file and no writer holds it, so durable; replication
    // is not known without the daemon.
    assert_eq!(states(&v, &oname), [(Some(true), None); 5]);
    let a = v.json(&format!("/api/archive?name={}", q(&oname)));
    let loss = a["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "loss")
        .expect("the loss metric");
    assert_eq!(loss["steps"], serde_json::json!(["0", "1", "2", "3", "4"]));
    check_kernel_stats(&v, &oname, 5);
}

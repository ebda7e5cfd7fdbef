//! `gtar-logd view`: a web page of every frame's exact statistics.
//!
//! The page (embedded HTML, JavaScript and CSS, uPlot vendored from npm)
//! reads JSON from `/api/...`; everything is served by axum on a loopback
//! port. Invariants:
//! - Every route, pages and data alike, answers 401 without the token: in
//!   the query (`?token=`, as printed) or in the cookie that a request with
//!   it sets (HttpOnly, SameSite=Strict). Compared in constant time.
//! - Read-only: only GET routes exist, and the sources never write an
//!   archive; the only file written is the statistics cache ([`engine`]).
//! - Nothing blocking runs on an async worker: every source call and every
//!   statistic runs in `spawn_blocking`.
//! - Archive names reach only [`source::Source`], which confines them
//!   (the daemon as for any RPC; offline: the files given).

pub mod engine;
pub mod source;
pub mod stats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use engine::Engine;
use source::Source;

/// What `gtar-logd view` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Archive files and directories (offline); empty: the daemon.
    pub paths: Vec<PathBuf>,
    /// The daemon's address when `paths` is empty (empty: the default, as
    /// for every client).
    pub address: String,
    pub host: std::net::IpAddr,
    /// 0: a free port.
    pub port: u16,
    /// Where statistics are kept; `None`: the default cache directory.
    pub cache_dir: Option<PathBuf>,
}

struct App {
    engine: Engine,
    token: String,
    cookie: String,
}

/// A random 128-bit token, hex.
fn new_token() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("random token: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Run the view until Ctrl-C or SIGTERM. Prints the URL (with the token)
/// on stdout once it listens.
pub async fn run(opts: Options) -> Result<()> {
    let source: Arc<dyn Source> = if opts.paths.is_empty() {
        Arc::new(source::Daemon::connect(&opts.address).await?)
    } else {
        Arc::new(source::Offline::new(opts.paths.clone())?)
    };
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(opts.host, opts.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
    let addr = listener.local_addr()?;
    let cache_dir = opts.cache_dir.clone().or_else(engine::default_cache_dir);
    let token = new_token()?;
    let app = router(source.clone(), cache_dir, token.clone(), addr.port());
    let host = match addr.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    println!("gtar-logd view of {}", source.describe_self());
    println!("http://{host}:{}/?token={token}", addr.port());
    use std::io::Write;
    std::io::stdout().flush().ok();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await?;
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The view's routes over `source`, guarded by `token`.
pub fn router(
    source: Arc<dyn Source>,
    cache_dir: Option<PathBuf>,
    token: String,
    port: u16,
) -> Router {
    let app = Arc::new(App {
        engine: Engine::new(source, cache_dir),
        token,
        // Per port: views on other ports of the same host keep their own.
        cookie: format!("gtar_logd_view_{port}"),
    });
    Router::new()
        .route("/", get(page))
        .route("/assets/{file}", get(asset))
        .route("/api/info", get(info))
        .route("/api/archives", get(archives))
        .route("/api/archive", get(archive))
        .route("/api/tensor", get(tensor))
        .route("/api/layers", get(layers))
        .route("/api/frame", get(frame))
        .route("/api/diff", get(diff))
        .route("/api/npy", get(npy))
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .with_state(app)
}

fn query_token(q: &str) -> Option<&str> {
    q.split('&').find_map(|kv| kv.strip_prefix("token="))
}

fn cookie_token<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(name)?.strip_prefix('='))
}

async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let ok =
        |t: Option<&str>| t.is_some_and(|t| bool::from(t.as_bytes().ct_eq(app.token.as_bytes())));
    let by_query = ok(req.uri().query().and_then(query_token));
    if !by_query && !ok(cookie_token(&req, &app.cookie)) {
        return (
            StatusCode::UNAUTHORIZED,
            "401 Unauthorized: open the URL that `gtar-logd view` printed; it carries the token (?token=...)\n",
        )
            .into_response();
    }
    let mut resp = next.run(req).await;
    if by_query {
        let c = format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict",
            app.cookie, app.token
        );
        if let Ok(v) = HeaderValue::from_str(&c) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

// ------------------------------------------------------------------ assets

const INDEX_HTML: &str = include_str!("assets/index.html");
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("app.js", "text/javascript", include_bytes!("assets/app.js")),
    ("app.css", "text/css", include_bytes!("assets/app.css")),
    (
        "uPlot.iife.min.js",
        "text/javascript",
        include_bytes!("assets/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css",
        include_bytes!("assets/uPlot.min.css"),
    ),
];

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == file) {
        Some((_, ct, body)) => ([(header::CONTENT_TYPE, *ct)], *body).into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}

// --------------------------------------------------------------------- api

/// An error as the page shows it: NOT_FOUND for unknown archives and
/// frames, else 500, with the message.
struct ApiError(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for ApiError {
    fn from(e: E) -> ApiError {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use gtar_logd_client::Code;
        let msg = format!("{:#}", self.0);
        let code = self
            .0
            .chain()
            .find_map(|c| {
                if c.downcast_ref::<source::NotFound>().is_some()
                    || matches!(
                        c.downcast_ref::<crate::query::QueryError>(),
                        Some(crate::query::QueryError::NotFound(_))
                    )
                {
                    return Some(StatusCode::NOT_FOUND);
                }
                // The daemon's answer, for names it refused or does not have.
                match c.downcast_ref::<gtar_logd_client::Error>()?.code()? {
                    Code::NotFound => Some(StatusCode::NOT_FOUND),
                    Code::PermissionDenied => Some(StatusCode::FORBIDDEN),
                    Code::InvalidArgument => Some(StatusCode::BAD_REQUEST),
                    _ => None,
                }
            })
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, Json(json!({ "error": msg }))).into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

/// Run `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(anyhow::Error::from)??)
}

fn no_store(v: Value) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Json(v)).into_response()
}

async fn info(State(app): State<Arc<App>>) -> ApiResult {
    Ok(no_store(json!({
        "source": app.engine.source().describe_self(),
        "percentiles": stats::PERCENTILES,
        "hist_bins": stats::HIST_BINS,
    })))
}

async fn archives(State(app): State<Arc<App>>) -> ApiResult {
    let rows = blocking(move || app.engine.source().list()).await?;
    Ok(no_store(json!({ "archives": rows })))
}

#[derive(Deserialize)]
struct NameQ {
    name: String,
}

/// Names the user knows for tensor ids (see [`crate::lifecycle::export`]):
/// Keras variable paths, optimizer variables, the generic client's keys.
fn labels(src: &dyn Source, name: &str, ids: &[String]) -> HashMap<String, String> {
    let mut docs: HashMap<String, Option<Value>> = HashMap::new();
    let mut doc = |p: String| -> Option<Value> {
        docs.entry(p)
            .or_insert_with_key(|p| {
                src.record(name, p)
                    .ok()
                    .flatten()
                    .and_then(|b| serde_json::from_slice(&b).ok())
            })
            .clone()
    };
    let by_index = |list: Option<&Value>, i: u64| -> Option<Value> {
        list?
            .as_array()?
            .iter()
            .find(|v| v.get("index").and_then(Value::as_u64) == Some(i))
            .cloned()
    };
    let join = |p: &str, rest: &str| {
        if p.is_empty() {
            rest.to_string()
        } else {
            format!("{p}/{rest}")
        }
    };
    let mut out = HashMap::new();
    for id in ids {
        let c: Vec<&str> = id.split('/').collect();
        let n = c.len();
        let mut label = None;
        if n >= 6
            && c[n - 1] == "weight"
            && c[n - 6] == "keras"
            && c[n - 5] == "layer"
            && c[n - 3] == "weight"
        {
            if let (Ok(i), Ok(j)) = (c[n - 4].parse::<u64>(), c[n - 2].parse::<u64>()) {
                let w = doc(join(&c[..n - 6].join("/"), "gtar_logd/keras/weights.json"));
                let layer = by_index(w.as_ref().and_then(|w| w.get("layers")), i);
                let weight = by_index(layer.as_ref().and_then(|l| l.get("weights")), j);
                label = Some(
                    weight
                        .and_then(|w| w.get("path").and_then(Value::as_str).map(str::to_string))
                        .unwrap_or_else(|| format!("layer/{i}/weight/{j}")),
                );
            }
        } else if n >= 4
            && c[n - 1] == "value"
            && c[n - 4] == "gtar_logd"
            && c[n - 3] == "optimizer"
        {
            if let Ok(k) = c[n - 2].parse::<u64>() {
                let o = doc(join(
                    &c[..n - 4].join("/"),
                    "gtar_logd/keras/optimizer.json",
                ));
                let v = by_index(o.as_ref().and_then(|o| o.get("variables")), k);
                label = Some(format!(
                    "optimizer/{}",
                    v.and_then(|v| v.get("path").and_then(Value::as_str).map(str::to_string))
                        .unwrap_or_else(|| k.to_string())
                ));
            }
        } else if n >= 3 && c[n - 1] == "value" && c[n - 3] == "tensors" {
            label = Some(c[n - 2].to_string());
        }
        out.insert(id.clone(), label.unwrap_or_else(|| id.clone()));
    }
    out
}

/// The best frame GTARLogger recorded (`{P/}gtar_logd/keras/best.json`).
fn best(src: &dyn Source, name: &str, groups: &[String]) -> Option<Value> {
    groups
        .iter()
        .filter(|g| *g == "gtar_logd/keras" || g.ends_with("/gtar_logd/keras"))
        .find_map(|g| {
            let b = src.record(name, &format!("{g}/best.json")).ok()??;
            serde_json::from_slice(&b).ok()
        })
}

async fn archive(State(app): State<Arc<App>>, Query(q): Query<NameQ>) -> ApiResult {
    let v = blocking(move || {
        let src = app.engine.source();
        let d = src.describe(&q.name)?;
        let (frames, states): (Vec<String>, Vec<source::FrameState>) =
            src.frame_states(&q.name)?.into_iter().unzip();
        let metrics = src.metrics(&q.name)?;
        let tensors = match frames.last() {
            Some(f) => app.engine.frame(&q.name, f)?,
            None => Vec::new(),
        };
        let ids: Vec<String> = tensors.iter().map(|t| t.id.clone()).collect();
        let labels = labels(src.as_ref(), &q.name, &ids);
        let best = best(src.as_ref(), &q.name, &d.groups);
        Ok(json!({
            "archive": d,
            "frames": frames,
            "states": states,
            "states_note": src.states_note(),
            "metrics": metrics,
            "best": best,
            "tensors": tensors.iter().map(|t| json!({"id": t.id, "label": labels[&t.id], "dtype": t.dtype.name(), "shape": t.shape, "size": t.size})).collect::<Vec<_>>(),
        }))
    })
    .await?;
    Ok(no_store(v))
}

#[derive(Deserialize)]
struct TensorQ {
    name: String,
    id: String,
}

fn ratio(p: &Option<stats::PairStats>, s: &stats::TensorStats) -> Option<f64> {
    p.as_ref().and_then(|p| stats::update_ratio(p, s))
}

fn cos(p: &Option<stats::PairStats>, s: &stats::TensorStats, other_l2: Option<f64>) -> Option<f64> {
    let (p, o) = (p.as_ref()?, other_l2?);
    (s.l2 > 0.0 && o > 0.0).then(|| p.dot / (s.l2 * o))
}

async fn tensor(State(app): State<Arc<App>>, Query(q): Query<TensorQ>) -> ApiResult {
    let v = blocking(move || {
        let series = app.engine.series(&q.name)?;
        let mut frames = Vec::new();
        let mut rows = Vec::new();
        let mut meta = None;
        for (f, cells) in &series.frames {
            let Some(c) = cells.iter().find(|c| c.meta.id == q.id) else {
                continue;
            };
            frames.push(f.clone());
            meta = Some(c.meta.clone());
            let mut row = serde_json::to_value(&c.stats)?;
            let m = row.as_object_mut().unwrap();
            m.insert("update_ratio".into(), json!(ratio(&c.prev, &c.stats)));
            m.insert(
                "cos_prev".into(),
                json!(cos(&c.prev, &c.stats, c.prev_stats_l2)),
            );
            m.insert(
                "cos_first".into(),
                json!(cos(&c.first, &c.stats, c.first_stats_l2)),
            );
            rows.push(row);
        }
        let Some(meta) = meta else {
            return Err(source::NotFound(format!("no tensor {:?} in {:?}", q.id, q.name)).into());
        };
        let label = labels(
            app.engine.source().as_ref(),
            &q.name,
            std::slice::from_ref(&q.id),
        )
        .remove(&q.id);
        Ok(json!({
            "id": q.id, "label": label, "dtype": meta.dtype.name(), "shape": meta.shape,
            "frames": frames, "stats": rows, "computed": series.computed,
        }))
    })
    .await?;
    Ok(no_store(v))
}

async fn layers(State(app): State<Arc<App>>, Query(q): Query<NameQ>) -> ApiResult {
    let v = blocking(move || {
        let series = app.engine.series(&q.name)?;
        let frames: Vec<&String> = series.frames.iter().map(|(f, _)| f).collect();
        let mut ids: Vec<String> = Vec::new();
        for (_, cells) in &series.frames {
            for c in cells {
                if !ids.contains(&c.meta.id) {
                    ids.push(c.meta.id.clone());
                }
            }
        }
        let at: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect();
        let mut ur = vec![vec![None::<f64>; frames.len()]; ids.len()];
        let mut l2 = vec![vec![None::<f64>; frames.len()]; ids.len()];
        for (j, (_, cells)) in series.frames.iter().enumerate() {
            for c in cells {
                let i = at[c.meta.id.as_str()];
                ur[i][j] = ratio(&c.prev, &c.stats);
                l2[i][j] = Some(c.stats.l2);
            }
        }
        let labels = labels(app.engine.source().as_ref(), &q.name, &ids);
        Ok(json!({
            "frames": frames,
            "tensors": ids.iter().map(|id| json!({"id": id, "label": labels[id]})).collect::<Vec<_>>(),
            "update_ratio": ur, "l2": l2,
        }))
    })
    .await?;
    Ok(no_store(v))
}

#[derive(Deserialize)]
struct FrameQ {
    name: String,
    frame: String,
}

async fn frame(State(app): State<Arc<App>>, Query(q): Query<FrameQ>) -> ApiResult {
    let v = blocking(move || {
        let ts = app.engine.frame(&q.name, &q.frame)?;
        let ids: Vec<String> = ts.iter().map(|t| t.id.clone()).collect();
        let labels = labels(app.engine.source().as_ref(), &q.name, &ids);
        Ok(json!({
            "frame": q.frame,
            "tensors": ts.iter().map(|t| json!({"id": t.id, "label": labels[&t.id], "path": t.path, "dtype": t.dtype.name(), "shape": t.shape, "size": t.size})).collect::<Vec<_>>(),
        }))
    })
    .await?;
    Ok(no_store(v))
}

#[derive(Deserialize)]
struct DiffQ {
    name: String,
    a: String,
    b: String,
}

async fn diff(State(app): State<Arc<App>>, Query(q): Query<DiffQ>) -> ApiResult {
    let v = blocking(move || {
        let d = app.engine.diff(&q.name, &q.a, &q.b)?;
        let ids: Vec<String> = d.iter().map(|(t, _)| t.id.clone()).collect();
        let labels = labels(app.engine.source().as_ref(), &q.name, &ids);
        Ok(json!({
            "a": q.a, "b": q.b,
            "tensors": d.iter().map(|(t, p)| json!({
                "id": t.id, "label": labels[&t.id],
                "diff_l2": p.as_ref().map(|p| p.diff_l2),
                "max_abs_diff": p.as_ref().and_then(|p| p.max_abs_diff),
                "changed": p.as_ref().map(|p| p.changed),
            })).collect::<Vec<_>>(),
        }))
    })
    .await?;
    Ok(no_store(v))
}

#[derive(Deserialize)]
struct NpyQ {
    name: String,
    frame: String,
    id: String,
}

async fn npy(State(app): State<Arc<App>>, Query(q): Query<NpyQ>) -> ApiResult {
    let (file, body) = blocking(move || {
        let ts = app.engine.frame(&q.name, &q.frame)?;
        let t = ts.into_iter().find(|t| t.id == q.id).ok_or_else(|| {
            source::NotFound(format!("no tensor {:?} in frame {:?}", q.id, q.frame))
        })?;
        let bytes = app.engine.source().read(&q.name, &q.frame, &t)?;
        let descr = crate::lifecycle::export::npy_descr(t.dtype);
        let mut body = crate::lifecycle::export::npy_header(descr, &t.shape);
        body.extend_from_slice(&bytes);
        let file: String = format!("{}@{}.npy", t.id, q.frame)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-@".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Ok((file, body))
    })
    .await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ),
        ],
        body,
    )
        .into_response())
}

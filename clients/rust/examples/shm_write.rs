//! Write frames of one large f32 tensor and report whether shared memory
//! carried them, with the time each frame took until durable (JSON on
//! stdout). Used by the multi-user tests and benchmark to drive the Rust
//! client as another user.
//!
//! ```text
//! shm_write ADDRESS ARCHIVE MIB FRAMES
//! ```

use std::time::Instant;

use gtar_logd_client::ndarray::Array1;
use gtar_logd_client::{Client, NewFrame, OpenOptions};

type BoxError = Box<dyn std::error::Error>;

async fn run(address: &str, archive: &str, mib: usize, frames: usize) -> Result<String, BoxError> {
    let client = Client::connect(address).await?;
    let n = (mib << 20) / 4;
    let w = Array1::from_elem(n, 1.5f32);
    let mut writer = client.writer(archive, OpenOptions::append()).await?;
    let (attached, refused) = (
        writer.opened().shm_attached,
        writer.opened().shm_refused.clone(),
    );
    let first = writer.opened().existing_frames;
    let mut secs = Vec::new();
    for i in 0..frames as u64 {
        let t = Instant::now();
        let h = writer
            .write(NewFrame::new((first + i).to_string()).tensor("model", "w", &w))
            .await?;
        h.durable().await?;
        secs.push(t.elapsed().as_secs_f64());
    }
    let shm_bytes = writer.shm_bytes();
    writer.close().await?;
    Ok(format!(
        "{{\"shm_attached\": {attached}, \"shm_refused\": {}, \"shm_bytes\": {shm_bytes}, \"seconds\": {secs:?}}}",
        refused.map_or("null".to_string(), |r| format!("{r:?}"))
    ))
}

fn main() -> std::process::ExitCode {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 5 {
        eprintln!("usage: shm_write ADDRESS ARCHIVE MIB FRAMES");
        return std::process::ExitCode::from(2);
    }
    let (mib, frames) = (a[3].parse().unwrap_or(1), a[4].parse().unwrap_or(1));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    match rt.block_on(run(&a[1], &a[2], mib, frames)) {
        Ok(json) => {
            println!("{json}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shm_write: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

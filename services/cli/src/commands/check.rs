//! `payledger check URL...`.

use std::io::Write;

use crate::render::{Exit, Output, Report};

struct Serving {
    url: String,
    services: Vec<String>,
}

impl Report for Serving {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "{}: SERVING; {}", self.url, self.services.join(", "))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"url": self.url, "serving": true, "services": self.services})
    }
}

/// Stops at the first service that is not up: its error is the command's.
pub async fn run(urls: Vec<String>, out: &Output) -> anyhow::Result<Exit> {
    for url in urls {
        let services = crate::check::check(&url).await?;
        out.emit(&Serving { url, services })?;
    }
    Ok(Exit::Success)
}

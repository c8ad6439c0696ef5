//! Files read again when they change: TLS certificates and keys, access tokens.
//! A renewed Kubernetes Secret is picked up without a restart.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// How often the files are looked at for changes, at most.
pub(crate) const RELOAD_CHECK: Duration = Duration::from_secs(1);

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Something loaded from files, loaded again when one of them changes.
#[derive(Debug)]
pub(crate) struct Reloading<T> {
    what: &'static str,
    files: Vec<PathBuf>,
    current: RwLock<(Vec<Option<SystemTime>>, T)>,
    created: Instant,
    /// When the files were last looked at, in milliseconds since `created`: an
    /// atomic, because `get` runs on every call that checks a token.
    checked_ms: AtomicU64,
    load: fn(&[PathBuf]) -> anyhow::Result<T>,
}

impl<T: Clone> Reloading<T> {
    pub fn new(
        what: &'static str,
        files: Vec<PathBuf>,
        load: fn(&[PathBuf]) -> anyhow::Result<T>,
    ) -> anyhow::Result<Self> {
        let stamps = files.iter().map(|f| modified(f)).collect();
        let value = load(&files)?;
        Ok(Self {
            what,
            files,
            current: RwLock::new((stamps, value)),
            created: Instant::now(),
            checked_ms: AtomicU64::new(0),
            load,
        })
    }

    /// The value, loaded again first if a file changed since (checked at most every
    /// RELOAD_CHECK). A file that does not load keeps the previous value.
    pub fn get(&self) -> T {
        let now = self.created.elapsed().as_millis() as u64;
        let last = self.checked_ms.load(Ordering::Relaxed);
        // Whoever moves the stamp forward looks at the files; the others go on.
        let due = now.saturating_sub(last) >= RELOAD_CHECK.as_millis() as u64
            && self
                .checked_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if due {
            let stamps: Vec<_> = self.files.iter().map(|f| modified(f)).collect();
            if stamps != self.current.read().expect("reload lock").0 {
                match (self.load)(&self.files) {
                    Ok(value) => {
                        tracing::info!(files = ?self.files, "{} changed; reloaded", self.what);
                        *self.current.write().expect("reload lock") = (stamps, value);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "{} changed but do not load; keeping the previous ones", self.what)
                    }
                }
            }
        }
        self.current.read().expect("reload lock").1.clone()
    }
}

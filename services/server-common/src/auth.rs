//! Access control (docs/failure-contract.md): a bearer token per role, checked in one
//! tower layer that every gRPC server shares. Health and reflection stay open for
//! probes. Tokens are compared in constant time and never logged.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use subtle::ConstantTimeEq;

use crate::reload::Reloading;
use tonic::Status;

/// Who may call what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Publishes events and dimension records (IngestService).
    Producer,
    /// Reads exposure (QueryService, except Reconcile).
    Reader,
    /// Runs replays and reconciliation (ReplayCoordinator, QueryService.Reconcile).
    Operator,
    /// Service to service: the coordinator's RunShard calls to projectors.
    Internal,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Producer, Role::Reader, Role::Operator, Role::Internal];

    pub fn name(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Internal => "internal",
        }
    }
}

/// The role a gRPC method (`/package.Service/Method`) requires; None: open.
pub fn required_role(path: &str) -> Option<Role> {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => None,
        "payledger.v1.IngestService" => Some(Role::Producer),
        "payledger.v1.QueryService" if method == "Reconcile" => Some(Role::Operator),
        "payledger.v1.QueryService" => Some(Role::Reader),
        "payledger.v1.ReplayCoordinator" => Some(Role::Operator),
        // Whatever else a server may serve is closed to all but the platform itself.
        _ => Some(Role::Internal),
    }
}

/// The environment variable holding `role`'s tokens.
pub fn env_var(role: Role) -> String {
    format!("PAYLEDGER_{}_TOKENS", role.name().to_uppercase())
}

/// One token per non-empty line, each at least 16 characters; `source` names the
/// file or variable in errors (never the token).
fn parse_tokens(text: &str, source: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let tokens: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect();
    anyhow::ensure!(
        tokens.iter().all(|t| t.len() >= 16),
        "{source}: tokens must be at least 16 characters"
    );
    Ok(tokens)
}

/// The accepted tokens of each role (several per role, so tokens can be rotated).
#[derive(Default)]
pub struct Tokens {
    by_role: Vec<(Role, Vec<Vec<u8>>)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Which roles have tokens, never the tokens.
        let roles: Vec<_> = self
            .by_role
            .iter()
            .map(|(r, t)| format!("{}: {} token(s)", r.name(), t.len()))
            .collect();
        f.debug_struct("Tokens").field("roles", &roles).finish()
    }
}

impl Tokens {
    /// Reads `<dir>/<role>` for each role: one token per non-empty line. A role
    /// without a file has no token, so its methods refuse every call.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Tokens> {
        Self::load(Some(dir), |_| None)
    }

    /// The tokens of `<dir>/<role>` files (when `dir` is given) and of the
    /// variables `PAYLEDGER_<ROLE>_TOKENS` that `env` returns (tokens separated by
    /// commas or newlines), together. A role with neither has no token, so its
    /// methods refuse every call.
    pub fn load(
        dir: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Tokens> {
        let mut by_role = Vec::new();
        for role in Role::ALL {
            let mut tokens = Vec::new();
            if let Some(dir) = dir {
                let path = dir.join(role.name());
                match std::fs::read_to_string(&path) {
                    Ok(text) => tokens.extend(parse_tokens(&text, &path.display().to_string())?),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => anyhow::bail!("token file {}: {e}", path.display()),
                }
            }
            let var = env_var(role);
            if let Some(text) = env(&var) {
                tokens.extend(parse_tokens(&text.replace(',', "\n"), &var)?);
            }
            if !tokens.is_empty() {
                by_role.push((role, tokens));
            }
        }
        anyhow::ensure!(
            !by_role.is_empty(),
            "no tokens: neither token files (producer, reader, operator, internal){} nor {}",
            dir.map(|d| format!(" in {}", d.display()))
                .unwrap_or_default(),
            Role::ALL.map(env_var).join(", ")
        );
        Ok(Tokens { by_role })
    }

    /// The first token of `role`: what this process presents when it calls
    /// another service in that role (the coordinator's RunShard calls).
    pub fn token_of(&self, role: Role) -> Option<&str> {
        self.by_role
            .iter()
            .find(|(r, _)| *r == role)
            .and_then(|(_, tokens)| tokens.first())
            .and_then(|t| std::str::from_utf8(t).ok())
    }

    fn role_of(&self, presented: &[u8]) -> Option<Role> {
        let mut found = None;
        // Every token is compared, so the time does not say which one matched.
        for (role, tokens) in &self.by_role {
            for token in tokens {
                if bool::from(token.as_slice().ct_eq(presented)) {
                    found = Some(*role);
                }
            }
        }
        found
    }

    /// Whether a call of `path` with these headers may proceed.
    pub fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<(), Status> {
        let Some(required) = required_role(path) else {
            return Ok(());
        };
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "{path} needs a bearer token of the {} role (authorization: Bearer <token>; the CLI takes --token or PAYLEDGER_TOKEN)",
                    required.name()
                ))
            })?;
        match self.role_of(presented) {
            Some(role) if role == required => Ok(()),
            Some(role) => Err(Status::permission_denied(format!(
                "a {} token may not call {path}; it needs the {} role",
                role.name(),
                required.name()
            ))),
            None => Err(Status::unauthenticated(
                "the bearer token is not one this server accepts",
            )),
        }
    }
}

/// The tokens a server accepts, read again within a second of a token file
/// changing (a rotated Kubernetes Secret), so rotation needs no restart: add the
/// new token, switch the clients, remove the old one. Environment tokens are
/// fixed for the life of the process. Files that stop loading (a token too short,
/// every file gone) keep the previous tokens.
#[derive(Debug)]
pub struct TokenSource(Reloading<Arc<Tokens>>);

impl TokenSource {
    /// The token files under `dir` (if any) and the `PAYLEDGER_<ROLE>_TOKENS`
    /// variables; see [`Tokens::load`].
    pub fn load(dir: Option<&Path>) -> anyhow::Result<TokenSource> {
        let files = dir.map_or_else(Vec::new, |dir| {
            Role::ALL.map(|r| dir.join(r.name())).to_vec()
        });
        let reloading = Reloading::new("token files", files, |files| {
            let dir = files.first().and_then(|f| f.parent());
            Ok(Arc::new(Tokens::load(dir, |var| std::env::var(var).ok())?))
        })?;
        Ok(TokenSource(reloading))
    }

    /// The tokens now.
    pub fn current(&self) -> Arc<Tokens> {
        self.0.get()
    }
}

/// The tower layer: with tokens, every call is checked; without, calls pass.
#[derive(Clone, Default)]
pub struct AuthLayer {
    tokens: Option<Arc<TokenSource>>,
}

impl AuthLayer {
    pub fn new(tokens: Option<Arc<TokenSource>>) -> Self {
        Self { tokens }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<TokenSource>>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(tokens) = &self.tokens
            && let Err(status) = tokens
                .current()
                .check(request.uri().path(), request.headers())
        {
            return Box::pin(async move { Ok(status.into_http()) });
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("producer"), "producer-token-0123456789\n").unwrap();
        std::fs::write(
            dir.path().join("reader"),
            "reader-token-0123456789\nreader-rotated-0123456789\n",
        )
        .unwrap();
        Tokens::from_dir(dir.path()).unwrap()
    }

    fn bearer(token: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn each_method_needs_its_role() {
        let t = tokens();
        let publish = "/payledger.v1.IngestService/Publish";
        assert!(
            t.check(publish, &bearer("producer-token-0123456789"))
                .is_ok()
        );
        let denied = t
            .check(publish, &bearer("reader-token-0123456789"))
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            !denied.message().contains("reader-token"),
            "tokens are never echoed"
        );
        let missing = t.check(publish, &http::HeaderMap::new()).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let wrong = t
            .check(publish, &bearer("not-a-token-at-all-000"))
            .unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        // Rotation: both reader tokens work.
        let read = "/payledger.v1.QueryService/GetCurrentExposure";
        assert!(t.check(read, &bearer("reader-rotated-0123456789")).is_ok());
        // Reconcile is an operator's call; operators have no token here, so nobody may.
        let reconcile = "/payledger.v1.QueryService/Reconcile";
        assert_eq!(
            t.check(reconcile, &bearer("reader-token-0123456789"))
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn probes_stay_open() {
        let t = tokens();
        assert!(
            t.check("/grpc.health.v1.Health/Check", &http::HeaderMap::new())
                .is_ok()
        );
        assert!(
            t.check(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                &http::HeaderMap::new()
            )
            .is_ok()
        );
        assert_eq!(
            required_role("/payledger.v1.ProjectorService/RunShard"),
            Some(Role::Internal)
        );
        assert_eq!(
            required_role("/payledger.v1.ReplayCoordinator/StartReplay"),
            Some(Role::Operator)
        );
    }

    #[test]
    fn short_tokens_and_empty_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Tokens::from_dir(dir.path()).is_err());
        std::fs::write(dir.path().join("reader"), "short\n").unwrap();
        let err = Tokens::from_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
        assert!(
            !format!("{:?}", tokens()).contains("token-0123"),
            "Debug never shows tokens"
        );
    }

    #[test]
    fn tokens_from_the_environment_join_the_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("reader"), "reader-file-0123456789\n").unwrap();
        let env = |var: &str| match var {
            "PAYLEDGER_READER_TOKENS" => Some("reader-env-0123456789".to_string()),
            "PAYLEDGER_OPERATOR_TOKENS" => {
                Some("operator-a-0123456789, operator-b-0123456789".to_string())
            }
            _ => None,
        };
        let t = Tokens::load(Some(dir.path()), env).unwrap();
        let query = "/payledger.v1.QueryService/GetDailyExposure";
        let replay = "/payledger.v1.ReplayCoordinator/StartReplay";
        assert!(t.check(query, &bearer("reader-file-0123456789")).is_ok());
        assert!(t.check(query, &bearer("reader-env-0123456789")).is_ok());
        assert!(t.check(replay, &bearer("operator-b-0123456789")).is_ok());
        assert_eq!(
            t.check(replay, &bearer("reader-env-0123456789"))
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        let only_env = Tokens::load(None, env).unwrap();
        assert!(
            only_env
                .check(replay, &bearer("operator-a-0123456789"))
                .is_ok()
        );
        let err = Tokens::load(None, |_| Some("short,also-short".into())).unwrap_err();
        assert!(
            err.to_string().contains("PAYLEDGER_PRODUCER_TOKENS"),
            "{err}"
        );
        assert!(
            !err.to_string().contains("short,"),
            "errors never show tokens: {err}"
        );
        let none = Tokens::load(None, |_| None).unwrap_err();
        assert!(
            none.to_string().contains("PAYLEDGER_INTERNAL_TOKENS"),
            "{none}"
        );
    }

    #[test]
    fn a_rewritten_token_file_is_read_again_and_a_broken_one_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let reader = dir.path().join("reader");
        std::fs::write(&reader, "reader-old-0123456789\n").unwrap();
        let source = TokenSource::load(Some(dir.path())).unwrap();
        let query = "/payledger.v1.QueryService/GetDailyExposure";
        let accepts = |token: &str| source.current().check(query, &bearer(token)).is_ok();
        assert!(accepts("reader-old-0123456789"));
        let rewrite = |text: &str, ahead: u64| {
            std::fs::write(&reader, text).unwrap();
            // A distinct modification time, however coarse the file system's clock.
            let stamp = std::time::SystemTime::now() + std::time::Duration::from_secs(ahead);
            std::fs::File::options()
                .append(true)
                .open(&reader)
                .unwrap()
                .set_modified(stamp)
                .unwrap();
            std::thread::sleep(crate::reload::RELOAD_CHECK + std::time::Duration::from_millis(50));
        };
        rewrite("reader-old-0123456789\nreader-new-0123456789\n", 10);
        assert!(accepts("reader-new-0123456789") && accepts("reader-old-0123456789"));
        rewrite("reader-new-0123456789\n", 20);
        assert!(accepts("reader-new-0123456789") && !accepts("reader-old-0123456789"));
        rewrite("short\n", 30);
        assert!(
            accepts("reader-new-0123456789"),
            "a broken file keeps the tokens"
        );
    }
}

//! Flags shared by every service (each also readable from the environment).

use std::time::Duration;

use crate::connection::ConnectionLosses;
use payledger_semantics::{ProjectionSettings, Settings, StreamSettings};

/// Parses durations such as `90s`, `5m`, `35d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("'{text}': {e} (examples: 500ms, 90s, 5m, 35d)"))
}

/// A duration in the largest whole unit (`7d`, `36h`, `90s`), as these flags and
/// the `nats` CLI both read it.
pub fn format_duration(d: Duration) -> String {
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    if nanos != 0 {
        return match nanos {
            n if n % 1_000_000 == 0 => format!("{}ms", d.as_millis()),
            n if n % 1_000 == 0 => format!("{}us", d.as_micros()),
            _ => format!("{}ns", d.as_nanos()),
        };
    }
    match secs {
        0 => "0s".to_string(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Parses byte sizes such as `268435456`, `512KiB`, `256MiB`, `1GiB` (binary units only:
/// `MB` and `GB` are refused rather than guessed at).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("'{text}': {why} (examples: 1048576, 512KiB, 256MiB, 1GiB)");
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(bad("not a number of bytes"));
    }
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return Err(bad("unknown unit; use B, KiB, MiB, GiB or TiB")),
    };
    let n: u64 = digits.parse().map_err(|_| bad("too large"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| bad("too large"))
}

/// What the flags of `A` give when none is set on the command line and no
/// variable in the environment, given only `required` (flags `A` cannot do
/// without). Each default is written once, in its flag's attribute: the binaries
/// run with these values, and so do `payledger dev`, the bench and the tests that
/// start a service in process, which take the library's config from here.
///
/// Panics if a flag's default does not pass its own parser, which the tests of
/// every service's config catch.
pub fn flag_defaults<A: clap::Args>(required: &[&str]) -> A {
    let command = A::augment_args(clap::Command::new("defaults").no_binary_name(true))
        .mut_args(|arg| arg.env(None::<&str>));
    let matches = command
        .try_get_matches_from(required)
        .unwrap_or_else(|e| panic!("the flags' defaults do not parse: {e}"));
    A::from_arg_matches(&matches)
        .unwrap_or_else(|e| panic!("the flags' defaults do not parse: {e}"))
}

pub fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[derive(clap::Args, Clone, Debug)]
pub struct NatsArgs {
    /// NATS server URLs (JetStream enabled), comma-separated: the client connects
    /// to any of them that answers and moves to another when it goes down, so
    /// list every node of a cluster (nats://a:4222,nats://b:4222).
    #[arg(
        long = "nats-url",
        env = "PAYLEDGER_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub url: String,
    /// NATS credentials file (.creds), if the server requires one.
    #[arg(long = "nats-creds", env = "PAYLEDGER_NATS_CREDS")]
    pub creds: Option<std::path::PathBuf>,
    /// How often the client pings its server. A server that stops answering (a
    /// partition: no error, just silence) is left for another after two missed
    /// pings, so this bounds how long calls wait on a node that is cut off.
    #[arg(
        long = "nats-ping-interval",
        env = "PAYLEDGER_NATS_PING_INTERVAL",
        default_value = NATS_PING_INTERVAL,
        value_parser = parse_duration
    )]
    pub ping_interval: Duration,
    /// How long a reader of the log or of a bucket may receive nothing while its
    /// stream holds records it has not read, before it makes its consumer again
    /// (a consumer left silent after a partition healed).
    #[arg(
        long = "nats-stall-timeout",
        env = "PAYLEDGER_NATS_STALL_TIMEOUT",
        default_value = NATS_STALL_TIMEOUT,
        value_parser = parse_duration
    )]
    pub stall_timeout: Duration,
}

const NATS_PING_INTERVAL: &str = "2s";
const NATS_STALL_TIMEOUT: &str = "10s";

impl NatsArgs {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            creds: None,
            ping_interval: parse_duration(NATS_PING_INTERVAL).expect("a valid default"),
            stall_timeout: parse_duration(NATS_STALL_TIMEOUT).expect("a valid default"),
        }
    }

    /// The servers of `--nats-url`, in the order given.
    pub fn servers(&self) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
        let servers = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<async_nats::ServerAddr>().map_err(|e| {
                    anyhow::anyhow!(
                        "--nats-url: '{s}' is not a NATS server address ({e}); \
                         give one or more, comma-separated, such as nats://nats-0:4222,nats://nats-1:4222"
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(
            !servers.is_empty(),
            "--nats-url is empty; give one or more NATS server addresses, comma-separated"
        );
        Ok(servers)
    }

    pub async fn connect(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        Ok(self.connect_watched(name).await?.0)
    }

    /// [`NatsArgs::connect`], with the client's connection losses to watch: a
    /// caller waiting for an answer gives up once the connection it was due on
    /// is gone.
    pub async fn connect_watched(
        &self,
        name: &str,
    ) -> anyhow::Result<(async_nats::Client, ConnectionLosses)> {
        let servers = self.servers()?;
        anyhow::ensure!(
            !self.ping_interval.is_zero(),
            "--nats-ping-interval must be longer than 0 (it bounds how long a cut-off server is trusted)"
        );
        anyhow::ensure!(
            !self.stall_timeout.is_zero(),
            "--nats-stall-timeout must be longer than 0 (a reader that is merely between records is not stalled)"
        );
        let mut options = async_nats::ConnectOptions::new()
            .name(name)
            .ping_interval(self.ping_interval)
            .retry_on_initial_connect();
        let (losses, recorder) = ConnectionLosses::channel();
        let recorder = std::sync::Arc::new(recorder);
        let client_name = name.to_string();
        options = options.event_callback(move |event| {
            let (recorder, client_name) = (recorder.clone(), client_name.clone());
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        recorder.record();
                        tracing::info!(client = %client_name, "lost the connection to NATS; reconnecting");
                    }
                    async_nats::Event::Connected => {
                        tracing::info!(client = %client_name, "connected to NATS");
                    }
                    _ => {}
                }
            }
        });
        if let Some(creds) = &self.creds {
            options = options.credentials_file(creds).await?;
        }
        let client = tokio::time::timeout(Duration::from_secs(30), options.connect(servers))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "could not reach NATS at {} within 30 s; is nats-server running?",
                    self.url
                )
            })??;
        Ok((client, losses))
    }
}

/// The settings ingest creates the stream with and enforces (docs/semantics.md R9).
#[derive(clap::Args, Clone, Debug)]
pub struct StreamArgs {
    /// Partitions of the stream; fixed when the stream is created.
    #[arg(long, env = "PAYLEDGER_PARTITIONS", default_value_t = 16)]
    pub partitions: u32,
    /// Dedup horizon H: how long identities are remembered, and the oldest event accepted.
    #[arg(long, env = "PAYLEDGER_DEDUP_HORIZON", default_value = "35d", value_parser = parse_duration)]
    pub dedup_horizon: Duration,
    /// How far ahead of ingest's clock an event_time may lie.
    #[arg(long, env = "PAYLEDGER_MAX_CLOCK_SKEW", default_value = "5m", value_parser = parse_duration)]
    pub max_clock_skew: Duration,
}

impl Default for StreamArgs {
    fn default() -> Self {
        flag_defaults(&[])
    }
}

impl StreamArgs {
    pub fn settings(&self) -> anyhow::Result<StreamSettings> {
        let settings = StreamSettings {
            partitions: self.partitions,
            dedup_horizon_us: micros(self.dedup_horizon),
            max_clock_skew_us: micros(self.max_clock_skew),
        };
        Settings::of(settings, ProjectionSettings::default()).validate()?;
        Ok(settings)
    }
}

/// The settings only the fold reads: each projector, replay worker, coordinator
/// and query service takes them from its own flags, and they are part of its
/// version key (docs/semantics.md R9).
#[derive(clap::Args, Clone, Debug)]
pub struct ProjectionArgs {
    /// Events older than this at ingest are counted late; days close this long after they end.
    #[arg(long, env = "PAYLEDGER_ALLOWED_LATENESS", default_value = "1h", value_parser = parse_duration)]
    pub allowed_lateness: Duration,
    /// Width of the event-time buckets of the daily peak; must divide a day.
    #[arg(long, env = "PAYLEDGER_BUCKET_WIDTH", default_value = "15m", value_parser = parse_duration)]
    pub bucket_width: Duration,
}

impl Default for ProjectionArgs {
    fn default() -> Self {
        flag_defaults(&[])
    }
}

impl ProjectionArgs {
    pub fn settings(&self) -> anyhow::Result<ProjectionSettings> {
        let settings = ProjectionSettings {
            allowed_lateness_us: micros(self.allowed_lateness),
            bucket_width_us: micros(self.bucket_width),
        };
        Settings::of(StreamSettings::default(), settings).validate()?;
        Ok(settings)
    }
}

/// Who may call a server: bearer tokens per role (see [`crate::auth`]).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AccessArgs {
    /// Directory of bearer-token files named after the roles (producer, reader,
    /// operator, internal), one token per line; every call then needs a token of
    /// its method's role (health and reflection stay open). Tokens may also (or
    /// instead) come from the variables PAYLEDGER_PRODUCER_TOKENS,
    /// PAYLEDGER_READER_TOKENS, PAYLEDGER_OPERATOR_TOKENS and
    /// PAYLEDGER_INTERNAL_TOKENS (comma-separated). With neither, calls are not
    /// checked: for development only.
    #[arg(long, env = "PAYLEDGER_TOKENS_DIR")]
    pub tokens_dir: Option<std::path::PathBuf>,
}

impl AccessArgs {
    pub fn tokens(&self) -> anyhow::Result<Option<std::sync::Arc<crate::auth::TokenSource>>> {
        use crate::auth::{Role, TokenSource, env_var};
        let from_env = Role::ALL
            .iter()
            .any(|r| std::env::var_os(env_var(*r)).is_some());
        if self.tokens_dir.is_none() && !from_env {
            tracing::warn!(
                "no --tokens-dir and no PAYLEDGER_<ROLE>_TOKENS: calls are not authenticated (development only)"
            );
            return Ok(None);
        }
        let tokens = TokenSource::load(self.tokens_dir.as_deref())?;
        Ok(Some(std::sync::Arc::new(tokens)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use payledger_semantics::{ProjectionSettings, StreamSettings};

    use super::{
        NatsArgs, ProjectionArgs, ServerArgs, StreamArgs, flag_defaults, format_duration,
        parse_bytes, parse_duration,
    };

    #[test]
    fn the_flags_defaults_are_the_semantics_defaults() {
        // The pure crate keeps its own copy (it has no clap); the table of
        // docs/semantics.md R9 documents both.
        assert_eq!(
            StreamArgs::default().settings().unwrap(),
            StreamSettings::default()
        );
        assert_eq!(
            ProjectionArgs::default().settings().unwrap(),
            ProjectionSettings::default()
        );
    }

    #[test]
    fn flag_defaults_ignore_the_environment_and_take_the_required_flags() {
        // PAYLEDGER_NATS_URL, if the environment sets it, is not read.
        let nats: NatsArgs = flag_defaults(&[]);
        assert_eq!(nats.url, "nats://127.0.0.1:4222");
        let nats: NatsArgs = flag_defaults(&["--nats-url", "nats://a:4222"]);
        assert_eq!(nats.url, "nats://a:4222");
        let server = ServerArgs::new("nats://b:4222");
        assert_eq!(server.nats.url, "nats://b:4222");
        assert!(server.access.tokens_dir.is_none() && server.tls.tls_cert.is_none());
    }

    #[test]
    fn durations_are_shown_in_their_largest_whole_unit_and_read_back() {
        for (d, shown) in [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(7 * 86_400), "7d"),
            (Duration::from_secs(36 * 3_600), "36h"),
            (Duration::from_secs(150), "150s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_millis(1_500), "1500ms"),
            (Duration::from_micros(1_001), "1001us"),
        ] {
            assert_eq!(format_duration(d), shown);
            assert_eq!(parse_duration(shown), Ok(d), "{shown}");
        }
    }

    #[test]
    fn nats_url_takes_a_comma_separated_list_of_servers() {
        let servers = NatsArgs::new("nats://a:4222, nats://b:4223,,tls://c:4224")
            .servers()
            .unwrap();
        let hosts: Vec<_> = servers
            .iter()
            .map(|s| (s.host().to_string(), s.port()))
            .collect();
        assert_eq!(
            hosts,
            [
                ("a".to_string(), 4222),
                ("b".to_string(), 4223),
                ("c".to_string(), 4224)
            ]
        );
        assert_eq!(NatsArgs::new("nats://a:4222").servers().unwrap().len(), 1);
    }

    #[test]
    fn nats_url_names_the_entry_it_cannot_read() {
        let err = NatsArgs::new("nats://a:4222,http://b:4222")
            .servers()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'http://b:4222'") && err.contains("comma-separated"),
            "{err}"
        );
        let err = NatsArgs::new(" , ").servers().unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn byte_sizes_take_binary_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("0"), Ok(0));
    }

    #[test]
    fn byte_sizes_refuse_what_they_would_have_to_guess() {
        for text in ["", "MiB", "1.5GiB", "256MB", "1gb", "-1", "99999999999TiB"] {
            let err = parse_bytes(text).expect_err(text);
            assert!(err.contains("examples"), "{text}: {err}");
        }
    }
}

/// What every server takes besides its own settings: NATS, who may call it, TLS
/// and where its metrics are served.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub access: AccessArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    #[command(flatten)]
    pub metrics: crate::metrics::MetricsArgs,
    #[command(flatten)]
    pub readiness: crate::readiness::ReadinessArgs,
}

impl ServerArgs {
    /// The flags' defaults, with NATS at `nats_url`.
    pub fn new(nats_url: &str) -> Self {
        let mut args: Self = flag_defaults(&[]);
        args.nats.url = nats_url.to_string();
        args
    }
}

//! Typed configuration for every Caracal service.
//!
//! One file (TOML) describes a deployment; every service reads the whole file, so a typo in any
//! section is caught by every service at start. Environment variables override single keys
//! (see [`source`]). [`Config::load`] reports every problem at once.

pub mod source;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use source::{ConfigErrors, Source, parse_duration};

use crate::crypto::{KeyRing, Secret};

/// Which storage engine a database URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Postgres,
    Sqlite,
}

#[derive(Clone)]
pub struct DatabaseConfig {
    /// `postgres://…` or `sqlite://path` (or `sqlite::memory:`).
    pub url: String,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// Postgres: the longest any one statement may run before the server cancels it
    /// (`statement_timeout`; 0 = no limit). A hung query then fails as a store outage instead
    /// of holding its connection — and whatever waits on it — forever.
    pub statement_timeout: Duration,
    /// Postgres: the longest a transaction may sit idle (opened, nothing running) before the
    /// server ends its session (`idle_in_transaction_session_timeout`; 0 = no limit), so a
    /// stuck client cannot hold row or advisory locks others wait on.
    pub idle_in_transaction_timeout: Duration,
}

impl DatabaseConfig {
    pub fn kind(&self) -> Option<DbKind> {
        db_kind(&self.url)
    }
}

pub fn db_kind(url: &str) -> Option<DbKind> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Some(DbKind::Postgres)
    } else if url.starts_with("sqlite:") {
        Some(DbKind::Sqlite)
    } else {
        None
    }
}

/// Redact the password of a URL for display.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.rsplit_once('@')
    {
        let user = userinfo.split(':').next().unwrap_or("");
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("idle_in_transaction_timeout", &self.idle_in_transaction_timeout)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusBackend {
    /// Log table in the embedded database; for `caracal dev` and tests.
    Embedded,
    /// Redis Streams; for production.
    Redis,
}

#[derive(Clone)]
pub struct BusConfig {
    pub backend: BusBackend,
    pub redis_url: String,
    /// Prefix of every stream key in Redis (several deployments sharing one Redis).
    pub redis_prefix: String,
    /// A pending entry idle for longer than this is reclaimed from its (presumed dead) consumer.
    pub claim_idle: Duration,
    /// How long a blocking read waits before returning empty.
    pub block: Duration,
    /// Messages older than this are refused as replays.
    pub max_message_age: Duration,
}

impl fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusConfig")
            .field("backend", &self.backend)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("claim_idle", &self.claim_idle)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    pub log_level: String,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// Time allowed to drain in-flight requests on shutdown.
    pub grace_period: Duration,
    /// Requests per second allowed per client address on the API services (token bucket).
    pub rate_limit_per_sec: u32,
    pub rate_limit_burst: u32,
}

/// Keys, one ring per purpose. A service is given only the rings it needs; a missing ring is
/// an error only for the service that needs it (see `require_*`).
#[derive(Debug, Clone, Default)]
pub struct KeysConfig {
    /// HMAC over bus messages.
    pub bus: Option<KeyRing>,
    /// HMAC over service-to-service requests.
    pub internal: Option<KeyRing>,
    /// Key-encryption key for secrets at rest (sealed credentials, signing keys).
    pub seal: Option<KeyRing>,
    /// Pepper for the keyed hash of API keys and admin tokens.
    pub pepper: Option<KeyRing>,
}

#[derive(Debug, Clone)]
pub struct ServiceAddr {
    pub listen: SocketAddr,
}

/// The coordinator: sessions, leases, invocations, cascading revocation. The `max_*` limits
/// are per-tenant defaults; a tenant's own limits (`PUT /v1/limits`) replace them.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    /// Session lifetime when the start request names none, and the longest allowed.
    pub session_ttl: Duration,
    pub max_session_ttl: Duration,
    /// A session not heard from for this long expires (default; a start may ask for another).
    pub heartbeat_timeout: Duration,
    /// Longest lease TTL a holder may ask for.
    pub max_lease_ttl: Duration,
    /// Longest invocation deadline, and the retry ceiling per invocation.
    pub max_invocation_deadline: Duration,
    pub max_invocation_attempts: u32,
    /// How often expired sessions, leases and invocations are swept.
    pub sweep_interval: Duration,
    pub max_active_sessions: u64,
    pub max_leases: u64,
    pub max_open_invocations: u64,
    /// Most nodes (sessions and delegated mandates) one revocation may reach; beyond, the
    /// revocation is refused as a whole (nothing half-revoked) and should be narrowed.
    pub max_cascade: usize,
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub listen: SocketAddr,
    /// How often a new tree head is signed when the ledger grew.
    pub head_interval: Duration,
    /// Events per ledger append (one transaction).
    pub batch: usize,
    /// An event's own timestamp is kept only within this distance of the ledger's clock
    /// (further out it is recorded as the ledger's time, and the original kept in the body).
    pub max_clock_skew: Duration,
    /// Entries recorded longer ago than this are dropped, up to a signed tree head that stays
    /// as their summary (proofs about what remains stay valid). None: kept forever.
    pub retention: Option<Duration>,
    /// How often retention runs (when `retention` is set).
    pub retention_interval: Duration,
    /// Entries per partition of the ledger on Postgres (retention drops whole partitions).
    /// Takes effect only before the first partition exists; fixed after.
    pub partition_entries: u64,
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub listen: SocketAddr,
    /// Directory bundles may reference credential files in (`{ file: name }`); none: refused.
    pub secret_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StsConfig {
    pub listen: SocketAddr,
    /// TLS listener where workloads authenticate with a client certificate (optional).
    pub tls_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Mandate lifetime when the request names none (capped by each grant).
    pub default_lifetime: Duration,
    /// How long a pending approval waits for a decision.
    pub approval_ttl: Duration,
    /// Minimum interval between approval polls (faster polls get `slow_down`).
    pub approval_interval: Duration,
    pub max_delegation_depth: i64,
    pub max_delegation_fanout: i64,
    /// Non-public ranges JWKS URLs may resolve to (the egress guard refuses them otherwise).
    pub egress_allow: Vec<crate::egress::Cidr>,
    /// Failed authentications per minute allowed per (source, client) pair.
    pub auth_failures_per_minute: u32,
    /// Minimum time between two fetches of an issuer's JWKS triggered by unknown key ids.
    pub jwks_min_refresh: Duration,
}

/// A sidecar listener bound to one resource: agents point their base URL at it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    pub listen: String,
    /// Tenant name.
    pub tenant: String,
    /// Resource name within the tenant.
    pub resource: String,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub threads: usize,
    /// A gateway whose revocation feed is older than this denies everything.
    pub revocation_staleness: Duration,
    /// How often revocations are reloaded from the database regardless of the feed (a
    /// successful reload also counts as fresh).
    pub revocation_reconcile_interval: Duration,
    /// How long a budget lease lives without renewal (a gateway that dies gives its unused
    /// budget back after this).
    pub budget_lease_ttl: Duration,
    /// The TLS interception CA file (default `<data_dir>/intercept-ca.json`, created on first
    /// start). Every gateway replica must use the same file.
    pub intercept_ca: Option<PathBuf>,
    /// This instance's name (in `Via`, for loop detection, and in metrics).
    pub id: String,
    /// Where to exchange API keys and client certificates for mandates.
    pub sts_url: String,
    pub sidecars: Vec<SidecarConfig>,
    /// Largest request body read to find the JSON `model` / MCP tool (bigger: 413).
    pub max_inspect_body: usize,
    pub upstream_connect_timeout: Duration,
    pub upstream_read_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    pub agent_rate_per_sec: u32,
    pub agent_rate_burst: u32,
    /// How long a checked DNS answer is reused.
    pub dns_ttl: Duration,
    pub audit_buffer: usize,
    /// mTLS listener (client certificates map to agents).
    pub tls_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Source addresses for upstream connections (one per family at most; empty: the
    /// system's choice). Pins egress to known addresses for firewalls; tests bind loopback so
    /// that no packet can leave the machine even if the egress guard were broken.
    pub upstream_bind: Vec<IpAddr>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub database: DatabaseConfig,
    pub bus: BusConfig,
    pub keys: KeysConfig,
    pub telemetry: TelemetryConfig,
    pub http: HttpConfig,
    pub control: ControlConfig,
    pub sts: StsConfig,
    pub coordinator: CoordinatorConfig,
    pub audit: AuditConfig,
    pub gateway: GatewayConfig,
}

pub const DEFAULT_GATEWAY_PORT: u16 = 7400;
pub const DEFAULT_GATEWAY_ADMIN_PORT: u16 = 7401;
pub const DEFAULT_CONTROL_PORT: u16 = 7402;
pub const DEFAULT_STS_PORT: u16 = 7403;
pub const DEFAULT_COORDINATOR_PORT: u16 = 7404;
pub const DEFAULT_AUDIT_PORT: u16 = 7405;

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Config {
    /// Load from an optional file plus the environment; all problems are reported together.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
        Config::from_source(Source::load(path))
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_source(Source::from_toml(text))
    }

    pub fn from_source(src: Source) -> Result<Config, ConfigErrors> {
        let data_dir: PathBuf = src.get("data_dir", PathBuf::from(".caracal"));
        let default_db = format!("sqlite://{}/caracal.db", data_dir.display());

        let database = DatabaseConfig {
            url: src.get("database.url", default_db),
            max_connections: src.get("database.max_connections", 16u32),
            acquire_timeout: src.parse_with("database.acquire_timeout", Duration::from_secs(3), parse_duration),
            statement_timeout: src.parse_with("database.statement_timeout", Duration::from_secs(30), parse_duration),
            idle_in_transaction_timeout: src.parse_with(
                "database.idle_in_transaction_timeout",
                Duration::from_secs(60),
                parse_duration,
            ),
        };
        if database.kind().is_none() {
            src.invalid("database.url", "must start with postgres:// or sqlite:");
        }
        if database.max_connections == 0 {
            src.invalid("database.max_connections", "must be at least 1");
        }

        let backend = src.parse_with("bus.backend", BusBackend::Embedded, |s| match s {
            "embedded" => Ok(BusBackend::Embedded),
            "redis" => Ok(BusBackend::Redis),
            other => Err(format!("unknown bus backend {other:?} (use embedded or redis)")),
        });
        let bus = BusConfig {
            backend,
            redis_url: src.get("bus.redis_url", "redis://127.0.0.1:6379".to_string()),
            redis_prefix: src.get("bus.redis_prefix", String::new()),
            claim_idle: src.parse_with("bus.claim_idle", Duration::from_secs(30), parse_duration),
            block: src.parse_with("bus.block", Duration::from_secs(1), parse_duration),
            max_message_age: src.parse_with("bus.max_message_age", Duration::from_secs(7 * 86_400), parse_duration),
        };
        if bus.backend == BusBackend::Redis
            && !(bus.redis_url.starts_with("redis://") || bus.redis_url.starts_with("rediss://"))
        {
            src.invalid("bus.redis_url", "must start with redis:// or rediss://");
        }
        if bus.backend == BusBackend::Embedded && database.kind() != Some(DbKind::Sqlite) {
            src.invalid(
                "bus.backend",
                "the embedded bus lives in the SQLite database; use bus.backend = \"redis\" with Postgres",
            );
        }
        if bus.claim_idle < Duration::from_millis(100) {
            src.invalid("bus.claim_idle", "must be at least 100ms");
        }

        let keys = KeysConfig {
            bus: load_ring(&src, "keys.bus"),
            internal: load_ring(&src, "keys.internal"),
            seal: load_ring(&src, "keys.seal"),
            pepper: load_ring(&src, "keys.pepper"),
        };

        let telemetry = TelemetryConfig {
            log_format: src.parse_with("telemetry.log_format", LogFormat::Pretty, |s| match s {
                "json" => Ok(LogFormat::Json),
                "pretty" | "text" => Ok(LogFormat::Pretty),
                other => Err(format!("unknown log format {other:?} (use json or pretty)")),
            }),
            log_level: src.get("telemetry.log_level", "info".to_string()),
        };
        if tracing_subscriber::EnvFilter::try_new(&telemetry.log_level).is_err() {
            src.invalid("telemetry.log_level", "not a valid tracing filter");
        }

        let http = HttpConfig {
            max_body_bytes: src.get("http.max_body_bytes", 1024 * 1024usize),
            request_timeout: src.parse_with("http.request_timeout", Duration::from_secs(30), parse_duration),
            grace_period: src.parse_with("http.grace_period", Duration::from_secs(10), parse_duration),
            rate_limit_per_sec: src.get("http.rate_limit_per_sec", 200u32),
            rate_limit_burst: src.get("http.rate_limit_burst", 400u32),
        };
        if http.max_body_bytes < 1024 {
            src.invalid("http.max_body_bytes", "must be at least 1024");
        }
        if http.rate_limit_per_sec == 0 || http.rate_limit_burst == 0 {
            src.invalid("http.rate_limit_per_sec", "rate limits must be positive");
        }

        let addr = |key: &str, port: u16| -> SocketAddr {
            src.parse_with(key, loopback(port), |s| {
                s.parse::<SocketAddr>()
                    .map_err(|e| format!("not a socket address ({e}); example: 127.0.0.1:{port}"))
            })
        };
        let control = ControlConfig {
            listen: addr("control.listen", DEFAULT_CONTROL_PORT),
            secret_dir: src.opt("control.secret_dir"),
        };
        let sts = StsConfig {
            listen: addr("sts.listen", DEFAULT_STS_PORT),
            tls_listen: src.opt::<String>("sts.tls_listen").and_then(|s| match s.parse() {
                Ok(a) => Some(a),
                Err(e) => {
                    src.invalid("sts.tls_listen", format!("not a socket address ({e})"));
                    None
                }
            }),
            tls_cert: src.opt("sts.tls_cert"),
            tls_key: src.opt("sts.tls_key"),
            default_lifetime: src.parse_with("sts.default_lifetime", Duration::from_secs(300), parse_duration),
            approval_ttl: src.parse_with("sts.approval_ttl", Duration::from_secs(600), parse_duration),
            approval_interval: src.parse_with("sts.approval_interval", Duration::from_secs(2), parse_duration),
            max_delegation_depth: src.get("sts.max_delegation_depth", 8i64),
            max_delegation_fanout: src.get("sts.max_delegation_fanout", 1000i64),
            egress_allow: src
                .get::<Vec<String>>("sts.egress_allow", Vec::new())
                .iter()
                .filter_map(|c| match c.parse() {
                    Ok(c) => Some(c),
                    Err(e) => {
                        src.invalid("sts.egress_allow", e);
                        None
                    }
                })
                .collect(),
            auth_failures_per_minute: src.get("sts.auth_failures_per_minute", 10u32),
            jwks_min_refresh: src.parse_with("sts.jwks_min_refresh", Duration::from_secs(2), parse_duration),
        };
        if sts.tls_listen.is_some() && (sts.tls_cert.is_none() || sts.tls_key.is_none()) {
            src.invalid("sts.tls_listen", "needs sts.tls_cert and sts.tls_key");
        }
        if sts.default_lifetime < Duration::from_secs(10) || sts.default_lifetime > Duration::from_secs(86_400) {
            src.invalid("sts.default_lifetime", "must be between 10s and 24h");
        }
        if sts.max_delegation_depth < 1 || sts.max_delegation_fanout < 1 {
            src.invalid("sts.max_delegation_depth", "delegation limits must be at least 1");
        }
        let dur = |k: &str, d: u64| src.parse_with(k, Duration::from_secs(d), parse_duration);
        let coordinator = CoordinatorConfig {
            listen: addr("coordinator.listen", DEFAULT_COORDINATOR_PORT),
            session_ttl: dur("coordinator.session_ttl", 3600),
            max_session_ttl: dur("coordinator.max_session_ttl", 7 * 86_400),
            heartbeat_timeout: dur("coordinator.heartbeat_timeout", 120),
            max_lease_ttl: dur("coordinator.max_lease_ttl", 3600),
            max_invocation_deadline: dur("coordinator.max_invocation_deadline", 86_400),
            max_invocation_attempts: src.get("coordinator.max_invocation_attempts", 10u32),
            sweep_interval: src.parse_with("coordinator.sweep_interval", Duration::from_millis(500), parse_duration),
            max_active_sessions: src.get("coordinator.max_active_sessions", 100_000u64),
            max_leases: src.get("coordinator.max_leases", 10_000u64),
            max_open_invocations: src.get("coordinator.max_open_invocations", 100_000u64),
            max_cascade: src.get("coordinator.max_cascade", 100_000usize),
        };
        if coordinator.session_ttl.is_zero() || coordinator.session_ttl > coordinator.max_session_ttl {
            src.invalid(
                "coordinator.session_ttl",
                "must be positive and at most coordinator.max_session_ttl",
            );
        }
        if coordinator.heartbeat_timeout < Duration::from_secs(1) {
            src.invalid("coordinator.heartbeat_timeout", "must be at least 1s");
        }
        if coordinator.max_lease_ttl < Duration::from_secs(1)
            || coordinator.max_invocation_deadline < Duration::from_secs(1)
        {
            src.invalid(
                "coordinator.max_lease_ttl",
                "lease and invocation limits must be at least 1s",
            );
        }
        if !(1..=100).contains(&coordinator.max_invocation_attempts) {
            src.invalid("coordinator.max_invocation_attempts", "must be between 1 and 100");
        }
        if coordinator.sweep_interval < Duration::from_millis(10) {
            src.invalid("coordinator.sweep_interval", "must be at least 10ms");
        }
        if coordinator.max_cascade < 1 {
            src.invalid("coordinator.max_cascade", "must be at least 1");
        }
        let audit = AuditConfig {
            listen: addr("audit.listen", DEFAULT_AUDIT_PORT),
            head_interval: src.parse_with("audit.head_interval", Duration::from_secs(1), parse_duration),
            batch: src.get("audit.batch", 1000usize),
            max_clock_skew: src.parse_with("audit.max_clock_skew", Duration::from_secs(300), parse_duration),
            retention: src.parse_with("audit.retention", None, |s| parse_duration(s).map(Some)),
            retention_interval: src.parse_with("audit.retention_interval", Duration::from_secs(600), parse_duration),
            partition_entries: src.get("audit.partition_entries", 1u64 << 22),
        };
        if !(16..=1u64 << 40).contains(&audit.partition_entries) {
            src.invalid("audit.partition_entries", "must be between 16 and 2^40");
        }
        // Shorter would let an event redelivered late (a consumer's pending entry reclaimed
        // after its lease) land again once its first copy is gone.
        if audit.retention.is_some_and(|r| r < Duration::from_secs(3600)) {
            src.invalid("audit.retention", "must be at least 1h");
        }
        if audit.retention_interval < Duration::from_secs(1) {
            src.invalid("audit.retention_interval", "must be at least 1s");
        }
        if audit.head_interval < Duration::from_millis(10) {
            src.invalid("audit.head_interval", "must be at least 10ms");
        }
        if !(1..=10_000).contains(&audit.batch) {
            src.invalid("audit.batch", "must be between 1 and 10000");
        }
        let gateway = GatewayConfig {
            listen: addr("gateway.listen", DEFAULT_GATEWAY_PORT),
            admin_listen: addr("gateway.admin_listen", DEFAULT_GATEWAY_ADMIN_PORT),
            threads: src.get("gateway.threads", 1usize),
            revocation_staleness: src.parse_with(
                "gateway.revocation_staleness",
                Duration::from_secs(30),
                parse_duration,
            ),
            budget_lease_ttl: src.parse_with("gateway.budget_lease_ttl", Duration::from_secs(30), parse_duration),
            revocation_reconcile_interval: src.parse_with(
                "gateway.revocation_reconcile_interval",
                Duration::from_secs(10),
                parse_duration,
            ),
            id: src.get("gateway.id", format!("caracal-gw-{}", std::process::id())),
            sts_url: src.get("gateway.sts_url", format!("http://127.0.0.1:{DEFAULT_STS_PORT}")),
            sidecars: src.get("gateway.sidecars", Vec::new()),
            max_inspect_body: src.get("gateway.max_inspect_body", 4 * 1024 * 1024usize),
            upstream_connect_timeout: src.parse_with(
                "gateway.upstream_connect_timeout",
                Duration::from_secs(5),
                parse_duration,
            ),
            upstream_read_timeout: src.parse_with(
                "gateway.upstream_read_timeout",
                Duration::from_secs(300),
                parse_duration,
            ),
            tunnel_idle_timeout: src.parse_with(
                "gateway.tunnel_idle_timeout",
                Duration::from_secs(600),
                parse_duration,
            ),
            agent_rate_per_sec: src.get("gateway.agent_rate_per_sec", 1000u32),
            agent_rate_burst: src.get("gateway.agent_rate_burst", 2000u32),
            dns_ttl: src.parse_with("gateway.dns_ttl", Duration::from_secs(30), parse_duration),
            audit_buffer: src.get("gateway.audit_buffer", 65_536usize),
            tls_listen: src.opt::<String>("gateway.tls_listen").and_then(|s| match s.parse() {
                Ok(a) => Some(a),
                Err(e) => {
                    src.invalid("gateway.tls_listen", format!("not a socket address ({e})"));
                    None
                }
            }),
            tls_cert: src.opt("gateway.tls_cert"),
            tls_key: src.opt("gateway.tls_key"),
            intercept_ca: src.opt("gateway.intercept_ca"),
            upstream_bind: src
                .get::<Vec<String>>("gateway.upstream_bind", Vec::new())
                .iter()
                .filter_map(|a| match a.parse::<IpAddr>() {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        src.invalid("gateway.upstream_bind", format!("{a:?} is not an IP address"));
                        None
                    }
                })
                .collect(),
        };
        if gateway.upstream_bind.iter().filter(|a| a.is_ipv4()).count() > 1
            || gateway.upstream_bind.iter().filter(|a| a.is_ipv6()).count() > 1
        {
            src.invalid("gateway.upstream_bind", "at most one IPv4 and one IPv6 address");
        }
        for (i, sc) in gateway.sidecars.iter().enumerate() {
            if sc.listen.parse::<SocketAddr>().is_err() {
                src.invalid(&format!("gateway.sidecars[{i}].listen"), "not a socket address");
            }
        }
        if !(gateway.sts_url.starts_with("http://") || gateway.sts_url.starts_with("https://")) {
            src.invalid("gateway.sts_url", "must be an http(s) URL");
        }
        if gateway.tls_listen.is_some() && (gateway.tls_cert.is_none() || gateway.tls_key.is_none()) {
            src.invalid("gateway.tls_listen", "needs gateway.tls_cert and gateway.tls_key");
        }
        if gateway.threads == 0 {
            src.invalid("gateway.threads", "must be at least 1");
        }
        for (key, d) in [
            ("gateway.revocation_staleness", gateway.revocation_staleness),
            (
                "gateway.revocation_reconcile_interval",
                gateway.revocation_reconcile_interval,
            ),
            ("gateway.upstream_connect_timeout", gateway.upstream_connect_timeout),
            ("gateway.upstream_read_timeout", gateway.upstream_read_timeout),
            ("gateway.tunnel_idle_timeout", gateway.tunnel_idle_timeout),
        ] {
            if d < Duration::from_millis(10) {
                src.invalid(key, "must be at least 10ms");
            }
        }

        src.finish()?;
        Ok(Config {
            data_dir,
            database,
            bus,
            keys,
            telemetry,
            http,
            control,
            sts,
            coordinator,
            audit,
            gateway,
        })
    }
}

/// Read a key ring: `<prefix>.active = "id"` and `<prefix>.keys.<id> = "<secret spec>"`.
fn load_ring(src: &Source, prefix: &str) -> Option<KeyRing> {
    let keys_prefix = format!("{prefix}.keys");
    let raw = src.take_subtree(&keys_prefix);
    let active: Option<String> = src.opt(&format!("{prefix}.active"));
    if raw.is_empty() && active.is_none() {
        return None;
    }
    let mut keys = BTreeMap::new();
    for (id, v) in raw {
        let key = format!("{keys_prefix}.{id}");
        let Some(spec) = v.as_str() else {
            src.invalid(
                &key,
                "must be a string such as \"env:VAR\", \"file:/path\" or \"base64:…\"",
            );
            continue;
        };
        match Secret::from_spec(spec) {
            Ok(s) if s.len() >= 32 => {
                keys.insert(id, s);
            }
            Ok(_) => src.invalid(&key, "secret must be at least 32 bytes"),
            Err(e) => src.invalid(&key, e),
        }
    }
    let Some(active) = active else {
        src.invalid(&format!("{prefix}.active"), "required when keys are given");
        return None;
    };
    match KeyRing::new(active, keys) {
        Ok(r) => Some(r),
        Err(e) => {
            src.invalid(&format!("{prefix}.active"), e);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_embedded_and_loopback() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.database.kind(), Some(DbKind::Sqlite));
        assert_eq!(c.bus.backend, BusBackend::Embedded);
        assert!(c.control.listen.ip().is_loopback());
        for port in [5432, 3306, 6379, 5672, 15672, 25672, 1883, 4222, 8222] {
            for a in [c.control.listen, c.sts.listen, c.coordinator.listen, c.audit.listen] {
                assert_ne!(a.port(), port);
            }
            assert_ne!(c.gateway.listen.port(), port);
            assert_ne!(c.gateway.admin_listen.port(), port);
        }
    }

    #[test]
    fn every_problem_is_listed() {
        let text = r#"
            [database]
            url = "mysql://x"
            [bus]
            backend = "kafka"
            [control]
            listen = "nowhere"
            [gateway]
            threads = 0
            colour = "red"
            [keys.bus]
            active = "k9"
            [keys.bus.keys]
            k1 = "base64:c2hvcnQ="
        "#;
        let errs = Config::from_toml(text).unwrap_err().0;
        let joined = errs.join("\n");
        for needle in [
            "database.url",
            "bus.backend",
            "control.listen",
            "gateway.threads",
            "gateway.colour: unknown",
            "keys.bus.keys.k1: secret must be at least 32 bytes",
            "keys.bus.active",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in:\n{joined}");
        }
    }

    #[test]
    fn database_url_password_is_redacted() {
        let c = Config::from_toml("[database]\nurl = \"postgres://u:supersecret@db/x\"\n[bus]\nbackend = \"redis\"\n")
            .unwrap();
        assert!(!format!("{c:?}").contains("supersecret"));
    }
}

//! Test support shared by every crate's tests: real backends, isolated per test.
//!
//! - Postgres: `CARACAL_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`);
//!   each test gets a fresh database, dropped by [`TestDb::cleanup`].
//! - Redis: `CARACAL_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); each test gets a
//!   unique key prefix.
//! - SQLite: a fresh file in a temporary directory.
//!
//! When Postgres or Redis is unreachable the test is **skipped with a loud message**, unless
//! `CARACAL_REQUIRE_SERVICES=1`, in which case it fails (CI sets it).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::bus::{Bus, BusAuth, embedded::EmbeddedBus, redis::RedisBus};
use crate::config::{BusBackend, Config, DatabaseConfig};
use crate::crypto::KeyRing;
use crate::metrics::BusMetrics;
use crate::shutdown::Shutdown;
use crate::store::Store;

pub fn pg_admin_url() -> String {
    std::env::var("CARACAL_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("CARACAL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn services_required() -> bool {
    std::env::var("CARACAL_REQUIRE_SERVICES")
        .map(|v| v == "1")
        .unwrap_or(false)
}

/// Skip (loudly) or fail, depending on `CARACAL_REQUIRE_SERVICES`.
pub fn unavailable(what: &str, why: &str) {
    if services_required() {
        panic!("{what} is required (CARACAL_REQUIRE_SERVICES=1) but unavailable: {why}");
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED: {what} unavailable ({why}); set CARACAL_REQUIRE_SERVICES=1 to make this a failure !!!!!!!!\n"
    );
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        n,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// An isolated database for one test.
pub struct TestDb {
    pub store: Store,
    pub url: String,
    pg_name: Option<String>,
    dir: Option<PathBuf>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => Some(TestDb::sqlite().await),
            Backend::Postgres => TestDb::postgres().await,
        }
    }

    pub async fn sqlite() -> TestDb {
        let dir = std::env::temp_dir().join(unique("caracal_test"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("sqlite://{}/caracal.db", dir.display());
        let store = Store::open(&db_config(&url)).await.expect("open sqlite");
        TestDb {
            store,
            url,
            pg_name: None,
            dir: Some(dir),
        }
    }

    pub async fn postgres() -> Option<TestDb> {
        let admin_url = pg_admin_url();
        let admin = match tokio::time::timeout(Duration::from_secs(5), sqlx::PgPool::connect(&admin_url)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                unavailable("PostgreSQL", &e.to_string());
                return None;
            }
            Err(_) => {
                unavailable("PostgreSQL", "connect timed out");
                return None;
            }
        };
        reap_stale_databases(&admin).await;
        let name = unique("caracal_t");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = with_database(&admin_url, &name);
        let store = Store::open(&db_config(&url)).await.expect("open postgres");
        Some(TestDb {
            store,
            url,
            pg_name: Some(name),
            dir: None,
        })
    }

    pub fn backend(&self) -> Backend {
        if self.pg_name.is_some() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    /// Drop the database / remove the files.
    pub async fn cleanup(self) {
        self.store.close().await;
        if let Some(name) = self.pg_name
            && let Ok(admin) = sqlx::PgPool::connect(&pg_admin_url()).await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&admin)
            .await;
            admin.close().await;
        }
        if let Some(dir) = self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Drop test databases left behind by test processes that no longer run.
async fn reap_stale_databases(admin: &sqlx::PgPool) {
    let rows: Vec<(String,)> = sqlx::query_as("SELECT datname FROM pg_database WHERE datname LIKE 'caracal_t_%'")
        .fetch_all(admin)
        .await
        .unwrap_or_default();
    for (name,) in rows {
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(admin)
            .await;
        }
    }
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

pub fn db_config(url: &str) -> DatabaseConfig {
    DatabaseConfig {
        url: url.to_string(),
        max_connections: 8,
        acquire_timeout: Duration::from_secs(10),
        statement_timeout: Duration::from_secs(60),
        idle_in_transaction_timeout: Duration::from_secs(120),
    }
}

/// A bus for one test: the embedded bus on `store`, or Redis with a unique key prefix.
pub async fn test_bus(backend: BusBackend, store: &Store) -> Option<Arc<dyn Bus>> {
    match backend {
        BusBackend::Embedded => Some(Arc::new(EmbeddedBus::new(store.clone()))),
        BusBackend::Redis => {
            let prefix = format!("{}:", unique("caracal_test"));
            let bus = match RedisBus::connect(&redis_url(), &prefix).await {
                Ok(b) => b,
                Err(e) => {
                    unavailable("Redis", &e.to_string());
                    return None;
                }
            };
            match tokio::time::timeout(Duration::from_secs(3), bus.ping()).await {
                Ok(Ok(())) => Some(Arc::new(bus)),
                Ok(Err(e)) => {
                    unavailable("Redis", &e.to_string());
                    None
                }
                Err(_) => {
                    unavailable("Redis", "PING timed out");
                    None
                }
            }
        }
    }
}

pub fn test_bus_auth(ring: &KeyRing) -> BusAuth {
    BusAuth::new(ring.clone(), Duration::from_secs(3600), BusMetrics::detached())
}

/// A configuration for in-process tests: every listener on an ephemeral loopback port is
/// chosen by the caller; keys are generated.
pub fn test_config(db_url: &str, bus: BusBackend) -> Config {
    let mut c = Config::from_toml("").expect("default config");
    c.database = db_config(db_url);
    c.bus.backend = bus;
    c.bus.redis_url = redis_url();
    c.bus.redis_prefix = format!("{}:", unique("caracal_test"));
    c.bus.claim_idle = Duration::from_millis(500);
    c.bus.block = Duration::from_millis(200);
    c.keys.bus = Some(KeyRing::generate("bus-test"));
    c.keys.internal = Some(KeyRing::generate("internal-test"));
    c.keys.seal = Some(KeyRing::generate("seal-test"));
    c.keys.pepper = Some(KeyRing::generate("pepper-test"));
    c.http.rate_limit_per_sec = 100_000;
    c.http.rate_limit_burst = 100_000;
    // Upstream connections leave from loopback: the kernel refuses to route them anywhere
    // else, so no test packet can leave the machine whatever the egress guard decides.
    c.gateway.upstream_bind = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    c
}

/// Poll `f` until it returns true or `timeout` passes (no fixed sleeps in tests).
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A shutdown token for tests.
pub fn shutdown() -> Shutdown {
    Shutdown::new()
}

/// A bus wrapper that injects publish faults: fail every publish after `fail_after` successful
/// ones (a relay "killed" mid-batch), or silently drop the publish with a given index (a lost
/// or deleted entry).
pub struct FaultyBus {
    inner: Arc<dyn Bus>,
    published: std::sync::atomic::AtomicI64,
    fail_after: std::sync::atomic::AtomicI64,
    drop_index: std::sync::atomic::AtomicI64,
    fail_reads: std::sync::atomic::AtomicBool,
    fail_acks: std::sync::atomic::AtomicBool,
}

impl FaultyBus {
    pub fn new(inner: Arc<dyn Bus>) -> Self {
        FaultyBus {
            inner,
            published: std::sync::atomic::AtomicI64::new(0),
            fail_after: std::sync::atomic::AtomicI64::new(-1),
            drop_index: std::sync::atomic::AtomicI64::new(-1),
            fail_reads: std::sync::atomic::AtomicBool::new(false),
            fail_acks: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Make every read fail (a bus outage as readers see it) until switched back.
    pub fn fail_reads(&self, on: bool) {
        self.fail_reads.store(on, Ordering::SeqCst);
    }

    /// Make every acknowledgement fail (a consumer that dies after its effect was committed
    /// but before XACK) until switched back.
    pub fn fail_acks(&self, on: bool) {
        self.fail_acks.store(on, Ordering::SeqCst);
    }

    fn check_reads(&self) -> crate::Result<()> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(crate::Error::new(
                crate::ErrorCode::BusUnavailable,
                "injected read failure",
            ));
        }
        Ok(())
    }

    pub fn fail_after(&self, n: i64) {
        self.fail_after.store(n, Ordering::SeqCst);
    }

    pub fn drop_publish(&self, index: i64) {
        self.drop_index.store(index, Ordering::SeqCst);
    }

    pub fn published(&self) -> i64 {
        self.published.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Bus for FaultyBus {
    async fn publish(&self, stream: &str, payload: bytes::Bytes) -> crate::Result<String> {
        let n = self.published.load(Ordering::SeqCst);
        let limit = self.fail_after.load(Ordering::SeqCst);
        if limit >= 0 && n >= limit {
            return Err(crate::Error::new(
                crate::ErrorCode::BusUnavailable,
                "injected publish failure",
            ));
        }
        self.published.fetch_add(1, Ordering::SeqCst);
        if self.drop_index.load(Ordering::SeqCst) == n {
            return Ok("0-0".into());
        }
        self.inner.publish(stream, payload).await
    }
    // publish_many uses the default (one publish at a time) so faults land mid-batch.
    async fn ensure_group(&self, s: &str, g: &str) -> crate::Result<()> {
        self.inner.ensure_group(s, g).await
    }
    async fn read_group(
        &self,
        s: &str,
        g: &str,
        c: &str,
        n: usize,
        b: Duration,
    ) -> crate::Result<Vec<crate::bus::Entry>> {
        self.inner.read_group(s, g, c, n, b).await
    }
    async fn read_own_pending(&self, s: &str, g: &str, c: &str, n: usize) -> crate::Result<Vec<crate::bus::Entry>> {
        self.inner.read_own_pending(s, g, c, n).await
    }
    async fn ack(&self, s: &str, g: &str, ids: &[String]) -> crate::Result<()> {
        if self.fail_acks.load(Ordering::SeqCst) && !ids.is_empty() {
            return Err(crate::Error::new(
                crate::ErrorCode::BusUnavailable,
                "injected ack failure",
            ));
        }
        self.inner.ack(s, g, ids).await
    }
    async fn claim_idle(
        &self,
        s: &str,
        g: &str,
        c: &str,
        i: Duration,
        n: usize,
    ) -> crate::Result<Vec<crate::bus::Entry>> {
        self.inner.claim_idle(s, g, c, i, n).await
    }
    async fn read_after(&self, s: &str, a: &str, n: usize, b: Duration) -> crate::Result<Vec<crate::bus::Entry>> {
        self.check_reads()?;
        self.inner.read_after(s, a, n, b).await
    }
    async fn last_id(&self, s: &str) -> crate::Result<String> {
        self.inner.last_id(s).await
    }
    async fn pending_count(&self, s: &str, g: &str) -> crate::Result<u64> {
        self.inner.pending_count(s, g).await
    }
    async fn trim_acknowledged(&self, s: &str) -> crate::Result<u64> {
        self.inner.trim_acknowledged(s).await
    }
    async fn len(&self, s: &str) -> crate::Result<u64> {
        self.inner.len(s).await
    }
    async fn ping(&self) -> crate::Result<()> {
        self.inner.ping().await
    }
}

/// A store and a bus of matching kind for one test: SQLite + embedded bus, or Postgres + Redis.
pub struct BusEnv {
    pub db: TestDb,
    pub bus: Arc<dyn Bus>,
    pub ring: KeyRing,
}

impl BusEnv {
    pub async fn new(backend: BusBackend) -> Option<BusEnv> {
        let db = match backend {
            BusBackend::Embedded => TestDb::sqlite().await,
            BusBackend::Redis => TestDb::postgres().await?,
        };
        let Some(bus) = test_bus(backend, &db.store).await else {
            db.cleanup().await;
            return None;
        };
        Some(BusEnv {
            db,
            bus,
            ring: KeyRing::generate("bus-test"),
        })
    }

    pub fn auth(&self) -> BusAuth {
        test_bus_auth(&self.ring)
    }

    pub async fn cleanup(self) {
        self.db.cleanup().await;
    }
}

/// A TCP forwarder in front of a real service (Postgres, Redis) that a test can cut and
/// restore, to simulate losing a dependency without touching the shared server.
pub struct TcpForwarder {
    pub addr: std::net::SocketAddr,
    target: std::net::SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
}

impl TcpForwarder {
    pub async fn start(target: std::net::SocketAddr) -> TcpForwarder {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind forwarder");
        let addr = l.local_addr().unwrap();
        let (stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(Self::serve(l, target, rx));
        TcpForwarder { addr, target, stop }
    }

    async fn serve(
        l: tokio::net::TcpListener,
        target: std::net::SocketAddr,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let (mut inbound, _) = tokio::select! {
                r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
                _ = stop.changed() => return,
            };
            let mut stop2 = stop.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = stop2.changed() => {}
                }
            });
        }
    }

    /// Close the listener and every forwarded connection.
    pub fn cut(&self) {
        let _ = self.stop.send(true);
    }

    /// Listen again on the same port.
    pub async fn restore(&mut self) {
        let l = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (stop, rx) = tokio::sync::watch::channel(false);
        self.stop = stop;
        tokio::spawn(Self::serve(l, self.target, rx));
    }
}

/// Resolve `host:port` of a URL (for forwarders).
pub fn url_addr(url: &str, default_port: u16) -> std::net::SocketAddr {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    let hp = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:{default_port}")
    };
    use std::net::ToSocketAddrs;
    hp.to_socket_addrs().expect("resolvable").next().expect("an address")
}

/// Replace the host:port of a URL.
pub fn url_with_addr(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((u, r)) => (format!("{u}@"), r),
        None => (String::new(), rest),
    };
    let tail_start = rest.find(['/', '?']).unwrap_or(rest.len());
    format!("{scheme}://{userinfo}{addr}{}", &rest[tail_start..])
}

/// Test PKI: CAs and leaf certificates on the fly (rcgen).
pub mod pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

    pub struct Ca {
        pub issuer: CertifiedIssuer<'static, KeyPair>,
    }

    pub struct Leaf {
        pub cert_pem: String,
        pub key_pem: String,
        pub der: Vec<u8>,
    }

    impl Ca {
        pub fn new(cn: &str) -> Ca {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca");
            Ca { issuer }
        }

        pub fn pem(&self) -> String {
            self.issuer.pem()
        }

        /// A server certificate for the given DNS names / IPs.
        pub fn server(&self, names: &[&str]) -> Leaf {
            let p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
            self.sign(p)
        }

        /// A client certificate with a URI SAN and a CN.
        pub fn client(&self, uri: &str, cn: &str) -> Leaf {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.subject_alt_names.push(SanType::URI(uri.try_into().expect("uri")));
            p.distinguished_name.push(DnType::CommonName, cn);
            self.sign(p)
        }

        fn sign(&self, p: CertificateParams) -> Leaf {
            let key = KeyPair::generate().expect("key");
            let cert = p.signed_by(&key, &self.issuer).expect("sign");
            Leaf {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                der: cert.der().to_vec(),
            }
        }
    }

    impl Leaf {
        /// (chain, key) for a rustls client or server config.
        pub fn identity(
            &self,
        ) -> (
            Vec<rustls_pki_types::CertificateDer<'static>>,
            rustls_pki_types::PrivateKeyDer<'static>,
        ) {
            use rustls_pki_types::pem::PemObject;
            let chain = vec![rustls_pki_types::CertificateDer::from(self.der.clone())];
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key pem");
            (chain, key)
        }
    }
}

/// A loopback TCP port free now, for a listener bound later by its address (Pingora binds its
/// own listeners, the CLI and the STS take addresses from their config). It is chosen *below*
/// the kernel's ephemeral range: a port from binding `:0` lies inside that range, and the
/// outgoing connections of tests running meanwhile can take it before the listener binds.
/// Ports handed out in this process are not handed out again.
pub fn free_port() -> u16 {
    use std::hash::BuildHasher;
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let bind_any = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind a loopback port")
    };
    if ephemeral_low <= 12_000 {
        return bind_any();
    }
    let (from, span) = (10_000u16, ephemeral_low - 10_000);
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let seed = std::collections::hash_map::RandomState::new();
    for attempt in 0u32..1000 {
        let port = from + (seed.hash_one(attempt) % u64::from(span)) as u16;
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    bind_any()
}

//! Coordinator commands: `caracal sessions list|show|revoke` and `caracal revoke …` (one call
//! revokes everything the targets started, at every gateway). They use an admin token (read
//! scope to look, write scope to revoke).

use std::process::ExitCode;
use std::time::Duration;

use caracal_shared::http::client::HttpClient;
use clap::{Args, Subcommand, ValueEnum};
use http::Method;
use serde_json::{Value, json};

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// The coordinator service.
    #[arg(long, env = "CARACAL_COORDINATOR_URL", default_value = "http://127.0.0.1:7404")]
    pub coordinator: String,
    /// An admin token (read scope to look, write scope to revoke).
    #[arg(long, env = "CARACAL_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// With a platform token: the tenant to act in.
    #[arg(long, env = "CARACAL_TENANT")]
    pub tenant: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum SessionsCmd {
    /// List sessions (newest last), optionally filtered.
    List {
        #[command(flatten)]
        conn: Conn,
        /// active, completed, failed, expired or revoked
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        agent_id: Option<String>,
        #[arg(long)]
        parent_session: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Show one session.
    Show {
        #[command(flatten)]
        conn: Conn,
        session_id: String,
    },
    /// Revoke a session and everything it started (child sessions, delegated and bound
    /// mandates, invocations in flight).
    Revoke {
        #[command(flatten)]
        conn: Conn,
        session_id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
#[value(rename_all = "snake_case")]
pub enum Kind {
    Agent,
    Session,
    Delegation,
    Credential,
    Mandate,
    RevocationId,
    Tenant,
    Resource,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    #[command(flatten)]
    conn: Conn,
    /// What the values name.
    #[arg(value_enum)]
    kind: Kind,
    /// One or more ids (the bulk form revokes them all in one transaction).
    #[arg(required = true)]
    values: Vec<String>,
    /// Why (recorded in the audit ledger).
    #[arg(long)]
    reason: String,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

impl Conn {
    async fn call(&self, m: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let token = self
            .token
            .as_deref()
            .ok_or("an admin token is needed (--token or CARACAL_ADMIN_TOKEN)")?;
        let auth = format!("Bearer {token}");
        let mut h = vec![("authorization", auth.as_str())];
        if let Some(t) = &self.tenant {
            h.push(("x-caracal-tenant", t.as_str()));
        }
        let url = format!("{}{path}", self.coordinator.trim_end_matches('/'));
        let c = HttpClient::unrestricted().with_timeout(Duration::from_secs(60));
        let r = match body {
            Some(b) => c.send_json(m, &url, &h, &b).await,
            None => c.request(m, &url, &h, Default::default()).await,
        }
        .map_err(|e| format!("cannot reach the coordinator at {}: {}", self.coordinator, e.message))?;
        let v = r.json_value();
        if !r.status.is_success() {
            let msg = v["error"]["message"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| r.text());
            let code = v["error"]["code"].as_str().unwrap_or("");
            return Err(format!("{} {code}: {msg}", r.status.as_u16()));
        }
        Ok(v)
    }
}

fn enc(s: &str) -> String {
    caracal_shared::http::form_encode(s)
}

fn print_sessions(items: &[Value]) {
    println!(
        "{:<36}  {:<9}  {:<36}  {:<36}  STARTED",
        "SESSION", "STATUS", "AGENT", "PARENT"
    );
    for s in items {
        let started = s["started_at"]
            .as_i64()
            .and_then(|us| jiff::Timestamp::from_microsecond(us).ok())
            .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default();
        println!(
            "{:<36}  {:<9}  {:<36}  {:<36}  {started}",
            s["id"].as_str().unwrap_or(""),
            s["status"].as_str().unwrap_or(""),
            s["agent_id"].as_str().unwrap_or(""),
            s["parent_session"].as_str().unwrap_or("-"),
        );
    }
}

fn print_outcome(v: &Value, format: Format) {
    if format == Format::Json {
        println!("{v:#}");
        return;
    }
    let n = |k: &str| v[k].as_array().map(|a| a.len()).unwrap_or(0);
    println!(
        "revoked: {} session(s), {} mandate(s), {} delegation(s); {} invocation(s) cancelled; {} revocation record(s) {}",
        n("sessions_revoked"),
        n("mandates_revoked"),
        n("delegations_revoked"),
        v["invocations_cancelled"].as_u64().unwrap_or(0),
        n("revocations"),
        if v["published"] == false {
            "committed and queued for every gateway (the bus is behind)"
        } else {
            "published to every gateway"
        },
    );
    for s in v["sessions_revoked"].as_array().into_iter().flatten() {
        println!("  session {}", s.as_str().unwrap_or(""));
    }
}

pub fn run_sessions(cmd: SessionsCmd) -> ExitCode {
    runtime().block_on(async move {
        let r = match cmd {
            SessionsCmd::List {
                conn,
                status,
                agent_id,
                parent_session,
                limit,
                format,
            } => {
                let mut q = vec![format!("limit={}", limit.clamp(1, 200))];
                for (k, v) in [
                    ("status", status),
                    ("agent_id", agent_id),
                    ("parent_session", parent_session),
                ] {
                    if let Some(v) = v {
                        q.push(format!("{k}={}", enc(&v)));
                    }
                }
                conn.call(Method::GET, &format!("/v1/sessions?{}", q.join("&")), None)
                    .await
                    .map(|v| match format {
                        Format::Json => println!("{v:#}"),
                        Format::Table => print_sessions(v["items"].as_array().map(Vec::as_slice).unwrap_or(&[])),
                    })
            }
            SessionsCmd::Show { conn, session_id } => conn
                .call(Method::GET, &format!("/v1/sessions/{}", enc(&session_id)), None)
                .await
                .map(|v| println!("{v:#}")),
            SessionsCmd::Revoke {
                conn,
                session_id,
                reason,
            } => conn
                .call(
                    Method::POST,
                    &format!("/v1/sessions/{}/revoke", enc(&session_id)),
                    Some(json!({ "reason": reason })),
                )
                .await
                .map(|v| print_outcome(&v, Format::Table)),
        };
        match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        }
    })
}

pub fn run_revoke(a: RevokeArgs) -> ExitCode {
    runtime().block_on(async move {
        let kind = a
            .kind
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        let targets: Vec<Value> = a.values.iter().map(|v| json!({ "kind": kind, "value": v })).collect();
        match a
            .conn
            .call(
                Method::POST,
                "/v1/revocations",
                Some(json!({ "targets": targets, "reason": a.reason })),
            )
            .await
        {
            Ok(v) => {
                print_outcome(&v, a.format);
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        }
    })
}

//! Evidence commands (read-only): `caracal ledger query|export` and
//! `caracal merkle verify-range`. They talk to the audit service with an admin token holding
//! the `audit` scope, or — for verification — read an export file offline.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use caracal_shared::http::client::HttpClient;
use caracal_shared::ledger::{self, LedgerPublicKey, Problem, Record};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// The audit service.
    #[arg(long, env = "CARACAL_AUDIT_URL", default_value = "http://127.0.0.1:7405")]
    pub audit_url: String,
    /// An admin token with the `audit` scope.
    #[arg(long, env = "CARACAL_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// With a platform token: the tenant to look at.
    #[arg(long, env = "CARACAL_TENANT")]
    pub tenant: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum LedgerCmd {
    /// Entries of the ledger, newest filters first: by agent, resource, decision, time.
    Query {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        agent_id: Option<String>,
        #[arg(long)]
        resource_id: Option<String>,
        /// allow or deny
        #[arg(long)]
        decision: Option<String>,
        /// Event kind (decision, mint, revocation, agent.created, …)
        #[arg(long)]
        kind: Option<String>,
        /// From (RFC 3339, YYYY-MM-DD, or µs since the epoch)
        #[arg(long)]
        since: Option<String>,
        /// Until, exclusive
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u64,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Write a JSON Lines export (entries, signed heads and the hashes to verify them).
    Export {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// Output file (default: standard output)
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum MerkleCmd {
    /// Recompute every leaf and root of a time range and check them against the signed tree
    /// heads; report exactly what is wrong.
    VerifyRange {
        #[command(flatten)]
        conn: Conn,
        /// Start of the range (RFC 3339, YYYY-MM-DD, or µs since the epoch)
        #[arg(long)]
        start: Option<String>,
        /// End of the range, exclusive
        #[arg(long)]
        end: Option<String>,
        /// Verify this export file offline instead of asking the audit service
        #[arg(long)]
        file: Option<PathBuf>,
        /// Trusted public key(s), PEM. Without it the keys the audit service publishes are used
        /// (and a warning says so).
        #[arg(long)]
        public_key: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: ReportFormat,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Text,
    Json,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn client() -> HttpClient {
    HttpClient::unrestricted().with_timeout(Duration::from_secs(120))
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

impl Conn {
    fn headers(&self) -> Result<Vec<(&'static str, String)>, String> {
        let token = self
            .token
            .as_deref()
            .ok_or("an admin token with the audit scope is needed (--token or CARACAL_ADMIN_TOKEN)")?;
        let mut h = vec![("authorization", format!("Bearer {token}"))];
        if let Some(t) = &self.tenant {
            h.push(("x-caracal-tenant", t.clone()));
        }
        Ok(h)
    }

    async fn get(
        &self,
        path_and_query: &str,
        auth: bool,
    ) -> Result<caracal_shared::http::client::ClientResponse, String> {
        let owned = if auth { self.headers()? } else { Vec::new() };
        let h: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let url = format!("{}{path_and_query}", self.audit_url.trim_end_matches('/'));
        let r = client()
            .get_with(&url, &h)
            .await
            .map_err(|e| format!("cannot reach the audit service at {}: {}", self.audit_url, e.message))?;
        if !r.status.is_success() {
            let v = r.json_value();
            let msg = v["error"]["message"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| r.text());
            return Err(format!(
                "{} {}: {msg}",
                r.status.as_u16(),
                path_and_query.split('?').next().unwrap_or("")
            ));
        }
        Ok(r)
    }
}

fn enc(s: &str) -> String {
    caracal_shared::http::form_encode(s)
}

fn time_arg(name: &str, v: &Option<String>) -> Result<Option<i64>, String> {
    v.as_deref()
        .map(|s| caracal_audit::api::parse_time(name, s).map_err(|e| e.message.to_string()))
        .transpose()
}

fn fmt_time(us: i64) -> String {
    jiff::Timestamp::from_microsecond(us)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|_| us.to_string())
}

pub fn run_ledger(cmd: LedgerCmd) -> ExitCode {
    runtime().block_on(async move {
        match cmd {
            LedgerCmd::Query {
                conn,
                agent_id,
                resource_id,
                decision,
                kind,
                since,
                until,
                limit,
                format,
            } => {
                let mut q = vec![format!("limit={}", limit.clamp(1, 10_000))];
                for (k, v) in [
                    ("agent_id", &agent_id),
                    ("resource_id", &resource_id),
                    ("decision", &decision),
                    ("kind", &kind),
                ] {
                    if let Some(v) = v {
                        q.push(format!("{k}={}", enc(v)));
                    }
                }
                for (k, v) in [("since", &since), ("until", &until)] {
                    match time_arg(k, v) {
                        Ok(Some(us)) => q.push(format!("{k}={us}")),
                        Ok(None) => {}
                        Err(e) => return fail(e),
                    }
                }
                let r = match conn.get(&format!("/v1/ledger/entries?{}", q.join("&")), true).await {
                    Ok(r) => r,
                    Err(e) => return fail(e),
                };
                let v = r.json_value();
                let items = v["items"].as_array().cloned().unwrap_or_default();
                match format {
                    Format::Json => {
                        for i in &items {
                            println!("{i}");
                        }
                    }
                    Format::Table => print_table(&items),
                }
                ExitCode::SUCCESS
            }
            LedgerCmd::Export {
                conn,
                since,
                until,
                out,
            } => {
                let mut q = vec!["sign=true".to_string()];
                for (k, v) in [("since", &since), ("until", &until)] {
                    match time_arg(k, v) {
                        Ok(Some(us)) => q.push(format!("{k}={us}")),
                        Ok(None) => {}
                        Err(e) => return fail(e),
                    }
                }
                let text = match conn.get(&format!("/v1/ledger/export?{}", q.join("&")), true).await {
                    Ok(r) => r.text(),
                    Err(e) => return fail(e),
                };
                match out {
                    Some(p) => {
                        if let Err(e) = std::fs::write(&p, text) {
                            return fail(format!("cannot write {}: {e}", p.display()));
                        }
                    }
                    None => print!("{text}"),
                }
                ExitCode::SUCCESS
            }
        }
    })
}

fn print_table(items: &[Value]) {
    println!(
        "{:>8}  {:<24}  {:<12}  {:<6}  {:<30}  {:<30}  DETAIL",
        "SEQ", "TIME", "KIND", "DEC", "AGENT", "RESOURCE"
    );
    for i in items {
        let body = &i["body"];
        let detail = match (body["method"].as_str(), body["host"].as_str(), body["path"].as_str()) {
            (Some(m), Some(h), p) => format!("{m} {h}{} {}", p.unwrap_or(""), body["reason"].as_str().unwrap_or("")),
            _ => body["reason"]
                .as_str()
                .or(body["error"].as_str())
                .or(body["type"].as_str())
                .unwrap_or("")
                .to_string(),
        };
        println!(
            "{:>8}  {:<24}  {:<12}  {:<6}  {:<30}  {:<30}  {}",
            i["seq"],
            fmt_time(i["occurred_at"].as_i64().unwrap_or(0)),
            i["kind"].as_str().unwrap_or(""),
            i["decision"].as_str().unwrap_or("-"),
            i["agent_id"].as_str().unwrap_or("-"),
            i["resource_id"].as_str().unwrap_or("-"),
            detail.trim()
        );
    }
    println!("({} entries)", items.len());
}

pub fn run_merkle(cmd: MerkleCmd) -> ExitCode {
    let MerkleCmd::VerifyRange {
        conn,
        start,
        end,
        file,
        public_key,
        format,
    } = cmd;
    runtime().block_on(async move {
        let mut warnings = Vec::new();
        let keys: Vec<LedgerPublicKey> = match &public_key {
            Some(p) => match std::fs::read_to_string(p)
                .map_err(|e| e.to_string())
                .and_then(|t| LedgerPublicKey::from_pem(&t).map_err(|e| e.message.to_string()))
            {
                Ok(k) => k,
                Err(e) => return fail(format!("cannot read the public key {}: {e}", p.display())),
            },
            None => {
                warnings.push(
                    "no --public-key: trusting the keys the audit service publishes (pin them for an independent check)"
                        .to_string(),
                );
                match fetch_keys(&conn, file.as_ref()).await {
                    Ok(k) => k,
                    Err(e) => return fail(e),
                }
            }
        };
        let text = match &file {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => t,
                Err(e) => return fail(format!("cannot read {}: {e}", p.display())),
            },
            None => {
                let mut q = vec!["sign=true".to_string()];
                for (k, v) in [("since", &start), ("until", &end)] {
                    match time_arg(k, v) {
                        Ok(Some(us)) => q.push(format!("{k}={us}")),
                        Ok(None) => {}
                        Err(e) => return fail(e),
                    }
                }
                match conn.get(&format!("/v1/ledger/export?{}", q.join("&")), true).await {
                    Ok(r) => r.text(),
                    Err(e) => return fail(e),
                }
            }
        };
        let mut report = ledger::verify_export(&text, &keys);
        // Online, a root mismatch with no entry failing its own hash (the stored hash was
        // rewritten too) is narrowed down with inclusion proofs against the signed head.
        let mut located = Vec::new();
        if file.is_none() {
            located = locate(&conn, &text, &report).await;
        }
        report.problems.extend(located);
        print_report(&report, &warnings, format);
        if report.ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

async fn fetch_keys(conn: &Conn, file: Option<&PathBuf>) -> Result<Vec<LedgerPublicKey>, String> {
    if let Some(p) = file {
        // Offline: the keys recorded in the export (a warning says they are not independent).
        let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        let mut keys = Vec::new();
        for l in text.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(l)
                && v["type"] == "key"
                && let Some(pem) = v["pem"].as_str()
            {
                keys.extend(LedgerPublicKey::from_pem(pem).map_err(|e| e.message.to_string())?);
            }
        }
        return Ok(keys);
    }
    let v = conn.get("/v1/ledger/keys", false).await?.json_value();
    let mut keys = Vec::new();
    for k in v["items"].as_array().cloned().unwrap_or_default() {
        keys.extend(LedgerPublicKey::from_pem(k["pem"].as_str().unwrap_or("")).map_err(|e| e.message.to_string())?);
    }
    Ok(keys)
}

/// For each root mismatch not explained by an entry failing its own leaf hash, check every
/// entry of the suspect interval with an inclusion proof against the signed head.
async fn locate(conn: &Conn, text: &str, report: &ledger::Report) -> Vec<Problem> {
    let edited: std::collections::HashSet<u64> = report
        .problems
        .iter()
        .filter_map(|p| match p {
            Problem::Edited { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for p in &report.problems {
        let Problem::RootMismatch { tree_size, from, to } = p else {
            continue;
        };
        if (*from..*to).any(|s| edited.contains(&s)) || to - from > 5000 {
            continue;
        }
        let head = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["type"] == "head" && v["tree_size"].as_u64() == Some(*tree_size))
            .and_then(|v| ledger::from_hex(v["root_hash"].as_str().unwrap_or("")));
        let Some(root) = head else { continue };
        for l in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(l) else {
                continue;
            };
            if v["type"] != "entry" {
                continue;
            }
            let Ok(rec) = serde_json::from_value::<Record>(v["record"].clone()) else {
                continue;
            };
            if rec.seq < *from || rec.seq >= *to {
                continue;
            }
            let Ok(r) = conn
                .get(
                    &format!("/v1/ledger/proofs/inclusion?seq={}&tree_size={tree_size}", rec.seq),
                    true,
                )
                .await
            else {
                continue;
            };
            let path: Vec<ledger::Hash> = r.json_value()["audit_path"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|h| h.as_str().and_then(ledger::from_hex))
                .collect();
            if !ledger::verify_inclusion(&rec.leaf_hash(), rec.seq, *tree_size, &path, &root) {
                out.push(Problem::NotInHead {
                    seq: rec.seq,
                    event_id: rec.event_id.clone(),
                    tree_size: *tree_size,
                });
            }
        }
    }
    out
}

fn print_report(r: &ledger::Report, warnings: &[String], format: ReportFormat) {
    match format {
        ReportFormat::Json => {
            println!(
                "{}",
                serde_json::json!({
                    "ok": r.ok(),
                    "start": r.start,
                    "end": r.end,
                    "entries": r.entries,
                    "redacted": r.redacted,
                    "heads_verified": r.heads_verified,
                    "unsigned_from": r.unsigned_from,
                    "summarized_below": r.summarized_below,
                    "problems": r.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    "warnings": warnings,
                })
            );
        }
        ReportFormat::Text => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "range #{}..#{}: {} entries checked ({} other-tenant entries by hash), {} signed heads verified",
                r.start,
                r.end.saturating_sub(1),
                r.entries,
                r.redacted,
                r.heads_verified.len()
            );
            if let Some(b) = r.summarized_below {
                println!(
                    "entries #0..#{} were dropped by retention; the signed head of size {b} summarizes them and matches",
                    b - 1
                );
            }
            if let Some(u) = r.unsigned_from {
                println!("note: entries from #{u} are newer than the last signed head (not yet provable)");
            }
            if r.ok() {
                println!("OK: every entry matches its leaf and every head's root");
            } else {
                for p in &r.problems {
                    println!("FAIL: {p}");
                }
            }
        }
    }
}

//! Budgets at the gateway: reserve a request's worst-case cost before forwarding it, settle
//! its actual cost from the response, never spend past a limit across any number of replicas.
//!
//! Reservations come from **local leases** drawn from the shared ledger
//! (`shared::budget_ledger`): the common case is a few nanoseconds under a `std` mutex, with
//! no round trip. A lease's **charge** (what this gateway may have consumed without telling the
//! ledger) is raised in steps of a quarter lease before it is consumed past, so a gateway that
//! dies costs at most its charge, and the rest of its lease returns when it expires. Idle
//! leases, and leases of a window that has ended, are released (actual spend recorded, the rest
//! returned) within a second or two; active ones are renewed.
//!
//! The grant path (no lease, or the lease is spent) is single-flight per budget: one task
//! talks to the ledger while the others wait for its lease (an async mutex held across the
//! ledger call, on the slow path only).

use caracal_shared::FastMap as HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use caracal_shared::budget_ledger::{BudgetLedger, Window, window_of};
use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::ids::{AgentId, BudgetId, ResourceId};
use caracal_shared::metering::{Pricing, RequestFacts, Unpriced, Usage, actual, worst_case};
use caracal_shared::store::admin::{Budget, BudgetScopeKind, BudgetUnit};
use caracal_shared::time::{coarse_monotonic_millis, coarse_now_micros, now_micros};
use serde_json::json;

/// One lease held by this gateway.
pub struct Lease {
    budget: BudgetId,
    bucket: i64,
    id: String,
    granted: i64,
    st: Mutex<LeaseState>,
}

#[derive(Default)]
struct LeaseState {
    /// What the ledger knows this gateway may have consumed.
    charge: i64,
    /// Reserved by requests in flight plus settled actual cost.
    used: i64,
    /// Settled actual cost.
    settled: i64,
    in_flight: u32,
    /// No new reservations; released when the last request in flight settles.
    retiring: bool,
    released: bool,
    /// In `coarse_monotonic_millis` (set on every reservation).
    last_use: Option<u64>,
}

enum Take {
    Taken,
    /// Raise the charge to this first.
    NeedCharge(i64),
    /// Not enough left in this lease.
    Spent,
}

impl Lease {
    fn take(&self, amount: i64) -> Take {
        let mut s = self.st.lock().unwrap_or_else(|p| p.into_inner());
        if s.retiring || s.released || s.used + amount > self.granted {
            return Take::Spent;
        }
        if s.used + amount > s.charge {
            let step = (self.granted / 4).max(amount);
            return Take::NeedCharge((s.charge + step).max(s.used + amount).min(self.granted));
        }
        s.used += amount;
        s.in_flight += 1;
        s.last_use = Some(coarse_monotonic_millis());
        Take::Taken
    }
}

/// A request's hold on one budget.
pub struct Hold {
    pub budget: Arc<Budget>,
    lease: Option<Arc<Lease>>,
    pub reserved: i64,
    window: Arc<Window>,
    /// `caracal_budget_spent_total` of this budget (resolved once per budget version).
    spent: prometheus::IntCounter,
}

/// Everything a request reserved; settle it exactly once (dropping it unsettled settles at
/// the reserved worst case).
pub struct Reservation {
    pub holds: Vec<Hold>,
    pub facts: RequestFacts,
    pub pricing: Arc<Pricing>,
    settled: bool,
    owner: Arc<Budgets>,
}

/// A budget as the snapshot keeps it, with its scope parsed once.
pub struct BudgetEntry {
    pub budget: Arc<Budget>,
    agent: Option<AgentId>,
    resource: Option<ResourceId>,
}

impl BudgetEntry {
    pub fn new(b: Budget) -> BudgetEntry {
        let id = b.scope_id.as_deref();
        BudgetEntry {
            agent: id.and_then(|s| AgentId::parse(s).ok()),
            resource: id.and_then(|s| ResourceId::parse(s).ok()),
            budget: Arc::new(b),
        }
    }
}

/// One reservation as its decision's audit event records it.
#[cfg_attr(test, derive(serde::Serialize))]
pub struct HoldView {
    pub(crate) budget_id: BudgetId,
    pub(crate) unit: BudgetUnit,
    pub(crate) reserved: i64,
}

impl HoldView {
    /// Its members as serde writes them (tested through the records that carry it).
    pub fn write(&self, o: &mut caracal_shared::audit::JsonObject<'_>) {
        write_hold(o, self.budget_id, self.unit, self.reserved);
    }
}

/// The members a hold and a settlement share, as serde writes them.
fn write_hold(o: &mut caracal_shared::audit::JsonObject<'_>, budget: BudgetId, unit: BudgetUnit, reserved: i64) {
    let mut id = [0u8; caracal_shared::ids::ID_TEXT_MAX];
    o.str("budget_id", budget.encode(&mut id))
        .str("unit", unit.as_str())
        .int("reserved", reserved);
}

pub struct Budgets {
    pub ledger: Arc<dyn BudgetLedger>,
    /// Per budget version: its current calendar window and its spend counter.
    windows: Mutex<HashMap<(BudgetId, i64), WindowEntry>>,
    leases: Mutex<HashMap<(BudgetId, i64), Arc<Lease>>>,
    grants: Mutex<HashMap<BudgetId, Arc<tokio::sync::Mutex<()>>>>,
    ttl: Duration,
    pub reservations: prometheus::IntCounterVec,
    /// `reservations{outcome=...}` resolved once (a label lookup hashes and locks).
    reserved_local: prometheus::IntCounter,
    reserved_ledger: prometheus::IntCounter,
    refused: prometheus::IntCounter,
    pub ledger_up: prometheus::IntGauge,
    pub spent_total: prometheus::IntCounterVec,
}

struct WindowEntry {
    /// Calendar windows only (rolling ones move with every request).
    window: Option<Arc<Window>>,
    spent: prometheus::IntCounter,
}

fn exhausted(b: &Budget, w: &Window) -> Error {
    let secs = ((w.resets_at - now_micros()).max(0) / 1_000_000 + 1) as u64;
    Error::new(
        ErrorCode::BudgetExhausted,
        format!("the budget {:?} is exhausted for this window", b.name),
    )
    .with_details(
        json!({ "reason": "budget_exhausted", "budget_id": b.id, "budget": b.name, "resets_at": w.resets_at }),
    )
    .with_retry_after(secs)
}

impl Budgets {
    pub fn new(ledger: Arc<dyn BudgetLedger>, ttl: Duration, registry: &prometheus::Registry) -> Arc<Budgets> {
        let reservations = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "caracal_gateway_budget_reservations_total",
                "Budget reservations by outcome (local: from a lease; ledger: needed a round trip; refused)",
            ),
            &["outcome"],
        )
        .expect("metric");
        let ledger_up = prometheus::IntGauge::new(
            "caracal_gateway_budget_ledger_up",
            "1 when the last call to the shared budget ledger succeeded",
        )
        .expect("metric");
        let spent_total = prometheus::IntCounterVec::new(
            prometheus::Opts::new("caracal_budget_spent_total", "Settled spend (for spend rates)"),
            &["tenant", "budget", "unit"],
        )
        .expect("metric");
        for o in ["local", "ledger", "refused"] {
            reservations.with_label_values(&[o]);
        }
        ledger_up.set(1);
        let _ = registry.register(Box::new(reservations.clone()));
        let _ = registry.register(Box::new(ledger_up.clone()));
        let _ = registry.register(Box::new(spent_total.clone()));
        Arc::new(Budgets {
            ledger,
            windows: Mutex::new(HashMap::default()),
            leases: Mutex::new(HashMap::default()),
            grants: Mutex::new(HashMap::default()),
            ttl,
            reserved_local: reservations.with_label_values(&["local"]),
            reserved_ledger: reservations.with_label_values(&["ledger"]),
            refused: reservations.with_label_values(&["refused"]),
            reservations,
            ledger_up,
            spent_total,
        })
    }

    fn ledger_result<T>(&self, r: Result<T>) -> Result<T> {
        self.ledger_up.set(i64::from(r.is_ok()));
        r.map_err(|e| {
            if e.code == ErrorCode::BudgetLedgerUnavailable {
                e
            } else {
                Error::new(ErrorCode::BudgetLedgerUnavailable, "the budget ledger is unavailable")
            }
        })
    }

    /// Reserve `facts`' worst case on every hard budget that applies. Refuses (429) when one
    /// is exhausted, (503) when the ledger cannot be reached, (403) when a money budget applies
    /// to a model without a price.
    pub async fn reserve(
        self: &Arc<Self>,
        budgets: Vec<Arc<Budget>>,
        tenant: &str,
        pricing: Arc<Pricing>,
        facts: RequestFacts,
    ) -> Result<Option<Reservation>> {
        if budgets.is_empty() {
            return Ok(None);
        }
        let mut r = Reservation {
            holds: Vec::with_capacity(budgets.len()),
            facts,
            pricing,
            settled: false,
            owner: self.clone(),
        };
        // Which calendar window: the coarse clock is at most a timer tick behind.
        let now = coarse_now_micros();
        for b in budgets {
            let amount = worst_case(b.unit, &r.pricing, &r.facts).map_err(|Unpriced(m)| {
                Error::new(ErrorCode::PolicyDenied, m).with_details(json!({ "reason": "unpriced", "budget_id": b.id }))
            })?;
            let (window, spent) = self.window(&b, tenant, now);
            if !b.hard || amount == 0 {
                r.holds.push(Hold {
                    budget: b,
                    lease: None,
                    reserved: 0,
                    window,
                    spent,
                });
                continue;
            }
            // On failure, `r` drops here and releases what was taken (settled at zero).
            let lease = self.take(&b, &window, amount).await.inspect_err(|_| r.abort())?;
            r.holds.push(Hold {
                budget: b,
                lease: Some(lease),
                reserved: amount,
                window,
                spent,
            });
        }
        Ok(Some(r))
    }

    async fn take(&self, b: &Budget, w: &Window, amount: i64) -> Result<Arc<Lease>> {
        let key = (b.id, w.record);
        let mut round_trip = false;
        for _ in 0..8 {
            let lease = self.leases.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
            if let Some(l) = lease {
                match l.take(amount) {
                    Take::Taken => {
                        if round_trip {
                            self.reserved_ledger.inc();
                        } else {
                            self.reserved_local.inc();
                        }
                        return Ok(l);
                    }
                    Take::NeedCharge(c) => {
                        round_trip = true;
                        let ok = self.ledger_result(self.ledger.report(b.id, &l.id, c, self.ttl).await)?;
                        let mut s = l.st.lock().unwrap_or_else(|p| p.into_inner());
                        if ok {
                            s.charge = s.charge.max(c);
                        } else {
                            // The ledger expired it (converted into its charge): drop it.
                            s.released = true;
                            drop(s);
                            self.forget(&l);
                        }
                        continue;
                    }
                    Take::Spent => {
                        self.retire(&l);
                    }
                }
            }
            // Slow path: one grant at a time per budget.
            round_trip = true;
            let gate = self
                .grants
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(b.id)
                .or_default()
                .clone();
            let _g = gate.lock().await;
            let current = self.leases.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
            if let Some(c) = current
                && !c.st.lock().unwrap_or_else(|p| p.into_inner()).retiring
            {
                continue; // another task installed a fresh lease
            }
            let want = (b.limit / 20).max(amount);
            let charge = (want / 4).max(amount);
            let g = self.ledger_result(
                self.ledger
                    .grant(b.id, w, b.limit, want, amount, charge, self.ttl)
                    .await,
            )?;
            let Some(id) = g.lease else {
                self.refused.inc();
                return Err(exhausted(b, w));
            };
            let l = Arc::new(Lease {
                budget: b.id,
                bucket: w.record,
                id,
                granted: g.granted,
                st: Mutex::new(LeaseState {
                    charge: charge.min(g.granted),
                    ..Default::default()
                }),
            });
            let old = self.leases.lock().unwrap_or_else(|p| p.into_inner()).insert(key, l);
            if let Some(old) = old {
                self.retire(&old);
            }
        }
        Err(Error::new(
            ErrorCode::BudgetLedgerUnavailable,
            "could not obtain a budget lease",
        ))
    }

    fn forget(&self, l: &Arc<Lease>) {
        let mut m = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&(l.budget, l.bucket)).is_some_and(|x| Arc::ptr_eq(x, l)) {
            m.remove(&(l.budget, l.bucket));
        }
    }

    /// No new reservations on `l`; released once nothing is in flight.
    fn retire(&self, l: &Arc<Lease>) {
        self.forget(l);
        let release = {
            let mut s = l.st.lock().unwrap_or_else(|p| p.into_inner());
            s.retiring = true;
            if s.in_flight == 0 && !s.released {
                s.released = true;
                Some(s.settled)
            } else {
                None
            }
        };
        if let Some(settled) = release {
            self.release_later(l.clone(), settled);
        }
    }

    fn release_later(&self, l: Arc<Lease>, settled: i64) {
        let ledger = self.ledger.clone();
        let up = self.ledger_up.clone();
        tokio::spawn(async move {
            // A failed release is not lost money: the lease expires into its charge.
            let r = ledger.release(l.budget, &l.id, settled).await;
            up.set(i64::from(r.is_ok()));
            if let Err(e) = r {
                tracing::warn!(budget = %l.budget, error = %e, "budget lease release failed; it will expire");
            }
        });
    }

    /// Settle a hold at `actual` (clamped to what it reserved).
    fn settle_hold(&self, h: &Hold, actual: i64) {
        let Some(l) = &h.lease else { return };
        let actual = actual.clamp(0, h.reserved);
        let release = {
            let mut s = l.st.lock().unwrap_or_else(|p| p.into_inner());
            s.used -= h.reserved - actual;
            s.settled += actual;
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.retiring && s.in_flight == 0 && !s.released {
                s.released = true;
                Some(s.settled)
            } else {
                None
            }
        };
        if let Some(settled) = release {
            self.release_later(l.clone(), settled);
        }
    }

    /// Renew active leases; release idle ones and those of ended windows. Returns how many
    /// were released.
    pub async fn maintain(&self, idle: Duration) -> usize {
        let leases: Vec<Arc<Lease>> = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut released = 0;
        for l in leases {
            let (idle_now, charge) = {
                let s = l.st.lock().unwrap_or_else(|p| p.into_inner());
                (
                    s.in_flight == 0
                        && s.last_use
                            .is_none_or(|t| coarse_monotonic_millis().saturating_sub(t) >= idle.as_millis() as u64),
                    s.charge,
                )
            };
            // A lease of a window that has ended gets no new reservations (requests of the new
            // window take a lease keyed by the new bucket), so it goes idle and is released.
            if idle_now {
                self.retire(&l);
                released += 1;
            } else {
                match self.ledger.report(l.budget, &l.id, charge, self.ttl).await {
                    Ok(true) => self.ledger_up.set(1),
                    Ok(false) => {
                        l.st.lock().unwrap_or_else(|p| p.into_inner()).released = true;
                        self.forget(&l);
                    }
                    Err(_) => self.ledger_up.set(0),
                }
            }
        }
        released
    }

    /// Release every lease (shutdown).
    pub async fn release_all(&self) {
        let leases: Vec<Arc<Lease>> = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, l)| l)
            .collect();
        for l in leases {
            let settled = {
                let mut s = l.st.lock().unwrap_or_else(|p| p.into_inner());
                s.retiring = true;
                if s.released {
                    continue;
                }
                s.released = true;
                // Requests still in flight count at their reservation.
                s.used
            };
            let _ = self.ledger.release(l.budget, &l.id, settled).await;
        }
    }

    /// Budgets that apply to a request of `agent` on `resource`: the hard and soft budgets of
    /// its tenant scoped to the tenant, that agent or that resource.
    pub fn applicable(all: &[BudgetEntry], agent: AgentId, resource: ResourceId) -> Vec<Arc<Budget>> {
        all.iter()
            .filter(|e| match e.budget.scope_kind {
                BudgetScopeKind::Tenant => true,
                BudgetScopeKind::Agent => e.agent == Some(agent),
                BudgetScopeKind::Resource => e.resource == Some(resource),
            })
            .map(|e| e.budget.clone())
            .collect()
    }

    /// The window of `b` now, and its spend counter: calendar windows are computed once per
    /// window (time-zone arithmetic is not free), rolling ones every time.
    fn window(&self, b: &Budget, tenant: &str, now: i64) -> (Arc<Window>, prometheus::IntCounter) {
        let key = (b.id, b.version);
        let spent = {
            let mut m = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            let e = m.entry(key).or_insert_with(|| WindowEntry {
                window: None,
                spent: self.spent_total.with_label_values(&[tenant, &b.name, b.unit.as_str()]),
            });
            if let Some(w) = &e.window
                && now < w.resets_at
                && now >= w.record
            {
                return (w.clone(), e.spent.clone());
            }
            e.spent.clone()
        };
        let w = Arc::new(window_of(b, now));
        if b.window != caracal_shared::store::admin::WindowKind::Rolling
            && let Some(e) = self.windows.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&key)
        {
            e.window = Some(w.clone());
        }
        (w, spent)
    }
}

/// What a request cost, per budget.
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct Settled {
    pub budget_id: BudgetId,
    pub unit: BudgetUnit,
    pub reserved: i64,
    pub actual: i64,
}

impl Settled {
    /// Its members as serde writes them (tested through the settlement record).
    pub fn write(&self, o: &mut caracal_shared::audit::JsonObject<'_>) {
        write_hold(o, self.budget_id, self.unit, self.reserved);
        o.int("actual", self.actual);
    }
}

impl Reservation {
    /// What was reserved, for the decision's audit event.
    pub fn view(&self) -> Vec<HoldView> {
        self.holds
            .iter()
            .map(|h| HoldView {
                budget_id: h.budget.id,
                unit: h.budget.unit,
                reserved: h.reserved,
            })
            .collect()
    }

    /// Whether any budget needs the model and `max_tokens` of the body.
    pub fn needs_usage(&self) -> bool {
        self.holds.iter().any(|h| h.budget.unit != BudgetUnit::Requests)
    }

    /// Settle from the response: `usage` when the upstream reported it; else, for a stream cut
    /// short, what was delivered (`delivered_output` tokens after `input` or the request's upper
    /// bound); else the reserved worst case.
    pub fn settle(mut self, usage: Option<Usage>, cut_short: Option<i64>) -> Vec<Settled> {
        self.settled = true;
        let usage = match (usage, cut_short) {
            (Some(u), Some(delivered)) => Some(Usage {
                output: u.output.max(delivered),
                input: if u.input > 0 {
                    u.input
                } else {
                    self.facts.body_len as i64
                },
                ..u
            }),
            (None, Some(delivered)) => Some(Usage {
                input: self.facts.body_len as i64,
                cached_input: 0,
                output: delivered,
            }),
            (u, None) => u,
        };
        let mut out = Vec::with_capacity(self.holds.len());
        for h in &self.holds {
            let worst = worst_case(h.budget.unit, &self.pricing, &self.facts).unwrap_or(h.reserved);
            let a = match &usage {
                Some(u) => actual(h.budget.unit, &self.pricing, &self.facts.model, u).min(worst.max(h.reserved)),
                None => worst,
            };
            let charged = if h.lease.is_some() { a.min(h.reserved) } else { a };
            self.owner.settle_hold(h, charged);
            if h.lease.is_none() && charged > 0 {
                // Soft budgets: metered, never refused.
                let (ledger, id, w) = (self.owner.ledger.clone(), h.budget.id, h.window.clone());
                tokio::spawn(async move {
                    let _ = ledger.add_spend(id, &w, charged).await;
                });
            }
            h.spent.inc_by(charged.max(0) as u64);
            out.push(Settled {
                budget_id: h.budget.id,
                unit: h.budget.unit,
                reserved: h.reserved,
                actual: charged,
            });
        }
        out
    }

    /// Give everything back (the request was not forwarded).
    pub fn abort(&mut self) {
        if self.settled {
            return;
        }
        self.settled = true;
        for h in &self.holds {
            self.owner.settle_hold(h, 0);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            // Never settled (a path that did not report): charge the worst case.
            self.settled = true;
            for h in &self.holds {
                self.owner.settle_hold(h, h.reserved);
            }
        }
    }
}

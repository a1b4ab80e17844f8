//! What a request costs: the worst case reserved before forwarding, and the actual cost settled
//! from the response's usage (OpenAI- and Anthropic-style JSON, and their streamed SSE forms,
//! read incrementally without holding the stream back).
//!
//! Prices are per resource (`settings.pricing`, see `store::resources::Pricing`):
//! `{"per_request": 100, "models": [{"model": "gpt-4o-mini", "input_per_mtok": 150000,
//! "output_per_mtok": 600000, "cached_input_per_mtok": 75000, "default_max_tokens": 4096}]}`.
//! Money is in micro-units of the budget's currency per million tokens (`input_per_mtok:
//! 150000` = 0.15 per million input tokens); costs round up. The worst case of a call counts
//! every byte of the request body as an input token (a token is at least one byte) and the
//! request's `max_tokens` (else the model's `default_max_tokens`, else 4096) as output tokens.

use serde::Serialize;
use serde_json::Value;

use crate::store::admin::BudgetUnit;
pub use crate::store::resources::{ModelPrice, Pricing};

/// Output tokens assumed when neither the request nor the pricing names a maximum.
pub const FALLBACK_MAX_OUTPUT_TOKENS: i64 = 4096;

fn glob_match(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !s.starts_with(first) || !s[first.len()..].ends_with(last) || s.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The price entry of `model`: an exact name first, else the matching pattern with the most
/// literal characters.
pub fn price_for<'a>(p: &'a Pricing, model: &str) -> Option<&'a ModelPrice> {
    p.models.iter().find(|m| m.model == model).or_else(|| {
        p.models
            .iter()
            .filter(|m| glob_match(&m.model, model))
            .max_by_key(|m| m.model.replace('*', "").len())
    })
}

/// What the gateway knows of a request before forwarding it.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    pub model: String,
    pub max_tokens: Option<i64>,
    pub body_len: usize,
}

/// Token counts reported by an upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Input tokens, including cached ones.
    pub input: i64,
    pub cached_input: i64,
    pub output: i64,
}

/// Why a cost cannot be computed (the request is refused: nothing unpriced goes out under a
/// money budget).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpriced(pub String);

fn mul_ceil(tokens: i64, per_mtok: i64) -> i64 {
    let p = (tokens.max(0) as i128) * (per_mtok.max(0) as i128);
    ((p + 999_999) / 1_000_000).min(i64::MAX as i128) as i64
}

fn max_output(m: Option<&ModelPrice>, f: &RequestFacts) -> i64 {
    f.max_tokens
        .map(|t| t.max(0))
        .or(m.and_then(|m| m.default_max_tokens))
        .unwrap_or(FALLBACK_MAX_OUTPUT_TOKENS)
}

/// The most this request can cost, in the budget's unit.
pub fn worst_case(unit: BudgetUnit, p: &Pricing, f: &RequestFacts) -> Result<i64, Unpriced> {
    let input_upper = f.body_len as i64;
    match unit {
        BudgetUnit::Requests => Ok(1),
        BudgetUnit::Tokens => {
            if f.model.is_empty() {
                return Ok(0);
            }
            Ok(input_upper + max_output(price_for(p, &f.model), f))
        }
        BudgetUnit::Micros => {
            if f.model.is_empty() {
                return Ok(p.per_request);
            }
            let m = price_for(p, &f.model)
                .ok_or_else(|| Unpriced(format!("no price for model {:?} on this resource", f.model)))?;
            Ok(p.per_request
                + mul_ceil(input_upper, m.input_per_mtok)
                + mul_ceil(max_output(Some(m), f), m.output_per_mtok))
        }
    }
}

/// The cost of a request whose usage is known, in the budget's unit.
pub fn actual(unit: BudgetUnit, p: &Pricing, model: &str, u: &Usage) -> i64 {
    match unit {
        BudgetUnit::Requests => 1,
        BudgetUnit::Tokens => u.input + u.output,
        BudgetUnit::Micros => {
            let Some(m) = price_for(p, model) else {
                return p.per_request;
            };
            let cached = u.cached_input.clamp(0, u.input.max(0));
            p.per_request
                + mul_ceil(u.input - cached, m.input_per_mtok)
                + mul_ceil(
                    cached,
                    if m.cached_input_per_mtok > 0 {
                        m.cached_input_per_mtok
                    } else {
                        m.input_per_mtok
                    },
                )
                + mul_ceil(u.output, m.output_per_mtok)
        }
    }
}

/// Usage fields of one JSON object (a whole response, or one SSE event), OpenAI or Anthropic.
fn usage_of(v: &Value, into: &mut Option<Usage>) {
    let mut u = into.unwrap_or_default();
    let mut seen = false;
    // OpenAI chat/completions and responses API.
    if let Some(x) = v.get("usage").filter(|x| x.is_object()) {
        let n = |k: &str| x.get(k).and_then(Value::as_i64);
        if let Some(i) = n("prompt_tokens").or(n("input_tokens")) {
            u.input = i;
            seen = true;
        }
        if let Some(o) = n("completion_tokens").or(n("output_tokens")) {
            u.output = o;
            seen = true;
        }
        let cached = x
            .pointer("/prompt_tokens_details/cached_tokens")
            .or(x.pointer("/input_tokens_details/cached_tokens"))
            .and_then(Value::as_i64)
            .or(n("cache_read_input_tokens"));
        if let Some(c) = cached {
            u.cached_input = c;
        }
        // Anthropic reports cache reads apart from input_tokens.
        if let Some(c) = n("cache_read_input_tokens")
            && x.get("prompt_tokens").is_none()
        {
            u.input += c;
        }
    }
    // Anthropic streaming: message_start carries input usage inside `message`.
    if let Some(x) = v.pointer("/message/usage").filter(|x| x.is_object()) {
        let n = |k: &str| x.get(k).and_then(Value::as_i64);
        if let Some(i) = n("input_tokens") {
            u.input = i + n("cache_read_input_tokens").unwrap_or(0);
            u.cached_input = n("cache_read_input_tokens").unwrap_or(0);
            seen = true;
        }
        if let Some(o) = n("output_tokens") {
            u.output = u.output.max(o);
            seen = true;
        }
    }
    if seen {
        *into = Some(u);
    }
}

/// Reads usage from a response as it streams by, without holding it back: a JSON body is
/// kept (up to a bound) and parsed at the end; an SSE stream is scanned event by event.
#[derive(Debug, Default)]
pub struct UsageScanner {
    sse: bool,
    json: Vec<u8>,
    overflow: bool,
    line: Vec<u8>,
    usage: Option<Usage>,
    /// Content deltas delivered (SSE), and their characters: the estimate when a stream stops
    /// before its usage.
    pub deltas: i64,
    pub delta_chars: i64,
}

const MAX_JSON: usize = 4 << 20;

impl UsageScanner {
    pub fn new(content_type: &str) -> UsageScanner {
        UsageScanner {
            sse: content_type.trim_start().starts_with("text/event-stream"),
            ..Default::default()
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.sse {
            if self.json.len() + chunk.len() > MAX_JSON {
                self.overflow = true;
                self.json.clear();
            } else if !self.overflow {
                self.json.extend_from_slice(chunk);
            }
            return;
        }
        for &b in chunk {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.sse_line(&line);
            } else if self.line.len() < MAX_JSON {
                self.line.push(b);
            }
        }
    }

    fn sse_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        usage_of(&v, &mut self.usage);
        let text = v
            .pointer("/choices/0/delta/content")
            .or(v.pointer("/delta/text"))
            .and_then(Value::as_str);
        if let Some(t) = text {
            self.deltas += 1;
            self.delta_chars += t.chars().count() as i64;
        }
    }

    /// The usage the response reported (a complete JSON body, or an SSE event with usage).
    pub fn finish(&mut self) -> Option<Usage> {
        if !self.sse && !self.overflow && !self.json.is_empty() {
            if let Ok(v) = serde_json::from_slice::<Value>(&self.json) {
                usage_of(&v, &mut self.usage);
            }
            self.json = Vec::new();
        }
        if self.sse && !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.sse_line(&line);
        }
        self.usage
    }

    /// Output tokens delivered so far, estimated from the content deltas (one token per delta,
    /// at least one per four characters).
    pub fn delivered_output(&self) -> i64 {
        self.deltas.max((self.delta_chars + 3) / 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pricing() -> Pricing {
        serde_json::from_value(json!({
            "per_request": 10,
            "models": [
                {"model": "gpt-4o-mini", "input_per_mtok": 150000, "output_per_mtok": 600000, "cached_input_per_mtok": 75000, "default_max_tokens": 1000},
                {"model": "claude-*", "input_per_mtok": 3000000, "output_per_mtok": 15000000},
                {"model": "*", "input_per_mtok": 1, "output_per_mtok": 1}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn worst_case_and_actual_by_unit() {
        let p = pricing();
        let f = RequestFacts {
            model: "gpt-4o-mini".into(),
            max_tokens: Some(100),
            body_len: 2000,
        };
        // 2000 × 0.15 = 300, 100 × 0.6 = 60, + 10.
        assert_eq!(worst_case(BudgetUnit::Micros, &p, &f), Ok(370));
        assert_eq!(worst_case(BudgetUnit::Tokens, &p, &f), Ok(2100));
        assert_eq!(worst_case(BudgetUnit::Requests, &p, &f), Ok(1));
        // No max_tokens: the model's default.
        let none = RequestFacts {
            max_tokens: None,
            ..f.clone()
        };
        assert_eq!(worst_case(BudgetUnit::Tokens, &p, &none), Ok(3000));
        // The most specific pattern wins; a catch-all prices the rest.
        let c = RequestFacts {
            model: "claude-3-5-sonnet".into(),
            max_tokens: Some(10),
            body_len: 10,
        };
        assert_eq!(worst_case(BudgetUnit::Micros, &p, &c), Ok(10 + 30 + 150));
        let other = RequestFacts {
            model: "mystery".into(),
            max_tokens: Some(10),
            body_len: 10,
        };
        assert_eq!(worst_case(BudgetUnit::Micros, &p, &other), Ok(10 + 1 + 1));
        // Without a price, a money budget refuses.
        let mut strict = p.clone();
        strict.models.retain(|m| m.model != "*");
        assert!(worst_case(BudgetUnit::Micros, &strict, &other).is_err());
        // Not an LLM call: the per-request fee only.
        assert_eq!(worst_case(BudgetUnit::Micros, &p, &RequestFacts::default()), Ok(10));

        let usage = Usage {
            input: 1000,
            cached_input: 400,
            output: 50,
        };
        // 600 × 0.15 = 90, 400 × 0.075 = 30, 50 × 0.6 = 30, + 10.
        assert_eq!(actual(BudgetUnit::Micros, &p, "gpt-4o-mini", &usage), 160);
        assert_eq!(actual(BudgetUnit::Tokens, &p, "gpt-4o-mini", &usage), 1050);
        assert!(glob_match("a*b*c", "axxbyyc") && !glob_match("a*b", "ab_c") && glob_match("*", ""));
    }

    #[test]
    fn usage_from_json_responses() {
        let mut s = UsageScanner::new("application/json");
        s.feed(br#"{"id":"x","usage":{"prompt_tokens":12,"completion_tokens":"#);
        s.feed(br#"5,"prompt_tokens_details":{"cached_tokens":4}}}"#);
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: 12,
                cached_input: 4,
                output: 5
            })
        );
        let mut a = UsageScanner::new("application/json");
        a.feed(br#"{"type":"message","usage":{"input_tokens":20,"output_tokens":7,"cache_read_input_tokens":3}}"#);
        assert_eq!(
            a.finish(),
            Some(Usage {
                input: 23,
                cached_input: 3,
                output: 7
            })
        );
        let mut n = UsageScanner::new("application/json");
        n.feed(b"{\"data\":[]}");
        assert_eq!(n.finish(), None);
    }

    #[test]
    fn usage_from_streams_split_anywhere() {
        let openai = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n"
        );
        for split in [1, 7, 40, openai.len()] {
            let mut s = UsageScanner::new("text/event-stream; charset=utf-8");
            for c in openai.as_bytes().chunks(split) {
                s.feed(c);
            }
            assert_eq!(s.deltas, 2);
            assert_eq!(
                s.finish(),
                Some(Usage {
                    input: 9,
                    cached_input: 0,
                    output: 2
                })
            );
        }
        let anthropic = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n"
        );
        let mut s = UsageScanner::new("text/event-stream");
        s.feed(anthropic.as_bytes());
        assert_eq!(
            s.finish(),
            Some(Usage {
                input: 25,
                cached_input: 0,
                output: 15
            })
        );
        // Cut before the usage: only the delivered estimate.
        let mut s = UsageScanner::new("text/event-stream");
        s.feed(&openai.as_bytes()[..60]);
        assert_eq!(s.finish(), None);
        assert_eq!(s.delivered_output(), 1);
    }
}

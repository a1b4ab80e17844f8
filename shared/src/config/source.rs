//! A configuration source: a TOML file overlaid with environment variables, read through typed
//! getters that record every problem instead of stopping at the first one.
//!
//! Keys are dotted paths (`control.listen`). The environment overrides a key with
//! `CARACAL__CONTROL__LISTEN=...` (double underscores separate path segments; the value is
//! parsed as a TOML value when it is one — `true`, `42`, `["a"]` — and as a string otherwise).
//! After every getter ran, [`Source::finish`] adds one error per key that nobody read, so a
//! misspelt key is an error rather than a silently ignored setting.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

pub const ENV_PREFIX: &str = "CARACAL__";

#[derive(Clone, Debug)]
enum Origin {
    File(PathBuf),
    Env(String),
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Env(v) => write!(f, "environment variable {v}"),
            Origin::Default => f.write_str("built-in defaults"),
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    value: toml::Value,
    origin: Origin,
}

/// Every problem found while loading a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub struct Source {
    entries: BTreeMap<String, Entry>,
    used: RefCell<BTreeSet<String>>,
    errors: RefCell<Vec<String>>,
}

impl Source {
    /// An empty source (every key takes its default).
    pub fn empty() -> Self {
        Source {
            entries: BTreeMap::new(),
            used: RefCell::new(BTreeSet::new()),
            errors: RefCell::new(Vec::new()),
        }
    }

    /// Load `path` (if given) and overlay the process environment.
    pub fn load(path: Option<&Path>) -> Self {
        let mut src = Source::empty();
        if let Some(p) = path {
            match std::fs::read_to_string(p) {
                Ok(text) => src.add_toml(&text, Origin::File(p.to_path_buf())),
                Err(e) => src.push_error(format!("cannot read config file {}: {e}", p.display())),
            }
        }
        src.add_env(std::env::vars());
        src
    }

    /// Parse TOML text (tests and embedded defaults).
    pub fn from_toml(text: &str) -> Self {
        let mut src = Source::empty();
        src.add_toml(text, Origin::Default);
        src
    }

    fn add_toml(&mut self, text: &str, origin: Origin) {
        match text.parse::<toml::Table>() {
            Ok(table) => flatten("", toml::Value::Table(table), &origin, &mut self.entries),
            Err(e) => self.push_error(format!("{origin}: not valid TOML: {e}")),
        }
    }

    /// Overlay `CARACAL__A__B=value` variables.
    pub fn add_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        for (k, v) in vars {
            let Some(rest) = k.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            let key = rest
                .split("__")
                .map(|s| s.to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(".");
            let value = parse_env_value(&v);
            // An env var overrides a whole subtree given in the file.
            let prefix = format!("{key}.");
            self.entries.retain(|existing, _| !existing.starts_with(&prefix));
            self.entries.insert(
                key,
                Entry {
                    value,
                    origin: Origin::Env(k.clone()),
                },
            );
        }
    }

    fn push_error(&self, e: String) {
        self.errors.borrow_mut().push(e);
    }

    /// Record a semantic validation problem for `key`.
    pub fn invalid(&self, key: &str, msg: impl fmt::Display) {
        let origin = self
            .entries
            .get(key)
            .map(|e| e.origin.to_string())
            .unwrap_or_else(|| "default".into());
        self.push_error(format!("{key}: {msg} (from {origin})"));
    }

    pub fn has(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Read `key` as `T`, or `default` when absent. A value of the wrong type is recorded and
    /// the default is returned so loading continues and reports everything.
    pub fn get<T: DeserializeOwned>(&self, key: &str, default: T) -> T {
        self.opt(key).unwrap_or(default)
    }

    /// Read `key` as `T` when present.
    pub fn opt<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.used.borrow_mut().insert(key.to_string());
        let entry = self.entries.get(key)?;
        match entry.value.clone().try_into::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.push_error(format!("{key}: {} (from {})", e.to_string().trim(), entry.origin));
                None
            }
        }
    }

    /// Read `key`, recording an error when it is absent.
    pub fn require<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        if !self.entries.contains_key(key) {
            self.used.borrow_mut().insert(key.to_string());
            self.push_error(format!("{key}: required but not set"));
            return None;
        }
        self.opt(key)
    }

    /// Parse `key` with `parse` (for strings with structure: addresses, durations, urls).
    pub fn parse_with<T>(&self, key: &str, default: T, parse: impl FnOnce(&str) -> Result<T, String>) -> T {
        match self.opt::<String>(key) {
            None => default,
            Some(s) => match parse(&s) {
                Ok(v) => v,
                Err(e) => {
                    self.invalid(key, e);
                    default
                }
            },
        }
    }

    /// Mark every key under `prefix.` as read (for sections parsed as a whole).
    pub fn take_subtree(&self, prefix: &str) -> BTreeMap<String, toml::Value> {
        let p = format!("{prefix}.");
        let mut out = BTreeMap::new();
        for (k, e) in &self.entries {
            if let Some(rest) = k.strip_prefix(&p) {
                self.used.borrow_mut().insert(k.clone());
                out.insert(rest.to_string(), e.value.clone());
            }
        }
        out
    }

    /// Finish loading: every unread key is an error; all errors are returned together.
    pub fn finish(self) -> Result<(), ConfigErrors> {
        let used = self.used.into_inner();
        let mut errors = self.errors.into_inner();
        for (k, e) in &self.entries {
            if !used.contains(k) {
                errors.push(format!("{k}: unknown setting (from {})", e.origin));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

fn flatten(prefix: &str, v: toml::Value, origin: &Origin, out: &mut BTreeMap<String, Entry>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                flatten(&key, v, origin, out);
            }
        }
        other => {
            out.insert(
                prefix.to_string(),
                Entry {
                    value: other,
                    origin: origin.clone(),
                },
            );
        }
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Parse a duration such as `250ms`, `30s`, `5m`, `2h`, `1d` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 250ms, 30s, 5m, 2h)"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n.checked_mul(1000).ok_or("duration too large")?,
        "m" => n.checked_mul(60_000).ok_or("duration too large")?,
        "h" => n.checked_mul(3_600_000).ok_or("duration too large")?,
        "d" => n.checked_mul(86_400_000).ok_or("duration too large")?,
        u => return Err(format!("invalid duration unit {u:?} in {s:?} (use ms, s, m, h or d)")),
    };
    Ok(std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_and_types_parse() {
        let mut src = Source::from_toml("[a]\nport = 1\nname = \"x\"\n");
        src.add_env([
            ("CARACAL__A__PORT".to_string(), "2".to_string()),
            ("CARACAL__A__ADDR".to_string(), "127.0.0.1:80".to_string()),
            ("OTHER".to_string(), "ignored".to_string()),
        ]);
        assert_eq!(src.get::<u16>("a.port", 0), 2);
        assert_eq!(src.get::<String>("a.name", String::new()), "x");
        assert_eq!(src.get::<String>("a.addr", String::new()), "127.0.0.1:80");
        src.finish().unwrap();
    }

    #[test]
    fn all_errors_are_reported_together() {
        let src = Source::from_toml("[a]\nport = \"nope\"\nspeed = \"fast\"\ntypo = 1\n");
        let _ = src.get::<u16>("a.port", 0);
        let _ = src.parse_with("a.speed", std::time::Duration::ZERO, parse_duration);
        let _ = src.require::<String>("a.needed");
        let errs = src.finish().unwrap_err().0;
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs.iter().any(|e| e.starts_with("a.port")));
        assert!(errs.iter().any(|e| e.starts_with("a.speed")));
        assert!(errs.iter().any(|e| e.starts_with("a.needed: required")));
        assert!(errs.iter().any(|e| e.starts_with("a.typo: unknown setting")));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("3").unwrap().as_secs(), 3);
        assert_eq!(parse_duration("5m").unwrap().as_secs(), 300);
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}

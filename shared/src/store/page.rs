//! Cursor pagination. A cursor is the opaque encoding of the last id returned; the next page
//! holds the ids strictly after it (ids are time-ordered, so pages follow creation order and
//! stay stable while rows are added).

use serde::Serialize;

use crate::crypto::{b64url, b64url_decode};
use crate::error::{Error, Result};

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

#[derive(Debug, Clone, Default)]
pub struct Cursor {
    pub after: Option<String>,
    pub limit: i64,
}

impl Cursor {
    pub fn first(limit: i64) -> Self {
        Cursor { after: None, limit }
    }

    /// From `?cursor=…&limit=…` query values.
    pub fn parse(cursor: Option<&str>, limit: Option<&str>) -> Result<Cursor> {
        let limit = match limit {
            None => DEFAULT_LIMIT,
            Some(l) => l
                .parse::<i64>()
                .ok()
                .filter(|l| (1..=MAX_LIMIT).contains(l))
                .ok_or_else(|| Error::validation(format!("limit must be between 1 and {MAX_LIMIT}")))?,
        };
        let after = match cursor {
            None | Some("") => None,
            Some(c) => Some(
                b64url_decode(c)
                    .and_then(|b| String::from_utf8(b).ok())
                    .filter(|s| s.len() <= 128 && s.is_ascii())
                    .ok_or_else(|| Error::validation("invalid cursor"))?,
            ),
        };
        Ok(Cursor { after, limit })
    }

    /// The lower bound for `id > $n` (the empty string sorts before every id).
    pub fn after_str(&self) -> &str {
        self.after.as_deref().unwrap_or("")
    }

    /// Fetch one more row than asked to know whether there is a next page.
    pub fn fetch_limit(&self) -> i64 {
        self.limit + 1
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Build a page from up to `limit + 1` rows, `id` extracting each row's id.
    pub fn from_rows(mut rows: Vec<T>, cursor: &Cursor, id: impl Fn(&T) -> String) -> Page<T> {
        let more = rows.len() as i64 > cursor.limit;
        rows.truncate(cursor.limit as usize);
        let next_cursor = if more {
            rows.last().map(|r| b64url(id(r).as_bytes()))
        } else {
            None
        };
        Page {
            items: rows,
            next_cursor,
        }
    }

    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next_cursor: self.next_cursor,
        }
    }
}

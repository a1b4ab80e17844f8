//! The tamper-evident ledger's verifiable parts, with no storage: anyone holding the public key
//! can check what the audit service serves, offline (`caracal merkle verify-range`).
//!
//! - **Leaves**: each event's canonical encoding ([`Record::canonical`], version 1) hashed as
//!   an RFC 6962 leaf: `SHA-256(0x00 || bytes)`. Interior nodes: `SHA-256(0x01 || left || right)`.
//! - **Trees**: `MTH(D[n])` per RFC 6962 §2.1. Node `(level, index)` is the complete subtree over
//!   leaves `[index·2^level, (index+1)·2^level)`; level 0 are the leaf hashes. Every hash a proof
//!   needs is a complete aligned subtree ([`NodeSource`]), so a store keeps those and nothing
//!   else, and proofs cost O(log n) lookups.
//! - **Proofs**: inclusion (audit path, RFC 6962 §2.1.1) and consistency (§2.1.2) generation,
//!   and their verification (RFC 9162 §2.1.3.2 and §2.1.4.2). [`range_root`] recomputes a root
//!   from the leaves of a range plus the compact ranges on either side ([`RangeProof`]).
//! - **Signed tree heads**: an ECDSA P-256 (SHA-256) signature over a text checkpoint
//!   ([`TreeHead::checkpoint_body`]): origin, size, base64 root, timestamp, key id.
//!
//! Canonical encoding v1: a JSON object with the fields of [`Record`]; objects at every depth
//! have their keys sorted by byte order; no insignificant whitespace; strings escaped as
//! `serde_json` does; integers in decimal. The version is a field of the record (`"v":1`), so a
//! future encoding cannot be confused with this one.

use std::collections::BTreeMap;

use base64::Engine as _;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, ErrorCode, Result};

pub type Hash = [u8; 32];

pub const ORIGIN: &str = "caracal-ledger/v1";
pub const ENCODING_VERSION: u64 = 1;

fn sha256_parts(parts: &[&[u8]]) -> Hash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let d = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn leaf_hash(data: &[u8]) -> Hash {
    sha256_parts(&[&[0u8], data])
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256_parts(&[&[1u8], left, right])
}

pub fn empty_root() -> Hash {
    sha256_parts(&[])
}

pub fn to_hex(h: &Hash) -> String {
    hex::encode(h)
}

pub fn from_hex(s: &str) -> Option<Hash> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

// ------------------------------------------------------------------ canonical records

/// One ledger entry as hashed: everything the ledger asserts about an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Encoding version ([`ENCODING_VERSION`]).
    pub v: u64,
    /// Position in the ledger (the leaf index).
    pub seq: u64,
    /// The producer's event id (unique; duplicates are dropped before sequencing).
    pub event_id: String,
    pub stream: String,
    pub kind: String,
    pub tenant: Option<String>,
    /// When it happened, µs since the epoch (the producer's clock, bounded by the ledger's).
    pub occurred_at: i64,
    /// When the ledger recorded it, µs.
    pub recorded_at: i64,
    pub body: Value,
}

impl Record {
    /// The canonical encoding: the fields in key order (body, event_id, kind, occurred_at,
    /// recorded_at, seq, stream, tenant, v), the body canonical too. Written directly, without
    /// building an intermediate value (this runs for every event the ledger records).
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        let str_field = |out: &mut Vec<u8>, key: &str, v: &str| {
            out.extend_from_slice(key.as_bytes());
            let _ = serde_json::to_writer(&mut *out, v);
        };
        out.extend_from_slice(b"{\"body\":");
        canonical_json(&self.body, &mut out);
        str_field(&mut out, ",\"event_id\":", &self.event_id);
        str_field(&mut out, ",\"kind\":", &self.kind);
        out.extend_from_slice(
            format!(
                ",\"occurred_at\":{},\"recorded_at\":{},\"seq\":{}",
                self.occurred_at, self.recorded_at, self.seq
            )
            .as_bytes(),
        );
        str_field(&mut out, ",\"stream\":", &self.stream);
        match &self.tenant {
            Some(t) => str_field(&mut out, ",\"tenant\":", t),
            None => out.extend_from_slice(b",\"tenant\":null"),
        }
        out.extend_from_slice(format!(",\"v\":{}}}", self.v).as_bytes());
        out
    }

    pub fn leaf_hash(&self) -> Hash {
        leaf_hash(&self.canonical())
    }
}

/// Write `v` canonically (sorted keys at every depth, compact).
pub fn canonical_json(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, &Value> = m.iter().collect();
            out.push(b'{');
            for (i, (k, val)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, k);
                out.push(b':');
                canonical_json(val, out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, val) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(val, out);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

// ------------------------------------------------------------------ trees over stored nodes

/// Complete aligned subtree hashes: `(level, index)` covers leaves
/// `[index << level, (index + 1) << level)`.
pub trait NodeSource {
    fn node(&self, level: u32, index: u64) -> Result<Hash>;
}

/// Nodes held in a map (what a store fetched for one proof).
pub type NodeMap = std::collections::HashMap<(u32, u64), Hash>;

impl NodeSource for NodeMap {
    fn node(&self, level: u32, index: u64) -> Result<Hash> {
        self.get(&(level, index)).copied().ok_or_else(|| {
            Error::new(
                ErrorCode::Internal,
                format!("ledger node ({level}, {index}) is missing"),
            )
        })
    }
}

/// Records which nodes a computation reads (to fetch them all in one query first).
#[derive(Default)]
pub struct Planner {
    pub wanted: std::cell::RefCell<Vec<(u32, u64)>>,
}

impl NodeSource for Planner {
    fn node(&self, level: u32, index: u64) -> Result<Hash> {
        self.wanted.borrow_mut().push((level, index));
        Ok([0u8; 32])
    }
}

impl Planner {
    pub fn into_wanted(self) -> Vec<(u32, u64)> {
        let mut w = self.wanted.into_inner();
        w.sort_unstable();
        w.dedup();
        w
    }
}

/// Largest power of two strictly smaller than `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// The complete aligned blocks that make up `[start, end)` when `start` is aligned to the
/// largest power of two not above `end - start` (always the case for the ranges of RFC 6962's
/// recursion), largest first.
fn blocks(start: u64, end: u64) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let mut s = start;
    while s < end {
        // The largest block that fits in what is left and is aligned at `s`.
        let fits = 63 - (end - s).leading_zeros();
        let level = if s == 0 { fits } else { fits.min(s.trailing_zeros()) };
        out.push((level, s >> level));
        s += 1u64 << level;
    }
    out
}

/// The complete subtrees that make up the first `n` leaves, largest first: the only hashes of
/// that prefix any proof over a larger tree reads (each other subtree inside it has a parent
/// inside it too). Retention keeps these when it drops the prefix.
pub fn prefix_blocks(n: u64) -> Vec<(u32, u64)> {
    blocks(0, n)
}

/// MTH of leaves `[start, end)` from complete subtrees (RFC 6962 splits at the largest power of
/// two, which for these ranges is exactly a right fold of their blocks).
pub fn range_hash(src: &dyn NodeSource, start: u64, end: u64) -> Result<Hash> {
    if start >= end {
        return Ok(empty_root());
    }
    let bs = blocks(start, end);
    let mut acc: Option<Hash> = None;
    for (level, index) in bs.into_iter().rev() {
        let h = src.node(level, index)?;
        acc = Some(match acc {
            None => h,
            Some(right) => node_hash(&h, &right),
        });
    }
    Ok(acc.unwrap_or_else(empty_root))
}

/// Root of the tree of size `n`.
pub fn root(src: &dyn NodeSource, n: u64) -> Result<Hash> {
    range_hash(src, 0, n)
}

/// Inclusion proof (audit path) for leaf `m` in the tree of size `n` (RFC 6962 §2.1.1).
pub fn inclusion_proof(src: &dyn NodeSource, m: u64, n: u64) -> Result<Vec<Hash>> {
    if m >= n {
        return Err(Error::validation("the leaf is not in a tree of that size"));
    }
    let mut path = Vec::new();
    path_rec(src, m, 0, n, &mut path)?;
    Ok(path)
}

fn path_rec(src: &dyn NodeSource, m: u64, start: u64, end: u64, out: &mut Vec<Hash>) -> Result<()> {
    let n = end - start;
    if n <= 1 {
        return Ok(());
    }
    let k = split(n);
    if m < k {
        path_rec(src, m, start, start + k, out)?;
        out.push(range_hash(src, start + k, end)?);
    } else {
        path_rec(src, m - k, start + k, end, out)?;
        out.push(range_hash(src, start, start + k)?);
    }
    Ok(())
}

/// Consistency proof between sizes `m` and `n` (RFC 6962 §2.1.2), `0 < m ≤ n`.
pub fn consistency_proof(src: &dyn NodeSource, m: u64, n: u64) -> Result<Vec<Hash>> {
    if m == 0 || m > n {
        return Err(Error::validation("a consistency proof needs 0 < first ≤ second"));
    }
    let mut out = Vec::new();
    subproof(src, m, 0, n, true, &mut out)?;
    Ok(out)
}

fn subproof(src: &dyn NodeSource, m: u64, start: u64, end: u64, b: bool, out: &mut Vec<Hash>) -> Result<()> {
    let n = end - start;
    if m == n {
        if !b {
            out.push(range_hash(src, start, end)?);
        }
        return Ok(());
    }
    let k = split(n);
    if m <= k {
        subproof(src, m, start, start + k, b, out)?;
        out.push(range_hash(src, start + k, end)?);
    } else {
        subproof(src, m - k, start + k, end, false, out)?;
        out.push(range_hash(src, start, start + k)?);
    }
    Ok(())
}

/// Verify an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, path: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && &r == root
}

/// Verify a consistency proof between (m, root_m) and (n, root_n) (RFC 9162 §2.1.4.2).
pub fn verify_consistency(m: u64, root_m: &Hash, n: u64, root_n: &Hash, proof: &[Hash]) -> bool {
    if m == 0 || m > n {
        return false;
    }
    if m == n {
        return proof.is_empty() && root_m == root_n;
    }
    let mut p: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if m.is_power_of_two() {
        p.push(*root_m);
    }
    p.extend_from_slice(proof);
    let Some(first) = p.first() else { return false };
    let (mut f, mut s) = (m - 1, n - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in &p[1..] {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    &fr == root_m && &sr == root_n && s == 0
}

/// Nodes that appending leaves `[old, new)` completes (level ≥ 1), lowest level first.
pub fn completed_nodes(old: u64, new: u64) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let mut level = 1u32;
    while level < 64 && (1u64 << level) <= new {
        let size = 1u64 << level;
        // Nodes whose end lies in (old, new].
        let first = old / size; // first node that may end after `old`
        let last_end = new / size; // nodes with index < last_end are complete
        for i in first..last_end {
            if (i + 1) * size > old {
                out.push((level, i));
            }
        }
        level += 1;
    }
    out
}

/// Hash the nodes completed by appending leaves `[old, new)`: `src` must hold the new leaves
/// (level 0) and the older nodes they combine with; returns the new nodes in order.
pub fn build_nodes(src: &dyn NodeSource, fresh: &mut NodeMap, old: u64, new: u64) -> Result<Vec<((u32, u64), Hash)>> {
    let mut out = Vec::new();
    for (level, i) in completed_nodes(old, new) {
        let get = |l: u32, idx: u64, fresh: &NodeMap| -> Result<Hash> {
            match fresh.get(&(l, idx)) {
                Some(h) => Ok(*h),
                None => src.node(l, idx),
            }
        };
        let left = get(level - 1, 2 * i, fresh)?;
        let right = get(level - 1, 2 * i + 1, fresh)?;
        let h = node_hash(&left, &right);
        fresh.insert((level, i), h);
        out.push(((level, i), h));
    }
    Ok(out)
}

/// What recomputing a root from a range of leaves needs besides those leaves: the complete
/// subtrees covering `[0, start)` and `[end, size)` (the compact ranges on either side).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RangeProof {
    pub start: u64,
    pub end: u64,
    pub size: u64,
    /// `(level, index, hex hash)` of every complete subtree needed outside `[start, end)`.
    pub nodes: Vec<(u32, u64, String)>,
}

/// Which nodes outside `[start, end)` recomputing the root of `size` reads.
pub fn range_proof_nodes(start: u64, end: u64, size: u64) -> Result<Vec<(u32, u64)>> {
    if start > end || end > size {
        return Err(Error::validation("a range proof needs start ≤ end ≤ size"));
    }
    let plan = Planner::default();
    root(&plan, size)?;
    // The root's blocks may straddle the range: descend into straddling blocks.
    let mut out = Vec::new();
    for (level, index) in plan.into_wanted() {
        outside(level, index, start, end, &mut out);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn outside(level: u32, index: u64, start: u64, end: u64, out: &mut Vec<(u32, u64)>) {
    let (lo, hi) = (index << level, (index + 1) << level);
    if hi <= start || lo >= end {
        out.push((level, index));
    } else if lo >= start && hi <= end {
        // Inside the range: recomputed from its leaves.
    } else if level > 0 {
        outside(level - 1, 2 * index, start, end, out);
        outside(level - 1, 2 * index + 1, start, end, out);
    }
}

/// A node source over a range's recomputed leaves plus a range proof's outside nodes.
pub struct RangeSource<'a> {
    pub start: u64,
    pub leaves: &'a [Hash],
    pub outside: NodeMap,
}

impl NodeSource for RangeSource<'_> {
    fn node(&self, level: u32, index: u64) -> Result<Hash> {
        if let Some(h) = self.outside.get(&(level, index)) {
            return Ok(*h);
        }
        let (lo, hi) = (index << level, (index + 1) << level);
        let end = self.start + self.leaves.len() as u64;
        if lo >= self.start && hi <= end {
            if level == 0 {
                return Ok(self.leaves[(lo - self.start) as usize]);
            }
            let l = self.node(level - 1, 2 * index)?;
            let r = self.node(level - 1, 2 * index + 1)?;
            return Ok(node_hash(&l, &r));
        }
        if level > 0 && lo < end && hi > self.start {
            let l = self.node(level - 1, 2 * index)?;
            let r = self.node(level - 1, 2 * index + 1)?;
            return Ok(node_hash(&l, &r));
        }
        Err(Error::new(
            ErrorCode::ValidationFailed,
            format!("the range proof lacks node ({level}, {index})"),
        ))
    }
}

/// Root of `size` from the leaves of `[proof.start, proof.end)` and the proof's outside nodes.
pub fn range_root(leaves: &[Hash], proof: &RangeProof) -> Result<Hash> {
    if (proof.end - proof.start) as usize != leaves.len() {
        return Err(Error::validation("the number of leaves does not match the range"));
    }
    let mut outside = NodeMap::new();
    for (l, i, h) in &proof.nodes {
        let h = from_hex(h).ok_or_else(|| Error::validation("invalid hash in range proof"))?;
        outside.insert((*l, *i), h);
    }
    let src = RangeSource {
        start: proof.start,
        leaves,
        outside,
    };
    root(&src, proof.size)
}

// ------------------------------------------------------------------ signed tree heads

/// A signed statement of the ledger's size and root at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeHead {
    pub tree_size: u64,
    /// Hex SHA-256 root.
    pub root_hash: String,
    /// µs since the epoch.
    pub timestamp: i64,
    pub key_id: String,
    /// Base64 ASN.1 DER ECDSA P-256 signature over [`TreeHead::checkpoint_body`].
    pub signature: String,
}

impl TreeHead {
    /// The signed text: a checkpoint body (origin, size, base64 root, then extension lines).
    pub fn checkpoint_body(tree_size: u64, root: &Hash, timestamp: i64, key_id: &str) -> String {
        format!(
            "{ORIGIN}\n{tree_size}\n{}\ntimestamp {timestamp}\nkey {key_id}\n",
            base64::engine::general_purpose::STANDARD.encode(root)
        )
    }

    /// The head as a text checkpoint: the body, a blank line, the signature line.
    pub fn checkpoint(&self) -> String {
        let root = from_hex(&self.root_hash).unwrap_or([0u8; 32]);
        format!(
            "{}\n— {ORIGIN} {} {}\n",
            Self::checkpoint_body(self.tree_size, &root, self.timestamp, &self.key_id),
            self.key_id,
            self.signature
        )
    }

    pub fn root(&self) -> Result<Hash> {
        from_hex(&self.root_hash).ok_or_else(|| Error::validation("invalid root hash"))
    }

    /// Check the signature with the public key of `self.key_id` from `keys`.
    pub fn verify(&self, keys: &[LedgerPublicKey]) -> std::result::Result<(), HeadProblem> {
        let key = keys
            .iter()
            .find(|k| k.key_id == self.key_id)
            .ok_or_else(|| HeadProblem::UnknownKey(self.key_id.clone()))?;
        let root = self.root().map_err(|_| HeadProblem::BadSignature)?;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&self.signature)
            .map_err(|_| HeadProblem::BadSignature)?;
        let body = Self::checkpoint_body(self.tree_size, &root, self.timestamp, &self.key_id);
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &key.point)
            .verify(body.as_bytes(), &sig)
            .map_err(|_| HeadProblem::BadSignature)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadProblem {
    UnknownKey(String),
    BadSignature,
}

impl std::fmt::Display for HeadProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadProblem::UnknownKey(k) => write!(f, "signed by an unknown key {k:?}"),
            HeadProblem::BadSignature => write!(f, "the signature does not verify"),
        }
    }
}

/// DER prefix of a P-256 SubjectPublicKeyInfo before the 65-byte uncompressed point.
const SPKI_P256_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A ledger verification key: the uncompressed P-256 point and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerPublicKey {
    pub key_id: String,
    pub point: Vec<u8>,
}

impl LedgerPublicKey {
    pub fn from_point(point: Vec<u8>) -> Result<LedgerPublicKey> {
        if point.len() != 65 || point[0] != 4 {
            return Err(Error::validation("a ledger key is an uncompressed P-256 point"));
        }
        Ok(LedgerPublicKey {
            key_id: key_id(&point),
            point,
        })
    }

    /// PEM SubjectPublicKeyInfo (what `openssl` and other verifiers take).
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_P256_PREFIX.to_vec();
        der.extend_from_slice(&self.point);
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap_or(""));
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
        out
    }

    /// Every P-256 public key in a PEM text.
    pub fn from_pem(text: &str) -> Result<Vec<LedgerPublicKey>> {
        let mut out = Vec::new();
        let mut inside = false;
        let mut b64 = String::new();
        for line in text.lines() {
            let line = line.trim();
            if line == "-----BEGIN PUBLIC KEY-----" {
                inside = true;
                b64.clear();
            } else if line == "-----END PUBLIC KEY-----" {
                inside = false;
                let der = base64::engine::general_purpose::STANDARD
                    .decode(&b64)
                    .map_err(|_| Error::validation("invalid PEM public key"))?;
                let point = der
                    .strip_prefix(SPKI_P256_PREFIX)
                    .ok_or_else(|| Error::validation("not a P-256 public key"))?;
                out.push(LedgerPublicKey::from_point(point.to_vec())?);
            } else if inside {
                b64.push_str(line);
            }
        }
        if out.is_empty() {
            return Err(Error::validation("no public key in the PEM text"));
        }
        Ok(out)
    }
}

/// Key id: the first 16 hex digits of SHA-256 over the uncompressed point.
pub fn key_id(point: &[u8]) -> String {
    hex::encode(sha256_parts(&[point]))[..16].to_string()
}

/// A signing key for tree heads.
pub struct LedgerSigner {
    pair: EcdsaKeyPair,
    pub public: LedgerPublicKey,
}

impl std::fmt::Debug for LedgerSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LedgerSigner({})", self.public.key_id)
    }
}

impl LedgerSigner {
    /// A new key as PKCS#8 DER (to seal and store).
    pub fn generate_pkcs8() -> Result<Vec<u8>> {
        let rng = ring::rand::SystemRandom::new();
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| Error::internal("cannot generate a ledger key"))
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<LedgerSigner> {
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng)
            .map_err(|_| Error::internal("invalid ledger key"))?;
        let public = LedgerPublicKey::from_point(pair.public_key().as_ref().to_vec())?;
        Ok(LedgerSigner { pair, public })
    }

    pub fn sign(&self, tree_size: u64, root: &Hash, timestamp: i64) -> Result<TreeHead> {
        let rng = ring::rand::SystemRandom::new();
        let body = TreeHead::checkpoint_body(tree_size, root, timestamp, &self.public.key_id);
        let sig = self
            .pair
            .sign(&rng, body.as_bytes())
            .map_err(|_| Error::internal("cannot sign the tree head"))?;
        Ok(TreeHead {
            tree_size,
            root_hash: to_hex(root),
            timestamp,
            key_id: self.public.key_id.clone(),
            signature: base64::engine::general_purpose::STANDARD.encode(sig.as_ref()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6962 §2.1 taken literally, over leaf data.
    fn mth(d: &[Vec<u8>]) -> Hash {
        match d.len() {
            0 => empty_root(),
            1 => leaf_hash(&d[0]),
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&d[..k]), &mth(&d[k..]))
            }
        }
    }

    fn path(m: usize, d: &[Vec<u8>]) -> Vec<Hash> {
        let n = d.len();
        if n <= 1 {
            return vec![];
        }
        let k = split(n as u64) as usize;
        if m < k {
            let mut p = path(m, &d[..k]);
            p.push(mth(&d[k..]));
            p
        } else {
            let mut p = path(m - k, &d[k..]);
            p.push(mth(&d[..k]));
            p
        }
    }

    fn subproof(m: usize, d: &[Vec<u8>], b: bool) -> Vec<Hash> {
        let n = d.len();
        if m == n {
            return if b { vec![] } else { vec![mth(d)] };
        }
        let k = split(n as u64) as usize;
        if m <= k {
            let mut p = subproof(m, &d[..k], b);
            p.push(mth(&d[k..]));
            p
        } else {
            let mut p = subproof(m - k, &d[k..], false);
            p.push(mth(&d[..k]));
            p
        }
    }

    /// Every complete node, built incrementally with [`build_nodes`] in uneven batches.
    fn stored(d: &[Vec<u8>]) -> NodeMap {
        let mut nodes = NodeMap::new();
        let mut size = 0u64;
        let mut batch = 1u64;
        while size < d.len() as u64 {
            let end = (size + batch).min(d.len() as u64);
            let mut fresh = NodeMap::new();
            for i in size..end {
                fresh.insert((0, i), leaf_hash(&d[i as usize]));
            }
            let built = build_nodes(&nodes, &mut fresh, size, end).unwrap();
            for (k, h) in fresh {
                nodes.insert(k, h);
            }
            assert!(built.iter().all(|((l, _), _)| *l >= 1));
            size = end;
            batch = batch % 7 + 1;
        }
        nodes
    }

    #[test]
    fn roots_proofs_and_verification_match_rfc6962_for_many_sizes() {
        let data: Vec<Vec<u8>> = (0..70u32).map(|i| format!("leaf {i}").into_bytes()).collect();
        let nodes = stored(&data);
        for n in 1..=data.len() {
            let d = &data[..n];
            let r = root(&nodes, n as u64).unwrap();
            assert_eq!(r, mth(d), "root of {n}");
            for m in 0..n {
                let p = inclusion_proof(&nodes, m as u64, n as u64).unwrap();
                assert_eq!(p, path(m, d), "path {m} of {n}");
                assert!(verify_inclusion(&leaf_hash(&d[m]), m as u64, n as u64, &p, &r));
                // Wrong index, wrong leaf, wrong size, truncated path: refused.
                assert!(!verify_inclusion(&leaf_hash(b"other"), m as u64, n as u64, &p, &r));
                if n > 1 {
                    assert!(!verify_inclusion(
                        &leaf_hash(&d[m]),
                        ((m + 1) % n) as u64,
                        n as u64,
                        &p,
                        &r
                    ));
                    assert!(!verify_inclusion(
                        &leaf_hash(&d[m]),
                        m as u64,
                        n as u64,
                        &p[..p.len() - 1],
                        &r
                    ));
                }
            }
            for m in 1..=n {
                let p = consistency_proof(&nodes, m as u64, n as u64).unwrap();
                assert_eq!(p, subproof(m, d, true), "consistency {m}→{n}");
                let rm = mth(&data[..m]);
                assert!(verify_consistency(m as u64, &rm, n as u64, &r, &p), "verify {m}→{n}");
                if m < n {
                    assert!(!verify_consistency(m as u64, &leaf_hash(b"x"), n as u64, &r, &p));
                    assert!(!verify_consistency(m as u64, &rm, n as u64, &leaf_hash(b"x"), &p));
                }
            }
        }
    }

    #[test]
    fn range_roots_need_only_the_compact_ranges_outside() {
        let data: Vec<Vec<u8>> = (0..45u32).map(|i| format!("e{i}").into_bytes()).collect();
        let nodes = stored(&data);
        for size in [1u64, 2, 7, 16, 33, 45] {
            for start in 0..size {
                for end in start..=size {
                    let wanted = range_proof_nodes(start, end, size).unwrap();
                    assert!(wanted.len() <= 2 * 64);
                    let proof = RangeProof {
                        start,
                        end,
                        size,
                        nodes: wanted
                            .iter()
                            .map(|(l, i)| (*l, *i, to_hex(&nodes.node(*l, *i).unwrap())))
                            .collect(),
                    };
                    let leaves: Vec<Hash> = (start..end).map(|i| leaf_hash(&data[i as usize])).collect();
                    assert_eq!(
                        range_root(&leaves, &proof).unwrap(),
                        mth(&data[..size as usize]),
                        "[{start},{end}) of {size}"
                    );
                    if !leaves.is_empty() {
                        let mut bad = leaves.clone();
                        bad[0] = leaf_hash(b"edited");
                        assert_ne!(range_root(&bad, &proof).unwrap(), mth(&data[..size as usize]));
                    }
                }
            }
        }
    }

    #[test]
    fn canonical_encoding_is_deterministic_and_sorted() {
        let a: Value = serde_json::from_str(r#"{"b":1,"a":{"z":[1,{"y":2,"x":"é\n"}],"c":null}}"#).unwrap();
        let mut out = Vec::new();
        canonical_json(&a, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":{"c":null,"z":[1,{"x":"é\n","y":2}]},"b":1}"#
        );
        let r = Record {
            v: 1,
            seq: 3,
            event_id: "evt".into(),
            stream: "caracal:audit".into(),
            kind: "decision".into(),
            tenant: None,
            occurred_at: 1,
            recorded_at: 2,
            body: a,
        };
        assert_eq!(
            String::from_utf8(r.canonical()).unwrap(),
            r#"{"body":{"a":{"c":null,"z":[1,{"x":"é\n","y":2}]},"b":1},"event_id":"evt","kind":"decision","occurred_at":1,"recorded_at":2,"seq":3,"stream":"caracal:audit","tenant":null,"v":1}"#
        );
    }

    #[test]
    fn the_direct_encoding_equals_the_generic_canonical_form() {
        for tenant in [None, Some("ten_\"x\"".to_string())] {
            let r = Record {
                v: 1,
                seq: 42,
                event_id: "evt_1".into(),
                stream: "caracal:audit".into(),
                kind: "decision\u{2028}".into(),
                tenant,
                occurred_at: -5,
                recorded_at: 1_700_000_000_000_000,
                body: serde_json::json!({"z": [1.5, null, {"b": true, "a": "\u{0}"}], "a": -1}),
            };
            let mut generic = Vec::new();
            canonical_json(&serde_json::to_value(&r).unwrap(), &mut generic);
            assert_eq!(
                String::from_utf8(r.canonical()).unwrap(),
                String::from_utf8(generic).unwrap()
            );
        }
    }

    #[test]
    fn heads_sign_and_verify_and_tampering_is_caught() {
        let signer = LedgerSigner::from_pkcs8(&LedgerSigner::generate_pkcs8().unwrap()).unwrap();
        let root = leaf_hash(b"x");
        let head = signer.sign(5, &root, 1_700_000_000_000_000).unwrap();
        let keys = vec![signer.public.clone()];
        assert_eq!(head.verify(&keys), Ok(()));
        let mut forged = head.clone();
        forged.tree_size = 6;
        assert_eq!(forged.verify(&keys), Err(HeadProblem::BadSignature));
        let other = LedgerSigner::from_pkcs8(&LedgerSigner::generate_pkcs8().unwrap()).unwrap();
        assert!(matches!(
            head.verify(std::slice::from_ref(&other.public)),
            Err(HeadProblem::UnknownKey(_))
        ));
        let pem = signer.public.to_pem();
        assert_eq!(LedgerPublicKey::from_pem(&pem).unwrap(), keys);
        assert!(head.checkpoint().starts_with("caracal-ledger/v1\n5\n"));
    }
}

// ------------------------------------------------------------------ offline verification

/// Something wrong with a ledger export, located as precisely as the evidence allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A head whose signature does not verify, or that names an unknown key.
    Head { tree_size: u64, why: String },
    /// An entry is missing from the sequence.
    Missing { seq: u64 },
    /// An entry appears out of order or twice.
    OutOfOrder { seq: u64, expected: u64 },
    /// An entry's content does not hash to its recorded leaf hash: it was edited (or moved).
    Edited { seq: u64, event_id: String },
    /// Recomputed from the entries, a signed head's root does not match: something in
    /// `(from, to]` changed together with its stored hash.
    RootMismatch { tree_size: u64, from: u64, to: u64 },
    /// An entry whose inclusion proof against a signed head fails although its own stored hash
    /// matches: it, or the entry sharing its smallest subtree, was altered together with the
    /// stored hash.
    NotInHead { seq: u64, event_id: String, tree_size: u64 },
    /// A signed head claims entries the ledger no longer holds (tail truncation).
    Truncated { head_size: u64, ledger_size: u64 },
    /// A head over the range came without the subtree hashes needed to recompute it.
    Unprovable { tree_size: u64 },
    /// The export itself is malformed.
    Malformed { line: usize, why: String },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Head { tree_size, why } => write!(f, "tree head of size {tree_size}: {why}"),
            Problem::Missing { seq } => write!(f, "entry #{seq} is missing (deleted)"),
            Problem::OutOfOrder { seq, expected } => {
                write!(
                    f,
                    "entry #{seq} appears where #{expected} belongs (reordered or duplicated)"
                )
            }
            Problem::Edited { seq, event_id } => write!(
                f,
                "entry #{seq} (event {event_id}) does not match its leaf hash: it was edited or moved"
            ),
            Problem::RootMismatch { tree_size, from, to } => write!(
                f,
                "the signed head of size {tree_size} does not match the entries: an entry in #{from}..#{} was altered together with its stored hash",
                to.saturating_sub(1)
            ),
            Problem::NotInHead {
                seq,
                event_id,
                tree_size,
            } => write!(
                f,
                "entry #{seq} (event {event_id}) is not in the signed head of size {tree_size}: it, or the entry sharing its subtree, was altered along with its stored hash"
            ),
            Problem::Truncated { head_size, ledger_size } => write!(
                f,
                "a signed head covers {head_size} entries but the ledger holds {ledger_size}: entries #{ledger_size}..#{} were removed (tail truncation)",
                head_size.saturating_sub(1)
            ),
            Problem::Unprovable { tree_size } => {
                write!(
                    f,
                    "the head of size {tree_size} cannot be recomputed: the ledger lacks the hashes it needs"
                )
            }
            Problem::Malformed { line, why } => write!(f, "export line {line}: {why}"),
        }
    }
}

/// What verifying an export established.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub start: u64,
    pub end: u64,
    pub entries: u64,
    /// Other tenants' entries, checked by their leaf hash only.
    pub redacted: u64,
    /// Heads whose signature verified and whose root matched the entries.
    pub heads_verified: Vec<u64>,
    /// Entries `[from, end)` recorded after the newest signed head (not yet provable).
    pub unsigned_from: Option<u64>,
    /// Entries below this were dropped by retention, and the signed head of this size — which
    /// summarizes them — verified against the hashes the range builds on.
    pub summarized_below: Option<u64>,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Deserialize)]
struct ExportHeader {
    start: u64,
    end: u64,
    ledger_size: u64,
    latest_head_size: Option<u64>,
    /// Entries below this were dropped by retention (absent in older exports: none).
    #[serde(default)]
    pruned_below: u64,
}

/// Verify a JSON Lines export (see the audit service's `/v1/ledger/export`) with trusted
/// public `keys`: head signatures, the sequence, every entry against its leaf hash, and every
/// head's root recomputed from the entries and the subtree hashes outside the range.
pub fn verify_export(text: &str, keys: &[LedgerPublicKey]) -> Report {
    let mut r = Report::default();
    let mut header: Option<ExportHeader> = None;
    let mut heads: Vec<TreeHead> = Vec::new();
    let mut proofs: std::collections::HashMap<u64, Option<RangeProof>> = Default::default();
    // (seq, leaf hash: recomputed for entries, as given for redacted ones)
    let mut leaves: Vec<(u64, Hash)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                r.problems.push(Problem::Malformed {
                    line: n,
                    why: e.to_string(),
                });
                continue;
            }
        };
        let bad = |why: &str| Problem::Malformed {
            line: n,
            why: why.to_string(),
        };
        match v["type"].as_str().unwrap_or("") {
            "export" => match serde_json::from_value::<ExportHeader>(v.clone()) {
                Ok(h) => header = Some(h),
                Err(e) => r.problems.push(bad(&e.to_string())),
            },
            "key" => {}
            "head" => match serde_json::from_value::<TreeHead>(v.clone()) {
                Ok(h) => heads.push(h),
                Err(e) => r.problems.push(bad(&e.to_string())),
            },
            "range_proof" => {
                let size = v["tree_size"].as_u64().unwrap_or(0);
                let p = serde_json::from_value::<Option<RangeProof>>(v["proof"].clone()).unwrap_or(None);
                proofs.insert(size, p);
            }
            "entry" => {
                let rec = serde_json::from_value::<Record>(v["record"].clone());
                let stored = v["leaf_hash"].as_str().and_then(from_hex);
                match (rec, stored) {
                    (Ok(rec), Some(stored)) => {
                        let h = rec.leaf_hash();
                        if h != stored {
                            r.problems.push(Problem::Edited {
                                seq: rec.seq,
                                event_id: rec.event_id.clone(),
                            });
                        }
                        r.entries += 1;
                        leaves.push((rec.seq, h));
                    }
                    _ => r.problems.push(bad("an entry needs a record and a leaf_hash")),
                }
            }
            "redacted" => match (v["seq"].as_u64(), v["leaf_hash"].as_str().and_then(from_hex)) {
                (Some(seq), Some(h)) => {
                    r.redacted += 1;
                    leaves.push((seq, h));
                }
                _ => r.problems.push(bad("a redacted entry needs seq and leaf_hash")),
            },
            other => r.problems.push(bad(&format!("unknown line type {other:?}"))),
        }
    }
    let Some(h) = header else {
        r.problems.push(Problem::Malformed {
            line: 1,
            why: "no export header".into(),
        });
        return r;
    };
    r.start = h.start;
    r.end = h.end;
    if let Some(latest) = h.latest_head_size
        && latest > h.ledger_size
    {
        r.problems.push(Problem::Truncated {
            head_size: latest,
            ledger_size: h.ledger_size,
        });
    }
    // The sequence: exactly start..end, each once, in order.
    let mut ordered: Vec<Hash> = Vec::with_capacity(leaves.len());
    let mut expected = h.start;
    let mut intact = true;
    for (seq, hash) in &leaves {
        if *seq == expected {
            ordered.push(*hash);
            expected += 1;
        } else if *seq > expected {
            for missing in expected..*seq {
                r.problems.push(Problem::Missing { seq: missing });
            }
            intact = false;
            expected = *seq + 1;
        } else {
            r.problems.push(Problem::OutOfOrder { seq: *seq, expected });
            intact = false;
        }
    }
    if expected < h.end {
        for missing in expected..h.end.min(expected + 1000) {
            r.problems.push(Problem::Missing { seq: missing });
        }
        intact = false;
    }
    // Heads: signature, then root from the entries.
    heads.sort_by_key(|x| x.tree_size);
    let mut last_ok = h.start;
    for head in &heads {
        if let Err(why) = head.verify(keys) {
            r.problems.push(Problem::Head {
                tree_size: head.tree_size,
                why: why.to_string(),
            });
            continue;
        }
        if !intact {
            continue;
        }
        let Some(Some(proof)) = proofs.get(&head.tree_size) else {
            r.problems.push(Problem::Unprovable {
                tree_size: head.tree_size,
            });
            continue;
        };
        let upto = (proof.end - proof.start) as usize;
        if proof.start != h.start || upto > ordered.len() {
            r.problems.push(Problem::Unprovable {
                tree_size: head.tree_size,
            });
            continue;
        }
        match range_root(&ordered[..upto], proof) {
            Ok(root) if head.root().is_ok_and(|r| r == root) => {
                r.heads_verified.push(head.tree_size);
                last_ok = last_ok.max(head.tree_size.min(h.end));
            }
            _ => r.problems.push(Problem::RootMismatch {
                tree_size: head.tree_size,
                from: last_ok,
                to: head.tree_size.min(h.end),
            }),
        }
    }
    // Retention: what was dropped must be summarized by a signed head of exactly the size the
    // range starts at (verified above like every head).
    if h.pruned_below > 0 && h.start == h.pruned_below {
        if r.heads_verified.contains(&h.start) {
            r.summarized_below = Some(h.start);
        } else if !r.problems.iter().any(|p| {
            matches!(p, Problem::Head { tree_size, .. } | Problem::Unprovable { tree_size } | Problem::RootMismatch { tree_size, .. } if *tree_size == h.start)
        }) {
            r.problems.push(Problem::Unprovable { tree_size: h.start });
        }
    }
    let covered = heads.iter().map(|x| x.tree_size).max().unwrap_or(0);
    if covered < h.end {
        r.unsigned_from = Some(covered.max(h.start));
    }
    r
}

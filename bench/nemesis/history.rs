//! What the nemesis records: every request and its answer, every fault dealt, and the state read
//! back at the end. Written as JSON lines (`history.jsonl`) so a run can be checked again.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Buy,
    Cancel,
    Pay,
    Read,
}

/// One attempt of one request, as the client saw it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Op {
    pub seq: u64,
    pub client: u32,
    pub kind: Option<Kind>,
    pub user: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qty: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_ref: Option<String>,
    /// The client gave up on the answer on purpose (it hung up after a few milliseconds).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abandoned: bool,
    pub sent_ms: u64,
    pub done_ms: u64,
    /// None: no answer (connection refused or reset, timeout).
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The order's status in the answer (buys, cancels, payments).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_status: Option<String>,
    /// A read's answer: (order id, status) of every order listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen: Option<Vec<(String, String)>>,
}

impl Op {
    /// A buy the engine acknowledged (201, or 200 for a replay of an acknowledged purchase).
    pub fn acked_buy(&self) -> bool {
        self.kind == Some(Kind::Buy)
            && matches!(self.status, Some(200 | 201))
            && self.order_id.is_some()
    }

    pub fn ok(&self) -> bool {
        self.status == Some(200)
    }
}

/// A fault the nemesis dealt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultEvent {
    pub kind: String,
    pub target: String,
    pub at_ms: u64,
    /// When it was over (the engine back up, the server thawed), if it was.
    pub done_ms: u64,
    /// The fault could not be dealt (a move refused, say): why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// An order as read back at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalOrder {
    pub order_id: String,
    pub item: u64,
    pub qty: i64,
    pub status: String,
}

/// One item's audit at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemAudit {
    pub item: u64,
    pub stock: i64,
    pub remaining: i64,
    pub reserved: i64,
    pub ordered: i64,
    pub paid: i64,
    pub conserved: bool,
}

/// A recorded payment (read from the shards).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRow {
    pub order_id: String,
    pub payment_ref: String,
    pub state: String,
}

/// Everything read back once the faults stopped and the cluster healed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Final {
    pub per_user_limit: i64,
    /// user -> every order of theirs.
    pub orders: HashMap<u64, Vec<FinalOrder>>,
    pub items: Vec<ItemAudit>,
    pub payments: Vec<PaymentRow>,
}

/// The history of a run, appended to by every client and written through to a file.
pub struct History {
    ops: Mutex<(u64, Vec<Op>)>,
    file: Mutex<Option<std::io::BufWriter<std::fs::File>>>,
}

impl History {
    pub fn new(path: &std::path::Path) -> Result<Self, String> {
        let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            ops: Mutex::new((0, Vec::new())),
            file: Mutex::new(Some(std::io::BufWriter::new(file))),
        })
    }

    pub fn record(&self, mut op: Op) {
        let mut ops = lock(&self.ops);
        ops.0 += 1;
        op.seq = ops.0;
        if let Some(f) = lock(&self.file).as_mut() {
            if let Ok(line) = serde_json::to_string(&op) {
                let _ = writeln!(f, "{line}");
            }
        }
        ops.1.push(op);
    }

    pub fn ops(&self) -> Vec<Op> {
        lock(&self.ops).1.clone()
    }

    pub fn flush(&self) {
        if let Some(f) = lock(&self.file).as_mut() {
            let _ = f.flush();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

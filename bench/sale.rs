//! What a run works on and what it got: the sale it set up and the orders the engine acknowledged.
//! Shared by the run, the verification and the fault injection.

/// One acknowledged order.
#[derive(Debug, Clone)]
pub struct Acked {
    pub item: u64,
    pub user: u64,
    pub quantity: i64,
    pub order_id: String,
    pub at_s: f64,
}

/// The sale a run created.
pub struct Setup {
    pub sale_id: u64,
    /// (item id, stock)
    pub items: Vec<(u64, i64)>,
    pub user_base: u64,
}

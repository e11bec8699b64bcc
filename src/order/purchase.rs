//! The purchase: transaction 1 on the item's group (alone or in a batch), transaction 2 on the
//! user's group, the compensation when transaction 2 surely did not commit, and the confirmation
//! of the reservation off the request path ([module docs](super)).

use super::*;
impl OrderService {
    /// Buy: the whole order path (module docs).
    pub async fn buy(self: &Arc<Self>, req: BuyRequest) -> Result<Bought, OrderError> {
        let txn_id = txn_id_for(req.sale, req.item, req.user, req.request_id.as_ref());
        let retry = req.request_id.as_ref().map(|_| txn_id);
        if self.hot.soldout.verdict(req.sale, req.item, retry) == Verdict::SoldOut {
            metrics::counter!(crate::telemetry::SOLDOUT_FASTPATH).increment(1);
            return Err(OrderError::SoldOut { remaining: 0 });
        }
        let ticket = self
            .hot
            .admission
            .admit(req.sale, req.item)
            .ok_or(OrderError::Overloaded)?;
        let this = self.clone();
        // The purchase keeps the request's span: its log lines stay with the request's id. It is
        // boxed: the spawn then moves a pointer, not the whole state machine (copied whole on
        // each move: memmove was the largest user-space frame of a hot order's profile).
        let purchase = self.tasks.spawn(
            Box::pin(async move {
                let _ticket = ticket;
                this.purchase(&req, txn_id).await
            })
            .instrument(tracing::Span::current()),
        );
        purchase.await.map_err(|e| {
            OrderError::from(DbError::Lost(format!("the purchase task failed: {e}")))
        })?
    }

    /// Transaction 1, then the order (or the stock back). An item fenced by a move is retried on
    /// its route as re-read, for up to [`FENCE_WAIT`]: the move switches it to its new group.
    pub(super) async fn purchase(
        &self,
        req: &BuyRequest,
        txn_id: Uuid,
    ) -> Result<Bought, OrderError> {
        let started = std::time::Instant::now();
        // No stock is taken for an order its user's group could not acknowledge (no shadow there
        // under `block`); the item's group is checked by transaction 1 itself.
        let user_group = self.cluster.group(self.router.user_group(req.user));
        user_group.await_durable(self.timeout / 2).await?;
        let reserved = loop {
            match self.reserve(req, txn_id).await? {
                Err(Refusal::Moving) if started.elapsed() < FENCE_WAIT => {
                    self.await_reroute().await;
                }
                outcome => break outcome,
            }
        };
        let reserved = reserved.map_err(|r| OrderError::from_refusal(r, req.sale, req.item))?;
        self.place_order(req, reserved).await
    }

    /// Transaction 1 on the item's group, as routed now.
    pub(super) async fn reserve(
        &self,
        req: &BuyRequest,
        txn_id: Uuid,
    ) -> Result<Result<Reserved, Refusal>, OrderError> {
        let group = self.router.item_group(req.item);
        let span = tracing::debug_span!("reserve", group = %self.cluster.group(group).name,
            %txn_id, outcome = tracing::field::Empty);
        let work = async {
            match &self.coalescer {
                Some(c) => c.reserve(req, txn_id).await,
                None => self.reserve_plain(req, txn_id).await,
            }
        };
        phase("reserve", span, work, |r| match r {
            Ok(Ok(_)) => "reserved".into(),
            Ok(Err(refusal)) => format!("{refusal:?}"),
            Err(e) => e.to_string(),
        })
        .await
    }

    pub(super) async fn reserve_plain(
        &self,
        req: &BuyRequest,
        txn_id: Uuid,
    ) -> Result<Result<Reserved, Refusal>, OrderError> {
        let resumable = req.request_id.is_some();
        let (outcome, remaining) = self
            .on_item(req.item, Work::Reserve, async |c| {
                reservations::reserve_one(
                    c,
                    req.sale,
                    req.item,
                    req.user,
                    req.quantity,
                    txn_id,
                    resumable,
                )
                .await
            })
            .await?;
        if let Some(remaining) = remaining {
            self.hot.observe(req.sale, req.item, remaining);
        }
        Ok(outcome)
    }

    /// Transaction 2 and, when it surely failed, compensation.
    pub(super) async fn place_order(
        &self,
        req: &BuyRequest,
        r: Reserved,
    ) -> Result<Bought, OrderError> {
        let new = NewOrder {
            order_id: r.txn_id,
            user: req.user,
            sale: req.sale,
            item: req.item,
            quantity: r.quantity,
            amount_cents: r.price_cents * i64::from(r.quantity),
            payment_window_secs: r.payment_window_secs,
            status: OrderStatus::PendingPayment,
        };
        let user_group = self.router.user_group(req.user);
        let span = tracing::debug_span!("order", group = %self.cluster.group(user_group).name,
            txn_id = %r.txn_id, outcome = tracing::field::Empty);
        let inserted = phase(
            "order",
            span,
            self.insert_order_retrying(req, new),
            outcome_of,
        )
        .await;
        let inserted = match inserted {
            Ok(inserted) => inserted,
            // A resumed reservation belongs to an earlier attempt whose order may still commit:
            // it is never released here, only by the reconciler once the txn id is settled.
            Err(e) if r.existing => {
                return Err(OrderError::Unavailable(format!(
                    "order not confirmed yet, retry with the same request_id: {e}"
                )))
            }
            Err(e) => {
                let span = tracing::debug_span!("compensate", txn_id = %r.txn_id,
                    outcome = tracing::field::Empty);
                let work = self.compensate(req.item, r.txn_id, r.attempt, e);
                return Err(phase("compensate", span, work, |e| e.to_string()).await);
            }
        };
        if let Some(order) = inserted {
            self.confirm_reservation(req.item, r.txn_id);
            return Ok(Bought {
                order,
                replayed: r.existing,
            });
        }
        // The order existed already: an earlier attempt of this purchase made it.
        let order = self
            .find_order_durable(req.user, r.txn_id)
            .await?
            .ok_or(OrderError::OrderNotFound(r.txn_id))?;
        if order.status.is_dead() {
            if !r.existing {
                // This attempt made a reservation live for a purchase that had already ended
                // (cancelled, expired, or tombstoned by the reconciler): give it back.
                let group = self.router.item_group(req.item);
                if let Err(e) = self
                    .release_on(group, &[r.txn_id], &[Some(r.attempt)])
                    .await
                {
                    tracing::warn!(txn_id = %r.txn_id, error = %e, "stock not returned yet; the reconciler will");
                }
            }
            return Err(OrderError::DeadOrder(Box::new(order)));
        }
        self.confirm_reservation(req.item, r.txn_id);
        Ok(Bought {
            order,
            replayed: true,
        })
    }

    /// Transaction 2 with retries. The insert is idempotent (an existing id is skipped), so it is
    /// retried while the request's deadline allows: a full pool or a moment of failover must not
    /// cost a buyer the unit transaction 1 already reserved. The error returned is "surely not
    /// committed" only if no attempt had an unknown outcome.
    pub(super) async fn insert_order_retrying(
        &self,
        req: &BuyRequest,
        new: NewOrder,
    ) -> Result<Option<Order>, OrderError> {
        const ATTEMPTS: u32 = 4;
        let started = std::time::Instant::now();
        let mut unknown_outcome = None;
        let mut attempt = 0;
        loop {
            // Routed afresh each time: the user may have moved to another group meanwhile.
            let user_group = self.router.user_group(req.user);
            let outcome = match &self.coalescer {
                Some(c) => c.insert(user_group, new.clone()).await,
                None => self
                    .insert_orders_on(user_group, std::slice::from_ref(&new))
                    .await
                    .and_then(|inserted| match inserted.moving.first() {
                        Some(_) => Err(OrderError::from(DbError::Moving(format!(
                            "user {}",
                            req.user.key()
                        )))),
                        None => Ok(inserted.orders.into_iter().next()),
                    }),
            };
            let e = match outcome {
                Ok(order) => return Ok(order),
                Err(e) => e,
            };
            if matches!(e, OrderError::Group(GroupError::Db(DbError::Moving(_))))
                && started.elapsed() < FENCE_WAIT
            {
                // Not inserted: the user is being moved. The move switches it shortly.
                self.await_reroute().await;
                continue;
            }
            attempt += 1;
            let permanent = matches!(
                e,
                OrderError::Group(GroupError::Db(DbError::Rejected { .. }))
            );
            if let OrderError::Group(g) = &e {
                if !g.surely_not_committed() {
                    unknown_outcome = Some(g.to_string());
                }
            }
            if permanent || attempt >= ATTEMPTS || started.elapsed() >= self.timeout {
                return Err(match unknown_outcome {
                    Some(m) => DbError::Lost(m).into(),
                    None => e,
                });
            }
            tracing::debug!(attempt, error = %e, "order insert failed; retrying");
            tokio::time::sleep(Duration::from_millis(25 << attempt)).await;
        }
    }

    /// Insert orders on one user group; the error says whether they surely did not commit.
    pub(super) async fn insert_orders_on(
        &self,
        user_group: usize,
        orders: &[NewOrder],
    ) -> Result<store::Inserted, OrderError> {
        Ok(self
            .cluster
            .group(user_group)
            .run(Work::Settle, self.timeout, async |c| {
                store::insert_orders(c, orders, self.router.kind(KeyKind::Users).slot_count()).await
            })
            .await?)
    }

    /// Transaction 2 failed: release the reservations if the orders surely do not exist, and
    /// return the error the client should see (503, retry later).
    pub(super) async fn compensate(
        &self,
        item: ItemId,
        txn_id: Uuid,
        attempt: i32,
        cause: OrderError,
    ) -> OrderError {
        let surely_not_committed = match &cause {
            // No connection to the user's group was ever made, or the database refused the work:
            // surely not committed; the connection lost mid-commit: unknown.
            OrderError::Group(e) => e.surely_not_committed(),
            // Only raised for batch failures known not to have committed.
            OrderError::Unavailable(_) => true,
            _ => false,
        };
        if !surely_not_committed {
            tracing::warn!(error = %cause, %txn_id,
                "order insert outcome unknown; leaving the reservation to the reconciler");
            return OrderError::Unavailable(format!(
                "order outcome unknown, retry with the same request_id: {cause}"
            ));
        }
        tracing::warn!(error = %cause, %txn_id, "order insert failed; returning the stock");
        // Only while the reservation still carries this attempt: a retry that resumed it meanwhile
        // owns it now, and its order may commit.
        let release = self
            .release_on(self.router.item_group(item), &[txn_id], &[Some(attempt)])
            .await;
        if let Err(e) = release {
            tracing::error!(error = %e, "compensation failed; the reconciler will release");
        }
        OrderError::Unavailable(format!("the user's shard group is unavailable: {cause}"))
    }

    /// Mark a reservation `ordered` after its order committed, off the request path: with the
    /// item group's next transaction 1 when buyers are queued for it, else in a batch of its own
    /// (one UPDATE for many orders). The state is informational until the reconciler needs it,
    /// and the reconciler repairs what this misses.
    /// The orders of a fair start's winners ([`crate::fair`]): their stock is taken and their
    /// reservations written by the draw, so nothing here may give it back. Inserted on each user's
    /// group (idempotent: an order that exists already counts), and their reservations marked
    /// ordered. The ids now placed; the others (a group unreachable, a user being moved) are tried
    /// again by the draw's next round.
    pub(crate) async fn place_drawn(&self, orders: &[NewOrder]) -> Result<Vec<Uuid>, OrderError> {
        let mut by_group: HashMap<usize, Vec<NewOrder>> = HashMap::new();
        for o in orders {
            by_group
                .entry(self.router.user_group(o.user))
                .or_default()
                .push(o.clone());
        }
        let mut placed = Vec::new();
        for (g, group_orders) in by_group {
            match self.insert_orders_on(g, &group_orders).await {
                Ok(inserted) => {
                    for o in group_orders
                        .iter()
                        .filter(|o| !inserted.moving.contains(&o.order_id))
                    {
                        self.confirm_reservation(o.item, o.order_id);
                        placed.push(o.order_id);
                    }
                }
                Err(e) => {
                    tracing::warn!(group = g, error = %e, "winners' orders not made yet; the draw retries")
                }
            }
        }
        Ok(placed)
    }

    pub(super) fn confirm_reservation(&self, item: ItemId, txn_id: Uuid) {
        let group = self.router.item_group(item);
        // Under a storm the group's next transaction 1 carries it: no commit of its own.
        if let Some(c) = &self.coalescer {
            if c.confirm_later(group, txn_id) {
                return;
            }
        }
        let confirmer = self.confirmer.clone();
        self.tasks.spawn(async move {
            // Ignored on failure by design (see above).
            let _ = confirmer.submit(group, txn_id).await;
        });
    }
}

/// Run a phase of the order path in its span (a debug span declaring an empty `outcome`): its
/// duration goes to the phase histogram, its outcome to the span and to a debug line that carries the
/// request's id through the span's parent.
pub(super) async fn phase<T>(
    name: &'static str,
    span: tracing::Span,
    work: impl std::future::Future<Output = T>,
    outcome: impl FnOnce(&T) -> String,
) -> T {
    let started = std::time::Instant::now();
    let out = work.instrument(span.clone()).await;
    let elapsed = started.elapsed();
    metrics::histogram!(crate::telemetry::PHASE, "phase" => name).record(elapsed.as_secs_f64());
    // The spans are at debug: at the default level nobody reads the outcome, so it is not
    // formatted (a refusal's words per sold-out buyer were a measurable share of an order).
    if span.is_disabled() {
        return out;
    }
    let outcome = outcome(&out);
    span.record("outcome", outcome.as_str());
    span.in_scope(|| {
        tracing::debug!(phase = name, elapsed_ms = elapsed.as_millis() as u64, %outcome, "phase done")
    });
    out
}

/// A short word for a span's `outcome` field.
pub(super) fn outcome_of<T, E: std::fmt::Display>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

/// The batcher behind [`OrderService::confirm_reservation`].
pub(super) fn confirm_batcher(
    cluster: Arc<Cluster>,
    timeout: Duration,
    max_batch: usize,
    tasks: TaskTracker,
) -> Arc<Batcher<usize, Uuid, ()>> {
    Batcher::new(
        max_batch,
        Duration::ZERO,
        tasks,
        move |group: usize, txn_ids: Vec<Uuid>| {
            let cluster = cluster.clone();
            Box::pin(async move {
                let n = txn_ids.len();
                let work = cluster
                    .group(group)
                    .run(Work::Settle, timeout, async |c| {
                        reservations::advance_reservations(
                            c,
                            &txn_ids,
                            reservations::ReservationState::Ordered,
                        )
                        .await
                    })
                    .await;
                if let Err(e) = work {
                    tracing::debug!(error = %e, "could not mark reservations ordered; reconciler will");
                }
                vec![(); n]
            })
        },
    )
}

//! After the purchase: reading orders back, payments, cancels, expiry, and the release outbox that
//! returns the stock of dead orders to the items' groups ([module docs](super)).

use super::*;
impl OrderService {
    pub(crate) async fn find_order(
        &self,
        user: UserId,
        order_id: Uuid,
    ) -> Result<Option<Order>, OrderError> {
        Ok(self
            .on_user(user, Work::Read, async |c| {
                store::get_order(c, user, order_id).await
            })
            .await?)
    }

    /// The order, once the shadow holds it too (for replays).
    pub(crate) async fn find_order_durable(
        &self,
        user: UserId,
        order_id: Uuid,
    ) -> Result<Option<Order>, OrderError> {
        Ok(self
            .on_user(user, Work::Settle, async |c| {
                store::get_order_durable(c, user, order_id).await
            })
            .await?)
    }

    pub(crate) async fn get_order(
        &self,
        user: UserId,
        order_id: Uuid,
    ) -> Result<Order, OrderError> {
        self.find_order(user, order_id)
            .await?
            .ok_or(OrderError::OrderNotFound(order_id))
    }

    pub(crate) async fn list_orders(
        &self,
        user: UserId,
        limit: i64,
    ) -> Result<Vec<Order>, OrderError> {
        Ok(self
            .on_user(user, Work::Read, async |c| {
                store::list_orders(c, user, limit).await
            })
            .await?)
    }

    /// Run a status transition on the order's own (user) group.
    pub(super) async fn transition(
        &self,
        user: UserId,
        order_id: Uuid,
        transition: store::Transition,
    ) -> Result<Option<Order>, OrderError> {
        let slot = self.user_slot(user);
        Ok(self
            .on_user_group(user, |g| {
                self.cluster
                    .group(g)
                    .run(Work::Settle, self.timeout, async move |c| {
                        store::transition_order(c, user, slot, order_id, transition).await
                    })
            })
            .await?)
    }

    /// A payment callback ([`payments`]): applied to its order, or refused, and recorded either
    /// way; the same `payment_ref` again gives the recorded answer. The reservation follows a
    /// paid order, and an order this callback found past its window is expired (stock back).
    pub(crate) async fn settle_payment(
        &self,
        notice: payments::Notice,
    ) -> Result<payments::Settled, OrderError> {
        let mut settled = None;
        let slot = self.user_slot(notice.user);
        for _ in 0..3 {
            let notice = &notice;
            settled = self
                .on_user_group(notice.user, |g| {
                    self.cluster
                        .group(g)
                        .run(Work::Settle, self.timeout, async move |c| {
                            payments::settle(c, notice, slot).await
                        })
                })
                .await?;
            if settled.is_some() {
                break;
            }
        }
        let settled = settled.ok_or_else(|| {
            OrderError::Unavailable("the payment is being recorded concurrently; retry".into())
        })?;
        let Some(order) = settled.order.as_ref() else {
            return Ok(settled);
        };
        let item = ItemId::from_db(order.item_id as i64);
        if settled.expired_now {
            let user_group = self.router.user_group(notice.user);
            self.return_stock(user_group, vec![(order.order_id, item.db())])
                .await;
        } else if settled.payment.state == payments::PaymentState::Applied {
            let order_id = order.order_id;
            let follow = self
                .on_item(item, Work::Settle, async |c| {
                    reservations::advance_reservations(
                        c,
                        &[order_id],
                        reservations::ReservationState::Paid,
                    )
                    .await
                })
                .await;
            if let Err(e) = follow {
                tracing::warn!(%order_id, error = %e, "reservation not marked paid yet; the reconciler will");
            }
        }
        Ok(settled)
    }

    /// Recorded payments over all groups, newest first (admin API).
    pub(crate) async fn list_payments(
        &self,
        sale: Option<SaleId>,
        state: Option<payments::PaymentState>,
        limit: i64,
    ) -> Result<Vec<payments::Payment>, OrderError> {
        let mut all = Vec::new();
        for (idx, g) in self.cluster.groups.iter().enumerate() {
            let sale = sale.map(SaleId::db);
            let found = g
                .run(Work::Read, self.timeout, async |c| {
                    payments::list(c, sale, state, limit).await
                })
                .await?;
            // A moved user's inactive copy (left until the move is completed) is not counted.
            all.extend(
                found
                    .into_iter()
                    .filter(|p| self.router.route(crate::router::KeyKind::Users, p.user_id) == idx),
            );
        }
        all.sort_by_key(|p| std::cmp::Reverse(p.received_at));
        all.truncate(limit.max(0) as usize);
        Ok(all)
    }

    /// Cancel an unpaid order; its stock returns to the item.
    pub async fn cancel(&self, user: UserId, order_id: Uuid) -> Result<Order, OrderError> {
        let cancelled = self
            .transition(user, order_id, store::Transition::Cancel)
            .await?;
        let order = match cancelled {
            Some(order) => order,
            None => {
                let order = self.get_order(user, order_id).await?;
                if order.status == OrderStatus::Cancelled {
                    return Ok(order);
                }
                return Err(OrderError::WrongState {
                    order_id,
                    status: order.status,
                });
            }
        };
        let group = self.router.user_group(user);
        let item = order.item_id as i64;
        self.return_stock(group, vec![(order_id, item)]).await;
        Ok(order)
    }

    /// Expire due unpaid orders on one user group (at most `batch`), then return their stock.
    /// `only` restricts it to one order. Safe with several nodes ([`store::expire_due`]).
    /// Returns how many orders expired.
    pub(crate) async fn expire_orders(
        &self,
        user_group: usize,
        only: Option<Uuid>,
        batch: i64,
    ) -> Result<usize, OrderError> {
        let expired = self
            .cluster
            .group(user_group)
            .run(Work::Settle, self.timeout, async |c| {
                store::expire_due(c, only, batch).await
            })
            .await?;
        let n = expired.len();
        if n > 0 {
            tracing::info!(group = %self.cluster.group(user_group).name, expired = n, "expired unpaid orders");
            self.return_stock(user_group, expired).await;
        }
        Ok(n)
    }

    /// Return the stock of dead orders recorded in `user_group`'s outbox, then forget the entries.
    /// What fails stays in the outbox for [`Self::drain_releases`].
    pub(super) async fn return_stock(&self, user_group: usize, dead: Vec<(Uuid, i64)>) {
        let (mut done, mut failed) = (Vec::new(), Vec::new());
        let started = std::time::Instant::now();
        let mut left = dead;
        while !left.is_empty() {
            let mut by_group: HashMap<usize, Vec<(Uuid, i64)>> = HashMap::new();
            for (order_id, item) in left.drain(..) {
                by_group
                    .entry(self.router.item_group(ItemId::from_db(item)))
                    .or_default()
                    .push((order_id, item));
            }
            for (g, batch) in by_group {
                let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
                match self.release_on(g, &ids, &[]).await {
                    Ok(()) => done.extend(ids),
                    // An item fenced by a move: again on its route as re-read, for a while.
                    Err(GroupError::Db(DbError::Moving(_))) if started.elapsed() < FENCE_WAIT => {
                        left.extend(batch)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, count = ids.len(),
                            "stock of dead orders not returned yet; the outbox drainer will");
                        failed.extend(ids);
                    }
                }
            }
            if !left.is_empty() {
                self.await_reroute().await;
            }
        }
        let group = self.cluster.group(user_group);
        if !done.is_empty() {
            let forgot = group
                .run(Work::Settle, self.timeout, async |c| {
                    store::forget_releases(c, &done).await
                })
                .await;
            if let Err(e) = forgot {
                // Harmless: releasing again is a no-op.
                tracing::debug!(error = %e, "outbox entries not forgotten yet");
            }
        }
        if !failed.is_empty() {
            let postponed = group
                .run(Work::Settle, self.timeout, async |c| {
                    store::postpone_releases(c, &failed).await
                })
                .await;
            if let Err(e) = postponed {
                tracing::debug!(error = %e, "outbox entries not postponed");
            }
        }
    }

    /// Retry the releases recorded in every group's outbox that are older than `min_age`. A
    /// group that cannot be read is skipped (and logged); the others are drained regardless.
    /// Returns how many entries were handled.
    pub(crate) async fn drain_releases(&self, min_age: Duration) -> usize {
        let mut handled = 0;
        for g in 0..self.cluster.groups.len() {
            let group = self.cluster.group(g);
            let pending = group
                .run(Work::Settle, self.timeout, async |c| {
                    store::pending_releases(c, min_age, DRAIN_BATCH).await
                })
                .await;
            match pending {
                Ok(pending) if !pending.is_empty() => {
                    tracing::info!(group = %group.name, count = pending.len(), "draining the release outbox");
                    handled += pending.len();
                    self.return_stock(g, pending).await;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(group = %group.name, error = %e, "release outbox not read")
                }
            }
        }
        handled
    }
}

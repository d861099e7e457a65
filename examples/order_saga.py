"""An order saga: order → payment → shipping, compensated in reverse when a step fails.

``orders`` runs the saga ``PlaceOrder`` (docs/sagas.md); ``payments`` and ``shipping`` are its
participants.  Each participant records the idempotency key of every call in its inbox, in
the transaction of the call's own writes, so a saga that repeats a call after a crash
charges or ships once.  Every service keeps its own SQLite file (``<service>.db`` in the
working directory) unless ``orders.database``, ``payments.database`` or
``shipping.database`` names another database (``postgresql://...`` works the same).

Try it with ``basidia shell examples/``::

    >>> await rpc.orders.place_order(1, 25.0, "1 Main Street")      # completed
    >>> await rpc.orders.place_order(2, 25.0, "")                   # shipping refuses
    >>> await rpc.payments.balance(2)                                # refunded: 0.0
"""

from __future__ import annotations

import os
from typing import Any

from basidia import Dependency, Service, rpc
from basidia.data import Outbox, Saga, Sagas, step

ORDERS_TABLE = (
    "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, amount REAL NOT NULL, "
    "status TEXT NOT NULL)"
)


def database(service: str) -> str:
    return os.environ.get(f"{service.upper()}_DATABASE_URL", "sqlite:///:memory:")


class PlaceOrder(Saga):
    """Create the order, charge it, ship it, confirm it; undo in reverse on failure."""

    name = "place_order"
    timeout = 30.0

    @step
    async def create_order(self, data: dict[str, Any], key: str) -> None:
        async with self.service.store.transaction() as tx:
            await tx.execute(ORDERS_TABLE)
            await tx.execute(
                "INSERT INTO orders (id, amount, status) VALUES ($1, $2, 'pending') "
                "ON CONFLICT DO NOTHING",
                data["order_id"],
                data["amount"],
            )

    @create_order.compensate
    async def cancel_order(self, data: dict[str, Any], key: str) -> None:
        async with self.service.store.transaction() as tx:
            await tx.execute(ORDERS_TABLE)
            changed = await tx.execute(
                "UPDATE orders SET status = 'cancelled' WHERE id = $1 AND status != 'cancelled'",
                data["order_id"],
            )
            if changed:  # the event goes out if and only if the order is cancelled
                await tx.dispatch("order.cancelled", {"order_id": data["order_id"]})

    @step
    async def charge(self, data: dict[str, Any], key: str) -> None:
        data["payment"] = await self.service.payments.charge(data["order_id"], data["amount"], key)

    @charge.compensate
    async def refund(self, data: dict[str, Any], key: str) -> None:
        await self.service.payments.refund(data["order_id"], key)

    @step
    async def ship(self, data: dict[str, Any], key: str) -> None:
        data["tracking"] = await self.service.shipping.ship(data["order_id"], data["address"], key)

    @step
    async def confirm(self, data: dict[str, Any], key: str) -> None:
        async with self.service.store.transaction() as tx:
            changed = await tx.execute(
                "UPDATE orders SET status = 'confirmed' WHERE id = $1 AND status = 'pending'",
                data["order_id"],
            )
            if changed:
                await tx.dispatch("order.confirmed", {"order_id": data["order_id"]})


class OrderService(Service):
    name = "orders"
    payments = Dependency("payments")
    shipping = Dependency("shipping")
    store = Outbox(database("orders"))
    sagas = Sagas(PlaceOrder, url=database("orders"))

    @rpc
    async def place_order(self, order_id: int, amount: float, address: str) -> dict:
        """Run the saga to its end; the same order id twice runs it once."""
        saga = await self.sagas.run(
            PlaceOrder,
            {"order_id": order_id, "amount": amount, "address": address},
            saga_id=f"order-{order_id}",
            timeout=60,
        )
        return {"status": saga["status"], "error": saga["error"], "data": saga["data"]}

    @rpc
    async def order_status(self, order_id: int) -> str | None:
        async with self.store.transaction() as tx:
            await tx.execute(ORDERS_TABLE)
            return await tx.fetchval("SELECT status FROM orders WHERE id = $1", order_id)


PAYMENTS_TABLE = "CREATE TABLE IF NOT EXISTS payments (order_id INTEGER, amount REAL NOT NULL)"


class PaymentService(Service):
    name = "payments"
    store = Outbox(database("payments"))

    @rpc
    async def charge(self, order_id: int, amount: float, key: str) -> str:
        async with self.store.inbox(key) as tx:
            if not tx.duplicate:  # a repeated call charges nothing more
                await tx.execute(PAYMENTS_TABLE)
                await tx.execute(
                    "INSERT INTO payments (order_id, amount) VALUES ($1, $2)", order_id, amount
                )
        return f"payment-{order_id}"

    @rpc
    async def refund(self, order_id: int, key: str) -> None:
        async with self.store.inbox(key) as tx:
            if not tx.duplicate:  # a refund of nothing charged is a no-op
                await tx.execute(PAYMENTS_TABLE)
                await tx.execute(
                    "INSERT INTO payments (order_id, amount) SELECT order_id, -sum(amount) "
                    "FROM payments WHERE order_id = $1 GROUP BY order_id",
                    order_id,
                )

    @rpc
    async def balance(self, order_id: int) -> float:
        async with self.store.transaction() as tx:
            await tx.execute(PAYMENTS_TABLE)
            total = await tx.fetchval(
                "SELECT sum(amount) FROM payments WHERE order_id = $1", order_id
            )
        return float(total or 0.0)


class ShippingService(Service):
    name = "shipping"
    store = Outbox(database("shipping"))

    @rpc
    async def ship(self, order_id: int, address: str, key: str) -> str:
        if not address.strip():
            raise ValueError(f"order {order_id} has no address to ship to")
        async with self.store.inbox(key) as tx:
            if not tx.duplicate:
                await tx.execute(
                    "CREATE TABLE IF NOT EXISTS shipments (order_id INTEGER, address TEXT)"
                )
                await tx.execute(
                    "INSERT INTO shipments (order_id, address) VALUES ($1, $2)", order_id, address
                )
        return f"track-{order_id}"

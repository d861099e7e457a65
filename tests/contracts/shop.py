"""Typed services for the contract documents: Structs in, Structs out, a versioned event
and HTTP endpoints with a typed body and result."""

from __future__ import annotations

import enum

import msgspec
from starlette.requests import Request

from basidia import EventDispatcher, Service, event_handler, http_endpoint, rpc


class Size(enum.Enum):
    SMALL = "small"
    LARGE = "large"


class Item(msgspec.Struct):
    sku: str
    quantity: int = 1
    size: Size = Size.SMALL


class Order(msgspec.Struct):
    """An order as the shop keeps it."""

    id: int
    items: list[Item]
    note: str | None = None


class OrderPlacedV1(msgspec.Struct):
    order_id: int


class OrderPlaced(msgspec.Struct):
    order_id: int
    total_cents: int


def placed_v1_to_v2(old: OrderPlacedV1) -> OrderPlaced:
    return OrderPlaced(old.order_id, total_cents=0)


class Shop(Service):
    """Takes orders."""

    name = "shop"
    dispatch = EventDispatcher()

    @rpc
    async def place(self, items: list[Item], note: str | None = None) -> Order:
        """Place an order.

        Announces it with ``order.placed`` version 2.
        """
        order = Order(id=len(items), items=items, note=note)
        await self.dispatch("order.placed", OrderPlaced(order.id, 100), version=2)
        return order

    @rpc
    async def ping(self) -> None:
        return None

    @http_endpoint("POST", "/orders")
    async def create(self, request: Request, items: list[Item]) -> Order:
        """Place an order over HTTP."""
        return Order(id=7, items=items)

    @http_endpoint("GET", "/orders/{order_id:int}")
    async def show(self, request: Request) -> Order:
        return Order(id=request.path_params["order_id"], items=[])


class Billing(Service):
    name = "billing"
    seen: list[OrderPlaced] = []  # noqa: RUF012 - what the tests look at

    @event_handler("order.placed", versions=(1, 2), upcasters={1: placed_v1_to_v2})
    async def on_order_placed(self, placed: OrderPlaced) -> None:
        """Bill the order."""
        self.seen.append(placed)

    @event_handler("stock.flushed", broadcast=True)
    async def on_flush(self, data: None) -> None: ...

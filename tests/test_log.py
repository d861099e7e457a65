"""Structured logging: every line written while handling a call names that call."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from basidia import Service, ServiceRunner, connect, current_context, rpc
from basidia.log import CallContextFilter, JsonFormatter, configure_logging

logger = logging.getLogger("tests.log.orders")


class OrderService(Service):
    name = "order_service"

    @rpc
    async def place(self, item: str) -> str:
        """Log twice around a pause and return the call id the lines should carry."""
        ctx = current_context()
        assert ctx is not None
        logger.info("placing %s", item)
        await asyncio.sleep(0.01)  # lets a concurrent call log in between
        logger.info("placed %s", item)
        return ctx.call_id

    @rpc
    async def fail(self) -> None:
        try:
            raise ValueError("out of stock\nsecond line")
        except ValueError:
            logger.exception("could not place order")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """configure_logging rewires the root logger; put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


async def _place(memory_url: str, *items: str) -> list[str]:
    async with ServiceRunner([OrderService], broker=memory_url), connect(memory_url) as cluster:
        return list(await asyncio.gather(*(cluster.rpc.order_service.place(i) for i in items)))


def _lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


async def test_text_lines_inside_a_call_carry_its_call_id(
    memory_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "text")
    [call_id] = await _place(memory_url, "tea")
    err = capsys.readouterr().err
    lines = _lines_with(err, "tea")
    assert len(lines) == 2, err
    for line in lines:
        assert f"[{call_id}]" in line
        assert "INFO" in line
        assert "tests.log.orders" in line
    assert call_id.startswith("order_service.place.")


async def test_text_lines_outside_a_call_show_a_dash(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text")
    logger.info("starting up")
    [line] = _lines_with(capsys.readouterr().err, "starting up")
    assert "[-] starting up" in line


async def test_concurrent_calls_each_log_their_own_call_id(
    memory_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "text")
    items = [f"item{n}" for n in range(5)]
    call_ids = await _place(memory_url, *items)
    assert len(set(call_ids)) == len(items)
    err = capsys.readouterr().err
    for item, call_id in zip(items, call_ids, strict=True):
        lines = _lines_with(err, f" {item}")
        assert len(lines) == 2, err
        assert all(f"[{call_id}]" in line for line in lines)


async def test_json_format_is_one_object_per_line_with_the_call_fields(
    memory_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    logger.info("before any call")
    [call_id] = await _place(memory_url, "coffee")
    err = capsys.readouterr().err
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert records, "nothing was logged"
    for record in records:
        assert set(record) >= {
            "ts",
            "level",
            "logger",
            "message",
            "call_id",
            "service",
            "entrypoint",
        }
        assert record["ts"].endswith("Z")

    inside = [r for r in records if "coffee" in r["message"]]
    assert [r["message"] for r in inside] == ["placing coffee", "placed coffee"]
    for record in inside:
        assert record["call_id"] == call_id
        assert record["service"] == "order_service"
        assert record["entrypoint"] == "place"
        assert record["level"] == "INFO"
        assert record["logger"] == "tests.log.orders"

    [outside] = [r for r in records if r["message"] == "before any call"]
    assert (outside["call_id"], outside["service"], outside["entrypoint"]) == ("-", "-", "-")


async def test_json_exceptions_stay_on_one_line(
    memory_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    async with ServiceRunner([OrderService], broker=memory_url), connect(memory_url) as cluster:
        await cluster.rpc.order_service.fail()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line parses on its own
    [failure] = [r for r in records if r["message"] == "could not place order"]
    assert failure["level"] == "ERROR"
    assert "ValueError: out of stock\nsecond line" in failure["exception"]
    assert failure["entrypoint"] == "fail"


def test_level_hides_lower_records(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", "text")
    logger.info("chatty")
    logger.warning("important")
    err = capsys.readouterr().err
    assert "chatty" not in err
    assert "important" in err


def test_configure_logging_replaces_earlier_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text")
    configure_logging("INFO", "json")
    logger.info("once")
    lines = _lines_with(capsys.readouterr().err, "once")
    assert len(lines) == 1
    assert json.loads(lines[0])["message"] == "once"


async def test_call_context_filter_on_an_embedding_apps_handler(memory_url: str) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(CallContextFilter())
    handler.setFormatter(logging.Formatter("%(call_id)s|%(service)s|%(entrypoint)s|%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("outside")
        [call_id] = await _place(memory_url, "cake")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert "-|-|-|outside" in lines
    assert f"{call_id}|order_service|place|placing cake" in lines


def test_json_formatter_without_the_filter_still_writes_the_fields() -> None:
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "hi %s", ("there",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "hi there"
    assert entry["call_id"] == entry["service"] == entry["entrypoint"] == "-"

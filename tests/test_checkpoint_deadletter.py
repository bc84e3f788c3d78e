"""The shared resume-point stores and dead-letter destinations of the polling sources, against
real servers: a local file, a JetStream key-value bucket, a PostgreSQL table; dead letters to a
file, a JetStream stream and a Kafka topic."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import nats
import pytest
from aiokafka import AIOKafkaConsumer
from pydantic import TypeAdapter, ValidationError

from fastconn.checkpoint import (
    CheckpointConfig,
    FileCheckpoint,
    FileCheckpointConfig,
    JetStreamCheckpointConfig,
    PostgresCheckpointConfig,
    checkpoint_store,
)
from fastconn.dead_letter_sink import DeadLetterConfig, DeadLetterError, dead_letter_sink
from fastconn.errors import SourceError
from fastconn.testing_pg import Cluster
from kafka_fixtures import Broker, kafka_broker  # noqa: F401
from nats_fixtures import NatsServer, nats_server, unique  # noqa: F401
from postgres_fixtures import pg_cluster  # noqa: F401


def _checkpoint(table: dict[str, object]) -> CheckpointConfig:
    return TypeAdapter(CheckpointConfig).validate_python(table)


def _dead_letters(table: dict[str, object]) -> DeadLetterConfig:
    return TypeAdapter(DeadLetterConfig).validate_python(table)


CONTEXT = [("fastconn-dlt-reason", "failed"), ("fastconn-dlt-original-event", "42")]


async def _round_trip(config: CheckpointConfig | None, key: str) -> None:
    store = checkpoint_store(config, key)
    await store.open()
    try:
        assert await store.load() is None
        await store.save("1001")
        await store.save("1002")
        assert await store.load() == "1002"
    finally:
        await store.close()
    again = checkpoint_store(config, key)  # a restarted daemon sees the last value
    await again.open()
    try:
        assert await again.load() == "1002"
    finally:
        await again.close()


async def test_file_checkpoint_survives_a_restart_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "state" / "vc.checkpoint"
    await _round_trip(_checkpoint({"type": "file", "path": str(path)}), "vc")
    assert sorted(p.name for p in path.parent.iterdir()) == ["vc.checkpoint"]


async def test_file_checkpoint_defaults_to_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTCONN_STATE_DIR", str(tmp_path))
    store = checkpoint_store(None, "my source/1")
    assert isinstance(store, FileCheckpoint)
    assert store.path == tmp_path / "my_source_1.checkpoint"
    await _round_trip(None, "my source/1")


async def test_an_unwritable_checkpoint_folder_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        folder = Path("/proc/fastconn-no-such-folder")  # root may write anywhere else
    else:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o500)
    store = checkpoint_store(_checkpoint({"path": str(folder / "x")}), "x")
    with pytest.raises(SourceError, match=r"checkpoint\.path"):
        await store.open()


async def test_jetstream_checkpoint(nats_server: NatsServer) -> None:
    bucket = unique("ckpt")
    await _round_trip(
        JetStreamCheckpointConfig(type="jetstream_kv", servers=(nats_server.url,), bucket=bucket), "vc"
    )
    missing = checkpoint_store(
        JetStreamCheckpointConfig(
            type="jetstream_kv", servers=(nats_server.url,), bucket=unique("none"), create_bucket=False
        ),
        "vc",
    )
    with pytest.raises(SourceError, match="create_bucket"):
        await missing.open()


async def test_postgres_checkpoint_reconnects_after_a_server_side_disconnect(pg_cluster: Cluster) -> None:
    table = f"ckpt_{os.getpid()}"
    config = PostgresCheckpointConfig(type="postgres", dsn=pg_cluster.dsn, table=table)
    await _round_trip(config, "vc")
    store = checkpoint_store(config, "vc")
    await store.open()
    try:
        await pg_cluster.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
            "AND query LIKE '%" + table + "%'"
        )
        conn = await pg_cluster.connect()
        await conn.close()
        # The terminated connection is noticed at its next use; the one after reconnects.
        for _ in range(2):
            try:
                await store.save("2000")
                break
            except Exception:
                continue
        assert await store.load() == "2000"
    finally:
        await store.close()


def test_checkpoint_config_errors_name_the_key() -> None:
    adapter = TypeAdapter(CheckpointConfig)
    with pytest.raises(ValidationError, match="table"):
        adapter.validate_python({"type": "postgres", "table": "x; drop table y"})
    with pytest.raises(ValidationError, match="bucket"):
        adapter.validate_python({"type": "jetstream_kv", "bucket": "a.b"})
    with pytest.raises(ValidationError, match="one of: file"):
        adapter.validate_python({"type": "redis"})
    assert isinstance(adapter.validate_python({}), FileCheckpointConfig)


async def test_file_dead_letters_keep_binary_payloads_and_context(tmp_path: Path) -> None:
    path = tmp_path / "dlq" / "letters.jsonl"
    sink = dead_letter_sink(_dead_letters({"type": "file", "path": str(path)}), "s")
    await sink.open()
    await sink.publish(b'{"a": 1}', CONTEXT)
    await sink.publish(b"\xff\x00", CONTEXT)
    await sink.close()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first == {"headers": [list(h) for h in CONTEXT], "payload": '{"a": 1}'}
    assert base64.b64decode(second["payload_base64"]) == b"\xff\x00"


async def test_jetstream_dead_letters_are_stored_with_their_context(nats_server: NatsServer) -> None:
    subject = unique("dlq.")
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=unique("DLQ"), subjects=[subject])
        config = _dead_letters({"type": "jetstream", "servers": [nats_server.url], "subject": subject})
        sink = dead_letter_sink(config, "s")
        await sink.open()
        await sink.publish(b"payload", CONTEXT)
        with pytest.raises(DeadLetterError):  # no stream captures it: not stored, so not "sent"
            await _publish_to_uncaptured(nats_server)
        await sink.close()
        sub = await js.subscribe(subject)
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"payload"
        assert msg.headers is not None and msg.headers["fastconn-dlt-original-event"] == "42"
    finally:
        await nc.close()


async def _publish_to_uncaptured(server: NatsServer) -> None:
    config = _dead_letters({"type": "jetstream", "servers": [server.url], "subject": unique("nowhere.")})
    sink = dead_letter_sink(config, "s")
    await sink.open()
    try:
        await sink.publish(b"x", CONTEXT)
    finally:
        await sink.close()


async def test_kafka_dead_letters_are_stored_with_their_context(kafka_broker: Broker) -> None:
    topic = unique("dlq-")
    config = _dead_letters({"type": "kafka", "bootstrap_servers": kafka_broker.bootstrap, "topic": topic})
    sink = dead_letter_sink(config, "s")
    await sink.open()
    await sink.publish(b"payload", CONTEXT)
    await sink.close()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert record.value == b"payload"
    assert dict(record.headers)["fastconn-dlt-reason"] == b"failed"

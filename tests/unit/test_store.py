"""The store on a real SQLite file: migrations, tokens (hash only), tenant scoping,
event paging, retention and counters. (PostgreSQL is covered by the two-daemon test.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

import sqlalchemy as sa

from vmshield.store import Principal, Store
from vmshield.store.db import database_url
from vmshield.store.schema import metadata


def _store(tmp_path: Path) -> Store:
    return Store.open(database_url(None, tmp_path))


def test_migrations_create_the_schema_the_code_uses(tmp_path: Path) -> None:
    st = _store(tmp_path)
    insp = sa.inspect(st.engine)
    for table in metadata.sorted_tables:
        have = {c["name"] for c in insp.get_columns(table.name)}
        assert have == {c.name for c in table.columns}, table.name
    st.close()
    st = _store(tmp_path)  # opening again migrates nothing and keeps data
    assert "alembic_version" in sa.inspect(st.engine).get_table_names()
    st.close()


def test_tokens_are_stored_as_hashes(tmp_path: Path) -> None:
    st = _store(tmp_path)
    tok = st.create_token("acme", admin=False)
    with st.raw() as c:
        rows = c.execute(sa.text("SELECT hash FROM tokens")).all()
    assert rows == [(hashlib.sha256(tok.encode()).hexdigest(),)]
    assert st.principal(tok) == Principal("acme", False)
    assert st.principal(tok + "x") is None


def test_events_are_scoped_paged_and_pruned(tmp_path: Path) -> None:
    st = _store(tmp_path)
    st.create_token("a")
    st.create_token("b")
    st.add_vm("vm-a", "a1", "lab-a", "h1", "a")
    st.add_vm("vm-b", "b1", "lab-b", "h1", "b")
    for i in range(10):
        st.add_event("vm-a", "a", "r", "file.open", 100.0 + i, f'{{"n": {i}}}')
        st.add_event("vm-b", "b", "r", "net.connect", 100.0 + i, f'{{"n": {i}}}')
    a = Principal("a", False)
    page1 = st.events(a, limit=4)
    assert [e.vm for e in page1] == ["vm-a"] * 4
    page2 = st.events(a, after=page1[-1].id, limit=100)
    assert len(page2) == 6 and page2[0].id > page1[-1].id
    assert st.events(a, obj="net.connect") == []
    assert len(st.events(Principal("x", True), limit=100)) == 20
    assert len(st.events(a, since=105.0)) == 5
    assert [v["id"] for v in st.vms(a)] == ["vm-a"]
    assert st.prune(None, 5) == 15
    assert len(st.events(Principal("x", True))) == 5
    st.count("vm-a", "drops.ring", 3)
    st.count("vm-a", "drops.ring", 2)
    assert st.counters() == [("vm-a", "drops.ring", 5)]


def test_batches_are_stored_in_one_transaction(tmp_path: Path) -> None:
    st = _store(tmp_path)
    st.create_token("a")
    rows = [("vm-a", "a", "r", "file.open", 1.0 + i, "{}", 2.0 + i) for i in range(50)]
    stored = st.add_events(rows)
    got = st.events(Principal("a", False), limit=1000)
    assert len(got) == 50 and [e.id for e in got] == sorted(e.id for e in got)
    with st.raw() as c:
        when = c.execute(sa.text("SELECT DISTINCT stored_at FROM events")).scalars().all()
        heads = c.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    assert when == [stored]
    assert heads == ["0002"]

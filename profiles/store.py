"""The profile store: versioned LLM profiles per user in one SQLite file.

A row is one profile version: the facet texts, the facet vectors ``(4, D)`` float32, ``ts`` (the
time of the last event the profile saw), model id, prompt hash, hops (2 = graph-aware prompt,
1 = own history only), fallback flag and grounding counts. A profile is valid for events strictly
after its ``ts``: :meth:`ProfileStore.latest_before` never returns a
profile written from the event being scored or later ones.

For training, :meth:`ProfileStore.export` returns a :class:`ProfileExport` of arrays sorted by
``(user_id, ts)``; ``tgn.profile_features.ProfileTable.from_export`` turns it into the model's
vectorized, time-correct look-up (latest profile with ``ts`` strictly before the event)::

    export = ProfileStore("profiles.sqlite").export(hops=2)
    table = tgn.profile_features.ProfileTable.from_export(
        export.user_ids, export.ts, export.vectors, export.fallback, user_to_index)
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from profiles.facets import Facets

_SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    user_id TEXT NOT NULL, ts REAL NOT NULL, version INTEGER NOT NULL, created REAL NOT NULL,
    model_id TEXT NOT NULL, prompt_hash TEXT NOT NULL, hops INTEGER NOT NULL,
    fallback INTEGER NOT NULL, grounded INTEGER NOT NULL, named INTEGER NOT NULL,
    new_tokens INTEGER NOT NULL, crowd TEXT, interests TEXT, categories TEXT, brands TEXT,
    dim INTEGER NOT NULL, vectors BLOB NOT NULL,
    UNIQUE (user_id, ts, model_id, hops)
);
CREATE INDEX IF NOT EXISTS profiles_user_ts ON profiles (user_id, ts);
CREATE INDEX IF NOT EXISTS profiles_prompt ON profiles (prompt_hash, model_id);
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""
_COLUMNS = ("user_id, ts, version, created, model_id, prompt_hash, hops, fallback, grounded, "
            "named, new_tokens, crowd, interests, categories, brands, dim, vectors")


@dataclass
class Profile:
    """One profile version of one user.

    Attributes:
        user_id: The user.
        ts: Time of the last event the profile saw (valid for events after it).
        facets: The four facet texts and the fallback flag.
        vectors: Facet embeddings ``(4, D)`` float32.
        model_id: Which model wrote it.
        prompt_hash: Content hash of the prompt (the generation cache key).
        hops: 2 for a graph-aware prompt, 1 for own history only.
        grounded: Named categories/brands found in the context.
        named: Categories/brands named.
        new_tokens: Tokens generated (0 when served from the cache or a fallback).
        version: 1, 2, … per user in insertion order (set by the store).
        created: Wall-clock time of insertion (set by the store).
    """

    user_id: str
    ts: float
    facets: Facets
    vectors: np.ndarray
    model_id: str
    prompt_hash: str
    hops: int = 2
    grounded: int = 0
    named: int = 0
    new_tokens: int = 0
    version: int = 0
    created: float = field(default=0.0)

    def to_message(self) -> dict[str, object]:
        """The ``profile-updates`` message (JSON-able; vectors as nested lists)."""
        return {"user_id": self.user_id, "ts": self.ts, "version": self.version,
                "model_id": self.model_id, "prompt_hash": self.prompt_hash, "hops": self.hops,
                "fallback": self.facets.fallback, "facets": list(self.facets.texts),
                "vectors": self.vectors.round(6).tolist()}


def _from_row(row: tuple) -> Profile:
    (user_id, ts, version, created, model_id, prompt_hash, hops, fallback, grounded, named,
     new_tokens, crowd, interests, categories, brands, dim, blob) = row
    vectors = np.frombuffer(blob, np.float32).reshape(4, dim).copy()
    return Profile(user_id, ts, Facets((crowd, interests, categories, brands), bool(fallback)),
                   vectors, model_id, prompt_hash, hops, grounded, named, new_tokens, version,
                   created)


@dataclass
class ProfileExport:
    """All profiles as arrays, sorted by ``(user_id, ts)`` (the bulk export; the model's
    time-correct look-up over them is ``tgn.profile_features.ProfileTable``).

    Attributes:
        user_ids: ``(P,)`` str.
        ts: ``(P,)`` float64, last event time each profile saw.
        vectors: ``(P, 4, D)`` float32 facet embeddings.
        fallback: ``(P,)`` bool.
    """

    user_ids: np.ndarray
    ts: np.ndarray
    vectors: np.ndarray
    fallback: np.ndarray


class ProfileStore:
    """Versioned profiles on disk (SQLite; safe to reopen, resume and read while written).

    Args:
        path: The SQLite file (created with its folder if missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def put(self, profiles: list[Profile]) -> int:
        """Insert profiles (one transaction); a duplicate ``(user, ts, model, hops)`` is skipped.

        Returns:
            How many rows were new.
        """
        now, added = time.time(), 0
        with self._db:
            for p in profiles:
                (last,) = self._db.execute("SELECT COALESCE(MAX(version), 0) FROM profiles "
                                           "WHERE user_id = ?", (p.user_id,)).fetchone()
                vec = np.ascontiguousarray(p.vectors, np.float32)
                cur = self._db.execute(
                    f"INSERT OR IGNORE INTO profiles ({_COLUMNS}) VALUES "
                    f"({', '.join('?' * 17)})",
                    (p.user_id, p.ts, last + 1, now, p.model_id, p.prompt_hash, p.hops,
                     int(p.facets.fallback), p.grounded, p.named, p.new_tokens,
                     *p.facets.texts, vec.shape[1], vec.tobytes()))
                if cur.rowcount:
                    p.version, p.created, added = last + 1, now, added + 1
        return added

    def save_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        """Record that every request of ``topic`` below these offsets is done (worker resume)."""
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO offsets VALUES (?, ?, ?)",
                                 [(topic, p, o) for p, o in offsets.items()])

    def offsets(self, topic: str) -> dict[int, int]:
        """Saved next offsets per partition of ``topic`` (empty: start from the beginning)."""
        rows = self._db.execute("SELECT partition, next_offset FROM offsets WHERE topic = ?",
                                (topic,)).fetchall()
        return {int(p): int(o) for p, o in rows}

    def _one(self, where: str, args: tuple) -> Profile | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM profiles WHERE {where} "
                               "ORDER BY ts DESC, version DESC LIMIT 1", args).fetchone()
        return _from_row(row) if row else None

    def latest_before(self, user_id: str, t: float) -> Profile | None:
        """The user's newest profile written from events strictly before ``t``."""
        return self._one("user_id = ? AND ts < ?", (user_id, t))

    def latest(self, user_id: str) -> Profile | None:
        """The user's newest profile."""
        return self._one("user_id = ?", (user_id,))

    def cached(self, prompt_hash: str, model_id: str) -> Profile | None:
        """A model-written (non-fallback) profile from an identical prompt, if any."""
        return self._one("prompt_hash = ? AND model_id = ? AND fallback = 0",
                         (prompt_hash, model_id))

    def has(self, user_id: str, ts: float, model_id: str, hops: int) -> bool:
        """Whether this exact profile exists (for resuming a batch build)."""
        return self._db.execute("SELECT 1 FROM profiles WHERE user_id = ? AND ts = ? AND "
                                "model_id = ? AND hops = ?",
                                (user_id, ts, model_id, hops)).fetchone() is not None

    def written_since(self, ts: float) -> list[Profile]:
        """Profiles written from events at or after ``ts``, in insertion order."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM profiles WHERE ts >= ? "
                                "ORDER BY rowid", (ts,)).fetchall()
        return [_from_row(r) for r in rows]

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM profiles").fetchone()[0])

    def export(self, hops: int | None = None, model_id: str | None = None) -> ProfileExport:
        """All profiles (optionally one ``hops``/``model_id``) as a :class:`ProfileExport`."""
        where = " AND ".join(c for c, v in (("hops = ?", hops), ("model_id = ?", model_id))
                             if v is not None) or "1"
        args = tuple(v for v in (hops, model_id) if v is not None)
        rows = self._db.execute(f"SELECT user_id, ts, fallback, dim, vectors FROM profiles "
                                f"WHERE {where} ORDER BY user_id, ts, version", args).fetchall()
        dim = rows[0][3] if rows else 384
        vectors = np.stack([np.frombuffer(r[4], np.float32).reshape(4, r[3]) for r in rows]) \
            if rows else np.zeros((0, 4, dim), np.float32)
        return ProfileExport(np.array([r[0] for r in rows], dtype=str),
                            np.array([r[1] for r in rows], np.float64), vectors,
                            np.array([bool(r[2]) for r in rows], bool))

"""The keyed pseudonym of a user id (``pipeline.core.privacy``): a known answer, stability,
distinct ids stay distinct, integers and their canonical text are one user, an id already in a
pseudonym's form is never hashed twice, and the key comes from the environment or a file."""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import Settings, load_pseudonym_key
from pipeline.core.errors import ConfigError
from pipeline.core.privacy import (
    PSEUDONYM_LENGTH,
    Pseudonymiser,
    is_pseudonym,
    pseudonym,
    pseudonym_mask,
    stored_user_id,
)

KEY = b"test-key-0123456789abcdef"


def test_known_answer_with_a_fixed_key():
    # ps_ + the first 32 hex digits of HMAC-SHA256(key, UTF-8 id)
    assert pseudonym("alice@example.com", KEY) == "ps_c27873e513dd9cae197f17c8143e1d14"
    assert pseudonym("196", KEY) == "ps_9763fac720c531b36ff650d434c45b7e"
    expected = hmac.new(KEY, "zoë".encode(), hashlib.sha256).hexdigest()[:32]
    assert pseudonym("zoë", KEY) == f"ps_{expected}"
    assert len(pseudonym("x", KEY)) == PSEUDONYM_LENGTH


def test_stable_keyed_and_distinct():
    ids = [f"user-{n}" for n in range(5000)] + ["", " a", "a ", "A", "a"]
    first = [pseudonym(i, KEY) for i in ids]
    assert first == [pseudonym(i, KEY) for i in ids]  # stable
    assert len(set(first)) == len(ids)  # distinct ids stay distinct
    assert pseudonym("a", KEY) != pseudonym("a", KEY + b"!")  # the key matters
    assert all(is_pseudonym(p) for p in first)


def test_integers_and_their_canonical_text_map_the_same():
    assert (
        pseudonym(196, KEY)
        == pseudonym("196", KEY)
        == pseudonym(196.0, KEY)
        == pseudonym(np.int64(196), KEY)
    )
    assert stored_user_id(196) == "196"  # without a key: the canonical id itself
    with pytest.raises(TypeError):
        pseudonym(True, KEY)


def test_a_pseudonym_is_not_hashed_twice():
    once = pseudonym("u1", KEY)
    assert pseudonym(once, KEY) == once
    assert stored_user_id(once, KEY) == once
    assert not is_pseudonym(once.upper()) and not is_pseudonym(once[:-1])
    assert pseudonym_mask(pd.Series([once, "u1", None, 7], dtype=object)).tolist() == [
        True,
        False,
        False,
        False,
    ]


def test_stored_user_id_is_the_identity_without_a_key():
    assert stored_user_id("u1") == "u1"
    assert stored_user_id("u1", KEY) == pseudonym("u1", KEY)


def test_pseudonymiser_hashes_a_column_and_returns_the_new_pairs():
    values = pd.Series(["a", "b", "a", None, pseudonym("c", KEY)], dtype="string")
    out, pairs = Pseudonymiser(KEY)(values)
    assert out.dtype == values.dtype and out.index.equals(values.index)
    assert out.tolist()[:3] == [pseudonym("a", KEY), pseudonym("b", KEY), pseudonym("a", KEY)]
    assert out.isna().tolist() == [False, False, False, True, False]
    assert out[4] == pseudonym("c", KEY)
    assert sorted(zip(pairs["pseudonym"], pairs["user_id"], strict=True)) == sorted(
        [(pseudonym("a", KEY), "a"), (pseudonym("b", KEY), "b")]
    )
    assert "test-key" not in repr(Pseudonymiser(KEY))


def test_the_key_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    assert load_pseudonym_key({}) is None
    assert load_pseudonym_key({"RECS_PSEUDONYM_KEY": " k" * 10}) == ("k " * 9 + "k").encode()
    path = tmp_path / "key"
    path.write_text("0123456789abcdef0123\n")
    assert load_pseudonym_key({"RECS_PSEUDONYM_KEY_FILE": str(path)}) == b"0123456789abcdef0123"
    with pytest.raises(ConfigError, match="at least 16"):
        load_pseudonym_key({"RECS_PSEUDONYM_KEY": "short"})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_pseudonym_key({"RECS_PSEUDONYM_KEY_FILE": str(tmp_path / "missing")})
    monkeypatch.setenv("RECS_PSEUDONYM_KEY", KEY.decode())
    settings = Settings()
    assert settings.pseudonym_key == KEY
    assert "test-key" not in repr(settings)  # never printed

"""Which demo clients the simulator acts with (`platform.find_credentials`), without a platform: the
folders it tries and why each was passed over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from v2v_simulator.config import Config
from v2v_simulator.platform import find_credentials


async def test_a_folder_without_an_issuer_is_passed_over_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no demo clients to act with") as caught:
        await find_credentials(Config(auth_dir=str(tmp_path)), None)
    assert f"{tmp_path} (no issuer.json)" in str(caught.value) and "--auth-dir" in str(caught.value)


async def test_a_folder_whose_issuer_gives_ops_no_token_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("V2V_AUTH_ISSUER", raising=False)
    (tmp_path / "issuer.json").write_text(json.dumps({"issuer": "http://127.0.0.1:9"}))  # nothing listens
    with pytest.raises(RuntimeError) as caught:
        await find_credentials(Config(auth_dir=str(tmp_path)), None)
    assert f"{tmp_path} (issuer http://127.0.0.1:9 gives its ops client no token)" in str(caught.value)

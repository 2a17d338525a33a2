"""Model folders: card parsing, safe loading, bundled/local/registered models, downloads."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch

from LiverTumorSegLib.errors import ModelError
from LiverTumorSegLib.model import ModelCard, count_parameters, list_models, load_model, resolve_model
from LiverTumorSegLib.model.loading import sha256_of
from LiverTumorSegLib.model.unet import UNet3D


def test_seed_architecture_has_about_5_8_million_parameters():
    net = UNet3D()
    assert count_parameters(net) == pytest.approx(5.8e6, rel=0.01)
    assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == 2 * 4 + 2 * 3 + 1  # two 3x3x3 convs per block, 1x1x1 head
    assert net.encoders[0][0].in_channels == 1 and net.head.out_channels == 3
    assert [e[0].out_channels for e in net.encoders] == [32, 64, 128, 256]


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_variants(norm):
    net = UNet3D(widths=(8, 16, 32), norm=norm)
    assert net(torch.zeros(2, 1, 8, 8, 8)).shape == (2, 3, 8, 8, 8)


def test_loaded_model_round_trip(tiny_model):
    loaded = load_model(tiny_model)
    assert loaded.card.name == "tiny-test" and loaded.card.num_classes == 3
    assert loaded.card.weights_sha256 == sha256_of(tiny_model / "weights.pt")
    card = json.loads((tiny_model / "model.json").read_text(encoding="utf-8"))
    for key in ("architecture", "labels", "spacing_mm", "orientation", "intensity", "patch_size",
                "default_overlap", "version", "provenance", "weights"):
        assert key in card


def test_pickled_objects_are_never_loaded(tmp_path, tiny_model):
    """A weights file holding arbitrary Python objects is refused even with a right checksum."""
    model = tmp_path / "evil"
    shutil.copytree(tiny_model, model)
    torch.save({"payload": object.__new__(Exploit)}, model / "weights.pt")
    card = json.loads((model / "model.json").read_text(encoding="utf-8"))
    card["weights"]["sha256"] = sha256_of(model / "weights.pt")
    (model / "model.json").write_text(json.dumps(card))
    Exploit.ran = False
    with pytest.raises(ModelError, match="cannot read weights"):
        load_model(model)
    assert not Exploit.ran


class Exploit:
    ran = False

    def __reduce__(self):
        return (Exploit._run, ())

    @staticmethod
    def _run():
        Exploit.ran = True
        return Exploit()


@pytest.mark.parametrize("field,value,message", [
    ("spacing_mm", [1.0, 0.0, 1.0], "spacing"),
    ("orientation", "LLS", "orientation"),
    ("default_overlap", 1.5, "default_overlap"),
    ("patch_size", [96, 96], "patch_size"),
])
def test_invalid_cards_name_the_field(tiny_model, field, value, message):
    card = json.loads((tiny_model / "model.json").read_text(encoding="utf-8"))
    card[field] = value
    with pytest.raises(ModelError, match=message):
        ModelCard.from_dict(card)


def test_missing_card_and_unknown_names(tmp_path):
    with pytest.raises(ModelError, match="no model.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model("no-such-model-anywhere")


@pytest.fixture()
def registry(tmp_path, tiny_model, monkeypatch):
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in tiny_model.iterdir():
            zf.write(f, f"tiny/{f.name}")
    entries = {"models": [{"name": "tiny-remote", "url": archive.as_uri(), "sha256": sha256_of(archive),
                           "description": "test download"}]}
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps(entries))
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIVERTUMORSEG_REGISTRY", str(reg))
    monkeypatch.setenv("LIVERTUMORSEG_CACHE", str(cache))
    return reg, cache, entries


def test_registered_model_downloads_once_and_verifies(registry):
    reg, cache, _ = registry
    names = {e.name: e for e in list_models()}
    assert names["tiny-remote"].source == "registered" and not names["tiny-remote"].installed
    folder = resolve_model("tiny-remote")
    assert folder == cache / "tiny-remote" and load_model(folder).card.name == "tiny-test"
    assert {e.name: e for e in list_models()}["tiny-remote"].source == "cached"
    assert [p.name for p in cache.iterdir()] == ["tiny-remote"]  # no temporary leftovers


def test_download_with_wrong_checksum_installs_nothing(registry):
    reg, cache, entries = registry
    entries["models"][0]["sha256"] = "0" * 64
    reg.write_text(json.dumps(entries))
    with pytest.raises(ModelError, match="verification"):
        resolve_model("tiny-remote")
    assert list(cache.iterdir()) == []


def test_offline_download_says_so(registry):
    reg, cache, entries = registry
    entries["models"][0]["url"] = "http://127.0.0.1:9/tiny.zip"  # nothing listens on port 9
    reg.write_text(json.dumps(entries))
    with pytest.raises(ModelError, match="offline"):
        resolve_model("tiny-remote")
    assert list(cache.iterdir()) == []


def test_models_command_lists_cache_folder(registry, capsys):
    from LiverTumorSegLib.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert str(registry[1]) in out and "tiny-remote" in out

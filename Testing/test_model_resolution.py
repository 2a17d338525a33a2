"""Which folder a model name or path resolves to, and what stats.json records of it."""

from __future__ import annotations

import json
import shutil

import pytest

from LiverTumorSegLib.errors import ModelError
from LiverTumorSegLib.model import resolve_model
from LiverTumorSegLib.model.registry import BUNDLED_DIR, DEFAULT_MODEL

from .helpers import make_tiny_model


def test_a_folder_named_like_a_model_in_the_working_directory_does_not_replace_it(tmp_path, monkeypatch):
    shadow = make_tiny_model(tmp_path / DEFAULT_MODEL)  # another card under the bundled model's name
    monkeypatch.chdir(tmp_path)
    bundled = (BUNDLED_DIR / DEFAULT_MODEL).resolve()
    assert resolve_model(None) == bundled and resolve_model(DEFAULT_MODEL) == bundled
    assert resolve_model(f"./{DEFAULT_MODEL}") == shadow.resolve()  # asked for as a path: the folder
    assert resolve_model(str(shadow)) == shadow.resolve()


def test_a_plain_name_that_is_no_known_model_may_be_a_folder_here(tmp_path, monkeypatch):
    mine = make_tiny_model(tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("my-model") == mine.resolve()
    with pytest.raises(ModelError, match="model folder .*nope does not exist"):
        resolve_model("./nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model.json"):
        resolve_model("empty")
    (tmp_path / "last.ckpt").write_bytes(b"")  # a training checkpoint, not yet exported
    with pytest.raises(ModelError, match=r"last\.ckpt is not a model folder but a training checkpoint: export it"):
        resolve_model("./last.ckpt")
    with pytest.raises(ModelError, match=r"model\.json is a model card: give its folder"):
        resolve_model(str(mine / "model.json"))


def test_stats_json_records_the_models_folder_and_weights_checksum(tmp_path):
    from LiverTumorSegLib.cli import main
    from LiverTumorSegLib.io import write_volume

    from .oracle import analytic_ct
    import numpy as np

    model = make_tiny_model(tmp_path / "m")
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    write_volume(ct, tmp_path / "ct.nii.gz")
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "o"), "--model", str(model),
                 "--progress", "none", "--no-surfaces", "--no-preview"]) == 0
    run = json.loads((tmp_path / "o" / "stats.json").read_text())["run"]
    card = json.loads((model / "model.json").read_text())
    assert run["model_folder"] == str(model.resolve())
    assert run["model_weights_sha256"] == card["weights"]["sha256"]
    assert (run["batch_size"], run["min_lesion_ml"]) == (2, 0.01) and run["threads"] >= 1
    copy = shutil.copytree(model, tmp_path / "copy")
    assert resolve_model(str(copy)) != resolve_model(str(model))


@pytest.mark.parametrize("labels,ok", [
    ({"0": "background", "1": "liver", "2": "tumor"}, True),
    ({"0": "Background", "1": "Liver", "2": "cancer"}, True),  # the Decathlon's own names
    ({"0": "background", "1": "liver", "2": "Tumour"}, True),
    ({"0": "background", "1": "liver"}, True),
    ({"0": "Background", "1": "Liver", "2": "liver_tumor"}, True),  # nnU-Net / MONAI style names
    ({"0": "background", "1": "liver", "2": "Liver-Tumors"}, True),
    ({"0": "background", "1": "liver", "2": "HCC"}, True),
    ({"0": "background", "1": "liver", "2": "metastases"}, True),
    ({"0": "background", "1": "tumor", "2": "liver"}, False),
    ({"0": "background", "1": "tumor"}, False),
    ({"0": "background", "1": "spleen", "2": "kidney"}, False),
    ({"0": "background", "1": "liver", "2": "tumor", "3": "spleen"}, False),
])
def test_a_card_must_mean_liver_by_class_1_and_tumor_by_class_2(tiny_model, labels, ok):
    from LiverTumorSegLib.model import ModelCard

    card = json.loads((tiny_model / "model.json").read_text(encoding="utf-8"))
    card["labels"] = labels
    card["architecture"]["num_classes"] = len(labels)
    if ok:
        assert ModelCard.from_dict(card).labels == labels
    else:
        with pytest.raises(ModelError, match="labels"):
            ModelCard.from_dict(card)


@pytest.mark.parametrize("field,value,message", [
    ("spacing_mm", [True, True, True], "list of numbers"),
    ("spacing_mm", [1e4, 1e4, 1e4], "the model card is wrong"),
    ("spacing_mm", [1e-4, 1.0, 1.0], "the model card is wrong"),
    ("patch_size", [48.7, 48, 48], "whole numbers"),
    ("patch_size", [4096, 4096, 4096], "the model card is wrong"),
    ("patch_size", ["32", 32, 32], "list of numbers"),
    ("intensity", {"mode": "window", "window_hu": [-200, 250], "output_range": [0, 0]}, "output_range"),
])
def test_implausible_card_numbers_blame_the_card(tiny_model, field, value, message):
    from LiverTumorSegLib.model import ModelCard

    card = json.loads((tiny_model / "model.json").read_text(encoding="utf-8"))
    card[field] = value
    with pytest.raises(ModelError, match=message):
        ModelCard.from_dict(card)
    card[field] = [32.0, 32, 32] if field == "patch_size" else card[field]
    if field == "patch_size":
        assert ModelCard.from_dict(card).patch_size == (32, 32, 32)  # 32.0 is a whole number


def _serve_once_per_request(responses):
    """A local HTTP server answering each request with the next raw bytes of ``responses``
    and then closing the connection (as a server that dies mid-file does)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def serve():
        for raw in responses:
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(raw)
            conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}/model.zip"


@pytest.mark.parametrize("raw,message", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 4000000\r\n\r\n" + b"x" * 1000, "interrupted after 0.0 of 3.8 MiB"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n" + b"x" * 100, "interrupted"),
    (b"GARBAGE\r\n\r\n", "interrupted"),
])
def test_an_interrupted_download_says_so_and_installs_nothing(tmp_path, monkeypatch, raw, message):
    from LiverTumorSegLib.model.registry import ModelEntry, download_model

    monkeypatch.setenv("LIVERTUMORSEG_CACHE", str(tmp_path / "cache"))
    entry = ModelEntry("m", "registered", url=_serve_once_per_request([raw]), sha256="0" * 64)
    with pytest.raises(ModelError, match=message) as info:
        download_model(entry)
    assert "run again" in str(info.value) and "verification" not in str(info.value)
    assert not (tmp_path / "cache" / "m").exists()


def _zip_model(folder, archive):
    import zipfile

    with zipfile.ZipFile(archive, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"model/{f.name}")
    return archive


def test_a_cached_model_is_replaced_when_the_registry_names_a_new_archive(tmp_path, monkeypatch):
    """A registry that replaces a bad model must reach users who cached the old one."""
    from LiverTumorSegLib.model import list_models, load_model
    from LiverTumorSegLib.model.loading import sha256_of

    old = _zip_model(make_tiny_model(tmp_path / "v1", seed=1), tmp_path / "v1.zip")
    new = _zip_model(make_tiny_model(tmp_path / "v2", seed=2), tmp_path / "v2.zip")
    registry = tmp_path / "registry.json"
    monkeypatch.setenv("LIVERTUMORSEG_REGISTRY", str(registry))
    monkeypatch.setenv("LIVERTUMORSEG_CACHE", str(tmp_path / "cache"))

    def register(archive):
        registry.write_text(json.dumps({"models": [{"name": "remote", "url": archive.as_uri(),
                                                    "sha256": sha256_of(archive)}]}))

    register(old)
    first = resolve_model("remote")
    weights_v1 = load_model(first).card.weights_sha256
    assert {e.name: e.source for e in list_models()}["remote"] == "cached"
    assert resolve_model("remote") == first  # cached: not downloaded again
    register(new)
    assert {e.name: e.source for e in list_models()}["remote"] == "outdated"
    second = resolve_model("remote")
    assert second == first and load_model(second).card.weights_sha256 != weights_v1
    assert load_model(second).card.weights_sha256 == json.loads((tmp_path / "v2" / "model.json").read_text())["weights"]["sha256"]
    assert {e.name: e.source for e in list_models()}["remote"] == "cached"

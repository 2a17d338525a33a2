"""Model folders: card parsing, safe loading, bundled/local/registered models, downloads."""

from __future__ import annotations

import json
import math
import os
import shutil
import zipfile

import pytest
import torch

from LiverTumorSegLib.errors import ModelError
from LiverTumorSegLib.model import ModelCard, count_parameters, list_models, load_model, resolve_model
from LiverTumorSegLib.model.loading import sha256_of
from LiverTumorSegLib.model.unet import UNet3D
from LiverTumorSegLib.torch_versions import TORCH_SAFE_PICKLE, release

from .helpers import Exploit, read_weights, weights_path, write_weights


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
    assert loaded.card.weights_sha256 == sha256_of(weights_path(tiny_model))
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
    card["weights"] = {"file": "weights.pt", "format": "torch-state-dict", "sha256": sha256_of(model / "weights.pt")}
    (model / "model.json").write_text(json.dumps(card))
    Exploit.ran = False
    with pytest.raises(ModelError, match="cannot read (the pickled )?weights") as info:  # before torch 2.6: not read
        load_model(model)
    assert not Exploit.ran
    if release(torch.__version__) >= TORCH_SAFE_PICKLE:  # torch's own text advises weights_only=False: never shown
        assert "holds Python objects other than tensors" in str(info.value) and "weights_only" not in str(info.value)



@pytest.mark.parametrize("field,value,message", [
    ("spacing_mm", [1.0, 0.0, 1.0], "spacing"),
    ("orientation", "LLS", "orientation"),
    ("default_overlap", 1.5, "default_overlap"),
    ("patch_size", [96, 96], "patch_size"),
    ("spacing_mm", [float("nan")] * 3, "finite"),
    ("labels", ["background", "liver", "tumor"], "invalid or missing field"),
    ("intensity", {"mode": "window", "window_hu": [-200.0]}, "two numbers each"),
    ("intensity", {"mode": "window", "window_hu": [False, True]}, "window_hu must be a list of numbers"),
    ("intensity", {"mode": "window", "window_hu": [-200, 250], "output_range": [0, True]}, "output_range must be a list"),
    ("intensity", {"mode": "window", "window_hu": "-200,250"}, "window_hu must be a list of numbers"),
    ("architecture", {"type": "unet3d", "widths": [-4, 8], "num_classes": 3}, "widths"),
    ("architecture", {"type": "unet3d", "widths": [100000, 200000], "num_classes": 3}, "widths"),
    ("architecture", {"type": "unet3d", "widths": [4, 8, 16, 32, 64, 128, 256], "num_classes": 3}, "divisible"),
    ("architecture", {"type": "unet3d", "widths": [4, 8], "num_classes": 5}, "num_classes"),
    ("architecture", {"type": "unet3d", "widths": [4, 8], "num_classes": 3, "in_channels": 2}, "in_channels"),
    ("weights", {"file": "../../elsewhere.pt", "sha256": "0" * 64}, "inside the model folder"),
    ("weights", {"file": "/etc/passwd", "sha256": "0" * 64}, "inside the model folder"),
])
def test_invalid_cards_name_the_field(tiny_model, field, value, message):
    card = json.loads((tiny_model / "model.json").read_text(encoding="utf-8"))
    card[field] = value
    with pytest.raises(ModelError, match=message):
        ModelCard.from_dict(card)


@pytest.mark.parametrize("sha256", ["", "0" * 63, "0" * 65, "g" * 64, " " + "0" * 63, None])
def test_a_card_whose_checksum_is_not_64_hex_digits_is_refused(tiny_model, tmp_path, sha256):
    """An empty or malformed weights.sha256 cannot check the weights: refused by the card
    and by the loader, whatever the file holds."""
    from LiverTumorSegLib.model.loading import load_state_dict

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    card["weights"]["sha256"] = sha256
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelError, match="weights.sha256 must be .* 64 hex digits"):
        ModelCard.from_dict(card)
    with pytest.raises(ModelError, match="weights.sha256 must be .* 64 hex digits"):
        load_model(folder)
    with pytest.raises(ModelError, match="64 hex digits"):
        load_state_dict(weights_path(folder), sha256, card["weights"]["format"])
    card["weights"]["sha256"] = sha256_of(weights_path(folder)).upper()  # the right one, in capitals: fine
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    assert load_model(folder).card.weights_sha256 == sha256_of(weights_path(folder))


def test_nan_weights_are_refused_and_linked_weights_checked(tiny_model, tmp_path):
    import shutil

    broken = tmp_path / "nan"
    shutil.copytree(tiny_model, broken)
    state = read_weights(broken)
    next(iter(state.values())).fill_(float("nan"))
    card = json.loads((broken / "model.json").read_text())
    card["weights"]["sha256"] = sha256_of(write_weights(broken, state))
    (broken / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="NaN or infinite"):
        load_model(broken)
    linked = tmp_path / "linked"  # weights behind a link, as in DVC or Hugging Face snapshot folders
    shutil.copytree(tiny_model, linked)
    weights = weights_path(linked)
    (tmp_path / "blob.pt").write_bytes(weights.read_bytes())
    weights.unlink()
    weights.symlink_to(tmp_path / "blob.pt")
    assert load_model(linked).card.name == "tiny-test"  # the checksum guards the content
    (tmp_path / "blob.pt").write_bytes(b"something else")
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_model(linked)


def test_integer_weights_are_refused_and_half_precision_ones_load(tiny_model, tmp_path):
    import shutil

    import torch

    def rewritten(name, change):
        folder = tmp_path / name
        shutil.copytree(tiny_model, folder)
        state = {key: change(value) for key, value in read_weights(folder).items()}
        card = json.loads((folder / "model.json").read_text())
        card["weights"]["sha256"] = sha256_of(write_weights(folder, state))
        (folder / "model.json").write_text(json.dumps(card))
        return folder

    # weights rounded to whole numbers (a quantisation or a wrong export) would load as a broken network
    with pytest.raises(ModelError, match=r"non-floating-point tensors .*\(int32\)"):
        load_model(rewritten("int", lambda t: (t * 100).to(torch.int32)))
    half = load_model(rewritten("half", lambda t: t.to(torch.float16)))
    assert all(p.dtype == torch.float32 for p in half.network.parameters())


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
    assert _left_in(cache) == ["tiny-remote"]  # no temporary leftovers


def test_download_with_wrong_checksum_installs_nothing(registry):
    reg, cache, entries = registry
    entries["models"][0]["sha256"] = "0" * 64
    reg.write_text(json.dumps(entries))
    with pytest.raises(ModelError, match="verification") as info:
        resolve_model("tiny-remote")
    assert _left_in(cache) == []
    size = (reg.parent / "tiny.zip").stat().st_size  # says how much arrived: a short file shows as such
    assert f"the {size} bytes received from file:" in str(info.value) and "run again" in str(info.value)


def test_offline_download_says_so(registry):
    reg, cache, entries = registry
    entries["models"][0]["url"] = "http://127.0.0.1:9/tiny.zip"  # nothing listens on port 9
    reg.write_text(json.dumps(entries))
    with pytest.raises(ModelError, match="offline"):
        resolve_model("tiny-remote")
    assert _left_in(cache) == []


def _left_in(cache):
    """What the cache holds besides the (empty, reusable) per-model lock files."""
    return sorted(p.name for p in cache.iterdir() if not (p.name.endswith(".lock") and p.stat().st_size == 0))


@pytest.mark.parametrize("name", ["../victim", "./../victim", "a/b", "", ".hidden", "x" * 65])
def test_registry_names_are_plain_folder_names(registry, name, tmp_path):
    reg, cache, entries = registry
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    entries["models"][0]["name"] = name
    reg.write_text(json.dumps(entries))
    with pytest.raises(ModelError, match="name"):
        list_models()
    from LiverTumorSegLib.model.registry import ModelEntry, download_model

    entry = ModelEntry(name, "registered", url=entries["models"][0]["url"], sha256=entries["models"][0]["sha256"])
    with pytest.raises(ModelError, match="name"):  # and the installer itself refuses it, downloading nothing
        download_model(entry)
    assert (victim / "precious.txt").read_text() == "keep"


def test_download_and_archive_size_limits(registry, tmp_path):
    import LiverTumorSegLib.model.registry as registry_module

    reg, cache, entries = registry
    entries["models"][0]["max_mb"] = 0.001  # about 1 KB: smaller than the archive
    reg.write_text(json.dumps(entries))
    with pytest.raises(ModelError, match="limit"):
        resolve_model("tiny-remote")  # refused from its Content-Length
    assert _left_in(cache) == []

    class NoLength:  # a server that does not say how much it will send
        headers = {}

        def __init__(self):
            self.left = 3

        def read(self, n):
            self.left -= 1
            return b"x" * 1000 if self.left >= 0 else b""

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    import urllib.request

    real = urllib.request.urlopen
    urllib.request.urlopen = lambda url, timeout=None: NoLength()
    try:
        with pytest.raises(ModelError, match="passed the limit"):
            registry_module._fetch("https://example.invalid/m.zip", tmp_path / "m.zip", None, max_bytes=2500)
    finally:
        urllib.request.urlopen = real
    for bad in ("Infinity", -1, "NaN"):
        entries["models"][0]["max_mb"] = bad
        reg.write_text(json.dumps(entries).replace('"Infinity"', "Infinity").replace('"NaN"', "NaN"))
        with pytest.raises(ModelError, match="max_mb"):
            list_models()
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m/model.json", "{}")
        zf.writestr("m/zeros.bin", b"\0" * (8 << 20))  # 8 MiB that compress to a few KiB
    with pytest.raises(ModelError, match="unpacks to"):
        registry_module._extract(bomb, tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "out").exists()


def test_a_killed_download_is_cleared_and_a_lockless_file_system_still_installs(registry, monkeypatch):
    import errno

    reg, cache, _ = registry
    cache.mkdir()
    (cache / ".tiny-remote.download-abcd1234").mkdir()  # a download that was killed
    (cache / ".tiny-remote.download-x.download-abcd1234").mkdir()  # another model's (a name with a prefix)
    assert resolve_model("tiny-remote") == cache / "tiny-remote"
    assert _left_in(cache) == [".tiny-remote.download-x.download-abcd1234", "tiny-remote"]

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    fcntl = pytest.importorskip("fcntl", reason="POSIX file locks")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setenv("LIVERTUMORSEG_CACHE", str(cache.parent / "cache2"))
    (cache.parent / "cache2").mkdir()
    (cache.parent / "cache2" / ".tiny-remote.download-abcd1234").mkdir()  # maybe another process's, live
    assert resolve_model("tiny-remote") == cache.parent / "cache2" / "tiny-remote"  # installs unlocked
    assert _left_in(cache.parent / "cache2") == [".tiny-remote.download-abcd1234", "tiny-remote"]


def test_a_waiter_waits_while_the_holder_makes_progress(tmp_path, monkeypatch):
    import threading
    import time

    import LiverTumorSegLib.model.registry as registry_module

    monkeypatch.setattr(registry_module, "HEARTBEAT_S", 0.1)

    lock = tmp_path / ".m.lock"
    lock.write_bytes(b"")
    os.utime(lock, (0, 0))  # a lock file left from long ago
    entered, release = threading.Event(), threading.Event()

    def holder():
        with registry_module._install_lock(lock):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    entered.wait(10)
    started = time.monotonic()
    threading.Timer(2.5, release.set).start()
    # idle_s is 10 beats (a heartbeat thread starved for a moment on a busy machine does not
    # make the waiter give up), and the holder keeps the lock well past it
    with registry_module._install_lock(lock, idle_s=1.0) as locked:  # the holder's beats keep it waiting
        assert locked
    assert time.monotonic() - started >= 2.4
    thread.join()
    lock.unlink()  # a lock file deleted by hand (as the timeout message suggests) is made again
    with registry_module._install_lock(lock) as locked:
        assert locked


def test_concurrent_installs_of_one_model_both_succeed(registry):
    from concurrent.futures import ThreadPoolExecutor

    reg, cache, _ = registry
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: resolve_model("tiny-remote"), range(4)))
    assert folders == [cache / "tiny-remote"] * 4 and load_model(folders[0]).card.name == "tiny-test"
    assert _left_in(cache) == ["tiny-remote"]


def test_models_command_lists_cache_folder(registry, capsys):
    from LiverTumorSegLib.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert str(registry[1]) in out and "tiny-remote" in out


def test_stats_json_records_an_absolute_model_folder_for_a_relative_cache(registry, tmp_path, monkeypatch):
    """A relative LIVERTUMORSEG_CACHE (or a model loaded from a relative folder) is recorded
    as the absolute folder, so the result still names it when read from elsewhere."""
    import numpy as np

    from LiverTumorSegLib.pipeline import SegmentOptions, Segmenter

    from .oracle import analytic_ct

    reg, cache, _ = registry
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIVERTUMORSEG_CACHE", "cache")
    ct, _ = analytic_ct((3.0, 3.0, 3.0), np.eye(3))
    result = Segmenter("tiny-remote", SegmentOptions(device="cpu", precision="fp32")).segment(ct)
    assert result.info["model_folder"] == str(cache / "tiny-remote") and (cache / "tiny-remote").is_absolute()


def test_an_outdated_copy_is_not_used_when_the_new_archive_cannot_be_fetched(registry):
    reg, cache, entries = registry
    folder = resolve_model("tiny-remote")
    entries["models"][0].update(url="http://127.0.0.1:9/v2.zip", sha256="1" * 64)  # nothing listens on port 9
    reg.write_text(json.dumps(entries))
    with pytest.raises(ModelError, match="not known to be.* from the archive the registry names now"):
        resolve_model("tiny-remote", download=False)
    with pytest.raises(ModelError, match=r"offline.*came from another archive than the registry names now, "
                                         r"so it is not used"):
        resolve_model("tiny-remote")
    assert load_model(folder).card.name == "tiny-test"  # left as it was: nothing half-replaced


def test_a_cached_copy_with_no_record_of_its_archive_is_downloaded_again(registry):
    from LiverTumorSegLib.model.registry import SOURCE_RECORD

    reg, cache, entries = registry
    folder = resolve_model("tiny-remote")
    assert (folder / SOURCE_RECORD).read_text().strip() == entries["models"][0]["sha256"]
    (folder / SOURCE_RECORD).unlink()  # installed by an engine before the record, or copied in by hand
    (folder / "model.json").write_text((folder / "model.json").read_text().replace("tiny-test", "hand-made"))
    assert {e.name: e for e in list_models()}["tiny-remote"].source == "outdated"
    assert load_model(resolve_model("tiny-remote")).card.name == "tiny-test"
    assert _left_in(cache) == ["tiny-remote"]  # the replaced copy went with the work folder


def test_an_unwritable_cache_names_the_variable_that_moves_it(registry):
    reg, cache, _ = registry
    (cache / ".tiny-remote.lock").mkdir(parents=True)  # the lock file cannot be opened (as on a read-only mount)
    with pytest.raises(ModelError, match="cannot lock .*set LIVERTUMORSEG_CACHE"):
        resolve_model("tiny-remote")


def test_an_export_replaces_an_earlier_ones_weights_and_gives_the_same_bytes_each_time(tmp_path):
    """Exporting into a folder that holds an earlier export: the other format's weights
    file must not stay beside the new one (a zip of the folder would ship both), a
    user's file there stays, and the same weights give the same SHA-256 every time."""
    pytest.importorskip("safetensors")
    from .helpers import make_tiny_model

    folder = tmp_path / "model"
    make_tiny_model(folder, weights_format="torch-state-dict")
    first = load_model(folder).card.weights_sha256
    (folder / "notes.txt").write_text("the user's")
    make_tiny_model(folder, weights_format="torch-state-dict")
    assert load_model(folder).card.weights_sha256 == first == sha256_of(folder / "weights.pt")
    make_tiny_model(folder, weights_format="safetensors")
    assert sorted(os.listdir(folder)) == ["model.json", "notes.txt", "weights.safetensors"]
    assert load_model(folder).card.weights_format == "safetensors"
    make_tiny_model(folder, weights_format="torch-state-dict")
    assert sorted(os.listdir(folder)) == ["model.json", "notes.txt", "weights.pt"]
    assert load_model(folder).card.weights_sha256 == first


def _copy_with_state(tiny_model, dest, change):
    """A copy of the tiny model whose weights went through ``change`` (card checksum updated)."""
    shutil.copytree(tiny_model, dest)
    state = change(read_weights(dest))
    card = json.loads((dest / "model.json").read_text())
    card["weights"]["sha256"] = sha256_of(write_weights(dest, state))
    (dest / "model.json").write_text(json.dumps(card))
    return dest


def _card(tiny_model):
    return json.loads((tiny_model / "model.json").read_text(encoding="utf-8"))


# -- from a mutation review: loading, cards and the registry at their edges ----------

def test_a_single_nan_weight_is_refused(tiny_model, tmp_path):
    """One NaN among finite weights is refused too, not only all-NaN tensors."""
    def one_nan(state):
        next(iter(state.values())).view(-1)[0] = float("nan")
        return state

    with pytest.raises(ModelError, match="NaN or infinite"):
        load_model(_copy_with_state(tiny_model, tmp_path / "m", one_nan))


@pytest.mark.parametrize("how", ["missing", "extra"])
def test_weights_missing_or_adding_a_tensor_do_not_load(tiny_model, tmp_path, how):
    """Weights lacking a tensor, or with one too many, do not load: a layer left at
    its random initialisation would give garbage without an error."""
    def change(state):
        if how == "missing":
            state.pop(sorted(state)[-1])
        else:
            state["stray.weight"] = torch.zeros(2)
        return state

    with pytest.raises(ModelError, match="do not match the architecture"):
        load_model(_copy_with_state(tiny_model, tmp_path / "m", change))


@pytest.mark.parametrize("torch_version", [None, "2.2.2+cu121"])
def test_an_unknown_weights_format_is_refused_and_does_not_bypass_the_old_torch_guard(
        tiny_model, tmp_path, monkeypatch, torch_version):
    """A card saying "pytorch" (not "torch-state-dict") is refused before any read: read
    by torch.load, it would skip the guard for torch before 2.6 (CVE-2025-32434)."""
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    card = _card(folder)
    card["weights"]["format"] = "pytorch"
    (folder / "model.json").write_text(json.dumps(card))
    if torch_version:
        monkeypatch.setattr(torch, "__version__", torch_version)
    with pytest.raises(ModelError, match="unknown weights format 'pytorch'"):
        load_model(folder)


def test_a_truncated_weights_file_with_a_matching_checksum_says_it_cannot_be_read(tiny_model, tmp_path):
    """A weights file cut short (with a checksum made for it) is named as unreadable,
    not blamed on the architecture."""
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    weights = weights_path(folder)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    card = _card(folder)
    card["weights"]["sha256"] = sha256_of(weights)
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="cannot read weights weights.pt"):
        load_model(folder)


@pytest.mark.parametrize("field,value,message", [
    ("patch_size", [0, 32, 32], "patch_size"),
    ("spacing_mm", [3.0, 3.0, 3.0, 3.0], "spacing_mm"),
    ("intensity", {"mode": "window", "window_hu": [250, 250]}, "window_hu"),
    ("default_overlap", 1.0, "default_overlap"),
    ("intensity", {"mode": "window", "window_hu": [float("nan"), 250]}, "finite"),
    ("intensity", {"mode": "window", "output_range": [-1, float("inf")]}, "finite"),
    ("format_version", 2, "newer than this engine"),
])
def test_boundary_cards_are_refused(tiny_model, field, value, message):
    card = _card(tiny_model)
    card[field] = value
    with pytest.raises(ModelError, match=message):
        ModelCard.from_dict(card)


def test_a_nan_window_from_json_is_refused_by_load_model(tiny_model, tmp_path):
    """JSON allows NaN: a card with a NaN window would feed an all-NaN volume to the network."""
    folder = shutil.copytree(tiny_model, tmp_path / "m")
    card = _card(folder)
    card["intensity"]["window_hu"] = [math.nan, 250.0]
    (folder / "model.json").write_text(json.dumps(card))  # writes NaN literally
    with pytest.raises(ModelError, match="finite"):
        load_model(folder)


def _zip(archive, files):
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return archive


def _register(tmp_path, monkeypatch, archive, **extra):
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps({"models": [{"name": "remote", "url": archive.as_uri(),
                                           "sha256": sha256_of(archive), **extra}]}))
    monkeypatch.setenv("LIVERTUMORSEG_REGISTRY", str(reg))
    monkeypatch.setenv("LIVERTUMORSEG_CACHE", str(tmp_path / "cache"))
    return reg


def _model_files(tiny_model, prefix):
    return {f"{prefix}/{f.name}": f.read_bytes() for f in tiny_model.iterdir()}


@pytest.mark.parametrize("sha", ["", "abc", "z" * 64])
def test_a_registry_entry_without_a_valid_sha256_is_named_as_the_registrys_fault(tiny_model, tmp_path, monkeypatch, sha):
    """An entry without a valid sha256 is the registry's fault, said when it is read; not
    later, as a damaged transfer to run again."""
    reg = _register(tmp_path, monkeypatch, _zip(tmp_path / "a.zip", _model_files(tiny_model, "m")))
    data = json.loads(reg.read_text())
    data["models"][0]["sha256"] = sha
    reg.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="64-digit hex sha256"):
        list_models()


def test_an_archive_with_two_model_cards_is_refused(tiny_model, tmp_path, monkeypatch):
    """Which of two models gets installed is not left to chance."""
    files = {**_model_files(tiny_model, "a"), **_model_files(tiny_model, "b")}
    _register(tmp_path, monkeypatch, _zip(tmp_path / "two.zip", files))
    with pytest.raises(ModelError, match="exactly one model.json"):
        resolve_model("remote")
    assert not (tmp_path / "cache" / "remote").exists()


def test_an_archive_with_too_many_members_is_refused(tiny_model, tmp_path, monkeypatch):
    """An archive of more members than the limit is refused, and nothing installed."""
    from LiverTumorSegLib.model.registry import MAX_MEMBERS

    files = {**_model_files(tiny_model, "m"), **{f"m/junk/{i}": b"" for i in range(MAX_MEMBERS)}}
    _register(tmp_path, monkeypatch, _zip(tmp_path / "many.zip", files))
    with pytest.raises(ModelError, match=f"more than {MAX_MEMBERS}"):
        resolve_model("remote")
    assert not (tmp_path / "cache" / "remote").exists()


def test_the_default_cache_folder(tmp_path, monkeypatch):
    """The documented default: $XDG_CACHE_HOME/livertumorseg/models, else ~/.cache/...."""
    from LiverTumorSegLib.model.registry import cache_dir

    monkeypatch.delenv("LIVERTUMORSEG_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "livertumorseg" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "livertumorseg" / "models"


def test_an_entrys_max_mb_also_limits_what_the_archive_unpacks_to(tiny_model, tmp_path, monkeypatch):
    """An entry's max_mb limits what its archive unpacks to, not only the download: a
    small archive that unpacks to far more than 2 x max_mb is refused, nothing installed."""
    files = {**_model_files(tiny_model, "m"), "m/zeros.bin": b"\0" * (4 << 20)}  # 4 MiB, deflates to a few KiB
    archive = _zip(tmp_path / "bomb.zip", files)
    assert archive.stat().st_size < (1 << 20)
    _register(tmp_path, monkeypatch, archive, max_mb=1)
    with pytest.raises(ModelError, match="unpacks to"):
        resolve_model("remote")
    assert not (tmp_path / "cache" / "remote").exists()

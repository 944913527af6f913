"""Reliability of adapter files and training inputs (review items 6 and 9).

- A hostile adapter file is one line, "promise-segment: error: <file>...", exit status 2, never an internal
  error or a crash, and it is refused from the file alone: the registry's loader is never called
  (``no_model`` turns any backbone load into a failure, only to observe that none happened).
- ``train --resume`` refuses other data (a content fingerprint of every case), other options, fewer epochs
  than already trained, and states that cannot prove their data; the same data resumes.
- Training inputs that would train on a wrong answer are refused before the backbone is loaded.
Real files throughout: adapters written by ``save_adapter``/safetensors or byte by byte, real runs stopped.
"""

import contextlib
import io
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_support import (  # noqa: F401  (fixtures are used by name)
    TINY,
    TRAIN_FAST,
    _quiet_progress,
    cli,
    contents,
    interrupt_held_write,
    no_model,
    one_error,
    save_folder,
    write_nrrd,
)
from safetensors.torch import save_file
from sample_data import make_sample_volume, make_training_slices

from PromiseSegmentLib.backbones.registry import BACKBONES
from PromiseSegmentLib.cli.arguments import PROGRESS_ENV
from PromiseSegmentLib.cli.main import main
from PromiseSegmentLib.data.datasets import Case, load_image_folder
from PromiseSegmentLib.data.preprocessing import IntensityRule
from PromiseSegmentLib.errors import Cancelled, InputError
from PromiseSegmentLib.model.adapter import (
    METADATA_KEY,
    Adapter,
    AdapterError,
    load_adapter,
    read_metadata,
    save_adapter,
)
from PromiseSegmentLib.model.adapter_format import BackboneRecord
from PromiseSegmentLib.model.apm import APM
from PromiseSegmentLib.model.ips import IPS
from PromiseSegmentLib.training.config import TrainConfig
from PromiseSegmentLib.training.setup import build_adapter
from PromiseSegmentLib.training.trainer import train_adapter

LIGHT = dict(apm_fusion_dim=16, apm_head_blocks=(1, 1, 1, 1), apm_tap_pool=2)


def named(cases):
    """Parametrised cases named by their first value, a description."""
    return [
        pytest.param(*c.values, marks=c.marks, id=c.values[0]) if hasattr(c, "values") else pytest.param(*c, id=c[0])
        for c in cases
    ]


# ------------------------------------------------------------------------------------------- adapter files
@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A valid APM (box + points) + IPS adapter for the registry's tiny backbone, its metadata and tensors, a
    volume."""
    from PromiseSegmentLib.backbones.registry import load_backbone

    root = tmp_path_factory.mktemp("adapters")
    adapter = build_adapter(TrainConfig(apm_prompts=("box", "points"), **LIGHT), load_backbone("tiny_random"))
    good = save_adapter(adapter, root / "good.safetensors")
    vol, _ = make_sample_volume(3, (2, 32, 32))
    tensors = {
        f"{n}.{k}": v.detach().clone().contiguous()
        for n, m in adapter.modules().items()
        for k, v in m.state_dict().items()
    }
    return {
        "good": good,
        "meta": adapter.metadata().to_json(),
        "tensors": tensors,
        "vol": write_nrrd(root / "vol.nrrd", vol.array.astype(np.float32), vol.ijk_to_ras),
    }


def edited(fx, **changes):
    """The valid metadata with ``part__key=value`` (or ``part=value``) changes, as a fresh copy."""
    meta = json.loads(json.dumps(fx["meta"]))
    for name, value in changes.items():
        part, _, key = name.partition("__")
        if key:
            meta[part][key] = value
        else:
            meta[part] = value
    return meta


def save(path, meta, tensors):
    save_file(tensors, str(path), metadata={METADATA_KEY: meta if isinstance(meta, str) else json.dumps(meta)})


def save_raw(path, header: bytes, data: bytes = b""):
    """A safetensors file byte by byte: 8-byte length, the JSON header, the data."""
    Path(path).write_bytes(struct.pack("<Q", len(header)) + header + data)


def table(fx, entries: str, data: bytes = b"") -> bytes:
    """A raw header holding the valid metadata and the given tensor ``entries`` (JSON text)."""
    meta = json.dumps({METADATA_KEY: json.dumps(fx["meta"])})
    return ('{"__metadata__": ' + meta + (", " + entries if entries else "") + "}").encode()


def with_tensor(fx, name, value):
    tensors = dict(fx["tensors"])
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    return tensors


def lite_adapter(shape_lie=False):
    """A LiteMedSAM adapter built from the registry's description alone (no weights loaded); with
    ``shape_lie`` one tensor has another shape than its metadata says."""
    spec = BACKBONES["lite_medsam"]
    record = BackboneRecord(spec.name, spec.family, spec.checkpoint.sha256, spec.image_size, spec.tap_channels)
    adapter = Adapter(record, APM(spec.tap_channels, spec.image_size, ("box",), fusion_dim=16, tap_pool=2), IPS())
    tensors = {
        f"{n}.{k}": v.detach().clone().contiguous()
        for n, m in adapter.modules().items()
        for k, v in m.state_dict().items()
    }
    if shape_lie:
        tensors["apm.fusion.0.weight"] = torch.zeros(16, 320, 3, 3)
    return adapter.metadata().to_json(), tensors


def _dtype(fx, dtype):
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in fx["tensors"].items()}


def _duplicate(fx, path):
    """Two entries named ips.mlp.2.bias (json keeps the second): the first's bytes are left unclaimed."""
    save(path, fx["meta"], fx["tensors"])
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head, data = raw[8 : 8 + n].rstrip(), raw[8 + n :]  # safetensors pads its header with spaces
    end = len(data)
    extra = f', "ips.mlp.2.bias": {{"dtype": "F32", "shape": [1024], "data_offsets": [{end}, {end + 4096}]}}'
    save_raw(path, head[:-1] + extra.encode() + b"}", data + bytes(4096))


def _overlap(fx, path):
    """ips.mlp.2.bias claims the bytes of ips.mlp.0.bias (both 1024 floats); the file is cut to what the
    header claims, so its size is consistent."""
    save(path, fx["meta"], fx["tensors"])
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["ips.mlp.2.bias"]["data_offsets"] = header["ips.mlp.0.bias"]["data_offsets"]
    ends = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    save_raw(path, json.dumps(header).encode(), raw[8 + n : 8 + n + ends])


def _symlink_loop(fx, path):
    os.symlink(path, path)


def _checkpoint(fx, path, tiny_sam):
    torch.save(tiny_sam.state_dict(), path)


DEEP = "[" * 100_000 + "]" * 100_000
# name -> (write the file at path, a phrase of the one-line refusal)
HOSTILE = {
    "deep-metadata": (lambda fx, p: save(p, DEEP, fx["tensors"]), "damaged"),
    "deep-header": (lambda fx, p: save_raw(p, DEEP.encode()), "damaged"),
    "metadata-list": (lambda fx, p: save(p, "[1, 2]", fx["tensors"]), "no integer format_version"),
    "metadata-null": (lambda fx, p: save(p, "null", fx["tensors"]), "no integer format_version"),
    "apm-width-1e7": (lambda fx, p: save(p, edited(fx, apm__fusion_dim=10**7), fx["tensors"]), "fusion_dim"),
    "apm-width-negative": (lambda fx, p: save(p, edited(fx, apm__fusion_dim=-4), fx["tensors"]), "fusion_dim"),
    "apm-width-0": (lambda fx, p: save(p, edited(fx, apm__fusion_dim=0), fx["tensors"]), "fusion_dim"),
    "apm-width-float": (lambda fx, p: save(p, edited(fx, apm__fusion_dim=16.0), fx["tensors"]), "fusion_dim"),
    "apm-width-string": (lambda fx, p: save(p, edited(fx, apm__fusion_dim="16"), fx["tensors"]), "fusion_dim"),
    "apm-blocks-1e6": (
        lambda fx, p: save(p, edited(fx, apm__head_blocks=[10**6, 1, 1, 1]), fx["tensors"]),
        "head_blocks",
    ),
    "apm-tap-pool-0": (lambda fx, p: save(p, edited(fx, apm__tap_pool=0), fx["tensors"]), "tap_pool"),
    "apm-five-taps": (lambda fx, p: save(p, edited(fx, apm__tap_channels=[64] * 5), fx["tensors"]), "tap"),
    "apm-tap-channels-0": (lambda fx, p: save(p, edited(fx, apm__tap_channels=[0, 64, 64]), fx["tensors"]), "tap"),
    "apm-slot-label-7": (lambda fx, p: save(p, edited(fx, apm__slot_labels=[7] * 16), fx["tensors"]), "slot_labels"),
    "apm-image-size-512": (lambda fx, p: save(p, edited(fx, apm__image_size=512), fx["tensors"]), "image_size"),
    "apm-refinement-string": (lambda fx, p: save(p, edited(fx, apm__box_refinement="1"), fx["tensors"]), "refinement"),
    "ips-absurd-sizes": (
        lambda fx, p: save(p, edited(fx, ips={"dim": 10**6, "hidden": 10**6, "n_tokens": 4}), fx["tensors"]),
        "IPS",
    ),
    "ips-dim-128": (
        lambda fx, p: save(p, edited(fx, ips={"dim": 128, "hidden": 1024, "n_tokens": 4}), fx["tensors"]),
        "IPS",
    ),
    "ips-3-tokens": (
        lambda fx, p: save(p, edited(fx, ips={"dim": 256, "hidden": 1024, "n_tokens": 3}), fx["tensors"]),
        "IPS",
    ),
    "shapes-do-not-fit": (lambda fx, p: save(p, edited(fx, apm__fusion_dim=32), fx["tensors"]), "shape"),
    "lite-medsam-shapes-do-not-fit": (lambda fx, p: save(p, *lite_adapter(shape_lie=True)), "shape"),
    "missing-tensor": (lambda fx, p: save(p, fx["meta"], with_tensor(fx, "ips.mlp.2.bias", None)), "lacks"),
    "extra-tensor": (lambda fx, p: save(p, fx["meta"], with_tensor(fx, "other.x", torch.zeros(3))), "not in"),
    "ips-tensors-without-ips": (lambda fx, p: save(p, edited(fx, ips=None), fx["tensors"]), "not in"),
    "fp64-tensors": (lambda fx, p: save(p, fx["meta"], _dtype(fx, torch.float64)), "F64"),
    "fp16-tensors": (lambda fx, p: save(p, fx["meta"], _dtype(fx, torch.float16)), "F16"),
    "uint8-weight": (
        lambda fx, p: save(
            p, fx["meta"], with_tensor(fx, "ips.mlp.0.weight", torch.ones(1024, 256, dtype=torch.uint8))
        ),
        "U8",
    ),
    "duplicate-tensor-name": (_duplicate, "duplicate"),
    "overlapping-tensors": (_overlap, "overlap"),
    "header-larger-than-file": (
        lambda fx, p: p.write_bytes(struct.pack("<Q", 10**9) + fx["good"].read_bytes()[8:]),
        "header size",
    ),
    "truncated": (lambda fx, p: p.write_bytes(fx["good"].read_bytes()[:-100]), "truncated"),
    "zero-bytes": (lambda fx, p: p.write_bytes(b""), "header size 0"),
    "not-utf8-metadata": (lambda fx, p: save_raw(p, b'{"__metadata__": {"promise_segment": "\xff\xfe"}}'), "utf-8"),
    "metadata-value-not-a-string": (
        lambda fx, p: save_raw(p, json.dumps({"__metadata__": {METADATA_KEY: fx["meta"]}}).encode()),
        "damaged",
    ),
    "metadata-table-a-list": (lambda fx, p: save_raw(p, b'{"__metadata__": [1]}'), "damaged"),
    "data-offsets-a-number": (
        lambda fx, p: save_raw(p, table(fx, '"ips.x": {"dtype": "F32", "shape": [1], "data_offsets": 4}'), b"1234"),
        "damaged",
    ),
    "unknown-backbone": (
        lambda fx, p: save(p, edited(fx, backbone=dict(fx["meta"]["backbone"], name="sam_vit_z")), fx["tensors"]),
        "sam_vit_z",
    ),
    "record-contradicts-registry": (
        lambda fx, p: save(
            p, edited(fx, backbone=dict(fx["meta"]["backbone"], tap_channels=[160, 160, 320])), fx["tensors"]
        ),
        "registry",
    ),
    "not-a-promise-adapter": (lambda fx, p: save_file(fx["tensors"], str(p)), "without PromiseSegment metadata"),
    "symlink-loop": (_symlink_loop, "symbolic links"),
    "format-version-true": (
        lambda fx, p: save(p, edited(fx, format_version=True), fx["tensors"]),
        "no integer format_version",
    ),
    "intensity-rule-unknown": (
        lambda fx, p: save(p, edited(fx, intensity={"kind": "magic"}), fx["tensors"]),
        "intensity",
    ),
}


def _cases():
    return list(HOSTILE)


def _segment(capsys, fx, adapter, out, *extra):
    return cli(
        capsys, "segment", fx["vol"], "-o", out, "--adapter", adapter, "--device", "cpu", "--point", "16,16,1", *extra
    )


def refused(rc, err, path, phrase):
    """One error line naming ``path`` that says ``phrase`` elsewhere than in the path."""
    line = one_error(rc, err, str(path))
    assert phrase.lower() in line.replace(str(path), "").lower(), line


@pytest.mark.parametrize("name", _cases())
def test_a_hostile_adapter_is_one_line_exit_2_before_any_backbone_loads(name, fx, tmp_path, capsys, no_model):
    path = tmp_path / f"{name}.safetensors"
    HOSTILE[name][0](fx, path)
    out = tmp_path / "out.seg.nrrd"
    rc, _, err = _segment(capsys, fx, path, out)
    refused(rc, err, path, HOSTILE[name][1])
    assert not out.exists()


@pytest.mark.parametrize("name", _cases())
def test_a_hostile_adapter_is_an_adapter_error_from_the_library(name, fx, tmp_path):
    path = tmp_path / f"{name}.safetensors"
    HOSTILE[name][0](fx, path)
    with pytest.raises(AdapterError) as err:
        read_metadata(path)
    assert str(path) in str(err.value) and HOSTILE[name][1].lower() in str(err.value).replace(str(path), "").lower()


def test_unknown_backbone_is_refused_even_with_a_backbone_given(fx, tmp_path, capsys, no_model):
    path = tmp_path / "z.safetensors"
    HOSTILE["unknown-backbone"][0](fx, path)
    rc, _, err = _segment(capsys, fx, path, tmp_path / "out.seg.nrrd", "--backbone", "tiny_random")
    refused(rc, err, path, "sam_vit_z")


def test_a_pickled_checkpoint_named_safetensors_is_not_an_adapter(fx, tmp_path, capsys, no_model, tiny_sam):
    path = tmp_path / "ck.safetensors"
    _checkpoint(fx, path, tiny_sam)
    rc, _, err = _segment(capsys, fx, path, tmp_path / "out.seg.nrrd")
    refused(rc, err, path, "not a readable adapter")


def test_absurd_sizes_are_refused_before_anything_is_allocated():
    with pytest.raises(ValueError, match="fusion_dim"):
        APM((64,) * 3, 1024, fusion_dim=10**7)
    with pytest.raises(ValueError, match="head_blocks"):
        APM((64,) * 3, 1024, head_blocks=(10**6, 1, 1, 1))
    with pytest.raises(ValueError, match="hidden"):
        IPS(hidden=10**7)


def test_valid_adapters_still_load_and_segment(fx, tmp_path, capsys):
    from PromiseSegmentLib.backbones.registry import load_backbone

    rc, _, err = _segment(capsys, fx, fx["good"], tmp_path / "out.seg.nrrd")
    assert rc == 0, err
    assert load_adapter(fx["good"], load_backbone("tiny_random")).apm is not None
    meta, tensors = lite_adapter()
    save(tmp_path / "lite.safetensors", meta, tensors)
    assert read_metadata(tmp_path / "lite.safetensors").backbone.name == "lite_medsam"


@pytest.mark.parametrize(
    "name, change, phrase",
    named(
        [
            ("nan-weight", ("ips.mlp.0.weight", (0, 0), float("nan")), "contain NaN or infinite values"),
            ("inf-weight", ("apm.fusion.0.bias", (0,), float("inf")), "contain NaN or infinite values"),
            ("other-weights", None, "allow-backbone-mismatch"),
        ]
    ),
)
def test_refusals_that_need_the_loaded_weights_are_still_one_line(name, change, phrase, fx, tmp_path, capsys):
    path = tmp_path / f"{name}.safetensors"
    tensors = {k: v.clone() for k, v in fx["tensors"].items()}
    meta = fx["meta"]
    if change is None:
        meta = edited(fx, backbone=dict(fx["meta"]["backbone"], identity="0" * 64))
    else:
        tensors[change[0]][change[1]] = change[2]
    save(path, meta, tensors)
    rc, _, err = _segment(capsys, fx, path, tmp_path / "out.seg.nrrd")
    refused(rc, err, path, phrase)


# ------------------------------------------------------------------------------------ resuming a training run
CFG = dict(epochs=3, batch_size=2, lr=3e-3, augment=False, cache_features=True, apm_prompts=("box",), **LIGHT)


@pytest.fixture(scope="module")
def engine(tiny_backbone):
    from PromiseSegmentLib.inference.embedding_cache import EmbeddingCache
    from PromiseSegmentLib.model.promise import engine_for

    return engine_for(tiny_backbone, None, "cpu", cache=EmbeddingCache())


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, engine):
    """A real run on data A stopped (cancelled) after 2 of 3 epochs: its cases and the files it kept."""
    pairs = [(rgb[::2, ::2].copy(), m[::2, ::2].copy()) for rgb, m in make_training_slices([1], 0.0)[:5]]
    cases = [Case(f"c{i}", rgb, m) for i, (rgb, m) in enumerate(pairs)]
    folder = tmp_path_factory.mktemp("run")
    done = []
    with pytest.raises(Cancelled):
        train_adapter(
            engine,
            cases[2:],
            cases[:2],
            TrainConfig(**CFG),
            folder / "a.safetensors",
            progress=lambda s: s.record and done.append(s.record.epoch),
            cancel=lambda: len(done) >= 2,
        )
    return {"train": cases[2:], "val": cases[:2], "folder": folder}


def _resume(run, engine, tmp_path, train=None, val=None, state=None, **changes):
    """Resume a copy of the interrupted run; returns (result or the error, files before, files after)."""
    folder = Path(shutil.copytree(run["folder"], tmp_path / "run"))
    out = folder / "a.safetensors"
    if state is not None:
        state(Path(f"{out}.state.pt"))
    kept = [out, Path(f"{out}.state.pt")]
    before = contents(kept)
    try:
        result = train_adapter(
            engine,
            run["train"] if train is None else train,
            run["val"] if val is None else val,
            TrainConfig(**dict(CFG, **changes)),
            out,
            resume=True,
        )
    except InputError as exc:
        return exc, before, contents(kept)
    return result, before, contents(kept)


def _changed_pixel(cases, k=0):
    copy = [Case(c.id, c.rgb.copy(), c.mask.copy()) for c in cases]
    copy[k].rgb[0, 0, 0] ^= 1
    return copy


def _changed_mask_pixel(cases, k):
    copy = [Case(c.id, c.rgb, c.mask.copy()) for c in cases]
    copy[k].mask[0, 0] = not copy[k].mask[0, 0]
    return copy


@pytest.mark.parametrize(
    "what, data, phrase",
    named(
        [
            (
                "one training pixel",
                lambda r: dict(train=_changed_pixel(r["train"])),
                "the training data differ from the interrupted run's (1 of 3 cases changed)",
            ),
            (
                "one validation pixel",
                lambda r: dict(val=_changed_pixel(r["val"], 1)),
                "the validation data differ from the interrupted run's (1 of 2 cases changed)",
            ),
            ("one mask pixel", lambda r: dict(train=_changed_mask_pixel(r["train"], 2)), "(1 of 3 cases changed)"),
            (
                "a renamed case",
                lambda r: dict(train=[Case(c.id + "x" * (i == 1), c.rgb, c.mask) for i, c in enumerate(r["train"])]),
                "(1 of 3 cases changed)",
            ),
            ("the same cases in another order", lambda r: dict(train=r["train"][::-1]), "(2 of 3 cases changed)"),
        ]
    ),
)
def test_resume_with_other_data_of_the_same_size_is_refused(what, data, phrase, interrupted_run, engine, tmp_path):
    result, before, after = _resume(interrupted_run, engine, tmp_path, **data(interrupted_run))
    assert isinstance(result, InputError), f"{what}: resumed on other data"
    assert phrase in str(result) and "--resume" in str(result) and "\n" not in str(result)
    assert after == before  # the best adapter so far and the state are kept as they were


def test_resume_with_the_same_data_finishes_the_run(interrupted_run, engine, tmp_path):
    same = [Case(c.id, c.rgb.copy(), c.mask.copy()) for c in interrupted_run["train"]]  # equal, not identical
    result, _, after = _resume(interrupted_run, engine, tmp_path, train=same)
    assert not isinstance(result, InputError), result
    assert len(result.history) == 3 and list(after.values())[1] is None  # finished: the state is removed


def _drop_fingerprint(path):
    state = torch.load(path, weights_only=True)
    state.pop("data", None)
    torch.save(state, path)


@pytest.mark.parametrize(
    "name, changes, phrase",
    named(
        [
            ("changed --lr", dict(lr=1e-2), "--lr 0.003 then, 0.01 now"),
            ("fewer --epochs than done", dict(epochs=1), "--epochs 1"),
            ("another adapter configuration", dict(use_ips=False), "use_ips"),
            ("another intensity rule", dict(intensity=IntensityRule("window", 40, 400).to_dict()), "intensity"),
            ("a state without a data fingerprint", dict(state=_drop_fingerprint), "older PromiseSegment"),
        ]
    ),
)
def test_resume_refusals_say_what_differs(name, changes, phrase, interrupted_run, engine, tmp_path):
    result, before, after = _resume(interrupted_run, engine, tmp_path, **changes)
    assert isinstance(result, InputError), f"{name}: resumed"
    assert phrase in str(result) and after == before


def test_resume_with_more_epochs_continues(interrupted_run, engine, tmp_path):
    result, _, _ = _resume(interrupted_run, engine, tmp_path, epochs=4)
    assert not isinstance(result, InputError), result
    assert [r.epoch for r in result.history] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- the command line, training inputs
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A real `train` run on folder A, stopped by Ctrl+C while its second state file is written."""
    root = tmp_path_factory.mktemp("cli")
    pairs = [(rgb[::3, ::3].copy(), m[::3, ::3].copy()) for rgb, m in make_training_slices([1], 0.0)[:3]]
    data = save_folder(root / "a", pairs)
    out = root / "run" / "a.safetensors"
    out.parent.mkdir()
    argv = ["train", "--data", data, "-o", out, *TINY, *TRAIN_FAST, "--epochs", "2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PROGRESS_ENV, "1e9")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with interrupt_held_write(out.parent, out.name + ".state.pt", nth=2) as fired:
                rc = main([str(a) for a in argv])
    assert rc == 130 and fired and Path(f"{out}.state.pt").is_file()
    return {"root": root, "data": data, "pairs": pairs, "argv": argv, "out": out}


def _cli_resume_on_changed_data(cli_run, tmp_path, capsys):
    folder = Path(shutil.copytree(cli_run["out"].parent, tmp_path / "run"))
    pairs = [(rgb.copy(), m) for rgb, m in cli_run["pairs"]]
    pairs[2][0][5, 5] ^= 1  # one pixel of one image (the seeded split makes c2 a selection case)
    other = save_folder(tmp_path / "b", pairs)
    argv = [
        str(a).replace(str(cli_run["out"].parent), str(folder)).replace(str(cli_run["data"]), str(other))
        for a in cli_run["argv"]
    ]
    kept = [folder / "a.safetensors", folder / "a.safetensors.state.pt"]
    before = contents(kept)
    rc, _, err = cli(capsys, *argv, "--resume")
    assert contents(kept) == before
    return rc, err


def test_cli_resume_on_changed_data_is_one_line(cli_run, tmp_path, capsys):
    rc, err = _cli_resume_on_changed_data(cli_run, tmp_path, capsys)
    one_error(rc, err, "the validation data differ from the interrupted run's (1 of 1 cases changed)", "--resume")


def test_cli_resume_on_changed_data_is_refused_before_the_backbone_loads(cli_run, tmp_path, capsys, no_model):
    rc, err = _cli_resume_on_changed_data(cli_run, tmp_path, capsys)
    one_error(rc, err, "the validation data differ from the interrupted run's (1 of 1 cases changed)")


def _folder_with_masks(root, masks, image_size=(24, 24)):
    from PIL import Image

    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n, mask in enumerate(masks):
        Image.fromarray(rng.integers(0, 255, (*image_size, 3), dtype=np.uint8)).save(root / "images" / f"c{n}.png")
        name, picture = mask
        Image.fromarray(picture).save(root / "masks" / f"c{n}.{name}")
    return root


SQUARE = np.zeros((24, 24), bool)
SQUARE[6:14, 8:18] = True


@pytest.mark.parametrize(
    "encoding, picture",
    named(
        [
            ("0/255 png", ("png", SQUARE.astype(np.uint8) * 255)),
            ("0/1 png", ("png", SQUARE.astype(np.uint8))),
            ("0/0.5 float tiff", ("tif", SQUARE.astype(np.float32) * 0.5)),
            ("0/65535 png", ("png", SQUARE.astype(np.uint16) * 65535)),
        ]
    ),
)
def test_mask_encodings_give_the_same_mask(encoding, picture, tmp_path):
    cases = load_image_folder(_folder_with_masks(tmp_path, [picture] * 3))
    assert all(np.array_equal(c.mask, SQUARE) for c in cases), encoding


@pytest.mark.parametrize(
    "name, masks, image_size, phrase",
    named(
        [
            ("every mask empty", [("png", np.zeros((24, 24), np.uint8))] * 3, (24, 24), "every training mask is empty"),
            (
                "every mask the whole image",
                [("png", np.full((24, 24), 255, np.uint8))] * 3,
                (24, 24),
                "covers its whole image",
            ),
            ("image and mask sizes differ", [("png", SQUARE.astype(np.uint8) * 255)] * 3, (24, 30), "differ in size"),
        ]
    ),
)
def test_training_inputs_that_teach_nothing_are_refused_before_the_backbone(
    name, masks, image_size, phrase, tmp_path, capsys, no_model
):
    data = _folder_with_masks(tmp_path / "d", masks, image_size)
    rc, _, err = cli(capsys, "train", "--data", data, "-o", tmp_path / "a.safetensors", *TINY, *TRAIN_FAST)
    one_error(rc, err, phrase)
    assert not (tmp_path / "a.safetensors").exists()

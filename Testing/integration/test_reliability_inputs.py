"""Inputs that used to succeed with a wrong answer: pictures decoded wrongly, intensity rules that do not
fit the data, box prompts outside the volume or on top of each other, hostile option values, a closed
stdout. Each case asserts the right result (decoded pixel values, the clipped box's Dice against the
expert mask) or one clear refusal before any model work."""

import subprocess
import sys

import numpy as np
import pytest
from reliability_support import PKG, TINY, cli, files, no_model, one_error, tiny_record, write_nrrd  # noqa: F401

from PromiseSegmentLib.data.preprocessing import IntensityRule, to_uint8_rgb
from PromiseSegmentLib.data.prompts import check_ijk_prompts, ijk_prompts
from PromiseSegmentLib.errors import InputError


def picture(rng=None):
    rng = rng or np.random.default_rng(0)
    base = np.linspace(0, 255, 48 * 40).reshape(48, 40)
    return np.stack([base, base[::-1], rng.integers(0, 256, (48, 40))], axis=-1).astype(np.uint8)


# ------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda p: p.astype(np.uint16) * 256 + 100, id="16-bit colour"),  # not v*257: that wraps to v
        pytest.param(lambda p: p.astype(np.float32) / 255, id="float 0-1 colour"),
        pytest.param(lambda p: p.astype(np.float64), id="float 0-255 colour"),
        pytest.param(lambda p: p.astype(np.int32), id="int32 0-255 colour"),
    ],
)
def test_colour_volumes_of_every_type_decode_to_the_same_picture(encode):
    original = picture()
    volume = encode(original)[None]  # a one-slice colour volume (K, J, I, 3)
    decoded = to_uint8_rgb(volume[0], IntensityRule().value_range(volume))
    assert np.abs(decoded.astype(int) - original).max() <= 1


def test_a_colour_volume_that_is_not_a_picture_is_refused():
    volume = (picture().astype(np.int16) - 500)[None]
    with pytest.raises(InputError, match="not a picture"):
        IntensityRule().value_range(volume)


def save_png_of(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def test_16_bit_grey_pictures_in_an_image_folder_keep_their_contrast(tmp_path):
    from PromiseSegmentLib.data.volume_io import read_rgb

    grey = picture()[..., 0]
    path = save_png_of(tmp_path / "grey16.png", grey.astype(np.uint16) * 257)
    decoded = read_rgb(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (48, 40, 3)
    assert np.abs(decoded[..., 0].astype(int) - grey).max() <= 1, "clipped at 255 instead of scaled"


@pytest.mark.parametrize("values", [(0, 1), (0, 255)], ids=["0/1", "0/255"])
def test_mask_pictures_read_as_their_foreground(tmp_path, values):
    from PromiseSegmentLib.data.volume_io import read_mask

    truth = np.zeros((20, 30), bool)
    truth[5:12, 8:20] = True
    path = save_png_of(tmp_path / "mask.png", np.where(truth, values[1], values[0]).astype(np.uint8))
    assert np.array_equal(read_mask(path), truth)


def test_one_decoding_rule_for_volumes_and_pictures():
    from PromiseSegmentLib.data.preprocessing import picture_range

    assert picture_range(np.zeros(3, np.uint16) + 4000).range == (0.0, 65535.0)
    assert picture_range(np.array([0.0, 0.5])).range == (0.0, 1.0)
    assert picture_range(np.array([-1024, 3000], np.int16)) is None


# ------------------------------------------------------------------------------------------ intensity
def ct_volume():
    rng = np.random.default_rng(1)
    return (rng.normal(40, 300, (2, 32, 32))).astype(np.int16)


def test_a_picture_rule_on_ct_values_is_refused_with_the_options_to_use():
    with pytest.raises(InputError, match="--window"):
        IntensityRule("rgb").value_range(ct_volume())


def test_an_explicit_percentile_rule_applies_to_8_bit_volumes():
    volume = (np.arange(1000).reshape(10, 10, 10) % 200 + 20).astype(np.uint8)
    assert IntensityRule().value_range(volume) == (0.0, 255.0), "the default passes 8-bit pictures through"
    lo, hi = IntensityRule("percentile", low=5, high=95).value_range(volume)
    assert (lo, hi) != (0.0, 255.0) and 20 <= lo < hi <= 219


@pytest.mark.parametrize(
    "rule",
    [IntensityRule.ct(40, 1e-300), IntensityRule("range", low=0.0, high=1e-310), IntensityRule.ct(1e300, 1e-300)],
)
def test_windows_too_narrow_to_map_are_refused(rule):
    with pytest.raises(InputError, match="too narrow"):
        rule.check()


def test_segment_refuses_a_picture_adapter_on_ct_before_loading_a_model(capsys, tmp_path, request):
    from PromiseSegmentLib.model.adapter import Adapter, save_adapter
    from PromiseSegmentLib.model.ips import IPS

    adapter = save_adapter(
        Adapter(tiny_record(), ips=IPS(), intensity=IntensityRule("rgb")), tmp_path / "rgb.safetensors"
    )
    request.getfixturevalue("no_model")  # from here on, loading any backbone fails the test
    vol = write_nrrd(tmp_path / "ct.nrrd", ct_volume())
    rc, out, err = cli(
        capsys, "segment", vol, "-o", tmp_path / "out.seg.nrrd", "--adapter", adapter, "--box", "4,4,0,20,20,1", *TINY
    )
    one_error(rc, err, "--window")
    assert not (tmp_path / "out.seg.nrrd").exists()


# ------------------------------------------------------------------------------------------ boxes
SHAPE = (5, 30, 40)  # K, J, I


def test_a_box_reaching_outside_is_clipped_and_said_so():
    notes = check_ijk_prompts([], [(-50, 5, 1, 20, 25, 3)], SHAPE, 0)
    assert len(notes) == 1 and "clipped to 0,5,1,20,25,3" in notes[0]
    prompts = ijk_prompts(0, [], [(-50, 5, 1, 20, 25, 3)], SHAPE)
    assert sorted(prompts) == [1, 2, 3]
    assert list(prompts[2].box) == [0, 5, 20, 25]


def test_a_box_spanning_far_beyond_the_volume_is_bounded_by_the_volume():
    prompts = ijk_prompts(0, [], [(2, 2, -1e12, 20, 20, 1e12)], SHAPE)  # used to loop over 2e12 slices
    assert sorted(prompts) == list(range(SHAPE[0]))


def test_two_boxes_on_one_slice_are_refused_not_replaced():
    with pytest.raises(InputError, match="one box per slice"):
        check_ijk_prompts([], [(2, 2, 0, 10, 10, 2), (15, 15, 2, 30, 25, 4)], SHAPE, 0)
    check_ijk_prompts([], [(2, 2, 0, 10, 10, 1), (15, 15, 2, 30, 25, 4)], SHAPE, 0)  # other slices: fine


@pytest.mark.parametrize("box", [[np.nan, 0, 10, 10], [0, 0, np.inf, 10], [10, 0, 5, 10]])
def test_the_python_api_refuses_a_box_that_cannot_be_meant(box):
    from PromiseSegmentLib.data.prompts import Prompts

    with pytest.raises(InputError, match="box"):
        Prompts(box=box)


def test_a_clipped_box_segments_as_well_as_the_box_inside_the_picture():
    """Real CT with its expert mask, the default backbone: the expert box stretched 200 px past the image's
    left edge gives (after clipping) the same result as the box that stops at the edge; unclipped it gave
    nothing."""
    from PromiseSegmentLib.cli.demo import bundled_spleen
    from PromiseSegmentLib.data.volume_io import read_mask, read_rgb
    from PromiseSegmentLib.model.promise import load_model

    image = sorted((bundled_spleen() / "images").iterdir())[0]
    rgb, truth = read_rgb(image), read_mask(bundled_spleen() / "masks" / (image.stem + ".png"))
    j, i = np.nonzero(truth)
    model = load_model("lite_medsam", device="cpu")
    volume = rgb[None]

    def dice(box):
        prompts = ijk_prompts(0, [], [box], volume.shape[:3])
        mask = model.segment_volume(volume, np.eye(4), axis=0, prompts=prompts, mode="vanilla")[0] > 0
        return 2 * (mask & truth).sum() / (mask.sum() + truth.sum())

    inside = dice((0, j.min() - 3, 0, i.max() + 3, j.max() + 3, 0))
    stretched = dice((-200, j.min() - 3, 0, i.max() + 3, j.max() + 3, 0))
    assert inside > 0.5 and abs(stretched - inside) < 0.02


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["--window", "40,1e-300"], "too narrow"),
        (["--threads", "99999999999"], "at most 4096"),
        (["--threads", "0"], "at least 1"),
    ],
)
def test_hostile_option_values_are_refused_at_once(capsys, files, argv, phrase):  # noqa: F811
    rc, out, err = cli(capsys, "segment", files["vol"], "-o", "x.seg.nrrd", "--point", "16,16,1", *argv)
    one_error(rc, err, phrase)


def run_cli(*argv, env=None, stdout=subprocess.PIPE):
    import os

    return subprocess.run(
        [sys.executable, "-m", "PromiseSegmentLib.cli.main", *map(str, argv)],
        cwd=PKG,
        env={**os.environ, **(env or {})},
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )


def test_a_bad_progress_variable_is_named_before_any_work(files):  # noqa: F811
    done = run_cli(
        "segment",
        files["vol"],
        "-o",
        "/tmp/never.seg.nrrd",
        "--point",
        "16,16,1",
        *TINY,
        env={"PROMISE_SEGMENT_PROGRESS_SECONDS": "soon"},
    )
    assert done.returncode == 2 and "PROMISE_SEGMENT_PROGRESS_SECONDS" in done.stderr, done.stderr


def test_a_closed_stdout_does_not_fail_a_completed_run():
    """``promise-segment checkpoints list | head -1``: the reader leaves after one line; the run still succeeds."""
    import os

    process = subprocess.Popen(
        [sys.executable, "-m", "PromiseSegmentLib.cli.main", "checkpoints", "list"],
        cwd=PKG,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    process.stdout.readline()
    process.stdout.close()  # like head -1
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 0, err
    assert "error" not in err


@pytest.mark.parametrize("values", [(0.0, 0.5), (0.0, np.nan)], ids=["0/0.5", "NaN"])
def test_a_label_map_with_fractional_values_is_refused_not_emptied(tmp_path, values):
    from PromiseSegmentLib.data.volume_io import read_labelmap

    labels = np.full((3, 8, 8), values[0], np.float32)
    labels[1, 2:6, 2:6] = values[1]
    with pytest.raises(InputError, match="whole numbers"):
        read_labelmap(write_nrrd(tmp_path / "soft.nrrd", labels))


def test_a_float_label_map_with_whole_values_reads_as_labels(tmp_path):
    from PromiseSegmentLib.data.volume_io import read_labelmap

    labels = np.zeros((3, 8, 8), np.float32)
    labels[1, 2:6, 2:6] = 2.0
    assert np.array_equal(read_labelmap(write_nrrd(tmp_path / "labels.nrrd", labels)).array, labels.astype(np.int32))


# ------------------------------------------------------------------------------------------ more pictures
def pil_variants(original):
    """The same picture saved in the modes image folders hold in practice."""
    from PIL import Image

    rgb = Image.fromarray(original)
    return {
        "RGBA": rgb.convert("RGBA"),
        "palette": rgb.quantize(256).convert("RGB").convert("P"),
        "CMYK JPEG-free": rgb.convert("CMYK"),
        "grey L": rgb.convert("L"),
    }


@pytest.mark.parametrize("mode", ["RGBA", "palette", "CMYK JPEG-free", "grey L"])
def test_picture_modes_decode_to_8_bit_rgb(tmp_path, mode):
    from PromiseSegmentLib.data.volume_io import read_rgb

    original = picture()
    image = pil_variants(original)[mode]
    path = tmp_path / ("x.tif" if mode.startswith("CMYK") else "x.png")
    image.save(path)
    decoded = read_rgb(path)
    assert decoded.dtype == np.uint8 and decoded.shape == original.shape
    expected = np.asarray(image.convert("RGB"))
    assert np.abs(decoded.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("mode", ["1", "RGB"])
def test_one_bit_and_colour_masks_read_as_their_foreground(tmp_path, mode):
    from PIL import Image

    from PromiseSegmentLib.data.volume_io import read_mask

    truth = np.zeros((20, 30), bool)
    truth[4:15, 3:22] = True
    Image.fromarray((truth * 255).astype(np.uint8)).convert(mode).save(tmp_path / "m.png")
    assert np.array_equal(read_mask(tmp_path / "m.png"), truth)


def test_a_16_bit_grey_picture_under_the_picture_rule_keeps_its_contrast():
    """A 16-bit X-ray picture segmented with an adapter trained on photos: scaled by its type's range,
    no longer clipped to 0-255 (which made everything above 255 white)."""
    volume = (picture()[..., 0].astype(np.uint16) * 256)[None]
    lo, hi = IntensityRule("rgb").value_range(volume)
    decoded = to_uint8_rgb(volume[0], (lo, hi))[..., 0]
    assert np.abs(decoded.astype(int) - picture()[..., 0]).max() <= 1


def test_points_that_are_not_finite_are_refused_by_the_python_api():
    from PromiseSegmentLib.data.prompts import Prompts

    with pytest.raises(InputError, match="finite"):
        Prompts(points=[[np.nan, 3.0]])


# ------------------------------------------------------------------------------------------ messages
def test_file_names_that_are_not_utf8_are_refused_before_any_work(capsys, tmp_path, files, request):  # noqa: F811
    import os
    import shutil

    bad_input = os.fsdecode(bytes(tmp_path) + b"/scan\xff.nrrd")
    shutil.copy(files["vol"], bad_input)
    request.getfixturevalue("no_model")
    rc, out, err = cli(capsys, "segment", bad_input, "-o", tmp_path / "out.seg.nrrd", "--point", "16,16,1", *TINY)
    one_error(rc, err, "not valid UTF-8", "scan\\xff")
    bad_output = os.fsdecode(bytes(tmp_path) + b"/out\xfe.seg.nrrd")
    rc, out, err = cli(capsys, "segment", files["vol"], "-o", bad_output, "--point", "16,16,1", *TINY)
    one_error(rc, err, "not valid UTF-8")
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(bad_input)], "nothing written, no temporary left"


def test_an_adapter_and_a_backbone_that_cannot_work_together_are_refused_before_any_download(
    capsys, tmp_path, files, request
):  # noqa: F811
    from PromiseSegmentLib.model.adapter import Adapter, save_adapter
    from PromiseSegmentLib.model.adapter_format import BackboneRecord
    from PromiseSegmentLib.model.ips import IPS

    record = BackboneRecord("lite_medsam", "lite_medsam", "sha256:0", 256, (160, 160, 320))
    adapter = save_adapter(Adapter(record, ips=IPS()), tmp_path / "lite.safetensors")
    request.getfixturevalue("no_model")
    rc, out, err = cli(
        capsys,
        "segment",
        files["vol"],
        "-o",
        tmp_path / "o.seg.nrrd",
        "--box",
        "2,2,0,20,20,1",
        "--adapter",
        adapter,
        "--backbone",
        "sam_vit_b",
    )
    one_error(rc, err, "trained on backbone lite_medsam", "--backbone sam_vit_b cannot use it")


def test_a_cache_setting_that_is_a_file_is_named(capsys, tmp_path, files, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PROMISE_SEGMENT_CACHE", str(files["vol"]))
    rc, out, err = cli(capsys, "segment", files["vol"], "-o", tmp_path / "o.seg.nrrd", "--point", "16,16,1", *TINY)
    one_error(rc, err, "PROMISE_SEGMENT_CACHE")


def test_a_negative_seed_is_refused_by_its_option(capsys, tmp_path, files):  # noqa: F811
    rc, out, err = cli(capsys, "train", "--data", files["data"], "-o", tmp_path / "a.safetensors", "--seed", "-1")
    one_error(rc, err, "--seed", "at least 0")


def test_only_train_is_told_to_resume_after_an_interruption(tmp_path):
    from PromiseSegmentLib.cli.main import _cancelled_message

    state = tmp_path / "a.safetensors.state.pt"
    state.write_bytes(b"state")
    assert "--resume" in _cancelled_message([state], {}, resumable=True)
    assert "--resume" not in _cancelled_message([state], {}, resumable=False)

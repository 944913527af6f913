"""The promise-segment command line on generated files: results, geometry, and clear failures."""

import numpy as np
import pytest
import SimpleITK as sitk
from sample_data import make_sample_volume

from PromiseSegmentLib.cli.main import main
from PromiseSegmentLib.data.prompts import ijk_prompts
from PromiseSegmentLib.data.volume_io import Segment, read_volume, write_segmentation
from PromiseSegmentLib.evaluation.metrics import dice


@pytest.fixture
def sample_nrrd(tmp_path):
    vol, truth = make_sample_volume(3)
    image = sitk.GetImageFromArray(vol.array)
    lps = np.diag([-1, -1, 1, 1.0]) @ vol.ijk_to_ras
    sp = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(sp.tolist()), image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / sp).ravel().tolist())
    path = tmp_path / "sample.nrrd"
    sitk.WriteImage(image, str(path))
    return path, vol, truth


def test_read_volume_keeps_the_oblique_geometry(sample_nrrd):
    path, vol, _ = sample_nrrd
    back = read_volume(path)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-5)
    np.testing.assert_array_equal(back.array, vol.array)


def test_segment_with_points_writes_seg_nrrd_on_the_volume_grid(sample_nrrd, tmp_path, capsys):
    path, vol, truth = sample_nrrd
    k = int(np.argmax(truth.sum((1, 2))))
    j, i = np.argwhere(truth[k]).mean(0).round().astype(int)
    out, png = tmp_path / "out.seg.nrrd", tmp_path / "overlay.png"
    assert (
        main(
            [
                "segment",
                str(path),
                "-o",
                str(out),
                "--point",
                f"{i},{j},{k}",
                "--point",
                "2,2,%d,0" % k,
                "--overlay",
                str(png),
                "--name",
                "Lesion",
                "--backbone",
                "tiny_random",
            ]
        )
        == 0
    )
    seg = sitk.ReadImage(str(out))
    assert seg.GetMetaData("Segment0_Name") == "Lesion"
    assert seg.GetMetaData("Segmentation_MasterRepresentation") == "Binary labelmap"
    back = read_volume(out)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-5)
    mask = back.array
    assert mask.shape == truth.shape and mask[k].any()
    assert not np.delete(mask, k, axis=0).any()  # only the prompted slice was segmented
    assert png.stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
    # an existing result is never silently overwritten
    before = out.read_bytes()
    assert main(["segment", str(path), "-o", str(out), "--point", f"{i},{j},{k}", "--backbone", "tiny_random"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before


def test_box_prompt_spans_slices():
    prompts = ijk_prompts(0, [], [[10, 20, 3, 30, 40, 5]], (8, 50, 50))
    assert sorted(prompts) == [3, 4, 5]
    # one rounding rule for every IJK coordinate: corners a hair below a slice index land on that slice
    for k in range(40):
        near = k - 1e-9 if k else k + 1e-9
        assert sorted(ijk_prompts(0, [[5, 5, near]], [[1, 2, near, 9, 9, near]], (40, 10, 10))) == [k]
    np.testing.assert_array_equal(prompts[4].box, [10, 20, 30, 40])
    sagittal = ijk_prompts(2, [[7, 8, 9, 0]], [], (20, 20, 20))
    assert list(sagittal) == [7] and list(sagittal[7].points[0]) == [8, 9] and sagittal[7].labels[0] == 0


@pytest.mark.parametrize("case", ["missing", "4d", "no_prompts", "bad_checkpoint", "bad_range"])
def test_bad_input_exits_non_zero_with_one_line(tmp_path, sample_nrrd, capsys, case):
    path, _, _ = sample_nrrd
    args = ["segment", str(path), "-o", str(tmp_path / "x.seg.nrrd"), "--point", "40,40,5"]
    if case == "missing":
        args[1] = str(tmp_path / "nope.nrrd")
    elif case == "4d":
        img = sitk.JoinSeries([sitk.Image([4, 4, 4], sitk.sitkFloat32)] * 2)
        sitk.WriteImage(img, str(tmp_path / "t.nrrd"))
        args[1] = str(tmp_path / "t.nrrd")
    elif case == "no_prompts":
        args = args[:4]
    elif case == "bad_checkpoint":
        (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
        args += ["--backbone", str(tmp_path / "junk.pth")]
    else:
        args += ["--slices", "3:99"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("promise-segment: error:") and "\n" not in err
    assert not (tmp_path / "x.seg.nrrd").exists()


def test_rgb_png_is_a_single_slice_volume_and_the_engine_says_once_what_runs(tmp_path, capsys):
    """The default backbone (LiteMedSAM) on an RGB photo, in fp32 and in the automatic precision: the
    engine line is printed once per run, and the fast mode's mask agrees with fp32's."""
    from PIL import Image

    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[10:30, 20:50] = (200, 80, 60)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    vol = read_volume(tmp_path / "photo.png")
    assert vol.array.shape == (1, 48, 64, 3)
    masks = {}
    for precision in ("fp32", "auto"):
        out = tmp_path / f"photo-{precision}.seg.nrrd"
        capsys.readouterr()
        assert (
            main(
                [
                    "segment",
                    str(tmp_path / "photo.png"),
                    "-o",
                    str(out),
                    "--box",
                    "18,8,0,51,31,0",
                    "--precision",
                    precision,
                ]
            )
            == 0
        )
        engine_lines = [ln for ln in capsys.readouterr().out.splitlines() if "engine:" in ln]
        assert len(engine_lines) == 1 and "lite_medsam on cpu" in engine_lines[0]
        if precision == "fp32":
            assert ": fp32 (" in engine_lines[0]
        masks[precision] = read_volume(out).array[0] > 0
    truth = np.zeros((48, 64), bool)
    truth[10:30, 20:50] = True
    assert masks["fp32"].shape == (48, 64) and dice(masks["fp32"], truth) > 0.9
    assert dice(masks["auto"], masks["fp32"]) >= 0.99


def test_checkpoints_list_and_verify(tmp_path, capsys):
    import torch

    from PromiseSegmentLib.backbones.sam_vit import build_seeded_sam

    assert main(["checkpoints", "list"]) == 0
    listing = capsys.readouterr().out
    assert "lite_medsam  ready" in listing and "sam_vit_b" in listing and "tiny_random" not in listing
    f = tmp_path / "t.pth"
    torch.save(build_seeded_sam("tiny", 1).state_dict(), f)
    assert main(["checkpoints", "verify", str(f)]) == 0
    assert "backbone tiny_random" in capsys.readouterr().out
    assert main(["checkpoints", "verify", "lite_medsam"]) == 0
    assert "79d8c9dc" in capsys.readouterr().out
    assert main(["checkpoints", "verify"]) == 2


def test_write_segmentation_is_atomic_on_failure(tmp_path, monkeypatch):
    import SimpleITK

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SimpleITK, "WriteImage", boom)
    with pytest.raises(OSError):
        write_segmentation(tmp_path / "s.seg.nrrd", np.ones((2, 3, 4)), np.eye(4), [Segment("x")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_demo_trains_on_real_ct_and_reports_a_true_dice(tmp_path, capsys):
    """The README's main job, shortened (2 epochs): files written for the 3 held-out patients, and each
    Dice in the report is the Dice of the written segmentation against the bundled expert mask."""
    from PromiseSegmentLib.cli.demo import DEMO_TEST, bundled_spleen
    from PromiseSegmentLib.data.volume_io import read_labelmap, read_mask
    from PromiseSegmentLib.evaluation.metrics import dice

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--warmup", "1", "--epochs", "1"]) == 0
    report = (out / "report.txt").read_text()
    assert "lite_medsam" in report and "automatic" in report and "not used for training" in report
    assert (out / "spleen_adapter.safetensors").stat().st_size > 0
    assert not list(out.glob("*.state.pt"))
    for case in DEMO_TEST:
        seg = read_labelmap(out / f"{case}.seg.nrrd").array
        truth = read_mask(bundled_spleen() / "masks" / f"{case}.png")
        reported = float(report.split(f"{case}: Dice ")[1].split()[0])
        assert seg.shape == (1, 512, 512) and abs(reported - dice(seg[0] > 0, truth)) < 5e-4
        assert (out / f"{case}_overlay.png").stat().st_size > 0
    # an existing demo folder is not overwritten silently
    assert main(["demo", "--out", str(out), "--warmup", "1", "--epochs", "1"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_openmp_waiting_is_set_before_torch_unless_the_user_chose(tmp_path):
    """The command line sets a short OpenMP spin, then sleep (openmp.py), in a fresh process before torch is
    imported; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is left alone."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import os, sys\nfrom PromiseSegmentLib.cli import main as cli\nassert 'torch' not in sys.modules\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    )
    root = Path(__file__).resolve().parents[2] / "PromiseSegment"
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base["PYTHONPATH"] = str(root)

    def run(**env):
        out = subprocess.run(
            [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, cwd=tmp_path, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.split()[-2:]

    assert run() == ["PASSIVE", "1000"]
    assert run(OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "None"]
    assert run(GOMP_SPINCOUNT="5") == ["None", "5"]


@pytest.mark.parametrize("bug", [ValueError("shapes do not match"), TypeError("bad call"), KeyError("x")])
def test_a_bug_is_an_internal_error_not_the_users_mistake(tmp_path, sample_nrrd, capsys, monkeypatch, bug):
    """Only the project's errors and the system's file errors are the user's; a ValueError from inside the
    code is a bug: exit 1, "internal error", one line."""
    import PromiseSegmentLib.cli.main as cli_main

    def broken(args):
        raise bug

    monkeypatch.setattr(cli_main, "_run", broken)
    rc = main(["segment", str(sample_nrrd), "-o", str(tmp_path / "out.seg.nrrd"), "--point", "16,16,1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "internal error" in err[0] and type(bug).__name__ in err[0]


@pytest.mark.parametrize("command", ["train", "segment", "evaluate", "demo", "checkpoints"])
def test_every_option_says_what_it_does(command):
    """``--help`` is the reference a user has: no option without a help text."""
    from PromiseSegmentLib.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    silent = [a.option_strings[0] for a in sub._actions if a.option_strings and a.dest != "help" and not a.help]
    assert not silent, f"{command}: options without help: {silent}"


def test_train_help_names_the_auto_recipes_values():
    """The help's "(auto: X)" is what the auto recipe uses on a large data set (it once said 128 for a 64)."""
    import re

    from PromiseSegmentLib.cli.main import build_parser
    from PromiseSegmentLib.training.recipe import recipe_config

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    auto = recipe_config("auto", 700)
    fields = {"--apm-width": "apm_fusion_dim", "--apm-tap-pool": "apm_tap_pool", "--user-box-share": "user_box_share"}
    helps = {a.option_strings[0]: a.help for a in sub._actions if a.option_strings}
    for option, field in fields.items():
        named = re.search(r"\(auto: ([0-9.e-]+)\)", helps[option])
        assert named and float(named.group(1)) == float(getattr(auto, field)), option
    assert f"auto {auto.lr:g}" in helps["--lr"]

"""Volume geometry on hostile inputs: DICOM series with missing/uneven/tilted/mixed slices, NIfTI headers ITK
would misread, NRRD edge cases. The rule: a read lands every voxel at its real world position, or is refused
with one clear line (never a silently wrong geometry)."""

import logging
import struct

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_files import START, UID, write_series

from PromiseSegmentLib.data.volume_io import Segment, read_labelmap, read_volume, write_segmentation
from PromiseSegmentLib.errors import InputError

LPS = np.diag([-1.0, -1.0, 1.0])  # LPS <-> RAS (its own inverse)
UNEVEN = [0, 2, 4, 5, 9, 10, 16, 17, 18, 30]


# ------------------------------------------------------------------------------------------------ writers
def rotated_iop(degrees):
    """Axial rows, columns tilted by ``degrees`` about the row (x) axis."""
    t = np.radians(degrees)
    return (1.0, 0, 0, 0, np.cos(t), -np.sin(t))


def patch(path, old: bytes, new: bytes):
    """Replace one byte string in a written file by one of the same length (what the writer refuses)."""
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1, (old, data.count(old))
    path.write_bytes(data.replace(old, new))


def drop_tag(path, tag: bytes):
    """Remove one element from a written file (GDCM writes implicit VR: tag, 4-byte length, value); setting
    it empty instead makes GDCM write garbage."""
    data = path.read_bytes()
    assert data.count(tag) == 1
    at = data.index(tag)
    path.write_bytes(data[:at] + data[at + 8 + struct.unpack_from("<I", data, at + 4)[0] :])


IPP = b"\x20\x00\x32\x00"  # (0020,0032) ImagePositionPatient


def voxel_of(vol, lps_point):
    """Continuous (i, j, k) of a world (LPS) point in the volume's grid."""
    return (np.linalg.inv(vol.ijk_to_ras) @ np.append(LPS @ np.asarray(lps_point, float), 1.0))[:3]


def assert_slices_at_real_positions(vol, slices, exact=True):
    """Every written slice's first voxel is a voxel of ``vol`` at the same world position, with its pixels."""
    for s in slices:
        i, j, k = voxel_of(vol, s["position"])
        assert abs(i) < 1e-3 and abs(j) < 1e-3, (s["file"].name, i, j)
        if exact:
            assert abs(k - round(k)) < 1e-3, (s["file"].name, k)
            np.testing.assert_array_equal(vol.array[round(k)], s["array"], err_msg=s["file"].name)
        else:
            assert -0.5 <= k <= vol.array.shape[0] - 0.5, (s["file"].name, k)


def old_itk_read(folder):
    """What read_volume returned before: ITK's series reader (array, IJK->RAS)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    return sitk.GetArrayFromImage(image), itk_geometry(image)


def itk_geometry(image):
    m = np.eye(4)
    m[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * image.GetSpacing()
    m[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ m


def assert_refused(path, *phrases):
    with pytest.raises(InputError) as info:
        read_volume(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


def geometry_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------------------- the main defect
def test_uneven_series_is_resampled_at_the_real_slice_positions(tmp_path, caplog):
    def marker(n, s):
        if n == UNEVEN.index(16):
            s["array"][3, 2] = 3000

    slices = write_series(tmp_path / "uneven", UNEVEN, edit=marker)
    caplog.set_level(logging.WARNING)
    vol = read_volume(tmp_path / "uneven")
    assert_slices_at_real_positions(vol, slices)  # each real slice lies on the grid, unchanged
    k, j, i = np.unravel_index(np.argmax(vol.array), vol.array.shape)
    world = vol.ijk_to_ras @ [i, j, k, 1.0]
    real = LPS @ (START + [2 * 0.7, 3 * 0.9, 16])
    assert np.all(np.abs(world[:3] - real) <= 0.5 * np.array([0.7, 0.9, 1.0])), (world, real)
    np.testing.assert_allclose(np.linalg.norm(vol.ijk_to_ras[:3, :3], axis=0), [0.7, 0.9, 1.0], atol=1e-9)
    assert vol.array.shape[0] == 31  # z = 0..30 at the smallest real step, 1 mm
    between = vol.array[round(voxel_of(vol, START + [0, 0, 6])[2])]  # 1/4 of the way from z=5 to z=9
    assert np.all(between == 425)
    (message,) = geometry_warnings(caplog)
    assert "not evenly spaced" in message and "resampled" in message and "uneven" in message


def test_a_missing_slice_is_filled_in_between_its_neighbours(tmp_path, caplog):
    zs = [0, 2.5, 5, 7.5, 12.5, 15]  # the slice at z=10 is missing
    slices = write_series(tmp_path / "gap", zs)
    caplog.set_level(logging.WARNING)
    vol = read_volume(tmp_path / "gap")
    assert vol.array.shape[0] == 7
    assert_slices_at_real_positions(vol, slices)
    assert np.all(vol.array[4] == 450)  # halfway between 400 (z=7.5) and 500 (z=12.5)
    (message,) = geometry_warnings(caplog)
    assert "gaps 2.5-5.0 mm" in message and "7 slices 2.5 mm apart" in message


def test_a_regular_series_reads_exactly_as_before(tmp_path, caplog, capfd):
    slices = write_series(tmp_path / "regular", [0, 2, 4, 6, 8], iop=rotated_iop(20))
    array, geometry = old_itk_read(tmp_path / "regular")
    capfd.readouterr()
    caplog.set_level(logging.DEBUG)
    vol = read_volume(tmp_path / "regular")
    np.testing.assert_array_equal(vol.array, array)
    assert vol.array.dtype == array.dtype
    np.testing.assert_allclose(vol.ijk_to_ras, geometry, atol=1e-9)
    assert_slices_at_real_positions(vol, slices)
    assert not geometry_warnings(caplog) and not capfd.readouterr().err


def test_gantry_tilt_is_refused(tmp_path):
    def table_motion(n, s):  # tilted slices, positions straight along the table (z), as a tilted gantry makes
        s["position"] = START + [0, 0, 2.0 * n]

    write_series(tmp_path / "tilt", range(5), iop=rotated_iop(15), edit=table_motion)
    assert_refused(tmp_path / "tilt", "not along the slice normal", "gantry tilt of about 15")


def test_mixed_orientations_are_refused(tmp_path):
    def turn(n, s):
        if n == 2:
            s["iop"] = rotated_iop(30)

    write_series(tmp_path / "mixed", [0, 2, 4, 6], edit=turn)
    assert_refused(tmp_path / "mixed", "different orientations", "s002.dcm")


def test_command_line_refuses_before_loading_a_model(tmp_path, capsys, monkeypatch):
    from PromiseSegmentLib.cli.main import main
    from PromiseSegmentLib.model import promise

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for an input that must be refused")

    monkeypatch.setattr(promise, "load_model", no_model)
    write_series(tmp_path / "dup", [0, 2, 2, 4])
    out = tmp_path / "out.seg.nrrd"
    assert (
        main(["segment", str(tmp_path / "dup"), "-o", str(out), "--backbone", "tiny_random", "--box", "1,1,0,4,4,0"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "same position" in err[0] and not out.exists(), err


def test_command_line_writes_an_uneven_series_at_its_real_positions(tmp_path, capsys):
    from PromiseSegmentLib.cli.main import main

    slices = write_series(tmp_path / "uneven", UNEVEN, shape=(32, 32))
    out = tmp_path / "out.seg.nrrd"
    assert (
        main(
            [
                "segment",
                str(tmp_path / "uneven"),
                "-o",
                str(out),
                "--backbone",
                "tiny_random",
                "--device",
                "cpu",
                "--box",
                "4,4,16,20,20,16",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resampled" in err[0], err
    seg = read_labelmap(out)
    assert seg.array.shape == (31, 32, 32)
    assert np.flatnonzero(seg.array.any(axis=(1, 2))).tolist() == [16]  # the prompted slice: z = 16 mm
    assert voxel_of(seg, START + [0, 0, 16])[2] == pytest.approx(16)
    for s in slices:  # the written grid has a slice at every real slice position
        i, j, k = voxel_of(seg, s["position"])
        assert abs(i) < 1e-4 and abs(j) < 1e-4 and abs(k - round(k)) < 1e-4


# ---------------------------------------------------------------------------------------- hostile cases
def dicom_duplicates(tmp_path):
    write_series(tmp_path / "d", [0, 2, 2, 4])
    return tmp_path / "d", ("2 slices at the same position", "s001.dcm", "s002.dcm")


def dicom_reversed_order(tmp_path):  # files and instance numbers from the top down
    def top_down(n, s):
        s["tags"]["0020|0013"] = str(10 - n)

    slices = write_series(tmp_path / "d", [8, 6, 4, 2, 0], iop=rotated_iop(-25), edit=top_down)
    return tmp_path / "d", lambda vol, caplog: assert_slices_at_real_positions(vol, slices)


def dicom_pixel_spacing_differs(tmp_path):
    def finer(n, s):
        if n == 1:
            s["spacing"] = (0.5, 0.5)

    write_series(tmp_path / "d", [0, 2, 4], edit=finer)
    return tmp_path / "d", ("different pixel spacings", "s001.dcm")


def dicom_size_differs(tmp_path):
    def smaller(n, s):
        if n == 2:
            s["array"] = s["array"][:4]

    write_series(tmp_path / "d", [0, 2, 4], edit=smaller)
    return tmp_path / "d", ("different sizes", "s002.dcm")


def dicom_non_square_pixels(tmp_path):
    slices = write_series(tmp_path / "d", [0, 3, 6], spacing=(0.5, 0.9))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(slices[0]["file"]))
    reader.ReadImageInformation()
    assert [float(v) for v in reader.GetMetaData("0028|0030").split("\\")] == [0.9, 0.5]  # rows\columns

    def check(vol, caplog):
        np.testing.assert_allclose(np.linalg.norm(vol.ijk_to_ras[:3, :3], axis=0), [0.5, 0.9, 3.0])
        assert_slices_at_real_positions(vol, slices)

    return tmp_path / "d", check


def dicom_rgb(tmp_path):
    def colour(n, s):
        s["array"] = np.stack(
            [np.full((8, 6), 10 * n, np.uint8), np.full((8, 6), 200, np.uint8), np.full((8, 6), 7, np.uint8)], axis=-1
        )

    slices = write_series(tmp_path / "d", [0, 2, 6], edit=colour)  # a missing slice too

    def check(vol, caplog):
        assert vol.array.shape == (4, 8, 6, 3) and vol.array.dtype == np.uint8
        assert_slices_at_real_positions(vol, slices)
        assert np.all(vol.array[2] == [15, 200, 7])

    return tmp_path / "d", check


def dicom_two_series(tmp_path):
    write_series(tmp_path / "d", [0, 2, 4])
    write_series(tmp_path / "d", [0, 2, 4], uid=UID + ".2", prefix="t")
    return tmp_path / "d", ("holds 2 DICOM series", UID + ".2")


def dicom_one_slice(tmp_path):
    slices = write_series(tmp_path / "d", [7.5], iop=rotated_iop(10))
    return tmp_path / "d", lambda vol, caplog: assert_slices_at_real_positions(vol, slices)


def dicom_rescale_per_slice(tmp_path):
    def rescaled(n, s):
        if n == 1:
            s["array"][:] = 202
            s["tags"].update({"0028|1053": "2", "0028|1052": "-1000"})

    slices = write_series(tmp_path / "d", [0, 2, 4], edit=rescaled)  # stored (202 + 1000) / 2 = 601
    tag = b"\x28\x00\x53\x10\x02\x00\x00\x00"
    patch(slices[1]["file"], tag + b"2 ", tag + b".5")  # now 601 * 0.5 - 1000 = -699.5

    def check(vol, caplog):
        np.testing.assert_array_equal(vol.array[:, 0, 0], [100, -699.5, 300])

    return tmp_path / "d", check


def dicom_localizer_in_series(tmp_path):
    write_series(tmp_path / "d", [0, 2, 4, 6])
    write_series(tmp_path / "d", [0], iop=(1.0, 0, 0, 0, 0, -1.0), shape=(16, 16), prefix="loc")
    return tmp_path / "d", ("loc000.dcm",)


def dicom_no_positions(tmp_path):
    for s in write_series(tmp_path / "d", [0, 2, 4]):
        drop_tag(s["file"], IPP)
    return tmp_path / "d", ("no ImagePositionPatient",)


def dicom_one_position_missing(tmp_path):
    drop_tag(write_series(tmp_path / "d", [0, 2, 4])[1]["file"], IPP)
    return tmp_path / "d", ("no ImagePositionPatient", "s001.dcm")


def dicom_no_pixel_spacing(tmp_path):  # GDCM would say 1 mm
    for s in write_series(tmp_path / "d", [0, 2, 4]):
        drop_tag(s["file"], b"\x28\x00\x30\x00")
    return tmp_path / "d", ("s000.dcm has no PixelSpacing",)


def dicom_thickness_disagrees(tmp_path):  # SliceThickness / SpacingBetweenSlices are not the positions
    def thick(n, s):
        s["tags"].update({"0018|0050": "5", "0018|0088": "5"})

    slices = write_series(tmp_path / "d", [0, 2, 4, 6], edit=thick)
    return tmp_path / "d", lambda vol, caplog: assert_slices_at_real_positions(vol, slices)


def dicom_rounding_jitter(tmp_path):  # positions rounded by the scanner: regular, silently
    slices = write_series(tmp_path / "d", [0, 2.003, 3.997, 6.002, 8])

    def check(vol, caplog):
        assert not geometry_warnings(caplog) and vol.array.shape[0] == 5
        assert np.linalg.norm(vol.ijk_to_ras[:3, 2]) == pytest.approx(2.0)
        assert_slices_at_real_positions(vol, slices, exact=False)

    return tmp_path / "d", check


def dicom_oblique_missing_slice(tmp_path):
    slices = write_series(tmp_path / "d", [0, 1.5, 3, 6, 7.5], iop=rotated_iop(35))

    def check(vol, caplog):
        assert vol.array.shape[0] == 6 and len(geometry_warnings(caplog)) == 1
        assert_slices_at_real_positions(vol, slices)

    return tmp_path / "d", check


def dicom_other_files_in_folder(tmp_path):
    slices = write_series(tmp_path / "d", [0, 2, 4])
    (tmp_path / "d" / "notes.txt").write_text("not an image\n")
    sitk.WriteImage(sitk.Image(4, 4, sitk.sitkUInt8), str(tmp_path / "d" / "preview.png"))
    return tmp_path / "d", lambda vol, caplog: assert_slices_at_real_positions(vol, slices)


def dicom_very_uneven(tmp_path):  # a 0.1 mm step among 10 mm ones: the grid stays bounded, positions right
    slices = write_series(tmp_path / "d", [0, 0.1, 10, 20, 30])

    def check(vol, caplog):
        assert vol.array.shape[0] <= 4 * 5
        assert_slices_at_real_positions(vol, slices, exact=False)
        np.testing.assert_allclose(
            vol.ijk_to_ras @ [0, 0, vol.array.shape[0] - 1, 1], np.append(LPS @ slices[-1]["position"], 1), atol=1e-9
        )

    return tmp_path / "d", check


def dicom_sheared_orientation(tmp_path):  # ImageOrientationPatient that GDCM silently replaces by identity
    slices = write_series(tmp_path / "d", [0, 2, 4])
    for s in slices:
        patch(s["file"], b"1\\0\\0\\0\\1\\0 ", b"1\\0\\0\\.3\\1\\0")
    return tmp_path / "d", ("ImageOrientationPatient", "not two perpendicular unit vectors")


def dicom_label_map(tmp_path):  # a label map is filled in with the nearest slice, never with a blend
    def labels(n, s):
        s["array"] = np.full((8, 6), [1, 2, 3, 10][n], np.int16)

    write_series(tmp_path / "d", [0, 2, 4, 10], edit=labels)  # a blend at z=6 would be 5.33: no such label

    def check(vol, caplog):
        assert read_labelmap(tmp_path / "d").array[:, 0, 0].tolist() == [1, 2, 3, 3, 10, 10]

    return tmp_path / "d", check


def write_nifti(path, qform_code=None, sform_code=None, srow=None):
    """An ITK-written NIfTI-1 whose qform/sform codes or sform rows are then overwritten."""
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(120, dtype=np.int16).reshape(4, 5, 6)), str(path))
    header = bytearray(path.read_bytes())
    if qform_code is not None:
        header[252:254] = struct.pack("<h", qform_code)
    if sform_code is not None:
        header[254:256] = struct.pack("<h", sform_code)
    if srow is not None:
        header[280:328] = struct.pack("<12f", *np.ravel(srow))
    path.write_bytes(bytes(header))
    return path


def nifti_shear(tmp_path):
    path = write_nifti(tmp_path / "shear.nii", sform_code=1, srow=[[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0]])
    return path, ("sform", "shear")


def nifti_scales_disagree(tmp_path):
    path = write_nifti(tmp_path / "scaled.nii", 0, 1, [[3, 0, 0, 5], [0, 1, 0, 0], [0, 0, 1, 0]])
    return path, ("sform", "voxel size")


def nifti_qform_sform_disagree(tmp_path):
    path = write_nifti(tmp_path / "two.nii", 1, 2, [[-1, 0, 0, 50], [0, -1, 0, 0], [0, 0, 1, 0]])  # qform + 50 mm
    return path, ("qform", "sform", "50")


def nifti_plain(tmp_path):
    path = write_nifti(tmp_path / "plain.nii")  # ITK's own file: the identity in LPS
    return path, lambda vol, caplog: np.testing.assert_allclose(vol.ijk_to_ras, np.diag([-1, -1, 1, 1.0]))


def write_nrrd(path, fields):
    data = np.arange(120, dtype=np.int16)
    path.write_bytes(
        (
            "NRRD0004\ntype: short\ndimension: 3\nsizes: 6 5 4\nencoding: raw\nendian: little\n" + fields + "\n\n"
        ).encode()
        + data.tobytes()
    )
    return path


def nrrd_zero_direction(tmp_path):
    path = write_nrrd(
        tmp_path / "z.nrrd",
        "space: left-posterior-superior\nspace directions: (1,0,0) (0,0,0) (0,0,1)\nspace origin: (0,0,0)",
    )
    return path, ("Zero-valued spacing",)


def nrrd_collinear_directions(tmp_path):
    path = write_nrrd(
        tmp_path / "c.nrrd",
        "space: left-posterior-superior\nspace directions: (1,0,0) (2,0,0) (0,0,1)\nspace origin: (0,0,0)",
    )
    return path, ("determinant is 0",)


def seg_round_trip(tmp_path, expected):
    def check(vol, caplog):
        np.testing.assert_allclose(vol.ijk_to_ras, expected, atol=1e-9)
        out = write_segmentation(
            tmp_path / "o.seg.nrrd", (vol.array > 60).astype(np.uint8), vol.ijk_to_ras, [Segment("x")]
        )
        np.testing.assert_allclose(read_labelmap(out).ijk_to_ras, expected, atol=1e-9)

    return check


def nrrd_negative_spacing(tmp_path):  # axis i runs towards -x (LPS): +x in RAS
    path = write_nrrd(tmp_path / "n.nrrd", "spacings: -2 1 1")
    return path, seg_round_trip(tmp_path, np.diag([2.0, -1, 1, 1]))


def nrrd_sheared_directions(tmp_path):  # a sheared grid is representable: carried exactly, also when written
    path = write_nrrd(
        tmp_path / "s.nrrd",
        "space: left-posterior-superior\nspace directions: (1,0,0) (0.5,1,0) (0,0,1)\nspace origin: (3,4,5)",
    )
    expected = np.array([[-1, -0.5, 0, -3], [0, -1, 0, -4], [0, 0, 1, 5], [0, 0, 0, 1.0]])
    return path, seg_round_trip(tmp_path, expected)


HOSTILE = [
    dicom_duplicates,
    dicom_reversed_order,
    dicom_pixel_spacing_differs,
    dicom_size_differs,
    dicom_non_square_pixels,
    dicom_rgb,
    dicom_two_series,
    dicom_one_slice,
    dicom_rescale_per_slice,
    dicom_localizer_in_series,
    dicom_no_positions,
    dicom_one_position_missing,
    dicom_no_pixel_spacing,
    dicom_thickness_disagrees,
    dicom_rounding_jitter,
    dicom_oblique_missing_slice,
    dicom_other_files_in_folder,
    dicom_very_uneven,
    dicom_sheared_orientation,
    dicom_label_map,
    nifti_shear,
    nifti_scales_disagree,
    nifti_qform_sform_disagree,
    nifti_plain,
    nrrd_zero_direction,
    nrrd_collinear_directions,
    nrrd_negative_spacing,
    nrrd_sheared_directions,
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c.__name__ for c in HOSTILE])
def test_hostile_input_is_read_right_or_refused(case, tmp_path, caplog, capfd):
    """Each case returns (path, expectation): phrases the refusal must contain, or a check of the volume."""
    path, expected = case(tmp_path)
    caplog.set_level(logging.WARNING)
    if callable(expected):
        expected(read_volume(path), caplog)
        assert "Non uniform sampling" not in capfd.readouterr().err  # ITK's raw warning never reaches users
    else:
        assert_refused(path, *expected)

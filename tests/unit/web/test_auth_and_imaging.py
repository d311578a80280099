"""Pure parts of the web layer: credentials and signed values; SR boxes and SEG overlays drawn."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from PIL import Image

from node.web.auth import AuthConfig, WebConfigError
from node.web.imaging import (
    BOX_COLOUR,
    KeyImage,
    ResultFile,
    plan_job_images,
    read_sr_boxes,
    render_key_image,
)


def _settings(**values: object) -> SimpleNamespace:
    base: dict[str, object] = {"web_host": "127.0.0.1", "web_admin_user": "admin",
                               "web_admin_password": "pw", "web_secret_key": None}
    base.update(values)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("secret", [None, "", "change-me", "secret"])
def test_refuses_a_missing_or_default_secret_off_loopback(secret: str | None) -> None:
    with pytest.raises(WebConfigError, match="web_secret_key"):
        AuthConfig.from_settings(_settings(web_host="0.0.0.0", web_secret_key=secret))


def test_loopback_without_secret_gets_an_ephemeral_one() -> None:
    for host in ("127.0.0.1", "localhost", "::1"):
        config = AuthConfig.from_settings(_settings(web_host=host))
        assert config.secret_is_ephemeral and len(config.secret_key) >= 32
    assert not AuthConfig.from_settings(_settings(web_host="10.0.0.5", web_secret_key="x" * 40)).secret_is_ephemeral
    with pytest.raises(WebConfigError, match="web_admin_password"):
        AuthConfig.from_settings(_settings(web_admin_password=None))


def test_sessions_and_csrf_tokens_are_signed_and_expire() -> None:
    config = AuthConfig.from_settings(_settings(web_secret_key="k" * 40))
    other = AuthConfig.from_settings(_settings(web_secret_key="j" * 40))
    cookie = config.make_session("admin", now=1000.0)
    assert config.read_session(cookie, now=1001.0) == "admin"
    assert config.read_session(cookie, now=1000.0 + 13 * 3600) is None  # expired
    assert other.read_session(cookie, now=1001.0) is None  # another key
    assert config.read_session(cookie.replace(".", "x", 1), now=1001.0) is None
    assert config.read_session(config.make_session("mallory", now=1000.0), now=1001.0) is None
    assert config.check_csrf("cookie", config.csrf_token("cookie"))
    assert not config.check_csrf("cookie", other.csrf_token("cookie"))
    assert not config.check_csrf(None, config.csrf_token("cookie"))
    assert config.check_password("admin", "pw") and not config.check_password("admin", "pW")
    nobody = AuthConfig.from_settings(_settings(web_admin_user=None, web_admin_password=None))
    assert not nobody.login_enabled and not nobody.check_password("", "")


def test_sr_region_boxes_are_read_and_drawn(tmp_path: Path, shared_dicom: Path) -> None:
    """A TID 1500 region report (the SR the VLM tasks write) gives labelled boxes on its frame."""
    from dicom_io.equipment import AlgorithmInfo
    from dicom_io.regions import ImageRegion, build_region_report

    source_path = sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))[1]
    source = pydicom.dcmread(source_path)
    if not source.get("SpecificCharacterSet"):
        source.SpecificCharacterSet = "ISO_IR 100"
    rows, columns = int(source.Rows), int(source.Columns)
    box = (columns * 0.25, rows * 0.3, columns * 0.6, rows * 0.7)
    sr = build_region_report(
        [source],
        [ImageRegion(sop_instance_uid=source.SOPInstanceUID, frame_number=None, box_xyxy=box,
                     finding="nodule", finding_site="right lung", probability=0.87)],
        [],
        series_instance_uid="1.2.826.0.1.3680043.8.498.1", sop_instance_uid="1.2.826.0.1.3680043.8.498.2",
        series_number=9903, algorithm=AlgorithmInfo(name="tiny", version="1", family="test"),
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    [found] = read_sr_boxes(path)
    assert found.sop_instance_uid == source.SOPInstanceUID and found.frame == 1
    assert found.points[0] == pytest.approx((box[0], box[1]))
    assert "nodule" in found.label.lower() and "0.87" in found.label
    plan = plan_job_images([ResultFile("sr", str(sr.SOPClassUID), path)], fallback=[])
    [key] = plan.images
    assert key.boxes == [found]
    pixels = np.asarray(Image.open(BytesIO(render_key_image(source, key, {}))).convert("RGB"))
    red = (pixels == np.array(BOX_COLOUR)).all(axis=2)
    scale = pixels.shape[1] // columns
    # the bottom edge of the box runs from x0 to x1 (the label is drawn above the box)
    bottom = red[round(box[3] * scale) - 1: round(box[3] * scale) + 2].any(axis=0)
    xs = np.nonzero(bottom)[0]
    assert abs(xs.min() / scale - box[0]) < 3 and abs(xs.max() / scale - box[2]) < 3
    left = red[:, round(box[0] * scale) - 1: round(box[0] * scale) + 2].any(axis=1)
    ys = np.nonzero(left)[0]
    assert abs(ys.max() / scale - box[3]) < 3


def test_overlay_fills_only_the_mask(shared_dicom: Path) -> None:
    source = pydicom.dcmread(min((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm")))
    mask = np.zeros((int(source.Rows), int(source.Columns)), dtype=bool)
    mask[10:30, 40:90] = True
    png = render_key_image(source, KeyImage(source.SOPInstanceUID, 1, masks={1: mask}), {1: "Liver"})
    pixels = np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(int)
    scale = pixels.shape[0] // mask.shape[0]
    grey = (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])
    inside = grey[20 * scale, 60 * scale]
    outside = grey[200 * scale, 200 * scale]
    assert not inside and outside

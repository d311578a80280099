"""Proof in a real viewer: what mednode writes, as OHIF 3.13 shows it.

Studies go PACS (Orthanc) → ``mednode serve`` → results → back into Orthanc, once per module: a
real CT (the built-in CT analyzer's SEG and TID 1500 SR, plus the tiny trained Gemma 3's
``ground "right lung"`` box on each slice) and two radiographs (report en/zh, and the trained
model's box). Then the real OHIF viewer (npm ``@ohif/app``, served with a same-origin proxy to
Orthanc's DICOMweb) runs in headless Chromium and each test looks at what a radiologist would see.
Geometry is checked against the objects read back from Orthanc, projected through the live
viewport's canvas → world transform and the source images' own geometry (see
:mod:`tests.viewer.geometry`). Screenshots go to ``docs/viewer/`` (docs/VIEWER.md shows them).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset

from dicom_io.equipment import AlgorithmInfo
from dicom_io.narrative_report import build_narrative_report
from dicom_io.uids import derived_uid
from tests.integration.conftest import REPO_ROOT, MednodeNode
from tests.integration.e2e import poll
from tests.peers import LOOPBACK, ManagedProcess, Orthanc, free_port, require_tool
from tests.shared_data import SHARED_DICOM
from tests.trained_models import tiny_grounding_model_dir  # noqa: F401  (session fixture)
from tests.viewer.browser import VIEWPORT_SIZE, OhifPage, ViewportState
from tests.viewer.fixtures import chromium, ohif_server  # noqa: F401  (session fixtures)
from tests.viewer.geometry import ImageGeometry, agreement, coloured, image_footprint, project_mask
from tests.viewer.ohif import OhifServer

SCREENSHOTS = REPO_ROOT / "docs" / "viewer"
SHARED = SHARED_DICOM
CT_FILES = sorted((SHARED / "ct" / "dcmqi_ct3slice").glob("*.dcm"))
DX_FILE = SHARED / "xr" / "highdicom_dx_thorax.dcm"  # uncompressed, valid Pixel Spacing
CR_FILE = SHARED / "xr" / "RG1_J2KI_chest_PA.dcm"  # Pixel Spacing 0\0: OHIF cannot show it
GROUND = {"ground": {"phrases": ["right lung"]}}
RULES = [
    {"name": "ct", "match": {"modality": ["CT"]}, "tasks": ["ct_analysis", GROUND], "destinations": ["default"]},
    {"name": "xr", "match": {"modality": ["CR", "DX"]},
     "tasks": [{"report": {"language": "en"}}, {"report": {"language": "zh"}}, GROUND],
     "destinations": ["default"]},
]
#: instances each study holds once the node is done: sources + SEG + 2 SR (CT), sources + 3 SR (XR)
EXPECTED_COUNTS = {"ct": 6, "dx": 4, "cr": 4}
CJK_FINDINGS = "双肺纹理清晰，未见实变或胸腔积液。心影大小正常。"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
YELLOW_MIN_RG, YELLOW_MAX_B = 170, 120


@dataclass
class Study:
    uid: str
    sources: dict[str, Dataset]  # SOP Instance UID → source image (with pixels)
    results: list[Dataset] = field(default_factory=list)  # what mednode wrote, read back from Orthanc

    def series(self, description: str) -> list[Dataset]:
        return [ds for ds in self.results if ds.get("SeriesDescription") == description]


@dataclass
class Processed:
    orthanc: Orthanc
    node: MednodeNode
    studies: dict[str, Study]


def _read_study(orthanc: Orthanc, study_uid: str) -> Study:
    study = Study(study_uid, {})
    for row in orthanc.study_instances(study_uid):
        ds = pydicom.dcmread(BytesIO(orthanc.instance_file(row["ID"])))
        if ds.Modality in ("SR", "SEG"):
            study.results.append(ds)
        else:
            study.sources[str(ds.SOPInstanceUID)] = ds
    return study


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory, tiny_grounding_model_dir: Path,  # noqa: F811
              ohif_server: OhifServer) -> Iterator[Processed]:  # noqa: F811
    """One Orthanc and one node for the module; the three studies pushed and their results back."""
    require_tool("Orthanc")
    missing = [str(p) for p in (*CT_FILES, DX_FILE, CR_FILE) if not p.is_file()]
    if missing or len(CT_FILES) != 3:
        pytest.fail(f"sample DICOM missing under {SHARED}: {missing or 'ct/dcmqi_ct3slice'}")
    work = tmp_path_factory.mktemp("viewer")
    orthanc = Orthanc(work / "orthanc").start()
    config = {"models": {"vlm": {"path": str(tiny_grounding_model_dir), "family": "medgemma",
                                 "max_new_tokens": 48, "slices_per_series": 3, "device": "cpu"}},
              "rules": RULES}
    (work / "mednode.yaml").write_text(yaml.safe_dump(config))
    dicom_port, web_port = free_port(), free_port()
    node = MednodeNode(dicom_port=dicom_port, web_port=web_port, data_dir=work, env={
        "MEDNODE_DICOM_HOST": LOOPBACK, "MEDNODE_DICOM_PORT": str(dicom_port), "MEDNODE_WEB_PORT": str(web_port),
        "MEDNODE_DATA_DIR": str(work / "var"), "MEDNODE_QUIET_PERIOD_S": "2",
        "MEDNODE_COMPLETION_POLL_S": "0.2", "MEDNODE_DESTINATION": f"ORTHANC@{LOOPBACK}:{orthanc.dicom_port}",
    })
    serve = ManagedProcess([sys.executable, "-m", "node.cli", "serve", "--config", str(work / "mednode.yaml")],
                           log_dir=work, name="serve", env=node.env, cwd=REPO_ROOT)
    node.processes.append(serve)
    try:
        serve.start(port=node.dicom_port, timeout_s=90)
        orthanc.add_modality("mednode", node.ae_title, node.dicom_port)
        uids = {}
        for key, files in {"ct": CT_FILES, "dx": [DX_FILE], "cr": [CR_FILE]}.items():
            answers = [orthanc.upload(f) for f in files]
            uids[key] = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            orthanc.store_to_modality("mednode", answers[0]["ParentStudy"])
        for key, uid in uids.items():
            orthanc.wait_for(lambda u=uid, k=key: len(orthanc.study_instances(u)) >= EXPECTED_COUNTS[k],
                             timeout_s=600, interval_s=1.0, what=f"mednode's results in the {key} study")
        poll(lambda: node.status()["jobs"]["delivered"] == 3, 120, what="three jobs delivered")
        ohif_server.point_at(orthanc.base_url)
        yield Processed(orthanc, node, {k: _read_study(orthanc, u) for k, u in uids.items()})
    finally:
        node.stop()
        orthanc.stop()


@pytest.fixture
def ohif(chromium, ohif_server: OhifServer) -> Iterator[OhifPage]:  # noqa: F811
    context = chromium.new_context(viewport=VIEWPORT_SIZE, device_scale_factor=1)
    page = OhifPage(context.new_page(), ohif_server.url)
    try:
        yield page
    finally:
        context.close()


def _text_of(ds: Dataset) -> list[str]:
    out: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                out.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out


def _language(ds: Dataset) -> str:
    for item in ds.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "121049":
            return str(item.ConceptCodeSequence[0].CodeValue)
    raise AssertionError(f"SR {ds.SOPInstanceUID} has no language content item")


def _squash(text: str) -> str:
    return " ".join(text.split())


# -- the study list ----------------------------------------------------------------------------


def test_results_are_in_the_source_studies(processed: Processed, ohif: OhifPage) -> None:
    """OHIF's study list holds the three source studies and nothing else, each with its results."""
    ohif.page.goto(f"{ohif.base_url}/")
    text = _squash(ohif.wait_for("() => document.body.innerText.includes(' of 3') && document.body.innerText",
                                 "the study list"))
    assert "1-3 of 3" in text, text[:500]
    for modalities in ("CT\\SEG\\SR", "DX\\SR", "CR\\SR"):
        assert text.count(modalities) == 1, f"{modalities} listed {text.count(modalities)} times"
    studies = processed.orthanc.studies()
    assert sorted(s["MainDicomTags"]["StudyInstanceUID"] for s in studies) == sorted(
        s.uid for s in processed.studies.values())
    ohif.screenshot(SCREENSHOTS / "study-list.png")


# -- SEG ------------------------------------------------------------------------------------------


def test_seg_overlay_lands_on_the_written_mask(processed: Processed, ohif: OhifPage) -> None:
    """The CT analyzer's SEG: segments listed by label; on every slice, each segment's coloured
    pixels are exactly the mask mednode wrote for that slice (not a flipped or neighbouring one)."""
    study = processed.studies["ct"]
    (seg_ds,) = [ds for ds in study.results if ds.SOPClassUID == SEG_CLASS]
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    labels = [seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()]
    order = [ds.SOPInstanceUID for ds in sorted(
        study.sources.values(), key=lambda d: float(d.ImagePositionPatient[2]))]
    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=order, combine_segments=False)
    masks_by_uid = {uid: masks[i].astype(bool) for i, uid in enumerate(order)}

    ohif.open_study(study.uid)
    ohif.load_series(str(seg_ds.SeriesDescription))
    segments = ohif.segments()
    assert [s["label"] for s in segments] == labels
    panel = ohif.open_panel("segmentation")
    assert str(seg_ds.SeriesDescription) in panel
    listed = [line.strip() for line in panel.splitlines()]
    assert [label for label in listed if label in labels] == labels, panel
    ohif.screenshot(SCREENSHOTS / "ct-seg.png")

    state = ohif.viewport()
    assert state.count == len(order)
    for index in range(state.count):
        state = ohif.show_image(index)
        image = ImageGeometry.of(study.sources[state.sop_instance_uid])
        footprint = image_footprint(image, state.transform)
        ohif.show_only_segment(0)
        chrome = coloured(ohif.viewport_pixels(state))  # viewport UI drawn in colour (border, icons)
        for segment in segments:
            number = int(segment["index"])
            ohif.show_only_segment(number)
            drawn = coloured(ohif.viewport_pixels(state)) & ~chrome
            scores = {}
            for uid, mask in masks_by_uid.items():
                expected = project_mask(mask[..., number - 1], image, state.transform, plane_tolerance_mm=np.inf)
                scores[uid] = agreement(drawn, expected, footprint, tolerance_px=1)
            right = scores[state.sop_instance_uid]
            where = f"{segment['label']} on slice {index + 1} ({state.sop_instance_uid})"
            assert right.precision >= 0.98 and right.recall >= 0.98, f"{where}: {right}"
            flipped = agreement(drawn, project_mask(masks_by_uid[state.sop_instance_uid][::-1, :, number - 1],
                                                     image, state.transform), footprint, tolerance_px=1)
            assert min(flipped.precision, flipped.recall) < min(right.precision, right.recall) - 0.05, where
            if segment["label"] == "Lungs":  # the structure that changes most from slice to slice
                for uid, other in scores.items():
                    if uid != state.sop_instance_uid:
                        assert min(other.precision, other.recall) < min(right.precision, right.recall), (
                            f"{where} matches the mask of slice {uid} as well: {other} vs {right}")
        ohif.show_only_segment(None)


# -- TID 1500 boxes -------------------------------------------------------------------------------


def _boxes(sr_ds: Dataset) -> list[tuple[str, np.ndarray, str]]:
    """(source SOP Instance UID, 5x2 polyline in highdicom pixel coordinates, finding site)."""
    sr = hd.sr.srread(BytesIO(_bytes(sr_ds)))
    out = []
    for group in sr.content.get_planar_roi_measurement_groups():
        region = group.roi
        uid = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        sites = [site.value.meaning for site in group.finding_sites]
        out.append((str(uid), np.asarray(region.value, dtype=float), sites[0] if sites else ""))
    return out


def _bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _check_box_drawn(ohif: OhifPage, state: ViewportState, image: ImageGeometry, polyline: np.ndarray,
                     where: str) -> None:
    """The box's corners, mapped source pixel → world → canvas, are where OHIF's annotation is,
    and yellow pixels run along all four edges of the screenshot."""
    # SCOORD (0, 0) is the top-left corner of the top-left pixel; pixel centres are at +0.5
    corners = np.array([state.transform.world_to_canvas(image.pixel_to_world(x - 0.5, y - 0.5))
                        for x, y in polyline[:4]])
    canvas_per_pixel = image.column_spacing_mm / float(np.linalg.norm(state.transform.du))
    drawn = [a for a in ohif.annotations() if state.sop_instance_uid in a["imageId"] and len(a["points"]) >= 4]
    assert drawn, f"{where}: OHIF holds no annotation on the image"
    for annotation in drawn:
        points = np.array([state.transform.world_to_canvas(np.array(p)) for p in annotation["points"]])
        for axis, name in ((0, "x"), (1, "y")):
            for ours, theirs in ((corners[:, axis].min(), points[:, axis].min()),
                                 (corners[:, axis].max(), points[:, axis].max())):
                assert abs(ours - theirs) <= 0.25 * canvas_per_pixel, (
                    f"{where}: {annotation['tool']} edge {name}={theirs:.1f}, the SR says {ours:.1f} "
                    f"(canvas px; 1 source pixel = {canvas_per_pixel:.2f} canvas px)")
    rgb = ohif.viewport_pixels(state).astype(int)
    yellow = (rgb[..., 0] >= YELLOW_MIN_RG) & (rgb[..., 1] >= YELLOW_MIN_RG) & (rgb[..., 2] <= YELLOW_MAX_B)
    near = np.zeros_like(yellow)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            near |= np.roll(np.roll(yellow, dy, axis=0), dx, axis=1)
    x0, y0 = corners.min(axis=0)
    x1, y1 = corners.max(axis=0)
    edges = {"top": ((x0, y0), (x1, y0)), "bottom": ((x0, y1), (x1, y1)),
             "left": ((x0, y0), (x0, y1)), "right": ((x1, y0), (x1, y1))}
    for name, ((ax, ay), (bx, by)) in edges.items():
        t = np.linspace(0.05, 0.95, 60)
        xs, ys = np.rint(ax + t * (bx - ax)).astype(int), np.rint(ay + t * (by - ay)).astype(int)
        ok = (xs >= 0) & (xs < rgb.shape[1]) & (ys >= 0) & (ys < rgb.shape[0])
        hits = near[ys[ok], xs[ok]].mean() if ok.any() else 0.0
        assert hits >= 0.9, f"{where}: only {hits:.0%} of the {name} edge is drawn where the SR puts it"


@pytest.mark.parametrize("key", ["dx", "ct"])
def test_boxes_drawn_on_the_referenced_image_with_a_label(processed: Processed, ohif: OhifPage, key: str) -> None:
    """The trained model's "right lung" box (TID 1500 planar ROI): OHIF lists it with the finding
    and its site, and draws it on the image it references, where the SR says."""
    study = processed.studies[key]
    (sr_ds,) = study.series("mednode findings")
    boxes = _boxes(sr_ds)
    assert boxes and len(boxes) == len(study.sources), f"one box per image expected, got {len(boxes)}"

    ohif.open_study(study.uid)
    ohif.load_series("mednode findings")
    ohif.wait_for("() => cornerstoneTools.annotation.state.getAllAnnotations().some(a => a.metadata.toolName === 'RectangleROI')",
                  "the SR's boxes as measurements")
    panel = ohif.open_panel("measurements")
    assert f"Measurements ({len(boxes)})" in panel, panel
    for _, _, site in boxes:
        assert site and panel.lower().count(site.lower()) == len(boxes), (site, panel)
    assert panel.count("Finding") >= len(boxes), panel
    ohif.settle(1.0)
    ohif.screenshot(SCREENSHOTS / f"{key}-boxes.png")

    state = ohif.viewport()
    for index in range(state.count):
        state = ohif.show_image(index)
        mine = [(uid, line) for uid, line, _ in boxes if uid == state.sop_instance_uid]
        assert len(mine) == 1, f"image {state.sop_instance_uid}: {len(mine)} boxes in the SR"
        image = ImageGeometry.of(study.sources[state.sop_instance_uid])
        _check_box_drawn(ohif, state, image, mine[0][1], f"{key} image {index + 1}")


# -- narrative reports ----------------------------------------------------------------------------


def _open_series_by_number(ohif: OhifPage, series_number: int) -> None:
    entry = ohif.page.locator("div", has=ohif.page.locator('[data-cy="series-description-label"]')).filter(
        has_text=f"S:{series_number}").last
    entry.dblclick()


@pytest.mark.parametrize("language", ["en", "zh"])
def test_report_text_shown(processed: Processed, ohif: OhifPage, language: str) -> None:
    """The node's narrative report SR (model text, en and zh): OHIF shows its text and sections."""
    study = processed.studies["dx"]
    (report,) = [ds for ds in study.series("mednode report") if _language(ds) == language]
    texts = _text_of(report)
    assert texts
    ohif.open_study(study.uid)
    _open_series_by_number(ohif, int(report.SeriesNumber))
    shown = _squash(ohif.wait_for("() => document.body.innerText.includes('Diagnostic Imaging Report')"
                                  " && document.body.innerText", "the report's text"))
    assert "Findings" in shown
    for text in texts:
        assert _squash(text) in shown, f"{text!r} not shown"
    ohif.screenshot(SCREENSHOTS / f"report-{language}.png")


def test_chinese_report_text_shown(processed: Processed, ohif: OhifPage) -> None:
    """Chinese text (ISO_IR 192): the tiny test model writes no CJK characters, so the product's
    own report builder writes a Chinese report for the radiograph, it is stored in Orthanc next
    to the node's results, and OHIF must show the characters."""
    study = processed.studies["dx"]
    source = next(iter(study.sources.values()))
    algorithm = AlgorithmInfo(name="viewer-test", version="1")
    sr = build_narrative_report(
        [source], findings=CJK_FINDINGS, impression="未见急性病变。", language="zh",
        questions_answers=[("有胸腔积液吗？", "没有。")],
        series_instance_uid=derived_uid(study.uid, "viewer-zh", "series"),
        sop_instance_uid=derived_uid(study.uid, "viewer-zh", "sop"), series_number=9919, algorithm=algorithm)
    assert "ISO_IR 192" in str(sr.SpecificCharacterSet)
    path = Path(processed.node.data_dir) / "zh-report.dcm"
    sr.save_as(path, enforce_file_format=True)
    processed.orthanc.upload(path)
    try:
        ohif.open_study(study.uid)
        _open_series_by_number(ohif, 9919)
        shown = _squash(ohif.wait_for("() => document.body.innerText.includes('Diagnostic Imaging Report')"
                                      " && document.body.innerText", "the Chinese report's text"))
        for text in (CJK_FINDINGS, "未见急性病变。", "有胸腔积液吗？", "没有。"):
            assert text in shown, f"{text!r} not shown"
        ohif.screenshot(SCREENSHOTS / "report-zh-cjk.png")
    finally:
        processed.orthanc.request("DELETE", f"/instances/{_orthanc_id(processed.orthanc, str(sr.SOPInstanceUID))}")


def _orthanc_id(orthanc: Orthanc, sop_instance_uid: str) -> str:
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})
    return str(found[0])


# -- what OHIF cannot show --------------------------------------------------------------------------


def test_radiograph_with_pixel_spacing_zero_is_a_known_viewer_limit(processed: Processed, ohif: OhifPage) -> None:
    """A CR whose Pixel Spacing is 0\\0 (a real file): the node's SR is valid and listed, but OHIF
    cannot draw the image; the screenshot documents it (docs/VIEWER.md)."""
    study = processed.studies["cr"]
    (source,) = study.sources.values()
    assert [float(v) for v in source.PixelSpacing] == [0.0, 0.0]
    ohif.open_study(study.uid)
    ohif.load_series("mednode findings")
    panel = ohif.open_panel("measurements")
    assert "Measurements (1)" in panel and "right lung" in panel.lower(), panel
    ohif.settle(1.0)
    ohif.screenshot(SCREENSHOTS / "cr-pixel-spacing-0.png")
    log = processed.node.logs()
    assert "has Pixel Spacing" in log and source.SOPInstanceUID in log  # the node warned, by UID

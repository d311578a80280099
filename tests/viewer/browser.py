"""Driving OHIF in headless Chromium (Playwright for Python, Debian's ``/usr/bin/chromium``).

Never ``playwright install``: it downloads a browser, which fails offline; the Debian package is
launched through ``executable_path``. SwiftShader gives the software WebGL that cornerstone3D
needs on a machine without a GPU.

:class:`OhifPage` wraps what the tests do the way a user does it (open the study, dismiss the
tour, double-click a series in the study browser, open a side panel) and reads OHIF's live state
through the globals OHIF sets for debugging (``window.cornerstone``, ``window.services``).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from tests.viewer.geometry import ViewportTransform

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
]
VIEWPORT_SIZE = {"width": 1600, "height": 1000}
PANELS = {"segmentation": "panelSegmentation-btn", "measurements": "trackedMeasurements-btn"}

_VIEWPORT_JS = """() => {
  const engine = window.cornerstone && window.cornerstone.getRenderingEngines()[0];
  const vp = engine && engine.getViewports()[0];
  if (!vp || !vp.getCurrentImageId || !vp.getCurrentImageId()) return null;
  const r = vp.canvas.getBoundingClientRect();
  return {imageId: vp.getCurrentImageId(), index: vp.getCurrentImageIdIndex(),
          count: vp.getImageIds().length,
          c00: vp.canvasToWorld([0, 0]), c10: vp.canvasToWorld([1, 0]), c01: vp.canvasToWorld([0, 1]),
          rect: [r.x, r.y, r.width, r.height], dpr: window.devicePixelRatio};
}"""


class ViewerError(AssertionError):
    """OHIF did not reach the state a test waits for; the message says which."""


@dataclass(frozen=True)
class ViewportState:
    """What the (single) viewport shows now."""

    sop_instance_uid: str
    index: int
    count: int
    transform: ViewportTransform
    rect: tuple[int, int, int, int]  # x, y, width, height of the canvas in page pixels


class OhifPage:
    """One Playwright page on one OHIF study."""

    def __init__(self, page: Any, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"[:400]))

    # -- waiting -------------------------------------------------------------------------
    def wait_for(self, js: str, what: str, timeout_s: float = 60, arg: Any = None) -> Any:
        """Evaluate ``js`` until it returns something truthy and return that."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.page.evaluate(js, arg)
            if value:
                return value
            if time.monotonic() > deadline:
                errors = "\n".join(c for c in self.console if c.startswith("error"))[-3000:]
                raise ViewerError(f"OHIF: {what} not reached within {timeout_s:.0f} s; console errors:\n{errors}")
            time.sleep(0.25)

    def settle(self, seconds: float = 1.0) -> None:
        """Let the render loop draw (cornerstone renders on animation frames)."""
        self.page.wait_for_timeout(int(seconds * 1000))

    # -- user steps ----------------------------------------------------------------------
    def open_study(self, study_uid: str) -> None:
        """Open the basic viewer on ``study_uid`` and wait until the first image is drawn."""
        self.page.goto(f"{self.base_url}/viewer?StudyInstanceUIDs={study_uid}")
        self.wait_for(_VIEWPORT_JS, "first image in the viewport", timeout_s=120)
        skip = self.page.get_by_text("Skip all", exact=True)
        try:
            skip.click(timeout=10_000)  # the onboarding tour covers the study browser
        except Exception as exc:  # noqa: BLE001 - Playwright's TimeoutError; the tour is optional
            self.console.append(f"note: no onboarding tour to skip ({type(exc).__name__})")
        self.settle(0.5)

    def load_series(self, description: str, nth: int = 0, confirm: bool = True) -> None:
        """Double-click the ``nth`` study-browser entry whose description is ``description``;
        answer Yes when OHIF asks whether to open a segmentation."""
        entry = self.page.locator('[data-cy="series-description-label"]', has_text=description).nth(nth)
        entry.dblclick()
        if confirm:
            yes = self.page.get_by_role("button", name="Yes", exact=True)
            try:
                yes.click(timeout=5_000)
            except Exception as exc:  # noqa: BLE001 - only SEG asks; SR loads directly
                self.console.append(f"note: no confirmation asked for {description} ({type(exc).__name__})")

    def open_panel(self, name: str) -> str:
        """Open the right-hand ``segmentation`` or ``measurements`` panel and return its text."""
        self.page.locator(f'[data-cy="{PANELS[name]}"]').click()
        self.settle(1.0)
        return self.right_panel_text()

    def right_panel_text(self) -> str:
        panel = self.page.locator('[data-panel-id="viewerLayoutResizableRightPanel"]')
        return str(panel.inner_text()) if panel.count() else ""

    def body_text(self) -> str:
        return str(self.page.evaluate("() => document.body.innerText"))

    # -- viewport ------------------------------------------------------------------------
    def viewport(self) -> ViewportState:
        info = self.wait_for(_VIEWPORT_JS, "a viewport with an image")
        if info["dpr"] != 1:
            raise ViewerError(f"devicePixelRatio {info['dpr']}: the tests assume 1 canvas pixel = 1 screen pixel")
        x, y, w, h = (round(v) for v in info["rect"])
        uid = info["imageId"].split("/instances/")[1].split("/")[0]
        return ViewportState(uid, int(info["index"]), int(info["count"]),
                             ViewportTransform.from_samples(info["c00"], info["c10"], info["c01"], w, h),
                             (x, y, w, h))

    def show_image(self, index: int) -> ViewportState:
        """Scroll the viewport to image ``index`` of its stack and wait until it is drawn."""
        self.page.evaluate(
            "async (i) => { const vp = cornerstone.getRenderingEngines()[0].getViewports()[0];"
            " await vp.setImageIdIndex(i); vp.render(); }", index)
        self.wait_for("(i) => { const vp = cornerstone.getRenderingEngines()[0].getViewports()[0];"
                      " return vp.getCurrentImageIdIndex() === i; }", f"image {index} shown", arg=index)
        self.settle(1.0)
        return self.viewport()

    def viewport_pixels(self, state: ViewportState) -> NDArray[np.uint8]:
        """Screenshot of the viewport's canvas area as ``(height, width, 3)`` RGB."""
        x, y, w, h = state.rect
        png = self.page.screenshot(clip={"x": x, "y": y, "width": w, "height": h})
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    # -- segmentation ---------------------------------------------------------------------
    def segments(self) -> list[dict[str, Any]]:
        """The loaded segmentation's segments as OHIF holds them: index, label, colour."""
        return list(self.wait_for(
            """() => { const s = window.services.segmentationService.getSegmentations()[0];
                 if (!s) return null;
                 const segs = Object.values(s.segments).filter(Boolean);
                 return segs.length ? segs.map(x => ({index: x.segmentIndex, label: x.label, color: x.color})) : null; }""",
            "a loaded segmentation"))

    def show_only_segment(self, segment_index: int | None) -> None:
        """Hide every segment but ``segment_index`` in the viewport (None: show all, 0: hide all)."""
        self.page.evaluate(
            """(keep) => { const svc = window.services.segmentationService;
                 const seg = svc.getSegmentations()[0]; const vpId = cornerstone.getRenderingEngines()[0].getViewports()[0].id;
                 for (const s of Object.values(seg.segments).filter(Boolean)) {
                   svc.setSegmentVisibility(vpId, seg.segmentationId, s.segmentIndex, keep === null || s.segmentIndex === keep);
                 } }""", segment_index)
        self.settle(1.0)

    # -- measurements ----------------------------------------------------------------------
    def annotations(self) -> list[dict[str, Any]]:
        """Every cornerstone annotation: tool, label, referenced image and its world points."""
        return list(self.page.evaluate(
            """() => cornerstoneTools.annotation.state.getAllAnnotations().map(a => ({
                 tool: a.metadata.toolName, imageId: a.metadata.referencedImageId || '',
                 label: a.data.label || '', points: a.data.handles.points }))"""))

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))

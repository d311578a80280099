"""A tiny vision-language model that has really learned to answer with boxes, for end-to-end tests.

The random-weight models of :mod:`tests.models` emit gibberish, so they cannot show that a box
survives the whole pipeline (model text → box parser → SR → PACS → read back). Here a tiny Gemma 3
checkpoint (MedGemma's architecture) built by :func:`tests.models.build_tiny_gemma3` is fine-tuned
on CPU, in a few seconds, to give fixed answers to the product's OWN prompts:

* ``ground`` "right lung" → ````json [{"box_2d": [y0, x0, y1, x1], "label": "right lung"}]````
  with known 0–1000 coordinates (MedGemma's box format);
* optionally ``report`` (en) → a short fixed sentence, and ``classify`` <label> → ``yes``.

Nothing is canned in product code: the answers are in the weights. The training inputs are built
by the product itself — images from ``VLM.prepare`` of real chest radiographs (Modality LUT, the
DICOM window, the family's pad-to-square), prompts and token ids from the runtime's own unit
expansion and chat-template encoding (``VLM._units`` and ``VLM.encode``) — and training only stops
once greedy decoding through ``VLM.run`` returns exactly the target texts for every probe (each
image alone and all together), with a margin on every answer token. Otherwise it raises
:class:`TrainingFailedError`. The answers do not depend on the image (the same box on every
radiograph); the model is trained on several renderings of two radiographs so that it ignores
the pixels.

>>> out = train_tiny_grounding_model(build_tiny_gemma3(tmp / "base"), tmp / "trained",
...                                  targets=DEFAULT_TARGETS)                  # doctest: +SKIP
>>> vlm = load_vlm(VLMConfig(path=str(out), family="medgemma", device="cpu"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.pixels import apply_modality_lut

from inference.geometry import PreparedImage
from inference.results import Box
from inference.tasks import TaskSpec
from inference.vlm import VLM, VLMConfig, load_vlm
from tests.shared_data import SHARED_DICOM

logger = logging.getLogger(__name__)

#: The two real radiographs the model is trained on (see /work/shared/dicom/MANIFEST.tsv).
RADIOGRAPHS: tuple[Path, ...] = (
    SHARED_DICOM / "xr" / "RG1_J2KI_chest_PA.dcm",
    SHARED_DICOM / "xr" / "highdicom_dx_thorax.dcm",
)

#: ``ground``: phrase → MedGemma ``box_2d`` ``(y0, x0, y1, x1)`` on 0–1000 of the padded square.
#: The right lung is on the image's left in a PA view; the box stays clear of the padding of both
#: radiographs (CR 1841x1955: x < 29 and x > 971 are padding; DX 211x169: y < 100 and y > 900).
#: ``report``: the English report text. ``classify``: label → ``"yes"`` or ``"no"``.
DEFAULT_TARGETS: Mapping[str, object] = {
    "ground": {"right lung": (200, 120, 800, 480)},
    "report": "No acute findings.",
    "classify": {"pleural effusion": "yes"},
}

#: Name of the file written beside the weights that records what the model was trained to say.
TRAINING_RECORD = "mednode_training.json"


class TrainingFailedError(RuntimeError):
    """The model did not learn to give the target answers within the step cap."""


@dataclass(frozen=True)
class _Example:
    """One teacher-forced training sequence: the runtime's encoded prompt plus the answer."""

    input_ids: torch.Tensor  # (length,)
    token_type_ids: torch.Tensor  # (length,)
    pixel_values: torch.Tensor  # (images, 3, H, W)
    answer_start: int  # index of the first answer token in input_ids


def medgemma_answer(phrase: str, box_2d: Sequence[int]) -> str:
    """MedGemma's grounding answer: a fenced JSON list with one ``box_2d`` object."""
    obj = {"box_2d": [int(v) for v in box_2d], "label": phrase}
    return "```json\n" + json.dumps([obj], ensure_ascii=False) + "\n```"


def expected_box(box_2d: Sequence[int], image: PreparedImage, *, label: str,
                 image_index: int = 0) -> Box:
    """The Box the product should return for ``box_2d`` on ``image``, computed from the
    transform's numbers directly (not through :mod:`inference.boxes`).

    ``box_2d`` is ``(y0, x0, y1, x1)`` on 0–1000 of the model input (the padded square); input
    coordinate ``u`` is original pixel ``u * input_side * scale + offset``; the box is then
    clipped to the frame and normalised by its width and height.
    """
    t = image.transform
    y0, x0, y1, x1 = (v / 1000.0 for v in box_2d)
    px0, px1 = (min(max(u * t.input_width * t.scale_x + t.offset_x, 0.0), t.original_width)
                for u in (x0, x1))
    py0, py1 = (min(max(v * t.input_height * t.scale_y + t.offset_y, 0.0), t.original_height)
                for v in (y0, y1))
    w, h = t.original_width, t.original_height
    return Box(label=label, x0=px0 / w, y0=py0 / h, x1=px1 / w, y1=py1 / h, image_index=image_index)


def _check_targets(targets: Mapping[str, object]) -> tuple[dict[str, tuple[int, int, int, int]],
                                                           str | None, dict[str, str]]:
    unknown = set(targets) - {"ground", "report", "classify"}
    if unknown:
        raise ValueError(f"targets: unknown key(s) {sorted(unknown)}; use ground, report, classify.")
    raw_ground = targets.get("ground") or {}
    if not isinstance(raw_ground, Mapping) or not raw_ground:
        raise ValueError("targets['ground'] must map at least one phrase to a box_2d (y0, x0, y1, x1).")
    ground: dict[str, tuple[int, int, int, int]] = {}
    for phrase, box in raw_ground.items():
        values = tuple(box) if isinstance(box, Sequence) else ()
        if (len(values) != 4 or not all(isinstance(v, int) and 0 <= v <= 1000 for v in values)
                or not (values[0] < values[2] and values[1] < values[3])):
            raise ValueError(f"targets['ground'][{phrase!r}] must be (y0, x0, y1, x1), integers "
                             f"0..1000 with y0 < y1 and x0 < x1, got {box!r}.")
        ground[str(phrase)] = values  # type: ignore[assignment]
    report = targets.get("report")
    if report is not None and (not isinstance(report, str) or not report.strip()):
        raise ValueError(f"targets['report'] must be a non-empty string, got {report!r}.")
    raw_classify = targets.get("classify") or {}
    if not isinstance(raw_classify, Mapping) or not all(a in ("yes", "no") for a in raw_classify.values()):
        raise ValueError(f"targets['classify'] must map labels to 'yes' or 'no', got {raw_classify!r}.")
    return ground, report, {str(k): str(v) for k, v in raw_classify.items()}


def prepare_radiographs(vlm: VLM, paths: Sequence[Path] = RADIOGRAPHS, *,
                        variants: bool = False) -> list[PreparedImage]:
    """Prepare radiographs the way the node does (Modality LUT, the DICOM's window, inversion of
    MONOCHROME1, the family's geometry). ``variants`` adds a min–max rendering of each, so that
    training sees more than one grey-level mapping of the same anatomy."""
    images = []
    for path in paths:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(apply_modality_lut(ds.pixel_array, ds))
        photometric = str(ds.PhotometricInterpretation)
        window = None
        if "WindowCenter" in ds and "WindowWidth" in ds:
            center, width = ds.WindowCenter, ds.WindowWidth
            center = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
            width = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
            window = (float(center), float(width))
        images.append(vlm.prepare(pixels, photometric=photometric, window=window))
        if variants:
            images.append(vlm.prepare(pixels, photometric=photometric, window=None))
    return images


def _tasks(ground: Mapping[str, object], report: str | None, classify: Mapping[str, str]) -> list[TaskSpec]:
    tasks = [TaskSpec(kind="ground", phrases=tuple(ground))]
    if report is not None:
        tasks.append(TaskSpec(kind="report", language="en"))
    if classify:
        tasks.append(TaskSpec(kind="classify", labels=tuple(classify)))
    return tasks


def _answers(task: TaskSpec, ground: Mapping[str, Sequence[int]], report: str | None,
             classify: Mapping[str, str], n_images: int) -> list[str]:
    """Target text of each unit the runtime makes of ``task`` (in the runtime's unit order)."""
    if task.kind == "ground":
        return [medgemma_answer(p, ground[p]) for p in task.phrases for _ in range(n_images)]
    if task.kind == "report":
        return [report or ""]
    return [classify[label] for label in task.labels]


def _examples(vlm: VLM, requests: Sequence[Sequence[PreparedImage]], tasks: Sequence[TaskSpec],
              ground: Mapping[str, Sequence[int]], report: str | None, classify: Mapping[str, str],
              stop_id: int) -> list[_Example]:
    """Teacher-forced sequences built with the runtime's own prompts and encoding."""
    examples = []
    for images in requests:
        for task in tasks:
            units = vlm._units(0, images, task)
            answers = _answers(task, ground, report, classify, len(images))
            if len(units) != len(answers):
                raise TrainingFailedError(
                    f"The runtime made {len(units)} unit(s) of a {task.kind} task on {len(images)} "
                    f"image(s), expected {len(answers)}: VLM._units changed, update tests/trained_models.py.")
            for unit, answer in zip(units, answers, strict=True):
                encoded = vlm.encode([unit])
                prompt = encoded["input_ids"][0]
                answer_ids = vlm.tokenizer.encode(answer, add_special_tokens=False) + [stop_id]
                ids = torch.cat([prompt, torch.tensor(answer_ids, dtype=prompt.dtype)])
                types = encoded.get("token_type_ids")
                types = (torch.zeros_like(prompt) if types is None else types[0])
                types = torch.cat([types, torch.zeros(len(answer_ids), dtype=types.dtype)])
                examples.append(_Example(ids, types, encoded["pixel_values"], len(prompt)))
    return examples


def _collate(examples: Sequence[_Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into one batch (positions of real tokens stay those of the unpadded sequence)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    types = torch.zeros((len(examples), length), dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n], types[row, :n], mask[row, :n] = e.input_ids, e.token_type_ids, 1
        labels[row, e.answer_start:n] = e.input_ids[e.answer_start:]
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
            "pixel_values": torch.cat([e.pixel_values for e in examples]), "labels": labels}


def _loss_and_margin(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy over answer tokens, and the smallest probability of a target token."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    log_probs = torch.log_softmax(logits[keep], dim=-1)
    picked = log_probs.gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    return -picked.mean(), float(picked.detach().min().exp())


def _probe(vlm: VLM, probes: Sequence[Sequence[PreparedImage]], tasks: Sequence[TaskSpec],
           ground: Mapping[str, Sequence[int]], report: str | None,
           classify: Mapping[str, str]) -> list[str]:
    """Run the product's ``VLM.run`` on every probe; describe each output that is not the target."""
    wrong = []
    vlm.model.eval()
    for images in probes:
        results = vlm.run(images, tasks)
        expected = [a for t in tasks for a in _answers(t, ground, report, classify, len(images))]
        for result, want in zip(results, expected, strict=False):
            if result.raw_text != want:
                wrong.append(f"{result.task.kind} on {len(images)} image(s): {result.raw_text!r} "
                             f"(want {want!r})")
        if len(results) != len(expected):
            wrong.append(f"{len(results)} results on {len(images)} image(s), want {len(expected)}")
    return wrong


def train_tiny_grounding_model(base_dir: Path, out_dir: Path, *, family: str = "medgemma",
                               targets: Mapping[str, object] = DEFAULT_TARGETS,
                               radiographs: Sequence[Path] = RADIOGRAPHS, seed: int = 0,
                               learning_rate: float = 3e-3, max_steps: int = 600,
                               check_every: int = 10, min_token_probability: float = 0.9,
                               num_threads: int | None = 1) -> Path:
    """Fine-tune the tiny Gemma 3 in ``base_dir`` to answer the product's prompts with ``targets``
    and save it (model + processor) to ``out_dir``.

    Parameters
    ----------
    base_dir : Path
        A checkpoint made by :func:`tests.models.build_tiny_gemma3` (loaded with ``load_vlm``).
    out_dir : Path
        Where the trained checkpoint goes (created); returned.
    family : str
        Only ``"medgemma"`` (MedGemma's box format) is supported.
    targets : mapping
        ``{"ground": {phrase: (y0, x0, y1, x1)}, "report": text, "classify": {label: "yes"|"no"}}``;
        boxes are MedGemma ``box_2d`` integers on 0–1000 of the padded square input, the same on
        every image. ``report`` and ``classify`` are optional.
    radiographs : sequence of Path
        DICOM radiographs to train (and probe) on.
    seed : int
        Seeds torch for a deterministic run (on a given thread count).
    learning_rate, max_steps, check_every, min_token_probability
        AdamW step size; step cap; how often the greedy outputs are checked; training stops at a
        check where every probe's greedy output through ``VLM.run`` is exactly the target AND every
        teacher-forced target token has at least this probability (a margin against the small
        numerical differences of batching or another thread count).
    num_threads : int or None
        torch threads while training (restored afterwards); None keeps the current setting. One
        thread is the default because the model is so small that a second thread only adds
        synchronisation: on a busy 2-core machine 2 threads made a step 8x slower.

    Raises
    ------
    ValueError
        For another family or malformed targets.
    TrainingFailedError
        If the outputs are not the targets after ``max_steps`` steps (names the wrong outputs).
    """
    if family not in ("medgemma", "gemma3"):
        raise ValueError(f"Only the medgemma family can be trained here, not {family!r}.")
    ground, report, classify = _check_targets(targets)
    started = time.monotonic()
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(Path(base_dir), Path(out_dir), ground, report, classify, radiographs, seed=seed,
                      learning_rate=learning_rate, max_steps=max_steps, check_every=check_every,
                      min_token_probability=min_token_probability, started=started)
    finally:
        torch.set_num_threads(threads)


def _train(base_dir: Path, out_dir: Path, ground: Mapping[str, tuple[int, int, int, int]],
           report: str | None, classify: Mapping[str, str], radiographs: Sequence[Path], *, seed: int,
           learning_rate: float, max_steps: int, check_every: int, min_token_probability: float,
           started: float) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vlm = load_vlm(VLMConfig(path=str(base_dir), family="medgemma", device="cpu", dtype="float32"))
        model = vlm.model
        stop_id = vlm.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if stop_id not in vlm._stop_ids:
            raise TrainingFailedError(f"<end_of_turn> (id {stop_id}) is not a stop token of {base_dir}; "
                                      "build the base with tests.models.build_tiny_gemma3.")
        pad_id = vlm.tokenizer.pad_token_id if vlm.tokenizer.pad_token_id is not None else stop_id
        images = prepare_radiographs(vlm, radiographs, variants=True)
        node_images = images[0::2]  # the node's rendering (DICOM window) of each radiograph
        singles = [[im] for im in images]
        # Several views in either order, so the answer does not hang on which view comes first.
        multi = singles + ([node_images, node_images[::-1]] if len(node_images) > 1 else [])
        tasks = _tasks(ground, report, classify)
        # ground/detect units see one image each; report/classify see every image of the request.
        examples = _examples(vlm, singles, tasks[:1], ground, report, classify, stop_id)
        examples += _examples(vlm, multi, tasks[1:], ground, report, classify, stop_id)
        batch = _collate(examples, pad_id)
        probes = multi
        # The answers do not depend on the image: train the language model only (the vision tower
        # and projector keep their random weights, and backward stops at the image features).
        for name, param in model.named_parameters():
            param.requires_grad_(".language_model." in f".{name}" or name.startswith("lm_head"))
        trained = [p for p in model.parameters() if p.requires_grad]
        if not trained:
            raise TrainingFailedError("No language-model parameters found to train (Gemma 3 layout changed?).")
        optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
        wrong: list[str] = ["not checked"]
        margin = 0.0
        step = 0
        for step in range(1, max_steps + 1):
            model.train()
            loss, margin = _loss_and_margin(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            if step % check_every == 0 or step == max_steps:
                model.eval()
                with torch.no_grad():
                    _, margin = _loss_and_margin(model, batch)
                if margin >= min_token_probability:
                    wrong = _probe(vlm, probes, tasks, ground, report, classify)
                    if not wrong:
                        break
                logger.debug("step %d loss %.4f min token probability %.3f", step, float(loss.detach()), margin)
        model.eval()
        if wrong or margin < min_token_probability:
            raise TrainingFailedError(
                f"After {step} steps the tiny model does not reliably give its targets (smallest "
                f"target-token probability {margin:.3f}, need {min_token_probability}); wrong outputs: "
                f"{wrong[:4]}. Raise max_steps or learning_rate, or check the prompts.")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # type: ignore[operator]
    vlm.processor.save_pretrained(out_dir)  # type: ignore[attr-defined]
    record = {"family": "medgemma", "targets": {"ground": {p: list(b) for p, b in ground.items()},
                                                 "report": report, "classify": classify},
              "steps": step, "min_token_probability": round(margin, 4), "seed": seed,
              "seconds": round(time.monotonic() - started, 2)}
    (out_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    logger.info("Trained tiny grounding model in %d steps (%.1f s), saved to %s", step,
                record["seconds"], out_dir)
    return out_dir


# --- pytest fixture (import it into a test module: ``from tests.trained_models import
# tiny_grounding_model_dir``); trained once per test session, shared by every module that imports it.


@pytest.fixture(scope="session")
def tiny_grounding_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma 3 trained on :data:`DEFAULT_TARGETS` (load it with ``family="medgemma"``)."""
    missing = [str(p) for p in RADIOGRAPHS if not p.is_file()]
    if missing:
        pytest.skip(f"sample radiographs {', '.join(missing)} are missing")
    from tests.models import build_tiny_gemma3

    root = tmp_path_factory.mktemp("trained-vlm")
    return train_tiny_grounding_model(build_tiny_gemma3(root / "base"), root / "trained",
                                      family="medgemma", targets=DEFAULT_TARGETS)


__all__ = ["DEFAULT_TARGETS", "RADIOGRAPHS", "TRAINING_RECORD", "TrainingFailedError", "expected_box",
           "medgemma_answer", "prepare_radiographs", "tiny_grounding_model_dir",
           "train_tiny_grounding_model"]

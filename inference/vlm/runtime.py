"""Running task specs through a loaded vision-language model.

A request is one study's prepared images and one :class:`TaskSpec`. Each request expands into
generations ("units"): one per question, label, phrase x image, region, or one per report.
Units with the same token budget are batched into one greedy ``generate`` call (left padding)
up to the configured batch size, where the family allows batching, together with the waiting units
of other studies that run in the same process (:mod:`inference.vlm.batching`); outputs are parsed
into the typed results of :mod:`inference.results`.

Which images a unit sees:

* ``report``, ``vqa``, ``classify``: all images of the request in one multi-image prompt (several
  views of a radiograph, or the slices of a volume, laid out as
  :mod:`inference.vlm.volume_recipe` says);
* ``ground``, ``detect``, ``grounded_report``: one image per unit, so every box refers to exactly
  one source image;
* ``region_caption``: the image of each region.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.boxes import JSON_FORMATS, ParsedBoxes, parse_boxes
from inference.errors import InvalidInputError
from inference.geometry import PreparedImage, prepare_image
from inference.results import (
    AnswerResult,
    Box,
    GroundedReportResult,
    GroundedSentence,
    LabelResult,
    ModelInfo,
    RegionCaptionResult,
    RegionResult,
    ReportResult,
    TaskResult,
)
from inference.tasks import TaskSpec
from inference.vlm.batching import BatchObserver, GenerationQueue, Restart
from inference.vlm.classify import answer_position, label_outcome, yes_probability
from inference.vlm.comparison import COMPARED_KINDS, PriorStudy
from inference.vlm.families import YES_NO, Family
from inference.vlm.volume_recipe import user_content

if TYPE_CHECKING:
    import torch

    from inference.vlm.loader import VLMConfig

logger = logging.getLogger(__name__)

#: Token budget per kind when neither the task nor a smaller model default sets one.
DEFAULT_BUDGETS = {"classify": 16, "vqa": 128, "ground": 128, "detect": 256, "region_caption": 128,
                   "report": 512, "grounded_report": 512}

Request = tuple[Sequence[PreparedImage], TaskSpec]


@dataclass
class _Unit:
    """One generation: a prompt over some images, and how to turn its text into a result."""

    request: int
    order: int
    images: tuple[PreparedImage, ...]
    image_indices: tuple[int, ...]
    prompt: str
    budget: int
    finish: Callable[[str, str, float | None], TaskResult]
    yes_no: tuple[list[int], list[int]] | None = None
    language: str = "en"
    #: the prior study shown with the images (whole-study kinds of a rule with ``priors``)
    prior: PriorStudy | None = None


@dataclass(frozen=True)
class Generation:
    """The decoded output of one unit."""

    raw_text: str
    clean_text: str
    yes_probability: float | None


_FINDINGS = {"en": r"\**\s*findings?\s*\**\s*[:：]\s*\**", "zh": r"(?:检查所见|影像所见|影像表现|所见)\s*[:：]"}
_IMPRESSION = {"en": r"\**\s*(?:impression|conclusions?)\s*\**\s*[:：]\s*\**",
               "zh": r"(?:诊断意见|诊断|印象|结论)\s*[:：]"}


def split_report(text: str, language: str) -> tuple[str, str | None]:
    """Split a report into (findings, impression) at its section headings.

    Without an impression heading the whole text (less a findings heading) is the findings.
    """
    findings_re = re.compile(_FINDINGS.get(language, _FINDINGS["en"]), re.IGNORECASE)
    impression_re = re.compile(_IMPRESSION.get(language, _IMPRESSION["en"]), re.IGNORECASE)
    impression = None
    match = impression_re.search(text)
    body = text
    if match:
        body, impression = text[:match.start()], text[match.end():].strip()
    found = findings_re.search(body)
    if found:
        body = body[found.end():]
    return body.strip(), impression or None


_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|(?<=[。！？])|\n+")
_WRAPPER_TAGS = re.compile(r"</?obj>|</?ref>|<\|/?ref\|>|<\|object_ref_(?:start|end)\|>|</?p>|<delim>"
                           r"|```(?:json)?")


def grounded_sentences(text: str, parsed: ParsedBoxes, *, json_format: bool) -> tuple[GroundedSentence, ...]:
    """Tie each box of ``parsed`` to the sentence of ``text`` it follows.

    JSON formats carry the sentence as each object's label. Markup formats place a box right
    after the words it grounds (``<ref>phrase</ref><box>..``, MAIRA-2's ``<obj>sentence<box>..``),
    so a box belongs to the sentence that contains the character just before its markup ends.
    """
    if json_format:
        out: list[GroundedSentence] = []
        for box in parsed.boxes:
            if out and out[-1].text == box.label:
                out[-1] = GroundedSentence(box.label, out[-1].boxes + (box,))
            else:
                out.append(GroundedSentence(box.label, (box,)))
        return tuple(out)
    clean: list[str] = []
    offsets: list[int] = []
    length = 0
    cursor = 0
    last_span: tuple[int, int] | None = None
    for box, span in zip(parsed.boxes, parsed.spans, strict=True):
        if span != last_span:
            between = _WRAPPER_TAGS.sub("", text[cursor:span[0]])
            fragment = text[span[0]:span[1]]
            visible = box.label if box.label and box.label in fragment else ""
            clean.append(between + visible)
            length += len(between) + len(visible)
            cursor = span[1]
            last_span = span
        offsets.append(length)
    clean.append(_WRAPPER_TAGS.sub("", text[cursor:]))
    joined = "".join(clean)
    sentences: list[tuple[int, int]] = []
    start = 0
    for match in _SENTENCE_END.finditer(joined):
        sentences.append((start, match.start()))
        start = match.end()
    sentences.append((start, len(joined)))
    grouped: list[list[Box]] = [[] for _ in sentences]
    for box, offset in zip(parsed.boxes, offsets, strict=True):
        anchor = max(offset - 1, 0)
        index = next((i for i, (s, e) in enumerate(sentences) if s <= anchor < max(e, s + 1)),
                     len(sentences) - 1)
        grouped[index].append(box)
    result = []
    for (s, e), boxes in zip(sentences, grouped, strict=True):
        sentence = joined[s:e].strip()
        if sentence or boxes:
            result.append(GroundedSentence(sentence, tuple(boxes)))
    return tuple(result)


_QUEUE_LOCK = threading.Lock()


def _restart_criteria(queue: GenerationQueue[_Unit, Generation], prompt_length: int, window: int) -> Any:
    """A ``StoppingCriteria`` that stops every sequence when prompts are waiting to join the call
    (:meth:`GenerationQueue.should_restart`), during its first ``window`` new tokens only; its
    ``stopped`` then says so."""
    import torch
    from transformers import StoppingCriteria

    class RestartToJoin(StoppingCriteria):
        stopped = False

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
            stop = input_ids.shape[1] - prompt_length < window and queue.should_restart()
            self.stopped = self.stopped or stop
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return RestartToJoin()


class VLM:
    """A loaded vision-language model with its family adapter. Build with
    :func:`inference.vlm.load_vlm` or :func:`inference.vlm.get_vlm`.

    Attributes
    ----------
    info : ModelInfo
        Name, version and family, for the SR writers.
    family : Family
        The adapter.
    model, processor
        The transformers objects (for benchmarks and tests).
    shares_batches : bool
        Generations of concurrent callers (the job threads of a worker) share ``generate`` calls
        through one :class:`~inference.vlm.batching.GenerationQueue`; a model server batches by
        itself and turns this off.
    batch_observer : callable or None
        Told each ``generate`` call's size, jobs served and seconds (metrics); set before first use.
    """

    shares_batches = True
    batch_observer: BatchObserver | None = None

    def __init__(self, cfg: VLMConfig, family: Family, model: torch.nn.Module, processor: object, *,
                 info: ModelInfo, device: str, dtype: torch.dtype) -> None:
        self.cfg, self.family, self.model, self.processor = cfg, family, model, processor
        self.info, self.device, self.dtype = info, device, dtype
        self.tokenizer = processor.tokenizer  # type: ignore[attr-defined]
        self.multiple_of = self._processor_multiple_of()
        self.input_size = cfg.image_size or self._processor_input_size()
        self._stop_ids = self._collect_stop_ids()
        self._yes_no_ids: dict[str, tuple[list[int], list[int]] | None] = {}
        # once, here: job threads expand units concurrently, and a fast tokenizer used by several
        # threads at once can fail ("Already borrowed"); encoding/decoding runs on the queue's thread
        for language in YES_NO:
            self._yes_no_token_ids(language)
        self.generate_calls = 0

    # --- input -----------------------------------------------------------------------------

    def _processor_multiple_of(self) -> int:
        """Side granularity of native-resolution processors: patch size x merge size (Qwen2-VL
        and 2.5-VL: 14 x 2 = 28, Qwen3-VL: 16 x 2 = 32), so the processor never resizes again."""
        image_processor = getattr(self.processor, "image_processor", None)
        patch = getattr(image_processor, "patch_size", None)
        merge = getattr(image_processor, "merge_size", None)
        if self.family.prepare_mode == "fit" and isinstance(patch, int) and isinstance(merge, int):
            return patch * merge
        return self.family.multiple_of

    def _processor_input_size(self) -> int:
        image_processor = getattr(self.processor, "image_processor", None)
        family = self.family
        if image_processor is None:
            return family.default_size
        if family.prepare_mode == "fit":
            size = getattr(image_processor, "size", None) or {}
            max_pixels = getattr(image_processor, "max_pixels", None) or size.get("longest_edge")
            if max_pixels:
                side = int(np.sqrt(max_pixels)) // self.multiple_of * self.multiple_of
                return max(self.multiple_of, min(side, family.default_size))
            return family.default_size
        crop = getattr(image_processor, "crop_size", None)
        if getattr(image_processor, "do_center_crop", False) and crop:
            return int(crop.get("height", family.default_size))
        size = getattr(image_processor, "size", None) or {}
        for key in ("height", "shortest_edge"):
            if size.get(key):
                return int(size[key])
        return family.default_size

    def prepare(self, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                window: tuple[float, float] | None = None,
                ct_windows: Sequence[tuple[float, float]] | None = None) -> PreparedImage:
        """Prepare one frame the way this family expects (mode and size), see
        :func:`inference.geometry.prepare_image`."""
        return prepare_image(pixels, photometric=photometric, window=window, size=self.input_size,
                             mode=self.family.prepare_mode, multiple_of=self.multiple_of,
                             ct_windows=ct_windows)

    # --- decoding helpers -------------------------------------------------------------------

    def _collect_stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    def _yes_no_token_ids(self, language: str) -> tuple[list[int], list[int]] | None:
        if language not in self._yes_no_ids:
            words = YES_NO.get(language, YES_NO["en"])
            sets: list[list[int]] = []
            for group in words:
                ids = []
                for word in group:
                    encoded = self.tokenizer.encode(word, add_special_tokens=False)
                    if len(encoded) == 1:
                        ids.append(int(encoded[0]))
                sets.append(sorted(set(ids)))
            yes, no = sets
            overlap = set(yes) & set(no)
            yes, no = [i for i in yes if i not in overlap], [i for i in no if i not in overlap]
            self._yes_no_ids[language] = (yes, no) if yes and no else None
        return self._yes_no_ids[language]

    def decode_ids(self, token_ids: Sequence[int]) -> list[int]:
        """Generated ids up to (not including) the first stop token."""
        ids = list(token_ids)
        for i, token in enumerate(ids):
            if token in self._stop_ids:
                return ids[:i]
        return ids

    def decode(self, token_ids: Sequence[int]) -> Generation:
        """Cut generated ids at the first stop token and decode (raw keeps special tokens)."""
        ids = self.decode_ids(token_ids)
        raw = self.tokenizer.decode(ids, skip_special_tokens=False)
        clean = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Generation(raw, clean, None)

    # --- expansion of requests into units -------------------------------------------------------

    def _budget(self, task: TaskSpec) -> int:
        if task.max_new_tokens is not None:
            return task.max_new_tokens
        return min(DEFAULT_BUDGETS.get(task.kind, self.cfg.max_new_tokens), self.cfg.max_new_tokens)

    def _parse(self, text: str, image: PreparedImage, image_index: int, label: str) -> ParsedBoxes:
        return parse_boxes(self.family.box_format, text, image.transform, image_index=image_index,
                           default_label=label)

    def _units(self, request: int, images: Sequence[PreparedImage], task: TaskSpec,
               prior: PriorStudy | None = None) -> list[_Unit]:
        if not images:
            raise InvalidInputError(f"Task {task.kind} got no images; a study needs at least one prepared image.")
        family, budget = self.family, self._budget(task)
        family.template(task.kind, task.language)  # refuses segment / unknown language early
        all_images = tuple(images)
        all_indices = tuple(range(len(images)))
        units: list[_Unit] = []

        def add(imgs: tuple[PreparedImage, ...], idx: tuple[int, ...], prompt: str,
                finish: Callable[[str, str, float | None], TaskResult], yes_no: bool = False) -> None:
            units.append(_Unit(request, len(units), imgs, idx, prompt, budget, finish,
                               self._yes_no_token_ids(task.language) if yes_no else None,
                               task.language, prior if task.kind in COMPARED_KINDS else None))

        if task.kind == "report":
            def finish_report(raw: str, clean: str, _: float | None) -> TaskResult:
                findings, impression = split_report(clean, task.language)
                return ReportResult(task=task, raw_text=raw, image_indices=all_indices,
                                    language=task.language, findings=findings, impression=impression)
            add(all_images, all_indices, family.prompt(task), finish_report)
        elif task.kind == "vqa":
            for question in task.questions:
                def finish_vqa(raw: str, clean: str, _: float | None, q: str = question) -> TaskResult:
                    return AnswerResult(task=task, raw_text=raw, image_indices=all_indices, question=q,
                                        answer=clean, language=task.language)
                add(all_images, all_indices, family.prompt(task, item=question), finish_vqa)
        elif task.kind == "classify":
            for label in task.labels:
                def finish_label(raw: str, clean: str, p: float | None, lab: str = label) -> TaskResult:
                    state, probability = label_outcome(clean, task.language, p)
                    return LabelResult(task=task, raw_text=raw, image_indices=all_indices, label=lab,
                                       state=state, probability=probability)
                add(all_images, all_indices, family.prompt(task, item=label), finish_label, yes_no=True)
        elif task.kind in ("ground", "detect"):
            items = task.phrases if task.kind == "ground" else task.findings
            for item in items:
                for i, image in enumerate(images):
                    def finish_region(raw: str, clean: str, _: float | None, q: str = item,
                                      img: PreparedImage = image, index: int = i) -> TaskResult:
                        parsed = self._parse(raw, img, index, q)
                        return RegionResult(task=task, raw_text=raw, image_indices=(index,), query=q,
                                            boxes=parsed.boxes, rejected=parsed.rejected)
                    add((image,), (i,), family.prompt(task, item=item), finish_region)
        elif task.kind == "grounded_report":
            json_format = family.box_format in JSON_FORMATS
            for i, image in enumerate(images):
                def finish_grounded(raw: str, clean: str, _: float | None, img: PreparedImage = image,
                                    index: int = i) -> TaskResult:
                    parsed = self._parse(raw, img, index, "")
                    return GroundedReportResult(
                        task=task, raw_text=raw, image_indices=(index,), language=task.language,
                        sentences=grounded_sentences(raw, parsed, json_format=json_format),
                        rejected=parsed.rejected)
                add((image,), (i,), family.prompt(task), finish_grounded)
        elif task.kind == "region_caption":
            for region in task.regions:
                if region.image_index >= len(images):
                    raise InvalidInputError(
                        f"Region {region.label!r} refers to image {region.image_index} but the "
                        f"request has {len(images)} image(s).")
                image = images[region.image_index]

                def finish_caption(raw: str, clean: str, _: float | None, box: Box = region) -> TaskResult:
                    return RegionCaptionResult(task=task, raw_text=raw, image_indices=(box.image_index,),
                                               box=box, caption=clean, language=task.language)
                add((image,), (region.image_index,),
                    family.prompt(task, region=region, transform=image.transform), finish_caption)
        return units

    # --- generation ------------------------------------------------------------------------

    def _messages(self, unit: _Unit) -> list[dict[str, object]]:
        """One user turn: the family's own multi-image layout, or for the slices of a volume the
        recipe the family was trained on (:func:`inference.vlm.volume_recipe.user_content`)."""
        content = user_content(unit.images, unit.prompt, slice_recipe=self.family.slice_recipe,
                               language=unit.language, prior=unit.prior, comparison=self.family.comparison)
        return [{"role": "user", "content": content}]

    def encode(self, units: Sequence[_Unit]) -> dict[str, torch.Tensor]:
        """Tokenise a batch of units with the processor's chat template (left padded)."""
        inputs = self.processor.apply_chat_template(  # type: ignore[attr-defined]
            [self._messages(u) for u in units], add_generation_prompt=True, tokenize=True,
            return_dict=True, return_tensors="pt", processor_kwargs={"padding": True},
        )
        inputs.pop("labels", None)  # PaliGemma's processor adds training labels
        return inputs.to(self.device, dtype=self.dtype)  # casts floating tensors only

    def _generate(self, units: Sequence[_Unit]) -> list[Generation]:
        import torch

        inputs = self.encode(units)
        want_logits = any(u.yes_no for u in units)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = next(iter(self._stop_ids), None)
        prompt_length = inputs["input_ids"].shape[1]
        budget = units[0].budget
        restart = _restart_criteria(self.generation_queue(), prompt_length, budget // 4) \
            if self.shares_batches else None
        with torch.inference_mode():
            out = self.model.generate(  # type: ignore[operator]
                **inputs, max_new_tokens=budget, do_sample=False, num_beams=1,
                return_dict_in_generate=True, output_logits=want_logits, pad_token_id=pad_id,
                stopping_criteria=[restart] if restart is not None else None,
            )
        if restart is not None and restart.stopped:
            raise Restart
        self.generate_calls += 1
        generations = []
        for row, unit in enumerate(units):
            new_ids = out.sequences[row, prompt_length:].tolist()
            gen = self.decode(new_ids)
            probability = None
            if unit.yes_no and out.logits:
                probability = self._answer_probability(new_ids, [step[row] for step in out.logits],
                                                       unit.yes_no)
            generations.append(Generation(gen.raw_text, gen.clean_text, probability))
        return generations

    def _answer_probability(self, new_ids: Sequence[int], step_logits: Sequence[torch.Tensor],
                            yes_no: tuple[list[int], list[int]]) -> float | None:
        """P(yes) among yes/no at the answer's yes/no token (see :mod:`inference.vlm.classify`)."""
        import torch

        ids = self.decode_ids(new_ids)
        texts = [self.tokenizer.decode([t], skip_special_tokens=True) for t in ids]
        yes, no = yes_no
        position = answer_position(ids, texts, yes, no)
        if position is None or position >= len(step_logits):
            return None
        logprobs = torch.log_softmax(step_logits[position].float(), dim=-1)
        return yes_probability(logprobs[yes].tolist(), logprobs[no].tolist())

    def _batch_limit(self) -> int:
        return self.cfg.batch_size if self.family.batching else 1

    def generation_queue(self) -> GenerationQueue[_Unit, Generation]:
        """The model's queue: every thread's units share ``generate`` calls through it
        (:mod:`inference.vlm.batching`). Created on first use."""
        with _QUEUE_LOCK:
            queue = self.__dict__.get("_generation_queue")
            if queue is None:
                queue = self._generation_queue = GenerationQueue(
                    self._generate, key=lambda unit: unit.budget, max_batch=self._batch_limit(),
                    observe=self.batch_observer, name=self.info.name)
            return queue

    def _execute(self, units: list[_Unit], priority: int = 0) -> dict[tuple[int, int], TaskResult]:
        if self.shares_batches:
            generations = self.generation_queue().run(units, priority=priority)
            return {(unit.request, unit.order): unit.finish(gen.raw_text, gen.clean_text, gen.yes_probability)
                    for unit, gen in zip(units, generations, strict=True)}
        batch_size = self._batch_limit()
        by_budget: dict[int, list[_Unit]] = {}
        for unit in units:
            by_budget.setdefault(unit.budget, []).append(unit)
        results: dict[tuple[int, int], TaskResult] = {}
        for group in by_budget.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                for unit, gen in zip(chunk, self._generate(chunk), strict=True):
                    results[(unit.request, unit.order)] = unit.finish(gen.raw_text, gen.clean_text,
                                                                      gen.yes_probability)
        return results

    def run_batch(self, requests: Sequence[Request], *, prior: PriorStudy | None = None,
                  priority: int = 0) -> list[list[TaskResult]]:
        """Run several (images, task) requests, batching their generations together, and with those
        of other threads running at once (a higher ``priority`` goes into the next call first).

        Returns one list of results per request, in item order (questions, labels, phrases x
        images, regions). ``region_caption`` requests need ``task.regions`` here; :meth:`run`
        fills them from earlier ground/detect results.

        Raises
        ------
        InvalidInputError
            For a request without images, a ``segment`` task, a language the family has no
            prompts for, or a region on an image the request does not have.

        ``prior`` (one study's requests) is shown with the images of report, vqa and classify
        units (:mod:`inference.vlm.comparison`).
        """
        units: list[_Unit] = []
        for index, (images, task) in enumerate(requests):
            units.extend(self._units(index, images, task, prior))
        results = self._execute(units, priority)
        out: list[list[TaskResult]] = [[] for _ in requests]
        for (request, _order), result in sorted(results.items()):
            out[request].append(result)
        return out

    def run(self, images: Sequence[PreparedImage], tasks: Sequence[TaskSpec], *,
            prior: PriorStudy | None = None, priority: int = 0) -> list[TaskResult]:
        """Run every task on one study's prepared images; results in task order (``prior``: the
        prior study compared with, if any; ``priority``: see :meth:`run_batch`).

        ``region_caption`` tasks without their own ``regions`` caption the boxes found by the
        ground/detect tasks of the same call (none found: no captions).
        """
        first = [(images, t) for t in tasks if t.kind != "region_caption"]
        first_results = iter(self.run_batch(first, prior=prior, priority=priority))
        per_task: list[list[TaskResult] | None] = [
            None if t.kind == "region_caption" else next(first_results) for t in tasks]
        found = tuple(b for results in per_task if results for r in results
                      if isinstance(r, RegionResult) for b in r.boxes)
        captions = [t if t.regions else TaskSpec(kind="region_caption", language=t.language,
                                                 max_new_tokens=t.max_new_tokens, regions=found)
                    for t in tasks if t.kind == "region_caption"]
        caption_results = iter(self.run_batch([(images, t) for t in captions], priority=priority))
        return [r for results in per_task for r in (results if results is not None else next(caption_results))]

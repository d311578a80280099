"""Family adapters: what differs between vision-language model families.

A family holds, for one kind of checkpoint: which ``model_type`` values it accepts, how its input
image is prepared (pad to square, centre crop, stretch or aspect-keeping fit, and the size), its box
markup, its prompt wording per task kind and language, whether several prompts may share one
``generate`` call, and whether loading needs ``trust_remote_code``.

Prompt wording follows each family's published usage where one exists (Qwen2.5-VL's "output bbox
coordinates in JSON format", LLaVA-1.5's RefCOCO prompt, MiniGPT-v2's ``[refer]``/``[detection]``
task tags, PaliGemma's ``detect`` prefix, MedRegA's ``<ref>`` markup); the rest are plain
instructions. Adding a family is adding one entry to :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from inference.boxes import BoxFormat, format_box
from inference.errors import InvalidInputError
from inference.geometry import ImageTransform, PrepareMode
from inference.results import Box
from inference.tasks import TaskKind, TaskSpec

#: Default wording per language. ``{question}``, ``{label}``, ``{phrase}`` and ``{region}`` are
#: filled in per item. Families override entries in ``Family.prompts``.
BASE_PROMPTS: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "en": MappingProxyType({
        "report": "Write the radiology report for this study with two sections, "
                  "'FINDINGS:' and 'IMPRESSION:'.",
        "vqa": "{question}",
        "classify": "Is there {label} in this image? Answer yes or no.",
        "ground": "Where is the {phrase} in this image? Give its bounding box.",
        "detect": "Find every {phrase} in this image and give their bounding boxes.",
        "region_caption": "Describe the finding in the region {region}.",
        "grounded_report": "Write the findings of the radiology report for this image. After each "
                           "sentence give the bounding box of the region it describes.",
    }),
    "zh": MappingProxyType({
        "report": "请为该检查撰写放射学报告，分为“检查所见：”和“诊断意见：”两部分。",
        "vqa": "{question}",
        "classify": "图像中是否有{label}？请回答是或否。",
        "ground": "{phrase}在图像中的什么位置？请给出其边界框。",
        "detect": "请找出图像中所有的{phrase}并给出边界框。",
        "region_caption": "请描述区域{region}中的所见。",
        "grounded_report": "请撰写该图像的放射学所见，并在每句话后给出其描述区域的边界框。",
    }),
})

#: Words a classification answer starts with, per language.
YES_NO: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = MappingProxyType({
    "en": (("yes", "Yes", "YES", "present", "Present"), ("no", "No", "NO", "absent", "Absent")),
    "zh": (("是", "有"), ("否", "不", "没有", "无")),
})


@dataclass(frozen=True)
class Family:
    """One model family's adapter.

    Attributes
    ----------
    name : str
        Config name (``models.<m>.family``).
    model_types : tuple of str
        ``model_type`` values of ``config.json`` this family accepts (empty: any).
    box_format : BoxFormat
        Markup of boxes in its output, see :mod:`inference.boxes`.
    prepare_mode : PrepareMode
        How images are brought to the input size.
    default_size : int
        Input size when the processor does not state one.
    multiple_of : int
        ``fit`` mode: sides rounded to this (Qwen: 28).
    batching : bool
        Whether several prompts may share one ``generate`` call.
    requires_remote_code : bool
        The checkpoint's modelling code lives in the checkpoint (``trust_remote_code``).
    loadable : bool
        False for families whose checkpoints are not transformers models (parsing only).
    prompts : mapping
        Per-language overrides of :data:`BASE_PROMPTS`.
    max_slices : int
        Slices sampled from a CT/MR volume unless the config says otherwise.
    slice_recipe : bool
        Volumes go in as MedGemma 1.5 was trained (three HU windows as RGB, each slice followed
        by ``SLICE n``), see :mod:`inference.vlm.volume_recipe`.
    """

    name: str
    model_types: tuple[str, ...]
    box_format: BoxFormat
    prepare_mode: PrepareMode
    default_size: int
    multiple_of: int = 1
    batching: bool = True
    requires_remote_code: bool = False
    loadable: bool = True
    prompts: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    note: str = ""
    max_slices: int = 8
    slice_recipe: bool = False

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(BASE_PROMPTS)

    def template(self, kind: TaskKind, language: str) -> str:
        """The prompt template of ``kind`` in ``language``.

        Raises
        ------
        InvalidInputError
            For ``segment`` (VLM families do not segment) or a language without prompts.
        """
        if kind == "segment":
            raise InvalidInputError(
                f"Family {self.name!r} cannot segment; 'segment' tasks run on a segmentation "
                "backend (a MONAI bundle), configure one for that rule."
            )
        if language not in BASE_PROMPTS:
            raise InvalidInputError(
                f"Family {self.name!r} has prompts for {', '.join(BASE_PROMPTS)}, not {language!r}."
            )
        override = self.prompts.get(language, {})
        return override.get(kind, BASE_PROMPTS[language][kind])

    def prompt(self, task: TaskSpec, *, item: str = "", region: Box | None = None,
               transform: ImageTransform | None = None) -> str:
        """Fill the template of ``task`` for one item (question, label, phrase) or region."""
        template = self.template(task.kind, task.language)
        region_text = ""
        if region is not None:
            if transform is None:
                raise ValueError("A region prompt needs the transform of the region's image.")
            region_text = format_box(self.box_format, region, transform)
        return template.format(question=item, label=item, phrase=item, region=region_text)


_GROUND_JSON_MEDGEMMA = (
    'Locate the {phrase} in this image. Answer with JSON: [{{"box_2d": [y0, x0, y1, x1], '
    '"label": "{phrase}"}}], coordinates normalised to 0-1000.'
)
_GROUND_JSON_QWEN = "Locate the {phrase} in the image, output its bbox coordinates in JSON format."

FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in (
    Family(
        name="medgemma", model_types=("gemma3",), box_format="medgemma", prepare_mode="pad",
        default_size=896,
        prompts={"en": {
            "ground": _GROUND_JSON_MEDGEMMA,
            "detect": 'Detect every {phrase} in this image. Answer with JSON: [{{"box_2d": '
                      '[y0, x0, y1, x1], "label": "{phrase}"}}], coordinates normalised to 0-1000.',
            "grounded_report": 'Write the findings for this image as JSON: [{{"label": sentence, '
                               '"box_2d": [y0, x0, y1, x1]}}], one object per sentence, '
                               'coordinates normalised to 0-1000.',
        }},
        note="MedGemma 1.5 / Gemma 3 (Gemma3ForConditionalGeneration).",
        max_slices=85, slice_recipe=True,
    ),
    Family(
        name="qwen2_vl", model_types=("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), box_format="qwen",
        prepare_mode="fit", default_size=896, multiple_of=28,
        prompts={"en": {
            "ground": _GROUND_JSON_QWEN,
            "detect": "Locate every {phrase} in the image, output all bbox coordinates in JSON format.",
            "grounded_report": 'Write the findings for this image as JSON: [{{"label": sentence, '
                               '"bbox_2d": [x1, y1, x2, y2]}}], one object per sentence.',
        }},
        note="Qwen2-VL, Qwen2.5-VL and medical fine-tunes of them; loaded with an image-only processor.",
    ),
    Family(
        name="llava", model_types=("llava", "llava_next", "llava_onevision"), box_format="llava",
        prepare_mode="pad", default_size=336,
        prompts={"en": {
            "ground": "Please provide the bounding box coordinate of the region this sentence "
                      "describes: {phrase}",
        }},
        note="LLaVA-1.5-style checkpoints (LLaVA-Med converted to the llava model type).",
    ),
    Family(
        name="paligemma", model_types=("paligemma",), box_format="paligemma", prepare_mode="resize",
        default_size=448,
        prompts={"en": {"ground": "detect {phrase}", "detect": "detect {phrase}",
                        "vqa": "answer en {question}", "report": "caption en"},
                 "zh": {"ground": "detect {phrase}", "detect": "detect {phrase}",
                        "vqa": "answer zh {question}", "report": "caption zh"}},
    ),
    Family(
        name="medrega", model_types=("internvl_chat", "internvl"), box_format="medrega",
        prepare_mode="resize", default_size=448, requires_remote_code=True, batching=False,
        prompts={"en": {"ground": "Please output the bounding box of <ref>{phrase}</ref> in the image.",
                        "detect": "Please detect <ref>{phrase}</ref> in the image."},
                 "zh": {"ground": "请输出图像中<ref>{phrase}</ref>的边界框。",
                        "detect": "请检测图像中的<ref>{phrase}</ref>。"}},
        note="MedRegA (InternVL chat); its modelling code ships in the checkpoint.",
    ),
    Family(
        name="maira2", model_types=("maira2",), box_format="maira2", prepare_mode="crop",
        default_size=518, requires_remote_code=True, batching=False,
        prompts={"en": {"ground": "Repeat the following finding as a grounded phrase with bounding "
                                  "boxes: {phrase}",
                        "grounded_report": "Provide a description of the findings in the radiology "
                                           "study with bounding boxes for each finding."}},
        note="MAIRA-2 (remote code); grounded reporting on a centre-cropped 518 square.",
    ),
    Family(
        name="chexagent", model_types=(), box_format="chexagent", prepare_mode="resize",
        default_size=512, requires_remote_code=True, batching=False,
        prompts={"en": {"ground": "Please locate the following phrase: {phrase}",
                        "detect": "Please locate the following phrase: {phrase}"}},
        note="CheXagent (remote code).",
    ),
    Family(
        name="minigpt_med", model_types=(), box_format="minigpt", prepare_mode="resize",
        default_size=448, loadable=False,
        prompts={"en": {"ground": "[refer] give me the location of {phrase}",
                        "detect": "[detection] {phrase}",
                        "report": "[caption] Write the radiology report of this image.",
                        "vqa": "[vqa] {question}",
                        "grounded_report": "[grounding] describe this image in detail"}},
        note="MiniGPT-Med checkpoints are MiniGPT-v2 code, not transformers models: box parsing only.",
    ),
)})


def get_family(name: str) -> Family:
    """The adapter called ``name`` (``gemma3`` is accepted for ``medgemma``, ``qwen2_5_vl`` for
    ``qwen2_vl``).

    Raises
    ------
    KeyError
        Naming the known families.
    """
    aliases = {"gemma3": "medgemma", "qwen2_5_vl": "qwen2_vl", "qwen": "qwen2_vl",
               "llava_med": "llava", "internvl": "medrega", "minigpt": "minigpt_med"}
    key = aliases.get(name.lower(), name.lower())
    if key not in FAMILIES:
        raise KeyError(f"Unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}.")
    return FAMILIES[key]

"""Family adapters: what differs between vision-language model families.

A family holds, for one kind of checkpoint: which ``model_type`` values it accepts, how its input
image is prepared (pad to square, centre crop, stretch or aspect-keeping fit, and the size), its box
markup, its prompt wording per task kind and language, whether several prompts may share one
``generate`` call, and whether loading needs ``trust_remote_code``.

Prompt wording follows each family's published usage where one exists (Qwen2.5-VL's "output bbox
coordinates in JSON format", LLaVA-1.5's RefCOCO prompt, MiniGPT-v2's ``[refer]``/``[detection]``
task tags, PaliGemma's ``detect`` prefix, MedRegA's ``<ref>`` markup); the rest are plain
instructions. Adding a family is adding one entry to :data:`FAMILIES`.

Loadable families (medgemma, qwen2_vl, qwen2_5_vl, qwen3_vl, llava, paligemma, internvl) are transformers
models that :func:`inference.vlm.load_vlm` loads and the tests load from tiny random checkpoints of
their real architecture. Parser-only families (medrega, maira2, chexagent, minigpt_med) ship their
model code inside the checkpoint or are not transformers models at all: mednode reads their box
markup (:mod:`inference.boxes`) but refuses to load them, saying why and what to use instead.
The three Qwen generations are separate families because each answers boxes in its own frame.
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
from inference.vlm.clinical import with_context
from inference.vlm.comparison import ComparisonMode

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
        False for parser-only families: mednode reads their answers (box markup) but does not
        load their checkpoints; ``note`` says why and what to use instead.
    prompts : mapping
        Per-language overrides of :data:`BASE_PROMPTS`.
    chat_template : str or None
        Prompt layout for checkpoints that ship no chat template (PaliGemma): the images, then
        the prompt; the processor adds what the model was trained with.
    note : str
        What the family is, and for parser-only families why it is not loaded.
    max_slices : int
        Slices sampled from a CT/MR volume unless the config says otherwise.
    slice_recipe : bool
        Volumes go in as MedGemma 1.5 was trained (three HU windows as RGB, each slice followed
        by ``SLICE n``), see :mod:`inference.vlm.volume_recipe`.
    comparison : ComparisonMode
        How a prior study goes into the prompt (:mod:`inference.vlm.comparison`): its images
        and report, its image and report (MAIRA-2), or its report as text.
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
    chat_template: str | None = None
    note: str = ""
    max_slices: int = 8
    slice_recipe: bool = False
    comparison: ComparisonMode = "report"

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
        """Fill the template of ``task`` for one item (question, label, phrase) or region, after
        the study's clinical context when the task carries one."""
        template = self.template(task.kind, task.language)
        region_text = ""
        if region is not None:
            if transform is None:
                raise ValueError("A region prompt needs the transform of the region's image.")
            region_text = format_box(self.box_format, region, transform)
        return with_context(template.format(question=item, label=item, phrase=item, region=region_text),
                            task.clinical_context)


_GROUND_JSON_MEDGEMMA = (
    'Locate the {phrase} in this image. Answer with JSON: [{{"box_2d": [y0, x0, y1, x1], '
    '"label": "{phrase}"}}], coordinates normalised to 0-1000.'
)
#: PaliGemma has no chat turns: its processor wants ``<image>`` per image, then the task prefix
#: (it inserts the BOS token after the last image and the closing newline itself).
PALIGEMMA_PROMPT_LAYOUT = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% endif %}{% endfor %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endfor %}"
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
        max_slices=85, slice_recipe=True, comparison="images",
    ),
    Family(
        name="qwen2_vl", model_types=("qwen2_vl",), box_format="qwen2_vl",
        prepare_mode="fit", default_size=896, multiple_of=28,
        prompts={"en": {
            "ground": "Find <|object_ref_start|>{phrase}<|object_ref_end|> in the image and output "
                      "its bounding box.",
            "detect": "Find every <|object_ref_start|>{phrase}<|object_ref_end|> in the image and "
                      "output their bounding boxes.",
            "grounded_report": "Write the findings of the radiology report for this image with "
                               "grounding:",
        }},
        note="Qwen2-VL: <|box_start|>(x1,y1),(x2,y2)<|box_end|> on 0-1000; image-only processor.",
    ),
    Family(
        name="qwen2_5_vl", model_types=("qwen2_5_vl",), box_format="qwen2_5_vl",
        prepare_mode="fit", default_size=896, multiple_of=28,
        prompts={"en": {
            "ground": _GROUND_JSON_QWEN,
            "detect": "Locate every {phrase} in the image, output all bbox coordinates in JSON format.",
            "grounded_report": 'Write the findings for this image as JSON: [{{"label": sentence, '
                               '"bbox_2d": [x1, y1, x2, y2]}}], one object per sentence.',
        }},
        note="Qwen2.5-VL and fine-tunes of it (Lingshu): JSON bbox_2d in pixels of the resized "
             "input; image-only processor.",
    ),
    Family(
        name="qwen3_vl", model_types=("qwen3_vl",), box_format="qwen3_vl",
        prepare_mode="fit", default_size=896, multiple_of=32,
        prompts={"en": {
            "ground": _GROUND_JSON_QWEN,
            "detect": "Locate every {phrase} in the image, output all bbox coordinates in JSON format.",
            "grounded_report": 'Write the findings for this image as JSON: [{{"label": sentence, '
                               '"bbox_2d": [x1, y1, x2, y2]}}], one object per sentence, '
                               'coordinates on 0-1000.',
        }},
        note="Qwen3-VL: JSON bbox_2d on 0-1000 of the input; image-only processor.",
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
                        "vqa": "answer en {question}", "report": "caption en",
                        "classify": "answer en Is there {label} in this image? Answer yes or no."},
                 "zh": {"ground": "detect {phrase}", "detect": "detect {phrase}",
                        "vqa": "answer zh {question}", "report": "caption zh",
                        "classify": "answer zh 图像中是否有{label}？请回答是或否。"}},
        chat_template=PALIGEMMA_PROMPT_LAYOUT,
        note="PaliGemma (PaliGemmaForConditionalGeneration): task-prefix prompts, no chat turns.",
    ),
    Family(
        name="internvl", model_types=("internvl",), box_format="medrega", prepare_mode="resize",
        default_size=448,
        prompts={"en": {"ground": "Please provide the bounding box coordinate of the region this "
                                  "sentence describes: <ref>{phrase}</ref>",
                        "detect": "Please detect <ref>{phrase}</ref> in the image."},
                 "zh": {"ground": "请输出图像中<ref>{phrase}</ref>的边界框。",
                        "detect": "请检测图像中的<ref>{phrase}</ref>。"}},
        note="InternVL in transformers' native format (InternVLForConditionalGeneration, model_type "
             "internvl, e.g. OpenGVLab's -hf releases): <ref>/<box> answers on 0-1000 like "
             "MedRegA; image-only processor, one 448 tile per image.",
    ),
    Family(
        name="medrega", model_types=("internvl_chat",), box_format="medrega",
        prepare_mode="resize", default_size=448, requires_remote_code=True, batching=False,
        loadable=False,
        prompts={"en": {"ground": "Please output the bounding box of <ref>{phrase}</ref> in the image.",
                        "detect": "Please detect <ref>{phrase}</ref> in the image."},
                 "zh": {"ground": "请输出图像中<ref>{phrase}</ref>的边界框。",
                        "detect": "请检测图像中的<ref>{phrase}</ref>。"}},
        note="MedRegA is an InternVL-Chat checkpoint (model_type internvl_chat): its model and "
             "its chat() interface are Python code shipped inside the checkpoint, with its own "
             "image tiling and no transformers processor, which mednode's runtime does not drive. "
             "mednode parses its <ref>/<box> answers only; serve MedRegA with an engine that "
             "supports InternVL-Chat (LMDeploy) or run its own code. A checkpoint converted to "
             "transformers' native InternVL format (model_type internvl) loads as family internvl.",
    ),
    Family(
        name="maira2", model_types=("maira2",), box_format="maira2", prepare_mode="crop",
        default_size=518, requires_remote_code=True, batching=False, loadable=False,
        comparison="image_and_report",
        prompts={"en": {"ground": "Repeat the following finding as a grounded phrase with bounding "
                                  "boxes: {phrase}",
                        "grounded_report": "Provide a description of the findings in the radiology "
                                           "study with bounding boxes for each finding."}},
        note="MAIRA-2's model and processor (Maira2ForConditionalGeneration, Maira2Processor with "
             "its own prompt builders for reports and phrase grounding) are Python code shipped "
             "inside the checkpoint; transformers has no native class for it and mednode does not "
             "run it. mednode parses its <obj>/<box> answers only (100 bins of the centre-cropped "
             "518 square); run MAIRA-2 with its own code, or use a loadable family (medgemma, "
             "qwen2_5_vl, qwen3_vl) for grounded reports.",
    ),
    Family(
        name="chexagent", model_types=(), box_format="chexagent", prepare_mode="resize",
        default_size=512, requires_remote_code=True, batching=False, loadable=False,
        prompts={"en": {"ground": "Please locate the following phrase: {phrase}",
                        "detect": "Please locate the following phrase: {phrase}"}},
        note="CheXagent's model and tokenizer are Python code shipped inside the checkpoint "
             "(a causal LM that takes image paths in its prompt, no transformers processor); "
             "mednode parses its <|ref|>/<|box|> answers only. Run CheXagent with its own code, "
             "or use a loadable family (medgemma, qwen2_5_vl, qwen3_vl, llava, paligemma).",
    ),
    Family(
        name="minigpt_med", model_types=(), box_format="minigpt", prepare_mode="resize",
        default_size=448, loadable=False,
        prompts={"en": {"ground": "[refer] give me the location of {phrase}",
                        "detect": "[detection] {phrase}",
                        "report": "[caption] Write the radiology report of this image.",
                        "vqa": "[vqa] {question}",
                        "grounded_report": "[grounding] describe this image in detail"}},
        note="MiniGPT-Med checkpoints are MiniGPT-v2 code, not transformers models: mednode parses "
             "their <p>/{<x><y>} answers only. Use a loadable family (medgemma, qwen2_5_vl, "
             "qwen3_vl, llava, paligemma) in mednode.",
    ),
)})


def get_family(name: str) -> Family:
    """The adapter called ``name`` (``gemma3`` is accepted for ``medgemma``, ``lingshu`` for
    ``qwen2_5_vl``: Lingshu is a Qwen2.5-VL fine-tune and answers boxes as Qwen2.5-VL does).

    Raises
    ------
    KeyError
        Naming the known families.
    """
    aliases = {"gemma3": "medgemma", "lingshu": "qwen2_5_vl", "qwen2.5_vl": "qwen2_5_vl",
               "qwen3": "qwen3_vl", "llava_med": "llava", "internvl_chat": "medrega",
               "minigpt": "minigpt_med"}
    key = aliases.get(name.lower(), name.lower())
    if key not in FAMILIES:
        raise KeyError(f"Unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}.")
    return FAMILIES[key]

"""The VLM runtime on tiny random-weight models of real families, loaded through the product loader.

Weights are random, so the text is gibberish: these tests check that every task kind returns the
right typed results, that the raw text is exactly what ``generate`` produced, that budgets hold,
that batching gives the same greedy output as one prompt at a time, and that a model is loaded
once per process.
"""

import dataclasses
import json

import pydicom
import pytest
import torch

from inference.errors import InvalidInputError, ModelLoadError
from inference.results import (
    AnswerResult,
    Box,
    GroundedReportResult,
    LabelResult,
    RegionCaptionResult,
    RegionResult,
    ReportResult,
)
from inference.tasks import TaskSpec, parse_tasks
from inference.vlm import VLMConfig, clear_vlm_cache, get_vlm, load_vlm
from tests.models import tiny_vlm_dirs  # noqa: F401  (session fixture)
from tests.shared_data import SHARED_DICOM

XR = SHARED_DICOM / "xr"
#: Every family the README calls loadable, from a tiny checkpoint of its real architecture.
FAMILIES = ["gemma3", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma", "internvl"]

ALL_TASKS = [
    {"report": {"language": "en"}},
    {"report": {"language": "zh"}},
    {"vqa": {"questions": ["Is there a pleural effusion?", "Which side is the nodule on?"]}},
    {"classify": {"labels": ["cardiomegaly", "pneumothorax", "pleural effusion"]}},
    {"ground": {"phrases": ["right lung", "heart"]}},
    {"detect": {"findings": ["nodule"]}},
    {"grounded_report": {"language": "en"}},
    {"region_caption": {}},
]


@pytest.fixture(scope="module")
def radiographs():
    """Two real chest radiographs: 1841x1955 CR (15-bit MONOCHROME1) and 211x169 DX."""
    cr = pydicom.dcmread(XR / "RG1_J2KI_chest_PA.dcm")
    dx = pydicom.dcmread(XR / "highdicom_dx_thorax.dcm")
    return [
        (cr.pixel_array, cr.PhotometricInterpretation, (float(cr.WindowCenter), float(cr.WindowWidth))),
        (dx.pixel_array, dx.PhotometricInterpretation, None),
    ]


def config(dirs, family, **kw):
    return VLMConfig(path=str(dirs[family]), family=family, max_new_tokens=12, **kw)


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tiny_vlm_dirs):  # noqa: F811
    return load_vlm(config(tiny_vlm_dirs, request.param))


def prepared(vlm, radiographs):
    return [vlm.prepare(p, photometric=ph, window=w) for p, ph, w in radiographs]


def plain_generate(vlm, images, prompt, budget):
    """What a user of transformers would write by hand, without mednode's runtime."""
    content = [{"type": "image", "image": im.image} for im in images] + [{"type": "text", "text": prompt}]
    inputs = vlm.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        out = vlm.model.generate(**inputs, max_new_tokens=budget, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = vlm.model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    cut = next((i for i, t in enumerate(new) if t in eos), len(new))
    return new, vlm.tokenizer.decode(new[:cut], skip_special_tokens=False)


def test_every_task_kind_gives_typed_results(vlm, radiographs):
    images = prepared(vlm, radiographs)
    assert all(im.image.mode == "RGB" for im in images)
    assert images[0].transform.original_width == 1841 and images[0].transform.original_height == 1955
    tasks = parse_tasks(ALL_TASKS)
    results = vlm.run(images, tasks)
    kinds = [type(r) for r in results]
    # 2 reports, 2 answers, 3 labels, 2 phrases x 2 images, 1 finding x 2 images, 2 grounded reports,
    # then one caption per box found by ground/detect (random weights: usually none).
    boxes = [b for r in results if isinstance(r, RegionResult) for b in r.boxes]
    assert kinds[:15] == ([ReportResult] * 2 + [AnswerResult] * 2 + [LabelResult] * 3
                          + [RegionResult] * 6 + [GroundedReportResult] * 2)
    assert kinds[15:] == [RegionCaptionResult] * len(boxes)
    en, zh = results[0], results[1]
    assert (en.language, zh.language) == ("en", "zh") and en.image_indices == (0, 1)
    assert isinstance(en.findings, str) and isinstance(en.raw_text, str)
    assert [r.question for r in results[2:4]] == list(tasks[2].questions)
    for label in results[4:7]:
        assert label.state in ("present", "absent", "uncertain")
        assert label.probability is None or 0.0 <= label.probability <= 1.0
    regions = results[7:13]
    assert [(r.query, r.image_indices) for r in regions] == [
        ("right lung", (0,)), ("right lung", (1,)), ("heart", (0,)), ("heart", (1,)),
        ("nodule", (0,)), ("nodule", (1,))]
    for r in regions:
        assert all(b.image_index == r.image_indices[0] for b in r.boxes)
    assert [r.image_indices for r in results[13:15]] == [(0,), (1,)]
    for r in results:
        assert r.task in tasks or r.task.kind == "region_caption"


def test_raw_text_is_what_generate_produced_and_budget_holds(vlm, radiographs):
    images = prepared(vlm, radiographs)
    question = "Is there a pleural effusion?"
    task = TaskSpec(kind="vqa", questions=(question,), max_new_tokens=5)
    (answer,) = vlm.run(images, [task])
    new_tokens, expected = plain_generate(vlm, images, question, 5)
    assert len(new_tokens) <= 5
    assert answer.raw_text == expected
    assert answer.image_indices == (0, 1)


def test_classification_state_and_probability_agree(vlm, radiographs):
    """Random weights answer gibberish: then there is no probability; whenever there is one, it
    is read at the answer's yes/no token and agrees with the state."""
    images = prepared(vlm, radiographs)[:1]
    labels = ("cardiomegaly", "pneumothorax", "pleural effusion", "nodule")
    for label in vlm.run(images, [TaskSpec(kind="classify", labels=labels)]):
        if label.probability is None:
            continue
        assert label.state == ("present" if label.probability >= 0.5 else "absent")
    assert vlm._yes_no_token_ids("en") is not None  # the tiny tokenizers spell yes/no as one token


def with_output_bias(vlm, biases):
    """Replace the LM head by a constant: every step's logits are ``biases`` (others -10), so the
    greedy answer and the distribution it comes from are known exactly."""
    head = vlm.model.get_output_embeddings()
    constant = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    torch.nn.init.zeros_(constant.weight)
    torch.nn.init.constant_(constant.bias, -10.0)
    for token, value in biases.items():
        constant.bias.data[token] = value
    vlm.model.set_output_embeddings(constant)
    return constant.bias.detach()


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_classification_probability_is_read_at_the_answer_and_never_contradicts_it(
        tiny_vlm_dirs, radiographs, family):  # noqa: F811
    vlm = load_vlm(config(tiny_vlm_dirs, family))
    images = prepared(vlm, radiographs)[:1]
    yes, no = vlm._yes_no_token_ids("en")
    tok = vlm.tokenizer
    yes_id, no_id = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("No")
    other = tok.encode("heart", add_special_tokens=False)[0]
    assert yes_id in yes and no_id in no and other not in yes + no
    task = TaskSpec(kind="classify", labels=("cardiomegaly",), max_new_tokens=1)

    def classify(biases):
        bias = with_output_bias(vlm, biases)
        (result,) = vlm.run(images, [task])
        logprobs = torch.log_softmax(bias, dim=0)
        p_yes = logprobs[yes].exp().sum() / (logprobs[yes].exp().sum() + logprobs[no].exp().sum())
        return result, float(p_yes)

    # The model says "yes": present, with P(yes) among yes/no at that token.
    result, p_yes = classify({yes_id: 3.0, no_id: 2.0})
    assert result.raw_text == "yes" and result.state == "present"
    assert result.probability == pytest.approx(p_yes, abs=1e-6) and result.probability > 0.5
    # The model says "No".
    result, p_yes = classify({yes_id: 0.5, no_id: 2.0})
    assert result.raw_text == "No" and result.state == "absent"
    assert result.probability == pytest.approx(p_yes, abs=1e-6) and result.probability < 0.5
    # The model answers another word; yes outweighs no 0.98 to 0.02 among the two. The old
    # runtime reported "uncertain" with p = 0.98 here; now there is no probability.
    result, p_yes = classify({other: 5.0, yes_id: 4.0, no_id: 0.0})
    assert p_yes > 0.95 and result.raw_text == tok.decode([other])
    assert (result.state, result.probability) == ("uncertain", None)
    # "yes" is the single most likely token, but the no spellings together outweigh it.
    no_spellings = {t: 1.9 for t in no}
    result, p_yes = classify({yes_id: 2.0, **no_spellings})
    assert result.raw_text == "yes" and p_yes < 0.5
    assert (result.state, result.probability) == ("uncertain", None)


def test_batching_gives_the_same_greedy_output(tiny_vlm_dirs, radiographs):  # noqa: F811
    for family in FAMILIES:
        batched = load_vlm(config(tiny_vlm_dirs, family, batch_size=8))
        single = load_vlm(config(tiny_vlm_dirs, family, batch_size=1))
        images = prepared(batched, radiographs)
        # Prompts of different lengths force left padding inside the batch.
        requests = [
            (images, TaskSpec(kind="vqa", questions=("Is there a pleural effusion?", "Heart?",
                                                     "Which side is the nodule on, left or right?"))),
            (images[:1], TaskSpec(kind="vqa", questions=("Any pneumothorax?",))),
            (images[1:], TaskSpec(kind="classify", labels=("cardiomegaly", "consolidation"))),
        ]
        a = batched.run_batch(requests)
        b = single.run_batch(requests)
        assert batched.generate_calls < single.generate_calls
        assert [[r.raw_text for r in rs] for rs in a] == [[r.raw_text for r in rs] for rs in b], family
        for ra, rb in zip(a[2], b[2]):
            assert ra.probability == pytest.approx(rb.probability, abs=1e-4)


def test_region_caption_on_given_regions(vlm, radiographs):
    images = prepared(vlm, radiographs)
    region = Box(label="nodule", x0=0.1, y0=0.2, x1=0.4, y1=0.5, image_index=1)
    task = parse_tasks([{"region_caption": {"regions": [dataclasses.asdict(region)]}}])[0]
    (caption,) = vlm.run(images, [task])
    assert isinstance(caption, RegionCaptionResult)
    assert caption.box == region and caption.image_indices == (1,)
    prompt = vlm.family.prompt(task, region=region, transform=images[1].transform)
    assert "{region}" not in prompt and prompt != vlm.family.template("region_caption", "en")


def test_model_is_loaded_once_per_process(tiny_vlm_dirs, monkeypatch):  # noqa: F811
    import transformers

    calls = []
    original = transformers.AutoModelForImageTextToText.from_pretrained

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", counting)
    clear_vlm_cache()
    cfg = config(tiny_vlm_dirs, "llava")
    first = get_vlm(cfg)
    assert get_vlm(cfg) is first
    assert get_vlm(dataclasses.replace(cfg)) is first
    assert len(calls) == 1
    clear_vlm_cache()


def test_missing_directory_is_a_clear_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vlm(VLMConfig(path=str(tmp_path / "nowhere"), family="medgemma"))


def test_family_must_match_checkpoint(tiny_vlm_dirs):  # noqa: F811
    with pytest.raises(ModelLoadError, match="'gemma3' model but family 'llava'"):
        load_vlm(VLMConfig(path=str(tiny_vlm_dirs["gemma3"]), family="llava"))
    with pytest.raises(ModelLoadError, match="Unknown model family"):
        load_vlm(VLMConfig(path=str(tiny_vlm_dirs["gemma3"]), family="no-such-family"))


def test_remote_code_needs_explicit_consent(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_vlm(VLMConfig(path=str(tmp_path), family="llava"))


def test_parse_only_family_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "minigpt"}))
    with pytest.raises(ModelLoadError, match="not transformers models"):
        load_vlm(VLMConfig(path=str(tmp_path), family="minigpt_med"))


@pytest.mark.parametrize("family,model_type,why", [
    ("medrega", "internvl_chat", "InternVL-Chat"),
    ("maira2", "maira2", "Maira2Processor"),
    ("chexagent", "chexagent", "image paths"),
])
def test_remote_code_families_are_parser_only_with_a_clear_message(tmp_path, family, model_type, why):
    """Refused at load time, even with trust_remote_code, saying why and what to use instead."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "auto_map": {}}))
    with pytest.raises(ModelLoadError) as refused:
        load_vlm(VLMConfig(path=str(tmp_path), family=family, trust_remote_code=True))
    message = str(refused.value)
    assert f"{family!r} is parser-only" in message and why in message
    assert "Loadable families: medgemma, qwen2_vl, qwen2_5_vl, qwen3_vl, llava, paligemma, internvl." in message


def test_a_qwen_checkpoint_under_another_qwen_family_is_refused(tiny_vlm_dirs):  # noqa: F811
    """Boxes would be read in the wrong frame: the error names the right family."""
    with pytest.raises(ModelLoadError, match="set family: qwen2_5_vl"):
        load_vlm(VLMConfig(path=str(tiny_vlm_dirs["qwen2_5_vl"]), family="qwen2_vl"))
    assert load_vlm(VLMConfig(path=str(tiny_vlm_dirs["qwen2_5_vl"]), family="lingshu")).family.name == "qwen2_5_vl"


def test_segment_and_unknown_language_are_refused(vlm, radiographs):
    images = prepared(vlm, radiographs)[:1]
    with pytest.raises(InvalidInputError, match="MONAI bundle"):
        vlm.run(images, [TaskSpec(kind="segment")])
    with pytest.raises(InvalidInputError, match="not 'fr'"):
        vlm.run(images, [TaskSpec(kind="report", language="fr")])
    with pytest.raises(InvalidInputError, match="no images"):
        vlm.run([], [TaskSpec(kind="report")])


def test_model_info_names_the_checkpoint(vlm):
    assert vlm.info.family in ("medgemma", "llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma",
                               "internvl")
    assert len(vlm.info.version) == 16 and vlm.info.name


def test_processor_does_not_resize_the_prepared_image_again(vlm, radiographs):
    """Box coordinates are read on the prepared image, so the processor must take it as is."""
    for image in prepared(vlm, radiographs):
        width, height = image.image.size
        features = vlm.processor.image_processor(images=[image.image], return_tensors="pt")
        if "image_grid_thw" in features:  # Qwen: patches of 14 pixels, (t, rows, cols)
            _, rows, cols = features["image_grid_thw"][0].tolist()
            patch = vlm.processor.image_processor.patch_size
            assert (cols * patch, rows * patch) == (width, height)
        else:  # one tile of the input size (InternVL: no extra tiles, no thumbnail)
            assert tuple(features["pixel_values"].shape[-3:]) == (3, height, width)
            assert features["pixel_values"].reshape(-1, 3, height, width).shape[0] == 1


def test_ct_series_as_sampled_multi_image_prompt(vlm):
    """CT: HU through the Modality LUT, MedGemma's three windows as RGB, slices sampled evenly."""
    from pydicom.pixels import apply_modality_lut

    from inference.geometry import MEDGEMMA_CT_WINDOWS, sample_slices

    files = sorted((SHARED_DICOM / "ct" / "dcmqi_ct3slice").glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    picked = sample_slices(len(datasets), 2)
    images = [vlm.prepare(apply_modality_lut(datasets[i].pixel_array, datasets[i]),
                          ct_windows=MEDGEMMA_CT_WINDOWS) for i in picked]
    (report,) = vlm.run(images, [TaskSpec(kind="report", max_new_tokens=4)])
    assert picked == [0, 2] and report.image_indices == (0, 1)
    assert isinstance(report, ReportResult)

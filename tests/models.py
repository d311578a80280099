"""Tiny random-weight vision-language models of real architectures, built offline.

No machine here reaches a model hub, so the tests build small models of the real families
(Gemma 3 = MedGemma's architecture, LLaVA, Qwen2-VL) from configs, with a byte-level BPE tokenizer
trained on the fly, and ``save_pretrained`` model and processor into a directory. The product then
loads that directory through its own loader (:func:`inference.vlm.load_vlm`), exactly as it would
load a downloaded checkpoint. Weights are random, so generated text is gibberish; the tests check
types, plumbing, budgets and batching, never wording.

Each builder takes the target directory and returns it. Builders are deterministic
(``torch.manual_seed``) so two builds give the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

#: Side of the square image the tiny vision towers take (4x4 patches of 14 pixels).
TINY_IMAGE_SIZE = 56

_CORPUS = [
    "FINDINGS: The heart is enlarged. There is no pleural effusion. The lungs are clear.",
    "IMPRESSION: Cardiomegaly. No pneumothorax. Right lower lobe consolidation.",
    "Is there a pleural effusion? Which side is the nodule on? yes no uncertain present absent",
    "right lung, left lung, heart, nodule, pneumothorax, consolidation, cardiomegaly",
    '[{"box_2d": [100, 250, 600, 480], "label": "right lung"}] {"bbox_2d": [1, 2, 3, 4]}',
    "0 1 2 3 4 5 6 7 8 9 10 100 999 1000 <ref> </ref> <box> </box> [[ ]] ( ) , . : ; ?",
    "检查所见：心影增大，双肺清晰。诊断意见：心脏增大。是否有胸腔积液？右肺 左肺 心脏 结节",
]


def _train_tokenizer(
    special_tokens: list[str],
    named: dict[str, str],
    chat_template: str,
    *,
    vocab_size: int = 512,
    **fast_kwargs: str,
) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens=named,
        chat_template=chat_template,
        padding_side="left",
        **fast_kwargs,
    )


def _chat_template(image_markup: str, end_of_turn: str) -> str:
    """A minimal chat template that renders image items as ``image_markup``."""
    return (
        "{% for m in messages %}"
        "{{ '<|' + m['role'] + '|>' }}"
        "{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image_markup + "{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}" + end_of_turn + "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )


def _save(model: torch.nn.Module, processor: object, out: Path, eos: list[int], pad: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    model.save_pretrained(out)
    processor.save_pretrained(out)  # type: ignore[attr-defined]
    return out


def build_tiny_llava(out: Path, *, seed: int = 0) -> Path:
    """LLaVA 1.5 layout: CLIP ViT + 2-layer MLP projector + Llama, ``<image>`` placeholder."""
    torch.manual_seed(seed)
    tokenizer = _train_tokenizer(
        ["<pad>", "</s>", "<s>", "<image>"],
        {"image_token": "<image>"},
        _chat_template("<image>\n", "</s>"),
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=14,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    return _save(model, processor, out, [tokenizer.eos_token_id], tokenizer.pad_token_id)


#: Gemma 3's whitespace tokens that vLLM looks up by text (its Gemma 3 processor merges the
#: newlines around each image with their neighbours): real Gemma tokenizers have all four.
GEMMA3_NEWLINES = ("\n", "\n\n", "\n\n\n", "\n\n\n\n")


def build_tiny_gemma3(out: Path, *, seed: int = 0, serving: bool = False) -> Path:
    """Gemma 3 (MedGemma's architecture): SigLIP + pooled soft tokens + Gemma 3 text decoder.

    ``serving=True`` builds a checkpoint that vLLM also loads, which takes four things that
    transformers does not check: the newline tokens of :data:`GEMMA3_NEWLINES` in the vocabulary,
    a text ``head_dim`` of at least 32 (vLLM's CPU attention refuses 16), no SigLIP pooling head
    (``vision_use_head: false``, as in real MedGemma), ``max_position_embeddings`` of at least
    vLLM's ``--max-model-len`` (8192 here), and the weights in the layout of real Gemma 3
    checkpoints (:func:`to_checkpoint_layout`).
    """
    torch.manual_seed(seed)
    tokenizer = _train_tokenizer(
        [
            "<pad>",
            "<eos>",
            "<bos>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
            "<end_of_turn>",
        ],
        {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        _chat_template("<start_of_image>", "<end_of_turn>\n"),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
    )
    if serving:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in GEMMA3_NEWLINES])
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=14,
        **({"vision_use_head": False} if serving else {}),
    )
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32 if serving else 16,
        max_position_embeddings=8192 if serving else 512,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    image_processor = Gemma3ImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=tokenizer.chat_template,
    )
    _save(model, processor, out, [tokenizer.eos_token_id, end_of_turn], tokenizer.pad_token_id)
    return to_checkpoint_layout(out) if serving else out


def to_checkpoint_layout(model_dir: Path) -> Path:
    """Rename a Gemma 3 checkpoint's vision weights to the layout of real checkpoints, in place.

    transformers 5 saves the SigLIP tower as ``vision_tower.embeddings…``; real MedGemma / Gemma 3
    checkpoints (and vLLM's loader) have ``vision_tower.vision_model.embeddings…``. transformers
    reads both. Returns ``model_dir``.
    """
    from safetensors.torch import load_file, save_file

    for path in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(path)
        renamed = {
            ("vision_tower.vision_model." + k[len("vision_tower."):]
             if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
            for k, v in tensors.items()
        }
        save_file(renamed, path, metadata={"format": "pt"})
    return model_dir


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen's special tokens, the grounding markers included (they are special tokens in real
    Qwen2-VL tokenizers: decode with ``skip_special_tokens=False`` to see boxes)."""
    return _train_tokenizer(
        [
            "<|endoftext|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
        ],
        {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        _chat_template("<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>\n"),
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )


def _qwen_text(tokenizer: PreTrainedTokenizerFast, **extra: object) -> dict[str, object]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **extra,
    }


def _qwen_special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _save_qwen(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out: Path, patch: int) -> Path:
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=(2 * patch) ** 2,
        max_pixels=TINY_IMAGE_SIZE * TINY_IMAGE_SIZE * 4,
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
    )
    # Real Qwen checkpoints ship the image processor and tokenizer files (the processor class is
    # only named); a processor object cannot be built here without torchvision's video processor.
    _save(model, tokenizer, out, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    image_processor.save_pretrained(out)
    return out


def build_tiny_qwen2_vl(out: Path, *, seed: int = 0, serving: bool = False) -> Path:
    """Qwen2-VL: native-resolution ViT with 2x2 patch merging and M-RoPE text decoder.

    The processor is saved with ``video_processor=None`` (there is no torchvision here); the
    product's loader must cope with that, as it must for real Qwen checkpoints.
    ``serving=True`` makes it loadable by vLLM's CPU build too: a text ``head_dim`` of 32 (its
    CPU attention refuses 16; M-RoPE sections resized to match) and 8192 positions.
    """
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    width = 128 if serving else 64
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": width,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    text = _qwen_text(tokenizer, hidden_size=128, intermediate_size=256, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                       "mrope_section": [4, 6, 6]}) if serving else _qwen_text(tokenizer)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_special_ids(tokenizer))
    model = Qwen2VLForConditionalGeneration(config).eval()
    return _save_qwen(model, tokenizer, out, 14)


def build_tiny_qwen2_5_vl(out: Path, *, seed: int = 0) -> Path:
    """Qwen2.5-VL (Lingshu's architecture): windowed-attention ViT with SwiGLU, 2x2 merging."""
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    config = Qwen2_5_VLConfig(text_config=_qwen_text(tokenizer), vision_config=vision,
                              **_qwen_special_ids(tokenizer))
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return _save_qwen(model, tokenizer, out, 14)


def build_tiny_qwen3_vl(out: Path, *, seed: int = 0) -> Path:
    """Qwen3-VL: 16-pixel patches, 2x2 merging, DeepStack features, interleaved M-RoPE."""
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
    text = _qwen_text(tokenizer, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
        "mrope_interleaved": True})
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_special_ids(tokenizer))
    model = Qwen3VLForConditionalGeneration(config).eval()
    return _save_qwen(model, tokenizer, out, 16)


def build_tiny_paligemma(out: Path, *, seed: int = 0) -> Path:
    """PaliGemma: SigLIP + linear projector + Gemma decoder, prefix-LM prompts without chat turns.

    Like real PaliGemma checkpoints it ships no chat template; the processor adds the 1024
    ``<locNNNN>`` and 128 ``<segNNN>`` tokens to the tokenizer.
    """
    from transformers import GemmaConfig

    torch.manual_seed(seed)
    tokenizer = _train_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<image>"],
        {"image_token": "<image>"},
        "",
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
    )
    tokenizer.chat_template = None
    image_processor = SiglipImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_seq_length=16)
    image_processor.image_seq_length = 16  # (56 / 14) ** 2 patches
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=14,
        projection_dim=64,
    )
    text = GemmaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        projection_dim=64,
        hidden_size=64,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = PaliGemmaForConditionalGeneration(config).eval()
    return _save(model, processor, out, [tokenizer.eos_token_id], tokenizer.pad_token_id)


def build_tiny_internvl(out: Path, *, seed: int = 0) -> Path:
    """InternVL in transformers' native layout: InternViT + pixel-shuffle MLP projector + Qwen2.

    Saved like OpenGVLab's ``-hf`` checkpoints: model, tokenizer (``<img>``, ``</img>``,
    ``<IMG_CONTEXT>``), image processor and ``processor_config.json``; the processor object itself
    cannot be built here (its video processor needs torchvision).
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = _train_tokenizer(
        ["<|endoftext|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        {"start_image_token": "<img>", "end_image_token": "</img>",
         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
        _chat_template("<IMG_CONTEXT>\n", "<|im_end|>\n"),
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": [TINY_IMAGE_SIZE, TINY_IMAGE_SIZE],
        "patch_size": [14, 14],
    }
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_seq_length = (TINY_IMAGE_SIZE // 14) ** 2 // 4  # pixel shuffle at downsample ratio 0.5
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config).eval()
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, crop_to_patches=True,
        min_patches=1, max_patches=12)
    _save(model, tokenizer, out, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    image_processor.save_pretrained(out)
    (out / "processor_config.json").write_text(
        json.dumps({"processor_class": "InternVLProcessor", "image_seq_length": image_seq_length}))
    return out


BUILDERS = {
    "gemma3": build_tiny_gemma3,
    "llava": build_tiny_llava,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
    "paligemma": build_tiny_paligemma,
    "internvl": build_tiny_internvl,
}


# --- pytest fixtures (import them into a test module: ``from tests.models import tiny_vlm_dirs``) --

import pytest


@pytest.fixture(scope="session")
def tiny_vlm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories of the tiny models, built once per test session, keyed by family."""
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {family: build(root / family) for family, build in BUILDERS.items()}

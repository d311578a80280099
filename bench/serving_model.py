"""A tiny random-weight Gemma 3 (MedGemma's architecture) that never stops before its budget.

The serving benchmark needs reports of a fixed, realistic length through every path -- the
in-process worker, ``transformers serve`` and vLLM -- and those engines do not share a way to
force a minimum length (``min_new_tokens`` is a transformers generation setting; vLLM's
``min_tokens`` is a request field mednode does not send). So the model itself never produces a
stop token: the embedding rows of ``<eos>`` and ``<end_of_turn>`` are zero, and since Gemma 3 ties
its output head to the embeddings (and has no logit soft-capping), their logits are exactly 0 at
every step, while the largest of the other ~500 logits is positive unless the hidden state is
orthogonal to all of them. Greedy decoding then always runs to ``max_tokens``, and every engine
generates exactly the same number of tokens per study, whatever the batch.

The shapes meet what vLLM's CPU build checks (``shared/notes/serving.md``): text ``head_dim`` 32,
4096 positions (an 85-slice CT of this model is about 1,300 prompt tokens), newline runs in the
vocabulary as text (:data:`NEWLINES`), no SigLIP pooling head; :func:`to_checkpoint_layout` renames
the vision weights as vLLM's loader wants them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Side of the square image the vision tower takes (4 x 4 patches of 14 pixels, pooled to 2 x 2).
IMAGE_SIZE = 56
IMAGE_TOKENS = 4
STOP_TOKENS = ("<eos>", "<end_of_turn>")
#: Decoder shapes per size: ``tiny`` (Python overhead dominates a step, as it does for eager
#: transformers on a GPU), ``small`` (about 17 M parameters: a CPU step is bound by compute),
#: ``medium`` (about 195 M parameters, 780 MB of float32 weights, more than this machine's L3: a
#: batch-1 step reads every weight from memory, and decoding dominates a study's cost, as a 4B
#: model's does on a GPU).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1},
    "small": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2},
    "medium": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 14,
               "num_attention_heads": 16, "num_key_value_heads": 4},
    #: Gemma 3 4B's decoder (MedGemma 1.5 4B): 34 layers of 2560, 8 heads of 256 (for a GPU; the
    #: vocabulary and the vision tower stay small, so decoding reads ~3.2 B weights a step where
    #: the real model reads ~3.9 B with its 262 k-row embedding/head)
    "4b": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
           "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
           "query_pre_attn_scalar": 256, "sliding_window": 1024},
}

_CORPUS = [
    "FINDINGS: The heart is enlarged. There is no pleural effusion. The lungs are clear.",
    "IMPRESSION: Cardiomegaly. No pneumothorax. Right lower lobe consolidation.",
    "Write the radiology report for this study with two sections, 'FINDINGS:' and 'IMPRESSION:'.",
    "You are analyzing a contiguous block of CT slices. SLICE 1 SLICE 2 SLICE 85",
    "right lung, left lung, heart, nodule, pneumothorax, consolidation, cardiomegaly",
    "line\nline\n\nline\n\n\nline\n\n\n\nline",
    "end\n", "end\n\n", "end\n\n\n", "end\n\n\n\n",
]
#: vLLM's Gemma 3 processor looks these up by their text in the vocabulary, as a SentencePiece
#: vocabulary has them (a byte-level one spells them "Ċ"...)
NEWLINES = ("\n", "\n\n", "\n\n\n", "\n\n\n\n")


def build_serving_gemma3(out: Path, *, size: str = "tiny", seed: int = 0, dtype: str = "float32",
                         device: str = "cpu") -> Path:
    """Build the model and its processor into ``out`` (an ordinary transformers checkpoint).

    ``dtype`` is what the weights are saved in; ``device`` where they are initialised (a 4B model
    is built on the GPU in seconds, on a CPU in minutes).

    Returns
    -------
    Path
        ``out``.
    """
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        GenerationConfig,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    torch.manual_seed(seed)
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_image>", "<end_of_image>",
                "<image_soft_token>", "<start_of_turn>", "<end_of_turn>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_CORPUS * 8, trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = (  # Gemma 3's turn markup
        "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' }}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}{{ '<start_of_image>' }}{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, chat_template=template, padding_side="left",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in NEWLINES])
    stops = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    shapes = {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64, **SIZES[size]}
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), **shapes,
        max_position_embeddings=4096, final_logit_softcapping=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=14,
                                vision_use_head=False)
    config = Gemma3Config(  # type: ignore[call-arg]
        text_config=text, vision_config=vision, mm_tokens_per_image=IMAGE_TOKENS,
        boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops, tie_word_embeddings=True)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[stops] = 0.0  # their logits are 0: never the greedy choice (module docstring)
    if model.get_output_embeddings().weight.data_ptr() != embeddings.data_ptr():
        raise RuntimeError("the output head is not tied to the embeddings: stop tokens could win")
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                do_pan_and_scan=False),
        tokenizer=tokenizer, image_seq_length=IMAGE_TOKENS, chat_template=template)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id, do_sample=False)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def to_checkpoint_layout(model_dir: Path) -> Path:
    """Rename the SigLIP weights of a saved Gemma 3 to the layout of real checkpoints, in place.

    transformers 5 saves ``vision_tower.embeddings…``; real MedGemma checkpoints, and vLLM's
    loader, have ``vision_tower.vision_model.embeddings…`` (transformers reads both).
    """
    from safetensors.torch import load_file, save_file

    prefix = "vision_tower."
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(str(path))
        renamed = {(prefix + "vision_model." + key[len(prefix):]
                    if key.startswith(prefix) and not key.startswith(prefix + "vision_model.") else key): value
                   for key, value in tensors.items()}
        save_file(renamed, str(path), metadata={"format": "pt"})
    return model_dir

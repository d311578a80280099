"""Generalist vision-language models (transformers) behind one task interface.

>>> vlm = get_vlm(VLMConfig(path="/models/medgemma-4b-it", family="medgemma"))  # doctest: +SKIP
>>> images = [vlm.prepare(frame, photometric="MONOCHROME1", window=(c, w))]      # doctest: +SKIP
>>> results = vlm.run(images, parse_tasks(["report", {"classify": {"labels": ["effusion"]}}]))  # doctest: +SKIP
"""

from inference.vlm.families import FAMILIES, Family, get_family
from inference.vlm.loader import VLMConfig, clear_vlm_cache, get_vlm, load_vlm
from inference.vlm.runtime import VLM, grounded_sentences, split_report

__all__ = ["FAMILIES", "VLM", "Family", "VLMConfig", "clear_vlm_cache", "get_family", "get_vlm",
           "grounded_sentences", "load_vlm", "split_report"]

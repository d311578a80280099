"""A vision-language model behind an OpenAI-compatible server (vLLM, SGLang, LMDeploy,
``transformers serve``), with the same task interface as the in-process :class:`VLM`.

Only the generation step differs: requests expand into the same units, each unit's user turn is
the one the in-process path builds (:func:`inference.vlm.volume_recipe.user_content`, images as
PNG data URLs), decoding is greedy with the same token budget, and answers go through the same
parsers (boxes per family, report sections, labels). The probability of a classification
comes from the server's ``logprobs`` when it returns them
(:func:`inference.vlm.classify.probability_from_logprobs`); without them it is ``None``.

The server batches requests from every worker and host together (continuous batching); a unit
batch of this client is sent as concurrent requests.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from inference.errors import InvalidInputError, ModelNotConfiguredError, ModelServerUnavailableError
from inference.results import ModelInfo
from inference.vlm.classify import probability_from_logprobs
from inference.vlm.families import Family, get_family
from inference.vlm.loader import VLMConfig
from inference.vlm.runtime import VLM, Generation, _Unit
from inference.vlm.volume_recipe import user_content

#: Alternatives asked per generated token for a classification (yes/no spellings among them).
TOP_LOGPROBS = 10
#: HTTP statuses that mean "busy or restarting, try again", not "your request is wrong".
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class ServerConfig:
    """Where the model server is and what to ask it for.

    Attributes
    ----------
    server : str
        Base URL, e.g. ``http://127.0.0.1:8000`` (``/v1`` is added when missing).
    model : str
        The model name the server serves (one of its ``/v1/models``).
    family : str
        Family adapter, for prompts and answer parsing.
    max_new_tokens, batch_size, image_size, name
        As in :class:`inference.vlm.loader.VLMConfig`; ``image_size`` defaults to the family's.
    timeout_s : float
        Per request; a timeout is a transient error (the job is retried).
    """

    server: str
    model: str
    family: str
    max_new_tokens: int = 256
    batch_size: int = 4
    image_size: int | None = None
    name: str | None = None
    timeout_s: float = 300.0

    @property
    def base_url(self) -> str:
        url = self.server.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"


def _data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_content(content: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """The in-process user turn (PIL images and texts) as OpenAI content parts."""
    parts: list[dict[str, object]] = []
    for part in content:
        if part["type"] == "image":
            parts.append({"type": "image_url", "image_url": {"url": _data_url(part["image"])}})
        else:
            parts.append({"type": "text", "text": part["text"]})
    return parts


class ServerVLM(VLM):
    """:class:`VLM` whose generations run on an OpenAI-compatible server.

    Raises (from :meth:`run` / :meth:`run_batch`)
    ------
    ModelServerUnavailableError
        The server is down, refused, timed out or answered a 5xx/429: retry later.
    ModelNotConfiguredError
        The server does not serve ``model`` (checked once, on first use).
    """

    #: the server batches across every client; each job's units go to it directly
    shares_batches = False

    def __init__(self, cfg: ServerConfig, *, client: httpx.Client | None = None) -> None:
        family: Family = get_family(cfg.family)
        self.server_cfg = cfg
        self.cfg = VLMConfig(path=cfg.server, family=cfg.family, max_new_tokens=cfg.max_new_tokens,
                             batch_size=cfg.batch_size, image_size=cfg.image_size, name=cfg.name)
        self.family = family
        self.info = ModelInfo(name=cfg.name or cfg.model.rstrip("/").rsplit("/", 1)[-1],
                              version="server", family=family.name)
        self.multiple_of = family.multiple_of
        self.input_size = cfg.image_size or family.default_size
        self.generate_calls = 0
        self._client = client or httpx.Client(base_url=cfg.base_url, timeout=cfg.timeout_s)
        self._checked = False
        #: prompt tokens the server counted per request (its ``usage``), for checks and metrics
        self.prompt_tokens: list[int] = []

    # --- the server -------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:  # connect refused, timeouts, broken connections
            raise ModelServerUnavailableError(
                f"the model server {self.server_cfg.server} did not answer ({type(exc).__name__}); "
                "the job will be retried — check that the server (models.vlm.server) is running") from exc
        if response.status_code in RETRY_STATUSES:
            raise ModelServerUnavailableError(
                f"the model server {self.server_cfg.server} answered HTTP {response.status_code} to "
                f"{path}; the job will be retried")
        if response.status_code in (400, 413, 422):  # this request: too long, too many images...
            raise InvalidInputError(
                f"the model server {self.server_cfg.server} refused the request to {path} with HTTP "
                f"{response.status_code}: {response.text[:300]}")
        if response.status_code >= 400:
            raise ModelNotConfiguredError(
                f"the model server {self.server_cfg.server} refused {path} with HTTP "
                f"{response.status_code}: {response.text[:300]}")
        return response.json()

    def served_models(self) -> list[str]:
        """The model names the server lists at ``/v1/models``."""
        answer = self._request("GET", "/models")
        return [str(item.get("id")) for item in answer.get("data", [])]

    def check_model(self) -> None:
        """Raise :class:`ModelNotConfiguredError` unless the server serves ``model``."""
        served = self.served_models()
        if self.server_cfg.model not in served:
            raise ModelNotConfiguredError(
                f"models.vlm.model is {self.server_cfg.model!r}, but the server "
                f"{self.server_cfg.server} serves {', '.join(map(repr, served)) or 'no model'}; "
                "set models.vlm.model to one of those")
        self._checked = True

    # --- generation ------------------------------------------------------------------------

    def _yes_no_token_ids(self, language: str) -> tuple[list[int], list[int]] | None:
        # no tokenizer here: a non-empty marker asks for logprobs, read by token text
        return ([], [])

    def _body(self, unit: _Unit) -> dict[str, object]:
        content = user_content(unit.images, unit.prompt, slice_recipe=self.family.slice_recipe,
                               language=unit.language)
        body: dict[str, object] = {
            "model": self.server_cfg.model,
            "messages": [{"role": "user", "content": openai_content(content)}],
            "temperature": 0, "max_tokens": unit.budget, "stream": False,
        }
        if unit.yes_no is not None:
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        return body

    def _one(self, unit: _Unit) -> Generation:
        answer = self._request("POST", "/chat/completions", json=self._body(unit))
        choice = answer["choices"][0]
        usage = answer.get("usage") or {}
        if isinstance(usage.get("prompt_tokens"), int):
            self.prompt_tokens.append(usage["prompt_tokens"])
        text = str((choice.get("message") or {}).get("content") or "")
        probability = None
        steps = ((choice.get("logprobs") or {}).get("content")) or []
        if unit.yes_no is not None and steps:
            probability = probability_from_logprobs(
                [(str(s.get("token", "")), {str(t["token"]): float(t["logprob"])
                                            for t in s.get("top_logprobs") or []})
                 for s in steps], unit.language)
        # servers decode without special tokens: raw and clean text are the same
        return Generation(text, text.strip(), probability)

    def _generate(self, units: Sequence[_Unit]) -> list[Generation]:
        if not self._checked:
            self.check_model()
        self.generate_calls += 1
        if len(units) == 1:
            return [self._one(units[0])]
        with ThreadPoolExecutor(max_workers=len(units)) as pool:
            return list(pool.map(self._one, units))

    def close(self) -> None:
        self._client.close()

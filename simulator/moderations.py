"""``POST /v1/moderations``: deterministic moderation results, billed $0 as OpenAI's are.

Models: ``omni-moderation-latest`` (default; 13 categories, text and image
inputs, ``category_applied_input_types``) and ``text-moderation-latest`` (11
categories, text only), with their dated and ``-stable`` names.

Input: a string, an array of strings (one result each), or (omni) an array
of ``text`` / ``image_url`` parts (one result for the whole array).

Scores: each category's score is small and drawn from a hash of the text and
category; a few plain trigger words per category push it to about 0.9, and a
category is flagged at 0.5 or more (``flagged`` if any is). The answer has no
``usage`` (OpenAI's has none); the simulator counts the input tokens
(cl100k_base) only as the rate-limit cost.
"""

from __future__ import annotations

import hashlib
import re

from simulator import billing
from simulator.protocol import Problem

OMNI = ("omni-moderation-latest", "omni-moderation-2024-09-26")
TEXT = ("text-moderation-latest", "text-moderation-stable", "text-moderation-007")
TEXT_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "self-harm",
                   "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
                   "violence/graphic")
OMNI_CATEGORIES = TEXT_CATEGORIES + ("illicit", "illicit/violent")
IMAGE_CATEGORIES = ("self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "violence",
                    "violence/graphic")
TRIGGERS = {
    "harassment": ("idiot", "loser"), "hate": ("hate",), "violence": ("kill", "attack"),
    "violence/graphic": ("gore", "blood"), "self-harm": ("suicide",), "sexual": ("explicit",),
    "illicit": ("steal", "counterfeit"),
}
WORD_RE = re.compile(r"\w+")


class ModerationAnswer:
    __slots__ = ("model", "items", "cost")

    def __init__(self, model, items, cost):
        self.model = model
        self.items = items      # per result: (text, has_image)
        self.cost = cost


def validate(body: dict) -> None:
    if "input" not in body:
        raise Problem("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    model = body.get("model", OMNI[0])
    if model not in OMNI + TEXT:
        raise Problem(f"The model `{model}` does not exist or you do not have access to it.",
                      "model", "model_not_found", status=404)
    _items(body["input"], model in OMNI)


def _items(value, omni: bool) -> list[tuple[str, bool]]:
    if isinstance(value, str):
        return [(value, False)]
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return [(x, False) for x in value]
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        texts, image = [], False
        for i, part in enumerate(value):
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "image_url" and omni:
                image = True
            else:
                raise Problem(f"Invalid input[{i}]: expected a text part"
                              + (" or an image_url part." if omni else " (this model takes text only)."),
                              f"input[{i}]", "invalid_value")
        return [(" ".join(texts), image)]
    raise Problem("Invalid type for 'input': expected a string, an array of strings or an array of "
                  "multi-modal inputs.", "input", "invalid_type")


def answer(body: dict, model=None) -> ModerationAnswer:
    name = body.get("model", OMNI[0])
    items = _items(body["input"], name in OMNI)
    enc = billing.encoding("cl100k_base")
    return ModerationAnswer(name, items, sum(len(enc.encode_ordinary(t)) for t, _ in items))


def usage(ans: ModerationAnswer, worst_case: bool = False) -> dict:
    return {}   # free, and OpenAI reports no usage


def _result(text: str, image: bool, model: str) -> dict:
    omni = model in OMNI
    categories = OMNI_CATEGORIES if omni else TEXT_CATEGORIES
    words = set(WORD_RE.findall(text.lower()))
    scores = {}
    for cat in categories:
        h = hashlib.sha256(f"{cat}\x00{text}".encode()).digest()
        score = int.from_bytes(h[:4], "big") / 2 ** 32 * 0.02
        if words & set(TRIGGERS.get(cat, ())):
            score = 0.9 + score
        scores[cat] = round(score, 6)
    flags = {cat: s >= 0.5 for cat, s in scores.items()}
    out = {"flagged": any(flags.values()), "categories": flags, "category_scores": scores}
    if omni:
        out["category_applied_input_types"] = {
            cat: ["text"] + (["image"] if image and cat in IMAGE_CATEGORIES else []) for cat in categories}
    return out


def reply(ans: ModerationAnswer, billed: dict, model: str, new_id) -> dict:
    return {"id": new_id("modr-"), "model": model, "results": [_result(t, img, model) for t, img in ans.items]}

"""The benchmark's prompts: a warm-up prompt, ten built-in ones across categories, or a file of one's own."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Prompt:
    text: str
    category: str = ""


WARMUP_PROMPT = Prompt("Say hello and introduce yourself in two sentences.", "warm-up")

BUILTIN_PROMPTS: list[Prompt] = [
    Prompt("Write a Python function `is_prime(n)` that returns True when n is prime. Include a docstring.", "code"),
    Prompt("Implement binary search over a sorted Python list and state its time complexity.", "code"),
    Prompt(
        "Here is a function:\n\n```python\ndef mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n"
        "    return total / len(xs)\n```\n\nRewrite it so that it returns None for an empty list. Keep "
        "everything else exactly the same and show the whole function.",
        "code edit",
    ),
    Prompt("What are three practical tips for sleeping better? Keep it short.", "chat"),
    Prompt("Explain to a beginner what a hash table is and why lookups are fast.", "chat"),
    Prompt(
        "Summarise the following paragraph in two sentences, quoting its most important phrase exactly:\n\n"
        "\"The lighthouse keeper kept a logbook for forty years. Every night he wrote down the weather, the "
        "ships that passed and the state of the lamp. When the lighthouse was automated, the logbook became "
        "the only record of how often the lamp had failed: eleven times, always in winter storms.\"",
        "summarise (quote)",
    ),
    Prompt(
        "Summarise this text in one sentence:\n\n\"Photosynthesis converts light energy into chemical energy. "
        "Plants take in carbon dioxide and water and, using sunlight, produce glucose and release oxygen. The "
        "process happens mainly in the chloroplasts of leaf cells.\"",
        "summarise",
    ),
    Prompt("A train travels 180 km in 2.5 hours. What is its average speed in km/h? Show your steps.", "math"),
    Prompt("Compute the derivative of f(x) = x^3 * sin(x). Show each step.", "math"),
    Prompt("Write a haiku about autumn rain.", "creative"),
]


def builtin_prompts() -> list[Prompt]:
    """The warm-up prompt followed by the 10 measured built-in prompts."""
    return [WARMUP_PROMPT, *BUILTIN_PROMPTS]


def read_prompts(path: str | Path) -> list[Prompt]:
    """One prompt per line, or JSON lines with a ``prompt`` field (and an optional ``category``)."""
    prompts = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON line: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                raise ValueError(f"{path}:{n}: a JSON line needs a non-empty string field 'prompt'")
            prompts.append(Prompt(obj["prompt"], str(obj.get("category", ""))))
        else:
            prompts.append(Prompt(line))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts

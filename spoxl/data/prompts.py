"""Prompt sets for online training (SPO) and sampling.

API
  load_prompts(path) -> list[str]
      .txt: one prompt per non-empty line;
      .json: a list of strings or of objects with "caption" / "prompt" / "text" (the official SPO
             file assets/prompts/4k_training_prompts.json is a list of {"caption": ...} dicts);
      .jsonl: one string or object per line, same keys.
  shard_prompts(prompts, rank, world_size) -> this rank's prompts, every rank the SAME count
      (round-robin; the list is padded by wrapping around when it does not divide), because
      under ZeRO-3 every rank must run the same number of UNet calls.
"""

from __future__ import annotations

import json
from pathlib import Path

from spoxl.errors import SpoxlError

PROMPT_KEYS = ("caption", "prompt", "text")


def _prompt_of(entry, where: str) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        for key in PROMPT_KEYS:
            if isinstance(entry.get(key), str):
                return entry[key]
        raise SpoxlError(f"{where} has no {' / '.join(repr(k) for k in PROMPT_KEYS)} text")
    raise SpoxlError(f"{where} is neither a string nor an object")


def load_prompts(path) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpoxlError(f"prompt file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SpoxlError(f"prompt file {path} is not UTF-8 text (a binary file?)") from None
    if "\0" in text:
        raise SpoxlError(f"prompt file {path} holds NUL bytes (a binary file?)")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines()]
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise SpoxlError(f"prompt file {path} is not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise SpoxlError(f"prompt file {path} must hold a JSON list")
        prompts = [_prompt_of(e, f"{path} entry {i}") for i, e in enumerate(data)]
    elif path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entry = json.loads(line)
                except ValueError as e:
                    raise SpoxlError(f"{path} line {n} is not valid JSON: {e}") from None
                prompts.append(_prompt_of(entry, f"{path} line {n}"))
    else:
        raise SpoxlError(f"prompt file {path} must be .txt, .json or .jsonl")
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise SpoxlError(f"prompt file {path} holds no prompts")
    return prompts


def shard_prompts(prompts: list[str], rank: int, world_size: int) -> list[str]:
    if world_size < 1 or not 0 <= rank < world_size:
        raise SpoxlError(f"bad shard: rank {rank} of world size {world_size}")
    if not prompts:
        raise SpoxlError("no prompts to shard")
    per_rank = -(-len(prompts) // world_size)  # ceil
    padded = [prompts[i % len(prompts)] for i in range(per_rank * world_size)]
    return padded[rank::world_size]

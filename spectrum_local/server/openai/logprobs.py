"""Log-probabilities in vLLM's shapes: one position's token and alternatives (its
``dict[int, Logprob]``), the legacy OpenAI ``logprobs`` object of a choice, and a choice's
``prompt_logprobs``."""

from __future__ import annotations

import math
from typing import Sequence

# One position: token id -> (logprob, rank or None, decoded token), the position's own token
# first, then the top alternatives (vLLM's dict[int, Logprob]).
Position = dict[int, tuple[float, int | None, str]]


def _decoded_tokens(vocab, ids: list[int], previous: int | None) -> list[str]:
    """Each token decoded alone, with vLLM's repair of a partial UTF-8 character
    (LogprobsProcessor._verify_tokens): decoded with the token before it in the list, or with
    the previous generated token; else ''."""
    texts = [vocab.text(t) for t in ids]
    for i, text in enumerate(texts):
        if not text.endswith("\ufffd"):
            continue
        fixed = ""
        if i > 0 and not (joined := vocab.decode(ids[i - 1:i + 1])).endswith("\ufffd"):
            fixed = joined
        elif previous is not None and not (
                joined := vocab.decode([previous, *(ids[i - 1:i + 1] if i else ids[i:i + 1])])
        ).endswith("\ufffd"):
            fixed = joined
        texts[i] = fixed
    return texts


def _position(vocab, ids, logprobs, ranks, previous) -> Position:
    decoded = _decoded_tokens(vocab, ids, previous)
    position: Position = {}
    for t, lp, rank, text in zip(ids, logprobs, ranks, decoded):
        position[t] = (lp, rank, text)  # a repeated id keeps its place, takes the later values
    return position


def step_position(vocab, step, previous: int | None) -> Position:
    top = step.top or ()
    return _position(vocab, [step.token] + [t for t, _ in top],
                     [step.logprob] + [lp for _, lp in top],
                     [None] + list(range(1, len(top) + 1)), previous)


def prompt_positions(vocab, found, k: int) -> list[Position | None]:
    """vLLM's prompt logprobs: None for the first token, then per position the token's
    logprob and rank and the k most likely alternatives (ranks 1..k)."""
    positions: list[Position | None] = [None]
    for p in found:
        top = p.top[:k]
        positions.append(_position(vocab, [p.token] + [t for t, _ in top],
                                   [p.logprob] + [lp for _, lp in top],
                                   [p.rank] + list(range(1, len(top) + 1)), None))
    return positions


def output_positions(vocab, steps, before: Sequence[int] = ()) -> list[Position]:
    """A generated sample's positions, each token decoded after the one before it (the first
    after ``before``'s last token, if any)."""
    positions, previous = [], (before[-1] if before else None)
    for step in steps:
        positions.append(step_position(vocab, step, previous))
        previous = step.token
    return positions


def prompt_logprobs_json(positions: list[Position | None] | None):
    """The choice's prompt_logprobs: [None, {"id": {"logprob", "rank", "decoded_token"}}, ...]
    (-inf as -9999.0, vLLM's clamp_prompt_logprobs)."""
    if positions is None:
        return None
    return [None if p is None else
            {str(t): {"logprob": -9999.0 if lp == -math.inf else lp, "rank": rank,
                      "decoded_token": text}
             for t, (lp, rank, text) in p.items()}
            for p in positions]


def completion_logprobs(vocab, token_ids: Sequence[int], positions, num: int,
                         as_ids: bool, initial_offset: int = 0) -> dict:
    """vLLM's _create_completion_logprobs: the legacy OpenAI format. A token's text_offset is
    the sum of the lengths of the token strings before it (as vLLM counts)."""
    text_offset, token_logprobs, tokens, top_logprobs = [], [], [], []
    last_len = 0
    for token, position in zip(token_ids, positions):
        if position is None:
            text = f"token_id:{token}" if as_ids else vocab.text(token)
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            lp, _, decoded = position[token]
            text = f"token_id:{token}" if as_ids else decoded
            token_logprobs.append(max(lp, -9999.0))
            top_logprobs.append({  # the token itself and the num most likely
                (f"token_id:{t}" if as_ids else d): max(v, -9999.0)
                for i, (t, (v, _, d)) in enumerate(position.items()) if num >= i})
        tokens.append(text)
        text_offset.append(initial_offset if not text_offset else text_offset[-1] + last_len)
        last_len = len(text)
    return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": top_logprobs}




def chat_logprobs(vocab, token_ids: Sequence[int], positions, num: int, as_ids: bool) -> dict:
    """vLLM's _create_chat_logprobs: ``{"content": [{token, logprob, bytes, top_logprobs}]}``,
    the top list being the position's first ``num`` entries (the token itself first)."""

    def entry(token: int, text: str, logprob: float) -> dict:
        text = f"token_id:{token}" if as_ids else text
        return {"token": text, "logprob": max(logprob, -9999.0),
                "bytes": list(text.encode("utf-8", errors="replace"))}

    content = []
    for token, position in zip(token_ids, positions):
        lp, _, decoded = position[token]
        content.append({**entry(token, decoded, lp), "top_logprobs": [
            entry(t, d, v) for i, (t, (v, _, d)) in enumerate(position.items()) if i < num]})
    return {"content": content}

"""A completion's answer in vLLM's shapes: the whole response
(request_output_to_completion_response), or the stream's chunks (completion_stream_generator):
one per generated token per choice (the one that ends it carries finish_reason and
stop_reason; with echo, the first also carries the prompt), then a usage chunk with
stream_options.include_usage. Chat's the same way (chat_completion_full_generator and
chat_completion_stream_generator), with a role chunk per choice first."""

from __future__ import annotations

from .logprobs import (chat_logprobs, completion_logprobs, output_positions,
                       prompt_logprobs_json, step_position)
from .serving import Completion


def response(completion: Completion, prompt_positions, request_id: str, created: int) -> dict:
    """The non-streaming response, once every choice has finished."""
    plan, vocab = completion.plan, completion.vocab
    body = plan.body
    choices = []
    prompt_tokens = completion_tokens = 0
    for p, prompt in enumerate(plan.prompts):
        positions = None if prompt_positions is None else prompt_positions[p]
        for output in completion.outputs[p]:
            out_positions = None
            if plan.logprobs is not None:
                out_positions = output_positions(vocab, output.steps)
            prompt_text = "" if body.return_token_ids else prompt.text
            if body.echo_only:  # the prompt only
                token_ids, logprob_positions, text = prompt.tokens, positions, prompt_text
            elif body.echo:
                token_ids = prompt.tokens + output.tokens
                logprob_positions = None if out_positions is None else positions + out_positions
                text = prompt_text + output.text
            else:
                token_ids, logprob_positions, text = output.tokens, out_positions, output.text
            logprobs = None
            if plan.logprobs is not None:
                logprobs = completion_logprobs(vocab, token_ids, logprob_positions, plan.logprobs,
                                               bool(body.return_tokens_as_token_ids))
            choices.append({
                "index": len(choices), "text": text, "logprobs": logprobs,
                "finish_reason": output.finish_reason, "stop_reason": output.stop_reason,
                "token_ids": output.tokens if body.return_token_ids else None,
                "prompt_logprobs": prompt_logprobs_json(positions),
                "prompt_token_ids": prompt.tokens if body.return_token_ids else None,
            })
            completion_tokens += len(output.tokens)
        prompt_tokens += len(prompt.tokens)
    return {
        "id": request_id, "object": "text_completion", "created": created,
        "model": completion.model_name, "choices": choices, "service_tier": None,
        "system_fingerprint": None,
        "usage": {"prompt_tokens": prompt_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "completion_tokens": completion_tokens, "prompt_tokens_details": None},
        "kv_transfer_params": None,
    }


class Chunks:
    """The stream's chunks, made on the event loop from what the engine's thread posts."""

    OBJECT = "text_completion"

    def __init__(self, completion: Completion, request_id: str, created: int):
        self.completion, self.request_id, self.created = completion, request_id, created
        plan = completion.plan
        options = plan.body.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.continuous_usage = self.include_usage and bool(options.continuous_usage_stats)
        grid = lambda value: [[value] * plan.n for _ in plan.prompts]  # noqa: E731
        self.echoed, self.chars, self.made, self.last = grid(False), grid(0), grid(0), grid(None)
        self.prompt_positions = None  # with echo and logprobs: the first chunks hold them

    @staticmethod
    def post(p, j, tokens, steps, output) -> tuple:
        """On the engine's thread, in order: what the next chunk of choice (p, j) says."""
        final = output.finish_reason is not None
        delta = output.delta()
        output.reported = final
        return (p, j, tokens, steps, delta, output.finish_reason if final else None,
                output.stop_reason if final else None)

    def chunk(self, p, j, tokens, steps, text, finish, stop_reason) -> dict:
        plan, vocab = self.completion.plan, self.completion.vocab
        body, prompt = plan.body, plan.prompts[p]
        generated = list(tokens)
        positions = self._positions(p, j, tokens, steps)
        prompt_ids = None
        if (body.echo or body.return_token_ids) and not self.echoed[p][j]:
            self.echoed[p][j] = True
            prompt_ids = prompt.tokens
            if body.echo:
                prompt_text = "" if body.return_token_ids else prompt.text
                ppos = self.prompt_positions[p] if self.prompt_positions else None
                if body.echo_only:
                    text, tokens, positions = prompt_text, prompt.tokens, ppos
                else:
                    text, tokens = prompt_text + text, prompt.tokens + tokens
                    if positions is not None and ppos is not None:
                        positions = ppos + positions
        logprobs = None
        if plan.logprobs is not None:
            logprobs = completion_logprobs(vocab, tokens, positions or [], plan.logprobs,
                                           bool(body.return_tokens_as_token_ids),
                                           self.chars[p][j])
        self.chars[p][j] += len(text)
        data = self._head([{
            "index": p * plan.n + j, "text": text, "logprobs": logprobs,
            "finish_reason": finish, "stop_reason": stop_reason,
            "prompt_token_ids": prompt_ids if body.return_token_ids else None,
            "token_ids": generated if body.return_token_ids else None}])
        return self._counted(data, p, j)

    def _positions(self, p, j, tokens, steps) -> list | None:
        """The log-probs of a choice's new tokens (None if not asked for)."""
        self.made[p][j] += len(tokens)
        if self.completion.plan.logprobs is None:
            return None
        positions = []
        for step in steps:
            positions.append(step_position(self.completion.vocab, step, self.last[p][j]))
            self.last[p][j] = step.token
        return positions

    def _counted(self, data: dict, p: int, j: int) -> dict:
        """With continuous_usage_stats, every chunk says the tokens so far."""
        if self.continuous_usage:
            used, made = len(self.completion.plan.prompts[p].tokens), self.made[p][j]
            data["usage"] = {"prompt_tokens": used, "completion_tokens": made,
                             "total_tokens": used + made}
        return data

    def usage(self) -> dict:
        completion = self.completion
        prompt_tokens = sum(len(prompt.tokens) for prompt in completion.plan.prompts)
        completion_tokens = sum(len(o.tokens) for row in completion.outputs for o in row)
        return {**self._head([]), "usage": {"prompt_tokens": prompt_tokens,
                                            "total_tokens": prompt_tokens + completion_tokens,
                                            "completion_tokens": completion_tokens}}

    def _head(self, choices: list) -> dict:
        return {"id": self.request_id, "object": self.OBJECT, "created": self.created,
                "model": self.completion.model_name, "choices": choices}


# -- chat --------------------------------------------------------------------------------------


def chat_response(completion: Completion, request_id: str, created: int) -> dict:
    """vLLM's chat completion response: one choice per sample of the output turn."""
    plan, vocab = completion.plan, completion.vocab
    body, prompt = plan.body, plan.prompts[0]
    choices = []
    for j, output in enumerate(completion.outputs[0]):
        logprobs = None
        if plan.logprobs is not None:
            logprobs = chat_logprobs(vocab, output.tokens, output_positions(vocab, output.steps),
                                     plan.logprobs, bool(body.return_tokens_as_token_ids))
        choices.append({
            "index": j, "message": _assistant(output.text), "logprobs": logprobs,
            "finish_reason": output.finish_reason, "stop_reason": output.stop_reason,
            "token_ids": output.tokens if body.return_token_ids else None})
    completion_tokens = sum(len(o.tokens) for o in completion.outputs[0])
    return {
        "id": request_id, "object": "chat.completion", "created": created,
        "model": completion.model_name, "choices": choices, "service_tier": None,
        "system_fingerprint": None,
        "usage": {"prompt_tokens": len(prompt.tokens),
                  "total_tokens": len(prompt.tokens) + completion_tokens,
                  "completion_tokens": completion_tokens, "prompt_tokens_details": None},
        "prompt_logprobs": None,
        "prompt_token_ids": prompt.tokens if body.return_token_ids else None,
        "kv_transfer_params": None,
    }


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content, "refusal": None, "annotations": None,
            "audio": None, "function_call": None, "tool_calls": [], "reasoning_content": None}


class ChatChunks(Chunks):
    """The chat stream's chunks (vLLM's chat_completion_stream_generator): first one per
    choice with the assistant role, then one per generated token with its text as
    ``delta.content`` (the last with finish_reason), then the usage chunk if asked for."""

    OBJECT = "chat.completion.chunk"

    def role(self, j: int) -> dict:
        data = self._head([{"index": j, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}])
        return self._counted(data, 0, j)

    def chunk(self, p, j, tokens, steps, text, finish, stop_reason) -> dict:
        plan = self.completion.plan
        body = plan.body
        positions = self._positions(p, j, tokens, steps)
        logprobs = None
        if positions is not None:
            logprobs = chat_logprobs(self.completion.vocab, tokens, positions, plan.logprobs,
                                     bool(body.return_tokens_as_token_ids))
        data = self._head([{
            "index": j, "delta": {"content": text}, "logprobs": logprobs,
            "finish_reason": finish, "stop_reason": stop_reason,
            "token_ids": list(tokens) if body.return_token_ids else None}])
        return self._counted(data, p, j)

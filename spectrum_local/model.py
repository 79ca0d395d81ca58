"""SpectrumModel: the operations (sample, top, score, enumerate). Renders prompts with the
family's format, turns them into tokens, asks the engine, and returns typed results."""

from __future__ import annotations

import math
import os
import threading
import warnings
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from . import formats
from .backend import Backend, SamplerSettings, common_prefix, logsumexp
from .enumeration import best_first
from .errors import InputError, SpectrumError, check_int
from .ops import EnumerateOptions, SampleOptions, ScoreOptions, TopOptions
from .results import (CandidateScore, EnumeratedOutput, EnumerateResult, Sample, ScoreResult,
                      TokenProb)
from .source import find_gguf, locate
from .textfile import check_unicode
from .tokencache import TokenCache

Messages = Iterable[Mapping[str, object] | formats.Message]


def load(model: str | os.PathLike | None = None, *, format: str | None = None,
         gpu_layers: int | None = None, threads: int | None = None, ctx: int | None = None,
         batch: int = 512, lora: Sequence[tuple[str | os.PathLike, float]] = (),
         no_lora: bool = False) -> "SpectrumModel":
    """Load a spectrum model. ``model`` is a .gguf path, a hub ``REPO_ID:FILE.gguf``, or None
    for $SPECTRUM_LOCAL_MODEL or the default model. ``format`` overrides the family that is
    otherwise read from the GGUF (gemma3, llama3, qwen3). ``gpu_layers`` defaults to all layers
    when llama.cpp was built with a GPU backend; ``ctx`` to 4096 tokens, or the model's trained
    length if that is smaller. ``lora``: GGUF LoRA adapters (paths or hub specs) with their
    scales, applied by llama.cpp on top of the weights (quantized ones too), after the default
    model's own adapter unless ``no_lora``."""
    from .llama import Engine  # here: the remote client must not load llama.cpp

    source = locate(model)
    adapters = [] if no_lora else list(source.lora)
    adapters += [(find_gguf(os.fspath(path), "LoRA adapter"), scale) for path, scale in lora]
    engine = Engine(source.path, ctx=ctx, gpu_layers=gpu_layers, threads=threads, batch=batch,
                    lora=adapters)
    if format:
        fmt, format_from = formats.get_format(format), "--format"
    else:
        fmt = formats.detect(engine.metadata)
        format_from = "spectrum.format" if "spectrum.format" in engine.metadata else "architecture"
    return SpectrumModel(engine, fmt, notice=source.notice, format_from=format_from)


class SpectrumModel:
    """The operations over a ``Backend``: the llama.cpp ``Engine``, a ``Scheduler`` sharing one,
    or a vLLM server (``remote.VLLMBackend``)."""

    def __init__(self, engine: Backend, fmt: formats.Format, notice: str | None = None,
                 format_from: str = "--format"):
        self.engine = engine
        self.path = engine.path
        self.format = fmt.name
        self.notice = notice
        self._fmt = fmt
        self._format_from = format_from  # how the family was chosen, for info()
        self._control_ids = {}
        for marker in fmt.control_tokens:
            token = engine.control_token(marker)
            if token is None:
                raise SpectrumError(f"this model's vocabulary has no {marker} control token, so it "
                                    f"is not a {fmt.name}-format model (try --format)")
            self._control_ids[marker] = token
        self.end_of_output_id = self._control_ids[fmt.end_of_output]
        # A text that alone fills the context cannot be part of a prompt that runs (a vLLM
        # server's backend knows no context size: its server refuses such prompts).
        n_ctx = getattr(engine, "n_ctx", None)
        longest = n_ctx - 1 if n_ctx else None
        self._text_tokens = TokenCache(engine.tokenize, longest=longest)

    def __repr__(self) -> str:
        return f"SpectrumModel({self.path!r}, format={self.format!r})"

    def close(self) -> None:
        self.engine.close()

    def using(self, backend) -> "SpectrumModel":
        """The same model over another backend (a ``Scheduler`` of this model's engine)."""
        return SpectrumModel(backend, self._fmt, self.notice, self._format_from)

    @property
    def local(self) -> bool:
        """Whether the operations run in this process (llama.cpp), not on a server."""
        return not getattr(self.engine, "remote", False)

    def info(self) -> dict:
        """What the backend says of the model (the file and llama.cpp's build, or the server),
        and the prompt format."""
        fmt = self._fmt
        example = [formats.Message("description", "D"), formats.Message("input", "I"),
                   formats.Message("output", "O")]
        return {
            "model": self.path,
            **self.engine.describe(),
            "format": self.format,
            "format_from": self._format_from,
            "prompt_format": {
                "roles": list(formats.ROLES),
                "end_of_output": fmt.end_of_output,
                "generation_prompt": fmt.text(fmt.render([])[1 if fmt.bos else 0:]),
                "example": fmt.text(fmt.render(example)),
                "chat_template": fmt.chat_template,
            },
        }

    # -- tokens -------------------------------------------------------------------------------

    def tokenize(self, segments: Sequence[formats.Segment]) -> list[int]:
        """Control segments become their single token; text is tokenised as plain text."""
        tokens: list[int] = []
        for seg in segments:
            if seg.is_control:
                tokens.append(self._control_ids[seg.text])
            else:
                tokens += self._text_tokens(seg.text)
        return tokens

    def prompt_tokens(self, messages: Messages, output_prefix: str = "") -> list[int]:
        """The tokens the model continues: the messages, then the generation prompt."""
        return self.tokenize(self._fmt.render(formats.parse_messages(messages),
                                              output_prefix=output_prefix))

    # -- the operations -----------------------------------------------------------------------

    def sample(self, messages: Messages, n: int = 1, *, max_tokens: int = 256,
               seed: int | None = None, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
               on_sample: Callable[[int, Sample], None] | None = None,
               cancel: threading.Event | None = None) -> list[Sample]:
        """``n`` i.i.d. outputs. The defaults (temperature 1, no truncation) draw from exactly
        the distribution the model was trained to match. ``on_sample(index, sample)`` sees each
        sample as it finishes (for streaming); setting ``cancel`` stops the rest ("abort")."""
        o = SampleOptions.check(n=n, max_tokens=max_tokens, seed=seed, temperature=temperature,
                                top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty)
        # top_k past the vocabulary keeps everything (and must fit llama.cpp's int32).
        settings = SamplerSettings(o.temperature, min(o.top_k, self.engine.n_vocab), o.top_p,
                                   o.min_p, o.repeat_penalty)
        prompt_tokens = self.prompt_tokens(messages)
        as_sample = lambda g: Sample(self.engine.detokenize(g.tokens), len(g.tokens),  # noqa: E731
                                     g.finish_reason)
        on_done = None if on_sample is None else lambda i, g: on_sample(i, as_sample(g))
        runs = self.engine.generate(prompt_tokens, o.n, o.max_tokens, settings, o.seed,
                                    {self.end_of_output_id}, on_done=on_done, cancel=cancel)
        return [as_sample(g) for g in runs]

    def top(self, messages: Messages, k: int = 10, *, prefix: str = "",
            cancel: threading.Event | None = None) -> list[TokenProb]:
        """The ``k`` most likely next tokens at the first output position (or after ``prefix``,
        output text already written). Setting ``cancel`` (any read operation's) stops it
        between decodes with ``Cancelled``."""
        k = TopOptions.check(k=k, prefix=prefix).k
        if k > self.engine.n_vocab:  # a bound of the model, not of the option
            raise InputError(f"k={k} is larger than the vocabulary ({self.engine.n_vocab} tokens)")
        check_unicode(prefix, "the prefix")
        best = self.engine.next_tokens(self.prompt_tokens(messages, prefix), k, cancel=cancel)
        return [TokenProb(self.engine.token_text(t), t, math.exp(lp), lp) for t, lp in best]

    def score(self, messages: Messages, candidates: Sequence[str], *,
              end_token: bool = True, cancel: threading.Event | None = None) -> ScoreResult:
        """P(candidate, then end-of-output | prompt) for each candidate, the coverage (their
        sum) and the normalised probabilities. Repeated candidates are scored once.
        ``end_token=False`` leaves the end-of-output token out (the paper's evaluation scripts
        do): then a candidate's probability includes every longer output it begins, and the
        coverage can exceed 1."""
        if isinstance(candidates, str):  # one candidate or a spec? A spec is the front ends'
            raise InputError("candidates must be a list of strings, not one string")
        o = ScoreOptions.check(candidates=candidates, end_token=end_token)
        candidates = unique_candidates(o.candidates)
        prompt_tokens, reads = self.candidate_reads(messages, candidates, end_token=o.end_token)
        scored = reads.logprobs(self.engine, prompt_tokens, cancel=cancel)
        # In log space, so normalisation holds even when every probability underflows.
        log_coverage = float(logsumexp(np.array(scored)))
        return ScoreResult(math.exp(log_coverage), [
            CandidateScore(text, lp, math.exp(lp), math.exp(lp - log_coverage), n_tokens)
            for text, lp, n_tokens in zip(candidates, scored, reads.n_tokens)])

    def enumerate(self, messages: Messages, *, coverage: float = 0.95, min_prob: float = 0.0,
                  max_outputs: int = 100, max_tokens: int = 32,
                  max_decoded: int = 20_000,
                  cancel: threading.Event | None = None) -> EnumerateResult:
        """The outputs the model gives the most probability, most likely first, each with its
        exact probability, found by a best-first search over the token tree (see
        ``enumeration``). It stops when the outputs listed hold ``coverage`` of the mass, when
        no output left can reach ``min_prob``, at ``max_outputs`` outputs, or when the next
        read would decode more than ``max_decoded`` tokens in all. Outputs longer than
        ``max_tokens`` tokens are not followed (their mass is ``cut``)."""
        o = EnumerateOptions.check(coverage=coverage, min_prob=min_prob, max_outputs=max_outputs,
                                   max_tokens=max_tokens, max_decoded=max_decoded)
        coverage, min_prob, max_outputs, max_tokens = (o.coverage, o.min_prob, o.max_outputs,
                                                       o.max_tokens)
        if not self.engine.whole_rows:
            raise InputError("enumerate needs every token's probability at each step, and a vLLM "
                             "server gives at most --max-logprobs tokens per position: enumerate "
                             "locally or against a spectrum-local serve (--server)")
        prompt_tokens = self.prompt_tokens(messages)
        other_ends = set(self.engine.end_of_generation_tokens) - {self.end_of_output_id}
        search = best_first(self.engine, prompt_tokens, self.end_of_output_id, other_ends,
                            self.engine.detokenize, coverage=coverage, min_prob=min_prob,
                            max_outputs=max_outputs, max_tokens=max_tokens,
                            max_decoded=o.max_decoded, cancel=cancel)
        paths: dict[str, dict[tuple, float]] = {}  # text -> the token paths found that spell it
        for logprob, tokens, text in search.found:
            paths.setdefault(text, {})[tokens] = logprob
        mass = {text: math.fsum(math.exp(lp) for lp in found.values())
                for text, found in paths.items()}
        listed, total = [], 0.0
        for text in sorted(mass, key=mass.get, reverse=True):
            if len(listed) == max_outputs or total >= coverage or mass[text] < min_prob:
                break
            listed.append(text)
            total += mass[text]
        outputs, decoded, late = self._enumerated(messages, listed, paths, mass, cancel)
        # An own spelling read after the search was part of the mass it had left unexplored
        # (or cut, when longer than max_tokens): counted once, as an output now.
        unexplored, cut = search.unexplored, search.cut
        for prob, n_tokens in late:
            if n_tokens <= max_tokens:
                unexplored = max(0.0, unexplored - prob)
            else:
                cut = max(0.0, cut - prob)
        return EnumerateResult(math.fsum(o.text_prob for o in outputs), unexplored,
                               search.stopped == "exhausted", search.stopped, cut,
                               search.decoded + decoded, outputs)

    def _enumerated(self, messages: Messages, texts: list[str], paths: dict[str, dict],
                    mass: dict[str, float], cancel=None) -> tuple[list[EnumeratedOutput], int, list]:
        """The ``texts`` with the probability of their own tokenisations (what ``score``
        reads): from the paths found when it is one of them, else read (one read for all);
        the tokens that read decoded; and (prob, output tokens) of each own spelling it added
        as a path the search had not reached."""
        prompt_tokens, reads = self.candidate_reads(messages, texts)
        logprobs, missing, unfound, late = {}, [], {}, []
        for text, (own, respelled) in zip(texts, reads.plan):
            start, tokens = reads.continuations[own]
            continues = respelled is None and start == len(prompt_tokens)
            if continues and tuple(tokens[:-1]) in paths[text]:
                logprobs[text] = paths[text][tuple(tokens[:-1])]
                continue
            missing.append(text)  # only other spellings were found, or it merges into the prompt
            if continues:
                unfound[text] = len(tokens) - 1
        decoded = 0
        if missing:
            _, missing_reads = self.candidate_reads(messages, missing)
            decoded = missing_reads.decoded_tokens()
            for text, logprob in zip(missing, missing_reads.logprobs(self.engine, prompt_tokens,
                                                                         cancel=cancel)):
                logprobs[text] = logprob
                if text in unfound:  # a path of its own the search had not reached
                    mass[text] += math.exp(logprob)
                    late.append((math.exp(logprob), unfound[text]))
        outputs = [EnumeratedOutput(text, math.exp(logprobs[text]), mass[text], logprobs[text],
                                    n_tokens) for text, n_tokens in zip(texts, reads.n_tokens)]
        return sorted(outputs, key=lambda o: o.text_prob, reverse=True), decoded, late

    def candidate_reads(self, messages: Messages, candidates: Sequence[str], *,
                        end_token: bool = True) -> tuple[list[int], "Reads"]:
        """The prompt's tokens and the continuations whose log-probabilities give each
        candidate's: what ``score`` reads, and what ``tune`` trains on."""
        parsed = formats.parse_messages(messages)
        prompt_tokens = self.tokenize(self._fmt.render(parsed))
        reads = Reads()
        for text in candidates:
            ending = {"candidate": text} if end_token else {"output_prefix": text}
            reads.add(prompt_tokens, self.tokenize(self._fmt.render(parsed, **ending)))
        return prompt_tokens, reads

    def output_logprobs(self, messages: Messages,
                        outputs: Sequence[int] | None = None, *,
                        cancel: threading.Event | None = None) -> list[float]:
        """For each output message (or those numbered in ``outputs``, counting outputs from
        0): log P(its text, then end-of-output | the messages before it), the number ``score``
        gives it as a candidate after those messages. One read along the conversation gives
        them all, decoding each token once (the paper's in-context loss per example, negated:
        how well the outputs before it predict the next one)."""
        parsed = formats.parse_messages(messages)
        positions = [i for i, m in enumerate(parsed) if m.role == "output"]
        if not positions:
            raise InputError("no output messages: nothing to score")
        wanted = range(len(positions)) if outputs is None else outputs
        for n in wanted:
            check_int("output number", n, 0, len(positions) - 1)
        conversation = self.tokenize(self._fmt.render(parsed, output_prefix=None))
        reads = Reads()
        for n in wanted:
            i = positions[n]
            full = self.tokenize(self._fmt.render(parsed[:i], candidate=parsed[i].content))
            # Text runs end at control tokens and are tokenised alone, so the conversation
            # begins with exactly these tokens: every output is a path along it, and the
            # engine decodes the tokens the paths share once.
            assert conversation[:len(full)] == full
            reads.add(self.tokenize(self._fmt.render(parsed[:i])), full)
        return reads.logprobs(self.engine, conversation, cancel=cancel)


class Reads:
    """The continuations that give log P(full[len(prompt):] | prompt) for (prompt, full)
    pairs whose prompts are prefixes of one read's tokens, read together."""

    def __init__(self):
        self.continuations: list[tuple[int, list[int]]] = []
        self.plan: list[tuple[int, int | None]] = []  # (own, re-spelled prompt part or None)
        self.n_tokens: list[int] = []  # the tokens scored for each

    def add(self, prompt: list[int], full: list[int]) -> None:
        start = common_prefix(prompt, full)
        own, respelled = len(self.continuations), None
        self.continuations.append((start, full[start:]))
        if start < len(prompt):
            # The tokenizer merged the continuation into the prompt's last text, so the scored
            # tokens re-spell part of the prompt: divide by that part's own probability.
            respelled = len(self.continuations)
            self.continuations.append((start, prompt[start:]))
        self.plan.append((own, respelled))
        self.n_tokens.append(len(full) - start)

    def logprobs(self, engine: Backend, tokens: list[int], *, cancel=None) -> list[float]:
        """Each pair's log-probability, from one read along ``tokens`` (left in the cache)."""
        logprobs = engine.continuation_logprobs(tokens, self.continuations, cancel=cancel)
        return [float(x) for x in self.combine([lp.sum() for lp in logprobs])]

    def decoded_tokens(self) -> int:
        """The tokens a read of these continuations decodes after the cached prompt: its trie's
        nodes (a continuation's last token is read, not decoded)."""
        return len({(start, tuple(tokens[:k])) for start, tokens in self.continuations
                    for k in range(1, len(tokens))})

    def combine(self, sums: Sequence) -> list:
        """Each pair's log-probability from its continuations' summed log-probabilities
        (numbers, or torch tensors when tuning)."""
        return [sums[own] - sums[respelled] if respelled is not None else sums[own]
                for own, respelled in self.plan]


def unique_candidates(candidates: Sequence[str]) -> list[str]:
    """The candidates (checked by ``ScoreOptions``) each once, with a warning when some
    repeat."""
    unique = list(dict.fromkeys(candidates))
    if len(unique) < len(candidates):
        warnings.warn(f"{len(candidates) - len(unique)} repeated candidate(s) scored once, so "
                      "coverage counts each answer once", UserWarning, stacklevel=3)
    return unique

"""How the original model rates an answer: the help for judging what INT4 lost in one answer.

The original model reads the conversation and the INT4 model's answer in one forward pass
(teacher forcing) and gives, for every token of that answer, the probability it would itself
have given that token at that place. Tokens it found unlikely are where the 4-bit model went
its own way; the mean log-probability per token sums the whole answer up, beside the same figure
for the original's own answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from workbench.generation.engine import CausalLM

# A token the original would write fewer than 1 time in 20 at that place counts as unlikely.
UNLIKELY_PROBABILITY = 0.05
UNLIKELY_WORDS = "fewer than 1 time in 20"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def answer_logprobs(lm: CausalLM, context: Sequence[int], answer: Sequence[int]) -> np.ndarray:
    """log p(answer[i] | context, answer[:i]) under `lm` for every answer token, in one pass."""
    if not answer:
        return np.zeros(0)
    if not context:
        raise ValueError("The answer needs the prompt it answers.")
    ids = np.asarray([[*context, *answer]], np.int64)
    logits, _ = lm.forward(ids)
    # The logits at position p predict token p + 1: those from the prompt's last token on.
    predicting = log_softmax(logits[0, len(context) - 1 : -1].astype(np.float64))
    return predicting[np.arange(len(answer)), np.asarray(answer)]


def judge(
    original: CausalLM,
    tokenizer,
    original_context: Sequence[int],
    original_answer: Sequence[int],
    int4_context: Sequence[int],
    int4_answer: Sequence[int],
    int4_text: str,
) -> dict:
    """The original's rating of the INT4 answer (in the INT4 model's own conversation), and of its own.

    `tokenizer` is a tokenizers.Tokenizer; it places each unlikely token in `int4_text` (start, end).
    """
    own = answer_logprobs(original, original_context, original_answer)
    rated = answer_logprobs(original, int4_context, int4_answer)
    probabilities = np.exp(rated)
    unlikely = []
    for position in np.flatnonzero(probabilities < UNLIKELY_PROBABILITY):
        start, end = (
            min(len(tokenizer.decode(list(int4_answer[:n]), skip_special_tokens=True)), len(int4_text))
            for n in (position, position + 1)
        )
        while start < end and int4_text[start].isspace():  # mark the word, not the space before it
            start += 1
        unlikely.append({  # start, end: where the token's visible text is in int4_text
            "position": int(position),
            "text": tokenizer.decode([int(int4_answer[position])], skip_special_tokens=True),
            "probability": round(float(probabilities[position]), 4),
            "start": start,
            "end": end,
        })
    return {
        "scored_by": "original",
        "threshold": UNLIKELY_PROBABILITY,
        "threshold_words": UNLIKELY_WORDS,
        "original_mean_logprob": round(float(own.mean()), 4) if own.size else None,
        "int4_mean_logprob": round(float(rated.mean()), 4) if rated.size else None,
        "int4_token_probabilities": [round(float(p), 4) for p in probabilities],
        "unlikely": unlikely,
        "sentence": sentence(list(original_answer) == list(int4_answer), len(int4_answer), len(unlikely)),
    }


def sentence(identical: bool, tokens: int, unlikely: int) -> str:
    """The judgement in one plain sentence."""
    if identical:
        return "Both models wrote exactly the same answer."
    if tokens == 0:
        return "The 4-bit model wrote nothing."
    if unlikely == 0:  # every word plausible to the original; the answer may still be another one (shorter, other facts)
        return "The original model would readily have written every word of the 4-bit answer."
    places = "1 place" if unlikely == 1 else f"{unlikely} places"
    return f"The 4-bit model chose words the original would rarely choose at {places}."

"""Captioning and VQA metrics as the field computes them.

- CIDEr-D exactly as `pycocoevalcap`'s `CiderScorer` (n = 4, σ = 6, idf over the evaluated set's
  references, ×10 — including its length term, which counts bigrams), in plain Python so no Java
  is needed; captions are first tokenized like COCO's PTB tokenizer (lower case, punctuation out).
- VQA accuracy with the official answer normalisation (punctuation, articles, number words,
  contractions) and min(#matching references / 3, 1).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

# ----------------------------------------------------------------------------- CIDEr-D

_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
              "...", ";"}


def coco_tokenize(text: str) -> str:
    """Lower-case and strip punctuation as COCO's PTBTokenizer does before scoring."""
    text = text.lower().replace("\n", " ")
    tokens = re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", text)
    return " ".join(t for t in tokens if t not in _PTB_PUNCT and re.search(r"[a-z0-9]", t))


def _ngrams(sentence: str, n: int = 4) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(candidates: list[str], references: list[list[str]], *, n: int = 4, sigma: float = 6.0,
            tokenize: bool = True) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-candidate scores); references[i] are the references of candidates[i]."""
    if len(candidates) != len(references):
        raise ValueError("one list of references per candidate is needed")
    if not candidates:
        return 0.0, []
    prep = coco_tokenize if tokenize else (lambda s: s)
    tests = [_ngrams(prep(c), n) for c in candidates]
    refs = [[_ngrams(prep(r), n) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for g in r})
    ref_len = math.log(float(len(refs)))

    def vec(counts: Counter):
        v = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = tf * (ref_len - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:  # as in pycocoevalcap: the "length" counts bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for test, rs in zip(tests, refs, strict=True):
        vh, nh, lh = vec(test)
        total = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r)
            delta = float(lh - lr)
            for k in range(n):
                val = sum(min(w, vr[k][g]) * vr[k][g] for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-(delta**2) / (2 * sigma**2))
        scores.append(sum(total) / n / len(rs) * 10.0)
    return sum(scores) / len(scores), scores


# ----------------------------------------------------------------------------- VQA accuracy

_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "im": "i'm", "ive": "i've", "its": "it's", "thats": "that's", "whats": "what's",
                 "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't", "havent": "haven't",
                 "couldnt": "couldn't", "shouldnt": "shouldn't", "wouldnt": "wouldn't", "didnt": "didn't"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    """The official VQA evaluation's processing of an answer string."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(#references equal to the prediction / 3, 1) after normalisation; 1 reference → exact match."""
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    return min(1.0, matches / 3.0) if len(answers) >= 3 else float(matches > 0)
